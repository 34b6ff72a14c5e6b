"""Which metric to trust: each metric's agreement with the toy world's exact oracle (a meta-evaluation).

When a score document holds ``oracle_accuracy`` (every prompt a toy-world caption, :mod:`sdxl_core.toy.oracle`),
every scored image has a ground truth: correct (1) or not (0). :func:`meta_evaluate` measures how well each
other metric tracks it, from the document's data alone (per-image values, set values and comparisons; no image
is read again, no network runs). Definitions:

**Per image** (per-image metrics such as CLIP score), pooled over the images of every set that have both an
oracle verdict and a finite metric value. ``s`` is the metric oriented so that higher is better (negated when
lower is better).

* ``auc`` = P(s(correct image) > s(incorrect image)) + 1/2 P(tie), over all (correct, incorrect) image pairs:
  the Mann-Whitney U statistic over ``n_correct * n_incorrect``, from average ranks. 0.5: the metric cannot tell
  correct images from incorrect ones; 1: it scores every correct image above every incorrect one; below 0.5: it
  prefers the incorrect ones. Undefined (``None``) when every image is correct, or none is.
* ``spearman`` = Spearman's rank correlation between ``s`` and correctness (0/1): the Pearson correlation of
  their average ranks. Undefined when either is constant.
* Interval (``*_ci_low``/``*_ci_high``): percentile bootstrap at ``confidence`` (``n_resamples`` draws from
  ``numpy.random.default_rng(seed)``) over *pairing keys* (a run's (prompt, seed); a plain folder's file): a drawn
  key brings all its images, one per variant, so the images of one prompt and seed move together. Draws where
  a statistic is undefined are left out of its interval and counted (``n_undefined_resamples``).
* ``verdict``: :data:`AGREES` when the AUC interval lies above 0.5, :data:`DISAGREES` when it lies below, else
  :data:`NO_EVIDENCE` (also when the AUC is undefined).

**Variant order** (set metrics such as FID/KID/CMMD by their value per set, per-image metrics by their mean per
set), over the sets that have both an oracle accuracy and a metric value (at least 2):

* ``kendall_tau`` = Kendall's tau-b between oracle accuracy and the oriented metric value across sets (ties
  corrected, as ``scipy.stats.kendalltau``): 1 = the same order, -1 = the reverse. Undefined when either is
  constant.
* Per pair of sets (``pairs``): ``order`` is ``agree`` when oracle accuracy and the oriented metric move the same
  way, ``disagree`` when they move oppositely, ``tied`` when either difference is 0 (``pairs_agree``,
  ``pairs_disagree``, ``pairs_tied`` count them).
* A pair is *decided* when both differences are significant: the oracle's by a paired bootstrap of per-image
  correctness over the keys both sets share (:func:`sdxl_core.stats.paired_difference`, as the
  ``oracle_accuracy`` comparisons with baseline), the metric's by the same test on its per-image values, or for a
  set metric by the document's comparison of that pair (``sdxl-bench score`` compares each variant with
  ``baseline`` when ``--reference`` is given; other pairs are untested and never decided). ``decided_agree`` /
  ``decided_disagree`` count decided pairs by the direction of the two significant differences.
* ``verdict``: :data:`DISAGREES` when some decided pair disagrees (a metric that significantly contradicts the
  oracle once is not to be trusted), else :data:`AGREES` when at least one decided pair agrees, else
  :data:`NO_EVIDENCE`. Kendall's tau and the counts never give a verdict alone: over two or three variants their
  sign is often chance.

Set metrics measured as a "shift from baseline" (no ``--reference``) have no better/worse direction: they are
listed in ``skipped`` with the reason, as are metrics with fewer than two sets to order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from sdxl_core.errors import InvalidConfigError
from sdxl_core.stats import MIN_RESAMPLES

ORACLE = "oracle_accuracy"
AGREES = "agrees with the oracle"
DISAGREES = "disagrees with the oracle"
NO_EVIDENCE = "no evidence"
SHIFT_LABEL = "shift from baseline"
#: Metrics that are not a judgement of image quality (never meta-evaluated).
NOT_QUALITY = ("sanity", "image_sanity", ORACLE)

DEFINITIONS: dict[str, str] = {
    "auc": "P(a correct image scores better than an incorrect one), ties 1/2; 0.5 = chance",
    "spearman": "Spearman rank correlation of the (oriented) metric with oracle correctness (0/1)",
    "interval": "percentile bootstrap over (prompt, seed) keys; a key brings all its variants' images",
    "kendall_tau": "Kendall tau-b between oracle accuracy and the (oriented) metric across variants",
    "decided pair": "a pair of variants whose oracle and metric differences are both significant",
    "verdict (per image)": f"'{AGREES}' if the AUC interval is above 0.5, '{DISAGREES}' if below, "
                           f"else '{NO_EVIDENCE}'",
    "verdict (order)": f"'{DISAGREES}' if a decided pair is ordered oppositely, '{AGREES}' if at least one is "
                       f"ordered alike, else '{NO_EVIDENCE}'",
}


# ------------------------------------------------------------------------------------------------ statistics

def average_ranks(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``values``; tied values share the mean of the ranks they span."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.ones(n, dtype=bool)
    starts[1:] = xs[1:] != xs[:-1]
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    counts = np.diff(np.append(first, n))
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = (first + (counts + 1) / 2.0)[group]
    return ranks


def auc(scores: Sequence[float] | np.ndarray, correct: Sequence[bool] | np.ndarray) -> float | None:
    """P(score of a correct item > score of an incorrect one) + 1/2 P(tie); ``None`` without both kinds."""
    s = np.asarray(scores, dtype=np.float64)
    pos = np.asarray(correct, dtype=bool)
    if s.shape != pos.shape or s.ndim != 1:
        raise InvalidConfigError(f"auc: {s.shape} scores and {pos.shape} labels; pass one label per score")
    n1 = int(pos.sum())
    n0 = len(pos) - n1
    if n1 == 0 or n0 == 0:
        return None
    u = float(average_ranks(s)[pos].sum()) - n1 * (n1 + 1) / 2.0
    return u / (n1 * n0)


def spearman(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float | None:
    """Spearman's rho (Pearson correlation of average ranks); ``None`` when either side is constant."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise InvalidConfigError(f"spearman: shapes {a.shape} and {b.shape}; pass two equal-length sequences")
    ra, rb = average_ranks(a), average_ranks(b)
    da, db = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((da * da).sum()) * float((db * db).sum()))
    return float((da * db).sum()) / denom if denom > 0 else None


def kendall_tau_b(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> float | None:
    """Kendall's tau-b, by direct pair counting: ``(concordant - discordant) / sqrt((P - Tx) (P - Ty))`` with
    ``P`` the number of pairs and ``Tx``/``Ty`` the pairs tied in ``x``/``y``; ``None`` when undefined."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise InvalidConfigError(f"kendall_tau_b: shapes {a.shape} and {b.shape}; pass two equal-length sequences")
    i, j = np.triu_indices(len(a), 1)
    sx, sy = np.sign(a[j] - a[i]), np.sign(b[j] - b[i])
    pairs = len(i)
    denom = math.sqrt(float(pairs - (sx == 0).sum()) * float(pairs - (sy == 0).sum()))
    return float((sx * sy).sum()) / denom if denom > 0 else None


def _interval(values: list[float], confidence: float) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    alpha = 1.0 - confidence
    lo, hi = np.quantile(np.asarray(values), [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


# --------------------------------------------------------------------------------------------------- results

@dataclass(frozen=True)
class ImageAgreement:
    """A per-image metric against oracle correctness, image by image (definitions in the module docstring)."""

    metric: str
    display_name: str
    higher_is_better: bool
    n: int
    n_correct: int
    n_incorrect: int
    auc: float | None
    auc_ci_low: float | None
    auc_ci_high: float | None
    spearman: float | None
    spearman_ci_low: float | None
    spearman_ci_high: float | None
    n_resamples: int
    n_undefined_resamples: int
    verdict: str
    summary: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class PairOrder:
    """Two sets ``a``, ``b``: the differences ``b - a`` of oracle accuracy and of the metric (as stored, not
    oriented), whether each is significant (``None``: not tested) and the two orders' relation."""

    a: str
    b: str
    oracle_delta: float
    metric_delta: float
    order: str  # agree | disagree | tied
    oracle_significant: bool | None
    metric_significant: bool | None
    decided: str | None  # agree | disagree for a decided pair, else None


@dataclass(frozen=True)
class OrderAgreement:
    """A metric's order of the sets against oracle accuracy's (definitions in the module docstring)."""

    metric: str
    display_name: str
    kind: str  # "set" (its value per set) or "per_image mean"
    higher_is_better: bool
    sets: tuple[str, ...]
    oracle_values: tuple[float, ...]
    metric_values: tuple[float, ...]
    kendall_tau: float | None
    n_pairs: int
    pairs_agree: int
    pairs_disagree: int
    pairs_tied: int
    decided_agree: int
    decided_disagree: int
    pairs: tuple[PairOrder, ...]
    verdict: str
    summary: str

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sets"], d["oracle_values"], d["metric_values"] = list(self.sets), list(self.oracle_values), \
            list(self.metric_values)
        d["pairs"] = [asdict(p) for p in self.pairs]
        return d


# ------------------------------------------------------------------------------------------ reading the doc

Key = tuple[Any, ...]


def _per_image(doc: Mapping[str, Any], metric: str) -> dict[str, dict[Key, float]]:
    """``{set: {key: value}}`` of a per-image metric's finite values (``sets[set][metric]["per_image"]``)."""
    out: dict[str, dict[Key, float]] = {}
    for set_name, values in doc["sets"].items():
        items = (values.get(metric) or {}).get("per_image") if isinstance(values, Mapping) else None
        if not items:
            continue
        out[set_name] = {tuple(it["key"]): float(it["value"]) for it in items
                         if isinstance(it.get("value"), (int, float)) and math.isfinite(it["value"])}
    return out


def _set_values(doc: Mapping[str, Any], metric: str) -> dict[str, float]:
    """``{set: value}`` of a set metric's finite values (``sets[set][metric]["value"]``)."""
    out = {}
    for set_name, values in doc["sets"].items():
        v = (values.get(metric) or {}).get("value") if isinstance(values, Mapping) else None
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[set_name] = float(v)
    return out


def _oriented(value: float, higher_is_better: bool) -> float:
    return value if higher_is_better else -value


# --------------------------------------------------------------------------------------------- per image

def image_agreement(metric: str, info: Mapping[str, Any], oracle: Mapping[str, Mapping[Key, float]],
                    values: Mapping[str, Mapping[Key, float]], *, n_resamples: int, seed: int,
                    confidence: float = 0.95) -> ImageAgreement:
    """AUC and Spearman of a per-image metric (``values``, ``{set: {key: value}}``) against oracle correctness
    (``oracle``, same shape, 1.0/0.0), pooled over the images both have, with cluster-bootstrap intervals."""
    hib = bool(info.get("higher_is_better", True))
    display = str(info.get("display_name") or metric)
    items = [(key, _oriented(v, hib), oracle[s][key]) for s, vs in values.items() for key, v in vs.items()
             if key in oracle.get(s, {})]
    scores = np.array([it[1] for it in items], dtype=np.float64)
    correct = np.array([it[2] for it in items], dtype=np.float64) > 0.5
    n, n1 = len(items), int(correct.sum())
    point_auc, point_rho = auc(scores, correct), spearman(scores, correct.astype(np.float64))
    boot_auc: list[float] = []
    boot_rho: list[float] = []
    undefined = 0
    if point_auc is not None:
        clusters = {key: i for i, key in enumerate(dict.fromkeys(it[0] for it in items))}
        cid = np.array([clusters[it[0]] for it in items], dtype=np.intp)
        rng = np.random.default_rng(seed)
        for _ in range(n_resamples):
            counts = np.bincount(rng.integers(0, len(clusters), len(clusters)), minlength=len(clusters))
            idx = np.repeat(np.arange(n), counts[cid])
            a = auc(scores[idx], correct[idx])
            r = spearman(scores[idx], correct[idx].astype(np.float64))
            undefined += a is None or r is None
            if a is not None:
                boot_auc.append(a)
            if r is not None:
                boot_rho.append(r)
    auc_lo, auc_hi = _interval(boot_auc, confidence)
    rho_lo, rho_hi = _interval(boot_rho, confidence)
    if auc_lo is not None and auc_lo > 0.5:
        verdict = AGREES
    elif auc_hi is not None and auc_hi < 0.5:
        verdict = DISAGREES
    else:
        verdict = NO_EVIDENCE
    level = f"{confidence * 100:g}%"
    if point_auc is None:
        what = "no image" if n == 0 else f"all {n} images are {'correct' if n1 == n else 'incorrect'}"
        summary = f"{display}: {verdict} image by image: {what} by the oracle, so there is nothing to tell apart."
    else:
        interval = (f"{level} interval {auc_lo * 100:.0f}-{auc_hi * 100:.0f}%" if auc_lo is not None
                    else "no interval")
        rho = f"{point_rho:.2f}" if point_rho is not None else "undefined (constant metric)"
        summary = (f"{display}: {verdict} image by image: a correct image scores better than an incorrect one "
                   f"{point_auc * 100:.0f}% of the time ({interval}; 50% is chance), Spearman {rho}, over {n} "
                   f"images ({n1} correct).")
    return ImageAgreement(metric=metric, display_name=display, higher_is_better=hib, n=n, n_correct=n1,
                          n_incorrect=n - n1, auc=point_auc, auc_ci_low=auc_lo, auc_ci_high=auc_hi,
                          spearman=point_rho, spearman_ci_low=rho_lo, spearman_ci_high=rho_hi,
                          n_resamples=int(n_resamples), n_undefined_resamples=undefined, verdict=verdict,
                          summary=summary)


# ------------------------------------------------------------------------------------------------- order

def _paired_significance(a: Mapping[Key, float], b: Mapping[Key, float], *, higher_is_better: bool,
                         n_resamples: int, seed: int, metric: str) -> tuple[bool | None, float | None]:
    """(significant, estimate b - a) of a paired bootstrap over the shared keys; (None, None) below 2 pairs."""
    from sdxl_core.stats import paired_difference

    shared = sorted(set(a) & set(b), key=repr)
    if len(shared) < 2:
        return None, None
    comp = paired_difference([a[k] for k in shared], [b[k] for k in shared], higher_is_better=higher_is_better,
                             n_resamples=n_resamples, seed=seed, metric=metric, p_value_test="none")
    return comp.significant, comp.estimate


def _documented_significance(comparisons: Sequence[Mapping[str, Any]], metric: str, a: str,
                             b: str) -> tuple[bool | None, float | None]:
    """(significant, estimate b - a) from the document's comparison of ``a`` and ``b`` on ``metric``."""
    for c in comparisons:
        if c.get("metric") != metric or not isinstance(c.get("estimate"), (int, float)):
            continue
        if (c.get("reference"), c.get("candidate")) == (a, b):
            return bool(c.get("significant")), float(c["estimate"])
        if (c.get("reference"), c.get("candidate")) == (b, a):
            return bool(c.get("significant")), -float(c["estimate"])
    return None, None


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def order_agreement(metric: str, info: Mapping[str, Any], oracle: Mapping[str, Mapping[Key, float]],
                    values: Mapping[str, float], *, per_image: Mapping[str, Mapping[Key, float]] | None = None,
                    comparisons: Sequence[Mapping[str, Any]] = (), n_resamples: int, seed: int,
                    oracle_tests: dict[tuple[str, str], tuple[bool | None, float | None]] | None = None,
                    ) -> OrderAgreement:
    """How a metric orders the sets (``values``: ``{set: value}``) against oracle accuracy (the mean of
    ``oracle[set]``). ``per_image`` (a per-image metric's values) tests each pair of sets by a paired bootstrap;
    without it (a set metric) a pair is tested only by a matching entry of ``comparisons``. ``oracle_tests``
    caches the oracle's pair tests between metrics."""
    hib = bool(info.get("higher_is_better", True))
    display = str(info.get("display_name") or metric)
    sets = [s for s in values if oracle.get(s)]
    acc = {s: float(np.mean(list(oracle[s].values()))) for s in sets}
    tests = {} if oracle_tests is None else oracle_tests
    pairs: list[PairOrder] = []
    for i, a in enumerate(sets):
        for b in sets[i + 1:]:
            d_oracle, d_metric = acc[b] - acc[a], values[b] - values[a]
            so, sm = _sign(d_oracle), _sign(_oriented(d_metric, hib))
            order = "tied" if so == 0 or sm == 0 else ("agree" if so == sm else "disagree")
            if (a, b) not in tests:
                tests[(a, b)] = _paired_significance(oracle[a], oracle[b], higher_is_better=True,
                                                     n_resamples=n_resamples, seed=seed, metric=ORACLE)
            o_sig, o_est = tests[(a, b)]
            if per_image is not None:
                m_sig, m_est = _paired_significance(per_image.get(a, {}), per_image.get(b, {}),
                                                    higher_is_better=hib, n_resamples=n_resamples, seed=seed,
                                                    metric=metric)
            else:
                m_sig, m_est = _documented_significance(comparisons, metric, a, b)
            decided = None
            if o_sig and m_sig and o_est is not None and m_est is not None:
                decided = "agree" if _sign(o_est) == _sign(_oriented(m_est, hib)) else "disagree"
            pairs.append(PairOrder(a=a, b=b, oracle_delta=d_oracle, metric_delta=d_metric, order=order,
                                   oracle_significant=o_sig, metric_significant=m_sig, decided=decided))
    tau = kendall_tau_b([acc[s] for s in sets], [_oriented(values[s], hib) for s in sets])
    count = {k: sum(p.order == k for p in pairs) for k in ("agree", "disagree", "tied")}
    dec = {k: sum(p.decided == k for p in pairs) for k in ("agree", "disagree")}
    verdict = DISAGREES if dec["disagree"] else AGREES if dec["agree"] else NO_EVIDENCE
    tau_text = f"Kendall tau {tau:.2f}" if tau is not None else "Kendall tau undefined (a constant side)"
    decided_text = (f"{dec['agree'] + dec['disagree']} pair(s) decided by significant differences on both sides"
                    if dec["agree"] + dec["disagree"] else "no pair has significant differences on both sides")
    summary = (f"{display}: {verdict} on the order of the variants: {count['agree']} of {len(pairs)} pair(s) "
               f"ordered as by the oracle, {count['disagree']} reversed, {count['tied']} tied ({tau_text}); "
               f"{decided_text}.")
    return OrderAgreement(metric=metric, display_name=display, kind="per_image mean" if per_image is not None
                          else "set", higher_is_better=hib, sets=tuple(sets),
                          oracle_values=tuple(acc[s] for s in sets), metric_values=tuple(values[s] for s in sets),
                          kendall_tau=tau, n_pairs=len(pairs), pairs_agree=count["agree"],
                          pairs_disagree=count["disagree"], pairs_tied=count["tied"],
                          decided_agree=dec["agree"], decided_disagree=dec["disagree"], pairs=tuple(pairs),
                          verdict=verdict, summary=summary)


# ------------------------------------------------------------------------------------------------- entry

def meta_evaluate(doc: Mapping[str, Any], *, n_resamples: int = 1000, seed: int = 0,
                  confidence: float = 0.95) -> dict[str, Any] | None:
    """The ``meta_evaluation`` of a score document (``metrics``, ``sets``, ``comparisons`` as
    :func:`sdxl_core.score.score_sets` writes them, per-image values included); ``None`` without
    ``oracle_accuracy``. JSON-ready::

        {"oracle": "oracle_accuracy", "confidence", "n_resamples", "seed", "definitions": {term: text},
         "per_image": [ImageAgreement.as_dict()], "ordering": [OrderAgreement.as_dict()],
         "skipped": [{"metric", "test", "reason"}]}
    """
    if ORACLE not in doc["metrics"]:
        return None
    if not 0.0 < confidence < 1.0:
        raise InvalidConfigError(f"confidence={confidence!r}: pass a level strictly between 0 and 1, e.g. 0.95")
    if n_resamples < MIN_RESAMPLES:
        raise InvalidConfigError(f"n_resamples={n_resamples}: pass at least {MIN_RESAMPLES} for a 95% interval")
    oracle = _per_image(doc, ORACLE)
    out: dict[str, Any] = {"oracle": ORACLE, "confidence": confidence, "n_resamples": int(n_resamples),
                           "seed": int(seed), "definitions": dict(DEFINITIONS), "per_image": [], "ordering": [],
                           "skipped": []}
    oracle_tests: dict[tuple[str, str], tuple[bool | None, float | None]] = {}
    for metric, info in doc["metrics"].items():
        info = info or {}
        if metric in NOT_QUALITY or info.get("name") in NOT_QUALITY:
            continue
        display = info.get("display_name") or metric
        if info.get("kind") == "per_image":
            per_image = _per_image(doc, metric)
            if not per_image:
                out["skipped"].append({"metric": metric, "display_name": display, "test": "per image",
                                       "reason": "no per-image values in the document"})
                continue
            out["per_image"].append(image_agreement(metric, info, oracle, per_image, n_resamples=n_resamples,
                                                    seed=seed, confidence=confidence).as_dict())
            means = {s: float(np.mean(list(v.values()))) for s, v in per_image.items() if v}
            args: dict[str, Any] = {"per_image": per_image}
        else:
            if SHIFT_LABEL in str(info.get("label") or ""):
                out["skipped"].append({"metric": metric, "display_name": display, "test": "order",
                                       "reason": "measured as a shift from baseline, which has no better or worse "
                                                 "direction; score with --reference real images to rank variants"})
                continue
            means = _set_values(doc, metric)
            args = {"comparisons": doc.get("comparisons") or []}
        if len([s for s in means if oracle.get(s)]) < 2:
            out["skipped"].append({"metric": metric, "display_name": display, "test": "order",
                                   "reason": "fewer than 2 variants with both an oracle accuracy and a value"})
            continue
        out["ordering"].append(order_agreement(metric, info, oracle, means, n_resamples=n_resamples, seed=seed,
                                               oracle_tests=oracle_tests, **args).as_dict())
    return out
