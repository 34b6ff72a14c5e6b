"""sdxl_core.speed: case parsing, the result table, and a real SpeedRunner pass over the tiny models."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict

import pytest
import torch

from sdxl_core.errors import InvalidConfigError
from sdxl_core.generate import GenerationSettings
from sdxl_core.loading import load_pipelines
from sdxl_core.speed import (IMAGE_PSNR_MIN, PROFILE_UNFINISHED, SCHEMA_VERSION, SpeedCase, SpeedResult, SpeedRunner,
                             default_cases, machine_info, parse_case, profiled_cases, render_table, run_speed_suite)


# --------------------------------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------------------------------


def test_parse_case():
    assert parse_case("compile@b4") == SpeedCase("compile", 4, None)
    assert parse_case("eager") == SpeedCase("eager", 1, None)
    assert parse_case("channels_last+lora_fused") == SpeedCase("channels_last", 1, "fused")
    assert parse_case("channels_last+lora_unfused@b2") == SpeedCase("channels_last", 2, "unfused")


@pytest.mark.parametrize("text, hint", [
    ("nope", "unknown optimisation level 'nope'"),
    ("eager@bx", "cannot read case 'eager@bx'"),
    ("eager@b0", "batch_size must be >= 1"),
    ("eager+lora_maybe", "lora must be None, 'unfused' or 'fused'"),
    ("fused_qkv+lora_unfused", "fuses QKV projections"),
    ("channels_last+lora_", "names no LoRA mode"),
])
def test_parse_case_refuses(text, hint):
    with pytest.raises(InvalidConfigError, match=hint):
        parse_case(text)


def test_unfused_lora_on_fused_qkv_is_refused():
    with pytest.raises(InvalidConfigError, match="would bypass an unfused LoRA.*channels_last"):
        SpeedCase("fused_qkv", lora="unfused")
    SpeedCase("fused_qkv", lora="fused")  # fusing the LoRA first is fine


def test_case_names_and_references():
    assert SpeedCase("compile", 4).name == "compile@b4"
    assert SpeedCase("channels_last", lora="fused").name == "channels_last+lora_fused"
    for text in ("compile@b4", "channels_last+lora_fused", "channels_last+lora_unfused@b2", "eager"):
        assert parse_case(text).name == text  # names round-trip
    assert SpeedCase("bf16", batch_size=2).reference_name == "eager"
    assert SpeedCase("channels_last", lora="unfused").reference_name == "channels_last+lora_unfused"
    assert SpeedCase("channels_last", lora="fused").reference_name == "channels_last+lora_unfused"
    assert SpeedCase("channels_last", 4, lora="fused").reference_name == "channels_last+lora_unfused"


def test_machine_info_is_the_provenance_runs_record():
    """Since schema 2: library versions under "libraries" (as bench runs record them), the GPU block, date and
    device (schemas 3 to 7 added per-case fields only)."""
    from sdxl_core.provenance import library_versions

    info = machine_info(torch.device("cpu"))
    assert SCHEMA_VERSION == 7
    assert info["libraries"] == library_versions() and info["libraries"]["diffusers"]
    assert info["gpu"] is None and info["device"] == "cpu" and info["cpu_count"] >= 1
    assert info["date"].endswith("+00:00")


def test_default_cases_start_with_the_reference():
    cases = default_cases()
    assert cases[0] == SpeedCase("eager")
    assert cases[1] == SpeedCase("lean_host")  # the fastest level timed on a GPU (reports/gpu/NOTES.md, runs 9-10)
    assert len({c.name for c in cases}) == len(cases)
    for c in cases:  # every fused-LoRA case has its unfused reference earlier in the list
        if c.lora == "fused":
            names = [x.name for x in cases[: cases.index(c)]]
            assert c.reference_name in names


# --------------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------------


def _ok(case, spi, check, **kw):
    r = SpeedResult(case, {"name": case}, 1, None, "ok", rounds_s=[spi], seconds_per_batch=spi,
                    seconds_per_image=spi, images_per_second=1 / spi, first_call_s=3 * spi, equivalence=check, **kw)
    return asdict(r)


def test_render_table():
    results = [
        _ok("eager", 2.0, {"note": "reference case", "finite": True, "passed": True}),
        _ok("sdpa", 1.0, {"passed": True, "reference": "eager", "image_psnr_db": 48.25, "latent_rel_l2": 0.0123},
            mfu=0.25, peak_memory_gib=12.5),
        asdict(SpeedResult("compile", {"name": "compile"}, 1, None, "error",
                           message="RuntimeError: boom in the compiler")),
        _ok("bf16", 0.5, {"passed": False, "reference": "eager", "image_psnr_db": 12.0, "latent_rel_l2": 0.5}),
        asdict(SpeedResult("cudagraphs", {"name": "cudagraphs"}, 1, None, "skipped",
                           message="time budget: 10 s left, about 200 s needed")),
    ]
    text = render_table({"results": json.loads(json.dumps(results))})  # as read back from the JSON file
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["case", "s/image", "img/s"] and "x eager" in lines[0] and "x sdpa" in lines[0]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert set(rows) == {"eager", "sdpa", "compile", "bf16", "cudagraphs"}
    assert "ERROR: RuntimeError: boom in the compiler" in rows["compile"]
    assert "SKIPPED: time budget" in rows["cudagraphs"]
    # speed-ups: eager 2 s/image, sdpa 1 s/image, bf16 0.5 s/image
    assert rows["eager"].split()[1:5] == ["2.000", "0.500", "1.00", "0.50"]
    assert rows["sdpa"].split()[1:5] == ["1.000", "1.000", "2.00", "1.00"]
    assert rows["bf16"].split()[1:5] == ["0.500", "2.000", "4.00", "2.00"]
    assert "25.0%" in rows["sdpa"] and "12.5" in rows["sdpa"]
    assert "reference" in rows["eager"]
    assert "ok vs eager: PSNR 48.2 dB, latents rel 0.0123" in rows["sdpa"]
    assert "FAIL vs eager: PSNR 12.0 dB" in rows["bf16"]
    assert "compiled from the cache" not in text
    cached = render_table({"results": json.loads(json.dumps(results)),
                           "compile_cache": {"loaded": {"loaded": True, "dir": ".compile-cache"}}})
    assert cached.splitlines()[-1] == "(1st call: compiled from the cache loaded from .compile-cache)"


def test_render_table_without_eager():
    results = [_ok("bf16", 0.5, {"note": "reference case eager has no output in this run", "passed": None})]
    row = render_table({"results": results}).splitlines()[2]
    assert row.split()[3:5] == ["-", "-"]
    assert "has no output in this run" in row


# --------------------------------------------------------------------------------------------------
# A real run on the tiny models
# --------------------------------------------------------------------------------------------------

SETTINGS = GenerationSettings(steps=4, width=64, height=64)
CASES = [SpeedCase("eager"), SpeedCase("bf16"), SpeedCase("channels_last", lora="unfused"),
         SpeedCase("channels_last", lora="fused"), SpeedCase("bf16", batch_size=2)]


def build_tiny(dtype: torch.dtype):
    return load_pipelines("tiny", "tiny", device="cpu", dtype=dtype)


@pytest.fixture(scope="module")
def runner():
    # note: __post_init__ counts the SDXL 1.0 FLOPs at the settings' size on meta (a few seconds)
    return SpeedRunner(build=build_tiny, device=torch.device("cpu"), settings=SETTINGS, rounds=1, warmup=1,
                       profile_cases=("bf16",))


@pytest.fixture(scope="module")
def results(runner):
    return {case.name: runner.run(case) for case in CASES}


def test_runner_cases_ok(results):
    assert list(results) == [c.name for c in CASES]
    for name, r in results.items():
        assert r.status == "ok", (name, r.message, r.equivalence.get("traceback"))
        assert r.message == ""
        assert r.seconds_per_image > 0 and r.seconds_per_batch > 0 and r.first_call_s > 0 and r.build_s > 0
        assert len(r.rounds_s) == 1
        assert r.images_per_second == pytest.approx(1 / r.seconds_per_image)
        assert r.flops_per_image > 0
        assert set(r.stage_seconds) == {"text_encoding", "base_denoising", "refiner_denoising", "vae_decode"}
        assert r.peak_memory_gib is None and r.mfu is None  # CPU: no memory stats, no matmul rate given
        assert r.released is True  # nothing kept the case's pipelines (and so their weights) alive


def test_runner_profiles_only_the_cases_asked_for(results):
    profile = results["bf16"].profile
    assert "error" not in profile, profile.get("traceback")
    assert list(profile["stages"]) == ["text_encoding", "base_denoising", "refiner_denoising", "vae_decode"]
    assert profile["stages"]["base_denoising"]["steps"] + profile["stages"]["refiner_denoising"]["steps"] == 4
    assert profile["host_syncs"]["applicable"] is False and profile["seconds"] > 0
    host = profile["host_profile"]  # the third extra generation, under cProfile
    assert any(r["where"].endswith("(generate)") for r in host["by_cumulative"])
    assert 0 < host["by_cumulative"][0]["cumulative_ms"] <= host["wall_s"] * 1e3 * 1.01
    assert all(not r.profile for name, r in results.items() if name != "bf16")
    json.dumps(asdict(results["bf16"]))  # the profile is plain JSON


def test_eager_times_compel_as_it_ships(runner):
    """The level sets pyparsing's packrat switch and the runner's prompt encoder leaves it: eager parses without
    the cache even when the process had it on."""
    import pyparsing

    from sdxl_core.prompt_check import set_packrat_parsing

    set_packrat_parsing(True)
    r = runner.run(SpeedCase("eager"))
    assert r.status == "ok", r.message
    assert r.kernel_backends["prompt_parser_packrat"] is False and not pyparsing.ParserElement._packratEnabled


def test_a_case_starts_from_a_clean_compiler_state(runner):
    """What an earlier case compiled is gone once a case ends: Dynamo's code caches (and CUDA graph trees) are
    reset, as in a fresh process."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    def earlier(x):
        return torch.sin(x) + 1

    torch.compile(earlier, backend="eager", fullgraph=True)(torch.ones(3))
    assert len(_debug_get_cache_entry_list(earlier.__code__)) == 1
    r = runner.run(SpeedCase("eager"))
    assert r.status == "ok" and r.released is True
    assert _debug_get_cache_entry_list(earlier.__code__) == []


def test_lean_host_records_its_text_encoder_graphs_and_guards(runner, monkeypatch):
    """The results say what lean_host did: the guard filter's counts and, with graphs (recorded here by the CPU
    stand-in for a CUDA graph), each text encoder's direct calls, graphs and replays over the warm-up and rounds."""
    from graph_helpers import replay_by_rerun

    import sdxl_core.text_graphs as text_graphs

    graph = text_graphs.graph_text_encoders
    monkeypatch.setattr(text_graphs, "graph_text_encoders", lambda pipes: graph(pipes, replay_by_rerun))
    r = runner.run(SpeedCase("lean_host"))
    assert r.status == "ok", (r.message, r.equivalence.get("traceback"))
    assert r.kernel_backends["text_encoder_graphs"] == "cuda graphs"
    assert r.kernel_backends["guard_filter"] == "skip_guard_on_inbuilt_nn_modules_unsafe"
    guards = r.kernel_backends["guards"]
    assert guards["compiles"] >= 3 and 0 < guards["kept"] < guards["guards"]
    calls = r.kernel_backends["text_encoder_graph_calls"]
    assert set(calls) == {"text_encoder", "text_encoder_2"}
    # one prompt per generation (the first call and the warm-ups, then the rounds): each signature's first call
    # direct, every later one replayed; text_encoder_2 has two signatures (weighted, and compel's pooled pass)
    generations = r.warmup_generations + len(r.rounds_s)
    assert generations == 3
    assert calls["text_encoder"]["replays"] == generations - 1, calls
    assert calls["text_encoder_2"]["replays"] == 2 * (generations - 1), calls
    assert all(c["failures"] == [] for c in calls.values())
    json.dumps(asdict(r))


def test_a_case_whose_pipelines_stay_referenced_says_so():
    kept = []

    def build_and_keep(dtype: torch.dtype):
        kept.append(build_tiny(dtype))
        return kept[-1]

    runner = SpeedRunner(build=build_and_keep, device=torch.device("cpu"), settings=SETTINGS, rounds=1, warmup=1)
    r = runner.run(SpeedCase("eager"))
    assert r.status == "ok" and r.released is False


def test_first_call_stage_seconds_are_recorded(results):
    for r in results.values():
        assert set(r.first_call_stage_seconds) == set(r.stage_seconds)
        assert all(v > 0 for v in r.first_call_stage_seconds.values())


def test_profiled_cases():
    cases = [SpeedCase("eager"), SpeedCase("fp8"), SpeedCase("max", 4)]
    assert profiled_cases(None, cases) == () and profiled_cases("", cases) == ()
    assert profiled_cases("fp8, max@b4", cases) == ("fp8", "max@b4")
    with pytest.raises(InvalidConfigError, match=r"--profile names max, which this run does not time.*add it to --cases"):
        profiled_cases("max", cases)


def test_runner_batch_size(results):
    b2 = results["bf16@b2"]
    assert b2.batch_size == 2
    assert b2.seconds_per_image == pytest.approx(b2.seconds_per_batch / 2)
    # FLOPs per image do not depend on the batch size
    assert b2.flops_per_image == pytest.approx(results["bf16"].flops_per_image)


def test_runner_flops_are_the_sdxl_workload(runner, results):
    from sdxl_core.flops import component_flops, workload_flops

    w = workload_flops(component_flops(64, 64), steps=4, high_noise_frac=0.8)
    assert results["eager"].flops_per_image == pytest.approx(w.total)


def test_runner_equivalence(results):
    eager = results["eager"].equivalence
    assert eager["passed"] is True and eager["note"] == "reference case" and eager["finite"] is True
    for name in ("bf16", "bf16@b2"):
        eq = results[name].equivalence
        assert eq["reference"] == "eager"
        assert eq["passed"] is True, (name, eq)
        assert eq["image_psnr_db"] >= IMAGE_PSNR_MIN and eq["latent_rel_l2"] <= eq["latent_rel_tol"]
    unfused = results["channels_last+lora_unfused"].equivalence
    assert unfused["note"] == "reference case" and unfused["passed"] is True
    fused = results["channels_last+lora_fused"].equivalence
    assert fused["reference"] == "channels_last+lora_unfused"
    assert fused["passed"] is True, fused
    assert fused["image_psnr_db"] >= IMAGE_PSNR_MIN


def test_runner_keeps_only_first_image(runner, results):
    out = runner.outputs["bf16@b2"]
    assert len(out.images) == 1 and out.latents.shape[0] == 1 and out.latents.dtype == torch.float32


def test_an_error_in_one_case_does_not_stop_the_next(runner, tmp_path):
    def build(dtype):
        if dtype == torch.bfloat16:
            raise RuntimeError("no bf16 today")
        return build_tiny(dtype)

    failing = copy.copy(runner)  # shares the FLOP counts; its own build and outputs
    failing.build = build
    failing.outputs = {}
    payload = run_speed_suite(failing, [SpeedCase("bf16"), SpeedCase("eager")], tmp_path / "speed.json",
                              {"note": "test"})
    bf16, eager = payload["results"]
    assert bf16["status"] == "error" and bf16["message"] == "RuntimeError: no bf16 today"
    assert "no bf16 today" in bf16["equivalence"]["traceback"]
    assert eager["status"] == "ok" and eager["seconds_per_image"] > 0
    on_disk = json.loads((tmp_path / "speed.json").read_text())
    assert on_disk["note"] == "test" and [r["status"] for r in on_disk["results"]] == ["error", "ok"]
    assert [p.name for p in tmp_path.iterdir()] == ["speed.json"]  # no temporary file left
    table = render_table(on_disk)
    assert "ERROR: RuntimeError: no bf16 today" in table


def test_a_run_stopped_while_profiling_keeps_the_case_timings(runner, tmp_path):
    """The timings are on disk before the extra profiled generations start: a run killed there (a device call's
    time limit) keeps them, and the file says the profile did not finish."""
    stopping = copy.copy(runner)
    stopping.outputs = {}

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("the call's time limit")

    stopping._profile = killed
    with pytest.raises(KeyboardInterrupt):
        run_speed_suite(stopping, [SpeedCase("eager"), SpeedCase("bf16")], tmp_path / "speed.json", {})
    on_disk = json.loads((tmp_path / "speed.json").read_text())
    eager, bf16 = on_disk["results"]
    assert eager["status"] == "ok" and eager["profile"] == {}
    assert bf16["status"] == "ok" and bf16["seconds_per_image"] > 0 and bf16["equivalence"]["passed"] is True
    assert bf16["profile"] == {"error": PROFILE_UNFINISHED}
    assert "bf16" in render_table(on_disk)  # the table renders from the file as it was left


def test_deadline_skips_cases_that_cannot_finish(runner, tmp_path):
    skipping = copy.copy(runner)
    skipping.outputs = {}
    skipping.build = lambda dtype: pytest.fail("a case ran although the deadline had passed")
    payload = run_speed_suite(skipping, [SpeedCase("eager"), SpeedCase("compile")], tmp_path / "s.json", {},
                              deadline=time.time() + 5)
    assert [r["status"] for r in payload["results"]] == ["skipped", "skipped"]
    assert all("time budget" in r["message"] for r in payload["results"])


def test_compile_artifacts_are_saved_after_compiled_cases_only(tmp_path, monkeypatch):
    import argparse

    from sdxl_core import compile_cache
    from sdxl_core.optimize import get_level
    from sdxl_core.speed import _cache_saver

    assert _cache_saver(argparse.Namespace(compile_cache_out=None)) is None
    calls = []
    monkeypatch.setattr(compile_cache, "save",
                        lambda folder, cases: calls.append((folder, cases)) or {"saved": True, "parts": ["p"]})
    after = _cache_saver(argparse.Namespace(compile_cache_out=str(tmp_path / "cache")))
    payload: dict = {}
    after({"status": "ok", "case": "bf16", "level": get_level("bf16").as_dict()}, payload)
    after({"status": "error", "case": "max", "level": get_level("max").as_dict()}, payload)
    assert calls == [] and payload == {}
    payload["results"] = [{"status": "ok", "case": "eager", "level": get_level("eager").as_dict()},
                          {"status": "ok", "case": "host", "level": get_level("host").as_dict()},
                          {"status": "error", "case": "max", "level": get_level("max").as_dict()},
                          {"status": "ok", "case": "max", "level": get_level("max").as_dict()}]
    after(payload["results"][-1], payload)
    assert calls == [(tmp_path / "cache", ["host", "max"])]  # the compiled cases that finished in this process
    assert payload["compile_cache"]["saved"]["saved"] and payload["compile_cache"]["saved"]["after_case"] == "max"

    def broken(folder, cases):
        raise OSError("disk full")

    monkeypatch.setattr(compile_cache, "save", broken)
    after({"status": "ok", "case": "host", "level": get_level("host").as_dict()}, payload)  # recorded, not raised
    assert payload["compile_cache"]["saved"]["reason"] == "OSError: disk full"
    assert payload["compile_cache"]["saved"]["after_case"] == "host"


def test_estimated_overhead_plans_cached_and_uncached_first_calls_apart():
    from sdxl_core.optimize import get_level
    from sdxl_core.speed import CACHED_FIRST_CALL_S, UNCACHED_FIRST_CALL_S, estimated_overhead_s

    def done(case, first_call_s):
        level = parse_case(case).level
        return {"status": "ok", "case": case, "level": get_level(level).as_dict(), "first_call_s": first_call_s}

    assert estimated_overhead_s(SpeedCase("eager"), []) == 20.0
    assert estimated_overhead_s(SpeedCase("host"), []) == UNCACHED_FIRST_CALL_S
    cached = frozenset({"host"})
    assert estimated_overhead_s(SpeedCase("host"), [], cached) == pytest.approx(1.2 * CACHED_FIRST_CALL_S)
    # a cached case's quick first call says nothing of an uncached one's, and the other way round
    assert estimated_overhead_s(SpeedCase("max"), [done("host", 100.0)], cached) == UNCACHED_FIRST_CALL_S
    assert estimated_overhead_s(SpeedCase("max"), [done("host", 100.0), done("fp8", 300.0)],
                                cached) == pytest.approx(360.0)
    assert estimated_overhead_s(SpeedCase("host"), [done("fp8", 300.0)], cached) == pytest.approx(
        1.2 * CACHED_FIRST_CALL_S)
    assert estimated_overhead_s(SpeedCase("host", batch_size=4), [], cached) == UNCACHED_FIRST_CALL_S


def test_cuda_graph_levels_warm_up_until_every_graph_is_recorded(results):
    from sdxl_core.optimize import get_level
    assert [get_level(name).cuda_graphs for name in ("eager", "compile", "cudagraphs", "max", "host")] == [
        False, False, True, True, True]
    assert results["eager"].warmup_generations == 1  # the first call; no graphs to record
