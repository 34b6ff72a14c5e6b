"""Toy SDXL world: deterministic captioned scenes, caption round trips, and the exact image-analysis oracle."""

from __future__ import annotations

import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_core.atomicio import read_json_lines
from sdxl_core.toy.oracle import CHECKS, OracleAccuracy, judge
from sdxl_core.toy.world import (COLOURS, SHAPES, SIZES, CaptionParams, Scene, ToyDataset, caption,
                                 parse_caption, render, sample_scene, write_dataset)

N_ORACLE = 320


@pytest.fixture(scope="module")
def samples():
    return list(ToyDataset(seed=7, length=N_ORACLE))


def test_determinism_and_seed_dependence():
    a = [sample_scene(11, i) for i in range(40)]
    b = [sample_scene(11, i) for i in range(40)]
    c = [sample_scene(12, i) for i in range(40)]
    assert a == b
    assert [caption(s) for s in a] == [caption(s) for s in b]
    assert all(np.array_equal(np.asarray(render(x)), np.asarray(render(y))) for x, y in zip(a[:10], b[:10]))
    assert sum(x.params != y.params for x, y in zip(a, c)) > 20
    assert any(not np.array_equal(np.asarray(render(x)), np.asarray(render(y))) for x, y in zip(a, c))
    ds = ToyDataset(11)
    assert ds[5].scene == a[5] and ds[5].caption == caption(a[5])
    assert ds[10_000_000].scene == sample_scene(11, 10_000_000)  # unlimited: random access, no walk
    with pytest.raises(TypeError):
        len(ds)
    finite = ToyDataset(11, length=3)
    assert len(finite) == 3 and [s.index for s in finite] == [0, 1, 2] and finite[-1].index == 2
    with pytest.raises(IndexError):
        finite[3]
    rng1, rng2 = np.random.default_rng(5), np.random.default_rng(5)
    assert sample_scene(rng1, 0) == sample_scene(rng2, 0)


def test_scene_parameters_cover_the_grammar_and_round_trip():
    scenes = [sample_scene(3, i) for i in range(500)]
    for s in scenes:
        assert s.colour != s.background
        assert 1 <= s.count <= 3 and len(s.centers) == s.count
        assert (s.position is None) == (s.count > 1)
        assert parse_caption(caption(s)) == s.params
        assert Scene.from_dict(json.loads(json.dumps(s.as_dict()))) == s
    assert {s.shape for s in scenes} == set(SHAPES) and {s.size for s in scenes} == set(SIZES)
    assert {s.colour for s in scenes} == set(COLOURS) and len(COLOURS) >= 8
    assert {s.count for s in scenes} == {1, 2, 3}
    assert {s.position for s in scenes} == {None, "left", "right", "top", "bottom", "center"}
    two = next(s for s in scenes if s.count == 2)
    assert caption(two).startswith(f"two {two.size} {two.colour} {two.shape}s on a ")
    one = next(s for s in scenes if s.count == 1 and s.position == "left")
    assert caption(one) == f"a {one.size} {one.colour} {one.shape} on the left of a {one.background} background"
    with pytest.raises(ValueError):
        parse_caption("a photo of a cat")


def test_oracle_exact_on_rendered_dataset(samples):
    results = [judge(s.image, s.caption) for s in samples]
    assert len(results) >= 300
    assert not [(s.index, s.caption, r.checks) for s, r in zip(samples, results) if not r.correct]
    # array and tensor inputs give the same verdict
    s = samples[0]
    arr = np.array(s.image)
    assert judge(arr, s.caption).correct
    assert judge(torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0, s.scene.params).correct


def _variants(p: CaptionParams) -> dict[str, CaptionParams]:
    colours = list(COLOURS)
    other_colour = next(c for c in colours if c not in (p.colour, p.background))
    other_bg = next(c for c in colours if c not in (p.colour, p.background))
    other_count = p.count % 3 + 1
    other_shape = SHAPES[(SHAPES.index(p.shape) + 1) % len(SHAPES)]
    other_size = "large" if p.size == "small" else "small"
    return {
        "colour": dataclasses.replace(p, colour=other_colour),
        "background": dataclasses.replace(p, background=other_bg),
        "count": dataclasses.replace(p, count=other_count, position=None if other_count > 1 else "center"),
        "shape": dataclasses.replace(p, shape=other_shape),
        "size": dataclasses.replace(p, size=other_size),
    }


def test_oracle_detects_mismatched_captions(samples):
    tried = detected = 0
    for s in samples[:120]:
        for check, wrong in _variants(s.scene.params).items():
            res = judge(s.image, caption(wrong))  # through the caption text
            tried += 1
            detected += (not res.correct) and not getattr(res, check)
    assert tried == 600 and detected == tried
    # wrong position for single shapes
    singles = [s for s in samples if s.scene.count == 1]
    pos_tried = 0
    for s in singles[:40]:
        wrong = dataclasses.replace(s.scene.params, position="center" if s.scene.position != "center" else "left")
        res = judge(s.image, wrong)
        pos_tried += 1
        assert not res.position and not res.correct
    assert pos_tried == min(40, len(singles)) > 10


def test_oracle_robust_to_jpeg_and_noise(samples):
    rng = np.random.default_rng(0)
    for s in samples[:150]:
        buf = io.BytesIO()
        s.image.save(buf, format="JPEG", quality=90)
        jpeg = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
        assert judge(jpeg, s.caption).correct, (s.caption, judge(jpeg, s.caption).details)
        noisy = np.clip(np.asarray(s.image, dtype=np.float64) + rng.normal(0, 5, (64, 64, 3)), 0, 255)
        assert judge(noisy.astype(np.uint8), s.caption).correct, s.caption


def test_write_dataset(tmp_path):
    meta = write_dataset(tmp_path / "ds", 6, seed=4)
    rows = list(read_json_lines(meta))
    assert [r["file"] for r in rows] == [f"{i:05d}.png" for i in range(6)]
    for i, r in enumerate(rows):
        scene = Scene.from_dict(r["scene"])
        assert scene == sample_scene(4, i) and r["prompt"] == r["caption"] == caption(scene)
        img = Image.open(tmp_path / "ds" / r["file"])
        assert img.size == (64, 64)
        assert np.array_equal(np.asarray(img.convert("RGB")), np.asarray(render(scene)))
        assert judge(img, r["caption"]).correct
    write_dataset(tmp_path / "ds", 6, seed=4)  # a rerun replaces, never duplicates
    assert len(list(read_json_lines(meta))) == 6
    assert json.loads((tmp_path / "ds" / "dataset.json").read_text())["seed"] == 4
    assert not [p for p in (tmp_path / "ds").iterdir() if p.name.startswith(".")]


def test_oracle_accuracy_metric(samples):
    items = samples[:8]
    images = [s.image for s in items]
    caps = [s.caption for s in items]
    caps[1] = caption(_variants(items[1].scene.params)["colour"])
    caps[4] = caption(_variants(items[4].scene.params)["count"])
    caps[6] = caption(_variants(items[6].scene.params)["background"])
    by_hand = sum(judge(im, c).correct for im, c in zip(images, caps)) / len(images)
    assert by_hand == 5 / 8

    one = OracleAccuracy()
    one.update(images, caps)
    r1 = one.compute()
    batched = OracleAccuracy()
    batched.update(images[:3], caps[:3])
    batched.update(images[3], caps[3])
    batched.update(images[4:], caps[4:])
    r2 = batched.compute()
    assert r1 == r2
    assert r1["accuracy"] == pytest.approx(5 / 8) and r1["n"] == 8 and r1["n_correct"] == 5
    assert set(r1["per_check"]) == set(CHECKS)
    assert r1["per_check"]["colour"] == pytest.approx(7 / 8) and r1["per_check"]["shape"] == 1.0
    assert [d["correct"] for d in r1["per_image"]] == [True, False, True, True, False, True, False, True]
    assert one.n_images.dtype == torch.float64 and one.check_passes.dtype == torch.float64
    assert one.higher_is_better is True
    info = one.info
    assert (info.name, info.display_name, info.higher_is_better, info.kind, info.label) == (
        "oracle_accuracy", "Oracle accuracy", True, "per_image", "toy world")
    one.reset()
    with pytest.warns(UserWarning):
        empty = one.compute()
    assert empty["n"] == 0 and np.isnan(empty["accuracy"])
    one.update(np.stack([np.asarray(im) for im in images[:2]]), [items[0].caption, items[1].caption])
    assert one.compute()["accuracy"] == 1.0
    with pytest.raises(ValueError):
        one.update(images[:2], caps[:1])


def test_srgb_to_lab_matches_skimage():
    """The oracle's numpy sRGB -> CIELAB (D65) equals scikit-image's rgb2lab (a dev-only dependency)."""
    from skimage.color import rgb2lab

    from sdxl_core.toy.oracle import srgb_to_lab

    rng = np.random.default_rng(0)
    colours = np.concatenate([rng.uniform(0, 1, (4000, 3)), rng.uniform(0, 0.05, (500, 3)),  # near black: linear
                              np.array([[0, 0, 0], [1, 1, 1], [0.04045, 0.04045, 0.04045]] +
                                       [[v / 255 for v in rgb] for rgb in COLOURS.values()])])
    np.testing.assert_allclose(srgb_to_lab(colours), rgb2lab(colours[None])[0], rtol=0, atol=1e-6)
    assert srgb_to_lab(colours.reshape(-1, 1, 3)).shape == (len(colours), 1, 3)
    with pytest.raises(ValueError, match="expected"):
        srgb_to_lab(np.zeros((2, 4)))


def test_oracle_does_not_import_skimage():
    import subprocess
    import sys

    code = ("import sys; import sdxl_core.toy.oracle as o; o.nearest_colour((200, 30, 30)); "
            "sys.exit(1 if any(m == 'skimage' or m.startswith('skimage.') for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def test_a_scene_is_its_caption_params_plus_geometry():
    scene = sample_scene(3, 5)
    params = scene.params
    assert type(params) is CaptionParams and params.params is params
    assert {f.name: getattr(scene, f.name) for f in dataclasses.fields(CaptionParams)} == dataclasses.asdict(params)
    assert list(scene.as_dict())[:6] == [f.name for f in dataclasses.fields(CaptionParams)]
    assert caption(scene) == caption(params)
    assert Scene.from_dict(json.loads(json.dumps(scene.as_dict()))) == scene
