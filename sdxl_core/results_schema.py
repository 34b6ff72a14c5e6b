"""The run store's result document, ``reports/<run_id>/results.json``: a versioned schema written down here.

A run folder holds ``results.json`` (this document), ``images.jsonl`` (one complete line per image, appended as
each finishes: the resume log) and ``images/<variant>/<lora or none>/<prompt_index>-<seed>.png``. Reports and
comparisons read ``results.json`` only.

Schema version 1::

    {
      "schema_version": 1,
      "run_id": str, "created_at": ISO-8601 UTC, "finished_at": ISO-8601 UTC or null,
      "git": {"commit": str or null, "dirty": bool or null},
      "machine": {"python": str, "platform": str, "cpu_count": int, "gpu": str or null, "libraries": {pkg: ver}},
      "config": BenchConfig.as_dict() + {"settings": GenerationSettings as dict},
      "loras": [LoraRecord.as_dict(), ...],                # name, version, path, sha256, size, metadata
      "metrics": {name: MetricInfo.as_dict()},             # display name, direction, label (smoke, ...)
      "cases": [CaseRow, ...],                             # one per variant x LoRA version x prompt x seed
      "sets": {group: {metric: {"value", "n", "n_real", "warnings"}}},     # set metrics per variant group
      "comparisons": [Comparison.as_dict(), ...],          # each group against baseline, interval + verdict
      "latency": [{"case": id, "median_s", "rounds", "stage_seconds", "images_per_second"}],  # when timed
      "warnings": [str],
      "timing": {"generation_s", "diffusers_s", "harness_overhead", "scoring_s"},  # this session's images
      "prompts": [{"index", "prompt", "warnings", "n_tokens", "max_tokens", "truncated", ...}],  # optional
      "meta_evaluation": MetaEvaluation                    # optional: toy-world prompts only
    }

    CaseRow = {"id", "variant", "lora", "prompt_index", "prompt", "seed", "negative_prompt",
               "status": "ok" | "error", "message": str or null, "image": relative path or null,
               "seconds": float or null, "stage_seconds": {stage: s},
               "metrics": {"clip": float, "oracle_accuracy": 1.0 | 0.0, "sanity": [flags]}}

A *group* is a variant with its LoRA version (``wrong_lora[wrong@v1]``), the unit that metrics and comparisons
are about. :func:`check_document` validates a document against this description.

Toy world (every prompt a caption of :mod:`sdxl_core.toy.world`; these fields are absent otherwise, and in
documents written before they existed, which stay readable: they are additions, so the version stays 1):

* ``metrics["oracle_accuracy"]``: its MetricInfo (``higher_is_better``, unit ``fraction``, label ``toy world``).
* ``cases[i]["metrics"]["oracle_accuracy"]``: 1.0 when the exact oracle judges the image correct for its prompt,
  else 0.0 (sanity-flagged images have none).
* ``sets[group]["oracle_accuracy"] = {"value": mean of the above or null, "n", "n_correct",
  "per_check": {"background"|"colour"|"count"|"shape"|"size"|"position": pass rate or null}}``.
* ``comparisons``: one ``oracle_accuracy`` entry per group against baseline (paired bootstrap, as CLIP).
* ``meta_evaluation`` (:func:`sdxl_core.meta_eval.meta_evaluate`; definitions there)::

    {"oracle": "oracle_accuracy", "confidence": 0.95, "n_resamples": int, "seed": int,
     "definitions": {term: text},
     "per_image": [{"metric", "display_name", "higher_is_better", "n", "n_correct", "n_incorrect",
                    "auc", "auc_ci_low", "auc_ci_high", "spearman", "spearman_ci_low", "spearman_ci_high",
                    "n_resamples", "n_undefined_resamples", "verdict", "summary"}],
     "ordering": [{"metric", "display_name", "kind": "set" | "per_image mean", "higher_is_better", "sets",
                   "oracle_values", "metric_values", "kendall_tau", "n_pairs", "pairs_agree", "pairs_disagree",
                   "pairs_tied", "decided_agree", "decided_disagree",
                   "pairs": [{"a", "b", "oracle_delta", "metric_delta", "order", "oracle_significant",
                              "metric_significant", "decided"}], "verdict", "summary"}],
     "skipped": [{"metric", "display_name", "test", "reason"}]}

  ``verdict`` is ``"agrees with the oracle"``, ``"no evidence"`` or ``"disagrees with the oracle"``; statistics
  that are undefined (e.g. AUC when every image is correct) are null.
"""

from __future__ import annotations

from typing import Any

from sdxl_core.errors import InvalidConfigError

SCHEMA_VERSION = 1
RESULTS_FILE = "results.json"
IMAGES_LOG = "images.jsonl"
TOP_KEYS = ("schema_version", "run_id", "created_at", "finished_at", "git", "machine", "config", "loras", "metrics",
            "cases", "sets", "comparisons", "latency", "warnings")
#: The lists an (optional) ``meta_evaluation`` holds.
META_EVALUATION_LISTS = ("per_image", "ordering", "skipped")
CASE_KEYS = ("id", "variant", "lora", "prompt_index", "prompt", "seed", "negative_prompt", "status", "message",
             "image", "seconds", "stage_seconds", "metrics")


def group_name(variant: str, lora: str | None) -> str:
    """The metric group of a case: its variant, with the LoRA version when it has one."""
    return f"{variant}[{lora}]" if lora else variant


def keep_newest(latest: dict[Any, dict[str, Any]], key: Any, row: dict[str, Any]) -> None:
    """Fold one result line into ``latest`` under ``key``: the newest line wins, except that an ``ok`` line is
    never replaced by an error (a finished result is never lost to a later failed retry)."""
    previous = latest.get(key)
    if previous is not None and previous.get("status") == "ok" and row.get("status") != "ok":
        return
    latest[key] = row


def check_document(doc: Any, where: str = "results.json") -> dict[str, Any]:
    """``doc`` if it is a schema-1 result document; else an error naming what is wrong."""
    if not isinstance(doc, dict):
        raise InvalidConfigError(f"{where}: not a JSON object")
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION:
        raise InvalidConfigError(f"{where}: schema_version {version!r}, this sdxl-bench reads {SCHEMA_VERSION}; "
                                 f"re-run with a matching sdxl-bench")
    missing = [k for k in TOP_KEYS if k not in doc]
    if missing:
        raise InvalidConfigError(f"{where}: missing {', '.join(missing)}")
    for i, case in enumerate(doc["cases"]):
        lacking = [k for k in CASE_KEYS if k not in case]
        if lacking:
            raise InvalidConfigError(f"{where}: case {i} lacks {', '.join(lacking)}")
        if case["status"] not in ("ok", "error"):
            raise InvalidConfigError(f"{where}: case {case['id']} has status {case['status']!r}")
    meta = doc.get("meta_evaluation")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(meta.get(k), list)
                                                                for k in META_EVALUATION_LISTS)):
        raise InvalidConfigError(f"{where}: meta_evaluation must be an object with the lists "
                                 f"{', '.join(META_EVALUATION_LISTS)} (or absent)")
    return doc
