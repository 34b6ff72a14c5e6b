"""Benchmark cases from the configuration, and the runner that switches LoRA adapters per case."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sdxl_core.bench_cases import CaseRunner, expand_cases, read_prompts
from sdxl_core.bench_config import resolve
from sdxl_core.errors import InvalidConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def two_loras(tmp_path_factory):
    from safetensors.torch import save_file

    from sdxl_core.loading import load_pipelines
    from sdxl_core.lora import random_lora_state_dict

    folder = tmp_path_factory.mktemp("loras")
    unet = load_pipelines("tiny", None, device="cpu").base.unet
    paths = []
    for version, seed in (("v1", 1), ("v2", 2)):
        path = folder / f"wrong-{version}.safetensors"
        save_file(random_lora_state_dict(unet, rank=4, seed=seed, std=0.2), str(path))
        paths.append(f"wrong@{version}={path}")
    return paths


def _prompts(tmp_path, n=2):
    path = tmp_path / "p.txt"
    path.write_text("".join(f"prompt {i}\n" for i in range(n)))
    return str(path)


def test_cases_cover_variant_lora_version_prompt_and_seed(tmp_path, two_loras):
    pyproject = {"variants": {"mix": {"negative_prompt": "wrong", "loras": {"wrong@v1": 0.5, "wrong@v2": 0.5}}}}
    config = resolve({"lora": two_loras, "prompts": _prompts(tmp_path), "seeds": "0,1"}, pyproject)
    cases = expand_cases(config)
    ids = [c.id for c in cases]
    assert len(cases) == (2 + 2 + 1) * 2 * 2 and len(set(ids)) == len(ids)
    assert ids[:4] == ["baseline-p0-s0", "baseline-p0-s1", "baseline-p1-s0", "baseline-p1-s1"]
    lora_cases = [c for c in cases if c.variant == "wrong_lora"]
    assert sorted({c.lora for c in lora_cases}) == ["wrong@v1", "wrong@v2"]
    assert all(c.negative_prompt == "wrong" and c.loras == ((c.lora, 1.0),) for c in lora_cases)
    mix = [c for c in cases if c.variant == "mix"]
    assert mix[0].lora == "wrong@v1+wrong@v2" and mix[0].loras == (("wrong@v1", 0.5), ("wrong@v2", 0.5))
    assert all(c.loras == () and c.lora is None for c in cases if c.variant in ("baseline", "wrong_negative"))


def test_wrong_lora_needs_a_lora(tmp_path):
    with pytest.raises(InvalidConfigError, match="--sdxl-lora"):
        expand_cases(resolve({"variants": "wrong_lora", "prompts": _prompts(tmp_path)}, {}))


def test_prompt_formats(tmp_path):
    (tmp_path / "p.jsonl").write_text('"a"\n{"prompt": "b"}\n\n')
    (tmp_path / "p.yaml").write_text("prompts:\n  - c\n  - (d)++\n")
    assert read_prompts(str(tmp_path / "p.jsonl")) == ("a", "b")
    assert read_prompts(str(tmp_path / "p.yaml")) == ("c", "(d)++")
    assert len(read_prompts(None)) >= 12
    (tmp_path / "p.csv").write_text("a\n")
    (tmp_path / "bad.yaml").write_text("prompts: [a, 3]\n")
    (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    for name, match in (("p.csv", "unknown format"), ("bad.yaml", "entry 1"), ("latin.txt", "not UTF-8")):
        with pytest.raises(InvalidConfigError, match=match):
            read_prompts(str(tmp_path / name))


def test_runner_never_leaks_lora_state_between_cases(tmp_path, two_loras):
    config = resolve({"lora": two_loras, "prompts": _prompts(tmp_path, 1), "seeds": "0", "steps": 4, "size": 64}, {})
    runner = CaseRunner(config, device="cpu")
    assert runner.pipes.refiner.unet is not None and not getattr(runner.pipes.refiner.unet, "peft_config", None)
    cases = {c.id: c for c in expand_cases(config)}
    image = {}
    for cid in ("baseline-p0-s0", "wrong_lora[wrong@v1]-p0-s0", "baseline-p0-s0", "wrong_lora[wrong@v2]-p0-s0",
                "wrong_lora[wrong@v1]-p0-s0", "wrong_negative-p0-s0"):
        img = np.asarray(runner.generate(cases[cid]).images[0], dtype=np.int16)
        if cid in image:
            assert np.array_equal(img, image[cid]), f"{cid} changed after other cases ran"
        image[cid] = img
    v1, v2, base = image["wrong_lora[wrong@v1]-p0-s0"], image["wrong_lora[wrong@v2]-p0-s0"], image["baseline-p0-s0"]
    assert not np.array_equal(v1, v2) and not np.array_equal(v1, base)


def test_latency_suite_with_two_lora_versions(tmp_path, two_loras):
    """`pytest bench/test_latency.py` end to end: one benchmark per case, stage times and machine info."""
    out = tmp_path / "bench.json"
    argv = [sys.executable, "-m", "pytest", str(ROOT / "bench" / "test_latency.py"), "-q", "-p", "no:cacheprovider",
            "--sdxl-seeds", "0", "--sdxl-steps", "4", "--sdxl-size", "64", "--sdxl-prompts", _prompts(tmp_path, 1),
            "--sdxl-variants", "baseline,wrong_lora", f"--benchmark-json={out}"]
    for spec in two_loras:
        argv += ["--sdxl-lora", spec]
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    names = sorted(b["name"] for b in doc["benchmarks"])
    assert names == ["test_latency[baseline-p0-s0]", "test_latency[wrong_lora[wrong@v1]-p0-s0]",
                     "test_latency[wrong_lora[wrong@v2]-p0-s0]"]
    for b in doc["benchmarks"]:
        assert b["stats"]["rounds"] == 3
        info = b["extra_info"]
        assert set(info["stage_seconds"]) == {"text_encoding", "base_denoising", "refiner_denoising", "vae_decode"}
        assert info["images_per_second"] > 0 and info["size"] == [64, 64]
    assert doc["machine_info"]["sdxl_bench"]["libraries"]["diffusers"]
