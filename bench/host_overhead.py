"""The host's own work at each stage start of a base + refiner image, per optimisation level, on the CPU.

    python bench/host_overhead.py [--levels cross_kv,host] [--images 8] [--steps 10] [--out FILE]

On a GPU a stage start is idle device time: the device has nothing queued while the host parses the prompt,
walks the pipelines' modules or encodes text before the first kernel. This script times that host work where it
can be timed without a GPU: on the SDXL skeleton (``sdxl_core.presets.SKELETON_CONFIGS``: every module of SDXL
1.0, widths / 8), with each level's switches except those that need CUDA (compile, fp8, cuDNN; float32 on the
CPU). The levels' pipelines are built side by side and take turns image by image, so drift of the machine hits
all. Per image:

* ``text``: the text stage (compel: parse, tokenisation, encoder passes; on the CPU the skeleton's encoders
  compute too, so only differences between levels mean much);
* ``base_start`` / ``refiner_start``: from the stage mark to the stage UNet's first call (the pipeline's own
  host work);
* ``vae_to_end``: from the VAE's first layer to the image in hand.

Prints the medians in milliseconds; ``--out`` writes them as JSON with the machine and settings.

``--host-reads`` also lists, per level, the operations of one image that read a tensor's values on the host
(``item``, ``bool``, ``nonzero``, ...) by the line that asks (:class:`HostReads`). On a GPU each is a host sync
when its tensor is on the device. On this CPU every tensor is a host tensor, so the list holds candidates, and
the line says which tensor it reads. It does not see ``tolist()`` (no dispatched op) or copies to the host (none on
a CPU), and the skeleton's text encoders run uncompiled here, where transformers reads the padding mask.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
import traceback
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CUDA_ONLY = dict(dtype="float32", fp8_geglu=False, compile_mode=None, compile_text_encoders=False, cudnn=False,
                 flash_cross_attention=False)  # FlashAttention: fp16/bf16 only, and a kernel choice, not host work
PARTS = ("text", "base_start", "refiner_start", "vae_to_end")


def build(level_name: str):
    import torch

    from sdxl_core.loading import Pipelines
    from sdxl_core.optimize import apply_level, get_level
    from sdxl_core.presets import SKELETON_CONFIGS, build_sdxl_random

    base, refiner = build_sdxl_random(device="cpu", dtype=torch.float32, configs=SKELETON_CONFIGS)
    pipes = Pipelines(base, refiner, "skeleton", "skeleton", None)
    return apply_level(pipes, dataclasses.replace(get_level(level_name), **CUDA_ONLY))


# Operations that read a tensor's values on the host: item/bool/int/float of a tensor go through
# _local_scalar_dense; the others have an output size that depends on the values.
HOST_READ_OPS = frozenset({"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "masked_select", "_unique2",
                           "unique_dim", "unique_consecutive", "allclose"})


def _host_reads_mode():
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostReads(TorchDispatchMode):
        """Counts :data:`HOST_READ_OPS` calls by the innermost calling line outside torch (``hits``)."""

        def __init__(self) -> None:
            super().__init__()
            self.hits: Counter[tuple[str, str]] = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            op = func.overloadpacket.__name__
            if op in HOST_READ_OPS:
                caller = traceback.extract_stack()[:-1]  # without this frame
                frame = next(f for f in reversed(caller) if "/torch/" not in f.filename)
                self.hits[(op, f"{_short(frame.filename)}:{frame.lineno}")] += 1
            return func(*args, **(kwargs or {}))

    return HostReads()


def _short(filename: str) -> str:
    """The path from its package on: ``diffusers/...``, ``sdxl_core/...``, ``bench/...``."""
    if "site-packages/" in filename:
        return filename.split("site-packages/", 1)[1]
    for package in ("sdxl_core/", "bench/"):
        if package in filename:
            return package + filename.split(package, 1)[1]
    return filename


def one_image(pipes, encoder, request) -> dict[str, float]:
    import torch

    from sdxl_core.generate import StageClock, generate

    marks: dict[str, float] = {}
    first: dict[str, float] = {}

    def hook(tag: str):
        def pre_hook(module, args) -> None:  # returns None: a value would replace the call's arguments
            first.setdefault(tag, time.perf_counter())
        return pre_hook

    handles = [pipes.base.unet.register_forward_pre_hook(hook("base")),
               pipes.refiner.unet.register_forward_pre_hook(hook("refiner")),
               pipes.base.vae.post_quant_conv.register_forward_pre_hook(hook("vae"))]
    try:
        clock = StageClock(torch.device("cpu"), lambda name: marks.setdefault(name, time.perf_counter()))
        generate(pipes, request, encoder, clock)
        end = time.perf_counter()
    finally:
        for h in handles:
            h.remove()
    return {"text": marks["base_denoising"] - marks["text_encoding"],
            "base_start": first["base"] - marks["base_denoising"],
            "refiner_start": first["refiner"] - marks["refiner_denoising"],
            "vae_to_end": end - first["vae"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="cross_kv,host")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--host-reads", action="store_true", help="also list each level's host reads of one image")
    args = ap.parse_args()

    import torch

    from sdxl_core.generate import GenerationRequest, GenerationSettings, PromptEncoder
    from sdxl_core.speed import DEFAULT_PROMPT

    torch.set_num_threads(1)
    levels = args.levels.split(",")
    pipes = {name: build(name) for name in levels}
    encoders = {name: PromptEncoder(p, packrat=None) for name, p in pipes.items()}  # the level set packrat
    request = GenerationRequest(DEFAULT_PROMPT, 0, settings=GenerationSettings(steps=args.steps, width=64, height=64))
    for name in levels:  # warm-up: compel's one-off passes, first-call allocations
        one_image(pipes[name], encoders[name], request)
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in levels}
    for _ in range(args.images):
        for name in levels:
            rows[name].append(one_image(pipes[name], encoders[name], request))
    medians = {name: {k: 1e3 * statistics.median(r[k] for r in rs) for k in PARTS} for name, rs in rows.items()}
    print(f"host ms per image, median of {args.images} (SDXL skeleton, CPU, {args.steps} steps at 64x64)")
    print(f"{'level':10s}" + "".join(f"{k:>15s}" for k in PARTS))
    for name, m in medians.items():
        print(f"{name:10s}" + "".join(f"{m[k]:15.2f}" for k in PARTS))
    reads: dict[str, dict[str, int]] = {}
    if args.host_reads:
        for name in levels:
            with _host_reads_mode() as scan:
                one_image(pipes[name], encoders[name], request)
            reads[name] = {f"{op} {where}": n for (op, where), n in scan.hits.most_common()}
            print(f"{name}: {sum(reads[name].values())} host reads in one image")
            for what, n in reads[name].items():
                print(f"  {n:5d}  {what}")
    if args.out:
        args.out.write_text(json.dumps({"machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                                                    "processor": platform.processor(), "torch": torch.__version__},
                                        "settings": vars(args) | {"out": str(args.out)}, "median_ms": medians,
                                        "images": rows, "host_reads": reads}, indent=1))


if __name__ == "__main__":
    main()
