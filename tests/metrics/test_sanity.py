"""Image sanity flags: NaN/inf in pixels and latents, black and constant images, counts over a set."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_core.errors import InvalidConfigError
from sdxl_core.metrics.sanity import FLAGS, ImageSanity, SanityResult, image_sanity

RNG = np.random.default_rng(0)
NORMAL = RNG.integers(0, 256, size=(32, 48, 3), dtype=np.uint8)


def test_normal_image_is_ok_in_every_input_form():
    for img in (NORMAL, Image.fromarray(NORMAL), torch.from_numpy(NORMAL.copy()).permute(2, 0, 1),
                NORMAL.astype(np.float32) / 255.0, torch.from_numpy(NORMAL.copy()).permute(2, 0, 1).half() / 255):
        res = image_sanity(img, latents=torch.randn(4, 4, 6))
        assert isinstance(res, SanityResult)
        assert res.ok and res.flags == (), (type(img), res)
        assert res.stats["mean"] == pytest.approx(NORMAL.mean(), abs=0.6)
        assert res.stats["range"] == pytest.approx(255, abs=1)
    assert dataclasses.is_dataclass(res)
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.ok = False  # type: ignore[misc]
    assert res.as_dict()["flags"] == [] and res.as_dict()["ok"] is True


def test_nan_and_inf_pixels():
    a = NORMAL.astype(np.float32) / 255.0
    a[3, 4, 1] = np.nan
    res = image_sanity(a)
    assert res.flags == ("nan_pixels",) and not res.ok and res.stats["n_nan_pixels"] == 1
    t = torch.from_numpy(NORMAL.copy()).permute(2, 0, 1).float() / 255
    t[0, 0, 0] = float("inf")
    t[2, 5, 5] = float("-inf")
    res = image_sanity(t)
    assert res.flags == ("inf_pixels",) and res.stats["n_inf_pixels"] == 2
    all_nan = np.full((8, 8, 3), np.nan, dtype=np.float32)
    res = image_sanity(all_nan)
    assert res.flags == ("nan_pixels",) and res.stats["mean"] is None


def test_nan_and_inf_latents():
    lat = torch.randn(4, 8, 8)
    lat[1, 2, 3] = float("nan")
    res = image_sanity(NORMAL, latents=lat)
    assert res.flags == ("nan_latents",) and res.stats["n_nan_latents"] == 1
    lat = np.zeros((4, 8, 8), dtype=np.float16)
    lat[0, 0, 0] = np.inf
    res = image_sanity(NORMAL, latents=lat)
    assert res.flags == ("inf_latents",) and res.stats["n_inf_latents"] == 1


def test_fp16_vae_failure_nan_latents_black_image():
    res = image_sanity(Image.new("RGB", (64, 64)), latents=torch.full((4, 8, 8), float("nan"), dtype=torch.float16))
    assert res.flags == ("nan_latents", "black") and res.stats["latent_mean"] is None


@pytest.mark.parametrize("img, flags", [
    (np.zeros((16, 16, 3), np.uint8), ("black",)),
    (RNG.integers(0, 4, size=(16, 16, 3)).astype(np.uint8), ("black",)),  # near-black noise, mean ~1.5
    (np.full((16, 16, 3), 128, np.uint8), ("constant",)),  # uniform grey: constant, not black
    (np.full((16, 16, 3), 255, np.uint8), ("constant",)),
    (np.broadcast_to(np.array([255, 0, 0], np.uint8), (16, 16, 3)).copy(), ("constant",)),  # flat red
    ((128 + RNG.integers(-1, 2, size=(16, 16, 3))).astype(np.uint8), ("constant",)),  # range 2 levels
    (np.tile(np.array([126, 127, 128, 129], np.uint8)[:, None, None], (4, 16, 3)), ()),  # range 3: not constant
    (np.full((16, 16), 0.5, np.float32), ("constant",)),  # grey float HxW
    (np.full((16, 16, 4), 7, np.uint8), ("constant",)),  # RGBA: alpha ignored
])
def test_black_and_constant(img, flags):
    assert image_sanity(img).flags == flags


def test_float_range_for_raw_decoder_output():
    minus_one = torch.full((3, 8, 8), -1.0)
    assert image_sanity(minus_one, float_range=(-1, 1)).flags == ("black",)
    assert image_sanity(minus_one).flags == ("black",)  # clipped below 0 on the (0, 1) scale: still black
    assert image_sanity(torch.zeros(3, 8, 8), float_range=(-1, 1)).flags == ("constant",)  # mid grey


def test_bad_inputs():
    with pytest.raises(InvalidConfigError, match="shape"):
        image_sanity(np.zeros((2, 3, 8, 8), np.uint8))
    with pytest.raises(InvalidConfigError, match="float_range"):
        image_sanity(np.zeros((8, 8, 3), np.float32), float_range=(1, 0))
    with pytest.raises(InvalidConfigError, match="type str"):
        image_sanity("image.png")


def test_metric_counts_flags_and_indices():
    m = ImageSanity()
    assert m.info.higher_is_better is False and m.info.name == "image_sanity"
    good = torch.from_numpy(NORMAL.copy()).permute(2, 0, 1).float() / 255
    nan_img = good.clone()
    nan_img[0, 0, 0] = float("nan")
    batch = torch.stack([good, torch.zeros_like(good), nan_img])  # (N, C, H, W)
    lat = torch.randn(3, 4, 4, 4)
    lat[0, 0, 0, 0] = float("inf")
    m.update(batch, lat)
    m.update([Image.fromarray(NORMAL), np.full((8, 8, 3), 90, np.uint8)])  # list, no latents
    m.update(Image.new("RGB", (8, 8)), latents=torch.full((4, 2, 2), float("nan")))  # one image + its latents
    out = m.compute()
    assert out["n"] == 6 and out["n_flagged"] == 5 and out["fraction_flagged"] == pytest.approx(5 / 6)
    assert out["counts"] == {"nan_pixels": 1, "inf_pixels": 0, "nan_latents": 1, "inf_latents": 1, "black": 2,
                             "constant": 1}
    assert list(out["counts"]) == list(FLAGS)
    assert out["flagged"] == [0, 1, 2, 4, 5]
    assert out["details"][0] == {"index": 0, "flags": ["inf_latents"]}
    assert out["details"][-1] == {"index": 5, "flags": ["nan_latents", "black"]}
    assert m.flag_counts.dtype == torch.float64 and m.n_images.dtype == torch.float64
    m.reset()
    m.update([NORMAL])
    assert m.compute() == {"n": 1, "n_flagged": 0, "fraction_flagged": 0.0, "counts": dict.fromkeys(FLAGS, 0),
                           "flagged": [], "details": []}
    with pytest.raises(InvalidConfigError, match="2 images and 1 latents"):
        m.update([NORMAL, NORMAL], [torch.zeros(4, 2, 2)])


def test_batches_equal_one_update():
    imgs = [NORMAL, np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 50, np.uint8), NORMAL]
    one, many = ImageSanity(), ImageSanity()
    one.update(imgs)
    for im in imgs:
        many.update([im])
    assert one.compute() == many.compute()
