"""Which kernel SDXL's attention, GEMM and convolution shapes get, at what cost in a CUDA graph, with how many memsets.

Run 6 (``reports/gpu/NOTES.md``) found a memset before every cuDNN attention call (6,556 per image) and every fp8
GEMM (3,240), each followed by ~3 us of idle inside the CUDA graphs, against ~0.7 us between two kernels: about
45-55 ms of an image's 1.55 s. This probe captures 20 calls of one kernel variant in a CUDA graph, times its
replays with device events and counts the memsets the profiler sees in one replay, for every attention shape of
the two UNets and the VAE (SDPA's cuDNN, FlashAttention-2 and memory-efficient backends, and the classic
matmul-softmax-matmul), the GEGLU GEMMs (bf16, fp8 row-wise and tensor-wise scaled) and 3x3 convolutions (cuDNN
autotuned or heuristic). Each variant is checked against a float64 reference on fresh random inputs first (the
VAE's full-resolution convolution only for finiteness: its float64 reference would take seconds). First, it asks
whether replaying a UNet-step-sized CUDA graph while its previous replay runs holds the host, and so leaves the
device idle at step boundaries (:func:`probe_relaunch`: the same graph each step against two copies in turn).

    python bench/gpu/kernel_probe.py [--out probe.json]     # about a minute on an H100
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

CALLS = 20  # kernel calls per captured graph
REPLAYS = 10

# (name, batch, heads, query tokens, key tokens, head dim) at 1024x1024: batch 2 under guidance; the base's
# cross-attention attends for one row only (its unconditional row has zero text: sdxl_core/cross_kv.py).
ATTENTION_SHAPES = [
    ("base self 64x64", 2, 10, 4096, 4096, 64),
    ("base self 32x32", 2, 20, 1024, 1024, 64),
    ("base cross 64x64", 1, 10, 4096, 77, 64),
    ("base cross 32x32", 1, 20, 1024, 77, 64),
    ("refiner self 64x64", 2, 12, 4096, 4096, 64),
    ("refiner self 32x32", 2, 24, 1024, 1024, 64),
    ("refiner cross 64x64", 2, 12, 4096, 77, 64),
    ("refiner cross 32x32", 2, 24, 1024, 77, 64),
    ("vae mid 128x128", 1, 1, 16384, 16384, 512),
]
# (name, tokens, in features, out features): the GEGLU input projections of the base's two transformer levels (fp8
# in the levels from `fp8` on), and the feed-forward's output projections after them (bf16: the H200 probe of run 3
# put fp8 at ~1.1x there, before quantising their inputs).
GEMM_SHAPES = [("geglu 32x32", 2048, 1280, 10240), ("geglu 64x64", 8192, 640, 5120),
               ("ff out 32x32", 2048, 5120, 1280), ("ff out 64x64", 8192, 2560, 640)]
# (name, batch, channels in, channels out, side): 3x3 convolutions of the base's ResNets and the VAE's last level.
CONV_SHAPES = [("base conv 128x128", 2, 320, 320, 128), ("base conv 64x64", 2, 640, 640, 64),
               ("base conv 32x32", 2, 1280, 1280, 32), ("vae conv 1024x1024", 1, 128, 128, 1024)]
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def captured(fn: Callable[[], object], calls: int, warmup: int = 3) -> torch.cuda.CUDAGraph:
    """``calls`` calls of ``fn`` captured in one CUDA graph, after ``warmup`` calls on a side stream (handles,
    plans, workspaces are made outside the capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return graph


def graph_cost(fn: Callable[[], torch.Tensor]) -> tuple[float, float]:
    """(microseconds per call, memsets per call) of ``fn`` captured ``CALLS`` times in one CUDA graph."""
    graph = captured(fn, CALLS)
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(REPLAYS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / CALLS)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    memsets = sum(1 for e in prof.events() if "memset" in e.name.lower())
    return statistics.median(times), memsets / CALLS


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return float(torch.linalg.norm(out.double() - ref) / torch.linalg.norm(ref))


def classic_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """diffusers' AttnProcessor arithmetic: scores in the input dtype, softmax in float32 (upcast_softmax)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.matmul(scores.float().softmax(dim=-1).to(q.dtype), v)


def probe_attention(dtype: torch.dtype) -> list[dict]:
    rows = []
    for name, b, h, sq, skv, d in ATTENTION_SHAPES:
        q = torch.randn(b, h, sq, d, device="cuda", dtype=dtype)
        k = torch.randn(b, h, skv, d, device="cuda", dtype=dtype)
        v = torch.randn(b, h, skv, d, device="cuda", dtype=dtype)
        ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
        flops = 4 * b * h * sq * skv * d
        variants: dict[str, Callable[[], torch.Tensor]] = {}
        for label, backend in BACKENDS.items():
            def run(backend=backend):
                with sdpa_kernel([backend]):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v)
            variants[label] = run
        variants["classic"] = lambda: classic_attention(q, k, v)
        for label, fn in variants.items():
            row = {"op": "attention", "shape": name, "variant": label}
            try:
                row["rel_err"] = rel_err(fn(), ref)
                row["us"], row["memsets"] = graph_cost(fn)
                row["tflops"] = flops / row["us"] / 1e6
            except RuntimeError as exc:  # a backend that does not take this shape
                row["error"] = str(exc).splitlines()[0][:120]
            rows.append(row)
            print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    return rows


def probe_gemms() -> list[dict]:
    rows = []
    fp8 = torch.float8_e4m3fn
    for name, m, kdim, n in GEMM_SHAPES:
        a = torch.randn(m, kdim, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, kdim, device="cuda", dtype=torch.bfloat16) * kdim ** -0.5
        ref = a.double() @ w.double().t()
        a_scale = a.float().abs().amax(dim=1, keepdim=True) / 448
        w_scale = w.float().abs().amax(dim=1, keepdim=True) / 448
        a8, w8 = (a.float() / a_scale).to(fp8), (w.float() / w_scale).to(fp8)
        a_t, w_t = a.float().abs().amax().reshape(()) / 448, w.float().abs().amax().reshape(()) / 448
        a8t, w8t = (a.float() / a_t).to(fp8), (w.float() / w_t).to(fp8)
        variants = {
            "bf16": lambda: a @ w.t(),
            "fp8 row-wise": lambda: torch._scaled_mm(a8, w8.t(), scale_a=a_scale, scale_b=w_scale.reshape(1, -1),
                                                     out_dtype=torch.bfloat16),
            "fp8 tensor-wise": lambda: torch._scaled_mm(a8t, w8t.t(), scale_a=a_t, scale_b=w_t,
                                                        out_dtype=torch.bfloat16),
        }
        for label, fn in variants.items():
            row = {"op": "gemm", "shape": f"{name} {m}x{kdim}x{n}", "variant": label}
            try:
                row["rel_err"] = rel_err(fn(), ref)
                row["us"], row["memsets"] = graph_cost(fn)
                row["tflops"] = 2 * m * kdim * n / row["us"] / 1e6
            except RuntimeError as exc:
                row["error"] = str(exc).splitlines()[0][:120]
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def probe_convs() -> list[dict]:
    """cuDNN's autotuned choice (``benchmark``, what the levels from ``cudnn`` on use) against its heuristic one."""
    rows = []
    for name, b, cin, cout, side in CONV_SHAPES:
        x = torch.randn(b, cin, side, side, device="cuda", dtype=torch.bfloat16)
        x = x.to(memory_format=torch.channels_last)
        w = (torch.randn(cout, cin, 3, 3, device="cuda", dtype=torch.bfloat16) * (9 * cin) ** -0.5).to(
            memory_format=torch.channels_last)
        ref = torch.nn.functional.conv2d(x.double(), w.double(), padding=1) if side <= 128 else None
        for label, benchmark in (("cudnn benchmark", True), ("cudnn heuristic", False)):
            torch.backends.cudnn.benchmark = benchmark
            fn = lambda: torch.nn.functional.conv2d(x, w, padding=1)  # noqa: E731
            row = {"op": "conv", "shape": name, "variant": label}
            try:
                out = fn()
                row["rel_err"] = rel_err(out, ref) if ref is not None else None
                row["finite"] = bool(torch.isfinite(out).all())
                row["us"], row["memsets"] = graph_cost(fn)
                row["tflops"] = 2 * b * cin * cout * 9 * side * side / row["us"] / 1e6
            except RuntimeError as exc:
                row["error"] = str(exc).splitlines()[0][:120]
            rows.append(row)
            print(json.dumps(row), flush=True)
    torch.backends.cudnn.benchmark = False
    return rows


# A graph shaped like one base UNet step under CUDA graphs (run 6: ~1,450 kernels, ~28 ms): GEMMs of ~20 us each.
RELAUNCH_KERNELS = 1450
RELAUNCH_SIDE = 2048
RELAUNCHES = 12


def _busy_wait(ms: float) -> None:
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        pass


def probe_relaunch(host_work_ms: float = 1.0) -> list[dict]:
    """Does replaying a CUDA graph while its previous replay still runs hold the host, so that the device idles
    at each step boundary while the host catches up? (Run 6's host spent 1,027 ms of an image inside
    ``CUDAGraph.replay``.) A graph of ``RELAUNCH_KERNELS`` GEMMs is replayed ``RELAUNCHES`` times with
    ``host_work_ms`` of host work between replays (a step's Python: scheduler, guards, input copies), replaying
    the same graph each time, and two copies of it in turn. Per variant: the host's milliseconds inside
    ``replay()`` (median, the first replay left out), each replay's own device time (median, from an event
    recorded just before it to one just after it) and the device's idle per boundary: from one replay's end event
    to the next one's start event. (Run 9 derived the idle from the replays' period less one reference replay
    queued behind a spin kernel; its replays ran 1.7-5.4 ms longer than that reference, which is not idle.)"""
    a = torch.randn(RELAUNCH_SIDE, RELAUNCH_SIDE, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(RELAUNCH_SIDE, RELAUNCH_SIDE, device="cuda", dtype=torch.bfloat16) * RELAUNCH_SIDE ** -0.5
    out = torch.empty_like(a)

    graphs = [captured(lambda: torch.mm(a, b, out=out), RELAUNCH_KERNELS, warmup=1) for _ in range(2)]
    for graph in graphs:
        graph.replay()
    torch.cuda.synchronize()
    own = []
    for _ in range(3):  # queued behind a spin, the replay runs as fast as the graph itself
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(50_000_000)
        start.record()
        graphs[0].replay()
        end.record()
        end.synchronize()
        own.append(start.elapsed_time(end))
    own_ms = min(own)
    rows = []
    for label, use, work in (("same graph, no host work", graphs[:1], 0.0),
                             (f"same graph, {host_work_ms:g} ms host work", graphs[:1], host_work_ms),
                             (f"two graphs in turn, {host_work_ms:g} ms host work", graphs, host_work_ms)):
        torch.cuda.synchronize()
        starts, ends, in_replay = [], [], []
        for i in range(RELAUNCHES):
            starts.append(torch.cuda.Event(enable_timing=True))
            ends.append(torch.cuda.Event(enable_timing=True))
            starts[-1].record()
            t0 = time.perf_counter()
            use[i % len(use)].replay()
            in_replay.append((time.perf_counter() - t0) * 1e3)
            ends[-1].record()
            if i < RELAUNCHES - 1:
                _busy_wait(work)
        ends[-1].synchronize()
        replay_ms = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        boundaries = [e.elapsed_time(s) for e, s in zip(ends, starts[1:])]
        row = {"op": "relaunch", "shape": f"{RELAUNCH_KERNELS} GEMMs {own_ms:.1f} ms", "variant": label,
               "graph_ms": own_ms, "replay_ms": statistics.median(replay_ms),
               "host_ms_in_replay": statistics.median(in_replay[1:]),
               "idle_us_per_boundary": statistics.median(boundaries) * 1e3}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def section(op: str, probe: Callable[[], list[dict]]) -> list[dict]:
    """``probe()``'s rows, or one error row for ``op`` if it raises part-way (its printed rows stay printed): the
    probe is one call on a lent card, so one failing part must not cost the others their measurements."""
    try:
        return probe()
    except Exception as exc:
        row = {"op": op, "shape": "-", "variant": "-", "error": f"{type(exc).__name__}: {exc}".splitlines()[0][:200]}
        print(json.dumps(row), flush=True)
        return [row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the rows as JSON here too")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernel_probe needs a CUDA GPU (it times kernels inside CUDA graphs)")
    torch.manual_seed(0)
    relaunch = section("relaunch", probe_relaunch)
    rows = (section("attention", lambda: probe_attention(torch.bfloat16)) + section("gemm", probe_gemms)
            + section("conv", probe_convs))
    print(f"\n{'graph relaunch':34s} {'variant':34s} {'graph ms':>9s} {'replay ms':>10s} {'host ms in replay':>18s} "
          f"{'idle us/boundary':>17s}")
    for r in relaunch:
        if "error" in r:
            print(f"{'relaunch':34s} failed: {r['error']}")
            continue
        print(f"{r['shape']:34s} {r['variant']:34s} {r['graph_ms']:9.2f} {r['replay_ms']:10.2f} "
              f"{r['host_ms_in_replay']:18.2f} "
              f"{r['idle_us_per_boundary']:17.1f}")
    print(f"\n{'op / shape':34s} {'variant':16s} {'us/call':>9s} {'TFLOP/s':>8s} {'memsets':>8s} {'rel err':>9s}")
    for r in rows:
        head = f"{r['op'] + ' ' + r['shape']:34s} {r['variant']:16s}"
        if "error" in r:
            print(f"{head} unsupported: {r['error']}")
        else:
            finite = "finite" if r.get("finite", True) else "NON-FINITE"
            err = f"{r['rel_err']:9.2e}" if r["rel_err"] is not None else f"{finite:>9s}"
            print(f"{head} {r['us']:9.1f} {r['tflops']:8.0f} {r['memsets']:8.2f} {err}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "relaunch": relaunch,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
