"""Reference sets of real images and their cached features, for FID, KID and CMMD.

A reference set is a folder of ``.png``/``.jpg``/``.jpeg``/``.webp`` images. Its features are computed once per
*protocol* and cached outside the package, so every run and every LoRA version reuses them:

* protocol = reference content hash (sha256 over sorted file names, sizes and bytes) + feature network
  (its ``protocol``: name, weights sha256, resize, normalization) + the image preparation (``resolution``,
  ``resize_mode``); the cache key is a hash of the protocol's canonical JSON.
* cache folder: ``cache_dir`` argument, else ``$SDXL_BENCH_CACHE/reference-stats``, else
  ``~/.cache/sdxl-bench/reference-stats``.
* files: ``<network>-<key>.npy`` (the float32 ``(N, dim)`` features themselves, so FID mean/cov, KID and CMMD
  can all use them; numpy format, no pickle) and ``<network>-<key>.json`` (protocol, features sha256 and shape),
  each written atomically, the JSON last. A cache entry whose JSON, protocol or features file does not check
  out is recomputed (with a warning) and overwritten.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import numpy as np
import torch
from torch import Tensor

from sdxl_core.atomicio import write_bytes_atomic, write_json_atomic
from sdxl_core.errors import InvalidConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
RESIZE_MODES = ("center-crop", "squash")
CACHE_FORMAT = 1
_RESAMPLE = "PIL bicubic (antialiased when downscaling)"


def reference_cache_dir(cache_dir: str | Path | None = None) -> Path:
    """The reference-statistics cache folder: ``cache_dir``, else ``$SDXL_BENCH_CACHE/reference-stats``, else
    ``~/.cache/sdxl-bench/reference-stats``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    base = os.environ.get("SDXL_BENCH_CACHE") or str(Path.home() / ".cache" / "sdxl-bench")
    return Path(base).expanduser() / "reference-stats"


def list_reference_images(folder: str | Path) -> list[Path]:
    """The image files directly in ``folder`` (sorted by name; hidden files skipped); errors if there are none."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise InvalidConfigError(f"reference set {folder}: not a folder; pass a folder of real images "
                                 f"({', '.join(IMAGE_SUFFIXES)})")
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise InvalidConfigError(f"reference set {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in it; add real "
                                 "images or point to the right folder")
    return files


def content_hash(files: list[Path]) -> str:
    """sha256 over each file's name, size and bytes, in the given order (the reference set's identity)."""
    digest = hashlib.sha256()
    for path in files:
        data = path.read_bytes()
        digest.update(f"{path.name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def load_image(path: str | Path, resolution: int | None = None,
               resize_mode: Literal["center-crop", "squash"] = "center-crop") -> Tensor:
    """One image as uint8 RGB ``(3, H, W)``; with ``resolution``, center-cropped to a square (or squashed) and
    resized to ``resolution`` x ``resolution`` with PIL bicubic. Unreadable files raise InvalidConfigError."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise InvalidConfigError(f"reference image {path}: cannot be read as an image ({exc}); replace or remove "
                                 "the file") from None
    if resolution is not None:
        if resize_mode == "center-crop":
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side))
        im = im.resize((resolution, resolution), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


def _check_options(resolution: int | None, resize_mode: str, batch_size: int) -> None:
    if resize_mode not in RESIZE_MODES:
        raise InvalidConfigError(f"resize_mode {resize_mode!r}: use one of {', '.join(RESIZE_MODES)}")
    if resolution is not None and (not isinstance(resolution, int) or resolution < 8):
        raise InvalidConfigError(f"resolution {resolution!r}: must be an integer >= 8 (pixels), or None for the "
                                 "images' own sizes")
    if batch_size < 1:
        raise InvalidConfigError(f"batch_size {batch_size}: must be >= 1")


def load_reference_images(folder: str | Path, resolution: int | None = 1024,
                          resize_mode: Literal["center-crop", "squash"] = "center-crop") -> Tensor:
    """All images of ``folder`` as one uint8 ``(N, 3, R, R)`` tensor (small sets; needs a ``resolution``)."""
    if resolution is None:
        raise InvalidConfigError("load_reference_images needs a resolution to stack images of different sizes")
    _check_options(resolution, resize_mode, 1)
    return torch.stack([load_image(p, resolution, resize_mode) for p in list_reference_images(folder)])


def features_of_files(network: Callable[[Tensor], Any], files: list[Path], resolution: int | None = None,
                      resize_mode: str = "center-crop", batch_size: int = 32) -> np.ndarray:
    """Features of ``files`` (generated or reference images, prepared the same way), in batches of equal size."""
    parts: list[np.ndarray] = []
    batch: list[Tensor] = []

    def flush() -> None:
        if batch:
            out = network(torch.stack(batch))
            out = out.detach().cpu().numpy() if isinstance(out, Tensor) else np.asarray(out)
            parts.append(np.asarray(out, dtype=np.float32).reshape(len(batch), -1))
            batch.clear()

    for path in files:
        image = load_image(path, resolution, resize_mode)  # type: ignore[arg-type]
        if batch and (image.shape != batch[0].shape or len(batch) >= batch_size):
            flush()
        batch.append(image)
    flush()
    return np.concatenate(parts)


@dataclass
class ReferenceFeatures:
    """Features of a reference set and where they came from.

    ``status``: ``"hit"`` (loaded from the cache), ``"computed"`` (no cache entry) or ``"recomputed"`` (the
    entry was corrupt or inconsistent); ``path`` is the ``.npy`` features file.
    """

    features: np.ndarray
    protocol: dict[str, Any]
    key: str
    status: Literal["hit", "computed", "recomputed"]
    path: Path

    @property
    def n_images(self) -> int:
        return int(self.features.shape[0])


def _canonical(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True))


def _read_cache(json_path: Path, npy_path: Path, protocol: dict[str, Any]) -> np.ndarray | str:
    """The cached features, or the reason they cannot be used."""
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
        if meta.get("protocol") != protocol:
            return "its protocol differs from this one"
        data = npy_path.read_bytes()
        if hashlib.sha256(data).hexdigest() != meta["features"]["sha256"]:
            return "the features file does not match its recorded sha256"
        features = np.load(io.BytesIO(data), allow_pickle=False)
        if list(features.shape) != meta["features"]["shape"] or features.shape[0] != protocol["reference"]["n_images"]:
            return "the features have the wrong shape"
        return features
    except FileNotFoundError as exc:
        return f"{Path(exc.filename or npy_path).name} is missing"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"unreadable ({type(exc).__name__}: {exc})"


def reference_features(folder: str | Path, network: Callable[[Tensor], Any], *, resolution: int | None = 1024,
                       resize_mode: Literal["center-crop", "squash"] = "center-crop", batch_size: int = 32,
                       cache_dir: str | Path | None = None, network_protocol: Mapping[str, Any] | None = None,
                       refresh: bool = False) -> ReferenceFeatures:
    """Features of the reference images in ``folder`` under ``network``, from the cache or computed and cached.

    ``network`` is a :class:`~sdxl_core.metrics.features.FeatureNetwork` or any callable images -> ``(N, D)``
    (e.g. a CLIP image embedder for CMMD); a callable without a ``protocol`` attribute needs
    ``network_protocol`` (its name and weights hash), which keys the cache. Images are prepared as
    ``load_image(path, resolution, resize_mode)`` (``resolution`` None: each image at its own size) and fed in
    batches of ``batch_size``. ``refresh=True`` recomputes even on a valid cache entry.
    """
    _check_options(resolution, resize_mode, batch_size)
    net_protocol = network_protocol if network_protocol is not None else getattr(network, "protocol", None)
    if not isinstance(net_protocol, Mapping) or not net_protocol:
        raise InvalidConfigError("reference_features: the network has no protocol to key the cache with; pass "
                                 "network_protocol={'network': NAME, 'weights_sha256': ..., ...}")
    name = str(getattr(network, "name", None) or net_protocol.get("network") or "features")
    files = list_reference_images(folder)
    protocol = _canonical({
        "format": CACHE_FORMAT,
        "reference": {"sha256": content_hash(files), "n_images": len(files)},
        "network": dict(net_protocol),
        "resolution": resolution,
        "resize_mode": resize_mode if resolution is not None else "none (own size)",
        "resample": _RESAMPLE,
    })
    key = hashlib.sha256(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:24]
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in name) + f"-{key}"
    root = reference_cache_dir(cache_dir)
    npy_path, json_path = root / f"{stem}.npy", root / f"{stem}.json"

    status: Literal["hit", "computed", "recomputed"] = "computed"
    if json_path.exists() and not refresh:
        cached = _read_cache(json_path, npy_path, protocol)
        if isinstance(cached, np.ndarray):
            return ReferenceFeatures(cached, protocol, key, "hit", npy_path)
        warnings.warn(f"reference cache {json_path}: {cached}; recomputing the features", RuntimeWarning,
                      stacklevel=2)
        status = "recomputed"

    features = features_of_files(network, files, resolution, resize_mode, batch_size)
    buf = io.BytesIO()
    np.save(buf, features, allow_pickle=False)
    data = buf.getvalue()
    write_bytes_atomic(npy_path, data)
    write_json_atomic(json_path, {
        "protocol": protocol,
        "key": key,
        "features": {"file": npy_path.name, "sha256": hashlib.sha256(data).hexdigest(),
                     "shape": list(features.shape), "dtype": str(features.dtype)},
        "source_folder": str(Path(folder).expanduser().resolve()),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })
    return ReferenceFeatures(features, protocol, key, status, npy_path)
