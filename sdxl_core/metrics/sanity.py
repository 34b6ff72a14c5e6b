"""Per-image sanity flags: NaN/inf in latents or pixels, all-black and constant images.

These catch the SDXL fp16 VAE failure (the VAE overflows in float16, the latents or decoded pixels turn
NaN/inf, and the saved image comes out black) and other broken outputs, so broken images are counted and
listed instead of silently dragging CLIP or FID numbers.

Flags (:data:`FLAGS`), with pixel levels on a 0-255 scale:

- ``nan_pixels`` / ``inf_pixels``: any NaN / +-inf pixel value (only float inputs can hold them).
- ``nan_latents`` / ``inf_latents``: any NaN / +-inf value in the latents, when latents are given.
- ``black``: mean level of the finite pixels < :data:`BLACK_MEAN_MAX` (2 levels).
- ``constant``: a flat image that is *not* black: in every channel, max - min of the finite pixels <=
  :data:`CONSTANT_RANGE_MAX` (2 levels), e.g. a uniform grey. An all-black image is flagged ``black`` only,
  so the counts do not count it twice.

Inputs: PIL images; numpy arrays (H,W), (H,W,C) or (C,H,W); torch tensors (C,H,W), (H,W,C) or (H,W). uint8 and
other integer arrays are levels 0-255; float arrays are scaled from ``float_range`` (default ``(0, 1)``, the
diffusers ``np``/``pt`` output; pass ``(-1, 1)`` for raw VAE decoder output). A 4th (alpha) channel is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torchmetrics import Metric

from sdxl_core.errors import InvalidConfigError
from sdxl_core.metrics.meta import MetricInfo, add_bitmask, gathered_masks

FLAGS: tuple[str, ...] = ("nan_pixels", "inf_pixels", "nan_latents", "inf_latents", "black", "constant")
BLACK_MEAN_MAX = 2.0
CONSTANT_RANGE_MAX = 2.0


@dataclass(frozen=True)
class SanityResult:
    """Flags of one image (in :data:`FLAGS` order; empty when ``ok``) and the statistics behind them.

    ``stats``: ``mean``, ``min``, ``max`` and ``range`` (largest per-channel max - min) of the finite pixels in
    levels 0-255 (None when no pixel is finite), ``n_nan_pixels``, ``n_inf_pixels``, ``n_pixel_values``, and with
    latents ``n_nan_latents``, ``n_inf_latents``, ``latent_mean``, ``latent_std`` (finite values).
    """

    flags: tuple[str, ...]
    ok: bool
    stats: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"flags": list(self.flags), "ok": self.ok, "stats": dict(self.stats)}


def _to_numpy(x: Any, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()
        return t.numpy()
    if isinstance(x, np.ndarray):
        return x
    raise InvalidConfigError(f"{what} of type {type(x).__name__}: pass a PIL image, a numpy array or a torch tensor")


def _pixels_hwc(image: Any, float_range: tuple[float, float]) -> np.ndarray:
    """float64 (H, W, C) array in levels 0-255 (NaN/inf kept), alpha dropped."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - pillow is a dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    tensor_input = isinstance(image, torch.Tensor)
    a = _to_numpy(image, "image")
    if a.ndim == 2:
        a = a[..., None]
    elif a.ndim == 3:
        chw = a.shape[0] in (1, 3, 4) and (tensor_input or a.shape[-1] not in (1, 3, 4))
        if chw:
            a = a.transpose(1, 2, 0)
        elif a.shape[-1] not in (1, 3, 4):
            raise InvalidConfigError(f"image of shape {a.shape}: expected (H, W), (H, W, C) or (C, H, W) with "
                                     f"C in 1, 3, 4")
    else:
        raise InvalidConfigError(f"image of shape {a.shape}: one image per call; pass batches to ImageSanity.update")
    if a.shape[-1] == 4:
        a = a[..., :3]
    if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise InvalidConfigError(f"image of dtype {a.dtype}: expected uint8 levels or floats")
    if np.issubdtype(a.dtype, np.floating):
        lo, hi = float(float_range[0]), float(float_range[1])
        if not hi > lo:
            raise InvalidConfigError(f"float_range {float_range} must be (low, high) with high > low, e.g. (0, 1)")
        with np.errstate(invalid="ignore", over="ignore"):
            return (a.astype(np.float64) - lo) * (255.0 / (hi - lo))
    return a.astype(np.float64)


def image_sanity(image: Any, latents: Any = None, *, float_range: tuple[float, float] = (0.0, 1.0)) -> SanityResult:
    """Flag one image (and optionally its latents): NaN/inf, black, constant. See the module doc for the rules."""
    px = _pixels_hwc(image, float_range)
    nan = np.isnan(px)
    inf = np.isinf(px)
    finite = ~(nan | inf)
    flags: list[str] = []
    stats: dict[str, Any] = {"n_nan_pixels": int(nan.sum()), "n_inf_pixels": int(inf.sum()),
                             "n_pixel_values": int(px.size)}
    if nan.any():
        flags.append("nan_pixels")
    if inf.any():
        flags.append("inf_pixels")
    if latents is not None:
        lat = _to_numpy(latents, "latents").astype(np.float64, copy=False)
        lnan, linf = np.isnan(lat), np.isinf(lat)
        lfin = lat[~(lnan | linf)]
        stats.update(n_nan_latents=int(lnan.sum()), n_inf_latents=int(linf.sum()),
                     latent_mean=float(lfin.mean()) if lfin.size else None,
                     latent_std=float(lfin.std()) if lfin.size else None)
        if lnan.any():
            flags.append("nan_latents")
        if linf.any():
            flags.append("inf_latents")
    if finite.any():
        vals = px[finite]
        mean = float(vals.mean())
        ranges = []
        for c in range(px.shape[-1]):
            ch = px[..., c][finite[..., c]]
            if ch.size:
                ranges.append(float(ch.max() - ch.min()))
        value_range = max(ranges)
        stats.update(mean=mean, min=float(vals.min()), max=float(vals.max()), range=value_range)
        if mean < BLACK_MEAN_MAX:
            flags.append("black")
        elif value_range <= CONSTANT_RANGE_MAX:
            flags.append("constant")
    else:
        stats.update(mean=None, min=None, max=None, range=None)
    ordered = tuple(f for f in FLAGS if f in flags)
    return SanityResult(flags=ordered, ok=not ordered, stats=stats)


def _split_batch(images: Any) -> list:
    try:
        from PIL import Image

        if isinstance(images, Image.Image):
            return [images]
    except ImportError:  # pragma: no cover
        pass
    if isinstance(images, (torch.Tensor, np.ndarray)):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, (list, tuple)):
        return list(images)
    raise InvalidConfigError(f"images of type {type(images).__name__}: pass a list of images or a batch "
                             f"(N, C, H, W) tensor / (N, H, W, C) array")


class ImageSanity(Metric):
    """Counts of sanity flags over a set of images (torchmetrics-style; lower is better).

    ``update(images, latents=None)``: images as a list or a batch (4-D tensor/array), latents as a list or a
    batch with one entry per image. ``compute()`` returns::

        {"n": N, "n_flagged": k, "fraction_flagged": k / N, "counts": {flag: count for flag in FLAGS},
         "flagged": [indices], "details": [{"index": i, "flags": [...]}]}

    Indices count images since the last ``reset()``.
    """

    higher_is_better = False
    is_differentiable = False
    full_state_update = False

    def __init__(self, *, float_range: tuple[float, float] = (0.0, 1.0), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.float_range = float_range
        self.add_state("n_images", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("flag_counts", torch.zeros(len(FLAGS), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("masks", [], dist_reduce_fx="cat")  # one int64 bit mask per image (bit i = FLAGS[i])

    @property
    def info(self) -> MetricInfo:
        return MetricInfo(
            name="image_sanity", display_name="flagged images", higher_is_better=False, kind="set",
            unit="images",
            description=(f"images with NaN/inf pixels or latents, black (mean < {BLACK_MEAN_MAX:g} of 255) or "
                         f"constant (range <= {CONSTANT_RANGE_MAX:g} levels) output, e.g. the SDXL fp16 VAE "
                         f"failure"))

    def update(self, images: Any, latents: Sequence[Any] | torch.Tensor | np.ndarray | None = None) -> None:
        batch = _split_batch(images)
        if latents is None:
            lats: list = [None] * len(batch)
        else:
            if isinstance(latents, (torch.Tensor, np.ndarray)) and latents.ndim <= 3 and len(batch) == 1:
                lats = [latents]
            else:
                lats = list(latents)
            if len(lats) != len(batch):
                raise InvalidConfigError(f"ImageSanity got {len(batch)} images and {len(lats)} latents; pass one "
                                         f"latent per image, or latents=None")
        masks = []
        for im, lat in zip(batch, lats):
            res = image_sanity(im, lat, float_range=self.float_range)
            masks.append(add_bitmask([name in res.flags for name in FLAGS], self.flag_counts))
        if masks:
            self.masks.append(torch.tensor(masks, dtype=torch.int64, device=self.n_images.device))
        self.n_images += len(masks)

    def compute(self) -> dict[str, Any]:
        masks = gathered_masks(self.masks)
        details = []
        for idx, m in enumerate(masks.reshape(-1).tolist()):
            if m:
                details.append({"index": idx, "flags": [f for i, f in enumerate(FLAGS) if m >> i & 1]})
        n = int(self.n_images.item())
        return {
            "n": n,
            "n_flagged": len(details),
            "fraction_flagged": len(details) / n if n else float("nan"),
            "counts": {f: int(c) for f, c in zip(FLAGS, self.flag_counts.tolist())},
            "flagged": [d["index"] for d in details],
            "details": details,
        }
