"""The run store of a benchmark session: ``<run_dir>/<run_id>/`` with images, ``images.jsonl`` and ``results.json``.

Each finished case writes its PNG (atomically) and then appends one complete line to ``images.jsonl``, so a run
killed at any moment loses at most the image in flight; a rerun with the same run id skips every case whose
line says ``ok`` and whose PNG exists. :meth:`BenchRun.finalize` scores the images (sanity, CLIP score, FID,
KID, CMMD, comparisons with ``baseline``) and writes ``results.json`` (:mod:`sdxl_core.results_schema`); every
planned case is in it, as ``ok`` or as an ``error`` row with its message.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import secrets
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from sdxl_core.atomicio import append_json_line, read_json_lines, write_json_atomic, write_png_atomic
from sdxl_core.bench_cases import BenchCase, expand_cases, generation_settings
from sdxl_core.bench_config import BenchConfig
from sdxl_core.errors import InvalidConfigError
from sdxl_core.results_schema import (IMAGES_LOG, RESULTS_FILE, SCHEMA_VERSION, check_document, group_name,
                                     keep_newest)

_MAX_MESSAGE = 2000


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def new_run_id() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def git_state(root: str | Path = ".") -> dict[str, Any]:
    """The commit and dirty flag of the checkout at ``root`` (None when it is not a git checkout)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip() != ""
        return {"commit": commit, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def machine_info() -> dict[str, Any]:
    from sdxl_core.provenance import gpu_info, library_versions

    return {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "libraries": library_versions(), **gpu_info()}


class BenchRun:
    """One run folder. ``cases`` are all planned cases of the session (from the configuration)."""

    def __init__(self, config: BenchConfig, root: str | Path = ".") -> None:
        self.config = config
        self.run_id = config.run_id or new_run_id()
        self.folder = Path(root) / config.run_dir / self.run_id
        self.cases = expand_cases(config)
        self.settings = generation_settings(config)
        self.created_at = _now()
        self.git = git_state(root)
        self.latency: list[dict[str, Any]] = []  # rows the latency suite adds (written into results.json)
        self.timing = {"generation_s": 0.0, "diffusers_s": 0.0}  # wall time of generate() and inside diffusers
        self._known: dict[str, dict[str, Any]] | None = None

    # ---------------------------------------------------------------- images
    def image_file(self, case: BenchCase) -> str:
        """Relative path of a case's PNG: ``images/<variant>/<lora or none>/<prompt_index>-<seed>.png``."""
        return f"images/{case.variant}/{case.lora or 'none'}/{case.prompt_index}-{case.seed}.png"

    def log_rows(self) -> dict[str, dict[str, Any]]:
        """The newest line per case id of ``images.jsonl`` on disk, every process's lines included."""
        latest: dict[str, dict[str, Any]] = {}
        for row in read_json_lines(self.folder / IMAGES_LOG):
            _keep_newest(latest, row)
        return latest

    def _rows(self) -> dict[str, dict[str, Any]]:
        """This process's view of the log: read once, then kept up to date by :meth:`_append` (a process only
        makes its own cases, so lines other processes add later never change what it has to do)."""
        if self._known is None:
            self._known = self.log_rows()
        return self._known

    def is_done(self, case: BenchCase, rows: dict[str, dict[str, Any]] | None = None) -> bool:
        row = (rows if rows is not None else self._rows()).get(case.id)
        return bool(row and row.get("status") == "ok" and (self.folder / row["image"]).is_file())

    def generate(self, case: BenchCase, make: Callable[[BenchCase], Any]) -> dict[str, Any]:
        """Make ``case``'s image with ``make`` unless it is done; log an ``ok`` or ``error`` line. Errors are
        recorded and then raised, so the pytest case fails and the session exits non-zero."""
        if self.is_done(case):
            return self._rows()[case.id]
        t0 = time.perf_counter()
        try:
            out = make(case)
        except Exception as exc:
            self._append(case, {"message": f"{type(exc).__name__}: {exc}"[:_MAX_MESSAGE]})
            raise
        return self.record(case, out, time.perf_counter() - t0, started=t0)

    def record(self, case: BenchCase, out: Any, seconds: float, started: float | None = None) -> dict[str, Any]:
        """Write a generated image (atomically) and its ``ok`` line; a case already done is left as it is."""
        if self.is_done(case):
            return self._rows()[case.id]
        write_png_atomic(self.folder / self.image_file(case), out.images[0])
        row = self._append(case, {"status": "ok", "image": self.image_file(case), "seconds": round(seconds, 4),
                                  "stage_seconds": {k: round(v, 4) for k, v in out.stage_seconds.items()}})
        if started is not None:
            self.timing["generation_s"] += time.perf_counter() - started
            self.timing["diffusers_s"] += sum(out.stage_seconds.values())
        return row

    def record_latency(self, case: BenchCase, row: dict[str, Any]) -> None:
        self.latency.append({"case": case.id, **row})

    def _append(self, case: BenchCase, fields: dict[str, Any]) -> dict[str, Any]:
        self.folder.mkdir(parents=True, exist_ok=True)
        row: dict[str, Any] = {"id": case.id, "variant": case.variant, "lora": case.lora,
                               "prompt_index": case.prompt_index, "seed": case.seed, "status": "error",
                               "message": None, "image": None, "seconds": None, "stage_seconds": {}, **fields}
        line = {**row, "finished": _now()}
        append_json_line(self.folder / IMAGES_LOG, line)
        _keep_newest(self._rows(), line)
        return row

    # ---------------------------------------------------------------- results
    def finalize(self, loras: list[dict[str, Any]] | None = None, score: bool = True) -> Path:
        """Score the finished images and write ``results.json``; returns its path."""
        rows = self.log_rows()
        case_rows = []
        for case in self.cases:
            row = rows.get(case.id)
            ok = self.is_done(case, rows)
            case_rows.append({
                "id": case.id, "variant": case.variant, "lora": case.lora, "prompt_index": case.prompt_index,
                "prompt": case.prompt, "seed": case.seed, "negative_prompt": case.negative_prompt,
                "status": "ok" if ok else "error",
                "message": None if ok else ((row or {}).get("message") or "not run: the session ended before this case"),
                "image": row["image"] if ok else None, "seconds": (row or {}).get("seconds") if ok else None,
                "stage_seconds": (row or {}).get("stage_seconds", {}) if ok else {}, "metrics": {}})
        doc: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION, "run_id": self.run_id, "created_at": self.created_at,
            "finished_at": None, "git": self.git, "machine": machine_info(),
            "config": {**self.config.as_dict(), "settings": _settings_dict(self.settings)},
            "loras": loras or [], "metrics": {}, "cases": case_rows, "sets": {}, "comparisons": [],
            "latency": self.latency, "warnings": []}
        self._check_prompts(doc)
        t0 = time.perf_counter()
        if score:
            self._score(doc)
        g = self.timing
        doc["timing"] = {"generation_s": round(g["generation_s"], 3), "diffusers_s": round(g["diffusers_s"], 3),
                         "harness_overhead": (round(g["generation_s"] / g["diffusers_s"] - 1, 4)
                                              if g["diffusers_s"] else None),
                         "scoring_s": round(time.perf_counter() - t0, 3)}
        doc["finished_at"] = _now()
        check_document(doc)
        write_json_atomic(self.folder / RESULTS_FILE, doc)
        return self.folder / RESULTS_FILE

    def _check_prompts(self, doc: dict[str, Any]) -> None:
        """What the text encoders make of each prompt: token count, truncation past 77 tokens, compel syntax
        that does not parse as meant (``(word:1.3)``, unbalanced parentheses); recorded, and listed as warnings."""
        from sdxl_core.prompt_check import check_prompt

        prompts = dict(sorted({c.prompt_index: c.prompt for c in self.cases}.items()))
        doc["prompts"] = []
        for index, prompt in prompts.items():
            check = check_prompt(prompt).as_dict()
            doc["prompts"].append({"index": index, **check})
            doc["warnings"] += [f"prompt #{index}: {w}" for w in check["warnings"]]

    def _score(self, doc: dict[str, Any]) -> None:
        from sdxl_core.score import ScoreConfig, score_sets
        from sdxl_core.score_inputs import ImageSet, ScoredImage

        groups: dict[str, list[ScoredImage]] = {}
        for row in doc["cases"]:
            if row["status"] == "ok":
                groups.setdefault(group_name(row["variant"], row["lora"]), []).append(
                    ScoredImage(self.folder / row["image"], row["prompt"], (row["prompt_index"], row["seed"])))
        if not groups:
            doc["warnings"].append("no finished images: nothing scored")
            return
        model, pretrained, smoke = self.config.clip_spec()
        config = ScoreConfig(fake=str(self.folder), reference=self.config.reference, clip_model=model,
                             clip_pretrained=pretrained, clip_smoke=smoke, features=self.config.feature_network(),
                             clip_download=self.config.clip_model is not None)  # only weights the user named
        order = ["baseline"] + sorted(g for g in groups if g != "baseline")
        scored = score_sets([ImageSet(g, tuple(groups[g])) for g in order if g in groups], config)
        by_key = {(group_name(r["variant"], r["lora"]), (r["prompt_index"], r["seed"])): r for r in doc["cases"]}
        for group, values in scored["sets"].items():
            for metric in ("clip", "oracle_accuracy"):  # per-image values are kept per case instead
                for item in values.get(metric, {}).pop("per_image", []):
                    by_key[(group, tuple(item["key"]))]["metrics"][metric] = item["value"]
            for item in values.get("sanity", {}).get("flagged", []):
                by_key[(group, tuple(item["key"]))]["metrics"]["sanity"] = item["flags"]
        doc.update(metrics=scored["metrics"], sets=scored["sets"], comparisons=scored["comparisons"])
        if scored.get("meta_evaluation") is not None:  # toy-world prompts: which metric agrees with the oracle
            doc["meta_evaluation"] = scored["meta_evaluation"]
        doc["warnings"] += scored["warnings"]


def _keep_newest(latest: dict[str, dict[str, Any]], row: dict[str, Any]) -> None:
    """Fold one log line into ``latest`` by its case id (lines without one are skipped)."""
    cid = row.get("id")
    if isinstance(cid, str):
        keep_newest(latest, cid, row)


def _settings_dict(settings: Any) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(settings)


def load_results(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / RESULTS_FILE
    if not path.is_file():
        raise InvalidConfigError(f"{path} does not exist: run the bench (or give a run folder)")
    import json

    return check_document(json.loads(path.read_text()), str(path))
