"""The run store without models: every planned case is in results.json; prompts are checked and recorded."""

from __future__ import annotations

import json

from sdxl_core.bench_config import resolve
from sdxl_core.bench_run import BenchRun
from sdxl_core.results_schema import check_document


def test_unfinished_cases_are_error_rows_and_prompt_problems_are_recorded(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a wolf, (oil on canvas:1.3)\n" + " ".join(["word"] * 100) + "\n")
    config = resolve({"prompts": str(prompts), "seeds": "0", "run_dir": "runs", "run_id": "r"}, {})
    run = BenchRun(config, root=tmp_path)
    path = run.finalize(score=False)
    doc = check_document(json.loads(path.read_text()))
    assert [c["status"] for c in doc["cases"]] == ["error"] * 4
    assert all(c["message"].startswith("not run") for c in doc["cases"])
    assert [p["index"] for p in doc["prompts"]] == [0, 1]
    assert doc["prompts"][1]["truncated"] and doc["prompts"][1]["n_tokens"] > 77
    assert any("a1111-weight" in w and "(oil on canvas)1.3" in w for w in doc["warnings"])
    assert any(w.startswith("prompt #1: too-long") for w in doc["warnings"])
    assert doc["git"].keys() == {"commit", "dirty"} and doc["schema_version"] == 1
