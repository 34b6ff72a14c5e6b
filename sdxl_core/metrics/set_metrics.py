"""Set metrics: FID, KID (torchmetrics, on a :class:`~sdxl_core.metrics.features.FeatureNetwork`) and CMMD.

All three are torchmetrics ``Metric`` s: ``update()`` per batch (``real=True`` for the reference set),
``compute()`` -> :class:`SetMetricResult`, ``reset()``; the running state is float64. Each can also be fed
precomputed features (``update_features``), e.g. reference-set features from :mod:`sdxl_core.metrics.reference`,
and ``reset_real_features=False`` keeps the reference side across variants.

FID keeps torchmetrics' state (feature sums and sums of outer products) but computes the trace term as
``tr sqrt(S1^1/2 S2 S1^1/2)`` with two symmetric eigendecompositions (float64): the same quantity as
torchmetrics' ``eigvals(S1 @ S2)`` and scipy's ``sqrtm``, real and symmetric throughout (no complex round-off),
about as fast as the former and ~4x faster than the latter at 2048-d; the eigendecomposition of the real
covariance is reused while the real statistics are unchanged (``reset_real_features=False``): each further
variant then costs ~0.4x (measured on 10k x 2048 features, 2 CPU threads: 2.2 s first compute, 0.8 s next).

KID is torchmetrics' unbiased polynomial-kernel MMD^2, ``k(x, y) = (x.y / d + 1)^3``, averaged over random subsets
drawn with a seeded generator (deterministic); ``subset_size`` is capped at the smaller set, and when that covers
both sets entirely a single subset is exact (more would only permute it).

CMMD (Jayasumana et al., "Rethinking FID", CVPR 2024) is ``scale * MMD^2`` with a Gaussian RBF kernel
``exp(-||x - y||^2 / (2 sigma^2))``, sigma 10, scale 1000, on L2-normalized CLIP image embeddings. The
reference implementation (google-research ``cmmd/distance.py``) uses the *biased* minimum-variance estimator
(``mean`` over full kernel matrices, diagonal included: Gretton et al. 2012, Eq. 5). As the issue asks, the
default here is the *unbiased* estimator (Eq. 3): diagonal excluded from the within-set sums,
``Sxx/(m(m-1)) + Syy/(n(n-1)) - 2 Sxy/(mn)``; ``estimator="biased"`` reproduces the reference's number.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Literal, Mapping

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance, poly_mmd
from torchmetrics.utilities.data import dim_zero_cat

from sdxl_core.errors import InvalidConfigError
from sdxl_core.metrics.meta import MetricInfo

SET_METRICS = ("fid", "kid", "cmmd")
CMMD_SIGMA = 10.0
CMMD_SCALE = 1000.0


@dataclass
class SetMetricResult:
    """One set-metric value with what is needed to read it: sizes, warnings, protocol and metric metadata.

    ``info`` is :meth:`MetricInfo.as_dict` (plain data, so the result survives torchmetrics' compute wrapper and
    JSON); ``std`` is the spread over KID subsets (None for FID and CMMD).
    """

    name: str
    value: float
    n_real: int
    n_fake: int
    warnings: list[str] = field(default_factory=list)
    protocol: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    std: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def set_metric_info(metric: str, network: str | None = None, *, against: str = "reference") -> MetricInfo:
    """The :class:`MetricInfo` of ``metric`` (``fid``/``kid``/``cmmd``) on feature network ``network``.

    ``network="effnet-lite0"`` labels the value as not comparable to Inception FID/KID; ``against="baseline"``
    (set compared with the baseline variant instead of real images) adds ``"shift from baseline"``.
    """
    if metric not in SET_METRICS:
        raise InvalidConfigError(f"set metric {metric!r} is unknown; choose one of {', '.join(SET_METRICS)}")
    if against not in ("reference", "baseline"):
        raise InvalidConfigError(f"against={against!r}: use 'reference' (real images) or 'baseline'")
    labels = []
    feats = {"inception": "Inception-v3 pool3", "effnet-lite0": "EfficientNet-Lite0 pooled"}.get(
        network or "", network or "the given")
    if metric == "cmmd":
        display, desc = "CMMD", (f"{CMMD_SCALE:g} x MMD^2, Gaussian RBF kernel (sigma {CMMD_SIGMA:g}) on "
                                 "L2-normalized CLIP image embeddings")
    elif metric == "fid":
        display, desc = "FID", f"Frechet distance between Gaussian fits of {feats} features"
    else:
        display, desc = "KID", f"unbiased MMD^2, cubic polynomial kernel on {feats} features, mean over subsets"
    if metric != "cmmd" and network == "effnet-lite0":
        display += " (effnet-lite0)"
        labels.append(f"effnet-lite0 features (not comparable to Inception {metric.upper()})")
    if against == "baseline":
        labels.append("shift from baseline")
    return MetricInfo(name=metric, display_name=display, higher_is_better=False, kind="set", description=desc,
                      label="; ".join(labels) or None)


def sample_size_warning(n_images: int, dim: int, metric: str) -> str | None:
    """A warning when ``n_images`` is too few for ``metric`` on ``dim``-d features, else None.

    FID needs ``n_images > dim`` for a full-rank covariance; below that it is rank-deficient: dominated by
    estimation bias, larger for smaller sets and not comparable across set sizes. KID and CMMD are unbiased and
    have no such threshold (only ``n_images >= 2``).
    """
    metric = metric.lower()
    if metric not in SET_METRICS:
        raise InvalidConfigError(f"set metric {metric!r} is unknown; choose one of {', '.join(SET_METRICS)}")
    if n_images < 2:
        return f"{metric.upper()} needs at least 2 images per set, got {n_images}"
    if metric == "fid" and n_images <= dim:
        return (f"FID on {n_images} images with {dim}-d features is rank-deficient (covariance rank <= "
                f"{n_images - 1} < {dim}): the value is dominated by estimation bias, grows as the set shrinks "
                f"and is not comparable across set sizes; use KID or CMMD (unbiased) for sets this small, or at "
                f"least compare FIDs only at equal set sizes (> {dim} images for a full-rank covariance)")
    return None


def _as_features(features: Any, dim: int | None, where: str) -> Tensor:
    """``features`` as a float64 ``(N, dim)`` CPU tensor, checked."""
    if isinstance(features, np.ndarray):
        features = torch.from_numpy(np.ascontiguousarray(features))
    if not isinstance(features, Tensor) or not features.is_floating_point():
        raise InvalidConfigError(f"{where}: expected a float tensor or array of features, got "
                                 f"{getattr(features, 'dtype', type(features).__name__)}")
    if features.dim() == 1:
        features = features.unsqueeze(0)
    if features.dim() != 2 or (dim is not None and features.shape[1] != dim):
        raise InvalidConfigError(f"{where}: expected features of shape (N, {dim if dim is not None else 'D'}), got "
                                 f"{tuple(features.shape)}; use the same feature network for both sets")
    features = features.detach().to("cpu", torch.float64)
    if not torch.isfinite(features).all():
        raise InvalidConfigError(f"{where}: features contain NaN or inf; check the images and the network")
    return features


class _NoNetwork(nn.Module):
    """Placeholder network of a metric fed with precomputed features only."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_features = self.dim = int(dim)

    def forward(self, imgs: Tensor) -> Tensor:
        raise InvalidConfigError("this metric was built without a feature network: pass features with "
                                 "update_features(), or build it with a FeatureNetwork to feed images")


def _network_and_protocol(metric: str, feature_network: nn.Module | None, dim: int | None,
                          protocol: Mapping[str, Any] | None) -> tuple[nn.Module, int, dict[str, Any]]:
    if feature_network is None:
        if dim is None or int(dim) < 1:
            raise InvalidConfigError(f"{metric.upper()}: pass a feature_network, or dim=D to feed features of "
                                     "dimension D with update_features()")
        return _NoNetwork(int(dim)), int(dim), dict(protocol or {})
    net_dim = int(getattr(feature_network, "dim", getattr(feature_network, "num_features", 0)))
    if net_dim < 1 or (dim is not None and int(dim) != net_dim):
        raise InvalidConfigError(f"{metric.upper()}: the feature network has dim {net_dim or 'unknown'} but dim={dim} "
                                 "was passed; leave dim unset with a FeatureNetwork")
    return feature_network, net_dim, dict(protocol or getattr(feature_network, "protocol", {}))


def _check_update(metric: str, imgs: Any, real: Any, features: Any) -> None:
    """The arguments every set metric's ``update`` takes: one side, and images or features (not both)."""
    if not isinstance(real, bool):
        raise InvalidConfigError(f"{metric}.update: pass real=True (reference images) or real=False (generated)")
    if (imgs is None) == (features is None):
        raise InvalidConfigError(f"{metric}.update: pass exactly one of imgs and features")


def psd_eigh(sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (negative round-off clipped to 0) and eigenvectors of a symmetric PSD matrix, float64."""
    sigma = sigma.to(torch.float64)
    w, v = torch.linalg.eigh((sigma + sigma.T) / 2)
    return w.clamp(min=0), v


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor, *,
                     eigh1: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """``||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2)`` in float64 (clamped at 0).

    With ``S1 = V diag(w) V^T`` (:func:`psd_eigh`, or ``eigh1`` when already known), ``S1^1/2 S2 S1^1/2`` is
    similar to the symmetric PSD ``diag(w)^1/2 (V^T S2 V) diag(w)^1/2``, whose eigenvalues come from
    ``eigvalsh``; clipping round-off negatives to 0 keeps rank-deficient covariances well defined.
    """
    mu1, mu2, sigma1, sigma2 = (t.to(torch.float64) for t in (mu1, mu2, sigma1, sigma2))
    w, v = psd_eigh(sigma1) if eigh1 is None else eigh1
    root_w = w.sqrt()
    inner = root_w[:, None] * (v.T @ sigma2 @ v) * root_w[None, :]
    trace_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    value = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return value.clamp(min=0)


class FID(FrechetInceptionDistance):
    """Frechet distance between the real and fake feature distributions (torchmetrics FID state, float64).

    Args:
        feature_network: a :class:`~sdxl_core.metrics.features.FeatureNetwork` (or any module with ``dim``);
            None to feed features only, then ``dim`` is required.
        dim: feature dimension when there is no network.
        protocol: recorded in results (default: the network's protocol).
        reset_real_features: False keeps the real (reference) statistics across ``reset()``.
    """

    higher_is_better = False

    def __init__(self, feature_network: nn.Module | None = None, *, dim: int | None = None,
                 protocol: Mapping[str, Any] | None = None, reset_real_features: bool = True,
                 **kwargs: Any) -> None:
        net, self.dim, self.protocol = _network_and_protocol("fid", feature_network, dim, protocol)
        super().__init__(feature=net, reset_real_features=reset_real_features, normalize=False, **kwargs)
        self.network_name = getattr(feature_network, "name", None) or self.protocol.get("network")

    @property
    def info(self) -> MetricInfo:
        return set_metric_info("fid", self.network_name)

    def update(self, imgs: Tensor | None = None, real: bool | None = None, *, features: Any = None) -> None:
        """Add a batch of images (through the network) or of precomputed ``features`` to one side."""
        _check_update("FID", imgs, real, features)
        feats = _as_features(self.inception(imgs) if features is None else features, self.dim, "FID features")
        side = "real" if real else "fake"
        setattr(self, f"{side}_features_sum", getattr(self, f"{side}_features_sum") + feats.sum(dim=0))
        setattr(self, f"{side}_features_cov_sum", getattr(self, f"{side}_features_cov_sum") + feats.T @ feats)
        setattr(self, f"{side}_features_num_samples", getattr(self, f"{side}_features_num_samples") + feats.shape[0])

    def update_features(self, features: Any, real: bool) -> None:
        """Add precomputed ``(N, dim)`` features (tensor or array) to the real or fake side."""
        self.update(real=real, features=features)

    def _mean_cov(self, side: str) -> tuple[Tensor, Tensor]:
        n = getattr(self, f"{side}_features_num_samples").to(torch.float64)
        mean = getattr(self, f"{side}_features_sum") / n
        cov = (getattr(self, f"{side}_features_cov_sum") - n * torch.outer(mean, mean)) / (n - 1)
        return mean, cov

    def compute(self) -> SetMetricResult:  # type: ignore[override]
        n_real, n_fake = int(self.real_features_num_samples), int(self.fake_features_num_samples)
        if n_real < 2 or n_fake < 2:
            raise InvalidConfigError(f"FID needs at least 2 real and 2 fake images, got {n_real} real and "
                                     f"{n_fake} fake; add images (or use the reference set)")
        mean_real, cov_real = self._mean_cov("real")
        cached = getattr(self, "_real_eigh_cache", None)  # reused while the real side is unchanged
        if cached is None or not torch.equal(cached[0], cov_real):
            cached = (cov_real.clone(), psd_eigh(cov_real))
            self._real_eigh_cache = cached
        value = frechet_distance(mean_real, cov_real, *self._mean_cov("fake"), eigh1=cached[1])
        warning = sample_size_warning(min(n_real, n_fake), self.dim, "fid")
        return SetMetricResult("fid", float(value), n_real, n_fake, [warning] if warning else [],
                               {"features": self.protocol, "dim": self.dim,
                                "estimator": "Frechet distance of Gaussian fits (mean, covariance with n-1)"},
                               self.info.as_dict())


class KID(KernelInceptionDistance):
    """Kernel (Inception) distance: unbiased polynomial-kernel MMD^2 over seeded random subsets.

    Args:
        feature_network / dim / protocol / reset_real_features: as for :class:`FID`.
        subsets, subset_size, degree, gamma, coef: torchmetrics' KID options (``gamma`` None -> ``1/dim``).
        seed: seeds the subset sampling, so a result is reproducible.
    """

    higher_is_better = False

    def __init__(self, feature_network: nn.Module | None = None, *, dim: int | None = None,
                 protocol: Mapping[str, Any] | None = None, subsets: int = 100, subset_size: int = 1000,
                 degree: int = 3, gamma: float | None = None, coef: float = 1.0, seed: int = 0,
                 reset_real_features: bool = True, **kwargs: Any) -> None:
        net, self.dim, self.protocol = _network_and_protocol("kid", feature_network, dim, protocol)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
                super().__init__(feature=net, subsets=subsets, subset_size=subset_size, degree=degree, gamma=gamma,
                                 coef=float(coef), reset_real_features=reset_real_features, **kwargs)
        except ValueError as exc:
            raise InvalidConfigError(f"KID: {exc}") from None
        self.seed = int(seed)
        self.network_name = getattr(feature_network, "name", None) or self.protocol.get("network")

    @property
    def info(self) -> MetricInfo:
        return set_metric_info("kid", self.network_name)

    def update(self, imgs: Tensor | None = None, real: bool | None = None, *, features: Any = None) -> None:
        """Add a batch of images (through the network) or of precomputed ``features`` to one side."""
        _check_update("KID", imgs, real, features)
        feats = _as_features(self.inception(imgs) if features is None else features, self.dim, "KID features")
        (self.real_features if real else self.fake_features).append(feats)

    def update_features(self, features: Any, real: bool) -> None:
        """Add precomputed ``(N, dim)`` features (tensor or array) to the real or fake side."""
        self.update(real=real, features=features)

    def compute(self) -> SetMetricResult:  # type: ignore[override]
        real = dim_zero_cat(self.real_features) if self.real_features else torch.zeros(0, self.dim)
        fake = dim_zero_cat(self.fake_features) if self.fake_features else torch.zeros(0, self.dim)
        n_real, n_fake = real.shape[0], fake.shape[0]
        if n_real < 2 or n_fake < 2:
            raise InvalidConfigError(f"KID needs at least 2 real and 2 fake images, got {n_real} real and "
                                     f"{n_fake} fake; add images (or use the reference set)")
        size = min(self.subset_size, n_real, n_fake)
        subsets = 1 if size == n_real == n_fake else self.subsets
        gen = torch.Generator().manual_seed(self.seed)
        scores = []
        for _ in range(subsets):
            r = real[torch.randperm(n_real, generator=gen)[:size]]
            f = fake[torch.randperm(n_fake, generator=gen)[:size]]
            scores.append(poly_mmd(r, f, self.degree, self.gamma, self.coef))
        values = torch.stack(scores)
        warning = sample_size_warning(min(n_real, n_fake), self.dim, "kid")
        protocol = {"features": self.protocol, "dim": self.dim, "subsets": subsets, "subset_size": size,
                    "seed": self.seed, "kernel": f"(gamma x.y + {self.coef:g})^{self.degree}, gamma "
                    f"{self.gamma if self.gamma is not None else f'1/{self.dim}'}",
                    "estimator": "unbiased MMD^2 (diagonal excluded), mean and std over subsets"}
        return SetMetricResult("kid", float(values.mean()), n_real, n_fake, [warning] if warning else [], protocol,
                               self.info.as_dict(), std=float(values.std(unbiased=False)))


def _rbf_sum(x: Tensor, y: Tensor, gamma: float, exclude_diagonal: bool, block: int) -> Tensor:
    """Sum of ``exp(-gamma ||x_i - y_j||^2)`` over all pairs (``i != j`` if ``exclude_diagonal``), in row blocks."""
    total = torch.zeros((), dtype=torch.float64)
    y_sq = y.square().sum(dim=1)
    for start in range(0, x.shape[0], block):
        xb = x[start:start + block]
        d2 = (xb.square().sum(dim=1, keepdim=True) + y_sq[None, :] - 2 * xb @ y.T).clamp_(min=0)
        k = torch.exp(-gamma * d2)
        if exclude_diagonal:
            k.diagonal(offset=start).zero_()
        total += k.sum()
    return total


def kid_all_pairs(real: Any, fake: Any, degree: int = 3, gamma: float | None = None, coef: float = 1.0) -> float:
    """KID as one unbiased polynomial-kernel MMD^2 over all images, for sets of any two sizes (m real, n fake):
    ``sum_{i!=j} k(x_i, x_j) / (m(m-1)) + sum_{i!=j} k(y_i, y_j) / (n(n-1)) - 2 sum k(x_i, y_j) / (mn)`` with
    ``k(a, b) = (gamma a.b + coef)^degree``, ``gamma = 1/dim``: the estimator :class:`KID` averages over subsets,
    computed once on everything (no subset sampling), so it is cheap enough to bootstrap. Equal to
    :class:`KID` when both sets have the same size (one subset)."""
    x, y = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise InvalidConfigError(f"KID needs at least 2 real and 2 fake images, got {m} real and {n} fake; add images")
    g = 1.0 / x.shape[1] if gamma is None else gamma
    kxx, kyy, kxy = ((g * x @ x.T + coef) ** degree, (g * y @ y.T + coef) ** degree, (g * x @ y.T + coef) ** degree)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2.0 * kxy.sum() / (m * n))


def mmd_rbf(x: Any, y: Any, *, sigma: float = CMMD_SIGMA, scale: float = CMMD_SCALE,
            estimator: Literal["unbiased", "biased"] = "unbiased", block: int = 1024) -> float:
    """``scale * MMD^2`` between the rows of ``x`` (m, D) and ``y`` (n, D), Gaussian RBF kernel, float64.

    ``unbiased``: ``Sxx/(m(m-1)) + Syy/(n(n-1)) - 2 Sxy/(mn)`` with the diagonals excluded from ``Sxx``, ``Syy``;
    ``biased``: means over the full kernel matrices (google-research cmmd ``distance.mmd``).
    """
    if estimator not in ("unbiased", "biased"):
        raise InvalidConfigError(f"estimator {estimator!r}: use 'unbiased' or 'biased'")
    x, y = _as_features(x, None, "MMD x"), _as_features(y, None, "MMD y")
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2 or x.shape[1] != y.shape[1]:
        raise InvalidConfigError(f"MMD needs two sets of >= 2 embeddings of equal dimension, got {tuple(x.shape)} "
                                 f"and {tuple(y.shape)}")
    gamma = 1.0 / (2.0 * sigma**2)
    unbiased = estimator == "unbiased"
    k_xx = _rbf_sum(x, x, gamma, unbiased, block) / (m * (m - 1) if unbiased else m * m)
    k_yy = _rbf_sum(y, y, gamma, unbiased, block) / (n * (n - 1) if unbiased else n * n)
    k_xy = _rbf_sum(x, y, gamma, False, block) / (m * n)
    return float(scale * (k_xx + k_yy - 2 * k_xy))


class CMMD(Metric):
    """CLIP-MMD (Jayasumana et al. 2024): ``1000 x MMD^2``, Gaussian RBF (sigma 10), unbiased by default.

    Args:
        embedder: callable images -> ``(N, D)`` CLIP image embeddings (None: feed embeddings with
            ``update_features``).
        sigma, scale: kernel bandwidth and output scale (paper: 10 and 1000).
        estimator: ``"unbiased"`` (default, diagonal excluded) or ``"biased"`` (the reference implementation).
        normalize: L2-normalize embeddings (the reference's CLIP embeddings are unit norm; a no-op for those).
        protocol: recorded in results (e.g. the CLIP model and pretrained tag).
        reset_real_features: False keeps the real (reference) embeddings across ``reset()``.
    """

    higher_is_better = False
    is_differentiable = False
    full_state_update = False
    real_embeddings: list[Tensor]
    fake_embeddings: list[Tensor]

    def __init__(self, embedder: Callable[[Tensor], Any] | None = None, *, sigma: float = CMMD_SIGMA,
                 scale: float = CMMD_SCALE, estimator: Literal["unbiased", "biased"] = "unbiased",
                 normalize: bool = True, protocol: Mapping[str, Any] | None = None,
                 reset_real_features: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if estimator not in ("unbiased", "biased"):
            raise InvalidConfigError(f"CMMD estimator {estimator!r}: use 'unbiased' or 'biased'")
        if not sigma > 0:
            raise InvalidConfigError(f"CMMD sigma {sigma}: must be > 0 (the paper uses 10)")
        self.embedder = embedder
        self.sigma, self.scale, self.estimator, self.normalize = float(sigma), float(scale), estimator, normalize
        self.protocol = dict(protocol or getattr(embedder, "protocol", {}) or {})
        self.reset_real_features = reset_real_features
        self.add_state("real_embeddings", [], dist_reduce_fx="cat")
        self.add_state("fake_embeddings", [], dist_reduce_fx="cat")

    @property
    def info(self) -> MetricInfo:
        return set_metric_info("cmmd")

    def update(self, imgs: Tensor | None = None, real: bool | None = None, *, features: Any = None) -> None:
        """Add a batch of images (through the embedder) or of precomputed embeddings to one side."""
        _check_update("CMMD", imgs, real, features)
        if features is None:
            if self.embedder is None:
                raise InvalidConfigError("CMMD was built without an embedder: pass embeddings with "
                                         "update_features(), or build it with embedder=<CLIP image embedder>")
            features = self.embedder(imgs)
        previous = self.real_embeddings + self.fake_embeddings
        emb = _as_features(features, previous[0].shape[1] if previous else None, "CMMD embeddings")
        if self.normalize:
            emb = emb / emb.norm(dim=1, keepdim=True).clamp(min=1e-12)
        (self.real_embeddings if real else self.fake_embeddings).append(emb)

    def update_features(self, features: Any, real: bool) -> None:
        """Add precomputed ``(N, D)`` embeddings (tensor or array) to the real or fake side."""
        self.update(real=real, features=features)

    def compute(self) -> SetMetricResult:
        n_real = sum(e.shape[0] for e in self.real_embeddings) if self.real_embeddings else 0
        n_fake = sum(e.shape[0] for e in self.fake_embeddings) if self.fake_embeddings else 0
        if n_real < 2 or n_fake < 2:
            raise InvalidConfigError(f"CMMD needs at least 2 real and 2 fake images, got {n_real} real and "
                                     f"{n_fake} fake; add images (or use the reference set)")
        real, fake = dim_zero_cat(self.real_embeddings), dim_zero_cat(self.fake_embeddings)
        value = mmd_rbf(real, fake, sigma=self.sigma, scale=self.scale, estimator=self.estimator)
        protocol = {"embeddings": self.protocol, "dim": int(real.shape[1]), "sigma": self.sigma,
                    "scale": self.scale, "normalize": "L2 (unit norm)" if self.normalize else "none",
                    "estimator": "unbiased MMD^2 (diagonal excluded)" if self.estimator == "unbiased"
                    else "biased MMD^2 (full means, as google-research cmmd)"}
        return SetMetricResult("cmmd", value, n_real, n_fake, [], protocol, self.info.as_dict())

    def reset(self) -> None:
        if self.reset_real_features:
            super().reset()
            return
        kept = list(self.real_embeddings)
        super().reset()
        self.real_embeddings = kept
