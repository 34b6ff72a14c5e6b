"""An exact GenEval-style oracle for the toy world (:mod:`sdxl_core.toy.world`), by image analysis.

:func:`judge` checks an image against what its caption asks for (:data:`CHECKS`):

- ``background``: the median colour of the outer border ring (2 px), nearest named colour.
- ``count``: connected components (8-connected) of the foreground mask, components smaller than
  :data:`MIN_AREA_FRAC` of the image ignored as specks. The foreground is every pixel whose RGB distance from
  the measured background colour exceeds :data:`FG_DISTANCE` (about half the smallest palette distance, so an
  anti-aliased edge pixel counts when it is mostly shape).
- ``colour``: each component's median colour (after a 1-px erosion that drops the blended edge), nearest named
  colour; every component must match.
- ``shape``: on each component's half-coverage outline (pixels more than half shape colour): top-half over
  bottom-half pixel ratio < :data:`TRIANGLE_MAX_TOP` is a triangle (ideal 1/3, upright); else a bounding-box
  fill ratio >= :data:`SQUARE_MIN_FILL` is a square (ideal 1.0), below it a circle (ideal pi/4 ~ 0.785).
- ``size``: each component's larger bounding-box side over the image side: >= :data:`LARGE_MIN_EXTENT` large.
- ``position`` (single-shape captions only, else passes): the centroid offset from the centre; within
  :data:`CENTER_RADIUS` on both axes is ``center``, otherwise the dominant axis gives left/right/top/bottom.

Nearest named colour is measured in CIELAB (perceptual-ish), so mild JPEG compression and small noise do not
change the answer. The sRGB -> CIELAB conversion (:func:`srgb_to_lab`) is plain numpy, with scikit-image's
constants (its ``rgb2lab`` is the test's reference; scikit-image is only a dev dependency).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from torchmetrics import Metric

from sdxl_core.errors import InvalidConfigError
from sdxl_core.metrics.meta import MetricInfo, add_bitmask, gathered_masks
from sdxl_core.toy.world import COLOURS, CaptionParams, parse_caption

CHECKS: tuple[str, ...] = ("background", "colour", "count", "shape", "size", "position")
BORDER = 2
FG_DISTANCE = 50.0
MIN_AREA_FRAC = 0.004
SQUARE_MIN_FILL = 0.9
TRIANGLE_MAX_TOP = 0.7
LARGE_MIN_EXTENT = 0.25
CENTER_RADIUS = 0.125

#: sRGB (D65) -> CIE XYZ, as the sRGB specification (and scikit-image) gives it.
XYZ_FROM_RGB = np.array([[0.412453, 0.357580, 0.180423],
                         [0.212671, 0.715160, 0.072169],
                         [0.019334, 0.119193, 0.950227]])
#: CIE XYZ of the D65 white point, 2-degree observer.
D65_WHITE = np.array([0.95047, 1.0, 1.08883])


def srgb_to_lab(rgb: Any) -> np.ndarray:
    """CIELAB (D65, 2-degree observer) of sRGB colours in 0-1, shape (..., 3) -> (..., 3) float64.

    The sRGB transfer function is undone (``c / 12.92`` up to 0.04045, else ``((c + 0.055) / 1.055) ** 2.4``),
    the linear RGB mapped to XYZ (:data:`XYZ_FROM_RGB`) and scaled by the white point (:data:`D65_WHITE`); then
    ``f(t) = t ** (1/3)`` above 0.008856, else ``7.787 t + 16/116``, and ``L = 116 f(Y) - 16``,
    ``a = 500 (f(X) - f(Y))``, ``b = 200 (f(Y) - f(Z))``: the constants of ``skimage.color.rgb2lab``.
    """
    c = np.asarray(rgb, dtype=np.float64)
    if c.shape[-1:] != (3,):
        raise InvalidConfigError(f"colours of shape {c.shape}: expected (..., 3) RGB values in 0-1")
    linear = np.where(c > 0.04045, ((np.maximum(c, 0.04045) + 0.055) / 1.055) ** 2.4, c / 12.92)
    t = (linear @ XYZ_FROM_RGB.T) / D65_WHITE
    f = np.where(t > 0.008856, np.cbrt(t), 7.787 * t + 16.0 / 116.0)
    fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
    return np.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1)


_NAMES: tuple[str, ...] = tuple(COLOURS)
_PALETTE_LAB = srgb_to_lab(np.array([COLOURS[n] for n in _NAMES], dtype=np.float64) / 255.0)


@dataclass(frozen=True)
class OracleResult:
    """Per-check verdicts (:data:`CHECKS`), ``correct`` = all of them, and what was measured (``details``)."""

    background: bool
    colour: bool
    count: bool
    shape: bool
    size: bool
    position: bool
    correct: bool
    details: Mapping[str, Any] = field(default_factory=dict)

    @property
    def checks(self) -> dict[str, bool]:
        return {c: bool(getattr(self, c)) for c in CHECKS}

    def as_dict(self) -> dict[str, Any]:
        return {**self.checks, "correct": self.correct, "details": dict(self.details)}


def nearest_colour(rgb: Sequence[float] | np.ndarray) -> str:
    """The named colour (:data:`~sdxl_core.toy.world.COLOURS`) nearest to ``rgb`` (0-255) in CIELAB."""
    lab = srgb_to_lab(np.clip(np.asarray(rgb, dtype=np.float64), 0, 255).reshape(3) / 255.0)
    return _NAMES[int(np.argmin(((_PALETTE_LAB - lab) ** 2).sum(axis=1)))]


def _pixels(image: Any) -> np.ndarray:
    """float64 (H, W, 3) levels 0-255 from a PIL image, a uint8/float array (HWC or CHW) or a torch tensor
    (CHW or HWC; floats in 0-1)."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    tensor = isinstance(image, torch.Tensor)
    a = image.detach().cpu().float().numpy() if tensor else np.asarray(image)
    if a.ndim != 3:
        raise InvalidConfigError(f"image of shape {a.shape}: expected (H, W, C) or (C, H, W)")
    if a.shape[0] in (3, 4) and (tensor or a.shape[-1] not in (3, 4)):
        a = a.transpose(1, 2, 0)
    if a.shape[-1] not in (3, 4):
        raise InvalidConfigError(f"image of shape {a.shape}: expected 3 (RGB) or 4 (RGBA) channels")
    a = a[..., :3]
    if np.issubdtype(a.dtype, np.floating):
        return np.nan_to_num(a.astype(np.float64) * 255.0)
    return a.astype(np.float64)


def _position(cx: float, cy: float) -> str:
    dx, dy = cx - 0.5, cy - 0.5
    if max(abs(dx), abs(dy)) < CENTER_RADIUS:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _shape(fill: float, top_ratio: float) -> str:
    if top_ratio < TRIANGLE_MAX_TOP:
        return "triangle"
    return "square" if fill >= SQUARE_MIN_FILL else "circle"


def analyze(image: Any) -> dict[str, Any]:
    """What the image shows: background name and RGB, and per component its colour, shape, size, area, fill
    ratio, extent and centroid (fractions of the image side), plus the number of ignored specks."""
    px = _pixels(image)
    h, w = px.shape[:2]
    ring = np.ones((h, w), dtype=bool)
    ring[BORDER:h - BORDER, BORDER:w - BORDER] = False
    bg_rgb = np.median(px[ring], axis=0)
    fg = np.sqrt(((px - bg_rgb) ** 2).sum(axis=-1)) > FG_DISTANCE
    labels, n = ndimage.label(fg, structure=np.ones((3, 3), dtype=bool))
    min_area = MIN_AREA_FRAC * h * w
    comps: list[dict[str, Any]] = []
    # Areas of every component in one pass: a noisy image has thousands of specks, each skipped without
    # building its full-image mask (at most 1 / MIN_AREA_FRAC components are large enough to analyse).
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    specks = int(((areas[1:] > 0) & (areas[1:] < min_area)).sum())
    for i in np.flatnonzero(areas >= min_area).tolist():
        if i == 0:
            continue
        comp = labels == i
        area = int(areas[i])
        core = comp
        for _ in range(2):  # drop the blended edge (and JPEG chroma bleed) for the colour estimate
            eroded = ndimage.binary_erosion(core)
            if eroded.sum() < 6:
                break
            core = eroded
        rgb = np.median(px[core], axis=0)
        # Coverage of each pixel near the component: its projection on the background -> shape colour line.
        # The half-coverage mask gives the outline, free of faint fringes (anti-aliasing, JPEG ringing).
        axis = rgb - bg_rgb
        near = ndimage.binary_dilation(comp, iterations=2) & ~(fg & ~comp)
        alpha = ((px - bg_rgb) @ axis) / max(float(axis @ axis), 1e-9)
        mask_full = near & (alpha > 0.5)
        if not mask_full.any():
            mask_full = comp
        ys, xs = np.nonzero(mask_full)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        bh, bw = int(y1 - y0), int(x1 - x0)
        half_area = int(mask_full.sum())
        fill = half_area / float(bh * bw)
        mid = (y0 + y1) / 2.0
        top = float((ys + 0.5 < mid).sum()) + 0.5 * float((ys + 0.5 == mid).sum())
        top_ratio = top / max(half_area - top, 1.0)
        cx = (xs.mean() + 0.5) / w
        cy = (ys.mean() + 0.5) / h
        extent = max(bw / w, bh / h)
        comps.append({"colour": nearest_colour(rgb), "rgb": [round(float(v), 1) for v in rgb],
                      "shape": _shape(fill, top_ratio), "top_ratio": round(top_ratio, 4), "size": "large" if extent >= LARGE_MIN_EXTENT else "small",
                      "area": area, "fill": round(fill, 4), "extent": round(extent, 4),
                      "center": [round(float(cx), 4), round(float(cy), 4)], "position": _position(cx, cy)})
    return {"background": nearest_colour(bg_rgb), "background_rgb": [round(float(v), 1) for v in bg_rgb],
            "count": len(comps), "components": comps, "specks": specks}


def judge(image: Any, caption: str | CaptionParams) -> OracleResult:
    """Judge one image against a caption (text in the toy-world grammar, or its :class:`CaptionParams`)."""
    want = parse_caption(caption) if isinstance(caption, str) else caption
    seen = analyze(image)
    comps = seen["components"]
    any_comp = bool(comps)
    ok = {
        "background": seen["background"] == want.background,
        "colour": any_comp and all(c["colour"] == want.colour for c in comps),
        "count": seen["count"] == want.count,
        "shape": any_comp and all(c["shape"] == want.shape for c in comps),
        "size": any_comp and all(c["size"] == want.size for c in comps),
        "position": (want.position is None or want.count != 1
                     or (len(comps) == 1 and comps[0]["position"] == want.position)),
    }
    details = {"expected": {"shape": want.shape, "colour": want.colour, "count": want.count, "size": want.size,
                            "position": want.position, "background": want.background}, "observed": seen}
    return OracleResult(**{k: bool(v) for k, v in ok.items()}, correct=all(ok.values()), details=details)


# Text of letters, spaces and a final full stop has no compel syntax: parsed as it is, without compel's parser.
_CAPTION_CHARS = re.compile(r"[a-z ]*\.?")


def toy_caption(prompt: str) -> CaptionParams:
    """What a generation prompt asks for in the toy-world grammar (:func:`~sdxl_core.toy.world.parse_caption`).

    A prompt with compel weighting syntax (``"(a small red circle)++ on the left of a blue background"``) is
    read as the plain text compel conditioned on (:func:`sdxl_core.metrics.clip.plain_prompt`). Raises
    :class:`InvalidConfigError` for text outside the grammar (the stripped text's error)."""
    if not isinstance(prompt, str):
        raise InvalidConfigError(f"prompt {prompt!r} is not text; the oracle needs the caption each image was "
                                 f"generated from")
    plain_text = _CAPTION_CHARS.fullmatch(prompt.strip().lower()) is not None
    if not plain_text:  # weighting syntax (or anything else): strip it as compel reads it, then parse
        from sdxl_core.metrics.clip import plain_prompt

        prompt = plain_prompt(prompt)
    return parse_caption(prompt)



def is_toy_prompt_set(prompts: Iterable[str | None]) -> bool:
    """Whether every prompt is a toy-world caption (:func:`toy_caption`), so that ``oracle_accuracy`` applies;
    False for an empty set or a missing prompt. Stops at the first prompt outside the grammar."""
    seen: set[str] = set()
    for prompt in prompts:
        if not isinstance(prompt, str):
            return False
        if prompt in seen:
            continue
        seen.add(prompt)
        try:
            toy_caption(prompt)
        except InvalidConfigError:  # the answer to the question asked: not a toy prompt
            return False
    return bool(seen)


def _split(images: Any) -> list:
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, (torch.Tensor, np.ndarray)):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, (list, tuple)):
        return list(images)
    raise InvalidConfigError(f"images of type {type(images).__name__}: pass a list of images or a 4-D batch")


class OracleAccuracy(Metric):
    """Fraction of images the oracle judges correct for their captions (torchmetrics-style; higher is better).

    ``update(images, captions)``: a list (or 4-D batch) of images and one caption (str or
    :class:`CaptionParams`) per image. ``compute()`` returns::

        {"n": N, "n_correct": k, "accuracy": k / N, "per_check": {check: fraction passed for check in CHECKS},
         "per_image": [{"index": i, "correct": bool, "checks": {check: bool}}]}

    Indices count images since the last ``reset()``; accuracies are NaN with no images.
    """

    higher_is_better = True
    is_differentiable = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("n_images", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_correct", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("check_passes", torch.zeros(len(CHECKS), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("masks", [], dist_reduce_fx="cat")  # per image: bit i = CHECKS[i] passed

    @property
    def info(self) -> MetricInfo:
        return MetricInfo(name="oracle_accuracy", display_name="Oracle accuracy", higher_is_better=True,
                          kind="per_image", unit="fraction", label="toy world",
                          description="fraction of toy-world images whose background, shape colour, count, "
                                      "shape, size and position match the caption (exact image-analysis oracle)")

    def update(self, images: Any, captions: Sequence[str | CaptionParams] | str | CaptionParams) -> None:
        batch = _split(images)
        caps = [captions] if isinstance(captions, (str, CaptionParams)) else list(captions)
        if len(caps) != len(batch):
            raise InvalidConfigError(f"OracleAccuracy got {len(batch)} images and {len(caps)} captions; pass "
                                     f"one caption per image")
        masks = []
        for im, cap in zip(batch, caps):
            res = judge(im, cap)
            mask = add_bitmask([getattr(res, name) for name in CHECKS], self.check_passes)
            if res.correct:
                self.n_correct += 1
            masks.append(mask)
        if masks:
            self.masks.append(torch.tensor(masks, dtype=torch.int64, device=self.n_images.device))
        self.n_images += len(masks)

    def compute(self) -> dict[str, Any]:
        masks = gathered_masks(self.masks)
        n = int(self.n_images.item())
        full = (1 << len(CHECKS)) - 1
        per_image = [{"index": i, "correct": m == full, "checks": {c: bool(m >> j & 1) for j, c in enumerate(CHECKS)}}
                     for i, m in enumerate(masks.reshape(-1).tolist())]
        nan = float("nan")
        return {"n": n, "n_correct": int(self.n_correct.item()),
                "accuracy": float(self.n_correct.item()) / n if n else nan,
                "per_check": {c: (float(v) / n if n else nan) for c, v in zip(CHECKS, self.check_passes.tolist())},
                "per_image": per_image}
