"""The published HTML report of run folders, rendered from their ``results.json`` only.

:func:`render_report` writes a self-contained, relocatable folder: ``index.html`` (CSS, SVG charts and a tiny
self-check script inline, a Content-Security-Policy that loads nothing else) and ``images/<run>/...`` (hard links
or copies; every link relative). The page shows per prompt and seed the variant groups of every run side by side
(errors as error cells, flagged images marked), metric values and comparisons (interval, verdict), a chart per
metric across groups / LoRA versions / runs, latency, configuration and provenance. Metric labels (``smoke``,
``shift from baseline``, ...) stand next to their values. A run's own report is ``reports/<run_id>/report/``;
:func:`render_index` lists every run in ``reports/index.html``. User text goes through :func:`html.escape`, file
names in URLs through :func:`urllib.parse.quote`. Nothing runs at import time.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
import statistics
from dataclasses import dataclass
from html import escape
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from sdxl_core.atomicio import write_bytes_atomic, write_text_atomic
from sdxl_core.errors import InvalidConfigError
from sdxl_core.results_schema import RESULTS_FILE, check_document, group_name

REPORT_DIR = "report"
INDEX_FILE = "index.html"
IMAGES_DIR = "images"

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; } h1 { font-size: 1.5em; }
h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; } h3 { font-size: 1em; font-weight: normal; }
h3 .idx { color: #888; font-weight: bold; margin-right: .5em; } table { border-collapse: collapse; margin: .5em 0 1em; }
th, td { border: 1px solid #ddd; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.num { text-align: right; font-variant-numeric: tabular-nums; } td.cell { text-align: center; }
td.cell img { display: block; max-width: 256px; height: auto; margin: auto; } td.missing { color: #999; }
td.error, tr.error td { background: #fde8e8; color: #b00020; } .meta { color: #666; font-size: .85em; }
td.flagged { background: #fff3cd; outline: 3px solid #e0a800; outline-offset: -3px; } .warn { color: #8a5a00; }
.label, .flag { display: inline-block; background: #fff3cd; color: #7a4d00; border: 1px solid #e0a800;
  border-radius: 3px; padding: 0 .3em; font-size: .8em; margin-left: .3em; } .flag { background: #e0a800; color: #000; }
.better, .agrees { color: #0a7d28; font-weight: bold; } .worse, .disagrees { color: #b00020; font-weight: bold; }
.note { background: #fff8e1; padding: .4em .8em; border-left: 3px solid #f0b400; } figcaption { font-weight: bold; }
svg.chart text { font-size: 12px; fill: #222; } svg.chart .axis { stroke: #888; } svg.chart rect.bar { fill: #6b8fc9; }
svg.chart rect.better { fill: #3fa35b; } svg.chart rect.worse { fill: #d0505f; }
svg.chart .ci { stroke: #222; stroke-width: 2; } pre { white-space: pre-wrap; max-width: 60em; font-size: .8em; }
"""

# Counts the images that loaded and the tables that render (as data-* attributes of <body>, for the browser
# test and the "did not load" banner), and records any dialog: a report never opens one.
_SELF_CHECK_JS = (
    "window.alert=window.confirm=window.prompt=function(){var d=document.documentElement.dataset;"
    "d.dialogs=(+d.dialogs||0)+1};"
    "addEventListener('load',function(){var b=document.body.dataset,im=document.images,"
    "t=document.querySelectorAll('table'),n=0,m=0,i;"
    "for(i=0;i<im.length;i++)if(im[i].complete&&im[i].naturalWidth>0)n++;"
    "for(i=0;i<t.length;i++)if(t[i].offsetHeight>0)m++;"
    "b.imagesLoaded=n;b.images=im.length;b.tablesShown=m;b.tables=t.length;"
    "if(n<im.length){var p=document.getElementById('broken');p.hidden=false;"
    "p.textContent=(im.length-n)+' of '+im.length+' images did not load';}});")
_CSP = ("default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; script-src 'sha256-"
        + base64.b64encode(hashlib.sha256(_SELF_CHECK_JS.encode()).digest()).decode() + "'")


@dataclass(frozen=True)
class Run:
    """One run folder: its validated result document and its folder name under the report's ``images/``."""

    path: Path
    doc: dict[str, Any]
    slug: str
    run_id: str


def _e(value: Any) -> str:
    """Escaped text of any value (``None`` as an em dash)."""
    return "&mdash;" if value is None else escape(str(value), quote=True)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _order(value: Any) -> tuple[int, float, str]:
    """Sort key: numbers in numeric order, then anything else by its text."""
    return (0, float(value), "") if _finite(value) else (1, 0.0, str(value))


def _num(value: Any) -> str:
    """A number for display: 4 significant digits for floats, an em dash for None or non-finite values."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return f"{value:.4g}" if _finite(value) else "\u2014"


def _plain(value: Any) -> str:
    """A config value as one line of text: lists joined by commas, dicts as compact JSON."""
    if isinstance(value, (list, tuple)) and all(not isinstance(v, (dict, list)) for v in value):
        return ", ".join(str(v) for v in value)
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    return "\u2014" if value is None else str(value)


def _label(info: dict[str, Any] | None) -> str:
    """A metric's label as a visible badge ('' when it has none)."""
    return f' <span class="label">{_e(info["label"])}</span>' if info and info.get("label") else ""


def _info_for(key: str, metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The MetricInfo dict of a case-row metric key (``clip`` matches ``clip_score``)."""
    if key in metrics:
        return metrics[key]
    matches = [m for name, m in metrics.items() if name.startswith(key + "_")]
    return matches[0] if len(matches) == 1 else None


def _verdict_class(verdict: Any) -> str:
    """``better`` / ``worse`` for a significant verdict, else ``nsd`` (the CSS class of the cell or bar)."""
    return verdict if verdict in ("better", "worse") else "nsd"


def _metric_title(name: str, info: dict[str, Any] | None) -> str:
    if not info:
        return _e(name)
    arrow = "\u2191" if info.get("higher_is_better") else "\u2193"
    unit = f" [{_e(info['unit'])}]" if info.get("unit") else ""
    return f'{_e(info.get("display_name") or name)} {arrow}{unit}{_label(info)}'


def default_report_dir(run_dir: str | Path) -> Path:
    """Where a run's own report goes: ``<run_dir>/report`` (``reports/<run_id>/report/index.html``)."""
    return Path(run_dir) / REPORT_DIR


def load_results(run_dir: str | Path) -> dict[str, Any]:
    """The validated ``results.json`` of a run folder; :class:`InvalidConfigError` naming the file and the fix."""
    path = Path(run_dir) / RESULTS_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidConfigError(f"{path} does not exist; give a run folder (reports/<run_id>) written by an "
                                 f"sdxl-bench bench run") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidConfigError(f"{path} is not readable JSON ({exc}); re-run the bench to rewrite it") from None
    try:
        return check_document(doc, where=str(path))
    except InvalidConfigError as exc:
        raise InvalidConfigError(f"{exc} (reports read results.json as sdxl-bench writes it; re-run the bench "
                                 f"to rewrite it)") from None


def _load_runs(run_dirs: list[Path], out: Path) -> list[Run]:
    if not run_dirs:
        raise InvalidConfigError("no run folder given; pass one or more reports/<run_id> folders")
    runs: list[Run] = []
    used: set[str] = set()
    for i, run_dir in enumerate(run_dirs):
        if out.resolve() == Path(run_dir).resolve():
            raise InvalidConfigError(f"--out {out} is the run folder itself; give a separate folder such as "
                                     f"{default_report_dir(run_dir)}")
        doc = load_results(run_dir)
        slug = re.sub(r"[^A-Za-z0-9._-]", "_", str(doc.get("run_id")))[:64].lstrip(".") or f"run{i}"
        slug = slug if slug not in used else f"{slug}-{i}"
        used.add(slug)
        runs.append(Run(Path(run_dir), doc, slug, str(doc["run_id"])))
    return runs


def _image_rel(image: Any) -> PurePosixPath | None:
    """A case's image path if it is a plain relative path inside the run folder (no scheme, no ``..``)."""
    if not isinstance(image, str) or not image or "\\" in image or ":" in image or image.startswith("/"):
        return None
    rel = PurePosixPath(image)
    return None if ".." in rel.parts else rel


def _place_image(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (replacing an older file), or copy it atomically where links fail."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() and os.path.samefile(src, dst):
        return
    tmp = dst.with_name(f".{dst.name}.link")
    try:
        tmp.unlink(missing_ok=True)
        os.link(src, tmp)
        os.replace(tmp, dst)
    except OSError:
        tmp.unlink(missing_ok=True)
        write_bytes_atomic(dst, src.read_bytes())
        os.chmod(dst, 0o644)


def _cell(run: Run, case: dict[str, Any] | None, out: Path) -> str:
    """One grid cell: the image with its time and per-image metrics, or an error cell, never a broken image."""
    if case is None:
        return '<td class="cell missing">not run</td>'
    attrs = f' data-case="{_e(case["id"])}"'
    if case["status"] != "ok":
        return f'<td class="cell error"{attrs}>error: {_e(case.get("message") or "unknown error")}</td>'
    rel = _image_rel(case.get("image"))
    if rel is None or not (run.path / rel).is_file():
        return f'<td class="cell error"{attrs}>image file missing: {_e(case.get("image"))}</td>'
    parts = rel.parts[1:] if rel.parts[0] == IMAGES_DIR and len(rel.parts) > 1 else rel.parts
    dst = PurePosixPath(IMAGES_DIR, run.slug, *parts)
    _place_image(run.path / rel, out / dst)
    href = _e(quote(str(dst)))
    metrics = case.get("metrics") or {}
    flags = [str(f) for f in (metrics.get("sanity") or [])]
    meta = [f'{_num(case["seconds"])} s' if _finite(case.get("seconds")) else "&mdash;"]
    for key, value in metrics.items():
        if _finite(value):
            info = _info_for(key, run.doc["metrics"])
            meta.append(f'{_e((info or {}).get("display_name") or key)}: {_num(value)}{_label(info)}')
    flag_html = f'<div><span class="flag">flagged: {_e(", ".join(flags))}</span></div>' if flags else ""
    alt = f'{group_name(case["variant"], case["lora"])}, prompt {case["prompt_index"]}, seed {case["seed"]}'
    return (f'<td class="cell ok{" flagged" if flags else ""}"{attrs}>{flag_html}<a href="{href}">'
            f'<img src="{href}" alt="{_e(alt)}"></a><div class="meta">{"<br>".join(meta)}</div></td>')


def _grid_section(runs: list[Run], out: Path) -> str:
    """Per prompt, a table with a row per seed and a column per variant group (and run)."""
    multi = len(runs) > 1
    columns: dict[tuple[int, str], dict[str, Any]] = {}
    cases: dict[tuple[Any, ...], dict[str, Any]] = {}
    prompts: dict[tuple[Any, str], set[Any]] = {}
    for ri, run in enumerate(runs):
        for case in run.doc["cases"]:
            group = group_name(case["variant"], case["lora"])
            columns.setdefault((ri, group), case)
            key = (case["prompt_index"], str(case["prompt"]))
            prompts.setdefault(key, set()).add(case["seed"])
            cases[(ri, group, *key, case["seed"])] = case
    header = "".join(
        f'<th data-group="{_e(group)}">{_e(group)}' + (f'<div class="meta">run {_e(runs[ri].run_id)}</div>' if multi
                                                       else "")
        + f'<div class="meta">negative: {_e(first.get("negative_prompt"))}</div></th>'
        for (ri, group), first in columns.items())
    parts = ["<h2 id=\"images\">Images</h2>"]
    for n, (key, seeds) in enumerate(sorted(prompts.items(), key=lambda kv: (_order(kv[0][0]), kv[0][1]))):
        parts.append(f'<h3><span class="idx">#{_e(key[0])}</span>{_e(key[1])}</h3>')
        parts.append(f'<table class="grid" id="grid-{n}"><thead><tr><th>seed</th>{header}</tr></thead><tbody>')
        for seed in sorted(seeds, key=_order):
            cells = "".join(_cell(runs[ri], cases.get((ri, group, *key, seed)), out) for ri, group in columns)
            parts.append(f"<tr><th>{_e(seed)}</th>{cells}</tr>")
        parts.append("</tbody></table>")
    return "\n".join(parts)


def _group_values(doc: dict[str, Any]) -> dict[str, dict[str, tuple[float | None, int, list[str]]]]:
    """Per group, per metric: (value, n, warnings): set metrics from ``sets``, per-image means over ok cases."""
    values: dict[str, dict[str, tuple[float | None, int, list[str]]]] = {}
    samples: dict[tuple[str, str], list[float]] = {}
    for case in doc["cases"]:
        group = group_name(case["variant"], case["lora"])
        values.setdefault(group, {})
        for key, value in (case.get("metrics") or {}).items():
            if case["status"] == "ok" and _finite(value):
                name = (_info_for(key, doc["metrics"]) or {}).get("name") or key
                samples.setdefault((group, name), []).append(float(value))
    for (group, name), xs in samples.items():
        values[group][name] = (statistics.fmean(xs), len(xs), [])
    for group, per_metric in (doc.get("sets") or {}).items():
        for name, s in per_metric.items():
            values.setdefault(group, {})[name] = (s.get("value"), s.get("n") or 0, list(s.get("warnings") or []))
    return values


def _svg_chart(title: str, rows: list[tuple[str, Any, Any, Any, str]], unit: str = "") -> str:
    """A horizontal bar chart as inline SVG: per row (label, value, interval low, high, css class) a bar from 0
    to the value and, with an interval, a whisker. Rows without a finite value are left out."""
    rows = [r for r in rows if _finite(r[1])]
    if not rows:
        return ""
    span = [0.0] + [float(v) for r in rows for v in r[1:4] if _finite(v)]
    lo, hi = min(span), max(span)
    hi = hi if hi - lo > 1e-12 else lo + 1.0
    lw, pw, rh, top = 320, 420, 22, 6
    width, height = lw + pw + 120, 2 * top + rh * len(rows)

    def x(v: float) -> float:
        return lw + (float(v) - lo) / (hi - lo) * pw

    out = [f'<svg class="chart" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}">'
           f'<title>{_e(title)}</title>']
    for i, (label, value, ci_low, ci_high, cls) in enumerate(rows):
        y = top + i * rh
        short = label if len(label) <= 44 else label[:43] + "\u2026"
        x0, x1 = sorted((x(0), x(value)))
        out.append(f'<text x="{lw - 6}" y="{y + 15}" text-anchor="end">{_e(short)}<title>{_e(label)}</title></text>'
                   f'<rect class="bar {_e(cls)}" x="{x0:.1f}" y="{y + 4}" width="{max(x1 - x0, 1):.1f}" '
                   f'height="{rh - 8}"/>')
        if _finite(ci_low) and _finite(ci_high):
            out.append(f'<line class="ci" x1="{x(ci_low):.1f}" y1="{y + rh / 2}" x2="{x(ci_high):.1f}" '
                       f'y2="{y + rh / 2}"/>')
        out.append(f'<text x="{lw + pw + 8}" y="{y + 15}">{_e(_num(value))}{_e(" " + unit if unit else "")}</text>')
    out.append(f'<line class="axis" x1="{x(0):.1f}" y1="0" x2="{x(0):.1f}" y2="{height}"/></svg>')
    return "".join(out)


def _td(html: str, cls: str = "") -> str:
    """A cell of prepared (already escaped) HTML."""
    return f'<td class="{cls}">{html}</td>' if cls else f"<td>{html}</td>"


def _table(ident: str, headers: list[str], rows: list[str], empty: str = "") -> str:
    """A table with prepared header cells and ``<tr>`` rows; one ``empty`` row when there are none."""
    if not rows and empty:
        rows = [f'<tr><td colspan="{len(headers)}" class="missing">{_e(empty)}</td></tr>']
    head = "".join(f"<th>{h}</th>" for h in headers)
    return f'<table id="{ident}"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _run_cells(run: Run, multi: bool) -> str:
    return _td(_e(run.run_id)) if multi else ""


def _metric_tables(runs: list[Run], infos: dict[str, dict[str, Any]], names: list[str],
                   values: list[tuple[Run, dict[str, dict[str, tuple[Any, int, list[str]]]]]]) -> str:
    """Metric definitions, values per group (with labels and warnings), comparisons with intervals and verdicts."""
    multi = len(runs) > 1
    run_th = ["run"] if multi else []
    defs = [f"<tr>{_run_cells(run, multi)}{_td(_e(info.get('display_name') or name))}"
            f"{_td('higher' if info.get('higher_is_better') else 'lower')}{_td(_e(info.get('kind')))}"
            f"{_td(_e(info.get('unit') or None))}{_td(_label(info) or '&mdash;')}"
            f"{_td(_e(info.get('description')))}</tr>"
            for run in runs for name, info in run.doc["metrics"].items()]
    rows = []
    for run, gv in values:
        for group, per_metric in gv.items():
            cells = []
            for n in names:
                value, count, warns = per_metric.get(n, (None, 0, []))
                label = _label(run.doc["metrics"].get(n)) if value is not None else ""
                warn = "".join(f'<div class="warn">{_e(w)}</div>' for w in warns)
                cells.append(_td(f'{_num(value)}{label}<div class="meta">n={_e(count)}</div>{warn}', "num"))
            rows.append(f"<tr>{_run_cells(run, multi)}{_td(_e(group))}{''.join(cells)}</tr>")
    comps = []
    for run in runs:
        for c in run.doc["comparisons"]:
            info = run.doc["metrics"].get(c.get("metric"))
            level = f' at {c["confidence"] * 100:g} %' if _finite(c.get("confidence")) else ""
            warns = "".join(f"<div>{_e(w)}</div>" for w in c.get("warnings") or []) or "&mdash;"
            interval = f"[{_num(c.get('ci_low'))}, {_num(c.get('ci_high'))}]{level}"
            comps.append(f"<tr>{_run_cells(run, multi)}{_td(_metric_title(str(c.get('metric')), info))}"
                         f"{_td(_e(c.get('reference')))}{_td(_e(c.get('candidate')))}"
                         f"{_td(_num(c.get('estimate')) + _label(info), 'num')}"
                         f"{_td(interval, 'num ci')}"
                         f"{_td(_e(c.get('verdict')), 'verdict ' + _verdict_class(c.get('verdict')))}"
                         f"{_td(_e(c.get('n')), 'num')}{_td(warns, 'warn')}</tr>")
    return "\n".join([
        '<h2 id="metrics">Metrics</h2>',
        _table("metric-info", run_th + ["metric", "better", "kind", "unit", "label", "description"], defs),
        "<h3>Values per variant group</h3>",
        _table("metric-values", run_th + ["group"] + [_metric_title(n, infos.get(n)) for n in names], rows),
        "<h3>Comparisons (candidate minus reference)</h3>",
        _table("comparisons", run_th + ["metric", "reference", "candidate", "estimate", "interval", "verdict", "n",
                                        "warnings"], comps, "no comparisons")])


def _metrics_section(runs: list[Run]) -> str:
    """The metric tables, then per metric a chart of its value per group (across LoRA versions and runs) and a
    chart of its comparisons (estimate with interval, coloured by verdict)."""
    multi = len(runs) > 1
    infos: dict[str, dict[str, Any]] = {}
    for run in runs:
        for name, info in run.doc["metrics"].items():
            infos.setdefault(name, info)
    values = [(run, _group_values(run.doc)) for run in runs]
    names = list(infos) + sorted({m for _, gv in values for g in gv.values() for m in g} - set(infos))
    parts = [_metric_tables(runs, infos, names, values), '<h3 id="charts">Charts</h3>']
    prefix = {id(run): f"{run.run_id} \u00b7 " if multi else "" for run in runs}
    for n in names:
        info = infos.get(n) or {}
        rows = [(prefix[id(run)] + g, pm.get(n, (None,))[0], None, None, "")
                for run, gv in values for g, pm in gv.items()]
        comp = [(prefix[id(run)] + f"{c.get('candidate')} vs {c.get('reference')}", c.get("estimate"), c.get("ci_low"),
                 c.get("ci_high"), _verdict_class(c.get("verdict")))
                for run in runs for c in run.doc["comparisons"] if c.get("metric") == n]
        for kind, chart_rows in (("value per group", rows), ("difference vs reference, with interval", comp)):
            svg = _svg_chart(f"{info.get('display_name') or n}: {kind}", chart_rows, info.get("unit") or "")
            if svg:
                parts.append(f"<figure><figcaption>{_metric_title(n, infos.get(n))} &mdash; {_e(kind)}</figcaption>"
                             f"{svg}</figure>")
    return "\n".join(parts)


_TRUST_CLASSES = {"agrees with the oracle": "agrees", "disagrees with the oracle": "disagrees"}


def _trust_class(verdict: Any) -> str:
    """``agrees`` / ``disagrees`` for a meta-evaluation verdict, else ``nsd`` (the CSS class of its cell)."""
    return _TRUST_CLASSES.get(verdict, "nsd") if isinstance(verdict, str) else "nsd"


def _interval(low: Any, high: Any) -> str:
    return f"[{_num(low)}, {_num(high)}]" if _finite(low) and _finite(high) else "&mdash;"


def _trust_section(runs: list[Run]) -> str:
    """Toy-world runs only (a ``meta_evaluation`` in results.json, see :mod:`sdxl_core.meta_eval`): how far each
    metric agrees with the exact oracle, image by image (AUC, Spearman, intervals) and on the order of the
    variants (Kendall tau, pairs), each with its verdict and one sentence; then the oracle's per-check accuracy per
    group. Omitted when no run has a meta-evaluation."""
    evaluated = [(run, run.doc["meta_evaluation"]) for run in runs if isinstance(run.doc.get("meta_evaluation"), dict)]
    if not evaluated:
        return ""
    multi = len(runs) > 1
    run_th = ["run"] if multi else []
    images: list[str] = []
    order: list[str] = []
    notes: list[str] = []
    checks: list[tuple[Run, str, dict[str, Any]]] = []
    definitions: dict[str, Any] = {}
    for run, me in evaluated:
        definitions.update(me.get("definitions") or {})
        level = f'{me["confidence"] * 100:g} %' if _finite(me.get("confidence")) else "95 %"
        for r in me.get("per_image") or []:
            verdict = r.get("verdict")
            auc_ci = _interval(r.get("auc_ci_low"), r.get("auc_ci_high"))
            rho_ci = _interval(r.get("spearman_ci_low"), r.get("spearman_ci_high"))
            count = f'{_e(r.get("n"))} ({_e(r.get("n_correct"))} correct)'
            images.append(
                f"<tr>{_run_cells(run, multi)}{_td(_metric_title(str(r.get('metric')), r))}"
                f"{_td(_num(r.get('auc')), 'num')}{_td(auc_ci, 'num ci')}{_td(_num(r.get('spearman')), 'num')}"
                f"{_td(rho_ci, 'num ci')}{_td(count, 'num')}"
                f"{_td(_e(verdict), 'verdict ' + _trust_class(verdict))}{_td(_e(r.get('summary')))}</tr>")
        for r in me.get("ordering") or []:
            verdict = r.get("verdict")
            ranked = sorted(zip(r.get("sets") or [], r.get("oracle_values") or [], r.get("metric_values") or []),
                            key=lambda t: -t[1] if _finite(t[1]) else math.inf)
            sets = "<br>".join(f"{_e(name)}: {_num(acc)} / {_num(val)}" for name, acc, val in ranked)
            pairs = (f"{_e(r.get('pairs_agree'))} agree, {_e(r.get('pairs_disagree'))} reversed, "
                     f"{_e(r.get('pairs_tied'))} tied of {_e(r.get('n_pairs'))}")
            decided = f"{_e(r.get('decided_agree'))} agree, {_e(r.get('decided_disagree'))} reversed"
            order.append(
                f"<tr>{_run_cells(run, multi)}{_td(_metric_title(str(r.get('metric')), r))}{_td(_e(r.get('kind')))}"
                f"{_td(sets)}{_td(_num(r.get('kendall_tau')), 'num')}{_td(pairs)}{_td(decided)}"
                f"{_td(_e(verdict), 'verdict ' + _trust_class(verdict))}{_td(_e(r.get('summary')))}</tr>")
        prefix = f"{_e(run.run_id)}: " if multi else ""
        for sk in me.get("skipped") or []:
            notes.append(f'<div class="meta">{prefix}{_e(sk.get("display_name") or sk.get("metric"))} '
                         f'({_e(sk.get("test"))}): not evaluated, {_e(sk.get("reason"))}</div>')
        notes.append(f'<div class="meta">{prefix}intervals at {_e(level)}, {_e(me.get("n_resamples"))} bootstrap '
                     f'resamples, seed {_e(me.get("seed"))}</div>')
        for group, per_metric in (run.doc.get("sets") or {}).items():
            oracle = (per_metric or {}).get(me.get("oracle") or "oracle_accuracy")
            if isinstance(oracle, dict):
                checks.append((run, group, oracle))
    names = list(dict.fromkeys(c for _, _, o in checks for c in (o.get("per_check") or {})))
    check_rows = [f"<tr>{_run_cells(run, multi)}{_td(_e(group))}{_td(_num(o.get('value')), 'num')}"
                  + "".join(_td(_num((o.get("per_check") or {}).get(c)), "num") for c in names)
                  + f"{_td(_e(o.get('n')), 'num')}</tr>" for run, group, o in checks]
    terms = "".join(f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in definitions.items())
    return "\n".join([
        '<h2 id="trust">Which metric to trust (toy world)</h2>',
        '<p class="note">Every prompt is a toy-world caption, so an exact oracle judges each image correct or not. '
        "A metric worth trusting scores correct images above incorrect ones and orders the variants as the "
        "oracle's accuracy does.</p>",
        "<h3>Image by image</h3>",
        _table("trust-images", run_th + ["metric", "AUC", "AUC interval", "Spearman", "Spearman interval", "images",
                                         "verdict", "in plain words"], images, "no per-image metric to evaluate"),
        "<h3>Order of the variants</h3>",
        _table("trust-order", run_th + ["metric", "kind", "variant: oracle accuracy / metric", "Kendall tau",
                                        "pairs", "decided pairs", "verdict", "in plain words"], order,
               "no metric orders two or more variants"),
        *notes,
        "<h3>Oracle checks per group</h3>",
        _table("oracle-checks", run_th + ["group", "accuracy", *(_e(c) for c in names), "n"], check_rows,
               "no oracle values"),
        f'<ul class="meta" id="trust-definitions">{terms}</ul>' if terms else ""])


def _across_runs_section(runs: list[Run]) -> str:
    """With several runs: each later run against the first (``sdxl-bench compare``): per matched group and
    metric the change, its interval and verdict, e.g. a new LoRA version against the previous one."""
    if len(runs) < 2:
        return ""
    from sdxl_core.compare import compare_runs

    rows, notes = [], []
    for run in runs[1:]:
        doc = compare_runs(runs[0].doc, run.doc)
        for r in doc["rows"]:
            interval = (f"[{_num(r.get('ci_low'))}, {_num(r.get('ci_high'))}]" if _finite(r.get("ci_low"))
                        else "&mdash;")
            rows.append(f"<tr>{_td(_e(runs[0].run_id))}{_td(_e(run.run_id))}{_td(_e(r['group_a']))}"
                        f"{_td(_e(r['group_b']))}{_td(_e(r['metric']))}{_td(_num(r.get('a')), 'num')}"
                        f"{_td(_num(r.get('b')), 'num')}{_td(_num(r.get('delta')), 'num')}{_td(interval, 'num ci')}"
                        f"{_td(_e(r.get('verdict')), 'verdict ' + _verdict_class(r.get('verdict')))}</tr>")
        notes += [f"<div class=\"warn\">{_e(run.run_id)}: {_e(w)}</div>" for w in doc.get("warnings", [])]
    return "\n".join(['<h2 id="across-runs">Across runs (later runs minus the first)</h2>',
                      _table("across-runs", ["run A", "run B", "group A", "group B", "metric", "A", "B", "B - A",
                                             "interval", "verdict"], rows, "no groups in common"), *notes])


def _latency_section(runs: list[Run]) -> str:
    """The latency rows of every run as a table and a chart of median seconds per case."""
    multi = len(runs) > 1
    rows, chart = [], []
    for run in runs:
        by_id = {str(c["id"]): c for c in run.doc["cases"]}
        for row in run.doc["latency"]:
            case = by_id.get(str(row.get("case")), {})
            group = group_name(case["variant"], case["lora"]) if case else None
            stages = ", ".join(f"{k} {_num(v)}" for k, v in (row.get("stage_seconds") or {}).items())
            rows.append(f"<tr>{_run_cells(run, multi)}{_td(_e(row.get('case')))}{_td(_e(group))}"
                        f"{_td(_e(case.get('prompt_index')))}{_td(_e(case.get('seed')))}"
                        f"{_td(_num(row.get('median_s')), 'num')}{_td(_e(row.get('rounds')), 'num')}"
                        f"{_td(_num(row.get('images_per_second')), 'num')}{_td(_e(stages or None))}</tr>")
            chart.append((f"{run.run_id} \u00b7 " * multi + str(row.get("case")), row.get("median_s"), None, None, ""))
    headers = ["run"] * multi + ["case", "group", "prompt", "seed", "median s", "rounds", "images/s", "stage seconds"]
    svg = _svg_chart("median seconds per case", chart, "s")
    return ('<h2 id="latency-h">Latency</h2>' + _table("latency", headers, rows, "not timed")
            + (f"<figure><figcaption>median seconds per case</figcaption>{svg}</figure>" if svg else ""))


def _provenance_section(runs: list[Run]) -> str:
    """Configuration, versions, machine, seeds and commit, one column per run; then the LoRA files."""
    table: dict[str, list[Any]] = {}
    for i, run in enumerate(runs):
        d = run.doc
        git, machine = d.get("git") or {}, d.get("machine") or {}
        fields = [("run id", d["run_id"]), ("created", d["created_at"]), ("finished", d["finished_at"]),
                  ("commit", git.get("commit")), ("dirty", git.get("dirty")), ("gpu", machine.get("gpu")),
                  ("python", machine.get("python")), ("platform", machine.get("platform")),
                  ("cpu count", machine.get("cpu_count")), ("seeds", (d["config"] or {}).get("seeds"))]
        fields += [(f"version: {lib}", v) for lib, v in (machine.get("libraries") or {}).items()]
        for key, value in (d.get("config") or {}).items():
            fields += [(f"config: {key}" + (f".{sub}" if sub else ""), v)
                       for sub, v in (value.items() if isinstance(value, dict) else [(None, value)])]
        for key, value in fields:
            table.setdefault(key, [None] * len(runs))[i] = value
    prov = [f"<tr><th>{_e(k)}</th>{''.join(_td(_e(_plain(v))) for v in vals)}</tr>" for k, vals in table.items()]
    loras = [f"<tr>{_td(_e(run.run_id))}{_td(_e(lora.get('name')))}{_td(_e(lora.get('version')))}"
             f"{_td(_e(lora.get('path')))}{_td('<code>' + _e(lora.get('sha256')) + '</code>')}"
             f"{_td(_e(lora.get('size_bytes')), 'num')}<td><details><summary>metadata</summary><pre>"
             f"{_e(json.dumps(lora.get('metadata') or {}, indent=1, ensure_ascii=False, sort_keys=True))}</pre>"
             "</details></td></tr>" for run in runs for lora in run.doc["loras"]]
    warnings = "".join(f"<li>{_e(run.run_id)}: {_e(w)}</li>" for run in runs for w in run.doc["warnings"])
    return "\n".join([
        '<h2 id="provenance-h">Configuration and provenance</h2>',
        _table("provenance", ["field"] + [_e(r.run_id) for r in runs], prov),
        "<h3>LoRA files</h3>",
        _table("loras", ["run", "name", "version", "path", "sha256", "size", "metadata"], loras, "no LoRA"),
        f'<h3>Warnings</h3><ul id="warnings">{warnings}</ul>' if warnings else ""])


def _counts(doc: dict[str, Any]) -> tuple[int, int, int]:
    """(ok, error, flagged) case counts of a document."""
    ok = sum(c["status"] == "ok" for c in doc["cases"])
    flagged = sum(bool((c.get("metrics") or {}).get("sanity")) for c in doc["cases"])
    return ok, len(doc["cases"]) - ok, flagged


def _commit(doc: dict[str, Any]) -> str:
    git = doc.get("git") or {}
    return f"<code>{_e(git.get('commit'))}</code>{' (dirty)' if git.get('dirty') else ''}"


def _write_page(path: Path, title: str, body: list[str]) -> Path:
    """Write a complete page atomically, readable by all (a web server may publish it)."""
    page = "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_e(_CSP)}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title><style>{_CSS}</style><script>{_SELF_CHECK_JS}</script></head><body>",
        f"<h1>{_e(title)}</h1>", '<p id="broken" class="note" hidden></p>', *body,
        '<p class="meta">Rendered from results.json by sdxl-bench.</p></body></html>', ""])
    write_text_atomic(path, page)
    os.chmod(path, 0o644)
    return path


def render_report(run_dirs: list[Path], out: Path) -> Path:
    """Write the report of one or more run folders (side by side) to ``out``; return ``out/index.html``.

    Each run folder must hold a valid ``results.json``; its images are hard-linked (or copied) into
    ``out/images/<run>/``. The page is written last and atomically.
    """
    out = Path(out)
    runs = _load_runs([Path(d) for d in run_dirs], out)
    summary = [f"<tr>{_td(_e(run.run_id))}{_td(_e(run.doc['created_at']))}{_td(_commit(run.doc))}"
               + "".join(_td(str(n), "num") for n in _counts(run.doc)) + "</tr>" for run in runs]
    body = [_table("runs", ["run", "created", "commit", "cases ok", "errors", "flagged images"], summary),
            _grid_section(runs, out), _metrics_section(runs), _trust_section(runs), _across_runs_section(runs),
            _latency_section(runs),
            _provenance_section(runs)]
    return _write_page(out / INDEX_FILE, "sdxl-bench report: " + ", ".join(r.run_id for r in runs), body)


def render_index(reports_root: Path) -> Path:
    """Write ``reports_root/index.html``: every run folder with a ``results.json``, newest first, linked to its
    report (``<run_id>/report/index.html``) when one was rendered. Unreadable documents are listed as errors."""
    root = Path(reports_root)
    rows: list[tuple[str, str]] = []
    folders = sorted(p for p in root.iterdir() if (p / RESULTS_FILE).is_file()) if root.is_dir() else []
    for folder in folders:
        data = _td(f'<a href="{_e(quote(folder.name))}/{RESULTS_FILE}">{RESULTS_FILE}</a>')
        try:
            doc = load_results(folder)
        except InvalidConfigError as exc:
            rows.append(("", f'<tr class="error">{_td(_e(folder.name))}<td colspan="6">{_e(exc)}</td>{data}</tr>'))
            continue
        report = f"{quote(folder.name)}/{REPORT_DIR}/{INDEX_FILE}"
        link = (f'<a href="{_e(report)}">{_e(doc["run_id"])}</a>' if (default_report_dir(folder) / INDEX_FILE).is_file()
                else f'{_e(doc["run_id"])} <span class="meta">(no report yet: sdxl-bench report {_e(folder)})</span>')
        rows.append((str(doc["created_at"]), f"<tr>{_td(link)}{_td(_e(doc['created_at']))}{_td(_commit(doc))}"
                     f"{_td(_e((doc.get('machine') or {}).get('gpu')))}"
                     + "".join(_td(str(n), "num") for n in _counts(doc)) + f"{data}</tr>"))
    rows.sort(key=lambda r: r[0], reverse=True)
    headers = ["run", "created", "commit", "gpu", "cases ok", "errors", "flagged", "data"]
    return _write_page(root / INDEX_FILE, "sdxl-bench runs", [_table("run-index", headers, [r[1] for r in rows],
                                                                      "no runs yet")])


def publish_run(run_dir: Path) -> Path:
    """End of a bench run: render its report into :func:`default_report_dir` and refresh the parent's index."""
    path = render_report([Path(run_dir)], default_report_dir(run_dir))
    render_index(Path(run_dir).parent)
    return path
