"""bench/host_overhead.py's host-read scan: what it counts, where it says the read is, and on real pipelines."""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
from pathlib import Path

import torch

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "host_overhead.py"


def _script():
    spec = importlib.util.spec_from_file_location("host_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _next_line() -> int:
    return inspect.currentframe().f_back.f_lineno + 1


def test_host_reads_are_counted_by_op_and_calling_line():
    script = _script()
    x = torch.arange(6.0)
    with script._host_reads_mode() as scan:
        y = (x * 2).softmax(0) + x  # no read
        at_bool = _next_line()
        bool(y.sum() > 3)
        at_nonzero = _next_line()
        y.nonzero()
        at_item = _next_line()
        for _ in range(2):
            y[1].item()
    where = {(op, line.rsplit(":", 1)[1]): n for (op, line), n in scan.hits.items()}
    assert all(line.startswith(str(Path(__file__))) for _, line in scan.hits)
    assert where == {("_local_scalar_dense", str(at_bool)): 1, ("nonzero", str(at_nonzero)): 1,
                     ("_local_scalar_dense", str(at_item + 1)): 2}


def test_lean_host_drops_diffusers_stage_start_reads(fast_settings):
    """On the tiny pipelines: `host` reads each timestep against the denoising_end cut (diffusers) and the
    refiner's step count; `lean_host` makes those cuts on the CPU copies, and reads no line of diffusers' pipelines."""
    from sdxl_core.generate import GenerationRequest, generate
    from sdxl_core.loading import load_pipelines
    from sdxl_core.optimize import apply_level, get_level

    script = _script()
    request = GenerationRequest("a wolf, (oil on canvas)+++", 0, settings=fast_settings)
    reads = {}
    for name in ("host", "lean_host"):
        pipes = apply_level(load_pipelines("tiny", "tiny", device="cpu"),
                            dataclasses.replace(get_level(name), **script.CUDA_ONLY))
        generate(pipes, request)
        with script._host_reads_mode() as scan:
            generate(pipes, request)
        reads[name] = scan.hits
    in_pipelines = {name: sum(n for (_, line), n in hits.items() if line.startswith("diffusers/pipelines/"))
                    for name, hits in reads.items()}
    # diffusers' filter reads every timestep of the schedule (run 6 on the GPU: 50), get_timesteps one more
    assert in_pipelines == {"host": fast_settings.steps + 1, "lean_host": 0}
