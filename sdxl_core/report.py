"""The HTML report of a run folder, rendered from its ``config.json`` and ``results.jsonl`` only.

One table per prompt: a row per seed, a column per variant, each cell the image (a relative link into
``images/``) or, for a failed image, its error message in red. Every piece of user text is escaped.
"""

from __future__ import annotations

import json
import statistics
from html import escape
from pathlib import Path
from typing import Any

from sdxl_core.atomicio import read_json_lines, write_text_atomic
from sdxl_core.errors import InvalidConfigError
from sdxl_core.results_schema import keep_newest

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.jsonl"
REPORT_FILE = "report.html"

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.1em; margin-top: 2em; font-weight: normal; }
h2 .idx { color: #888; font-weight: bold; margin-right: .5em; }
table { border-collapse: collapse; margin: .5em 0 1em; }
th, td { border: 1px solid #ddd; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
td.cell { text-align: center; }
td.cell img { display: block; max-width: 320px; image-rendering: auto; }
.meta { color: #666; font-size: .85em; }
td.error, tr.error td { background: #fde8e8; color: #b00020; }
td.missing { color: #999; font-style: italic; }
code { font-size: .9em; }
.note { background: #fff8e1; padding: .4em .8em; border-left: 3px solid #f0b400; }
"""


def _e(value: Any) -> str:
    """Escaped text of any value (``None`` as an em dash)."""
    if value is None:
        return "&mdash;"
    return escape(str(value), quote=True)


def _fmt_seconds(value: Any) -> str:
    return f"{value:.2f} s" if isinstance(value, (int, float)) else "&mdash;"


def load_config(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidConfigError(f"{path} does not exist; is {run_dir} a run folder (reports/runs/<run_id>)?") from None
    except json.JSONDecodeError as exc:
        raise InvalidConfigError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise InvalidConfigError(f"{path} has no 'config' object; it was not written by sdxl-bench run")
    return data


def result_key(row: dict[str, Any]) -> tuple[str, int, int]:
    return (str(row.get("variant")), int(row.get("prompt_index", -1)), int(row.get("seed", -1)))


def latest_results(run_dir: str | Path) -> dict[tuple[str, int, int], dict[str, Any]]:
    """The last result line of each (variant, prompt index, seed); an ok line is never replaced by an error."""
    latest: dict[tuple[str, int, int], dict[str, Any]] = {}
    for row in read_json_lines(Path(run_dir) / RESULTS_FILE):
        try:
            key = result_key(row)
        except (TypeError, ValueError):
            continue
        keep_newest(latest, key, row)
    return latest


def variant_summary(config: dict[str, Any], latest: dict[tuple[str, int, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """Per variant: images ok, errors, mean seconds per image and per stage (over ok images)."""
    out = []
    for v in config.get("variants", []):
        rows = [r for (name, _, _), r in latest.items() if name == v.get("name")]
        ok = [r for r in rows if r.get("status") == "ok" and isinstance(r.get("seconds"), (int, float))]
        stages: dict[str, list[float]] = {}
        for r in ok:
            for stage, sec in (r.get("stage_seconds") or {}).items():
                if isinstance(sec, (int, float)):
                    stages.setdefault(stage, []).append(sec)
        out.append({
            "name": v.get("name"),
            "negative_prompt": v.get("negative_prompt"),
            "lora_scale": v.get("lora_scale"),
            "ok": len(ok),
            "errors": sum(1 for r in rows if r.get("status") != "ok"),
            "mean_seconds": statistics.fmean(r["seconds"] for r in ok) if ok else None,
            "mean_stage_seconds": {k: statistics.fmean(v) for k, v in stages.items()},
        })
    return out


def _config_rows(data: dict[str, Any]) -> list[tuple[str, Any]]:
    c = data["config"]
    s = c.get("settings", {})
    rows: list[tuple[str, Any]] = [
        ("base", c.get("base")), ("refiner", c.get("refiner")), ("vae", c.get("vae")),
        ("weights variant", c.get("weights_variant")), ("LoRA", c.get("lora")),
        ("device", c.get("device")), ("dtype", c.get("dtype")),
        ("steps", s.get("steps")), ("guidance scale", s.get("guidance_scale")),
        ("high noise fraction", s.get("high_noise_frac")),
        ("size", f"{s.get('width')}x{s.get('height')}"), ("compel weighting", s.get("use_compel")),
        ("seeds", ", ".join(str(x) for x in c.get("seeds", []))),
        ("warm-up", c.get("warmup")),
        ("created", data.get("created")),
    ]
    env = data.get("environment") or {}
    if env:
        rows.append(("environment", ", ".join(f"{k} {v}" for k, v in env.items())))
    return rows


def render_html(data: dict[str, Any], latest: dict[tuple[str, int, int], dict[str, Any]]) -> str:
    c = data["config"]
    variants = c.get("variants", [])
    prompts = c.get("prompts", [])
    seeds = c.get("seeds", [])
    run_id = data.get("run_id", "")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>sdxl-bench run {_e(run_id)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>sdxl-bench run <code>{_e(run_id)}</code></h1>",
    ]
    if c.get("variants_note"):
        parts.append(f'<p class="note">{_e(c["variants_note"])}</p>')

    parts.append("<table><tbody>")
    for key, value in _config_rows(data):
        parts.append(f"<tr><th>{_e(key)}</th><td>{_e(value)}</td></tr>")
    parts.append("</tbody></table>")

    parts.append("<h2>Variants</h2><table><thead><tr><th>variant</th><th>negative prompt</th><th>LoRA scale</th>"
                 "<th>images ok</th><th>errors</th><th>mean s/image</th><th>mean s per stage</th></tr></thead><tbody>")
    for v in variant_summary(c, latest):
        stages = ", ".join(f"{_e(k)} {sec:.2f}" for k, sec in v["mean_stage_seconds"].items())
        row_class = ' class="error"' if v["errors"] else ""
        parts.append(
            f"<tr{row_class}><td>{_e(v['name'])}</td><td>{_e(v['negative_prompt'])}</td><td>{_e(v['lora_scale'])}</td>"
            f"<td>{v['ok']}</td><td>{v['errors']}</td><td>{_fmt_seconds(v['mean_seconds'])}</td>"
            f"<td>{stages or '&mdash;'}</td></tr>")
    parts.append("</tbody></table>")
    if variants and not latest:
        parts.append('<p class="meta">No results yet.</p>')

    header = "".join(f"<th>{_e(v.get('name'))}<div class=\"meta\">negative: {_e(v.get('negative_prompt'))}, "
                     f"LoRA {_e(v.get('lora_scale'))}</div></th>" for v in variants)
    for idx, prompt in enumerate(prompts):
        parts.append(f'<h2><span class="idx">#{idx}</span>{_e(prompt)}</h2>')
        parts.append(f"<table><thead><tr><th>seed</th>{header}</tr></thead><tbody>")
        for seed in seeds:
            cells = []
            for v in variants:
                row = latest.get((str(v.get("name")), idx, int(seed)))
                cells.append(_cell(row, v.get("name"), idx, seed))
            parts.append(f"<tr><th>{_e(seed)}</th>{''.join(cells)}</tr>")
        parts.append("</tbody></table>")
    parts.append('<p class="meta">Rendered from config.json and results.jsonl by sdxl-bench.</p>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _cell(row: dict[str, Any] | None, variant: Any, idx: int, seed: Any) -> str:
    if row is None:
        return '<td class="cell missing">not run</td>'
    if row.get("status") != "ok":
        return f'<td class="cell error">error: {_e(row.get("message") or "unknown error")}</td>'
    file = row.get("file")
    seconds = f'<div class="meta">{_fmt_seconds(row.get("seconds"))}</div>'
    if not _is_image_link(file):
        return f'<td class="cell error">not a run image path: {_e(file)}{seconds}</td>'
    alt = f"{variant} prompt {idx} seed {seed}"
    return (f'<td class="cell"><a href="{_e(file)}"><img src="{_e(file)}" alt="{_e(alt)}" '
            f'loading="lazy"></a>{seconds}</td>')


def _is_image_link(file: Any) -> bool:
    """Only relative paths inside ``images/`` become links (no schemes such as ``javascript:``, no ``..``)."""
    return (isinstance(file, str) and file.startswith("images/") and ":" not in file and "\\" not in file
            and ".." not in file.split("/"))


def render_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` (atomically) from ``config.json`` and ``results.jsonl``; return its path."""
    run_dir = Path(run_dir)
    data = load_config(run_dir)
    html_text = render_html(data, latest_results(run_dir))
    return write_text_atomic(run_dir / REPORT_FILE, html_text)
