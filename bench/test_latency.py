"""Latency of base+refiner generation per case (variant x LoRA version x prompt x seed), with pytest-benchmark.

    pytest bench/test_latency.py --sdxl-base B --sdxl-refiner R --sdxl-lora wrong@v1=PATH --benchmark-save=NAME

pedantic mode: one untimed warm-up round, then ROUNDS timed rounds of one generation each; on CUDA the timed
call ends with ``torch.cuda.synchronize()``. ``extra_info`` holds the per-stage seconds (median over rounds),
peak GPU memory and images per second; machine info gets the GPU, driver and library versions.
"""

from __future__ import annotations

import os
import statistics
from dataclasses import asdict

import pytest
import torch

ROUNDS = 3
WARMUP_ROUNDS = 1


@pytest.mark.bench
def test_latency(benchmark, sdxl_case, sdxl_runner, sdxl_run):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.fail("the latency suite does not run under pytest-xdist: timings must not share a card or CPU with "
                    "other workers; run bench/test_latency.py without -n (bench/test_quality.py scales with -n)",
                    pytrace=False)
    cuda = sdxl_runner.pipes.device.type == "cuda"
    stages = []

    def generate_once():
        out = sdxl_runner.generate(sdxl_case)
        if cuda:
            torch.cuda.synchronize()
        stages.append(out.stage_seconds)
        return out

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    out = benchmark.pedantic(generate_once, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
    timed = stages[WARMUP_ROUNDS:]
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        case=asdict(sdxl_case),
        stage_seconds={k: statistics.median(s[k] for s in timed) for k in timed[0]},
        images_per_second=1.0 / median,
        peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        size=[sdxl_runner.settings.width, sdxl_runner.settings.height], steps=sdxl_runner.settings.steps,
    )
    sdxl_run.record(sdxl_case, out, median)  # the case's image, if the run does not have it yet
    sdxl_run.record_latency(sdxl_case, {"median_s": median, "rounds": ROUNDS,
                                        "stage_seconds": benchmark.extra_info["stage_seconds"],
                                        "images_per_second": 1.0 / median,
                                        "peak_memory_gib": benchmark.extra_info["peak_memory_gib"]})
    image = out.images[0]
    assert image.size == (sdxl_runner.settings.width, sdxl_runner.settings.height)
    from sdxl_core.metrics.sanity import image_sanity

    check = image_sanity(image, out.latents)
    assert check.ok, f"{sdxl_case.id}: image flagged {check.flags}"
