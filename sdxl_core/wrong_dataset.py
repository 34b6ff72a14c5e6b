"""``sdxl-bench make-wrong-dataset``: SDXL's own bad images, for a LoRA that learns them under the word ``wrong``.

The reference recipe: the 13 :data:`KEYWORDS` joined with ", " make one prompt; prompt ``i`` weights keyword ``i``
as ``(keyword)++++`` through compel; each prompt is generated with base + refiner at guidance scales 8..13, so
13 x 6 = 78 images.

Order and seeds (deterministic): items are prompt-major, ``index = prompt_index * len(guidance_scales) +
guidance_index`` (keyword 0 at every guidance scale, then keyword 1, ...); ``--count N`` takes the first N.
Item ``index`` is generated with seed ``seed + index`` and written to ``wrong-<index:04d>-g<guidance>.png``.

The output folder holds the PNGs, ``metadata.jsonl`` (one complete line per image, appended after its PNG is
written) and ``dataset.json`` (the resolved configuration, written atomically). A rerun skips every image whose
PNG exists and has a metadata line; a PNG without a line is generated again, and lines are never duplicated. A
rerun whose configuration differs from ``dataset.json`` (anything but ``count`` and ``device``) is refused.

``--degrade blur,jpeg,...`` corrupts each generated image before it is written (:mod:`sdxl_core.degrade`, in the
order given, item ``index`` with seed ``seed + index``, so a rerun writes the same bytes); the list is recorded in
``dataset.json`` (``config.degrade``) and on each metadata line. Without it, nothing is added anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from sdxl_core.atomicio import append_json_line, read_json_lines, write_json_atomic, write_png_atomic
from sdxl_core.degrade import DEGRADATIONS
from sdxl_core.degrade import check_names as check_degrade_names
from sdxl_core.degrade import degrade as degrade_image
from sdxl_core.degrade import parse_names as parse_degrade_names
from sdxl_core.errors import InvalidConfigError

KEYWORDS: tuple[str, ...] = (
    "low quality", "bad hands", "random text", "error", "missing or extra fingers", "cropped", "jpeg artifacts",
    "signature", "watermark", "blurry", "ugly", "duplicate", "mutilated",
)
DEFAULT_GUIDANCE_SCALES: tuple[float, ...] = (8.0, 9.0, 10.0, 11.0, 12.0, 13.0)
WEIGHT = "++++"
TRIGGER_WORD = "wrong"  # the caption every image gets in metadata.jsonl
DATASET_FILE = "dataset.json"
METADATA_FILE = "metadata.jsonl"
SCHEMA_VERSION = 1
_RESUME_IGNORES = ("count", "device")  # keys that do not change any image: may differ on a rerun


def wrong_prompts(keywords: tuple[str, ...] = KEYWORDS) -> list[str]:
    """One prompt per keyword: the joined keyword list with that keyword replaced by ``(keyword)++++``."""
    return [", ".join(f"({k}){WEIGHT}" if j == i else k for j, k in enumerate(keywords)) for i in range(len(keywords))]


def parse_guidance_scales(text: str) -> tuple[float, ...]:
    """``"8,9,10"`` -> ``(8.0, 9.0, 10.0)``; refuses an empty or unparsable list (the values: ``check``)."""
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise InvalidConfigError("--guidance-scales is empty; pass comma-separated numbers, e.g. 8,9,10,11,12,13")
    try:
        return tuple(float(p) for p in parts)
    except ValueError:
        raise InvalidConfigError(f"--guidance-scales {text!r} is not a comma-separated list of numbers; "
                                 f"pass e.g. 8,9,10,11,12,13") from None


@dataclass(frozen=True)
class WrongDatasetConfig:
    """What to make and where. ``width``/``height`` None mean 1024 (128 for the ``tiny`` preset); ``count`` None
    means the whole grid (``len(KEYWORDS) * len(guidance_scales)`` images)."""

    base: str
    out: str
    refiner: str | None = None
    vae: str | None = None
    variant: str | None = None
    device: str | None = None
    dtype: str | None = None
    guidance_scales: tuple[float, ...] = DEFAULT_GUIDANCE_SCALES
    count: int | None = None
    width: int | None = None
    height: int | None = None
    steps: int = 50
    high_noise_frac: float = 0.8
    seed: int = 0
    degrade: tuple[str, ...] = ()  # sdxl_core.degrade names, applied in order to each image before it is saved

    @property
    def size(self) -> tuple[int, int]:
        from sdxl_core.presets import default_size

        default = default_size(self.base)
        return (default if self.width is None else self.width, default if self.height is None else self.height)

    @property
    def grid_size(self) -> int:
        return len(KEYWORDS) * len(self.guidance_scales)

    def settings(self, guidance: float) -> Any:
        from sdxl_core.generate import GenerationSettings

        width, height = self.size
        return GenerationSettings(steps=self.steps, guidance_scale=guidance, high_noise_frac=self.high_noise_frac,
                                  width=width, height=height, use_compel=True)

    def check(self) -> None:
        """Raise :class:`InvalidConfigError` naming the option and the fix; nothing is loaded or written."""
        if not isinstance(self.base, str) or not self.base.strip():
            raise InvalidConfigError("--base is empty; pass tiny, sdxl-random, a hub id or a diffusers folder")
        if not isinstance(self.out, str) or not self.out.strip():
            raise InvalidConfigError("--out is empty; pass the folder to write the dataset into")
        if Path(self.out).expanduser().exists() and not Path(self.out).expanduser().is_dir():
            raise InvalidConfigError(f"--out {self.out!r} is a file; give a folder (new or an earlier dataset)")
        scales = self.guidance_scales
        if not isinstance(scales, tuple) or not scales:
            raise InvalidConfigError(f"guidance_scales must be a non-empty tuple, got {scales!r}; "
                                     f"pass e.g. --guidance-scales 8,9,10,11,12,13")
        for g in scales:
            if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g <= 0:
                raise InvalidConfigError(f"guidance scale {g!r} must be a finite number > 0; "
                                         f"pass e.g. --guidance-scales 8,9,10,11,12,13")
        if len(set(scales)) != len(scales):
            raise InvalidConfigError(f"--guidance-scales {','.join(f'{g:g}' for g in scales)} repeats a value; "
                                     f"give each scale once")
        for g in scales:
            self.settings(g).check()  # steps, high_noise_frac, width/height (multiples of 8), guidance range
        count, total = self.count, self.grid_size
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or not 0 < count <= total):
            raise InvalidConfigError(f"--count must be an integer from 1 to {total} ({len(KEYWORDS)} prompts x "
                                     f"{len(scales)} guidance scales), got {count!r}; leave it out for all")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) \
                or not 0 <= self.seed <= 2**63 - 1 - self.grid_size:
            raise InvalidConfigError(f"--seed must be a non-negative integer below 2**63 - {self.grid_size}, "
                                     f"got {self.seed!r}; pass e.g. --seed 0")
        check_degrade_names(self.degrade)

    def document(self) -> dict[str, Any]:
        """The resolved configuration as written to ``dataset.json``; ``degrade`` only when there is one, so a
        dataset made without it has the same document as before the option existed."""
        width, height = self.size
        config = dict(asdict(self), guidance_scales=list(self.guidance_scales), width=width, height=height,
                      count=self.count or self.grid_size, degrade=list(self.degrade))
        del config["out"]
        if not self.degrade:
            del config["degrade"]
        from sdxl_core.presets import TOY, toy_fingerprint

        if TOY in (self.base, self.refiner):  # the name stays the same when `make train-toy` retrains the weights
            config["toy_weights"] = toy_fingerprint()
        return {"schema": SCHEMA_VERSION, "config": config, "keywords": list(KEYWORDS), "prompts": wrong_prompts(),
                "order": "prompt-major: index = prompt_index * len(guidance_scales) + guidance_index",
                "seed_rule": "seed + index", "caption": TRIGGER_WORD}


@dataclass(frozen=True)
class DatasetItem:
    """One image of the dataset."""

    index: int
    prompt: str
    keyword: str
    guidance: float
    seed: int

    @property
    def file(self) -> str:
        return f"wrong-{self.index:04d}-g{self.guidance:g}.png"


def plan(config: WrongDatasetConfig) -> list[DatasetItem]:
    """The first ``config.count`` items of the prompt x guidance grid, prompt-major, seed ``seed + index``."""
    config.check()
    prompts, scales = wrong_prompts(), config.guidance_scales
    return [DatasetItem(i, prompts[i // len(scales)], KEYWORDS[i // len(scales)], float(scales[i % len(scales)]),
                        config.seed + i) for i in range(config.count or config.grid_size)]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (ValueError, OSError):
        return None


def _check_resume(folder: Path, document: dict[str, Any]) -> None:
    """A rerun must ask for the same images, or the dataset would mix two configurations."""
    path = folder / DATASET_FILE
    if not path.exists():
        return
    old = _read_json(path)
    if not isinstance(old, dict) or not isinstance(old.get("config"), dict):
        raise InvalidConfigError(f"{path} is not a dataset.json written by make-wrong-dataset; use another --out")
    old, new = old["config"], json.loads(json.dumps(document["config"]))
    differs = sorted(k for k in set(old) | set(new) if k not in _RESUME_IGNORES and old.get(k) != new.get(k))
    if differs == ["toy_weights"]:
        raise InvalidConfigError(
            f"{folder} holds a dataset made with other toy weights (retrained since?); use another --out, or delete "
            f"{folder} to make it again with the current weights")
    if differs:
        raise InvalidConfigError(
            f"{folder} already holds a dataset made with a different configuration ({', '.join(differs)} differ); "
            f"rerun with the same options to resume it, or use another --out")


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive lock on the dataset folder, so two processes never append the same metadata line."""
    import fcntl

    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InvalidConfigError(f"{folder} is in use by another make-wrong-dataset process; wait for it or "
                                     f"use another --out") from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


def make_wrong_dataset(config: WrongDatasetConfig, pipes: Any = None, progress: bool = True) -> dict[str, Any]:
    """Generate every missing image of ``config`` into ``config.out``; load the pipelines unless ``pipes`` is given.

    Returns ``{"out", "total", "written", "skipped", "seconds", "images_per_second"}``; ``seconds`` is the time
    spent generating and writing (model loading excluded); ``images_per_second`` is None when nothing was written.
    """
    from tqdm import tqdm

    items = plan(config)  # checks the whole configuration first
    folder = Path(config.out).expanduser()
    document = config.document()
    _check_resume(folder, document)
    if pipes is None:
        from sdxl_core.flops import split_steps
        from sdxl_core.loading import load_pipelines

        if config.refiner is not None:
            split_steps(config.steps, config.high_noise_frac)  # both stages need a step; checked before loading
        pipes = load_pipelines(config.base, config.refiner, vae=config.vae, device=config.device,
                               dtype=config.dtype, variant=config.variant)
    from sdxl_core.generate import GenerationRequest, PromptEncoder, check_split, generate

    if (pipes.refiner is None) != (config.refiner is None):
        raise InvalidConfigError(f"config.refiner is {config.refiner!r} but the given pipelines "
                                 f"{'have no' if pipes.refiner is None else 'have a'} refiner; make them agree")
    if pipes.refiner is not None:
        check_split(pipes.base.scheduler, config.steps, config.high_noise_frac)
    folder.mkdir(parents=True, exist_ok=True)
    with _folder_lock(folder):
        _check_resume(folder, document)  # again under the lock
        if _read_json(folder / DATASET_FILE) != json.loads(json.dumps(document)):  # a rerun rewrites nothing
            write_json_atomic(folder / DATASET_FILE, document)
        listed = {line.get("file") for line in read_json_lines(folder / METADATA_FILE)}
        pending = [i for i in items if not (i.file in listed and (folder / i.file).is_file())]
        encoder = PromptEncoder(pipes)
        width, height = config.size
        t0 = time.perf_counter()
        with tqdm(total=len(items), initial=len(items) - len(pending), unit="img", file=sys.stderr,
                  disable=not progress, desc="wrong dataset") as bar:
            for item in pending:
                request = GenerationRequest(item.prompt, item.seed, settings=config.settings(item.guidance))
                image = generate(pipes, request, encoder).images[0]
                if config.degrade:
                    image = degrade_image(image, config.degrade, item.seed)
                write_png_atomic(folder / item.file, image)
                if item.file not in listed:
                    line = {
                        "file": item.file, "file_name": item.file, "caption": TRIGGER_WORD, "index": item.index,
                        "prompt": item.prompt, "keyword": item.keyword, "guidance": item.guidance, "seed": item.seed,
                        "width": width, "height": height, "steps": config.steps,
                        "high_noise_frac": config.high_noise_frac, "base": pipes.base_source,
                        "refiner": pipes.refiner_source, "vae": pipes.vae_source}
                    if config.degrade:
                        line["degrade"] = list(config.degrade)  # with seed: the corruption is reproducible
                    append_json_line(folder / METADATA_FILE, line)
                    listed.add(item.file)
                bar.update(1)
        seconds = time.perf_counter() - t0
    return {"out": str(folder), "total": len(items), "written": len(pending), "skipped": len(items) - len(pending),
            "seconds": seconds, "images_per_second": len(pending) / seconds if pending and seconds > 0 else None}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``sdxl-bench make-wrong-dataset``."""
    from sdxl_core.model_args import add_model_args

    add_model_args(p)
    p.add_argument("--out", required=True, help="dataset folder (a rerun resumes it)")
    p.add_argument("--count", type=int, default=None,
                   help="only the first N images of the prompt x guidance grid, prompt-major (default: all 78)")
    p.add_argument("--guidance-scales", default="8,9,10,11,12,13", help="comma-separated (default 8,9,10,11,12,13)")
    p.add_argument("--width", type=int, default=None, help="default 1024 (128 for tiny)")
    p.add_argument("--height", type=int, default=None, help="default 1024 (128 for tiny)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--high-noise-frac", type=float, default=0.8)
    p.add_argument("--seed", type=int, default=0, help="image i gets seed + i (default 0)")
    p.add_argument("--degrade", default=None, metavar="NAMES",
                   help=f"corrupt each image before saving, comma-separated, in this order: any of "
                        f"{','.join(DEGRADATIONS)} (default: none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def config_from_args(args: argparse.Namespace) -> WrongDatasetConfig:
    config = WrongDatasetConfig(
        base=args.base, out=args.out, refiner=args.refiner, vae=args.vae, variant=args.variant, device=args.device,
        dtype=args.dtype, guidance_scales=parse_guidance_scales(args.guidance_scales), count=args.count,
        width=args.width, height=args.height, steps=args.steps, high_noise_frac=args.high_noise_frac, seed=args.seed,
        degrade=() if args.degrade is None else parse_degrade_names(args.degrade))
    config.check()
    return config


def main(args: argparse.Namespace) -> int:
    """Run the command; bad options raise :class:`InvalidConfigError` (the CLI prints it and exits 2)."""
    summary = make_wrong_dataset(config_from_args(args), progress=not args.no_progress)
    rate = summary["images_per_second"]
    print(f"{summary['out']}: wrote {summary['written']}, skipped {summary['skipped']} of {summary['total']} images"
          f" in {summary['seconds']:.1f}s" + (f" ({rate:.3f} images/s)" if rate else ""))
    return 0
