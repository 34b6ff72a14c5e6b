"""The bench flow end to end on the tiny models: kill and resume, and a report across LoRA versions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from process_helpers import kill_after_lines

pytest_plugins = ["pytester"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    from safetensors.torch import save_file

    from sdxl_core.loading import load_pipelines
    from sdxl_core.lora import random_lora_state_dict

    tmp = tmp_path_factory.mktemp("flow")
    unet = load_pipelines("tiny", None, device="cpu").base.unet
    loras = {}
    for version, seed in (("v1", 1), ("v2", 2)):
        path = tmp / f"wrong-{version}.safetensors"
        save_file(random_lora_state_dict(unet, rank=4, seed=seed, std=0.2), str(path))
        loras[version] = f"wrong@{version}={path}"
    prompts = tmp / "p.txt"
    prompts.write_text("a wolf in a forest\nan eye, (macro)++\n")
    argv = [sys.executable, "-m", "pytest", str(ROOT / "bench" / "test_quality.py"), "-q", "-p", "no:cacheprovider",
            "--sdxl-seeds", "0,1", "--sdxl-steps", "4", "--sdxl-size", "64", "--sdxl-prompts", str(prompts),
            "--sdxl-run-dir", str(tmp / "runs")]
    return tmp, argv, loras


def _run(argv, *extra):
    proc = subprocess.run(argv + list(extra), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    return proc


def _results(folder):
    return json.loads((folder / "results.json").read_text())


def test_killed_run_resumes_to_the_uninterrupted_result(flow):
    tmp, argv, loras = flow
    _run(argv, "--sdxl-lora", loras["v1"], "--sdxl-run-id", "whole")
    killed = tmp / "runs" / "killed"
    log = killed / "images.jsonl"
    before = kill_after_lines(argv + ["--sdxl-lora", loras["v1"], "--sdxl-run-id", "killed"], log, 3, ROOT)
    assert 3 <= len(before) < 12 and not (killed / "results.json").exists()
    done_before = {json.loads(line)["id"]: json.loads(line)["image"] for line in before if line.endswith("}")}
    _run(argv, "--sdxl-lora", loras["v1"], "--sdxl-run-id", "killed")
    after = log.read_text().splitlines()
    assert after[:len(before)] == before  # append-only: no finished line rewritten
    made_again = [json.loads(line)["id"] for line in after[len(before):]]
    assert not set(made_again) & set(done_before)  # no finished image made twice
    whole, resumed = _results(tmp / "runs" / "whole"), _results(killed)
    assert [c["status"] for c in resumed["cases"]] == ["ok"] * 12
    for a, b in zip(whole["cases"], resumed["cases"]):
        assert a["id"] == b["id"] and a["metrics"] == b["metrics"]
        img_a = np.asarray(Image.open(tmp / "runs" / "whole" / a["image"]))
        img_b = np.asarray(Image.open(killed / b["image"]))
        assert np.array_equal(img_a, img_b), a["id"]
    assert whole["sets"] == resumed["sets"]
    strip = ("seconds",)
    assert [{k: v for k, v in c.items() if k not in strip} for c in whole["comparisons"]] == \
        [{k: v for k, v in c.items() if k not in strip} for c in resumed["comparisons"]]


def test_report_across_lora_versions(flow):
    from sdxl_core.html_report import render_report

    tmp, argv, loras = flow
    _run(argv, "--sdxl-lora", loras["v1"], "--sdxl-run-id", "lora-v1")
    _run(argv, "--sdxl-lora", loras["v2"], "--sdxl-run-id", "lora-v2")
    page = render_report([tmp / "runs" / "lora-v1", tmp / "runs" / "lora-v2"], tmp / "both").read_text()
    section = page[page.index('id="across-runs"'):]
    table = section[:section.index("</table>")]
    assert "wrong_lora[wrong@v1]" in table and "wrong_lora[wrong@v2]" in table
    assert table.count("<tr>") >= 4  # header + one row per matched group and metric
    assert "no significant difference" in table or "better" in table or "worse" in table
    assert "[" in table  # intervals
    v1, v2 = _results(tmp / "runs" / "lora-v1"), _results(tmp / "runs" / "lora-v2")
    assert v1["loras"][0]["label"] == "wrong@v1" and v2["loras"][0]["label"] == "wrong@v2"
    assert v1["loras"][0]["sha256"] != v2["loras"][0]["sha256"]


def test_a_failing_case_is_an_error_row_and_the_session_fails(pytester, tmp_path):
    """Fault injection: one case raises (as CUDA out-of-memory would); the others finish, results.json holds
    the error row with its message, the report shows it, and pytest exits non-zero."""
    pytester.makeconftest("""
import pytest
from sdxl_core.bench_cases import CaseRunner

_generate = CaseRunner.generate

def failing(self, case):
    if case.prompt_index == 1 and case.variant == "wrong_negative":
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
    return _generate(self, case)

CaseRunner.generate = failing
""")
    pytester.makepyfile(test_quality=(ROOT / "bench" / "test_quality.py").read_text())
    prompts = tmp_path / "p.txt"
    prompts.write_text("a wolf\nan eye\n")
    result = pytester.runpytest_inprocess("-p", "sdxl_core.pytest_plugin", "-q", "--sdxl-seeds", "0",
                                          "--sdxl-steps", "4", "--sdxl-size", "64", "--sdxl-prompts", str(prompts),
                                          "--sdxl-run-dir", str(tmp_path / "runs"), "--sdxl-run-id", "oom")
    assert result.ret == 1
    result.assert_outcomes(passed=3, failed=1)
    doc = _results(tmp_path / "runs" / "oom")
    status = {c["id"]: (c["status"], c["message"]) for c in doc["cases"]}
    assert status["wrong_negative-p1-s0"] == ("error", "RuntimeError: CUDA out of memory. Tried to allocate "
                                                       "20.00 GiB (injected)")
    assert [s for s, _ in status.values()].count("ok") == 3
    page = (tmp_path / "runs" / "oom" / "report" / "index.html").read_text()
    assert "CUDA out of memory" in page
