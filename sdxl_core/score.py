"""``sdxl-bench score``: metrics of image folders or of a run's variants, with paired comparisons.

For a run folder every variant is a set, its images paired with the other variants' by ``(prompt, seed)``;
each variant is compared with ``baseline``: per-image metrics (CLIP score) by a paired bootstrap over the
shared pairs, set metrics (FID, KID, CMMD) against ``--reference`` real images by a paired bootstrap over
images. Without a reference set, set metrics measure each variant's shift from ``baseline`` and carry that
label; there is then no better/worse verdict. Images the sanity check flags (NaN, black, constant) are left
out of every other metric and counted, never averaged in.

Toy world (:mod:`sdxl_core.toy`): when every prompt is a toy-world caption, ``oracle_accuracy`` judges each
image against its prompt with the exact oracle (1 correct, 0 not; a set's value is the mean, its per-check
accuracies are kept) and is compared with ``baseline`` like CLIP score. It is in the default metric set only
for such prompts (:func:`resolve_metrics`); asked for on other prompts it is an error. With it, the document
gains ``meta_evaluation``: how far every other metric agrees with the oracle (:mod:`sdxl_core.meta_eval`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from sdxl_core.errors import InvalidConfigError
from sdxl_core.score_inputs import ImageSet, collect_sets, load_images

SCHEMA = "sdxl-bench score v1"
# Scoring runs in one process (the main one of a distributed run, after the others finished), so metrics never
# synchronise state across processes: sync_on_compute=False.
from sdxl_core.score_args import DEFAULT_METRICS, METRICS
BASELINE = "baseline"
ORACLE = "oracle_accuracy"


@dataclass(frozen=True)
class ScoreConfig:
    fake: str
    reference: str | None = None
    prompts: str | None = None
    # None: DEFAULT_METRICS, plus oracle_accuracy when every prompt is a toy-world caption (resolve_metrics)
    metrics: tuple[str, ...] | None = None
    features: str = "inception"
    feature_weights: str | None = None
    clip_model: str = "ViT-L-14"
    clip_pretrained: str | None = None  # a tag such as "openai", or a local weights file
    clip_smoke: bool = False
    # Weights are fetched from a hub only when the user named them (--clip-pretrained), never for a default.
    clip_download: bool = False
    resolution: int | None = None  # resize (centre crop) before the feature networks; None: as stored
    resamples: int = 1000
    seed: int = 0
    device: str = "cpu"
    cache_dir: str | None = None

    def check(self) -> None:
        if self.metrics is not None:
            unknown = [m for m in self.metrics if m not in METRICS]
            if unknown or not self.metrics:
                raise InvalidConfigError(f"--metrics {','.join(self.metrics)!r}: choose from {', '.join(METRICS)}")
        from sdxl_core.metrics.features import FEATURE_NETWORKS

        if self.features not in FEATURE_NETWORKS:
            raise InvalidConfigError(f"--features {self.features!r}: choose from {', '.join(FEATURE_NETWORKS)}")
        if self.resamples < 1000:
            raise InvalidConfigError(f"--resamples {self.resamples}: use at least 1000 for a 95% interval")


def parse_metrics(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())


def resolve_metrics(metrics: tuple[str, ...] | None, prompts: list[str | None]) -> tuple[str, ...]:
    """The metrics to compute: ``metrics`` as given, or by default :data:`DEFAULT_METRICS` plus
    ``oracle_accuracy`` when every prompt is a toy-world caption
    (:func:`sdxl_core.toy.oracle.is_toy_prompt_set`)."""
    if metrics is not None:
        return tuple(metrics)
    from sdxl_core.toy.oracle import is_toy_prompt_set

    return DEFAULT_METRICS + ((ORACLE,) if is_toy_prompt_set(prompts) else ())


def _check_oracle_prompts(sets: list[ImageSet]) -> None:
    """Every image of ``sets`` has a prompt in the toy-world grammar, or an error naming the first that has not."""
    from sdxl_core.toy.oracle import toy_caption

    checked: set[str] = set()
    for s in sets:
        for im in s.images:
            if im.prompt is None:
                raise InvalidConfigError(f"oracle_accuracy needs the toy-world caption of every image; "
                                         f"{im.path.name} has no prompt: give --prompts FILE or a metadata.jsonl "
                                         f"with file and prompt, or drop oracle_accuracy from --metrics")
            if im.prompt in checked:
                continue
            try:
                toy_caption(im.prompt)
            except InvalidConfigError as exc:
                raise InvalidConfigError(
                    f"oracle_accuracy applies only to toy-world prompts; prompt {im.prompt!r} (image "
                    f"{im.path.name}) is not one ({exc}): drop oracle_accuracy from --metrics") from None
            checked.add(im.prompt)


def fid_of_features(real: np.ndarray, fake: np.ndarray) -> float:
    """FID between two feature sets, exactly, in the cheaper of two forms.

    ``tr sqrt(S1^1/2 S2 S1^1/2)`` equals the nuclear norm of ``A1 A2^T / sqrt((n1-1)(n2-1))`` for centred
    feature matrices ``A1``, ``A2`` (the non-zero eigenvalues of ``S1 S2`` are the squared singular values of
    that n1 x n2 matrix), so sets smaller than the feature dimension cost O(n1 n2 D) instead of O(D^3)."""
    from sdxl_core.metrics.set_metrics import FID

    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    n1, n2, d = real.shape[0], fake.shape[0], real.shape[1]
    if max(n1, n2) >= d:
        metric = FID(dim=d, sync_on_compute=False)
        metric.update_features(real, real=True)
        metric.update_features(fake, real=False)
        return metric.compute().value
    a1, a2 = real - real.mean(0), fake - fake.mean(0)
    trace1 = (a1 * a1).sum() / (n1 - 1)
    trace2 = (a2 * a2).sum() / (n2 - 1)
    cross = np.linalg.svd(a1 @ a2.T, compute_uv=False).sum() / np.sqrt((n1 - 1) * (n2 - 1))
    return float(max(((real.mean(0) - fake.mean(0)) ** 2).sum() + trace1 + trace2 - 2 * cross, 0.0))


def _set_metric_fn(name: str) -> Callable[[np.ndarray, np.ndarray], float]:
    from sdxl_core.metrics.set_metrics import kid_all_pairs, mmd_rbf

    if name == "fid":
        return fid_of_features
    if name == "cmmd":
        return lambda real, fake: mmd_rbf(real, fake)
    # One MMD^2 on all pairs: KID's subset averaging (100 subsets when the sets differ in size) inside a
    # 1000-resample bootstrap cost minutes against a reference set.
    return kid_all_pairs


class _Scorer:
    def __init__(self, config: ScoreConfig) -> None:
        self.c = config
        self._network = None
        self._clip = None

    def network(self) -> Any:
        if self._network is None:
            from sdxl_core.metrics.features import get_feature_network

            self._network = get_feature_network(self.c.features, self.c.feature_weights, self.c.device)
        return self._network

    def clip(self) -> Any:
        if self._clip is None:
            from sdxl_core.metrics.clip import ClipEmbedder

            self._clip = ClipEmbedder(self.c.clip_model, self.c.clip_pretrained, smoke=self.c.clip_smoke,
                                      device=self.c.device, allow_download=self.c.clip_download)
        return self._clip

    def features(self, files: list[Path], kind: str) -> np.ndarray:
        """Features of generated images, prepared exactly as the reference set's (same loader and resize)."""
        from sdxl_core.metrics.reference import features_of_files

        net = self.clip() if kind == "clip" else self.network()
        return np.asarray(features_of_files(net, files, self.c.resolution), dtype=np.float64)

    def reference_features(self, kind: str) -> np.ndarray:
        from sdxl_core.metrics.reference import reference_features

        net = self.clip() if kind == "clip" else self.network()
        ref = reference_features(self.c.reference, net, resolution=self.c.resolution, cache_dir=self.c.cache_dir)
        return np.asarray(ref.features, dtype=np.float64)


def score(config: ScoreConfig) -> dict[str, Any]:
    """Score ``config.fake`` and return the JSON-ready result document."""
    config.check()
    t0 = time.perf_counter()
    sets = collect_sets(config.fake, config.prompts)
    config = replace(config, metrics=resolve_metrics(config.metrics, [p for s in sets for p in s.prompts]))
    doc: dict[str, Any] = {"schema": SCHEMA, "config": _config_dict(config)}
    doc.update(score_sets(sets, config))
    doc["seconds"] = round(time.perf_counter() - t0, 3)
    return doc


def score_sets(sets: list[ImageSet], config: ScoreConfig) -> dict[str, Any]:
    """``metrics`` (their MetricInfo), ``sets`` (values per set), ``comparisons`` (each set against
    ``baseline``) and ``warnings`` for ``sets``, plus ``meta_evaluation`` with ``oracle_accuracy``; shared by
    ``sdxl-bench score`` and the bench run store."""
    config.check()
    config = replace(config, metrics=resolve_metrics(config.metrics, [p for s in sets for p in s.prompts]))
    if config.reference is not None and not Path(config.reference).expanduser().is_dir():
        raise InvalidConfigError(f"--reference {config.reference!r} is not a folder of real images")
    if ORACLE in config.metrics:
        _check_oracle_prompts(sets)
    if "clip" in config.metrics:
        missing = [im.path.name for s in sets for im in s.images if not im.prompt]
        if missing:
            raise InvalidConfigError(f"CLIP score needs a prompt per image; {len(missing)} have none (e.g. "
                                     f"{missing[0]}): give --prompts FILE or a metadata.jsonl with file and prompt")
    scorer = _Scorer(config)
    doc: dict[str, Any] = {"metrics": {}, "sets": {}, "comparisons": [], "warnings": []}
    kept = _sanity(sets, doc)
    if "clip" in config.metrics:
        _clip_scores(scorer, kept, doc)
    if ORACLE in config.metrics:
        _oracle_scores(scorer, kept, doc)
    for name in ("fid", "kid", "cmmd"):
        if name in config.metrics:
            _set_metric(scorer, name, kept, doc)
    if ORACLE in config.metrics:
        from sdxl_core.meta_eval import meta_evaluate

        doc["meta_evaluation"] = meta_evaluate(doc, n_resamples=max(config.resamples, 1000), seed=config.seed)
    return doc


def _config_dict(c: ScoreConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(c)


def _sanity(sets: list[ImageSet], doc: dict[str, Any]) -> list[ImageSet]:
    """Flag broken images; return the sets without them (every metric then leaves them out)."""
    from sdxl_core.metrics.sanity import ImageSanity, image_sanity

    doc["metrics"]["sanity"] = ImageSanity().info.as_dict()
    kept = []
    for s in sets:
        results = [image_sanity(img) for img in load_images(s)]
        flagged = [{"file": str(im.path), "key": list(im.key), "flags": list(r.flags)}
                   for im, r in zip(s.images, results) if not r.ok]
        doc["sets"].setdefault(s.name, {})["sanity"] = {"n": len(results), "n_flagged": len(flagged),
                                                       "flagged": flagged}
        kept.append(ImageSet(s.name, tuple(im for im, r in zip(s.images, results) if r.ok)))
        if flagged:
            doc["warnings"].append(f"{s.name}: {len(flagged)} of {len(results)} images flagged by the sanity "
                                   f"check and left out of every metric")
    return kept


def _clip_scores(scorer: _Scorer, sets: list[ImageSet], doc: dict[str, Any]) -> None:
    from sdxl_core.metrics.clip import ClipScore

    per_set: dict[str, dict[tuple[Any, ...], float]] = {}
    for s in sets:
        metric = ClipScore(embedder=scorer.clip(), sync_on_compute=False)
        if s.images:
            metric.update(load_images(s), s.prompts)
        out = metric.compute() if s.images else {"clip_score": None, "per_image": [], "truncated": []}
        doc["metrics"]["clip"] = metric.info.as_dict()
        values = [float(v) for v in out["per_image"]]
        per_set[s.name] = {im.key: v for im, v in zip(s.images, values)}
        doc["sets"][s.name]["clip"] = {"mean": out["clip_score"] if values else None, "n": len(values),
                                       "per_image": [{"key": list(im.key), "value": v}
                                                     for im, v in zip(s.images, values)],
                                       "truncated": out.get("truncated", []), "smoke": bool(out.get("smoke"))}
    _compare_with_baseline(scorer, "clip", per_set, doc)


def _compare_with_baseline(scorer: _Scorer, metric: str, per_set: dict[str, dict[tuple[Any, ...], float]],
                           doc: dict[str, Any], *, higher_is_better: bool = True) -> None:
    """Each set against ``baseline`` on a per-image metric: a paired bootstrap over the (prompt, seed) keys
    both share (:func:`sdxl_core.stats.paired_difference`), appended to ``doc["comparisons"]``."""
    from sdxl_core.stats import paired_difference

    base = per_set.get(BASELINE)
    if base is None:
        return
    for name, values in per_set.items():
        if name == BASELINE:
            continue
        shared = sorted(set(base) & set(values))
        if len(shared) < 2:
            doc["warnings"].append(f"{metric}: {name} shares {len(shared)} images with baseline; no comparison")
            continue
        comp = paired_difference([base[k] for k in shared], [values[k] for k in shared],
                                 higher_is_better=higher_is_better, n_resamples=max(scorer.c.resamples, 1000),
                                 seed=scorer.c.seed, metric=metric, reference=BASELINE, candidate=name,
                                 p_value_test="none")
        doc["comparisons"].append(comp.as_dict())


def _oracle_scores(scorer: _Scorer, sets: list[ImageSet], doc: dict[str, Any]) -> None:
    """``oracle_accuracy`` per set: per image 1.0 (the oracle judges it correct for its prompt) or 0.0, with its
    per-check verdicts; the set's ``value`` is the mean, ``per_check`` each check's pass rate. Each set is
    compared with ``baseline`` as CLIP score is. Prompts were checked by :func:`_check_oracle_prompts`."""
    from sdxl_core.toy.oracle import CHECKS, OracleAccuracy, toy_caption

    captions = {p: toy_caption(p) for p in dict.fromkeys(p for s in sets for p in s.prompts if p is not None)}
    per_set: dict[str, dict[tuple[Any, ...], float]] = {}
    for s in sets:
        metric = OracleAccuracy(sync_on_compute=False)
        doc["metrics"][ORACLE] = metric.info.as_dict()
        entry: dict[str, Any] = {"value": None, "n": 0, "n_correct": 0, "per_check": {c: None for c in CHECKS},
                                 "per_image": []}
        if s.images:
            metric.update(load_images(s), [captions[p] for p in s.prompts])
            out = metric.compute()
            entry.update(value=out["accuracy"], n=out["n"], n_correct=out["n_correct"], per_check=out["per_check"],
                         per_image=[{"key": list(im.key), "value": 1.0 if r["correct"] else 0.0,
                                     "checks": r["checks"]} for im, r in zip(s.images, out["per_image"])])
        per_set[s.name] = {im.key: item["value"] for im, item in zip(s.images, entry["per_image"])}
        doc["sets"][s.name][ORACLE] = entry
    _compare_with_baseline(scorer, ORACLE, per_set, doc)


def _set_metric(scorer: _Scorer, name: str, sets: list[ImageSet], doc: dict[str, Any]) -> None:
    from sdxl_core.metrics.set_metrics import sample_size_warning, set_metric_info
    from sdxl_core.stats import set_metric_difference

    kind = "clip" if name == "cmmd" else "features"
    network = None if name == "cmmd" else scorer.c.features
    against = "reference" if scorer.c.reference else "baseline"
    info = set_metric_info(name, network, against=against).as_dict()
    if name == "cmmd" and scorer.clip().smoke:
        info["label"] = "; ".join(x for x in (info.get("label"), "smoke (random CLIP)") if x)
    doc["metrics"][name] = info
    feats = {s.name: scorer.features([im.path for im in s.images], kind) for s in sets if len(s.images) >= 2}
    fn = _set_metric_fn(name)
    if scorer.c.reference:
        real = scorer.reference_features(kind)
    elif BASELINE in feats:
        real = feats[BASELINE]
    else:
        doc["warnings"].append(f"{name}: no --reference and no baseline set to compare with; not computed")
        return
    dim = real.shape[1]
    for set_name, f in feats.items():
        if against == "baseline" and set_name == BASELINE:
            continue
        warning = sample_size_warning(min(len(f), len(real)), dim, name)
        doc["sets"][set_name][name] = {"value": fn(real, f), "n": len(f), "n_real": len(real),
                                       "warnings": [warning] if warning else []}
    if against != "reference" or BASELINE not in feats:
        return
    keys = {s.name: [im.key for im in s.images] for s in sets}
    for set_name, f in feats.items():
        if set_name == BASELINE:
            continue
        ref_pos = {k: i for i, k in enumerate(keys[BASELINE])}
        cand_pos = {k: i for i, k in enumerate(keys[set_name])}
        shared = sorted(set(ref_pos) & set(cand_pos))
        ref_idx = [ref_pos[k] for k in shared]
        cand_idx = [cand_pos[k] for k in shared]
        comp = set_metric_difference(feats[BASELINE][ref_idx], f[cand_idx], fn, real_features=real,
                                     higher_is_better=False, n_resamples=max(scorer.c.resamples, 1000),
                                     seed=scorer.c.seed, metric=name, reference=BASELINE, candidate=set_name)
        doc["comparisons"].append(comp.as_dict())


def main(args: Any) -> int:
    from sdxl_core.atomicio import write_json_atomic

    config = ScoreConfig(fake=args.fake, reference=args.reference, prompts=args.prompts,
                         metrics=None if args.metrics is None else parse_metrics(args.metrics), features=args.features,
                         feature_weights=args.feature_weights, clip_model=args.clip_model,
                         clip_pretrained=args.clip_pretrained, clip_smoke=args.clip_smoke,
                         clip_download=args.clip_pretrained is not None,
                         resolution=args.resolution, resamples=args.resamples, seed=args.seed, device=args.device)
    doc = score(config)
    if args.json:
        write_json_atomic(args.json, doc)
    print(render_summary(doc))
    return 0


def render_summary(doc: dict[str, Any]) -> str:
    lines = []
    for set_name, values in doc["sets"].items():
        parts = []
        for metric, v in values.items():
            label = doc["metrics"].get(metric, {}).get("label")
            if metric == "sanity":
                parts.append(f"sanity {v['n_flagged']}/{v['n']} flagged")
            elif metric == "clip" and v.get("mean") is not None:
                parts.append(f"clip {v['mean']:.3f}" + (" (smoke)" if v.get("smoke") else ""))
            elif isinstance(v, dict) and v.get("value") is not None:
                parts.append(f"{metric} {v['value']:.4g}" + (f" ({label})" if label else ""))
        lines.append(f"{set_name}: " + ", ".join(parts))
    for c in doc["comparisons"]:
        lines.append(f"{c['metric']}: {c['candidate']} - {c['reference']} = {c['estimate']:.4g} "
                     f"[{c['ci_low']:.4g}, {c['ci_high']:.4g}] {c['verdict']}")
    for row in (doc.get("meta_evaluation") or {}).get("per_image", []) + \
            (doc.get("meta_evaluation") or {}).get("ordering", []):
        lines.append(f"trust: {row['summary']}")
    set_warnings = [w for values in doc["sets"].values() for v in values.values() if isinstance(v, dict)
                    for w in v.get("warnings", [])]
    lines += [f"warning: {w}" for w in dict.fromkeys(doc["warnings"] + set_warnings)]
    return "\n".join(lines)
