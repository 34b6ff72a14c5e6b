"""sdxl_core.stats: paired bootstrap comparisons between variants, verdicts and sample-size warnings."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from sdxl_core.errors import InvalidConfigError
from sdxl_core.stats import (BETTER, MIN_RESAMPLES, NO_DIFFERENCE, WORSE, Comparison, decide_verdict,
                             paired_difference, sample_size_warnings, set_metric_difference)


def _pairs(data_seed: int, n: int = 50, shift: float = 0.5, noise: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(data_seed)
    a = rng.normal(0.0, 1.0, n)  # per-image score of the reference variant
    b = a + shift + rng.normal(0.0, noise, n)  # candidate: true mean difference `shift`
    return a, b


def _mean_shift(real: np.ndarray, fake: np.ndarray) -> float:
    """Synthetic set metric: difference of the sets' means on 1-d features."""
    return float(fake[:, 0].mean() - real[:, 0].mean())


# ---------------------------------------------------------------------------------------------------- coverage

def test_paired_bootstrap_coverage():
    covered = 0
    for trial in range(100):
        a, b = _pairs(1000 + trial)
        c = paired_difference(a, b, higher_is_better=True, n_resamples=2000, seed=trial, p_value_test="none")
        covered += c.ci_low <= 0.5 <= c.ci_high
    print(f"paired bootstrap coverage: {covered}/100")
    assert covered >= 90


def test_set_metric_bootstrap_coverage():
    covered = 0
    for trial in range(100):
        rng = np.random.default_rng(5000 + trial)
        real = rng.normal(0.0, 1.0, (30, 1))
        ref = rng.normal(0.0, 1.0, (30, 1))
        cand = ref + 0.5 + rng.normal(0.0, 1.0, (30, 1))  # true metric difference 0.5
        c = set_metric_difference(ref, cand, _mean_shift, real_features=real, higher_is_better=True,
                                  n_resamples=1000, seed=trial)
        covered += c.ci_low <= 0.5 <= c.ci_high
    print(f"set-metric bootstrap coverage: {covered}/100")
    assert covered >= 90


# ---------------------------------------------------------------------------------------------------- verdicts

@pytest.mark.parametrize("higher_is_better, shift, expected", [
    (True, 1.0, BETTER), (True, -1.0, WORSE), (False, 1.0, WORSE), (False, -1.0, BETTER)])
def test_verdict_respects_direction(higher_is_better: bool, shift: float, expected: str):
    a, b = _pairs(7, n=100, shift=shift, noise=0.5)
    c = paired_difference(a, b, higher_is_better=higher_is_better, metric="clip_score", reference="baseline",
                          candidate="wrong_lora")
    assert c.verdict == expected and c.significant
    assert c.estimate == pytest.approx(np.mean(b - a))  # candidate minus reference
    assert c.ci_low <= c.estimate <= c.ci_high
    assert c.p_value is not None and c.p_value < 1e-6
    assert (c.reference, c.candidate, c.metric) == ("baseline", "wrong_lora", "clip_score")


def test_no_difference_on_identical_distributions():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0, 1, 200), rng.normal(0, 1, 200)
    c = paired_difference(a, b, higher_is_better=True)
    assert c.verdict == NO_DIFFERENCE and not c.significant
    assert c.ci_low < 0 < c.ci_high
    # identical values: zero-width interval at 0, no p-value (the test is undefined), no crash
    same = paired_difference(a, a.copy(), higher_is_better=True)
    assert (same.estimate, same.ci_low, same.ci_high, same.verdict) == (0.0, 0.0, 0.0, NO_DIFFERENCE)
    assert same.p_value is None


def test_decide_verdict():
    assert decide_verdict(0.1, 0.2, higher_is_better=True) == BETTER
    assert decide_verdict(0.1, 0.2, higher_is_better=False) == WORSE
    assert decide_verdict(-0.2, -0.1, higher_is_better=False) == BETTER
    assert decide_verdict(-0.1, 0.0, higher_is_better=True) == NO_DIFFERENCE


def test_set_metric_verdicts():
    rng = np.random.default_rng(11)
    real = rng.normal(0, 1, (60, 4))
    ref = rng.normal(0, 1, (60, 4))

    def dist(r: np.ndarray, f: np.ndarray) -> float:  # FID-like: distance of means, lower is better
        return float(np.linalg.norm(f.mean(0) - r.mean(0)))

    shifted = ref + 1.0
    worse = set_metric_difference(ref, shifted, dist, real_features=real, higher_is_better=False,
                                  metric="mean_dist", reference="baseline", candidate="wrong_lora")
    assert worse.verdict == WORSE and worse.estimate > 0
    assert worse.estimate == pytest.approx(dist(real, shifted) - dist(real, ref))
    assert worse.candidate_value == pytest.approx(dist(real, shifted))
    better = set_metric_difference(shifted, ref, dist, real_features=real, higher_is_better=False)
    assert better.verdict == BETTER
    same = set_metric_difference(ref, rng.normal(0, 1, (60, 4)), dist, real_features=real, higher_is_better=False)
    assert same.verdict == NO_DIFFERENCE
    assert same.p_value is None and same.diff_std is None


def test_set_metric_paired_vs_unpaired_and_fixed_real():
    rng = np.random.default_rng(2)
    real = rng.normal(0, 1, (40, 1))
    ref = rng.normal(0, 1, (40, 1))
    cand = ref + 0.3 + rng.normal(0, 0.1, (40, 1))  # strongly paired with ref
    kw = dict(real_features=real, higher_is_better=True)
    paired = set_metric_difference(ref, cand, _mean_shift, **kw)
    unpaired = set_metric_difference(ref, cand, _mean_shift, paired=False, **kw)
    fixed = set_metric_difference(ref, cand, _mean_shift, resample_real=False, **kw)
    assert paired.estimate == unpaired.estimate == fixed.estimate
    # pairing removes the shared per-image variation: a much narrower interval
    assert paired.ci_high - paired.ci_low < 0.5 * (unpaired.ci_high - unpaired.ci_low)
    assert "unpaired" in unpaired.method and "target set fixed" in fixed.method
    with pytest.raises(InvalidConfigError, match="paired=True"):
        set_metric_difference(ref, cand[:30], _mean_shift, **kw)
    assert set_metric_difference(ref, cand[:30], _mean_shift, paired=False, **kw).n == 30


# ------------------------------------------------------------------------------------ determinism and validation

def test_determinism():
    a, b = _pairs(1)
    c1 = paired_difference(a, b, higher_is_better=True, seed=42)
    c2 = paired_difference(a, b, higher_is_better=True, seed=42)
    c3 = paired_difference(a, b, higher_is_better=True, seed=43)
    assert c1 == c2
    assert (c1.ci_low, c1.ci_high) != (c3.ci_low, c3.ci_high)
    real = np.random.default_rng(0).normal(size=(20, 1))
    s1 = set_metric_difference(a[:, None], b[:, None], _mean_shift, real_features=real, higher_is_better=True, seed=5)
    s2 = set_metric_difference(a[:, None], b[:, None], _mean_shift, real_features=real, higher_is_better=True, seed=5)
    assert s1 == s2


def test_too_few_resamples_refused():
    a, b = _pairs(1)
    with pytest.raises(InvalidConfigError, match=f"n_resamples=999.*{MIN_RESAMPLES}"):
        paired_difference(a, b, higher_is_better=True, n_resamples=999)
    real = a[:, None]
    with pytest.raises(InvalidConfigError, match="allow_few_resamples"):
        set_metric_difference(a[:, None], b[:, None], _mean_shift, real_features=real, higher_is_better=True,
                              n_resamples=200)
    c = set_metric_difference(a[:, None], b[:, None], _mean_shift, real_features=real, higher_is_better=True,
                              n_resamples=200, allow_few_resamples=True)
    assert c.n_resamples == 200 and any("200 bootstrap resamples" in w for w in c.warnings)


@pytest.mark.parametrize("kwargs, match", [
    (dict(confidence=1.0), "confidence"), (dict(confidence=0), "confidence"), (dict(seed=-1), "seed"),
    (dict(n_resamples=True), "n_resamples"), (dict(nan_policy="omit"), "nan_policy"),
    (dict(p_value_test="mannwhitney"), "p_value_test")])
def test_bad_settings_refused(kwargs: dict, match: str):
    a, b = _pairs(1)
    with pytest.raises(InvalidConfigError, match=match):
        paired_difference(a, b, higher_is_better=True, **kwargs)


def test_length_mismatch_refused():
    with pytest.raises(InvalidConfigError, match="a has 3 values and b has 2"):
        paired_difference([1.0, 2.0, 3.0], [1.0, 2.0], higher_is_better=True)


# ---------------------------------------------------------------------------------------------------- key alignment

def test_shuffled_keys_give_the_aligned_result():
    a, b = _pairs(4, n=40)
    keys = [(p, s) for p in range(10) for s in range(4)]  # (prompt_index, seed)
    aligned = paired_difference(a, b, keys=keys, higher_is_better=True)
    perm = np.random.default_rng(0).permutation(40)
    shuffled = paired_difference(a, b[perm], keys=keys, b_keys=[keys[i] for i in perm], higher_is_better=True)
    assert shuffled == aligned
    assert aligned == paired_difference(a, b, higher_is_better=True)  # same as positional pairing
    as_maps = paired_difference(dict(zip(keys, a)), {keys[i]: b[i] for i in perm}, higher_is_better=True)
    assert as_maps == aligned


def test_missing_keys_named():
    keys = [(0, 1), (0, 2), (1, 1)]
    with pytest.raises(InvalidConfigError, match=r"only in the reference: \(1, 1\).*only in the candidate: \(2, 7\)"):
        paired_difference([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], keys=keys, b_keys=[(0, 1), (0, 2), (2, 7)],
                          higher_is_better=True)
    with pytest.raises(InvalidConfigError, match=r"duplicate keys \(0, 1\)"):
        paired_difference([1.0, 2.0], [1.0, 2.0], keys=[(0, 1), (0, 1)], higher_is_better=True)
    with pytest.raises(InvalidConfigError, match="only in the candidate: 'x'"):
        paired_difference({"a": 1.0, "b": 2.0}, {"a": 1.0, "b": 2.0, "x": 3.0}, higher_is_better=True)


# ---------------------------------------------------------------------------------------------------- NaN handling

def test_nan_pairs_dropped_with_warning():
    a, b = _pairs(5, n=30)
    a_nan, b_nan = a.copy(), b.copy()
    a_nan[3] = np.nan
    b_nan[10] = np.inf
    c = paired_difference(a_nan, b_nan, higher_is_better=True, metric="clip_score")
    assert c.n == 28 and c.n_dropped == 2
    assert any("dropped 2 of 30" in w and "3, 10" in w for w in c.warnings)
    keep = np.ones(30, bool)
    keep[[3, 10]] = False
    clean = paired_difference(a[keep], b[keep], higher_is_better=True, metric="clip_score")
    assert (c.estimate, c.ci_low, c.ci_high) == (clean.estimate, clean.ci_low, clean.ci_high)
    keys = [f"p{i}" for i in range(30)]
    keyed = paired_difference(a_nan, b_nan, keys=keys, higher_is_better=True)
    assert any("'p3', 'p10'" in w for w in keyed.warnings)
    with pytest.raises(InvalidConfigError, match="non-finite.*'p3'.*nan_policy='drop'"):
        paired_difference(a_nan, b_nan, keys=keys, higher_is_better=True, nan_policy="raise")
    with pytest.raises(InvalidConfigError, match="1 usable pair"):
        paired_difference([1.0, np.nan], [2.0, 3.0], higher_is_better=True)


def test_set_metric_nonfinite_features_refused():
    f = np.zeros((5, 2))
    f[1, 1] = np.nan
    with pytest.raises(InvalidConfigError, match="candidate_features: non-finite"):
        set_metric_difference(np.ones((5, 2)), f, _mean_shift, real_features=np.ones((5, 2)), higher_is_better=True)


# ---------------------------------------------------------------------------------------------------- warnings

def test_sample_size_warnings():
    fid = sample_size_warnings("fid", 100, 2048)
    assert len(fid) == 1 and "rank-deficient" in fid[0] and "KID" in fid[0] and "CMMD" in fid[0]
    assert sample_size_warnings("FID", 4096, 2048) == []
    assert sample_size_warnings("kid", 100, 2048) == []  # KID has no covariance to estimate
    assert any("subset_size=1000" in w for w in sample_size_warnings("kid", 100, 2048, kid_subset_size=1000))
    assert any("low power" in w for w in sample_size_warnings("clip_score", 5, None))
    assert sample_size_warnings("clip_score", 50, None) == []


def test_warnings_attached_to_comparisons():
    rng = np.random.default_rng(0)
    real, ref = rng.normal(size=(20, 64)), rng.normal(size=(20, 64))
    c = set_metric_difference(ref, ref + 0.1, _mean_shift, real_features=real, higher_is_better=False, metric="fid")
    assert any("rank-deficient" in w and "CMMD" in w for w in c.warnings)
    small = paired_difference([1.0, 2.0, 3.0], [2.0, 2.5, 3.5], higher_is_better=True, metric="clip_score")
    assert any("low power" in w for w in small.warnings)


# ---------------------------------------------------------------------------------------------------- result object

def test_comparison_as_dict_is_json_ready():
    a, b = _pairs(9)
    c = paired_difference(a, b, higher_is_better=True, metric="clip_score", reference="baseline", candidate="x")
    d = c.as_dict()
    json.dumps(d, allow_nan=False)
    assert d["verdict"] == c.verdict and isinstance(d["warnings"], list) and d["n_resamples"] == 10000
    assert d["significant"] is True and "percentile bootstrap" in d["method"]
    with pytest.raises(AttributeError):
        c.estimate = 0.0  # type: ignore[misc]  # frozen
    nan_se = Comparison(metric="m", reference="r", candidate="c", n=2, estimate=0.0, ci_low=0.0, ci_high=0.0,
                        confidence=0.95, n_resamples=1000, seed=0, verdict=NO_DIFFERENCE, higher_is_better=True,
                        method="m", reference_value=0.0, candidate_value=0.0, bootstrap_se=math.nan)
    assert nan_se.as_dict()["bootstrap_se"] is None


def test_vectorised_bootstrap_is_fast():
    a, b = _pairs(0, n=1000)
    paired_difference(a, b, higher_is_better=True, p_value_test="none")  # warm-up
    t0 = time.perf_counter()
    c = paired_difference(a, b, higher_is_better=True, n_resamples=10000, p_value_test="none")
    elapsed = time.perf_counter() - t0
    assert c.n == 1000 and elapsed < 1.0, f"10k resamples of 1000 pairs took {elapsed:.2f} s"
