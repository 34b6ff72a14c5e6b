"""Reference sets: image loading, the protocol-keyed feature cache, its reuse, misses and recovery."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from sdxl_core.errors import InvalidConfigError
from sdxl_core.metrics import reference as R
from sdxl_core.metrics.reference import (list_reference_images, load_image, load_reference_images,
                                         reference_cache_dir, reference_features)
from sdxl_core.metrics.set_metrics import FID, KID


class CountingNet:
    """A tiny deterministic feature network that counts its calls."""

    def __init__(self, weights: str = "a" * 64) -> None:
        self.name = "toy"
        self.protocol = {"network": "toy", "weights_sha256": weights, "resize": {"size": 4}}
        self.calls = 0
        self.images = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == torch.uint8 and images.dim() == 4
        self.calls += 1
        self.images += images.shape[0]
        x = images.float() / 255
        return torch.cat([torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1), x.std(dim=(2, 3))], dim=1)


@pytest.fixture
def ref_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "ref"
    folder.mkdir()
    photos = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    for i, photo in enumerate(photos):
        for j, ext in enumerate(("png", "jpg", "webp")):
            crop = photo[40 * j:40 * j + 120, 60 * j:60 * j + 160]
            Image.fromarray(np.ascontiguousarray(crop)).save(folder / f"img{i}{j}.{ext}")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture
def cache(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("SDXL_BENCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "reference-stats"


def test_load_images(ref_dir):
    files = list_reference_images(ref_dir)
    assert len(files) == 12 and all(p.suffix in (".png", ".jpg", ".webp") for p in files)
    image = load_image(files[0])
    assert image.dtype == torch.uint8 and image.shape == (3, 120, 160)
    assert load_image(files[0], 64).shape == (3, 64, 64) and load_image(files[0], 64, "squash").shape == (3, 64, 64)
    assert load_reference_images(ref_dir, 32).shape == (12, 3, 32, 32)


def test_second_call_reuses_the_cache(ref_dir, cache):
    net = CountingNet()
    first = reference_features(ref_dir, net, resolution=64, batch_size=5)
    assert first.status == "computed" and net.calls == 3 and net.images == 12
    assert first.features.shape == (12, 15) and first.features.dtype == np.float32
    assert first.path.parent == cache and first.path.name.startswith("toy-")
    meta = json.loads(first.path.with_suffix(".json").read_text())
    assert meta["protocol"] == first.protocol and meta["features"]["shape"] == [12, 15]
    assert first.protocol["reference"]["n_images"] == 12 and first.protocol["resolution"] == 64

    second = reference_features(ref_dir, net, resolution=64, batch_size=7)  # batch size is not part of the protocol
    assert second.status == "hit" and net.calls == 3 and second.key == first.key
    np.testing.assert_array_equal(second.features, first.features)
    assert not list(cache.glob(".*.tmp"))


def test_protocol_changes_miss(ref_dir, cache):
    net = CountingNet()
    keys = {reference_features(ref_dir, net, resolution=64).key}
    for kwargs in ({"resolution": 48}, {"resolution": 64, "resize_mode": "squash"}):
        result = reference_features(ref_dir, net, **kwargs)
        assert result.status == "computed"
        keys.add(result.key)
    other = CountingNet(weights="b" * 64)  # same network name, other weights
    assert reference_features(ref_dir, other, resolution=64).status == "computed" and other.calls
    keys.add(reference_features(ref_dir, other, resolution=64).key)

    target = ref_dir / "img00.png"
    Image.fromarray(data.coffee()[:120, :160]).save(target)  # content change, same names
    keys.add(reference_features(ref_dir, net, resolution=64).key)
    target.rename(ref_dir / "img99.png")  # a rename alone changes the set's identity
    keys.add(reference_features(ref_dir, net, resolution=64).key)
    shutil.copy(ref_dir / "img99.png", ref_dir / "img98.png")  # an added image
    added = reference_features(ref_dir, net, resolution=64)
    assert added.features.shape[0] == 13 and added.status == "computed"
    keys.add(added.key)
    assert len(keys) == 7 and len(list(cache.glob("*.npy"))) == 7


def test_files_are_written_atomically_features_first(ref_dir, cache, monkeypatch):
    written = []
    real_bytes, real_json = R.write_bytes_atomic, R.write_json_atomic
    monkeypatch.setattr(R, "write_bytes_atomic", lambda p, d: written.append(Path(p).suffix) or real_bytes(p, d))
    monkeypatch.setattr(R, "write_json_atomic", lambda p, o: written.append(Path(p).suffix) or real_json(p, o))
    reference_features(ref_dir, CountingNet(), resolution=32)
    assert written == [".npy", ".json"]


@pytest.mark.parametrize("damage", ["truncate-npy", "delete-npy", "garbage-json", "other-protocol", "pickle-npy"])
def test_corrupted_cache_is_recomputed(ref_dir, cache, damage):
    net = CountingNet()
    first = reference_features(ref_dir, net, resolution=32)
    npy, meta = first.path, first.path.with_suffix(".json")
    if damage == "truncate-npy":
        npy.write_bytes(npy.read_bytes()[:100])
    elif damage == "delete-npy":
        npy.unlink()
    elif damage == "garbage-json":
        meta.write_text("{not json")
    elif damage == "other-protocol":
        doc = json.loads(meta.read_text())
        doc["protocol"]["resolution"] = 33
        meta.write_text(json.dumps(doc))
    else:
        np.save(npy, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.warns(RuntimeWarning, match="recomputing"):
        again = reference_features(ref_dir, net, resolution=32)
    assert again.status == "recomputed" and net.calls == 2
    np.testing.assert_array_equal(again.features, first.features)
    assert reference_features(ref_dir, net, resolution=32).status == "hit"


def test_cache_folder_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("SDXL_BENCH_CACHE", str(tmp_path / "base"))
    assert reference_cache_dir() == tmp_path / "base" / "reference-stats"
    assert reference_cache_dir(tmp_path / "mine") == tmp_path / "mine"
    monkeypatch.delenv("SDXL_BENCH_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert reference_cache_dir() == tmp_path / "home" / ".cache" / "sdxl-bench" / "reference-stats"


def test_cache_dir_argument(ref_dir, tmp_path, cache):
    result = reference_features(ref_dir, CountingNet(), resolution=32, cache_dir=tmp_path / "elsewhere")
    assert result.path.parent == tmp_path / "elsewhere" and not cache.exists()


def test_native_sizes_are_batched_by_size(tmp_path, cache):
    folder = tmp_path / "sizes"
    folder.mkdir()
    photo = data.astronaut()
    for i, (h, w) in enumerate([(32, 32), (32, 32), (40, 48), (40, 48), (32, 32)]):
        Image.fromarray(np.ascontiguousarray(photo[i:i + h, :w])).save(folder / f"{i}.png")
    net = CountingNet()
    result = reference_features(folder, net, resolution=None, batch_size=32)
    assert result.features.shape[0] == 5 and net.calls == 3  # runs of equal size: 2, 2, 1
    assert result.protocol["resize_mode"] == "none (own size)" and result.protocol["resolution"] is None


def test_reference_errors(tmp_path, ref_dir, cache):
    net = CountingNet()
    with pytest.raises(InvalidConfigError, match="not a folder"):
        reference_features(tmp_path / "missing", net)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(InvalidConfigError, match=r"empty: no images \(.png, .jpg, .jpeg, .webp\)"):
        reference_features(empty, net)
    (ref_dir / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(InvalidConfigError, match="broken.png: cannot be read as an image"):
        reference_features(ref_dir, net, resolution=32)
    with pytest.raises(InvalidConfigError, match="network_protocol"):
        reference_features(ref_dir, lambda x: x.float().mean(dim=(2, 3)))
    with pytest.raises(InvalidConfigError, match="resize_mode"):
        reference_features(ref_dir, net, resize_mode="pad")
    with pytest.raises(InvalidConfigError, match="resolution"):
        reference_features(ref_dir, net, resolution=2)


def test_cached_features_feed_fid_and_kid(ref_dir, cache):
    net = CountingNet()
    ref = reference_features(ref_dir, net, resolution=64)
    direct = net(load_reference_images(ref_dir, 64)).numpy()
    fake = direct[::-1] * 0.9 + 0.05
    values = []
    for real in (ref.features, direct):
        fid, kid = FID(dim=15), KID(dim=15)
        for metric in (fid, kid):
            metric.update_features(real, real=True)
            metric.update_features(fake, real=False)
        values.append((fid.compute().value, kid.compute().value))
    assert values[0] == pytest.approx(values[1], rel=1e-9)


def test_real_network_protocol_keys_the_cache(ref_dir, cache):
    from sdxl_core.metrics.features import get_feature_network

    net = get_feature_network("effnet-lite0")
    result = reference_features(ref_dir, net, resolution=64, batch_size=12)
    assert result.features.shape == (12, 1280) and result.status == "computed"
    assert result.protocol["network"]["weights_sha256"] == net.protocol["weights_sha256"]
    assert result.path.name.startswith("effnet-lite0-")
    assert reference_features(ref_dir, net, resolution=64).status == "hit"
