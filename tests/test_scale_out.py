"""A run split over processes with torchrun (gloo on the CPU) equals the one-process run, and survives a kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from process_helpers import kill_after_lines

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
# Bit-identical CPU results across process layouts need MKL's conditional numerical reproducibility: without it
# MKL picks code paths by buffer alignment, and images of a 2-process run differ from the 1-process run's by
# 1/255 in about 0.02% of pixels (measured). With it they are equal. (GPUs need their own determinism flags.)
ENV = {**os.environ, "MKL_CBWR": "COMPATIBLE"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale")
    prompts = tmp / "p.txt"
    prompts.write_text("a wolf in a forest\nan eye, (macro)++\na red car\n")
    args = ["-m", "pytest", str(ROOT / "bench" / "test_quality.py"), "-q", "-p", "no:cacheprovider",
            "--sdxl-seeds", "0,1", "--sdxl-steps", "4", "--sdxl-size", "64", "--sdxl-prompts", str(prompts),
            "--sdxl-run-dir", str(tmp / "runs")]
    return tmp, args


def _torchrun(n: int) -> list[str]:
    return [str(TORCHRUN), "--standalone", "--nproc_per_node", str(n)]


def _check(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _same_results(a: Path, b: Path) -> None:
    da, db = (json.loads((p / "results.json").read_text()) for p in (a, b))
    assert [c["status"] for c in db["cases"]] == ["ok"] * len(da["cases"])
    for ca, cb in zip(da["cases"], db["cases"]):
        assert ca["id"] == cb["id"] and ca["metrics"] == cb["metrics"]
        assert np.array_equal(np.asarray(Image.open(a / ca["image"])), np.asarray(Image.open(b / cb["image"])))
    assert da["sets"] == db["sets"]
    assert [{k: v for k, v in c.items()} for c in da["comparisons"]] == db["comparisons"]


def test_two_processes_give_the_one_process_result(setup):
    tmp, args = setup
    _check(subprocess.run([sys.executable] + args + ["--sdxl-run-id", "one"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=ENV))
    two = subprocess.run(_torchrun(2) + args, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    _check(two)
    runs = [p for p in (tmp / "runs").iterdir() if p.is_dir() and p.name != "one"]
    assert len(runs) == 1, "both processes must share one run folder (one run id)"
    lines = [json.loads(x) for x in (runs[0] / "images.jsonl").read_text().splitlines()]
    assert len(lines) == 12 and len({x["id"] for x in lines}) == 12  # every case once, across the processes
    assert two.stdout.count("sdxl-bench results:") == 1  # scored and reported once, by the main process
    _same_results(tmp / "runs" / "one", runs[0])


def test_killed_two_process_run_finishes_on_one_process(setup):
    tmp, args = setup
    folder = tmp / "runs" / "killed"
    log = folder / "images.jsonl"
    before = kill_after_lines(_torchrun(2) + args + ["--sdxl-run-id", "killed"], log, 4, ROOT, env=ENV)
    assert 4 <= len(before) < 12 and not (folder / "results.json").exists()
    _check(subprocess.run([sys.executable] + args + ["--sdxl-run-id", "killed"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=ENV))
    after = log.read_text().splitlines()
    assert after[:len(before)] == before
    done = {json.loads(x)["id"] for x in before if x.endswith("}")}
    assert not done & {json.loads(x)["id"] for x in after[len(before):]}
    if (tmp / "runs" / "one").exists():
        _same_results(tmp / "runs" / "one", folder)


def _one_process_run(tmp: Path, args: list[str]) -> Path:
    one = tmp / "runs" / "one"
    if not (one / "results.json").exists():
        _check(subprocess.run([sys.executable] + args + ["--sdxl-run-id", "one"], cwd=ROOT, capture_output=True,
                              text=True, timeout=600, env=ENV))
    return one


def test_xdist_workers_merge_into_one_run(setup):
    tmp, args = setup
    one = _one_process_run(tmp, args)
    proc = subprocess.run([sys.executable] + args + ["-n", "2", "--sdxl-run-id", "xdist"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=ENV)
    _check(proc)
    assert proc.stdout.count("sdxl-bench results:") == 1  # the controller scores once
    _same_results(one, tmp / "runs" / "xdist")


def test_latency_refuses_xdist(setup, tmp_path):
    tmp, args = setup
    latency = [a if not a.endswith("test_quality.py") else str(ROOT / "bench" / "test_latency.py") for a in args]
    proc = subprocess.run([sys.executable] + latency + ["-n", "2", "--sdxl-run-id", "lat"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 1
    assert "the latency suite does not run under pytest-xdist" in proc.stdout
