"""A procedural captioned dataset of simple scenes: coloured shapes on a plain background.

Each scene has a shape type (:data:`SHAPES`), a shape colour and a background colour (both from
:data:`COLOURS`, never equal), a size (:data:`SIZES`), a count (1 to 3 shapes, bounding boxes separated by a
gap, so shapes never touch) and, for a single shape only, a position (:data:`POSITIONS`). Captions are
generated from the parameters and parse back to them (:func:`parse_caption`)::

    "a small red circle on the left of a blue background"      (count 1: position given)
    "a large white square in the center of a black background"
    "two small red circles on a blue background"               (counts 2-3: no position)

Everything is deterministic from ``(seed, index)``: :func:`sample_scene` draws scene ``index`` from its own
generator seeded with ``[seed, index]``, so any index can be drawn without drawing the ones before it.
Geometry is stored as fractions of the image side, so a scene renders at any size; :func:`render` draws
with 4x supersampling (anti-aliased curves and slants; boxes snapped to the pixel grid), pixel-identical
across calls.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image, ImageDraw

from sdxl_core.atomicio import write_json_atomic, write_png_atomic, write_text_atomic
from sdxl_core.errors import InvalidConfigError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
#: Named colours (RGB); pairwise clearly distinct (>= ~100 RGB distance, well apart in CIELAB).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (245, 230, 40),
    "purple": (150, 20, 130),
    "orange": (245, 125, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "cyan": (40, 205, 215),
}
SIZES: tuple[str, ...] = ("small", "large")
#: Half the side of a shape's bounding box, as a fraction of the image side.
SIZE_HALF: dict[str, float] = {"small": 0.10, "large": 0.17}
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
#: Centre of a single shape per position (fractions of the image side), before jitter.
POSITION_ANCHORS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "center": (0.5, 0.5)}
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left of", "right": "on the right of", "top": "at the top of", "bottom": "at the bottom of",
    "center": "in the center of"}
POSITION_JITTER = 0.03
MAX_COUNT = 3
NUMBER_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three"}
#: Free border (fraction of the side) that shapes keep from the image edge, and gap between bounding boxes.
MARGIN = 0.05
GAP = 0.08
SUPERSAMPLE = 4


@dataclass(frozen=True)
class CaptionParams:
    """What a caption asks for (the scene parameters a caption carries; no geometry)."""

    shape: str
    colour: str
    count: int
    size: str
    position: str | None
    background: str

    @property
    def params(self) -> "CaptionParams":
        """Only what the caption carries, as a plain ``CaptionParams`` (a ``Scene`` without its geometry)."""
        if type(self) is CaptionParams:
            return self
        return CaptionParams(**{f.name: getattr(self, f.name) for f in fields(CaptionParams)})


@dataclass(frozen=True)
class Scene(CaptionParams):
    """All parameters of one scene: what its caption says, plus geometry. ``centers`` are (x, y) shape centres
    as fractions of the image side; ``position`` is None for counts 2-3; ``seed``/``index`` record where the
    scene was drawn."""

    centers: tuple[tuple[float, float], ...]
    seed: int | None = None
    index: int = 0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["centers"] = [list(c) for c in self.centers]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scene":
        return cls(shape=d["shape"], colour=d["colour"], count=int(d["count"]), size=d["size"],
                   position=d.get("position"), background=d["background"],
                   centers=tuple((float(x), float(y)) for x, y in d["centers"]),
                   seed=d.get("seed"), index=int(d.get("index", 0)))


def _place(rng: np.random.Generator, count: int, half: float) -> tuple[tuple[float, float], ...]:
    """``count`` centres whose bounding boxes (half side ``half``) stay inside the margin and apart by GAP."""
    lo, hi = MARGIN + half, 1.0 - MARGIN - half
    sep = 2 * half + GAP
    for _ in range(2000):
        pts = rng.uniform(lo, hi, size=(count, 2))
        ok = all(abs(pts[i, 0] - pts[j, 0]) >= sep or abs(pts[i, 1] - pts[j, 1]) >= sep
                 for i in range(count) for j in range(i))
        if ok:
            return tuple((round(float(x), 4), round(float(y), 4)) for x, y in pts)
    corners = [(lo, lo), (hi, hi), (hi, lo)]  # pragma: no cover - rejection sampling virtually never fails
    return tuple(corners[:count])  # pragma: no cover


def sample_scene(rng_or_seed: np.random.Generator | int, index: int = 0) -> Scene:
    """Scene ``index`` of the world with seed ``rng_or_seed`` (an int: drawn from ``default_rng([seed, index])``,
    so random access is cheap), or drawn from a given generator (advancing it; ``seed`` is then None)."""
    if isinstance(rng_or_seed, np.random.Generator):
        rng, seed = rng_or_seed, None
    else:
        seed = int(rng_or_seed)
        if seed < 0 or index < 0:
            raise InvalidConfigError(f"seed {seed} and index {index} must be >= 0")
        rng = np.random.default_rng([seed, int(index)])
    names = list(COLOURS)
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = names[int(rng.integers(len(names)))]
    backgrounds = [c for c in names if c != colour]
    background = backgrounds[int(rng.integers(len(backgrounds)))]
    size = SIZES[int(rng.integers(len(SIZES)))]
    count = int(rng.integers(1, MAX_COUNT + 1))
    half = SIZE_HALF[size]
    if count == 1:
        position: str | None = POSITIONS[int(rng.integers(len(POSITIONS)))]
        ax, ay = POSITION_ANCHORS[position]
        jx, jy = rng.uniform(-POSITION_JITTER, POSITION_JITTER, size=2)
        centers: tuple[tuple[float, float], ...] = ((round(ax + float(jx), 4), round(ay + float(jy), 4)),)
    else:
        position = None
        centers = _place(rng, count, half)
    return Scene(shape=shape, colour=colour, count=count, size=size, position=position, background=background,
                 centers=centers, seed=seed, index=int(index))


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as an RGB image of ``size`` x ``size`` pixels (drawn at 4x, box-downsampled: anti-aliased)."""
    if size < 16:
        raise InvalidConfigError(f"render size {size} is too small; use >= 16 pixels")
    s = SUPERSAMPLE
    big = size * s
    img = Image.new("RGB", (big, big), COLOURS[scene.background])
    draw = ImageDraw.Draw(img)
    fill = COLOURS[scene.colour]
    # Boxes snap to the output pixel grid: straight edges are crisp, only curves and slants are anti-aliased.
    hp = max(2, round(SIZE_HALF[scene.size] * size))
    for cx, cy in scene.centers:
        px, py = round(cx * size), round(cy * size)
        x0, y0, x1, y1 = (px - hp) * s, (py - hp) * s, (px + hp) * s - 1, (py + hp) * s - 1
        if scene.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif scene.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif scene.shape == "triangle":
            draw.polygon([((x0 + x1) / 2.0, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            raise InvalidConfigError(f"unknown shape {scene.shape!r}; expected one of {SHAPES}")
    return img.resize((size, size), Image.Resampling.BOX)


def caption(scene: Scene | CaptionParams) -> str:
    """The caption of a scene, e.g. ``"two small red circles on a blue background"``."""
    noun = scene.shape + ("s" if scene.count > 1 else "")
    head = f"{NUMBER_WORDS[scene.count]} {scene.size} {scene.colour} {noun}"
    where = POSITION_PHRASES[scene.position] if scene.count == 1 and scene.position else "on"
    return f"{head} {where} a {scene.background} background"


_WORD_NUMBERS = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3}
_PHRASE_POSITIONS = {v: k for k, v in POSITION_PHRASES.items()}
_CAPTION_RE = re.compile(
    r"^(?P<count>a|an|one|two|three) (?P<size>{sizes}) (?P<colour>{colours}) (?P<shape>{shapes})(?P<plural>s?) "
    r"(?:(?P<where>{phrases})|on) a (?P<background>{colours}) background\.?$".format(
        sizes="|".join(SIZES), colours="|".join(COLOURS), shapes="|".join(SHAPES),
        phrases="|".join(re.escape(p) for p in POSITION_PHRASES.values())))


def parse_caption(text: str) -> CaptionParams:
    """The parameters a caption asks for; raises :class:`InvalidConfigError` for text outside the grammar."""
    m = _CAPTION_RE.match(" ".join(text.strip().lower().split()))
    if m is None:
        raise InvalidConfigError(f"caption {text!r} is not in the toy-world grammar, e.g. "
                                 f"'two small red circles on a blue background'")
    count = _WORD_NUMBERS[m["count"]]
    where = m["where"]
    return CaptionParams(shape=m["shape"], colour=m["colour"], count=count, size=m["size"],
                         position=_PHRASE_POSITIONS[where] if where else None, background=m["background"])


@dataclass(frozen=True)
class ToySample:
    """One dataset item: its index, scene, caption and rendered image."""

    index: int
    scene: Scene
    caption: str
    image: Image.Image


class ToyDataset:
    """Scenes of the world ``seed``: ``ds[i]`` is a :class:`ToySample`. With ``length=None`` the dataset is
    unlimited (any index >= 0; ``len()`` raises ``TypeError``; iteration never ends)."""

    def __init__(self, seed: int, length: int | None = None, *, image_size: int = 64) -> None:
        if length is not None and length < 0:
            raise InvalidConfigError(f"length {length} must be >= 0 or None")
        self.seed = int(seed)
        self.length = length
        self.image_size = int(image_size)

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("an unlimited ToyDataset (length=None) has no length")
        return self.length

    def scene(self, index: int) -> Scene:
        return sample_scene(self.seed, self._check(index))

    def _check(self, index: int) -> int:
        index = int(index)
        if self.length is not None:
            if index < 0:
                index += self.length
            if not 0 <= index < self.length:
                raise IndexError(f"index out of range for a ToyDataset of length {self.length}")
        elif index < 0:
            raise IndexError("an unlimited ToyDataset takes indices >= 0")
        return index

    def __getitem__(self, index: int) -> ToySample:
        index = self._check(index)
        sc = sample_scene(self.seed, index)
        return ToySample(index=index, scene=sc, caption=caption(sc), image=render(sc, self.image_size))

    def __iter__(self) -> Iterator[ToySample]:
        i = 0
        while self.length is None or i < self.length:
            yield self[i]
            i += 1


def write_dataset(folder: str | Path, n: int, seed: int, *, image_size: int = 64) -> Path:
    """Write ``n`` scenes as ``{index:05d}.png`` plus ``metadata.jsonl`` (one line per image: ``file``,
    ``prompt``, ``caption``, ``scene``) and ``dataset.json`` (seed, n, size). Every file is written atomically;
    ``metadata.jsonl`` is written whole at the end, so a rerun replaces it. Returns the metadata path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for sample in ToyDataset(seed, n, image_size=image_size):
        name = f"{sample.index:05d}.png"
        write_png_atomic(folder / name, sample.image)
        lines.append(json.dumps({"file": name, "prompt": sample.caption, "caption": sample.caption,
                                 "scene": sample.scene.as_dict()}, ensure_ascii=False))
    meta = folder / "metadata.jsonl"
    write_text_atomic(meta, "".join(line + "\n" for line in lines))
    write_json_atomic(folder / "dataset.json", {"seed": int(seed), "n": int(n), "image_size": int(image_size),
                                                "shapes": list(SHAPES), "colours": COLOURS, "sizes": list(SIZES),
                                                "positions": list(POSITIONS)})
    return meta


#: World seeds: 0 trains the toy models (sdxl_core.toy.train), 1 is their held-out evaluation, 2 gives the prompts
#: of ``make bench`` on the ``toy`` preset.
BENCH_PROMPT_SEED = 2
BENCH_PROMPT_COUNT = 24


def bench_prompts(n: int = BENCH_PROMPT_COUNT, seed: int = BENCH_PROMPT_SEED) -> tuple[str, ...]:
    """The built-in prompts of the ``toy`` preset: captions of the first ``n`` scenes of a held-out world."""
    return tuple(caption(sample_scene(seed, i)) for i in range(n))


# ----------------------------------------------------------------------------------------------- CLI

def add_arguments(p: Any) -> None:
    p.add_argument("--out", required=True, help="folder for NNNNN.png, metadata.jsonl and dataset.json")
    p.add_argument("--n", type=int, required=True, help="number of scenes (indices 0 .. n-1)")
    p.add_argument("--seed", type=int, default=3, help="world seed (0 trains the toy models, 1 evaluates them, "
                   "2 gives the toy bench prompts; default %(default)s: a held-out reference set)")
    p.add_argument("--image-size", type=int, default=64)


def main(args: Any) -> int:
    if args.n < 1:
        raise InvalidConfigError(f"--n {args.n} must be >= 1")
    meta = write_dataset(args.out, args.n, args.seed, image_size=args.image_size)
    print(f"wrote {args.n} scenes of world {args.seed} and {meta}")
    return 0
