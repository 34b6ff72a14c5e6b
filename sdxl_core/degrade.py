"""Image-space corruptions for ``sdxl-bench make-wrong-dataset --degrade``: blur, JPEG, noise, colour cast, cutout.

Each corruption is a function ``(PIL.Image, numpy.random.Generator) -> PIL.Image`` in :data:`DEGRADATIONS`; it
takes and returns an RGB uint8 image of the same size, works at any size (strengths are fractions of the image
side, not pixels) and draws its randomness from the generator only. :func:`degrade` applies a list of them in
the order given, each with its own generator ``numpy.random.default_rng((seed, stream))``, where ``stream`` is
the corruption's fixed position in :data:`DEGRADATIONS`: the same seed gives the same bytes, and one corruption's
draws do not depend on which others run before it. ``blur`` and ``jpeg`` use no randomness.

Strengths (module constants):

- ``blur``: Gaussian blur, sigma :data:`BLUR_SIGMA_FRACTION` (1.5%) of the shorter side (15 px at 1024).
- ``jpeg``: an in-memory JPEG encode/decode at quality :data:`JPEG_QUALITY` (15; 8x8 block artefacts).
- ``noise``: additive Gaussian noise, sigma :data:`NOISE_SIGMA` (0.08 in [0, 1] units, about 20 levels),
  independent per pixel and channel, then clipped.
- ``colour-shift``: a random colour cast along a unit direction ``u`` orthogonal to grey (drawn uniformly):
  channel ``c`` becomes ``x * (1 + COLOUR_GAIN * u_c) + COLOUR_OFFSET * u_c`` in [0, 1] units, clipped. Gain and
  offset push the same way, so the mean colour moves by at least :data:`COLOUR_OFFSET` (before clipping).
- ``cutout``: 1 to :data:`CUTOUT_MAX_COUNT` axis-aligned rectangles, each side a uniform
  :data:`CUTOUT_SIDE_FRACTIONS` (15-25%) fraction of that image side (at least 1 px), placed uniformly inside
  the image and filled with one uniform random colour each.
"""

from __future__ import annotations

import io
from typing import Callable

import numpy as np
from PIL import Image

from sdxl_core.errors import InvalidConfigError

BLUR_SIGMA_FRACTION = 0.015  # Gaussian sigma as a fraction of the shorter side
JPEG_QUALITY = 15  # Pillow JPEG quality, 1 (worst) .. 95
NOISE_SIGMA = 0.08  # Gaussian noise standard deviation in [0, 1] pixel units
COLOUR_GAIN = 0.3  # per-channel gain 1 + COLOUR_GAIN * u_c, |u_c| <= sqrt(2/3)
COLOUR_OFFSET = 0.1  # per-channel offset COLOUR_OFFSET * u_c in [0, 1] units: the cast's guaranteed size
CUTOUT_SIDE_FRACTIONS = (0.15, 0.25)  # each rectangle side, as a fraction of that image side
CUTOUT_MAX_COUNT = 2  # rectangles per image: 1 .. CUTOUT_MAX_COUNT, uniform

Degradation = Callable[[Image.Image, np.random.Generator], Image.Image]
Box = tuple[int, int, int, int]  # left, top, right, bottom (exclusive), as PIL boxes


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _to_float(image: Image.Image) -> np.ndarray:
    return np.asarray(_rgb(image), dtype=np.float64) / 255.0


def _from_float(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.rint(np.clip(pixels, 0.0, 1.0) * 255.0).astype(np.uint8), "RGB")


def blur_sigma(size: tuple[int, int]) -> float:
    """The ``blur`` sigma in pixels for an image of ``(width, height)``."""
    return BLUR_SIGMA_FRACTION * min(size)


def blur(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Gaussian blur, sigma :func:`blur_sigma` (1.5% of the shorter side); ``rng`` is not used."""
    from PIL import ImageFilter

    return _rgb(image).filter(ImageFilter.GaussianBlur(blur_sigma(image.size)))


def jpeg(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Encode as JPEG at quality :data:`JPEG_QUALITY` in memory and decode again; ``rng`` is not used."""
    buffer = io.BytesIO()
    _rgb(image).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def noise(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Add Gaussian noise, sigma :data:`NOISE_SIGMA` in [0, 1] units, per pixel and channel; clip."""
    pixels = _to_float(image)
    return _from_float(pixels + rng.normal(0.0, NOISE_SIGMA, size=pixels.shape))


def colour_direction(rng: np.random.Generator) -> np.ndarray:
    """A uniform random unit vector in RGB orthogonal to grey ``(1, 1, 1)``: the hue of ``colour-shift``'s cast."""
    angle = rng.uniform(0.0, 2.0 * np.pi)
    a = np.array([1.0, -1.0, 0.0]) / np.sqrt(2.0)
    b = np.array([1.0, 1.0, -2.0]) / np.sqrt(6.0)
    return np.cos(angle) * a + np.sin(angle) * b


def colour_shift(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A random colour cast: channel ``c`` -> ``x * (1 + COLOUR_GAIN * u_c) + COLOUR_OFFSET * u_c``, clipped."""
    u = colour_direction(rng)
    return _from_float(_to_float(image) * (1.0 + COLOUR_GAIN * u) + COLOUR_OFFSET * u)


def cutout_boxes(size: tuple[int, int], rng: np.random.Generator) -> list[Box]:
    """The ``cutout`` rectangles for an image of ``(width, height)``, drawn from ``rng`` as :func:`cutout` does."""
    width, height = size
    lo, hi = CUTOUT_SIDE_FRACTIONS
    boxes = []
    for _ in range(int(rng.integers(1, CUTOUT_MAX_COUNT + 1))):
        w = min(width, max(1, round(rng.uniform(lo, hi) * width)))
        h = min(height, max(1, round(rng.uniform(lo, hi) * height)))
        left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
        boxes.append((left, top, left + w, top + h))
    return boxes


def cutout(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Fill :func:`cutout_boxes` rectangles (1 or 2, sides 15-25% of the image's) with a random colour each."""
    out = _rgb(image).copy()
    for box in cutout_boxes(out.size, rng):
        out.paste(tuple(int(v) for v in rng.integers(0, 256, size=3)), box)
    return out


# name -> function; the position is the corruption's generator stream, so only ever append to this table.
DEGRADATIONS: dict[str, Degradation] = {
    "blur": blur,
    "jpeg": jpeg,
    "noise": noise,
    "colour-shift": colour_shift,
    "cutout": cutout,
}
_STREAMS = {name: i for i, name in enumerate(DEGRADATIONS)}


def _choices() -> str:
    return ",".join(DEGRADATIONS)


def check_names(names: tuple[str, ...]) -> None:
    """Raise :class:`InvalidConfigError` unless ``names`` is a tuple of distinct names from :data:`DEGRADATIONS`."""
    if not isinstance(names, tuple):
        raise InvalidConfigError(f"degrade must be a tuple of names, got {names!r}; pass e.g. --degrade blur,jpeg")
    for name in names:
        if name not in DEGRADATIONS:
            raise InvalidConfigError(f"--degrade: unknown corruption {name!r}; choose from {_choices()} "
                                     f"(a comma-separated subset, applied in the order given)")
    if len(set(names)) != len(names):
        raise InvalidConfigError(f"--degrade {','.join(names)} repeats a corruption; give each one once")


def parse_names(text: str) -> tuple[str, ...]:
    """``"blur, jpeg"`` -> ``("blur", "jpeg")``, checked by :func:`check_names`; refuses an empty list or item."""
    names = tuple(p.strip() for p in str(text).split(","))
    if not all(names):
        raise InvalidConfigError(f"--degrade {text!r} has an empty item; pass a comma-separated subset of "
                                 f"{_choices()}, or leave --degrade out for none")
    check_names(names)
    return names


def degrade(image: Image.Image, names: tuple[str, ...], seed: int) -> Image.Image:
    """Apply the corruptions ``names`` in order, corruption ``name`` with ``default_rng((seed, stream))``.

    Returns an RGB image of the same size; with no names, the image itself (unchanged, not copied).
    """
    check_names(names)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidConfigError(f"degrade seed must be a non-negative integer, got {seed!r}")
    for name in names:
        image = DEGRADATIONS[name](image, np.random.default_rng((seed, _STREAMS[name])))
    return image
