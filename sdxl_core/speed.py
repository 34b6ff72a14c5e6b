"""Latency of base+refiner generation per optimisation level, against the workload's FLOP floor.

One process, one card: every case builds fresh pipelines, applies its level, warms up, times several
rounds (``torch.cuda.synchronize()`` inside the timed region), and compares its latents and image with the
``eager`` case on the same seed. Results are plain dicts, written as JSON after every case so an
interrupted run keeps what it finished; the table is rendered from that JSON.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import time
import traceback
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from sdxl_core.atomicio import write_json_atomic
from sdxl_core.errors import InvalidConfigError
from sdxl_core.flops import WorkloadFlops, component_flops, workload_flops
from sdxl_core.generate import (GenerationOutput, GenerationRequest, GenerationSettings, PromptEncoder, check_split,
                                generate)
from sdxl_core.loading import Pipelines
from sdxl_core.numerics import image_max_abs_diff, image_psnr, relative_l2
from sdxl_core.optimize import OptimizationLevel, apply_level, get_level

# 7: per-case ``warmup_generations`` (untimed generations before the rounds, the first call included: one more
#    under CUDA graphs, whose VAE decoder and text encoders record their graphs in the second generation), and
#    the host profile's ``by_stage`` (cProfile rows per stage);
# 6: each profiled stage's ``top_kernels``; the level's host-work switches (pin_execution_device,
#    cache_empty_negative, fast_prompt_parse); ``compile_cache`` (what was loaded and saved, see compile_cache.py);
# 5: a profile's ``idle`` (idle time by gap size and neighbours, memsets/copies by the kernel after them) and
#    ``host_profile`` (the host's Python time by function, cProfile of one more generation);
# 4: per-case ``released`` (whether the case's pipelines were freed when it ended);
# 3: per-case first_call_stage_seconds and, for profiled cases, a device timeline (``profile``);
# 2: machine info as runs record it (library versions under "libraries"); 1: torch/diffusers/... at top level.
SCHEMA_VERSION = 7
DEFAULT_PROMPT = "a majestic wolf in a misty forest at dawn, (oil on canvas)+++, highly detailed"
# A level is "equivalent" to eager when its base latents are within LATENT_REL_TOL (relative L2) and its
# image within IMAGE_PSNR_MIN dB of eager's, and everything is finite. Measured differences are recorded.
LATENT_REL_TOL = 0.1
IMAGE_PSNR_MIN = 25.0
# Seconds a profiled case needs beyond its four extra generations: the profiler's trace of ~80k kernels.
PROFILE_OVERHEAD_S = 30.0
# What a case's profile says in the result file while it is still running (replaced when the case ends).
PROFILE_UNFINISHED = "not finished: the run stopped while this case's profile was being taken"


@dataclass(frozen=True)
class SpeedCase:
    """A unit of work: one level at one batch size, optionally with a LoRA on the base (unfused or fused)."""

    level: str
    batch_size: int = 1
    lora: str | None = None  # None, "unfused" or "fused"

    def __post_init__(self) -> None:
        get_level(self.level)
        if self.lora not in (None, "unfused", "fused"):
            raise InvalidConfigError(f"lora must be None, 'unfused' or 'fused', got {self.lora!r}")
        if self.batch_size < 1:
            raise InvalidConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.lora == "unfused" and get_level(self.level).fused_qkv:
            raise InvalidConfigError(
                f"level {self.level} fuses QKV projections, which would bypass an unfused LoRA on to_q/to_k/to_v; "
                f"time unfused LoRA on a level without fused_qkv (e.g. channels_last)")

    @property
    def name(self) -> str:
        name = self.level + (f"+lora_{self.lora}" if self.lora else "")
        return name + (f"@b{self.batch_size}" if self.batch_size != 1 else "")

    @property
    def reference_name(self) -> str:
        """The case whose outputs this one must match: the unfused LoRA for a fused one; an unfused LoRA
        changes the function, so it is its own reference; every other case matches eager (first image)."""
        if self.lora == "fused":
            return SpeedCase(self.level, 1, "unfused").name
        if self.lora == "unfused":
            return self.name
        return "eager"


def parse_case(text: str) -> SpeedCase:
    """``level[+lora_unfused|+lora_fused][@bN]``, e.g. ``compile@b4`` or ``channels_last+lora_fused``."""
    body, _, batch = text.partition("@b")
    level, plus, lora = body.partition("+lora_")
    if plus and not lora:
        raise InvalidConfigError(f"case {text!r} names no LoRA mode; write +lora_unfused or +lora_fused")
    try:
        return SpeedCase(level, int(batch) if batch else 1, lora or None)
    except ValueError as exc:
        if isinstance(exc, InvalidConfigError):
            raise
        raise InvalidConfigError(f"cannot read case {text!r}; write level[+lora_fused][@bN]") from None


def measure_matmul_rate(device: torch.device, n: int = 8192, reps: int = 20,
                        dtype: torch.dtype = torch.bfloat16) -> float:
    """FLOP/s of an ``n``-cubed matrix product on random data: the median of ``reps`` event-timed products."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def machine_info(device: torch.device) -> dict[str, Any]:
    """Date, card, driver and library versions for the result file (the same provenance runs record)."""
    from sdxl_core.provenance import gpu_info, library_versions

    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "device": str(device), "cpu_count": os.cpu_count(),
            "libraries": library_versions(), **gpu_info(device)}


@dataclass
class SpeedResult:
    case: str
    level: dict[str, Any]
    batch_size: int
    lora: str | None
    status: str  # ok | error | skipped
    message: str = ""
    rounds_s: list[float] = field(default_factory=list)
    seconds_per_batch: float | None = None
    seconds_per_image: float | None = None
    images_per_second: float | None = None
    first_call_s: float | None = None
    warmup_generations: int = 0  # untimed generations before the rounds, the first call included
    build_s: float | None = None
    stage_seconds: dict[str, float] = field(default_factory=dict)
    peak_memory_gib: float | None = None
    flops_per_image: float | None = None
    mfu: float | None = None
    equivalence: dict[str, Any] = field(default_factory=dict)
    kernel_backends: dict[str, Any] = field(default_factory=dict)
    first_call_stage_seconds: dict[str, float] = field(default_factory=dict)  # compilation shows up here
    profile: dict[str, Any] = field(default_factory=dict)  # sdxl_core.timeline summary of one more generation
    # Whether the case's pipelines were freed once it ended; False: something still refers to them, and the later
    # cases' memory (and peak) includes their weights.
    released: bool | None = None


@dataclass
class SpeedRunner:
    """Runs :class:`SpeedCase` s on one device and keeps each one's outputs for the equivalence checks.

    ``build(dtype)`` returns fresh :class:`Pipelines` for a case (``sdxl-random``, or a checkpoint reloaded).
    """

    build: Callable[[torch.dtype], Pipelines]
    device: torch.device
    settings: GenerationSettings
    prompt: str = DEFAULT_PROMPT
    seed: int = 0
    warmup: int = 1
    rounds: int = 3
    matmul_rate: float | None = None
    lora_rank: int = 4
    profile_cases: tuple[str, ...] = ()  # case names that get a device timeline after their timed rounds
    outputs: dict[str, GenerationOutput] = field(default_factory=dict)

    def __post_init__(self) -> None:
        per_forward = component_flops(self.settings.height, self.settings.width)
        self._per_forward = per_forward

    def workload(self, batch_size: int = 1) -> WorkloadFlops:
        """FLOPs of one generation of ``batch_size`` images with this runner's settings."""
        return workload_flops(self._per_forward, self.settings.steps, self.settings.high_noise_frac,
                              guidance=self.settings.guidance_scale > 1, batch_size=batch_size)

    def flops_per_image(self, batch_size: int) -> float:
        return self.workload(batch_size).total / batch_size

    def warmup_generations(self, level: OptimizationLevel) -> int:
        """Untimed generations before the rounds, the first call included. Timed rounds start once every graph is
        recorded: CUDA graph trees run a compiled function once without a graph and record it at its next call, so
        the modules called once per image (VAE decoder, text encoders) record theirs in the second generation."""
        return max(self.warmup, 2 if level.cuda_graphs else 1)

    def run(self, case: SpeedCase, on_timed: Callable[[SpeedResult], None] | None = None) -> SpeedResult:
        """Build, warm up, time and check one case; ``on_timed(result)`` is called with the timings before the
        extra profiled generations of a ``profile_cases`` case (so a caller can save them first)."""
        level = get_level(case.level)
        if case.lora == "fused":
            level = OptimizationLevel(**{**level.as_dict(), "fuse_lora": True})
        result = SpeedResult(case.name, level.as_dict(), case.batch_size, case.lora, status="ok")
        pipes = None
        pipes_ref: weakref.ref | None = None
        try:
            t0 = time.perf_counter()
            pipes = self.build(level.torch_dtype)
            pipes_ref = weakref.ref(pipes)
            if case.lora:
                from sdxl_core.lora import random_lora_state_dict

                state = random_lora_state_dict(pipes.base.unet, rank=self.lora_rank, seed=self.seed)
                pipes.base.load_lora_weights(state, adapter_name="bench")
            apply_level(pipes, level)
            result.kernel_backends = dict(pipes.kernel_backends)
            _sync(self.device)
            result.build_s = time.perf_counter() - t0
            encoder = PromptEncoder(pipes, packrat=None)  # the level has set it
            request = GenerationRequest(self.prompt, self.seed, None, 1.0 if case.lora else 0.0,
                                        self.settings, case.batch_size)
            t0 = time.perf_counter()
            out = generate(pipes, request, encoder)
            _sync(self.device)
            result.first_call_s = time.perf_counter() - t0
            result.first_call_stage_seconds = dict(out.stage_seconds)
            result.warmup_generations = self.warmup_generations(level)
            for _ in range(result.warmup_generations - 1):
                generate(pipes, request, encoder)
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            stages: list[dict[str, float]] = []
            for _ in range(self.rounds):
                t0 = time.perf_counter()
                out = generate(pipes, request, encoder)
                _sync(self.device)
                result.rounds_s.append(time.perf_counter() - t0)
                stages.append(out.stage_seconds)
            if self.device.type == "cuda":
                result.peak_memory_gib = torch.cuda.max_memory_allocated(self.device) / 2**30
            result.seconds_per_batch = statistics.median(result.rounds_s)
            result.seconds_per_image = result.seconds_per_batch / case.batch_size
            result.images_per_second = 1 / result.seconds_per_image
            result.stage_seconds = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
            if pipes.text_encoder_graphs:  # the evidence that compel's calls were replayed
                result.kernel_backends["text_encoder_graph_calls"] = {
                    name: graphed.stats() for name, graphed in pipes.text_encoder_graphs.items()}
            if pipes.guard_filter is not None:
                result.kernel_backends["guards"] = pipes.guard_filter.stats()
            result.flops_per_image = self.flops_per_image(case.batch_size)
            if self.matmul_rate:
                result.mfu = result.flops_per_image / result.seconds_per_image / self.matmul_rate
            result.equivalence = self._check(case, out)
            self.outputs[case.name] = _first_image_only(out)
            if case.name in self.profile_cases:
                if on_timed is not None:
                    on_timed(result)
                result.profile = self._profile(pipes, request, encoder)
        except Exception as exc:  # one failed case is an error row; the others go on
            result.status = "error"
            result.message = f"{type(exc).__name__}: {exc}"
            result.equivalence.setdefault("traceback", traceback.format_exc(limit=8))
        finally:
            del pipes
            release_case(self.device)
            result.released = pipes_ref is None or pipes_ref() is None
        return result

    def _profile(self, pipes: Pipelines, request: GenerationRequest, encoder: PromptEncoder) -> dict[str, Any]:
        """A device timeline of one more generation, a host-sync scan of another and cProfiles of the host in a
        third (whole) and a fourth (by stage), all after the timed rounds, so they change no timing. A failure is
        recorded in the result, and the case's timings stand."""
        from sdxl_core.timeline import profile_generation, profile_host, scan_host_syncs

        s = self.settings
        if pipes.refiner is not None:
            steps = dict(zip(("base_denoising", "refiner_denoising"),
                             check_split(pipes.base.scheduler, s.steps, s.high_noise_frac)))
        else:
            steps = {"base_denoising": s.steps}
        t0 = time.perf_counter()
        try:
            summary = profile_generation(lambda clock: generate(pipes, request, encoder, clock), self.device, steps)
            summary["host_syncs"] = scan_host_syncs(lambda: generate(pipes, request, encoder), self.device)
            summary["host_profile"] = profile_host(lambda clock: generate(pipes, request, encoder, clock),
                                                   self.device)
        except Exception as exc:
            summary = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=8)}
        summary["seconds"] = time.perf_counter() - t0
        return summary

    def _check(self, case: SpeedCase, out: GenerationOutput) -> dict[str, Any]:
        import numpy as np

        latents = out.latents[:1] if out.latents is not None else None
        finite = bool(np.isfinite(np.asarray(out.images[0], dtype=np.float64)).all())
        if latents is not None:
            finite = finite and bool(torch.isfinite(out.latents).all())
        check: dict[str, Any] = {"finite": finite, "reference": case.reference_name,
                                 "latent_rel_tol": LATENT_REL_TOL, "image_psnr_min": IMAGE_PSNR_MIN}
        ref = self.outputs.get(case.reference_name)
        if case.name == case.reference_name:
            check.update(passed=finite, note="reference case")
        elif ref is None:
            check.update(passed=None, note=f"reference case {case.reference_name} has no output in this run")
        else:
            check["latent_rel_l2"] = relative_l2(latents.float(), ref.latents.float()) if latents is not None else None
            check["image_psnr_db"] = image_psnr(out.images[0], ref.images[0])
            check["image_max_abs_diff"] = image_max_abs_diff(out.images[0], ref.images[0])
            check["passed"] = bool(finite and (check["latent_rel_l2"] is None or check["latent_rel_l2"] <= LATENT_REL_TOL)
                                   and check["image_psnr_db"] >= IMAGE_PSNR_MIN)
        return check


def release_case(device: torch.device) -> None:
    """Free what a case leaves behind before the next one builds, so that each case starts as in a fresh process
    (the on-disk compile caches aside): its pipelines (the caller has dropped them; collected here), then all of
    Dynamo's compiled code, guards and CUDA graph trees (``torch._dynamo.reset``: they go with the modules they were
    compiled for when those are collected, and the reset also drops the state that is not tied to a module), then
    the allocator's cached blocks."""
    gc.collect()
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _first_image_only(out: GenerationOutput) -> GenerationOutput:
    latents = out.latents[:1].detach().float().cpu() if out.latents is not None else None
    return GenerationOutput(images=out.images[:1], latents=latents, stage_seconds=out.stage_seconds)


# --------------------------------------------------------------------------------------------------
# Result file and table
# --------------------------------------------------------------------------------------------------


def render_table(payload: dict[str, Any]) -> str:
    """A plain-text table from a result payload: level, s/image, speed-up over eager, MFU, peak memory, check."""
    results = payload["results"]
    eager = next((r for r in results if r["case"] == "eager" and r["status"] == "ok"), None)
    sdpa = next((r for r in results if r["case"] == "sdpa" and r["status"] == "ok"), None)
    head = f"{'case':34s} {'s/image':>8s} {'img/s':>7s} {'x eager':>8s} {'x sdpa':>7s} {'MFU':>6s} " \
           f"{'peak GiB':>8s} {'1st call':>8s}  check"
    lines = [head, "-" * len(head)]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"{r['case']:34s} {r['status'].upper()}: {r['message'][:90]}")
            continue
        spi = r["seconds_per_image"]
        x_eager = f"{eager['seconds_per_image'] / spi:8.2f}" if eager else f"{'-':>8s}"
        x_sdpa = f"{sdpa['seconds_per_image'] / spi:7.2f}" if sdpa else f"{'-':>7s}"
        mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") else f"{'-':>6s}"
        peak = f"{r['peak_memory_gib']:8.1f}" if r.get("peak_memory_gib") is not None else f"{'-':>8s}"
        eq = r.get("equivalence", {})
        if eq.get("note") == "reference case":
            check = "reference" + ("" if eq.get("finite") else " NOT FINITE")
        elif eq.get("passed") is None:
            check = eq.get("note", "-")
        else:
            lat = eq.get("latent_rel_l2")
            check = ("ok" if eq["passed"] else "FAIL") + f" vs {eq['reference']}: PSNR {eq['image_psnr_db']:.1f} dB" + \
                    (f", latents rel {lat:.3g}" if lat is not None else "")
        lines.append(f"{r['case']:34s} {spi:8.3f} {r['images_per_second']:7.3f} {x_eager} {x_sdpa} {mfu} {peak} "
                     f"{r['first_call_s']:8.1f}  {check}")
    loaded = payload.get("compile_cache", {}).get("loaded", {})
    if loaded.get("loaded"):
        lines.append(f"(1st call: compiled from the cache loaded from {loaded.get('dir')})")
    return "\n".join(lines)


def default_cases() -> list[SpeedCase]:
    """Priority order for a time-boxed GPU run: the reference, the fast levels, compiled, then the rest.

    ``lean_host`` (``lean``'s kernels, the text encoders from CUDA graphs, fewer guards; the fastest level timed
    in ``reports/gpu``) first of the compiled levels, then ``host`` (the fallback: no text-encoder graphs, none of
    ``lean``'s kernel choices), ``lean``, ``cross_kv``, ``fp8`` and ``max``."""
    return [SpeedCase("eager"), SpeedCase("lean_host"), SpeedCase("host"), SpeedCase("lean"), SpeedCase("cross_kv"),
            SpeedCase("fp8"),
            SpeedCase("max"), SpeedCase("fused_qkv"),
            SpeedCase("sdpa"),
            SpeedCase("cudnn"), SpeedCase("vae_no_upcast"), SpeedCase("bf16"), SpeedCase("channels_last"),
            SpeedCase("compile"), SpeedCase("cudagraphs"),
            SpeedCase("channels_last", lora="unfused"), SpeedCase("channels_last", lora="fused"),
            SpeedCase("fused_qkv", batch_size=4), SpeedCase("max", batch_size=4)]


def profiled_cases(text: str | None, cases: list[SpeedCase]) -> tuple[str, ...]:
    """The case names ``--profile`` asks for; each must be one of the cases this run times."""
    if not text:
        return ()
    names = [c.name for c in cases]
    chosen = tuple(parse_case(t.strip()).name for t in text.split(",") if t.strip())
    missing = [c for c in chosen if c not in names]
    if missing:
        raise InvalidConfigError(f"--profile names {', '.join(missing)}, which this run does not time "
                                 f"(cases: {', '.join(names)}); add it to --cases or drop it from --profile")
    return chosen


# First calls of `host` on an H100 whose compile caches were warm: 96.5 and 103.9 s (runs 7 and 8), against 312 s cold.
CACHED_FIRST_CALL_S = 105.0
# The first call of `compile` (both UNets and the VAE decoder) took 151 s on an H200 (run 1), that of `max` (also the
# text encoders, CUDA graphs) 265 and 319 s (runs 2 and 3), `cross_kv` 328 s and `host` 312 s on H100s (runs 4, 6).
UNCACHED_FIRST_CALL_S = 330.0


def estimated_overhead_s(case: SpeedCase, done: list[dict[str, Any]],
                         cached: frozenset[str] = frozenset()) -> float:
    """Rough seconds a case needs beyond its timed rounds (compilation above all), used to skip cases that
    cannot finish before the deadline: 1.2 times the first call of the last compiled case that was as cached as
    this one (``cached``: the cases a loaded compile cache holds), else a guess. Cases are skipped, never cut short."""
    if get_level(case.level).compile_mode is None:
        return 20.0
    from_cache = case.name in cached
    alike = [r["first_call_s"] for r in done if r["status"] == "ok" and r["level"]["compile_mode"]
             and (r["case"] in cached) == from_cache]
    if alike:
        return 1.2 * alike[-1]
    return 1.2 * CACHED_FIRST_CALL_S if from_cache else UNCACHED_FIRST_CALL_S


def run_speed_suite(runner: SpeedRunner, cases: list[SpeedCase], out_path: Path, meta: dict[str, Any],
                    deadline: float | None = None,
                    after_case: Callable[[dict[str, Any], dict[str, Any]], None] | None = None,
                    cached: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Run ``cases`` in order, writing ``out_path`` after each; skip a case its estimate says cannot finish.
    ``after_case(result, payload)`` runs after each case that ran, before the file is written; ``cached`` names
    the cases whose compiles a loaded compile cache holds."""
    payload: dict[str, Any] = {"schema_version": SCHEMA_VERSION, **meta, "results": []}
    last_round_s = 5.0

    def save_timed(timed: SpeedResult) -> None:
        """A case's timings on disk before its profile runs: a run stopped there keeps them."""
        row = asdict(timed) | {"profile": {"error": PROFILE_UNFINISHED}}
        write_json_atomic(out_path, {**payload, "results": [*payload["results"], row]})

    for case in cases:
        if deadline is not None:
            level = get_level(case.level)
            per_round = last_round_s * case.batch_size * (0.5 if level.compile_mode is not None else 1.0)
            need = (estimated_overhead_s(case, payload["results"], cached)
                    + (runner.warmup_generations(level) + runner.rounds) * per_round)
            if case.name in runner.profile_cases:
                need += PROFILE_OVERHEAD_S + 4 * per_round
            left = deadline - time.time()
            if left < need:
                skipped = SpeedResult(case.name, get_level(case.level).as_dict(), case.batch_size, case.lora,
                                      status="skipped",
                                      message=f"time budget: {left:.0f} s left, about {need:.0f} s needed")
                payload["results"].append(asdict(skipped))
                write_json_atomic(out_path, payload)
                continue
        print(f"[speed] {case.name} ...", flush=True)
        result = runner.run(case, on_timed=save_timed)
        if result.status == "ok" and get_level(case.level).compile_mode is None:
            last_round_s = max(result.seconds_per_image or 0.0, 0.5)
        print(f"[speed] {case.name}: {result.status} {result.seconds_per_image} s/image {result.message[:200]}",
              flush=True)
        for key in ("text_encoder_graph_calls", "guards"):
            if key in result.kernel_backends:
                print(f"[speed] {case.name} {key}:", json.dumps(result.kernel_backends[key]), flush=True)
        if result.released is False:
            print(f"[speed] {case.name}: its pipelines are still referenced after the case; the next cases' memory "
                  f"includes their weights", flush=True)
        if result.profile:
            from sdxl_core.timeline import format_profile

            print(f"[speed] {case.name} profile ({result.profile['seconds']:.0f} s):\n{format_profile(result.profile)}",
                  flush=True)
        payload["results"].append(asdict(result))
        if after_case is not None:
            after_case(payload["results"][-1], payload)
        write_json_atomic(out_path, payload)
    return payload


def finite_check(pipes: Pipelines, settings: GenerationSettings) -> dict[str, Any]:
    """One forward of each model on the case's shapes with activation tracking: the fp16-safety check of a preset."""
    from sdxl_core.flops import LATENT_FACTOR, unet_inputs
    from sdxl_core.numerics import track_activations

    device, dtype = pipes.device, pipes.dtype
    report: dict[str, Any] = {"dtype": str(dtype)}
    gen = torch.Generator(device).manual_seed(0)
    pooled = pipes.base.text_encoder_2.config.projection_dim
    models = [("unet", pipes.base.unet)] + ([("unet_refiner", pipes.refiner.unet)] if pipes.refiner else [])
    with torch.no_grad():
        for name, unet in models:
            args, kwargs = unet_inputs(unet, 2, settings.height, settings.width, pooled, device=device, dtype=dtype)
            sample = torch.randn(args[0].shape, generator=gen, device=device, dtype=dtype)
            hidden = torch.randn(args[2].shape, generator=gen, device=device, dtype=dtype)
            kwargs["added_cond_kwargs"]["text_embeds"].normal_(generator=gen)
            kwargs["added_cond_kwargs"]["time_ids"].fill_(float(settings.height))
            with track_activations(unet) as stats:
                out = unet(sample, args[1], hidden, **kwargs)[0]
            report[name] = {**asdict(stats[0]), "output_std": float(out.float().std())}
        vae = pipes.base.vae
        lat = torch.randn(1, 4, settings.height // LATENT_FACTOR, settings.width // LATENT_FACTOR, generator=gen,
                          device=device, dtype=dtype) / vae.config.scaling_factor
        with track_activations(vae.decoder) as stats:
            vae.decode(lat)
        report["vae_decoder"] = asdict(stats[0])
        ids = pipes.base.tokenizer_2(DEFAULT_PROMPT, padding="max_length", max_length=77, truncation=True,
                                     return_tensors="pt").input_ids.to(device)
        for name in ("text_encoder", "text_encoder_2"):
            with track_activations(getattr(pipes.base, name)) as stats:
                getattr(pipes.base, name)(ids, output_hidden_states=True)
            report[name] = asdict(stats[0])
    report["all_finite"] = all(v.get("all_finite", True) for v in report.values() if isinstance(v, dict))
    report["min_fp16_headroom"] = min(
        (65504.0 / v["max_abs"]) for v in report.values() if isinstance(v, dict) and v.get("max_abs"))
    return report


def fmt_flops(x: float) -> str:
    return f"{x / 1e12:.1f} TFLOP" if x >= 1e12 else f"{x / 1e9:.2f} GFLOP"


def floor_seconds(flops: float, rate: float) -> float:
    return flops / rate if rate and math.isfinite(rate) else math.nan


def quiet_library_logs() -> None:
    """Keep diffusers' and transformers' per-load warnings out of the timing log (errors still show)."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _cache_saver(args: Any) -> Callable[[dict[str, Any], dict[str, Any]], None] | None:
    """After each compiled case that finished, this process's compile artifacts go to ``--compile-cache-out`` (all
    of them so far, so a run stopped later keeps what it compiled); what was saved goes into the results."""
    folder = getattr(args, "compile_cache_out", None)
    if not folder:
        return None

    def after_case(result: dict[str, Any], payload: dict[str, Any]) -> None:
        if result["status"] != "ok" or result["level"].get("compile_mode") is None:
            return
        from sdxl_core.compile_cache import save

        t0 = time.perf_counter()
        compiled = [r["case"] for r in payload["results"]  # the suite appends ``result`` before this runs
                    if r["status"] == "ok" and r["level"].get("compile_mode") is not None]
        try:
            saved = save(Path(folder), cases=list(dict.fromkeys(compiled)))
        except Exception as exc:  # the timings stand; the failure is recorded
            saved = {"saved": False, "reason": f"{type(exc).__name__}: {exc}"}
        saved["seconds"] = time.perf_counter() - t0
        saved["after_case"] = result["case"]
        payload.setdefault("compile_cache", {})["saved"] = saved
        print("[speed] compile cache saved:", json.dumps({k: v for k, v in saved.items() if k != "parts"}), flush=True)

    return after_case


def main_speed(args: Any) -> int:
    """The ``sdxl-bench speed`` command: machine info, matmul ceiling, fp16 check, cases, table last."""
    from sdxl_core.loading import default_device, load_pipelines
    from sdxl_core.presets import SDXL_RANDOM

    quiet_library_logs()
    started = time.time()
    deadline = started + args.budget_s if args.budget_s else None
    device = torch.device(args.device or default_device())
    settings = GenerationSettings(steps=args.steps, guidance_scale=args.guidance_scale,
                                  high_noise_frac=args.high_noise_frac, width=args.width, height=args.height)
    settings.check()
    cases = [parse_case(c) for c in args.cases.split(",")] if args.cases else default_cases()
    profile_cases = profiled_cases(getattr(args, "profile", None), cases)
    refiner = args.refiner if args.refiner is not None else (SDXL_RANDOM if args.base == SDXL_RANDOM else None)
    if refiner is None:
        raise InvalidConfigError("the speed suite times base + refiner; pass --refiner")

    def build(dtype: torch.dtype) -> Pipelines:
        return load_pipelines(args.base, refiner, vae=args.vae, device=device, dtype=dtype, variant=args.variant)

    out_path = Path(args.out)
    meta: dict[str, Any] = {"machine": machine_info(device), "model": {"base": args.base, "refiner": refiner,
                                                                      "vae": args.vae},
                            "settings": asdict(settings), "prompt": DEFAULT_PROMPT, "seed": args.seed,
                            "warmup": args.warmup, "rounds": args.rounds, "budget_s": args.budget_s}
    print(json.dumps(meta["machine"]), flush=True)
    if getattr(args, "compile_cache_in", None):  # before anything compiles
        from sdxl_core.compile_cache import load

        meta["compile_cache"] = {"loaded": load(Path(args.compile_cache_in))}
        print("[speed] compile cache:", json.dumps(meta["compile_cache"]["loaded"]), flush=True)
    rate = measure_matmul_rate(device) if device.type == "cuda" else None
    meta["bf16_matmul_flops_per_s"] = rate
    runner = SpeedRunner(build=build, device=device, settings=settings, seed=args.seed, warmup=args.warmup,
                         rounds=args.rounds, matmul_rate=rate, profile_cases=profile_cases)
    w = runner.workload()
    meta["workload_flops"] = asdict(w) | {"total": w.total}
    meta["flop_floor_s"] = floor_seconds(w.total, rate) if rate else None
    if not args.skip_fp16_check:
        t0 = time.perf_counter()
        pipes = build(torch.float16)
        meta["fp16_check"] = finite_check(pipes, settings)
        del pipes
        release_case(device)
        meta["fp16_check"]["seconds"] = time.perf_counter() - t0
        print("[speed] fp16 check:", json.dumps({k: v for k, v in meta["fp16_check"].items()
                                               if not isinstance(v, dict)}), flush=True)
    loaded = meta.get("compile_cache", {}).get("loaded", {})
    cached = frozenset(loaded.get("cases", [])) if loaded.get("loaded") else frozenset()
    payload = run_speed_suite(runner, cases, out_path, meta, deadline, after_case=_cache_saver(args), cached=cached)
    payload["wall_s"] = time.time() - started
    write_json_atomic(out_path, payload)
    print(f"\nSDXL base+refiner {settings.width}x{settings.height}, {w.base_steps}+{w.refiner_steps} steps, "
          f"guidance {settings.guidance_scale}: {fmt_flops(w.total)} per image")
    if rate:
        print(f"measured bf16 matmul: {rate / 1e12:.0f} TFLOP/s -> FLOP floor {meta['flop_floor_s']:.3f} s/image "
              f"on {meta['machine'].get('gpu')}")
    print(render_table(payload))
    failed = [r for r in payload["results"] if r["status"] == "error"]
    return 1 if failed else 0
