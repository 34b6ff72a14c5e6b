"""FID, KID, CMMD against independent numpy/scipy references, torchmetrics behaviour, and real-image sanity."""

from __future__ import annotations

import io

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image, ImageFilter
from scipy.spatial.distance import cdist
from skimage import data
from torch import nn

from sdxl_core.errors import InvalidConfigError
from sdxl_core.metrics.features import FeatureNetwork, get_feature_network
from sdxl_core.metrics.set_metrics import (CMMD, FID, KID, SetMetricResult, mmd_rbf, sample_size_warning,
                                           set_metric_info)


# --- independent references -----------------------------------------------------------------------------------

def np_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def np_kid(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3 (equal set sizes)."""
    d, m = x.shape[1], x.shape[0]
    kxx, kyy, kxy = ((p @ q.T / d + 1) ** 3 for p, q in ((x, x), (y, y), (x, y)))
    return float((kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean())


def np_mmd_rbf(x: np.ndarray, y: np.ndarray, unbiased: bool, sigma: float = 10.0, scale: float = 1000.0) -> float:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    y = y / np.linalg.norm(y, axis=1, keepdims=True)
    k = [np.exp(-cdist(p, q, "sqeuclidean") / (2 * sigma**2)) for p, q in ((x, x), (y, y), (x, y))]
    if not unbiased:  # google-research cmmd distance.mmd: means over the full matrices
        return float(scale * (k[0].mean() + k[1].mean() - 2 * k[2].mean()))
    m, n = len(x), len(y)
    return float(scale * ((k[0].sum() - m) / (m * (m - 1)) + (k[1].sum() - n) / (n * (n - 1)) - 2 * k[2].mean()))


def correlated(rng: np.random.Generator, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) / np.sqrt(d) + shift + rng.exponential(size=(n, d))


def exact_moments(rng: np.random.Generator, n: int, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """n samples whose sample mean is exactly ``mean`` and sample covariance (n-1) exactly diag(std^2)."""
    z = rng.normal(size=(n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return mean + z * std


def toy_network(dim: int = 48) -> FeatureNetwork:
    """A fixed, deterministic image -> feature map (4x4 average pooling of each channel)."""
    backbone = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten())
    return FeatureNetwork("toy", backbone, dim, {"network": "toy", "weights_sha256": "0" * 64,
                                                 "resize": {"size": 4, "mode": "area"}}, prepare=lambda x: x)


# --- FID -------------------------------------------------------------------------------------------------------

def test_fid_equals_numpy_scipy_reference():
    rng = np.random.default_rng(0)
    a, b = correlated(rng, 400, 24), correlated(rng, 300, 24, shift=0.3)
    fid = FID(dim=24)
    fid.update_features(a, real=True)
    fid.update_features(torch.from_numpy(b).float(), real=False)
    ref = np_fid(a, b.astype(np.float32).astype(np.float64))
    result = fid.compute()
    assert isinstance(result, SetMetricResult) and result.name == "fid"
    assert abs(result.value - ref) / ref < 1e-6
    assert (result.n_real, result.n_fake, result.warnings, result.std) == (400, 300, [], None)


def test_fid_through_a_feature_network_equals_reference_on_its_features():
    net = toy_network()
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (60, 3, 16, 16), dtype=torch.uint8, generator=g)
    fake = (torch.rand(70, 3, 16, 16, generator=g) * 0.8).clamp(0, 1)
    fid = FID(net)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    ref = np_fid(net(real).double().numpy(), net(fake).double().numpy())
    result = fid.compute()
    assert abs(result.value - ref) / ref < 1e-6
    assert result.protocol["features"]["network"] == "toy" and result.protocol["dim"] == 48


def test_fid_of_a_set_with_itself_is_zero():
    a = correlated(np.random.default_rng(1), 200, 16)
    fid = FID(dim=16)
    fid.update_features(a, real=True)
    fid.update_features(a, real=False)
    assert abs(fid.compute().value) < 1e-8 * np.trace(np.cov(a, rowvar=False))


def test_fid_of_gaussians_matches_the_closed_form():
    """Exact-moment samples of N(m1, diag(s1^2)) and N(m2, diag(s2^2)): FID = |m1-m2|^2 + sum (s1-s2)^2."""
    rng = np.random.default_rng(2)
    d = 12
    m1, m2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.5, 2, size=d), rng.uniform(0.5, 2, size=d)
    fid = FID(dim=d)
    fid.update_features(exact_moments(rng, 500, m1, s1), real=True)
    fid.update_features(exact_moments(rng, 300, m2, s2), real=False)
    closed = float(((m1 - m2) ** 2).sum() + ((s1 - s2) ** 2).sum())
    assert fid.compute().value == pytest.approx(closed, rel=1e-9)


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric FID was called before")
def test_fid_batches_reset_float64_and_kept_reference():
    rng = np.random.default_rng(3)
    a, b = correlated(rng, 90, 8), correlated(rng, 80, 8, shift=1.0)
    one = FID(dim=8)
    one.update_features(a, True)
    one.update_features(b, False)
    many = FID(dim=8)
    for chunk in np.array_split(a, 4):
        many.update_features(chunk, True)
    for chunk in np.array_split(b, 3):
        many.update_features(chunk, False)
    assert many.compute().value == pytest.approx(one.compute().value, rel=1e-12)
    assert many.real_features_sum.dtype == many.fake_features_cov_sum.dtype == torch.float64

    many.reset()
    assert int(many.real_features_num_samples) == int(many.fake_features_num_samples) == 0
    with pytest.raises(InvalidConfigError, match="at least 2 real and 2 fake"):
        many.compute()

    kept = FID(dim=8, reset_real_features=False)
    kept.update_features(a, True)
    values = []
    for fake in (b, b + 1, b):  # the cached sqrt of the real covariance must give the same values
        kept.reset()
        kept.update_features(fake, False)
        values.append(kept.compute().value)
    assert values[0] == pytest.approx(one.compute().value, rel=1e-12) and values[2] == pytest.approx(values[0])
    assert values[1] == pytest.approx(np_fid(a, b + 1), rel=1e-6)


def test_fid_update_errors():
    fid = FID(dim=4)
    with pytest.raises(InvalidConfigError, match=r"shape \(N, 4\)"):
        fid.update_features(np.zeros((3, 5)), True)
    with pytest.raises(InvalidConfigError, match="real=True"):
        fid.update(features=np.zeros((3, 4)))
    with pytest.raises(InvalidConfigError, match="NaN"):
        fid.update_features(np.full((3, 4), np.nan), False)
    with pytest.raises(InvalidConfigError, match="without a feature network"):
        fid.update(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), real=True)
    with pytest.raises(InvalidConfigError, match="pass a feature_network, or dim"):
        FID()


def test_sample_size_warning_for_rank_deficient_fid():
    msg = sample_size_warning(50, 2048, "fid")
    assert msg and "rank-deficient" in msg and "KID" in msg and "CMMD" in msg
    assert sample_size_warning(2049, 2048, "fid") is None
    assert sample_size_warning(50, 2048, "kid") is None and sample_size_warning(50, 768, "cmmd") is None
    with pytest.raises(InvalidConfigError, match="'is'"):
        sample_size_warning(10, 10, "is")
    rng = np.random.default_rng(4)
    fid = FID(dim=32)
    fid.update_features(rng.normal(size=(20, 32)), True)
    fid.update_features(rng.normal(size=(25, 32)), False)
    result = fid.compute()
    assert result.warnings == [sample_size_warning(20, 32, "fid")] and result.value > 0


def test_metric_info_labels():
    assert set_metric_info("fid", "inception").label is None
    info = set_metric_info("kid", "effnet-lite0", against="baseline")
    assert info.kind == "set" and info.lower_is_better
    assert info.label == "effnet-lite0 features (not comparable to Inception KID); shift from baseline"
    assert FID(toy_network()).info.display_name == "FID"
    with pytest.raises(InvalidConfigError):
        set_metric_info("fid", against="nowhere")


# --- KID -------------------------------------------------------------------------------------------------------

def test_kid_equals_numpy_unbiased_polynomial_mmd():
    rng = np.random.default_rng(5)
    a, b = correlated(rng, 60, 10), correlated(rng, 60, 10, shift=0.2)
    kid = KID(dim=10, subsets=50, subset_size=1000)  # one subset covers both sets: exact
    for chunk in np.array_split(a, 3):
        kid.update_features(chunk, True)
    kid.update_features(b, False)
    result = kid.compute()
    assert result.value == pytest.approx(np_kid(a, b), rel=1e-9) and result.std == 0.0
    assert result.protocol["subsets"] == 1 and result.protocol["subset_size"] == 60
    assert all(s.dtype == torch.float64 for s in kid.real_features + kid.fake_features)
    kid.reset()
    assert kid.real_features == [] and kid.fake_features == []


def test_kid_subsets_match_numpy_on_the_same_subsets():
    rng = np.random.default_rng(6)
    a, b = correlated(rng, 50, 6), correlated(rng, 40, 6, shift=0.5)
    kid = KID(dim=6, subsets=5, subset_size=30, seed=7)
    kid.update_features(a, True)
    kid.update_features(b, False)
    result = kid.compute()
    gen = torch.Generator().manual_seed(7)
    ref = []
    for _ in range(5):
        ia, ib = torch.randperm(50, generator=gen)[:30].numpy(), torch.randperm(40, generator=gen)[:30].numpy()
        ref.append(np_kid(a[ia], b[ib]))
    assert result.value == pytest.approx(np.mean(ref), rel=1e-9) and result.std == pytest.approx(np.std(ref))
    assert kid.compute().value == result.value  # seeded: reproducible


# --- CMMD ------------------------------------------------------------------------------------------------------

def test_cmmd_equals_numpy_rbf_mmd_unbiased_and_reference_biased():
    rng = np.random.default_rng(8)
    x, y = rng.normal(size=(70, 32)), rng.normal(size=(55, 32)) + 0.3
    cmmd = CMMD()
    for chunk in np.array_split(x, 2):
        cmmd.update_features(chunk, True)
    cmmd.update_features(y, False)
    result = cmmd.compute()
    assert result.value == pytest.approx(np_mmd_rbf(x, y, unbiased=True), rel=1e-9)
    assert "unbiased" in result.protocol["estimator"] and (result.n_real, result.n_fake) == (70, 55)
    biased = CMMD(estimator="biased")
    biased.update_features(x, True)
    biased.update_features(y, False)
    assert biased.compute().value == pytest.approx(np_mmd_rbf(x, y, unbiased=False), rel=1e-9)
    assert mmd_rbf(x / np.linalg.norm(x, axis=1, keepdims=True), y / np.linalg.norm(y, axis=1, keepdims=True),
                   block=7) == pytest.approx(result.value, rel=1e-9)
    assert all(e.dtype == torch.float64 for e in cmmd.real_embeddings)


def test_cmmd_with_an_embedder_and_kept_reference():
    proj = torch.from_numpy(np.random.default_rng(9).normal(size=(48, 16)))

    def embedder(images: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(images.float() / 255, 4).flatten(1).double()
        return x @ proj

    g = torch.Generator().manual_seed(1)
    real = torch.randint(0, 256, (30, 3, 16, 16), dtype=torch.uint8, generator=g)
    fake = torch.randint(0, 200, (25, 3, 16, 16), dtype=torch.uint8, generator=g)
    cmmd = CMMD(embedder, reset_real_features=False)
    cmmd.update(real, real=True)
    cmmd.update(fake, real=False)
    value = cmmd.compute().value
    assert value == pytest.approx(np_mmd_rbf(embedder(real).numpy(), embedder(fake).numpy(), True), rel=1e-9)
    cmmd.reset()
    assert len(cmmd.real_embeddings) == 1 and cmmd.fake_embeddings == []
    cmmd.update(fake, real=False)
    assert cmmd.compute().value == pytest.approx(value, rel=1e-12)
    with pytest.raises(InvalidConfigError, match="without an embedder"):
        CMMD().update(real, real=True)


# --- real images -----------------------------------------------------------------------------------------------

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina", "immunohistochemistry")


def photo_crops(per_photo: int = 5, size: int = 224) -> list[Image.Image]:
    """Deterministic square crops of skimage's real RGB photographs (plus the two stereo motorcycle views)."""
    photos = [getattr(data, name)() for name in PHOTOS] + list(data.stereo_motorcycle()[:2])
    crops = []
    for i, photo in enumerate(photos):
        rng = np.random.default_rng(i)
        h, w = photo.shape[:2]
        side = min(h, w, 2 * size)
        for _ in range(per_photo):
            y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
            crop = Image.fromarray(np.ascontiguousarray(photo[y:y + side, x:x + side]))
            crops.append(crop.resize((size, size), Image.Resampling.BICUBIC))
    return crops


def as_tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images])


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_effnet_fid_grows_with_blur_and_jpeg_loss():
    """FID(clean crops, degraded copies) on real EfficientNet-Lite0 features rises with each degradation level."""
    net = get_feature_network("effnet-lite0")
    clean = photo_crops(per_photo=3)
    fid = FID(net, reset_real_features=False)
    fid.update(as_tensor(clean), real=True)

    def fid_to(images: list[Image.Image]) -> float:
        fid.reset()
        fid.update(as_tensor(images), real=False)
        result = fid.compute()
        assert result.warnings and "rank-deficient" in result.warnings[0]  # 27 images, 1280-d
        assert "not comparable to Inception FID" in result.info["label"]
        return result.value

    blur = [fid_to([im.filter(ImageFilter.GaussianBlur(s)) for im in clean]) for s in (0.5, 1.0, 2.0, 3.0)]
    lossy = [fid_to([jpeg(im, q) for im in clean]) for q in (90, 50, 20, 5)]
    assert fid_to(clean) == pytest.approx(0.0, abs=1e-6)
    assert all(a < b for a, b in zip(blur, blur[1:])), blur
    assert all(a < b for a, b in zip(lossy, lossy[1:])), lossy
    assert blur[0] > 0.5 and lossy[0] > 0.5


def test_kid_all_pairs_equals_kid_on_equal_sets_and_a_direct_sum_on_unequal_ones():
    from sdxl_core.metrics.set_metrics import KID, kid_all_pairs

    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(20, 8)), rng.normal(0.3, 1.0, size=(20, 8))
    metric = KID(dim=8, subset_size=20, sync_on_compute=False)
    metric.update_features(x, real=True)
    metric.update_features(y, real=False)
    assert kid_all_pairs(x, y) == pytest.approx(metric.compute().value, rel=1e-5)
    y = y[:13]
    k = lambda a, b: (a @ b / 8 + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(a, b) for a in x for b in y) / (m * n)
    assert kid_all_pairs(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-9)
