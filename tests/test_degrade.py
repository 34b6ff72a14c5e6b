"""degrade: each corruption changes an image the way it should, by about its documented strength, at any size,
deterministically from its seed; bad names are refused."""

import io

import numpy as np
import pytest
from PIL import Image

from sdxl_core import degrade as dg
from sdxl_core.degrade import DEGRADATIONS, check_names, degrade, parse_names
from sdxl_core.errors import InvalidConfigError

ALL = tuple(DEGRADATIONS)
RANDOM = ("noise", "colour-shift", "cutout")  # the corruptions that draw from their generator


def pixels(image):
    return np.asarray(image, dtype=np.float64)


def scene(width, height):
    """A smooth, colourful test picture (no 8x8 structure of its own)."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([0.5 + 0.4 * np.sin(6.3 * x + 1.3 * y), 0.5 + 0.4 * np.cos(4.1 * y - 2.2 * x),
                    0.5 + 0.3 * np.sin(9 * x * y + 0.5)], axis=-1)
    return Image.fromarray(np.rint(rgb * 255).astype(np.uint8))


def texture(width, height, seed=0):
    """Per-pixel random colours: all high frequency, and (almost surely) no pixel equals a cutout colour."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def flat(width, height, value=128):
    return Image.new("RGB", (width, height), (value,) * 3)


def high_frequency_energy(image):
    a = pixels(image)
    return float(np.mean(np.diff(a, axis=0) ** 2) + np.mean(np.diff(a, axis=1) ** 2))


def test_blur_lowers_high_frequency_energy_with_a_sigma_relative_to_the_side():
    checks = np.kron((np.indices((24, 32)).sum(axis=0) % 2) * 255, np.ones((8, 8))).astype(np.uint8)
    for image in (texture(128, 128), Image.fromarray(checks).convert("RGB")):  # 256x192 8-px checkerboard
        assert high_frequency_energy(dg.blur(image, None)) < 0.5 * high_frequency_energy(image)
    assert dg.blur(flat(64, 64), None).tobytes() == flat(64, 64).tobytes()  # nothing to blur
    assert dg.blur_sigma((1024, 1024)) == pytest.approx(15.36) and dg.blur_sigma((1024, 512)) == pytest.approx(7.68)
    for side in (256, 1024):  # a step edge's 10-90% rise is 2.56 sigma wide: the same fraction of any side
        step = np.zeros((side, side, 3), np.uint8)
        step[:, side // 2:] = 255
        row = pixels(dg.blur(Image.fromarray(step), None))[side // 2, :, 0] / 255
        width = int(np.sum((row > 0.1) & (row < 0.9)))
        assert abs(width - 2.563 * dg.BLUR_SIGMA_FRACTION * side) <= 2, (side, width)


def blockiness(image):
    """Mean horizontal step across 8x8 block boundaries over the mean step inside blocks (about 1 when smooth)."""
    steps = np.abs(np.diff(pixels(image.convert("L")), axis=1))
    boundary = np.arange(steps.shape[1]) % 8 == 7
    return steps[:, boundary].mean() / steps[:, ~boundary].mean()


def test_jpeg_adds_8x8_block_artefacts_and_matches_a_quality_15_encode():
    image = scene(256, 256)
    out = dg.jpeg(image, None)
    assert blockiness(image) < 1.1 and blockiness(out) > 2
    assert 1 < np.abs(pixels(out) - pixels(image)).mean() < 20
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=dg.JPEG_QUALITY)
    assert out.tobytes() == Image.open(io.BytesIO(buffer.getvalue())).convert("RGB").tobytes()


def test_noise_raises_the_variance_of_a_flat_image_by_the_documented_sigma():
    out = pixels(dg.noise(flat(256, 256), np.random.default_rng(0)))
    assert out.std() / 255 == pytest.approx(dg.NOISE_SIGMA, rel=0.03)
    assert abs(out.mean() - 128) < 0.5
    channels = out.reshape(-1, 3)  # independent per channel: no grey-only noise
    assert abs(np.corrcoef(channels.T)[0, 1]) < 0.02


def chroma(mean_rgb):
    """The part of an RGB vector orthogonal to grey."""
    return mean_rgb - mean_rgb.mean()


@pytest.mark.parametrize("make", [lambda: flat(64, 64), lambda: scene(96, 64)], ids=["grey", "scene"])
def test_colour_shift_moves_the_mean_colour_by_at_least_the_offset(make):
    image = make()
    before = pixels(image).reshape(-1, 3).mean(axis=0)
    directions = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        u = dg.colour_direction(np.random.default_rng(seed))
        assert abs(np.linalg.norm(u) - 1) < 1e-12 and abs(u.sum()) < 1e-12
        moved = pixels(dg.colour_shift(image, rng)).reshape(-1, 3).mean(axis=0) - before
        shift = float(chroma(moved) @ u)  # along the drawn hue, not towards grey or white
        assert shift >= dg.COLOUR_OFFSET * 255 - 1, (seed, moved)
        directions.append(u)
    assert np.ptp(np.array(directions), axis=0).min() > 1  # the hue differs from seed to seed


def test_cutout_fills_its_rectangles_and_leaves_every_other_pixel_identical():
    counts = set()
    for seed in range(30):
        width, height = (200, 120) if seed % 2 else (64, 64)
        image = texture(width, height, seed)
        out = pixels(dg.cutout(image, np.random.default_rng(seed)))
        boxes = dg.cutout_boxes(image.size, np.random.default_rng(seed))  # the same draws, in the same order
        counts.add(len(boxes))
        inside = np.zeros((height, width), bool)
        for left, top, right, bottom in boxes:
            lo, hi = dg.CUTOUT_SIDE_FRACTIONS
            assert lo * width - 1 <= right - left <= hi * width + 1
            assert lo * height - 1 <= bottom - top <= hi * height + 1
            inside[top:bottom, left:right] = True
        changed = np.any(out != pixels(image), axis=-1)
        assert np.array_equal(changed, inside)  # changed exactly where the rectangles are
        left, top, right, bottom = boxes[-1]  # the last one painted is one uniform colour
        assert len(np.unique(out[top:bottom, left:right].reshape(-1, 3), axis=0)) == 1
        if len(boxes) == 1:  # a single contiguous rectangle: the changed pixels fill their bounding box
            rows, cols = np.nonzero(changed)
            assert changed.sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
    assert counts == set(range(1, dg.CUTOUT_MAX_COUNT + 1))


@pytest.mark.parametrize("size", [(16, 16), (17, 31), (64, 64), (200, 96), (1024, 1024)])
def test_every_corruption_works_at_any_size_and_keeps_rgb_uint8(size):
    for image in (scene(*size), texture(*size)):
        for names in [(name,) for name in ALL] + [ALL]:
            out = degrade(image, names, 5)
            assert (out.mode, out.size) == ("RGB", size) and np.asarray(out).dtype == np.uint8, names
    image = texture(*size)  # a smooth picture may not change under a 16-px image's 0.24-px blur; a texture does
    for names in [(name,) for name in ALL]:
        assert degrade(image, names, 5).tobytes() != image.tobytes(), names


def test_other_image_modes_come_back_rgb():
    for mode in ("L", "RGBA"):
        out = degrade(scene(32, 32).convert(mode), ALL, 0)
        assert (out.mode, out.size) == ("RGB", (32, 32))


def test_same_seed_same_bytes_and_a_different_seed_differs():
    image = scene(64, 48)
    for names in [(name,) for name in ALL] + [ALL, ("cutout", "blur")]:
        assert degrade(image, names, 11).tobytes() == degrade(image, names, 11).tobytes(), names
    for name in RANDOM:
        assert degrade(image, (name,), 11).tobytes() != degrade(image, (name,), 12).tobytes(), name
    for name in ALL:
        if name not in RANDOM:  # blur and jpeg are plain functions of the image
            assert degrade(image, (name,), 11).tobytes() == degrade(image, (name,), 12).tobytes(), name
    assert degrade(image, (), 11) is image
    assert degrade(image, ("blur", "cutout"), 3).tobytes() != degrade(image, ("cutout", "blur"), 3).tobytes()


def test_each_corruption_draws_from_its_own_stream():
    """Corruption ``name`` uses ``default_rng((seed, position of name in DEGRADATIONS))``, whatever runs before."""
    image = flat(64, 64)
    # on a flat image the blur is a no-op, so the noise after it must be the same noise
    assert degrade(image, ("blur", "noise"), 4).tobytes() == degrade(image, ("noise",), 4).tobytes()
    boxes = dg.cutout_boxes(image.size, np.random.default_rng((4, list(DEGRADATIONS).index("cutout"))))
    outside = np.ones((64, 64), bool)
    for left, top, right, bottom in boxes:
        outside[top:bottom, left:right] = False
    after_cutout, alone = (pixels(degrade(image, names, 4)) for names in [("cutout", "noise"), ("noise",)])
    assert np.array_equal(after_cutout[outside], alone[outside]) and not np.array_equal(after_cutout, alone)


def test_parse_names_keeps_the_order_given():
    assert parse_names("cutout,blur") == ("cutout", "blur")
    assert parse_names(" blur , jpeg,noise,colour-shift,cutout ") == ALL


@pytest.mark.parametrize("text, message", [
    ("sharpen", "unknown corruption 'sharpen'; choose from blur,jpeg,noise,colour-shift,cutout"),
    ("blur,Jpeg", "unknown corruption 'Jpeg'"), ("color-shift", "choose from"),
    ("", "empty item"), ("blur,,jpeg", "empty item"), ("blur,", "empty item"), ("noise,noise", "repeats"),
])
def test_bad_names_are_refused_with_the_valid_choices(text, message):
    with pytest.raises(InvalidConfigError, match=message):
        parse_names(text)


def test_bad_calls_are_refused():
    with pytest.raises(InvalidConfigError, match="tuple"):
        check_names(["blur"])
    with pytest.raises(InvalidConfigError, match="unknown corruption 'sharpen'"):
        degrade(flat(8, 8), ("sharpen",), 0)
    for seed in (-1, 1.5, True):
        with pytest.raises(InvalidConfigError, match="seed"):
            degrade(flat(8, 8), ("noise",), seed)
