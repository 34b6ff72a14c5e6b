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


def test_toy_prompts_are_scored_by_the_oracle_and_meta_evaluated(tmp_path):
    """Toy-world captions as prompts: the default metrics add oracle_accuracy (per case and per group, compared
    with baseline) and results.json gains the meta-evaluation; the report shows it. Images are rendered scenes,
    wrong_negative's on a wrong background for half the prompts; no model runs."""
    import dataclasses
    from types import SimpleNamespace

    from sdxl_core.html_report import render_report
    from sdxl_core.toy.world import COLOURS, ToyDataset, render

    samples = list(ToyDataset(seed=9, length=8))
    prompts = tmp_path / "toy.txt"
    prompts.write_text("".join(s.caption + "\n" for s in samples))
    config = resolve({"prompts": str(prompts), "seeds": "0", "run_dir": "runs", "run_id": "toy"}, {})
    run = BenchRun(config, root=tmp_path)
    for case in run.cases:
        scene = samples[case.prompt_index].scene
        if case.variant != "baseline" and case.prompt_index % 2:
            scene = dataclasses.replace(scene, background=next(c for c in COLOURS
                                                               if c not in (scene.colour, scene.background)))
        run.record(case, SimpleNamespace(images=[render(scene)], stage_seconds={}), 0.1)
    doc = check_document(json.loads(run.finalize().read_text()))
    values = {(c["variant"], c["prompt_index"]): c["metrics"]["oracle_accuracy"] for c in doc["cases"]}
    assert values == {(v, i): 0.0 if v != "baseline" and i % 2 else 1.0
                      for v in ("baseline", "wrong_negative") for i in range(8)}
    assert doc["sets"]["wrong_negative"]["oracle_accuracy"]["value"] == 0.5
    assert "per_image" not in doc["sets"]["wrong_negative"]["oracle_accuracy"]  # kept per case instead
    assert doc["sets"]["wrong_negative"]["oracle_accuracy"]["per_check"]["background"] == 0.5
    comp = next(c for c in doc["comparisons"] if c["metric"] == "oracle_accuracy")
    assert comp["estimate"] == -0.5 and comp["candidate"] == "wrong_negative"
    meta = doc["meta_evaluation"]
    assert [r["metric"] for r in meta["per_image"]] == ["clip"] and meta["per_image"][0]["n"] == 16
    assert {s["metric"] for s in meta["skipped"]} >= {"fid", "kid", "cmmd"}  # shifts from baseline: no direction
    page = (render_report([run.folder], tmp_path / "report")).read_text(encoding="utf-8")
    assert "Which metric to trust (toy world)" in page and meta["per_image"][0]["verdict"] in page
