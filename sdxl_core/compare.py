"""Regression tracking across runs: compare two run documents (LoRA versions, commits) metric by metric.

``sdxl-bench compare RUN_A RUN_B`` and the pytest gate (``--sdxl-compare RUN --sdxl-fail-on clip:-0.5``) read
two ``results.json`` documents (:mod:`sdxl_core.results_schema`); **A is the reference, B the candidate** and
every delta is ``B - A``.

* **Groups** are paired by name, and a LoRA group whose LoRA *name* matches but whose version differs
  (``wrong_lora[wrong@v1]`` in A, ``wrong_lora[wrong@v2]`` in B) is paired too: a new LoRA version.
* **Per-image metrics** (numeric values in the case rows' ``metrics``): paired bootstrap of ``B - A``
  (:func:`sdxl_core.stats.paired_difference`) over the ``ok`` cases both runs rendered for the same prompt and
  seed. Prompts are matched by text; a text listed several times is matched by its order of occurrence (index).
* **Set metrics** (``sets[group][metric]["value"]``): delta and relative delta. An interval only when both
  sides carry ``ci_low``/``ci_high``: ``delta +- sqrt(hA^2 + hB^2)`` with ``h`` each interval's half-width
  (independent runs, roughly symmetric intervals: approximate); else ``interval`` is null, verdict ``no interval``.
* A metric whose ``label`` differs between the runs (smoke vs real CLIP, effnet vs Inception features) gets
  no verdict (``not comparable: labels differ``). Different generation settings or models give a warning.

Fail rules (``METRIC:[+|-]THRESHOLD[%]``), see :class:`FailRule`.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdxl_core.errors import InvalidConfigError
from sdxl_core.results_schema import RESULTS_FILE, check_document, group_name
from sdxl_core.stats import decide_verdict, paired_difference

NOT_COMPARABLE = "not comparable: labels differ"
NO_INTERVAL = "no interval"
TOO_FEW = "too few shared cases"
NO_DIRECTION = "direction unknown"
_DEFAULT_HIGHER = {"clip": True, "clip_score": True, "fid": False, "kid": False, "cmmd": False}
_MODEL_KEYS = ("base", "refiner", "vae")


def load_run(path: str | Path) -> dict[str, Any]:
    """The validated result document of a run folder or of a ``results.json`` path."""
    p = Path(path).expanduser()
    file = p / RESULTS_FILE if p.is_dir() else p
    if not file.is_file():
        raise InvalidConfigError(f"{file}: no such file; pass a run folder (reports/<run_id>) or its {RESULTS_FILE}")
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidConfigError(f"{file}: not valid JSON ({exc}); re-run the benchmark to rewrite it") from None
    return check_document(doc, str(file))


def _groups(doc: dict[str, Any]) -> list[str]:
    names = [group_name(c["variant"], c["lora"]) for c in doc["cases"]] + list(doc["sets"])
    return list(dict.fromkeys(names))


def _split(group: str) -> tuple[str, str | None]:
    """``(variant, lora name)`` of a group; ``wrong_lora[wrong@v1]`` -> ``("wrong_lora", "wrong")``."""
    m = re.fullmatch(r"(.*)\[(.*)\]", group)
    return (m.group(1), m.group(2).split("@", 1)[0]) if m else (group, None)


def match_groups(doc_a: dict[str, Any], doc_b: dict[str, Any]) -> list[tuple[str, str]]:
    """Pairs ``(group in A, group in B)``: equal names, then LoRA groups of one variant and LoRA name whose
    version differs. When one side has a single such group left it is paired with each left on the other side;
    several on both sides stay unmatched (ambiguous). Groups in no pair: see ``compare_runs(...)["unmatched"]``."""
    ga, gb = _groups(doc_a), _groups(doc_b)
    pairs = [(g, g) for g in ga if g in gb]
    left_a, left_b = [g for g in ga if g not in gb], [g for g in gb if g not in ga]
    for g in left_a:
        key = _split(g)
        if key[1] is None:
            continue
        same_a = [x for x in left_a if _split(x) == key]
        same_b = [x for x in left_b if _split(x) == key]
        if same_b and (len(same_a) == 1 or len(same_b) == 1):
            pairs += [(g, x) for x in same_b]
    return pairs


def _per_image(doc: dict[str, Any], group: str, metric: str) -> dict[tuple[str, int, int], float]:
    """``{(prompt text, occurrence of that text, seed): value}`` of a group's ok cases (the last one wins)."""
    seen: dict[str, list[int]] = {}
    for c in sorted(doc["cases"], key=lambda c: c["prompt_index"]):
        idx = seen.setdefault(c["prompt"], [])
        if c["prompt_index"] not in idx:
            idx.append(c["prompt_index"])
    out: dict[tuple[str, int, int], float] = {}
    for c in doc["cases"]:
        v = (c.get("metrics") or {}).get(metric)
        if c["status"] == "ok" and group_name(c["variant"], c["lora"]) == group and _num(v) and math.isfinite(v):
            out[(c["prompt"], seen[c["prompt"]].index(c["prompt_index"]), int(c["seed"]))] = float(v)
    return out


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fin(v: Any) -> float | None:
    return float(v) if _num(v) and math.isfinite(v) else None


def _info(doc_a: dict[str, Any], doc_b: dict[str, Any], metric: str) -> tuple[bool | None, Any, Any]:
    """``(higher_is_better or None, label in A, label in B)``."""
    ia, ib = doc_a["metrics"].get(metric) or {}, doc_b["metrics"].get(metric) or {}
    hib = ib.get("higher_is_better", ia.get("higher_is_better", _DEFAULT_HIGHER.get(metric)))
    return hib, ia.get("label"), ib.get("label")


def _row(ga: str, gb: str, metric: str, kind: str, a: float | None, b: float | None, **kw: Any) -> dict[str, Any]:
    delta = b - a if a is not None and b is not None else None
    rel = delta / abs(a) if delta is not None and a else None
    row = {"group_a": ga, "group_b": gb, "metric": metric, "kind": kind, "a": a, "b": b, "delta": delta,
           "relative_delta": rel, "ci_low": None, "ci_high": None, "n": None, "verdict": NO_INTERVAL,
           "warnings": [], "comparison": None}
    row.update(kw)
    return row


def _lora_of(doc: dict[str, Any], group: str) -> dict[str, Any] | None:
    m = re.fullmatch(r".*\[(.*)\]", group)
    if not m:
        return None
    rec = next((r for r in doc["loras"] if r.get("label", f"{r.get('name')}@{r.get('version')}") == m.group(1)), {})
    return {"label": m.group(1), "sha256": rec.get("sha256")}


def _provenance(doc: dict[str, Any]) -> dict[str, Any]:
    return {"run_id": doc["run_id"], "created_at": doc["created_at"], "commit": (doc["git"] or {}).get("commit"),
            "dirty": (doc["git"] or {}).get("dirty"),
            "loras": {r.get("label", f"{r.get('name')}@{r.get('version')}"): r.get("sha256") for r in doc["loras"]}}


def _setting_warnings(doc_a: dict[str, Any], doc_b: dict[str, Any]) -> list[str]:
    ca, cb = doc_a["config"] or {}, doc_b["config"] or {}
    sa, sb = ca.get("settings") or {}, cb.get("settings") or {}
    diffs = [f"{k} {sa.get(k)!r} -> {sb.get(k)!r}" for k in dict.fromkeys([*sa, *sb]) if sa.get(k) != sb.get(k)]
    diffs += [f"{k} {ca.get(k)!r} -> {cb.get(k)!r}" for k in _MODEL_KEYS if ca.get(k) != cb.get(k)]
    return [f"generation settings differ ({', '.join(diffs)}): deltas mix the change under test with these"] \
        if diffs else []


def compare_runs(doc_a: dict[str, Any], doc_b: dict[str, Any], *, n_resamples: int = 10000,
                 seed: int = 0) -> dict[str, Any]:
    """JSON-ready comparison of run B against run A: ``a``/``b`` provenance, ``pairs`` (with each side's LoRA
    sha256), ``unmatched`` groups, ``rows`` (one per group pair and metric: ``a``, ``b``, ``delta``,
    ``relative_delta``, ``ci_low``/``ci_high``, ``n``, ``verdict``, ``warnings``, ``higher_is_better``, the
    labels and, per-image, ``comparison`` = ``Comparison.as_dict()``) and ``warnings``."""
    pairs = match_groups(doc_a, doc_b)
    warnings = _setting_warnings(doc_a, doc_b)
    rows: list[dict[str, Any]] = []
    pair_docs = []
    names = [k for c in doc_a["cases"] + doc_b["cases"] for k, v in (c.get("metrics") or {}).items() if _num(v)]
    names = list(dict.fromkeys(names))
    for ga, gb in pairs:
        la, lb = _lora_of(doc_a, ga), _lora_of(doc_b, gb)
        pair_docs.append({"group_a": ga, "group_b": gb, "lora_a": la, "lora_b": lb})
        if la and lb and la["label"] == lb["label"] and la["sha256"] != lb["sha256"]:
            warnings.append(f"{la['label']}: sha256 differs between the runs ({la['sha256']} vs {lb['sha256']}): "
                            "the file changed under the same version; give the new file a new version")
        for metric in names:
            rows.append(_per_image_row(doc_a, doc_b, ga, gb, metric, n_resamples, seed))
        sa, sb = doc_a["sets"].get(ga) or {}, doc_b["sets"].get(gb) or {}
        for metric in [m for m in sa if m in sb and m not in names]:
            rows.append(_set_row(doc_a, doc_b, ga, gb, metric, sa[metric], sb[metric]))
    rows = [r for r in rows if r is not None]
    used_a, used_b = {p[0] for p in pairs}, {p[1] for p in pairs}
    unmatched = {"a": [g for g in _groups(doc_a) if g not in used_a], "b": [g for g in _groups(doc_b) if g not in used_b]}
    for side, gs in unmatched.items():
        if gs:
            warnings.append(f"groups only in run {side.upper()} (not compared): {', '.join(gs)}")
    return {"kind": "sdxl-bench comparison", "a": _provenance(doc_a), "b": _provenance(doc_b), "pairs": pair_docs,
            "unmatched": unmatched, "rows": rows, "warnings": warnings,
            "metrics": {"a": doc_a["metrics"], "b": doc_b["metrics"]},
            "settings": {"n_resamples": n_resamples, "seed": seed, "direction": "delta = B - A"}}


def _per_image_row(doc_a: dict[str, Any], doc_b: dict[str, Any], ga: str, gb: str, metric: str, n_resamples: int,
                   seed: int) -> dict[str, Any] | None:
    va, vb = _per_image(doc_a, ga, metric), _per_image(doc_b, gb, metric)
    if not va and not vb:
        return None
    hib, label_a, label_b = _info(doc_a, doc_b, metric)
    shared = [k for k in va if k in vb]
    mean = (lambda v: sum(v[k] for k in shared) / len(shared)) if shared else (lambda v: None)
    row = _row(ga, gb, metric, "per_image", mean(va), mean(vb), n=len(shared), higher_is_better=hib,
               label_a=label_a, label_b=label_b)
    unpaired = len(va) + len(vb) - 2 * len(shared)
    if unpaired:
        row["warnings"].append(f"{unpaired} case(s) without a partner (prompt/seed only in one run) left out")
    if label_a != label_b:
        row["verdict"] = NOT_COMPARABLE
    elif len(shared) < 2:
        row["verdict"] = TOO_FEW
    else:
        comp = paired_difference([va[k] for k in shared], [vb[k] for k in shared], higher_is_better=bool(hib),
                                 n_resamples=n_resamples, seed=seed, metric=metric, reference=ga, candidate=gb,
                                 p_value_test="none").as_dict()
        row.update(ci_low=comp["ci_low"], ci_high=comp["ci_high"], comparison=comp,
                   verdict=comp["verdict"] if hib is not None else NO_DIRECTION)
        row["warnings"] += comp["warnings"]
    return row


def _set_row(doc_a: dict[str, Any], doc_b: dict[str, Any], ga: str, gb: str, metric: str, ea: Any,
             eb: Any) -> dict[str, Any] | None:
    if not (isinstance(ea, dict) and isinstance(eb, dict)) or _fin(ea.get("value")) is None \
            or _fin(eb.get("value")) is None:
        return None
    hib, label_a, label_b = _info(doc_a, doc_b, metric)
    row = _row(ga, gb, metric, "set", _fin(ea["value"]), _fin(eb["value"]), n=[ea.get("n"), eb.get("n")],
               higher_is_better=hib, label_a=label_a, label_b=label_b,
               warnings=[*(ea.get("warnings") or []), *(eb.get("warnings") or [])])
    bounds = [_fin(e.get(k)) for e in (ea, eb) for k in ("ci_low", "ci_high")]
    if label_a != label_b:
        row["verdict"] = NOT_COMPARABLE
    elif None not in bounds:
        half = math.hypot((bounds[1] - bounds[0]) / 2, (bounds[3] - bounds[2]) / 2)  # type: ignore[operator]
        row.update(ci_low=row["delta"] - half, ci_high=row["delta"] + half)
        row["verdict"] = decide_verdict(row["ci_low"], row["ci_high"], higher_is_better=bool(hib)) \
            if hib is not None else NO_DIRECTION
    return row


@dataclass(frozen=True)
class FailRule:
    """``METRIC:[+|-]THRESHOLD[%]``: fail when the metric moved in the *bad* direction by more than THRESHOLD.

    The sign names the bad direction: ``clip:-0.5`` fails when ``B - A < -0.5`` (CLIP dropped by more than 0.5),
    ``fid:+5%`` when ``B - A > 0.05 * |A|`` (FID rose by more than 5 % of A's value), ``kid:+0.01`` when
    ``B - A > 0.01``. A percentage is of ``|A|`` (A = 0: any move in the bad direction fails). A rule is
    checked on every matched group pair carrying its metric and fails on each that fails. Without a sign the bad direction is the metric's (a drop for higher-is-better). A sign that
    contradicts the metric's direction (``clip:+0.5``) is refused. The point estimate decides; each message
    also says whether the interval lies wholly beyond the threshold (``confident``) or not (``may be noise``).
    """

    metric: str
    threshold: float
    sign: int  # -1: a drop is bad, +1: a rise is bad, 0: the metric's direction decides
    percent: bool
    text: str


def parse_fail_on(text: str) -> FailRule:
    """Parse ``clip:-0.5``, ``fid:+5%``, ``kid:+0.01``; an :class:`InvalidConfigError` naming the fix."""
    m = re.fullmatch(r"\s*([^:\s]+)\s*:\s*([+-]?)\s*((?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*(%?)\s*", str(text))
    if not m or not math.isfinite(float(m.group(3))):
        raise InvalidConfigError(f"fail rule {text!r}: write METRIC:[+|-]THRESHOLD[%], e.g. clip:-0.5 (fail when "
                                 "CLIP drops by more than 0.5) or fid:+5% (fail when FID rises by more than 5%)")
    sign = {"+": 1, "-": -1, "": 0}[m.group(2)]
    return FailRule(m.group(1), float(m.group(3)), sign, bool(m.group(4)), str(text).strip())


def _resolve(rule: FailRule, doc: dict[str, Any]) -> str:
    present = list(dict.fromkeys(r["metric"] for r in doc["rows"]))
    aliases = {k: k for k in present}
    for side in ("a", "b"):
        for k, info in (doc.get("metrics", {}).get(side) or {}).items():
            if k in aliases and isinstance(info, dict):
                aliases.setdefault(str(info.get("name")), k)
    if rule.metric not in aliases:
        raise InvalidConfigError(f"fail rule {rule.text!r}: no metric {rule.metric!r} in the comparison; metrics "
                                 f"present: {', '.join(present) or 'none'}")
    return aliases[rule.metric]


def check_gate(comparison_doc: dict[str, Any], rules: Iterable[FailRule | str]) -> list[str]:
    """Failure messages of ``rules`` (:class:`FailRule` or text) on a :func:`compare_runs` document; empty when
    all pass. A rule also fails where its metric cannot be judged (labels differ, no value)."""
    rules = [r if isinstance(r, FailRule) else parse_fail_on(r) for r in rules]
    if rules and not comparison_doc["pairs"]:
        return ["no group of run B matches a group of run A: nothing to gate on; compare runs of the same variants"]
    failures = []
    for rule in rules:
        metric = _resolve(rule, comparison_doc)
        for row in (r for r in comparison_doc["rows"] if r["metric"] == metric):
            where = f"{rule.text} on {row['group_b']} vs {row['group_a']}"
            hib = row.get("higher_is_better")
            bad = rule.sign or (None if hib is None else (-1 if hib else 1))
            if bad is None:
                raise InvalidConfigError(f"fail rule {rule.text!r}: the direction of {metric!r} is unknown; give "
                                         "the sign, e.g. -0.5 (a drop is bad) or +5% (a rise is bad)")
            if hib is not None and bad == (1 if hib else -1):
                fix = f"{rule.metric}:{'-' if hib else '+'}{rule.threshold:g}{'%' if rule.percent else ''}"
                raise InvalidConfigError(f"fail rule {rule.text!r}: {metric} is {'higher' if hib else 'lower'}-is-"
                                         f"better, so a {'rise' if hib else 'drop'} is an improvement; write {fix}")
            if row["verdict"] == NOT_COMPARABLE or row["delta"] is None:
                failures.append(f"{where}: cannot check ({row['verdict'] if row['delta'] is not None else 'no value'})")
                continue
            limit = rule.threshold / 100 * abs(row["a"]) if rule.percent else rule.threshold
            if bad * row["delta"] > limit:
                lo, hi = row["ci_low"], row["ci_high"]
                sure = ("no interval" if lo is None else
                        "confident: the interval lies beyond the threshold" if min(bad * lo, bad * hi) > limit
                        else "may be noise: the interval reaches the threshold")
                failures.append(f"{where}: {metric} {row['a']:.4g} -> {row['b']:.4g} (delta {row['delta']:+.4g}, "
                                f"allowed {'+' if bad > 0 else '-'}{limit:.4g}; {sure})")
    return failures


def gate_against(run_dir_new: str | Path, run_ref: str | Path, rules: Sequence[FailRule | str]) -> list[str]:
    """The pytest gate: failure messages of ``rules`` for the new run (B) against the reference run (A)."""
    rules = [r if isinstance(r, FailRule) else parse_fail_on(r) for r in rules]
    return check_gate(compare_runs(load_run(run_ref), load_run(run_dir_new)), rules)


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def render_comparison(doc: dict[str, Any]) -> str:
    """Plain-text table (group, metric, A, B, delta, interval, verdict), then provenance and warnings."""
    head = ("group", "metric", "A", "B", "delta", "interval", "verdict")
    body = [(r["group_a"] if r["group_a"] == r["group_b"] else f"{r['group_a']} -> {r['group_b']}", r["metric"],
             _fmt(r["a"]), _fmt(r["b"]), "-" if r["delta"] is None else f"{r['delta']:+.4g}",
             "-" if r["ci_low"] is None else f"[{r['ci_low']:+.4g}, {r['ci_high']:+.4g}]", r["verdict"])
            for r in doc["rows"]]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in [head, *body]]
    for side in ("a", "b"):
        p = doc[side]
        loras = ", ".join(f"{k} {str(v)[:12]}" for k, v in p["loras"].items()) or "none"
        lines.append(f"{side.upper()}: run {p['run_id']}, commit {p['commit'] or '?'}"
                     f"{' (dirty)' if p['dirty'] else ''}, LoRAs: {loras}")
    lines += [f"warning: {w}" for w in doc["warnings"]]
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``sdxl-bench compare RUN_A RUN_B``."""
    p.add_argument("run_a", metavar="RUN_A", help="reference run: folder or results.json")
    p.add_argument("run_b", metavar="RUN_B", help="candidate run: deltas are B - A")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the comparison as JSON")
    p.add_argument("--fail-on", action="append", default=[], metavar="RULE",
                   help="METRIC:[+|-]THRESHOLD[%%], e.g. clip:-0.5 or fid:+5%%; exit 1 when one fails (repeatable)")
    p.add_argument("--resamples", type=int, default=10000, help="bootstrap resamples (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")


def main(args: argparse.Namespace) -> int:
    """Run ``sdxl-bench compare``: 1 when a fail rule fails, else 0 (bad input raises InvalidConfigError)."""
    from sdxl_core.atomicio import write_json_atomic

    rules = [parse_fail_on(t) for t in args.fail_on]
    doc = compare_runs(load_run(args.run_a), load_run(args.run_b), n_resamples=args.resamples, seed=args.seed)
    failures = check_gate(doc, rules)
    doc["gate"] = {"rules": [r.text for r in rules], "failures": failures}
    if args.json:
        write_json_atomic(args.json, doc)
    print(render_comparison(doc))
    for f in failures:
        print(f"FAIL {f}")
    return 1 if failures else 0
