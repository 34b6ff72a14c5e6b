"""The pytest plugin: options, precedence over pyproject, usage errors, machine info."""

from __future__ import annotations

pytest_plugins = ["pytester"]

CONF_TEST = """
def test_config(sdxl_config):
    print("CONFIG", sdxl_config.base, sdxl_config.seeds, sdxl_config.lora, sdxl_config.guidance_scale)
"""


def test_options_and_pyproject_precedence(pytester):
    pytester.makepyprojecttoml('[tool.sdxl-bench]\nbase = "from-pyproject"\nseeds = [7]\nguidance-scale = 5\n')
    pytester.makepyfile(CONF_TEST)
    result = pytester.runpytest_inprocess("-s", "-p", "sdxl_core.pytest_plugin", "--sdxl-seeds", "1,2",
                                          "--sdxl-lora", "wrong@v1=/a", "--sdxl-lora", "wrong@v2=/b")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*CONFIG from-pyproject (1, 2) ('wrong@v1=/a', 'wrong@v2=/b') 5.0*"])


def test_bad_option_is_a_usage_error_naming_the_fix(pytester):
    pytester.makepyfile(CONF_TEST)
    result = pytester.runpytest_inprocess("-p", "sdxl_core.pytest_plugin", "--sdxl-fid-features", "vgg")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*--sdxl-fid-features 'vgg': choose from effnet-lite0, inception*"])


def test_markers_are_registered(pytester):
    result = pytester.runpytest_inprocess("-p", "sdxl_core.pytest_plugin", "--markers")
    result.stdout.fnmatch_lines(["*@pytest.mark.gpu: needs a CUDA device*", "*@pytest.mark.bench:*"])


def test_machine_info_hook():
    from sdxl_core.pytest_plugin import pytest_benchmark_update_machine_info

    info: dict = {}
    pytest_benchmark_update_machine_info(None, info)
    libs = info["sdxl_bench"]["libraries"]
    assert libs["torch"] and libs["diffusers"] and "gpu" in info["sdxl_bench"]


def test_quality_suite_resume_and_gate(tmp_path):
    """Two sessions of bench/test_quality.py: the second with the same run id makes no image again; a third,
    gated against the first, passes on identical results; a missing reference run fails the session."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    prompts = tmp_path / "p.txt"
    prompts.write_text("a wolf in a forest\n")
    base = [sys.executable, "-m", "pytest", str(root / "bench" / "test_quality.py"), "-q", "-p", "no:cacheprovider",
            "--sdxl-seeds", "0", "--sdxl-steps", "4", "--sdxl-size", "64", "--sdxl-prompts", str(prompts),
            "--sdxl-run-dir", str(tmp_path / "runs")]

    def run(*extra):
        return subprocess.run(base + list(extra), cwd=root, capture_output=True, text=True, timeout=600)

    first = run("--sdxl-run-id", "a")
    assert first.returncode == 0, first.stdout[-3000:]
    log = tmp_path / "runs" / "a" / "images.jsonl"
    lines = log.read_text().splitlines()
    assert len(lines) == 2
    again = run("--sdxl-run-id", "a")
    assert again.returncode == 0 and log.read_text().splitlines() == lines  # nothing made twice
    doc = json.loads((tmp_path / "runs" / "a" / "results.json").read_text())
    assert [c["status"] for c in doc["cases"]] == ["ok", "ok"] and doc["schema_version"] == 1
    gated = run("--sdxl-run-id", "b", "--sdxl-compare", str(tmp_path / "runs" / "a"), "--sdxl-fail-on", "clip:-0.5")
    assert gated.returncode == 0 and "sdxl-bench gate: passed" in gated.stdout, gated.stdout[-3000:]
    missing = run("--sdxl-run-id", "c", "--sdxl-compare", str(tmp_path / "nope"), "--sdxl-fail-on", "clip:-0.5")
    assert missing.returncode == 1 and "sdxl-bench gate: cannot compare with" in missing.stdout, missing.stdout[-2000:]


def test_gpu_and_slow_markers_skip(pytester):
    pytester.makepyfile("""
import pytest

@pytest.mark.slow
def test_slow():
    pass

@pytest.mark.gpu
def test_gpu():
    import torch
    assert torch.cuda.is_available()
""")
    result = pytester.runpytest_inprocess("-p", "sdxl_core.pytest_plugin", "-rs")
    import torch

    result.assert_outcomes(skipped=1 if torch.cuda.is_available() else 2, passed=1 if torch.cuda.is_available() else 0)
    result.stdout.fnmatch_lines(["*slow: pass --run-slow to run it*"])
    assert pytester.runpytest_inprocess("-p", "sdxl_core.pytest_plugin", "--run-slow", "-k", "slow").ret == 0
