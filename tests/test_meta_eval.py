"""Meta-evaluation against the toy oracle (sdxl_core.meta_eval): statistics against independent references, and
the verdicts on synthetic score documents (data only, no images)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats as sps

from sdxl_core.meta_eval import (AGREES, DISAGREES, NO_EVIDENCE, auc, average_ranks, kendall_tau_b, meta_evaluate,
                                 spearman)
from sdxl_core.stats import paired_difference


def _pair_count_auc(scores, correct):
    """AUC by counting every (correct, incorrect) pair directly."""
    pos = [s for s, c in zip(scores, correct) if c]
    neg = [s for s, c in zip(scores, correct) if not c]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_statistics_match_independent_references(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 80))
    correct = rng.random(n) < 0.4
    correct[:2] = [True, False]
    for scores in (rng.normal(size=n) + correct, np.round(rng.normal(size=n), 0)):  # continuous, heavily tied
        assert auc(scores, correct) == pytest.approx(_pair_count_auc(scores, correct), abs=1e-12)
        assert spearman(scores, correct) == pytest.approx(sps.spearmanr(scores, correct).statistic, abs=1e-12)
        np.testing.assert_allclose(average_ranks(scores), sps.rankdata(scores), atol=1e-12)
    k = int(rng.integers(2, 8))
    x, y = rng.integers(0, 3, k).astype(float), rng.normal(size=k).round(1)
    ref = sps.kendalltau(x, y).statistic
    assert (kendall_tau_b(x, y) is None) == bool(np.isnan(ref))
    if not np.isnan(ref):
        assert kendall_tau_b(x, y) == pytest.approx(ref, abs=1e-12)
    assert kendall_tau_b([0.1, 0.5, 0.9], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)


def test_undefined_statistics_are_none():
    assert auc([1.0, 2.0], [True, True]) is None and auc([], []) is None
    assert spearman([1.0, 1.0, 1.0], [0.0, 1.0, 0.0]) is None
    assert kendall_tau_b([1.0, 1.0], [0.0, 1.0]) is None and kendall_tau_b([1.0], [2.0]) is None
    with pytest.raises(ValueError, match="one label per score"):
        auc([1.0, 2.0], [True])


SETS = ("baseline", "good", "bad")
RATE = {"baseline": 0.5, "good": 0.9, "bad": 0.1}
N_KEYS = 40


def _doc(seed=0, *, set_values=None, set_label=None, comparisons=()):
    """A score document as score_sets writes it: oracle and four per-image metrics on 3 sets x 40 keys."""
    rng = np.random.default_rng(seed)
    keys = [[i, 0] for i in range(N_KEYS)]
    info = lambda name, hib, kind="per_image", label=None: {  # noqa: E731
        "name": name, "display_name": name.upper(), "higher_is_better": hib, "kind": kind, "label": label}
    doc = {"metrics": {"sanity": info("image_sanity", False, "set"), "oracle_accuracy": info("oracle_accuracy", True),
                       "aligned": info("aligned", True), "reversed": info("reversed", True),
                       "noise": info("noise", True), "distance": info("distance", False)},
           "sets": {}, "comparisons": list(comparisons)}
    for s in SETS:
        correct = (rng.random(N_KEYS) < RATE[s]).astype(float)
        per = {"oracle_accuracy": correct, "aligned": correct + rng.normal(0, 0.5, N_KEYS),
               "reversed": -correct + rng.normal(0, 0.5, N_KEYS), "noise": rng.normal(0, 1, N_KEYS),
               "distance": -correct + rng.normal(0, 0.5, N_KEYS)}  # lower is better and tracks correctness
        doc["sets"][s] = {"sanity": {"n": N_KEYS, "n_flagged": 0, "flagged": []}}
        for name, values in per.items():
            doc["sets"][s][name] = {"value": float(values.mean()),
                                    "per_image": [{"key": k, "value": float(v)} for k, v in zip(keys, values)]}
    if set_values is not None:
        doc["metrics"]["fid"] = info("fid", False, "set", set_label)
        for s, v in set_values.items():
            doc["sets"][s]["fid"] = {"value": v, "n": N_KEYS, "n_real": 50, "warnings": []}
    return doc


def test_per_image_verdicts_follow_the_auc_interval():
    doc = _doc()
    me = meta_evaluate(doc, n_resamples=1000, seed=0)
    rows = {r["metric"]: r for r in me["per_image"]}
    assert set(rows) == {"aligned", "reversed", "noise", "distance"}  # not sanity, not the oracle itself
    assert rows["aligned"]["verdict"] == AGREES and rows["aligned"]["auc_ci_low"] > 0.5
    assert rows["distance"]["verdict"] == AGREES  # lower is better: oriented before ranking
    assert rows["reversed"]["verdict"] == DISAGREES and rows["reversed"]["auc_ci_high"] < 0.5
    assert rows["noise"]["verdict"] == NO_EVIDENCE and rows["noise"]["auc_ci_low"] < 0.5 < rows["noise"]["auc_ci_high"]
    # the point values are the pooled statistics over every image of every set
    scores = [it["value"] for s in SETS for it in doc["sets"][s]["aligned"]["per_image"]]
    correct = [it["value"] > 0.5 for s in SETS for it in doc["sets"][s]["oracle_accuracy"]["per_image"]]
    assert rows["aligned"]["auc"] == pytest.approx(_pair_count_auc(scores, correct))
    assert rows["aligned"]["spearman"] == pytest.approx(sps.spearmanr(scores, correct).statistic)
    assert rows["aligned"]["n"] == 3 * N_KEYS and rows["aligned"]["n_correct"] == sum(correct)
    assert rows["aligned"]["auc_ci_low"] <= rows["aligned"]["auc"] <= rows["aligned"]["auc_ci_high"]
    assert "agrees with the oracle" in rows["aligned"]["summary"] and "ALIGNED" in rows["aligned"]["summary"]
    assert meta_evaluate(doc, n_resamples=1000, seed=0) == me  # deterministic
    json.dumps(me, allow_nan=False)


def test_order_of_variants_against_oracle_accuracy():
    base = _doc()
    acc = {s: base["sets"][s]["oracle_accuracy"]["value"] for s in SETS}
    assert acc["bad"] < acc["baseline"] < acc["good"]

    def comparison(candidate, estimate, ci):
        return {"metric": "fid", "reference": "baseline", "candidate": candidate, "estimate": estimate,
                "ci_low": ci[0], "ci_high": ci[1], "significant": ci[0] > 0 or ci[1] < 0}

    # FID (lower is better) in the oracle's order, both baseline comparisons significant: agrees
    good = _doc(set_values={"baseline": 20.0, "good": 10.0, "bad": 30.0},
                comparisons=[comparison("good", -10.0, (-12, -8)), comparison("bad", 10.0, (8, 12))])
    me = meta_evaluate(good, n_resamples=1000)
    fid = next(r for r in me["ordering"] if r["metric"] == "fid")
    assert fid["kind"] == "set" and fid["sets"] == list(SETS)
    oriented = [-v for v in fid["metric_values"]]
    assert fid["kendall_tau"] == pytest.approx(sps.kendalltau(fid["oracle_values"], oriented).statistic) == 1.0
    assert (fid["n_pairs"], fid["pairs_agree"], fid["pairs_disagree"], fid["pairs_tied"]) == (3, 3, 0, 0)
    # good-bad is not tested for a set metric (only comparisons with baseline exist): never decided
    decided = {(p["a"], p["b"]): p["decided"] for p in fid["pairs"]}
    assert decided == {("baseline", "good"): "agree", ("baseline", "bad"): "agree", ("good", "bad"): None}
    assert fid["verdict"] == AGREES and "2 pair(s) decided" in fid["summary"]

    # the reverse order with significant comparisons: disagrees
    bad = _doc(set_values={"baseline": 20.0, "good": 30.0, "bad": 10.0},
               comparisons=[comparison("good", 10.0, (8, 12)), comparison("bad", -10.0, (-12, -8))])
    fid = next(r for r in meta_evaluate(bad, n_resamples=1000)["ordering"] if r["metric"] == "fid")
    assert fid["kendall_tau"] == -1.0 and fid["pairs_disagree"] == 3 and fid["verdict"] == DISAGREES

    # the same order but no significant comparison: no evidence
    unsure = _doc(set_values={"baseline": 20.0, "good": 10.0, "bad": 30.0},
                  comparisons=[comparison("good", -10.0, (-25, 5)), comparison("bad", 10.0, (-5, 25))])
    fid = next(r for r in meta_evaluate(unsure, n_resamples=1000)["ordering"] if r["metric"] == "fid")
    assert fid["pairs_agree"] == 3 and fid["verdict"] == NO_EVIDENCE

    # a shift from baseline has no direction: skipped, with the reason
    shift = _doc(set_values={"good": 10.0, "bad": 30.0}, set_label="shift from baseline")
    me = meta_evaluate(shift, n_resamples=1000)
    assert not [r for r in me["ordering"] if r["metric"] == "fid"]
    assert any(s["metric"] == "fid" and "--reference" in s["reason"] for s in me["skipped"])

    # per-image means: pairs tested by the paired bootstrap of stats.paired_difference
    aligned = next(r for r in me["ordering"] if r["metric"] == "aligned")
    assert aligned["kind"] == "per_image mean" and aligned["verdict"] == AGREES
    pair = next(p for p in aligned["pairs"] if (p["a"], p["b"]) == ("good", "bad"))
    per = {s: [it["value"] for it in shift["sets"][s]["oracle_accuracy"]["per_image"]] for s in ("good", "bad")}
    assert pair["oracle_significant"] == paired_difference(per["good"], per["bad"], higher_is_better=True,
                                                           n_resamples=1000, p_value_test="none").significant
    assert pair["oracle_delta"] == pytest.approx(acc["bad"] - acc["good"])
    reversed_ = next(r for r in me["ordering"] if r["metric"] == "reversed")
    assert reversed_["verdict"] == DISAGREES
    json.dumps(me, allow_nan=False)


def test_without_oracle_or_with_one_class():
    doc = _doc()
    assert meta_evaluate({k: v for k, v in doc.items()} | {"metrics": {"clip": doc["metrics"]["aligned"]}}) is None
    for s in SETS:  # every image correct: AUC undefined, no evidence, and the summary says why
        for it in doc["sets"][s]["oracle_accuracy"]["per_image"]:
            it["value"] = 1.0
    me = meta_evaluate(doc, n_resamples=1000)
    row = next(r for r in me["per_image"] if r["metric"] == "aligned")
    assert row["auc"] is None and row["auc_ci_low"] is None and row["verdict"] == NO_EVIDENCE
    assert "all 120 images are correct" in row["summary"]
    json.dumps(me, allow_nan=False)
