"""sdxl_core.timeline: the per-stage arithmetic against hand-made timelines, and a real profile of the tiny models."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
import torch

from sdxl_core.generate import GenerationRequest, StageClock, check_split, generate
from sdxl_core.timeline import (Interval, classify, copies_next_kernel, format_profile, graph_launch_idle,
                                profile_generation, profile_host, scan_host_syncs, summarize, union_us)


def _brute_union(items: list[Interval], resolution: float = 1.0) -> float:
    """The reference: mark every grid cell that some interval covers (integer endpoints, so exact)."""
    if not items:
        return 0.0
    lo = int(min(i.start_us for i in items))
    hi = int(max(i.end_us for i in items))
    covered = np.zeros(hi - lo, dtype=bool)
    for it in items:
        covered[int(it.start_us) - lo:int(it.end_us) - lo] = True
    return float(covered.sum()) * resolution


def test_union_matches_a_brute_force_reference():
    rng = random.Random(0)
    for _ in range(200):
        items = []
        for _ in range(rng.randint(0, 12)):
            a = rng.randint(0, 100)
            items.append(Interval("k", a, a + rng.randint(0, 30)))
        assert union_us(items) == _brute_union(items)


def test_summarize_a_hand_made_timeline():
    # marks at 0 (text), 100 (base, 2 steps), 400 (end); one kernel before the first mark
    items = [Interval("early", -50, -10),
             Interval("clip_gemm_kernel", 10, 30), Interval("triton_poi_fused_gelu", 50, 60),  # text: busy 30
             Interval("nvjet_sm90_tst_gemm", 100, 200), Interval("nvjet_sm90_tst_gemm", 150, 250),  # overlap: 150
             Interval("cudnn_generated_fort_native_sdpa_flash", 300, 390)]  # base busy 150 + 90 = 240
    s = summarize(items, [0, 100, 400], ["text_encoding", "base_denoising", "end"], steps={"base_denoising": 2})
    assert s["span_ms"] == pytest.approx(0.4) and s["busy_ms"] == pytest.approx(0.27)
    assert s["idle_ms"] == pytest.approx(0.13) and s["kernels"] == 5 and s["outside_stages"] == 1
    text, base = s["stages"]["text_encoding"], s["stages"]["base_denoising"]
    assert (text["span_ms"], text["busy_ms"], text["kernels"]) == pytest.approx((0.1, 0.03, 2))
    assert text["idle_ms"] == pytest.approx(0.07)
    assert base["busy_ms"] == pytest.approx(0.24) and base["kernel_ms"] == pytest.approx(0.29)
    assert base["idle_ms"] == pytest.approx(0.06)
    assert base["ms_per_step"] == pytest.approx(0.15) and base["kernels_per_step"] == 1.5
    assert "steps" not in text
    assert s["per_class"]["gemm"] == {"ms": pytest.approx(0.22), "launches": 3}
    assert s["per_class"]["attention"]["launches"] == 1
    assert s["top_kernels"][0] == {"name": "nvjet_sm90_tst_gemm", "class": "gemm", "ms": pytest.approx(0.2),
                                   "launches": 2}
    # each stage ranks its own kernels (the text stage's are not in the image's top list)
    assert [(k["name"], k["launches"]) for k in text["top_kernels"]] == [("clip_gemm_kernel", 1),
                                                                         ("triton_poi_fused_gelu", 1)]
    assert text["top_kernels"][0]["ms"] == pytest.approx(0.02)
    assert [k["name"] for k in base["top_kernels"]] == ["nvjet_sm90_tst_gemm", "cudnn_generated_fort_native_sdpa_flash"]
    assert "text_encoding top: 0.0 ms/1 clip_gemm_kernel" in format_profile(s)
    assert "base_denoising top" not in format_profile(s)
    gaps = s["largest_gaps"]
    # text: 0-10, 30-50, 60-100; base: 250-300, 390-400
    assert [round(g["ms"] * 1e3) for g in gaps] == [50, 40, 20, 10, 10]
    assert gaps[0] == {"ms": pytest.approx(0.05), "at_ms": pytest.approx(0.15), "after": "nvjet_sm90_tst_gemm",
                       "before": "cudnn_generated_fort_native_sdpa_flash", "stage": "base_denoising"}
    assert gaps[1]["before"] == "(stage end)" and gaps[1]["stage"] == "text_encoding"
    assert "base_denoising" in format_profile(s) and "per step 0.15 ms" in format_profile(s)


def test_idle_is_broken_down_by_gap_size_and_neighbours():
    # text 0-100: gaps 0-10 (10 us), 30-50 (20), 60-100 (40); base 100-400: 250-300 (50), 390-400 (10)
    items = [Interval("clip_gemm_kernel", 10, 30), Interval("triton_poi_fused_gelu", 50, 60),
             Interval("nvjet_sm90_tst_gemm", 100, 200), Interval("nvjet_sm90_tst_gemm", 150, 250),
             Interval("cudnn_generated_fort_native_sdpa_flash", 300, 390)]
    s = summarize(items, [0, 100, 400], ["text_encoding", "base_denoising", "end"])
    idle = s["idle"]
    by_size = {b["up_to_us"]: (b["gaps"], round(b["ms"] * 1e3)) for b in idle["by_size"]}
    assert by_size == {2.0: (0, 0), 5.0: (0, 0), 20.0: (3, 40), 100.0: (2, 90), 1000.0: (0, 0), None: (0, 0)}
    assert sum(b["ms"] for b in idle["by_size"]) == pytest.approx(s["idle_ms"])  # the gaps tile the idle time
    pairs = {(d["after"], d["before"]): (d["gaps"], round(d["ms"] * 1e3)) for d in idle["by_neighbours"]}
    assert pairs == {("gemm", "attention"): (1, 50), ("triton (fused pointwise/norm)", "(stage end)"): (1, 40),
                     ("gemm", "triton (fused pointwise/norm)"): (1, 20), ("(stage start)", "gemm"): (1, 10),
                     ("attention", "(stage end)"): (1, 10)}
    assert idle["memset_memcpy_next"] == []


def test_memsets_and_copies_are_counted_with_the_kernel_after_them():
    items = [Interval("Memset (Device)", 0, 1), Interval("nvjet_sm90_gemm", 2, 5),
             Interval("Memset (Device)", 6, 7), Interval("nvjet_sm90_gemm", 8, 9),
             Interval("Memcpy DtoD (Device -> Device)", 10, 11), Interval("triton_poi_fused_add", 12, 13),
             Interval("Memset (Device)", 14, 15)]
    pairs = {d["pair"]: d["count"] for d in copies_next_kernel(items)}
    assert pairs == {"Memset (Device) -> nvjet_sm90_gemm": 2,
                     "Memcpy DtoD (Device -> Device) -> triton_poi_fused_add": 1, "Memset (Device) -> (end)": 1}
    text = format_profile(summarize(items, [0, 20], ["base_denoising", "end"]))
    assert "2x Memset (Device) -> nvjet_sm90_gemm" in text and "idle by gap size" in text


def _busy_python(n: int) -> int:
    return sum(i * i for i in range(n))


def test_host_profile_finds_where_python_spends_its_time():
    def run(clock):
        _busy_python(1000)  # before the first mark
        clock.mark("text_encoding")
        _busy_python(200_000)
        clock.mark("base_denoising")
        time.sleep(0.05)
        clock.mark("end")
        _busy_python(1000)  # after the end: in no stage

    host = profile_host(run, torch.device("cpu"), top=10)
    assert host["wall_s"] >= 0.05
    own = {r["where"]: r for r in host["by_own"]}
    sleep = own["<built-in method time.sleep>"]
    assert sleep["calls"] == 1 and 45 <= sleep["own_ms"] <= host["wall_s"] * 1e3
    busy = next(r for r in host["by_cumulative"] if r["where"].endswith("(_busy_python)"))
    assert busy["where"].startswith("tests/test_timeline.py:")
    assert busy["cumulative_ms"] > busy["own_ms"] > 0  # its generator expression runs as a callee
    assert [r["own_ms"] for r in host["by_own"]] == sorted((r["own_ms"] for r in host["by_own"]), reverse=True)
    # by stage: each function's time lands in the stage it ran in
    stages = host["by_stage"]
    assert list(stages) == ["(start)", "text_encoding", "base_denoising"]
    where = {name: {r["where"]: r for r in st["by_own"]} for name, st in stages.items()}
    assert "<built-in method time.sleep>" in where["base_denoising"]
    assert all("time.sleep" not in w for name in ("(start)", "text_encoding") for w in where[name])
    assert stages["base_denoising"]["wall_ms"] >= 50
    gen = next(r for w, r in where["text_encoding"].items() if "<genexpr>" in w)
    assert gen["calls"] == 200_001 and next(r for w, r in where["(start)"].items() if "<genexpr>" in w)["calls"] == 1001
    assert busy["calls"] == 3  # the whole-call rows: before the first mark, in text_encoding and after the end
    text = format_profile({"span_ms": 1.0, "busy_ms": 1.0, "idle_ms": 0.0, "kernels": 0, "stages": {},
                           "per_class": {}, "top_kernels": [], "largest_gaps": [], "host_profile": host})
    assert "host (cProfile" in text and "time.sleep" in text and "base_denoising (" in text


def test_summarize_refuses_markers_that_do_not_fit():
    with pytest.raises(ValueError, match="one marker per stage mark"):
        summarize([], [0.0, 1.0], ["text_encoding", "base_denoising", "end"])
    with pytest.raises(ValueError, match="out of order"):
        summarize([], [5.0, 1.0], ["text_encoding", "end"])


@pytest.mark.parametrize("name, label", [
    ("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_bias_TNT", "gemm"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_cga1x1x1_kernel0_",
     "attention"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "conv"),
    ("triton_poi_fused_gelu_mul_split_view_54", "triton (fused pointwise/norm)"),
    ("triton_poi_fused_clone_convolution_native_group_norm_silu_101", "triton (fused pointwise/norm)"),
    ("triton_red_fused_add_div_native_layer_norm_view_56", "triton (fused pointwise/norm)"),
    ("triton_tem_fused_mm_3", "gemm"),
    ("Memset (Device)", "memset/memcpy"),
    ("aten::linear", "gemm"), ("aten::conv2d", "conv"), ("aten::scaled_dot_product_attention", "attention"),
    ("aten::add", "other"),
])
def test_classify(name, label):
    assert classify(name) == label


def test_profile_of_the_tiny_models(tiny_pipes, fast_settings):
    """A real profile on the CPU: every stage the clock marks has work in it, the stage spans add up to the
    whole, and profiling does not change the image."""
    request = GenerationRequest("a wolf in a misty forest, (oil on canvas)+++", 3, settings=fast_settings)
    plain = generate(tiny_pipes, request)
    base_steps, refiner_steps = check_split(tiny_pipes.base.scheduler, fast_settings.steps, 0.8)
    outputs = []

    def run(clock: StageClock):
        outputs.append(generate(tiny_pipes, request, clock=clock))

    s = profile_generation(run, torch.device("cpu"), {"base_denoising": base_steps,
                                                      "refiner_denoising": refiner_steps})
    assert np.array_equal(np.asarray(outputs[0].images[0]), np.asarray(plain.images[0]))
    assert list(s["stages"]) == ["text_encoding", "base_denoising", "refiner_denoising", "vae_decode"]
    assert list(s["host_stage_seconds"]) == list(s["stages"])
    for name, stage in s["stages"].items():
        assert stage["kernels"] > 0 and 0 < stage["busy_ms"] <= stage["span_ms"], name
    assert sum(st["span_ms"] for st in s["stages"].values()) == pytest.approx(s["span_ms"])
    assert s["stages"]["base_denoising"]["steps"] == base_steps
    # every denoising step runs the UNet, so a step has at least as many top-level ops as the UNet has ResNets
    assert s["stages"]["base_denoising"]["kernels_per_step"] > 10
    assert s["per_class"]["conv"]["launches"] > 0 and s["per_class"]["gemm"]["launches"] > 0
    assert s["notes"] == []
    # the device-side spans agree with the host clock's stage times within the profiler's overhead
    host_ms = sum(s["host_stage_seconds"].values()) * 1e3
    assert 0.5 * host_ms < s["span_ms"] < 1.5 * host_ms


def test_sync_scan_is_cuda_only():
    out = scan_host_syncs(lambda: None, torch.device("cpu"))
    assert out["applicable"] is False and "CUDA-only" in out["reason"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sync_scan_finds_a_sync():
    x = torch.ones(4, device="cuda")
    out = scan_host_syncs(lambda: x.sum().item(), torch.device("cuda"))
    assert out["applicable"] and out["syncs"] >= 1 and "test_timeline.py" in out["by_line"][0]["where"]


def test_cuda_intervals_are_kernels_split_by_spin_markers():
    """The CUDA branch of the extraction, on a recorded-event list shaped like kineto's (name, device type, start
    and duration in ns): host events are ignored, spin kernels are the markers, everything else is work."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from sdxl_core.timeline import _device_intervals

    def ev(name, start, dur, dev, correlation=0):
        return SimpleNamespace(name=lambda: name, start_ns=lambda: start, duration_ns=lambda: dur,
                               device_type=lambda: dev, correlation_id=lambda: correlation)

    events = [ev("cudaLaunchKernel", 0, 5_000, DeviceType.CPU, 7),
              ev("at::cuda::(anonymous namespace)::spin_kernel(long)", 1_000, 1_000, DeviceType.CUDA, 6),
              ev("nvjet_sm90_tst_gemm", 3_000, 4_000, DeviceType.CUDA, 7),
              ev("Memset (Device)", 8_000, 1_000, DeviceType.CUDA, 7),
              ev("at::cuda::(anonymous namespace)::spin_kernel(long)", 10_000, 1_000, DeviceType.CUDA, 8)]
    prof = SimpleNamespace(profiler=SimpleNamespace(kineto_results=SimpleNamespace(events=lambda: events)))
    items, markers = _device_intervals(prof, cuda=True)
    assert markers == [1.0, 10.0]
    assert items == [Interval("nvjet_sm90_tst_gemm", 3.0, 7.0, 7), Interval("Memset (Device)", 8.0, 9.0, 7)]
    s = summarize(items, markers, ["base_denoising", "end"], {"base_denoising": 1})
    assert s["stages"]["base_denoising"]["busy_ms"] == pytest.approx(0.005)
    assert s["stages"]["base_denoising"]["idle_ms"] == pytest.approx(0.004)


def _replay(launch: int, start: float, kernels: int, gap: float = 1.0, us: float = 10.0) -> list[Interval]:
    """One graph replay: ``kernels`` kernels of ``us`` each, ``gap`` apart, all with the launch id ``launch``."""
    return [Interval(f"k{i}", start + i * (us + gap), start + i * (us + gap) + us, launch) for i in range(kernels)]


def test_idle_is_split_between_inside_the_graph_replays_and_between_them():
    # stage 0-10_000 us: setup kernels at 100 (own launch ids), replays of 60 kernels (659 us each) at 1000, 1700
    # (41 us after the first), 2459 (100 us after the second, with a 30 us copy between: 70 us idle)
    setup = [Interval("memcpy", 100, 110, 1), Interval("scale", 200, 205, 2)]
    first, second, third = _replay(10, 1000, 60), _replay(11, 1700, 60), _replay(12, 2459, 60)
    between = [Interval("Memcpy DtoD", 2400, 2430, 13)]
    stray = [Interval("sched", 3300, 3310, 14)]  # after the last replay: idle of the stage, not between replays
    items = setup + first + second + third + between + stray
    split = graph_launch_idle(items, [0, 10_000], ["base_denoising", "end"])["base_denoising"]
    assert split["launches"] == 3 and split["kernels_median"] == 60
    assert split["inside_idle_ms"] == pytest.approx(3 * 59 * 1.0 / 1e3)  # 59 one-us gaps per replay
    assert split["between_idle_ms"] == pytest.approx((41 + 70) / 1e3)
    assert split["between_idle_ms_median"] == pytest.approx(0.07)
    assert split["between_idle_ms_max"] == pytest.approx(0.07)
    assert split["before_first_idle_ms"] == pytest.approx((1000 - 15) / 1e3)
    s = summarize(items, [0, 10_000], ["base_denoising", "end"])
    assert s["stages"]["base_denoising"]["graph_launches"] == split
    assert "base_denoising graph replays: 3 of ~60 kernels; idle inside 0.2 ms, between 0.1 ms (median 70 us" \
        in format_profile(s)


def test_launches_below_a_graphs_size_or_without_ids_are_not_replays():
    kernels = _replay(0, 0, 80) + _replay(0, 1000, 80)  # no launch ids (a CPU profile, say)
    assert graph_launch_idle(kernels, [0, 5000], ["base_denoising", "end"]) == {}
    small = _replay(1, 0, 10) + _replay(2, 1000, 10)  # eager launches: one kernel per id, or a few
    assert graph_launch_idle(small, [0, 5000], ["base_denoising", "end"]) == {}
    one = _replay(1, 0, 80)  # a stage replayed once has no boundary to measure
    assert graph_launch_idle(one, [0, 5000], ["vae_decode", "end"]) == {}
    assert "graph_launches" not in summarize(one, [0, 5000], ["vae_decode", "end"])["stages"]["vae_decode"]
