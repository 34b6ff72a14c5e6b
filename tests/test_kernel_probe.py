"""bench/gpu/kernel_probe.py: the parts that run without a GPU (its reference arithmetic, its refusal)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu" / "kernel_probe.py"


def _probe():
    spec = importlib.util.spec_from_file_location("kernel_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_classic_attention_is_sdpa_and_rel_err_flags_non_finite():
    probe = _probe()
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    q, k, v = (torch.randn(1, 2, n, 16, generator=gen, dtype=torch.float64) for n in (33, 21, 21))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert probe.rel_err(probe.classic_attention(q, k, v), ref) < 1e-6  # its softmax runs in float32
    assert probe.rel_err(probe.classic_attention(q, k.flip(2), v), ref) > 1e-3
    assert probe.rel_err(torch.full_like(ref, float("nan")), ref) == float("inf")


def test_shapes_are_sdxl_s_at_1024():
    probe = _probe()
    heads_dim = {(h * d) for _, _, h, _, _, d in probe.ATTENTION_SHAPES}
    assert {640, 1280, 768, 1536, 512} == heads_dim  # base and refiner widths at their two attention levels, VAE
    assert {sq for _, _, _, sq, _, _ in probe.ATTENTION_SHAPES} == {4096, 1024, 16384}


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message a machine without a GPU gets")
def test_refuses_without_a_gpu():
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "needs a CUDA GPU" in proc.stderr


def test_a_failing_section_is_an_error_row_and_the_others_still_run(capsys):
    probe = _probe()

    def broken() -> list[dict]:
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore")

    rows = probe.section("relaunch", broken) + probe.section("gemm", lambda: [{"op": "gemm", "us": 1.0}])
    assert rows == [{"op": "relaunch", "shape": "-", "variant": "-",
                     "error": "RuntimeError: CUDA error: operation not permitted when stream is capturing"},
                    {"op": "gemm", "us": 1.0}]
    assert '"error": "RuntimeError: CUDA error' in capsys.readouterr().out
