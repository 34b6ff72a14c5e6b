"""Where one generation's device time goes: kernels and idle gaps per stage, and the host syncs it makes.

The profiled generation marks each stage boundary on the device's own timeline (a one-cycle spin kernel on
CUDA, an instant profiler range on the CPU), so every kernel falls in a stage by stream order alone. The
summary is computed by :func:`summarize` from plain ``(name, start, end)`` intervals, which keeps the arithmetic
testable without a GPU; :func:`profile_generation` and :func:`scan_host_syncs` collect the intervals and the
syncs with ``torch.profiler`` and ``torch.cuda.set_sync_debug_mode``; :func:`profile_host` says where the host's
own time goes, by Python function.
"""

from __future__ import annotations

import cProfile
import pstats
import re
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Callable, Sequence

import torch

from sdxl_core.generate import StageClock

# First match wins. Inductor's fused pointwise/reduction kernels come first: their names list the ops they fuse
# ("triton_poi_fused_clone_convolution_native_group_norm_silu_101" is a group norm, not a convolution). cuDNN's
# convolution kernels are named "..._fprop_implicit_gemm_...", so conv comes before gemm.
CLASSES = (("triton (fused pointwise/norm)", r"^triton_(poi|red|per)_"),
           ("attention", r"fmha|flash|attention|cudnn_generated_fort_native_sdpa|sdpa"),
           ("conv", r"conv|implicit|xmma_fprop|fprop|dgrad|winograd"),
           ("gemm", r"gemm|cutlass|sm90_xmma|nvjet|cublas|matmul|scaled_mm|aten::mm|aten::addmm|aten::linear|"
                    r"^triton_tem_"),
           ("memset/memcpy", r"^memset|^memcpy"),
           ("other", r"."))
CUDA_MARKER = re.compile(r"spin_kernel|sleep", re.IGNORECASE)  # torch.cuda._sleep's kernel
CPU_MARKER = "sdxl_stage_marker"


def classify(name: str) -> str:
    """The kernel class of a kernel (or, on the CPU, an ATen op) by its name."""
    low = name.lower()
    for label, pattern in CLASSES:
        if re.search(pattern, low):
            return label
    return "other"


@dataclass(frozen=True)
class Interval:
    """One unit of device work (a kernel, memset or copy; a top-level ATen op on the CPU), in microseconds."""

    name: str
    start_us: float
    end_us: float
    launch: int = 0  # the CUDA correlation id of the call that launched it: one id for all of a graph's kernels

    @property
    def us(self) -> float:
        return self.end_us - self.start_us


def union_us(items: Sequence[Interval]) -> float:
    """Length of the union of the intervals: the time the device was busy with at least one of them."""
    total, end = 0.0, float("-inf")
    for it in sorted(items, key=lambda i: i.start_us):
        if it.end_us <= end:
            continue
        total += it.end_us - max(it.start_us, end)
        end = it.end_us
    return total


def _gaps(items: Sequence[Interval], start: float, end: float) -> list[dict[str, Any]]:
    """Idle stretches between ``start`` and ``end``: before the first item, between items, after the last."""
    out, busy_until, prev = [], start, "(stage start)"
    for it in sorted(items, key=lambda i: i.start_us):
        if it.start_us > busy_until:
            out.append({"ms": (it.start_us - busy_until) / 1e3, "at_ms": (busy_until - start) / 1e3,
                        "after": prev, "before": it.name})
        if it.end_us >= busy_until:
            busy_until, prev = it.end_us, it.name
    if end > busy_until:
        out.append({"ms": (end - busy_until) / 1e3, "at_ms": (busy_until - start) / 1e3, "after": prev,
                    "before": "(stage end)"})
    return out


def _add_kernels(per_kernel: dict[str, list[float]], items: Sequence[Interval]) -> None:
    for it in items:
        k = per_kernel.setdefault(it.name, [0.0, 0])
        k[0] += it.us / 1e3
        k[1] += 1


def _top_kernels(per_kernel: dict[str, list[float]], top: int) -> list[dict[str, Any]]:
    ranked = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:top]
    return [{"name": n[:160], "class": classify(n), "ms": v[0], "launches": v[1]} for n, v in ranked]


def summarize(items: Sequence[Interval], markers: Sequence[float], stage_names: Sequence[str],
              steps: dict[str, int] | None = None, top: int = 15, top_gaps: int = 8,
              top_stage: int = 6) -> dict[str, Any]:
    """Per-stage and overall totals of one generation's device work.

    ``markers`` are the device start times of the stage marks, in order, and ``stage_names`` their names (the
    last mark, ``end``, closes the last stage). A stage's ``span_ms`` is the device time between its marks,
    ``busy_ms`` the union of its kernels, ``idle_ms`` the rest: time the device waited for the host.
    ``steps`` (stage -> denoising steps) adds kernels and milliseconds per step. Each stage lists its
    ``top_stage`` longest kernels too (the VAE's and the text encoders' are not among the whole image's top)."""
    if len(markers) != len(stage_names) or len(markers) < 2:
        raise ValueError(f"need one marker per stage mark and at least two, got {len(markers)} markers for "
                         f"{len(stage_names)} marks ({list(stage_names)})")
    if list(markers) != sorted(markers):
        raise ValueError("stage markers are out of order on the device timeline")
    steps = steps or {}
    stages: dict[str, dict[str, Any]] = {}
    stage_kernels: dict[str, dict[str, list[float]]] = {}
    all_gaps: list[dict[str, Any]] = []
    for name, a, b in zip(stage_names, markers, markers[1:]):
        inside = [it for it in items if a <= it.start_us < b]
        gaps = _gaps(inside, a, b)
        busy = union_us(inside)
        s = stages.setdefault(name, {"span_ms": 0.0, "busy_ms": 0.0, "kernel_ms": 0.0, "kernels": 0})
        s["span_ms"] += (b - a) / 1e3
        s["busy_ms"] += busy / 1e3
        s["kernel_ms"] += sum(it.us for it in inside) / 1e3
        s["kernels"] += len(inside)
        all_gaps += [dict(g, stage=name) for g in gaps]
        _add_kernels(stage_kernels.setdefault(name, {}), inside)
    for name, s in stages.items():
        s["idle_ms"] = s["span_ms"] - s["busy_ms"]
        s["top_kernels"] = _top_kernels(stage_kernels[name], top_stage)
        if steps.get(name):
            s["steps"] = steps[name]
            s["ms_per_step"] = s["span_ms"] / steps[name]
            s["kernels_per_step"] = s["kernels"] / steps[name]
    inside_all = [it for it in items if markers[0] <= it.start_us < markers[-1]]
    # The stages tile the image, so its per-kernel and per-class totals are sums of the stages' per-kernel ones.
    per_kernel: dict[str, list[float]] = {}
    for kernels in stage_kernels.values():
        for name, (ms, launches) in kernels.items():
            k = per_kernel.setdefault(name, [0.0, 0])
            k[0] += ms
            k[1] += launches
    per_class: dict[str, dict[str, float]] = {}
    for name, (ms, launches) in per_kernel.items():
        c = per_class.setdefault(classify(name), {"ms": 0.0, "launches": 0})
        c["ms"] += ms
        c["launches"] += launches
    for name, split in graph_launch_idle(items, markers, stage_names).items():
        stages[name]["graph_launches"] = split
    span = (markers[-1] - markers[0]) / 1e3
    idle = idle_breakdown(all_gaps, top)
    idle["memset_memcpy_next"] = copies_next_kernel(inside_all, top)
    busy = union_us(inside_all) / 1e3
    return {
        "span_ms": span, "busy_ms": busy, "idle_ms": span - busy, "kernels": len(inside_all),
        "outside_stages": len(items) - len(inside_all),
        "stages": stages,
        "per_class": dict(sorted(per_class.items(), key=lambda kv: -kv[1]["ms"])),
        "top_kernels": _top_kernels(per_kernel, top),
        "largest_gaps": sorted(all_gaps, key=lambda g: -g["ms"])[:top_gaps],
        "idle": idle,
    }


# A launch of at least this many kernels is a CUDA graph's replay (a UNet step has over a thousand).
GRAPH_MIN_KERNELS = 50


def graph_launch_idle(items: Sequence[Interval], markers: Sequence[float], stage_names: Sequence[str],
                      min_kernels: int = GRAPH_MIN_KERNELS) -> dict[str, dict[str, Any]]:
    """Per stage, its idle time split by CUDA graph replays: inside the replays (the device's own pace and the
    memsets), and between them, where the host's work of a step boundary shows (the scheduler step, the next
    call's guards and input copies, the launch itself) unless the host was a step ahead.

    A replay is the kernels sharing one launch id (CUDA's correlation id of the ``cudaGraphLaunch``), at least
    ``min_kernels`` of them. For each stage with two or more replays: ``launches``, their median kernels,
    ``inside_idle_ms`` (idle within the replays' spans), ``between_idle_ms`` (idle from the end of one replay to
    the start of the next, other work between them excluded), ``between_idle_ms_median`` and ``_max`` per boundary,
    and ``before_first_idle_ms`` (from the stage's start to its first replay: the stage's setup). Stages without
    replays (or a profile without launch ids) are left out; a stage name marked twice keeps its last."""
    out: dict[str, dict[str, Any]] = {}
    for name, a, b in zip(stage_names, markers, markers[1:]):
        inside = sorted((it for it in items if a <= it.start_us < b), key=lambda i: i.start_us)
        groups: dict[int, list[Interval]] = {}
        for it in inside:
            if it.launch:
                groups.setdefault(it.launch, []).append(it)
        replays = sorted((g for g in groups.values() if len(g) >= min_kernels), key=lambda g: g[0].start_us)
        if len(replays) < 2:
            continue
        spans = [(g[0].start_us, max(it.end_us for it in g)) for g in replays]
        inside_idle = sum((end - start) - union_us(g) for g, (start, end) in zip(replays, spans))
        between = []
        for (_, prev_end), (next_start, _) in zip(spans, spans[1:]):
            others = [Interval(it.name, max(it.start_us, prev_end), min(it.end_us, next_start)) for it in inside
                      if it.end_us > prev_end and it.start_us < next_start]
            between.append(max(0.0, next_start - prev_end) - union_us(others))
        first = [Interval(it.name, it.start_us, min(it.end_us, spans[0][0])) for it in inside
                 if it.start_us < spans[0][0]]
        sizes = sorted(len(g) for g in replays)
        ordered = sorted(between)
        out[name] = {"launches": len(replays), "kernels_median": sizes[len(sizes) // 2],
                     "inside_idle_ms": inside_idle / 1e3, "between_idle_ms": sum(between) / 1e3,
                     "between_idle_ms_median": ordered[len(ordered) // 2] / 1e3,
                     "between_idle_ms_max": ordered[-1] / 1e3,
                     "before_first_idle_ms": (spans[0][0] - a - union_us(first)) / 1e3}
    return out


# Upper bounds (microseconds) of the gap-size bins: a few us is the device's own pace between kernels queued
# ahead (inside a CUDA graph, say); tens of us and more is the device waiting for the host.
GAP_BINS_US = (2.0, 5.0, 20.0, 100.0, 1000.0, float("inf"))


def _side(name: str) -> str:
    return name if name.startswith("(stage") else classify(name)


def idle_breakdown(gaps: Sequence[dict[str, Any]], top: int = 15) -> dict[str, Any]:
    """Idle time of ``gaps`` (from :func:`_gaps`) by gap size and by the classes of the kernels on either side.

    Many gaps of a microsecond or two between kernels of a step are the device's pace through queued work
    (fewer kernels is the lever); a few long ones are the host (a sync, Python, a copy from pageable memory)."""
    bins = [{"up_to_us": b, "gaps": 0, "ms": 0.0} for b in GAP_BINS_US]
    pairs: dict[tuple[str, str], list[float]] = {}
    for g in gaps:
        us = g["ms"] * 1e3
        slot = next(b for b in bins if us <= b["up_to_us"])
        slot["gaps"] += 1
        slot["ms"] += g["ms"]
        p = pairs.setdefault((_side(g["after"]), _side(g["before"])), [0.0, 0])
        p[0] += g["ms"]
        p[1] += 1
    ranked = sorted(pairs.items(), key=lambda kv: -kv[1][0])[:top]
    return {"by_size": [dict(b, up_to_us=None if b["up_to_us"] == float("inf") else b["up_to_us"]) for b in bins],
            "by_neighbours": [{"after": a, "before": b, "ms": v[0], "gaps": v[1]} for (a, b), v in ranked]}


def copies_next_kernel(items: Sequence[Interval], top: int = 15) -> list[dict[str, Any]]:
    """For each memset and copy, the kernel that runs next on the device (its consumer, usually), counted by name:
    which operations ask for the memsets and copies."""
    ordered = sorted(items, key=lambda i: i.start_us)
    nexts: Counter[str] = Counter()
    for it, after in zip(ordered, ordered[1:] + [None]):
        if classify(it.name) == "memset/memcpy":
            nexts[f"{it.name[:40]} -> {after.name[:100] if after else '(end)'}"] += 1
    return [{"pair": k, "count": v} for k, v in nexts.most_common(top)]


def _device_intervals(prof: Any, cuda: bool) -> tuple[list[Interval], list[float]]:
    """Work intervals and marker times from a finished ``torch.profiler.profile``: CUDA kernels, memsets and
    copies on a GPU; top-level ATen ops (those inside no other ATen op) on the CPU."""
    from torch.autograd import DeviceType

    raw = [(e.name(), e.start_ns() / 1e3, (e.start_ns() + e.duration_ns()) / 1e3, e.device_type(),
            e.correlation_id()) for e in prof.profiler.kineto_results.events()]
    raw.sort(key=lambda r: (r[1], -r[2]))
    items: list[Interval] = []
    markers: list[float] = []
    if cuda:
        for name, a, b, dev, launch in raw:
            if dev != DeviceType.CUDA:
                continue
            if CUDA_MARKER.search(name):
                markers.append(a)
            else:
                items.append(Interval(name, a, b, launch))
        return items, markers
    top_end = float("-inf")
    for name, a, b, dev, _ in raw:
        if dev != DeviceType.CPU:
            continue
        if name == CPU_MARKER:
            markers.append(a)
        elif name.startswith("aten::") and a >= top_end:
            items.append(Interval(name, a, b))
            top_end = b
    return items, markers


def profile_generation(run: Callable[[StageClock], Any], device: torch.device,
                       steps: dict[str, int] | None = None) -> dict[str, Any]:
    """Profile one call of ``run(clock)`` (a generation that marks its stages on ``clock``) and summarise it.

    Run it after warm-up and compilation: it profiles whatever the call does."""
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = device.type == "cuda"
    names: list[str] = []

    def marker(name: str) -> None:
        names.append(name)
        if cuda:
            torch.cuda._sleep(1)
        else:
            with record_function(CPU_MARKER):
                pass

    clock = StageClock(device, marker=marker)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        run(clock)
        if cuda:
            torch.cuda.synchronize(device)
    items, markers = _device_intervals(prof, cuda)
    if len(markers) != len(names):
        raise RuntimeError(f"the profile holds {len(markers)} stage markers for {len(names)} marks "
                           f"({names}); the profiler may have dropped events")
    summary = summarize(items, markers, names, steps)
    summary["host_stage_seconds"] = clock.durations()
    summary["device"] = str(device)
    summary["notes"] = [f"{name}: {s['kernels_per_step']:.0f} kernels per step is too few for a UNet; kernels replayed "
                        f"in CUDA graphs may be missing from this trace, so its idle time is not to be trusted"
                        for name, s in summary["stages"].items() if s.get("kernels_per_step", 100) < 50]
    return summary


def scan_host_syncs(run: Callable[[], Any], device: torch.device, top: int = 20) -> dict[str, Any]:
    """Run ``run()`` with CUDA's sync debug mode on and count the synchronising calls by source line.

    A sync stops the host from queueing work ahead of the GPU, so the GPU idles while the host catches up.
    Returns ``{"applicable": False}`` off CUDA, where there is nothing to scan."""
    if device.type != "cuda":
        return {"applicable": False, "reason": f"sync debug mode is CUDA-only (device {device.type})"}
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
            torch.cuda.synchronize(device)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    where = Counter(f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0][:120]}" for w in caught
                    if "synchroniz" in str(w.message).lower())
    return {"applicable": True, "syncs": sum(where.values()),
            "by_line": [{"where": k, "count": v} for k, v in where.most_common(top)]}


def _where(key: tuple[str, int, str]) -> str:
    file, line, func = key
    if file == "~":  # a built-in (a C function or method)
        return func
    return f"{'/'.join(PurePath(file).parts[-2:])}:{line}({func})"


def _rows(stats: pstats.Stats) -> list[dict[str, Any]]:
    return [{"where": _where(key), "calls": nc, "own_ms": tt * 1e3, "cumulative_ms": ct * 1e3}
            for key, (_cc, nc, tt, ct, _callers) in stats.stats.items()]


def profile_host(run: Callable[[StageClock], Any], device: torch.device, top: int = 20,
                 stage_top: int = 12) -> dict[str, Any]:
    """Where the host's time goes in a call of ``run(clock)``, by Python function (``cProfile``): own time and
    time including callees, in milliseconds, for one whole call, then per stage in a second call (``by_stage``:
    each mark of the :class:`StageClock` given to ``run`` switches to that stage's profile; what runs before the
    first mark is ``(start)``; a function that spans stages has no cumulative time there, hence the whole call
    first). A call that waits for the device (a sync, a copy to the host) shows the wait as its own time.
    cProfile slows Python-heavy code (about 2x), so compare rows with each other."""
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    try:
        run(StageClock(device))
    finally:
        prof.disable()
    wall = time.perf_counter() - t0
    rows = _rows(pstats.Stats(prof))
    return {"wall_s": wall,
            "by_own": sorted(rows, key=lambda r: -r["own_ms"])[:top],
            "by_cumulative": sorted(rows, key=lambda r: -r["cumulative_ms"])[:top],
            "by_stage": _profile_by_stage(run, device, stage_top)}


def _profile_by_stage(run: Callable[[StageClock], Any], device: torch.device, top: int) -> dict[str, Any]:
    """Own time by function for each stage of one call of ``run(clock)`` (see :func:`profile_host`)."""
    profiles: dict[str, cProfile.Profile] = {}
    walls: dict[str, float] = {}
    current: list[Any] = []  # [stage name, its profile, when it started]

    def switch(name: str | None) -> None:
        now = time.perf_counter()
        if current:
            stage, prof, since = current
            prof.disable()
            walls[stage] += now - since
            current.clear()
        if name is None or name == "end":
            return
        prof = profiles.setdefault(name, cProfile.Profile())
        walls.setdefault(name, 0.0)
        current.extend([name, prof, now])
        prof.enable()

    switch("(start)")
    try:
        run(StageClock(device, marker=switch))
    finally:
        switch(None)
    per_stage = {}
    for name, prof in profiles.items():
        try:
            rows = _rows(pstats.Stats(prof))
        except TypeError:  # nothing was recorded in this stage
            continue
        per_stage[name] = {"wall_ms": walls[name] * 1e3, "by_own": sorted(rows, key=lambda r: -r["own_ms"])[:top]}
    return per_stage


def format_profile(summary: dict[str, Any], top: int = 8) -> str:
    """A few lines for the log: per stage span, busy and idle time, kernels per step; classes; top kernels; syncs."""
    if "error" in summary:
        return f"profile failed: {summary['error']}"
    lines = [f"device span {summary['span_ms']:.1f} ms, busy {summary['busy_ms']:.1f}, idle {summary['idle_ms']:.1f}, "
             f"{summary['kernels']} kernels"]
    for name, s in summary["stages"].items():
        per_step = (f"; per step {s['ms_per_step']:.2f} ms, {s['kernels_per_step']:.0f} kernels, "
                    f"idle {s['idle_ms'] / s['steps']:.2f} ms") if "steps" in s else ""
        lines.append(f"  {name:18s} span {s['span_ms']:8.1f} ms  busy {s['busy_ms']:8.1f}  idle {s['idle_ms']:7.1f}  "
                     f"kernels {s['kernels']:6d}{per_step}")
    lines.append("  by class: " + ", ".join(f"{k} {v['ms']:.1f} ms/{v['launches']}" for k, v in summary["per_class"].items()))
    for k in summary["top_kernels"][:top]:
        lines.append(f"  {k['ms']:8.2f} ms {k['launches']:5d}x  {k['class'][:10]:10s} {k['name'][:100]}")
    for name, s in summary["stages"].items():
        g = s.get("graph_launches")
        if g:
            lines.append(f"  {name} graph replays: {g['launches']} of ~{g['kernels_median']} kernels; idle inside "
                         f"{g['inside_idle_ms']:.1f} ms, between {g['between_idle_ms']:.1f} ms (median "
                         f"{g['between_idle_ms_median'] * 1e3:.0f} us, max {g['between_idle_ms_max'] * 1e3:.0f} us), "
                         f"before the first {g['before_first_idle_ms']:.1f} ms")
    for name, s in summary["stages"].items():
        if "steps" not in s:  # the denoising stages' kernels are the top list above
            lines.append(f"  {name} top: " + "; ".join(f"{k['ms']:.1f} ms/{k['launches']} {k['name'][:60]}"
                                                       for k in s.get("top_kernels", [])[:3]))
    for g in summary["largest_gaps"][:3]:
        lines.append(f"  gap {g['ms']:.2f} ms in {g['stage']} at {g['at_ms']:.1f} ms: {g['after'][:50]} -> {g['before'][:50]}")
    idle = summary.get("idle")
    if idle:
        lines.append("  idle by gap size: " + ", ".join(
            f"<={b['up_to_us']:g} us {b['ms']:.1f} ms/{b['gaps']}" if b["up_to_us"] is not None
            else f">1 ms {b['ms']:.1f} ms/{b['gaps']}" for b in idle["by_size"]))
        lines.append("  idle between: " + ", ".join(f"{d['after']} -> {d['before']} {d['ms']:.1f} ms/{d['gaps']}"
                                                    for d in idle["by_neighbours"][:6]))
        for d in idle["memset_memcpy_next"][:4]:
            lines.append(f"  {d['count']:6d}x {d['pair'][:140]}")
    lines += [f"  note: {n}" for n in summary.get("notes", [])]
    host = summary.get("host_profile")
    if host:
        lines.append(f"  host (cProfile, {host['wall_s'] * 1e3:.0f} ms in all): own time")
        lines += [f"    {r['own_ms']:8.1f} ms {r['calls']:6d}x {r['where'][:110]}" for r in host["by_own"][:top]]
        for stage, st in host.get("by_stage", {}).items():
            lines.append(f"    {stage} ({st['wall_ms']:.1f} ms): " + "; ".join(
                f"{r['own_ms']:.1f} ms {r['calls']}x {r['where'][-60:]}" for r in st["by_own"][:4]))
    syncs = summary.get("host_syncs", {})
    if syncs.get("applicable"):
        lines.append(f"  host syncs: {syncs['syncs']}" + "".join(f"\n    {d['count']}x {d['where'][-150:]}"
                                                             for d in syncs["by_line"][:5]))
    return "\n".join(lines)
