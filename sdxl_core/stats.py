"""Paired statistics between variants: bootstrap intervals, verdicts and sample-size warnings.

The variants of a run (``baseline``, ``wrong_negative``, ``wrong_lora``, user-declared ones) are rendered on the
same prompts and seeds, so two variants are compared *pairwise*: image ``i`` of one variant and image ``i`` of
the other share a (prompt, seed).

* :func:`paired_difference` compares a per-image metric (e.g. CLIP score): the mean of the per-pair
  differences, with a percentile bootstrap interval over pairs.
* :func:`set_metric_difference` compares a set metric (FID/KID/CMMD) that scores each variant's image set
  against a common target set (real images, or the baseline variant for "shift from baseline" metrics): the
  difference of the two scores, with a percentile bootstrap interval over images.

Conventions shared by both:

* **Direction.** Every difference is **candidate minus reference** (``b - a``). Whether a positive difference is
  good is the metric's ``higher_is_better`` (see :class:`sdxl_core.metrics.meta.MetricInfo`).
* **Interval.** Percentile bootstrap (the ``alpha/2`` and ``1 - alpha/2`` quantiles of the resampled
  statistic, numpy's default linear interpolation). No BCa: with the pair counts the harness uses the percentile
  interval's coverage is close to nominal (see ``tests/test_stats.py``), and BCa's jackknife would cost N extra
  metric evaluations for set metrics.
* **Verdict.** ``"better"`` / ``"worse"`` when the interval excludes 0 (the candidate's side decided by the metric
  direction), else ``"no significant difference"``. With the default 95 % level this is a two-sided test at
  5 % per comparison, with no correction for multiple comparisons.
* **Determinism.** All randomness comes from ``numpy.random.default_rng(seed)``: the same inputs and seed give
  the same interval, bit for bit, on any machine with the same numpy.

Nothing here runs at import time.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

from sdxl_core.errors import InvalidConfigError

__all__ = [
    "BETTER", "WORSE", "NO_DIFFERENCE", "MIN_RESAMPLES", "LOW_POWER_PAIRS",
    "Comparison", "paired_difference", "set_metric_difference", "sample_size_warnings", "decide_verdict",
]

BETTER = "better"
WORSE = "worse"
NO_DIFFERENCE = "no significant difference"
Verdict = Literal["better", "worse", "no significant difference"]

MIN_RESAMPLES = 1000
"""Fewest bootstrap resamples accepted: below this the 2.5 % / 97.5 % quantiles rest on < 25 draws each."""

LOW_POWER_PAIRS = 10
"""Below this many pairs (or images per set) a comparison gets a low-power warning."""

_CHUNK_ELEMENTS = 1 << 22  # resampled values held at once by the vectorised bootstrap (~32 MiB of float64)
_MAX_NAMED_KEYS = 10  # keys listed in an error message before "... and N more"


@dataclass(frozen=True)
class Comparison:
    """One comparison of a candidate variant against a reference variant on one metric.

    ``estimate`` is candidate minus reference: the mean per-pair difference for per-image metrics, the
    difference of the two set-metric values for set metrics. ``reference_value`` / ``candidate_value`` are the
    per-variant means (per-image) or set-metric values (set). ``diff_std`` is the sample standard deviation of
    the per-pair differences (per-image only, else ``None``); ``bootstrap_se`` the standard deviation of the
    bootstrap distribution of ``estimate``. ``p_value`` is secondary information from a classical test named in
    ``method`` (``None`` when not computed or undefined, e.g. all differences zero); the verdict comes from the
    interval only. ``n`` counts the pairs used (after dropping non-finite ones, counted in ``n_dropped``) for
    per-image metrics, and the candidate's images for set metrics.
    """

    metric: str
    reference: str
    candidate: str
    n: int
    estimate: float
    ci_low: float
    ci_high: float
    confidence: float
    n_resamples: int
    seed: int
    verdict: Verdict
    higher_is_better: bool
    method: str
    reference_value: float
    candidate_value: float
    bootstrap_se: float
    diff_std: float | None = None
    p_value: float | None = None
    n_dropped: int = 0
    warnings: tuple[str, ...] = ()

    @property
    def significant(self) -> bool:
        """Whether the interval excludes zero (the verdict is ``"better"`` or ``"worse"``)."""
        return self.verdict != NO_DIFFERENCE

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict: plain Python types, ``warnings`` as a list, non-finite floats as ``None``."""
        out: dict[str, Any] = {}
        for name, value in asdict(self).items():
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, float) and not math.isfinite(value):
                value = None
            out[name] = value
        out["significant"] = self.significant
        return out


def decide_verdict(ci_low: float, ci_high: float, *, higher_is_better: bool) -> Verdict:
    """Verdict for a candidate-minus-reference interval: it must exclude 0 to be ``better`` or ``worse``."""
    if ci_low > 0:
        return BETTER if higher_is_better else WORSE
    if ci_high < 0:
        return WORSE if higher_is_better else BETTER
    return NO_DIFFERENCE


def sample_size_warnings(metric_name: str, n_images: int, feature_dim: int | None = None, *,
                         kid_subset_size: int | None = None) -> list[str]:
    """Warnings about a sample too small for a metric; an empty list when the sample is adequate.

    ``metric_name`` is matched case-insensitively: a name containing ``"fid"`` / ``"kid"`` / ``"cmmd"`` gets that
    metric's checks. ``feature_dim`` ``None`` means a per-image metric compared over ``n_images`` pairs; an
    integer means a set metric on ``n_images`` images per set with ``feature_dim``-dimensional features.

    Checks:

    * any metric with fewer than :data:`LOW_POWER_PAIRS` pairs/images: low power, intervals will be wide;
    * FID with ``n_images <= feature_dim``: the feature covariance has rank at most ``n_images - 1 < feature_dim``,
      so the matrix square root in FID is ill-conditioned and the value is dominated by estimation error;
      points to KID or CMMD, which have no covariance to estimate;
    * KID with ``kid_subset_size > n_images``: subsets cannot be drawn (torchmetrics refuses);
    * KID/CMMD with fewer than 2 images: their unbiased MMD estimate needs at least two per set.
    """
    name = metric_name.lower()
    label = metric_name or "metric"
    out: list[str] = []
    if n_images < LOW_POWER_PAIRS:
        what = "pairs" if feature_dim is None else "images per set"
        out.append(f"{label}: only {n_images} {what} (< {LOW_POWER_PAIRS}): low power, the interval will be wide "
                   "and 'no significant difference' says little; render more prompts or seeds")
    if feature_dim is not None and "fid" in name and n_images <= feature_dim:
        out.append(f"{label}: {n_images} images with {feature_dim}-dimensional features: the feature covariance "
                   f"has rank at most {max(n_images - 1, 0)} < {feature_dim} (rank-deficient), so FID is unstable "
                   f"and biased at this sample size; use KID or CMMD for small sets, or render more than "
                   f"{feature_dim} images per variant for FID")
    if "kid" in name and kid_subset_size is not None and kid_subset_size > n_images:
        out.append(f"{label}: KID subset_size={kid_subset_size} exceeds the {n_images} images per set; "
                   f"set subset_size <= {n_images} or render more images")
    if ("kid" in name or "cmmd" in name) and n_images < 2:
        out.append(f"{label}: {n_images} image(s) per set: the unbiased MMD estimate needs at least 2")
    return out


# ---------------------------------------------------------------------------------------------------- helpers

def _check_common(n_resamples: int, confidence: float, seed: int, *, allow_few: bool | None) -> None:
    """Validate the shared settings; ``allow_few`` ``None``: fewer than MIN_RESAMPLES is never allowed."""
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise InvalidConfigError(f"n_resamples={n_resamples!r}: pass a positive integer (at least {MIN_RESAMPLES})")
    if n_resamples < MIN_RESAMPLES and not allow_few:
        raise InvalidConfigError(
            f"n_resamples={n_resamples} is below the minimum of {MIN_RESAMPLES}: the interval's tail quantiles would "
            f"rest on too few draws; pass n_resamples >= {MIN_RESAMPLES}"
            + (" (or allow_few_resamples=True for a quick, flagged look)" if allow_few is not None else ""))
    if not (isinstance(confidence, (float, int)) and 0.0 < float(confidence) < 1.0):
        raise InvalidConfigError(f"confidence={confidence!r}: pass a level strictly between 0 and 1, e.g. 0.95")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InvalidConfigError(f"seed={seed!r}: pass a non-negative integer")


def _as_1d(values: Any, what: str) -> np.ndarray:
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InvalidConfigError(f"{what}: values must be numbers ({exc}); pass a sequence of floats") from None
    if arr.ndim != 1:
        raise InvalidConfigError(f"{what}: expected a 1-d sequence of per-image values, got shape {arr.shape}")
    return arr


def _name_keys(keys: Sequence[Hashable]) -> str:
    shown = ", ".join(repr(k) for k in list(keys)[:_MAX_NAMED_KEYS])
    extra = len(keys) - _MAX_NAMED_KEYS
    return shown + (f", ... and {extra} more" if extra > 0 else "")


def _check_unique(keys: Sequence[Hashable], what: str) -> dict[Hashable, int]:
    index: dict[Hashable, int] = {}
    dups: list[Hashable] = []
    for i, k in enumerate(keys):
        if k in index:
            dups.append(k)
        index[k] = i
    if dups:
        raise InvalidConfigError(f"{what}: duplicate keys {_name_keys(dups)}; each (prompt, seed) key must occur once")
    return index


def _align(a: Any, b: Any, keys: Sequence[Hashable] | None, b_keys: Sequence[Hashable] | None,
           ) -> tuple[np.ndarray, np.ndarray, list[Hashable] | None]:
    """Return the paired value arrays (and the keys in pairing order, when known)."""
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        if not (isinstance(a, Mapping) and isinstance(b, Mapping)):
            raise InvalidConfigError("a and b: pass both as {key: value} mappings, or both as sequences")
        if keys is not None or b_keys is not None:
            raise InvalidConfigError("keys/b_keys: not used with {key: value} mappings; drop them")
        keys, b_keys = list(a.keys()), list(b.keys())
        a, b = list(a.values()), list(b.values())
    av, bv = _as_1d(a, "a (reference)"), _as_1d(b, "b (candidate)")
    if keys is None:
        if b_keys is not None:
            raise InvalidConfigError("b_keys given without keys: pass keys for a as well")
        if len(av) != len(bv):
            raise InvalidConfigError(
                f"a has {len(av)} values and b has {len(bv)}: paired comparison needs one value per (prompt, seed) "
                "in each; pass equal-length sequences in the same order, or keys/b_keys to align them")
        return av, bv, None
    keys = list(keys)
    b_keys = keys if b_keys is None else list(b_keys)
    if len(keys) != len(av) or len(b_keys) != len(bv):
        raise InvalidConfigError(f"keys: {len(keys)} keys for {len(av)} reference values and {len(b_keys)} keys for "
                                 f"{len(bv)} candidate values; pass one key per value")
    a_index = _check_unique(keys, "keys (reference)")
    b_index = _check_unique(b_keys, "b_keys (candidate)")
    only_a = [k for k in keys if k not in b_index]
    only_b = [k for k in b_keys if k not in a_index]
    if only_a or only_b:
        parts = []
        if only_a:
            parts.append(f"{len(only_a)} key(s) only in the reference: {_name_keys(only_a)}")
        if only_b:
            parts.append(f"{len(only_b)} key(s) only in the candidate: {_name_keys(only_b)}")
        raise InvalidConfigError("unpaired keys: " + "; ".join(parts) + ". Both variants must be scored on the same "
                                 "(prompt, seed) images: re-render the missing ones or drop them from both")
    order = np.array([b_index[k] for k in keys], dtype=np.intp)
    return av, bv[order], keys


def _percentile_ci(boot: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def _bootstrap_means(d: np.ndarray, n_resamples: int, rng: np.random.Generator) -> np.ndarray:
    """Means of ``n_resamples`` resamples (with replacement) of ``d``, vectorised in memory-bounded chunks."""
    n = len(d)
    rows = max(1, _CHUNK_ELEMENTS // n)
    out = np.empty(n_resamples, dtype=np.float64)
    for start in range(0, n_resamples, rows):
        stop = min(start + rows, n_resamples)
        idx = rng.integers(0, n, size=(stop - start, n), dtype=np.int32 if n < 2**31 else np.int64)
        out[start:stop] = d[idx].mean(axis=1)
    return out


def _p_value(d: np.ndarray, test: str) -> float | None:
    if test == "none" or len(d) < 2 or not np.any(d):
        return None
    from scipy import stats as sps  # lazy: keeps the import of this module cheap

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if test == "wilcoxon":
                p = sps.wilcoxon(d).pvalue
            else:
                p = sps.ttest_1samp(d, 0.0).pvalue
        except ValueError:
            return None
    p = float(p)
    return p if math.isfinite(p) else None


# ------------------------------------------------------------------------------------------------ comparisons

def paired_difference(a: Sequence[float] | Mapping[Hashable, float], b: Sequence[float] | Mapping[Hashable, float],
                      *, keys: Sequence[Hashable] | None = None, b_keys: Sequence[Hashable] | None = None,
                      higher_is_better: bool, n_resamples: int = 10000, confidence: float = 0.95, seed: int = 0,
                      metric: str = "", reference: str = "reference", candidate: str = "candidate",
                      nan_policy: Literal["drop", "raise"] = "drop",
                      p_value_test: Literal["wilcoxon", "t", "none"] = "wilcoxon") -> Comparison:
    """Compare a per-image metric between two variants, pairwise per (prompt, seed).

    ``a`` holds the **reference** variant's values, ``b`` the **candidate**'s; the estimate is the mean of
    ``b - a`` (candidate minus reference) and its interval a percentile bootstrap over pairs (``n_resamples``
    resamples, at least :data:`MIN_RESAMPLES`, drawn from ``default_rng(seed)``).

    Pairing: by position (``a[i]`` with ``b[i]``); or by key, with ``keys`` naming ``a``'s values (e.g.
    ``(prompt_index, seed)`` tuples) and ``b_keys`` ``b``'s (``keys`` alone: both share that order, and keys are
    only checked for duplicates); or pass ``a`` and ``b`` as ``{key: value}`` mappings. A key on one side only
    is an :class:`InvalidConfigError` naming it.

    Non-finite values (NaN/inf, e.g. a broken image the harness flagged separately): with ``nan_policy="drop"``
    (default) the pairs with one are dropped and a warning records how many; ``"raise"`` refuses them.

    ``p_value`` is secondary: the Wilcoxon signed-rank test (default; ``p_value_test="t"`` for a one-sample t-test
    on the differences, ``"none"`` to skip). The verdict comes from the bootstrap interval only.
    """
    _check_common(n_resamples, confidence, seed, allow_few=None)
    if nan_policy not in ("drop", "raise"):
        raise InvalidConfigError(f"nan_policy={nan_policy!r}: pass 'drop' or 'raise'")
    if p_value_test not in ("wilcoxon", "t", "none"):
        raise InvalidConfigError(f"p_value_test={p_value_test!r}: pass 'wilcoxon', 't' or 'none'")
    av, bv, pair_keys = _align(a, b, keys, b_keys)
    label = metric or "metric"
    notes: list[str] = []

    bad = ~(np.isfinite(av) & np.isfinite(bv))
    n_dropped = int(bad.sum())
    if n_dropped:
        where = np.flatnonzero(bad)
        named = [pair_keys[i] for i in where] if pair_keys is not None else [int(i) for i in where]
        what = "keys" if pair_keys is not None else "indices"
        if nan_policy == "raise":
            raise InvalidConfigError(f"{label}: {n_dropped} pair(s) with a non-finite value at {what} "
                                     f"{_name_keys(named)}; fix or exclude those images, or pass nan_policy='drop'")
        notes.append(f"{label}: dropped {n_dropped} of {len(av)} pair(s) with a non-finite value "
                     f"({what} {_name_keys(named)})")
        av, bv = av[~bad], bv[~bad]
    n = len(av)
    if n < 2:
        raise InvalidConfigError(f"{label}: {n} usable pair(s) (after dropping {n_dropped} non-finite); "
                                 "a paired comparison needs at least 2: render more prompts or seeds")
    notes.extend(sample_size_warnings(metric, n, None))

    d = bv - av
    estimate = float(d.mean())
    boot = _bootstrap_means(d, n_resamples, np.random.default_rng(seed))
    ci_low, ci_high = _percentile_ci(boot, confidence)
    test_name = {"wilcoxon": "Wilcoxon signed-rank", "t": "one-sample t-test on the differences",
                 "none": "not computed"}[p_value_test]
    return Comparison(
        metric=metric, reference=reference, candidate=candidate, n=n, estimate=estimate,
        ci_low=ci_low, ci_high=ci_high, confidence=float(confidence), n_resamples=int(n_resamples), seed=int(seed),
        verdict=decide_verdict(ci_low, ci_high, higher_is_better=higher_is_better),
        higher_is_better=bool(higher_is_better),
        method=f"paired percentile bootstrap of the mean difference (candidate - reference); p-value: {test_name}",
        reference_value=float(av.mean()), candidate_value=float(bv.mean()), bootstrap_se=float(boot.std(ddof=1)),
        diff_std=float(d.std(ddof=1)), p_value=_p_value(d, p_value_test), n_dropped=n_dropped,
        warnings=tuple(notes))


def _as_features(x: Any, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.number):
        raise InvalidConfigError(f"{what}: expected a numeric (N, D) feature array, got shape {arr.shape}, "
                                 f"dtype {arr.dtype}")
    if len(arr) < 2:
        raise InvalidConfigError(f"{what}: {len(arr)} image(s); a set metric needs at least 2 per set")
    if not np.all(np.isfinite(arr)):
        raise InvalidConfigError(f"{what}: non-finite feature values; exclude the broken images from every set "
                                 "before comparing")
    return arr


def set_metric_difference(reference_features: Any, candidate_features: Any,
                          metric_fn: Callable[[np.ndarray, np.ndarray], float], *, real_features: Any,
                          higher_is_better: bool, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0,
                          paired: bool = True, resample_real: bool = True, allow_few_resamples: bool = False,
                          metric: str = "", reference: str = "reference", candidate: str = "candidate",
                          kid_subset_size: int | None = None) -> Comparison:
    """Compare a set metric between two variants scored against the same target set, bootstrapping over images.

    ``metric_fn(real_features, fake_features) -> float`` is any set metric on (N, D) feature arrays (FID, KID,
    CMMD, ...). ``real_features`` is the target both variants are scored against: real images, or the baseline
    variant's features for "shift from baseline" metrics. The estimate is

        ``metric_fn(real, candidate) - metric_fn(real, reference)``  (candidate minus reference)

    and its interval a percentile bootstrap: each of the ``n_resamples`` replicates resamples image indices with
    replacement and recomputes both metric values. ``paired=True`` (default: image ``i`` of both variants shares
    a (prompt, seed), so the sets must have equal length and order) uses the same indices for both variants;
    ``paired=False`` resamples each independently. ``resample_real=True`` (default) also resamples the target
    set, once per replicate and shared by both terms, so the interval includes the target set's sampling noise.

    Cost: ``2 * n_resamples + 2`` calls of ``metric_fn``. ``n_resamples`` below :data:`MIN_RESAMPLES` is refused
    unless ``allow_few_resamples=True``, which records a warning. Replicates where ``metric_fn`` returns a
    non-finite value are dropped and counted in a warning. Caveat: resampling with replacement duplicates
    images, which biases FID/KID slightly on each replicate; the bias is similar for both variants and mostly
    cancels in the difference, but the interval is approximate for small sets (see also
    :func:`sample_size_warnings`, applied automatically with ``metric`` as the name).

    No p-value is reported for set metrics (``p_value`` is ``None``); ``n`` is the candidate's image count.
    """
    _check_common(n_resamples, confidence, seed, allow_few=allow_few_resamples)
    if not callable(metric_fn):
        raise InvalidConfigError("metric_fn: pass a callable metric(real_features, fake_features) -> float")
    ref = _as_features(reference_features, "reference_features")
    cand = _as_features(candidate_features, "candidate_features")
    real = _as_features(real_features, "real_features")
    if not (ref.shape[1] == cand.shape[1] == real.shape[1]):
        raise InvalidConfigError(f"feature dimensions differ: reference {ref.shape[1]}, candidate {cand.shape[1]}, "
                                 f"real {real.shape[1]}; extract all sets with the same feature network")
    if paired and len(ref) != len(cand):
        raise InvalidConfigError(f"paired=True needs one image per (prompt, seed) in both variants, got {len(ref)} "
                                 f"reference and {len(cand)} candidate images; pass aligned sets or paired=False")
    label = metric or "metric"
    notes: list[str] = []
    if n_resamples < MIN_RESAMPLES:
        notes.append(f"{label}: only {n_resamples} bootstrap resamples (< {MIN_RESAMPLES}, allowed by "
                     "allow_few_resamples): the interval's tails are imprecise")
    notes.extend(sample_size_warnings(metric, min(len(ref), len(cand)), ref.shape[1],
                                      kid_subset_size=kid_subset_size))

    ref_value = float(metric_fn(real, ref))
    cand_value = float(metric_fn(real, cand))
    estimate = cand_value - ref_value
    if not math.isfinite(estimate):
        raise InvalidConfigError(f"{label}: metric_fn returned {ref_value} (reference) and {cand_value} (candidate) "
                                 "on the full sets; check the features and the metric's sample-size requirements")

    rng = np.random.default_rng(seed)
    boot = np.empty(n_resamples, dtype=np.float64)
    for r in range(n_resamples):
        real_r = real[rng.integers(0, len(real), len(real))] if resample_real else real
        i_ref = rng.integers(0, len(ref), len(ref))
        i_cand = i_ref if paired else rng.integers(0, len(cand), len(cand))
        boot[r] = float(metric_fn(real_r, cand[i_cand])) - float(metric_fn(real_r, ref[i_ref]))
    finite = np.isfinite(boot)
    n_bad = int((~finite).sum())
    if n_bad:
        if n_bad > n_resamples // 2:
            raise InvalidConfigError(f"{label}: metric_fn was non-finite on {n_bad} of {n_resamples} bootstrap "
                                     "replicates; the sets are too small or degenerate for this metric")
        notes.append(f"{label}: dropped {n_bad} of {n_resamples} bootstrap replicates where metric_fn was "
                     "non-finite")
        boot = boot[finite]
    ci_low, ci_high = _percentile_ci(boot, confidence)
    scheme = "paired (same image indices for both variants)" if paired else "unpaired (independent indices)"
    return Comparison(
        metric=metric, reference=reference, candidate=candidate, n=len(cand), estimate=estimate,
        ci_low=ci_low, ci_high=ci_high, confidence=float(confidence), n_resamples=int(n_resamples), seed=int(seed),
        verdict=decide_verdict(ci_low, ci_high, higher_is_better=higher_is_better),
        higher_is_better=bool(higher_is_better),
        method=(f"percentile bootstrap over images, {scheme}"
                + (", target set resampled" if resample_real else ", target set fixed")
                + "; estimate = metric(real, candidate) - metric(real, reference)"),
        reference_value=ref_value, candidate_value=cand_value,
        bootstrap_se=float(boot.std(ddof=1)) if len(boot) > 1 else math.nan,
        diff_std=None, p_value=None, n_dropped=0, warnings=tuple(notes))
