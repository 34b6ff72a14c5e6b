"""How many guards dynamo checks at each compiled call of a base + refiner image, and what a guard filter keeps.

    python bench/guards.py [--level lean_host] [--filter skip_guard_on_inbuilt_nn_modules_unsafe]

Every call of a compiled module checks its guards before it runs. During the denoising steps the host is ahead of
the device, so this is hidden; at each stage's first step the device has nothing queued and waits for it. The
script compiles the modules a level compiles (both UNets, the VAE decoder, the text encoders) with
``backend="eager"`` on the SDXL skeleton (``sdxl_core.presets.SKELETON_CONFIGS``: every module of SDXL 1.0, widths
/ 8), on the CPU, so the guards are those of the full architecture without a GPU or inductor's compile time. It
makes two 64x64 images, then prints, per compile, the guards dynamo built, the guards the filter kept (``--filter``
names a ``torch.compiler`` helper; none: all kept), dynamo's own guard latency measurement (one cold run), and the
largest groups of guards by type and by source (a built-in module like ``nn.Linear``, another module, or other).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections import Counter
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

CUDA_ONLY = dict(dtype="float32", fp8_geglu=False, compile_mode=None, compile_text_encoders=False, cudnn=False,
                 flash_cross_attention=False)


class Recorder:
    """A guard filter that keeps what ``keep`` keeps (everything without it) and tallies each compile's guards."""

    def __init__(self, keep: Any = None):
        self.keep = keep
        self.compiles: list[dict[str, Any]] = []

    def __call__(self, entries: list[Any]) -> list[bool]:
        groups: Counter[tuple[str, str, str]] = Counter()
        for entry in entries:
            source = entry.orig_guard.source
            where = "other"
            if source is not None and source.is_unspecialized_builtin_nn_module():
                where = "built-in module"
            elif source is not None and source.is_unspecialized_nn_module():
                where = "other module"
            groups[(entry.guard_type, type(entry.value).__name__, where)] += 1
        keep = list(self.keep(entries)) if self.keep else [True] * len(entries)
        self.compiles.append({"guards": len(entries), "kept": sum(map(bool, keep)), "groups": groups})
        return keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--level", default="lean_host")
    ap.add_argument("--filter", default=None, help="a torch.compiler guard filter helper, e.g. "
                                                   "skip_guard_on_inbuilt_nn_modules_unsafe")
    args = ap.parse_args()

    import torch
    from torch._dynamo.utils import get_compilation_metrics

    from sdxl_core.generate import GenerationRequest, GenerationSettings, PromptEncoder, generate
    from sdxl_core.loading import Pipelines
    from sdxl_core.optimize import apply_level, configure_inductor, get_level
    from sdxl_core.presets import SKELETON_CONFIGS, build_sdxl_random
    from sdxl_core.speed import DEFAULT_PROMPT
    from sdxl_core.text_graphs import install_output_capture_hooks

    torch.set_num_threads(1)
    recorder = Recorder(getattr(torch.compiler, args.filter) if args.filter else None)
    level = dataclasses.replace(get_level(args.level), **CUDA_ONLY)
    base, refiner = build_sdxl_random(device="cpu", dtype=torch.float32, configs=SKELETON_CONFIGS)
    pipes = apply_level(Pipelines(base, refiner, "skeleton", "skeleton", None), level)
    configure_inductor()
    modules = {"base UNet": getattr(pipes.base.unet, "unet", pipes.base.unet),
               "refiner UNet": getattr(pipes.refiner.unet, "unet", pipes.refiner.unet),
               "VAE decoder": pipes.base.vae.decoder, "text_encoder": pipes.base.text_encoder,
               "text_encoder_2": pipes.base.text_encoder_2}
    for name, module in modules.items():
        if name.startswith("text"):
            install_output_capture_hooks(module)
        module.compile(backend="eager", fullgraph=not name.startswith("text"), dynamic=False,
                       options={"guard_filter_fn": recorder})
    encoder = PromptEncoder(pipes, packrat=None)
    request = GenerationRequest(DEFAULT_PROMPT, 0, settings=GenerationSettings(steps=10, width=64, height=64))
    for _ in range(2):
        generate(pipes, request, encoder)
    metrics = [m for m in get_compilation_metrics() if m.guard_count]
    print(f"level {args.level}, filter {args.filter or 'none'} (SDXL skeleton, CPU, backend=eager)")
    print(f"{'compiled frame':45s} {'guards':>8s} {'kept':>8s} {'latency':>10s}")
    for metric, compiled in zip(metrics, recorder.compiles):
        where = f"{(metric.co_filename or '').split('site-packages/')[-1]}:{metric.co_firstlineno} {metric.co_name}"
        print(f"{where[-45:]:45s} {compiled['guards']:8d} {compiled['kept']:8d} "
              f"{(metric.guard_latency_us or 0) / 1e3:8.2f} ms")
    largest = max(recorder.compiles, key=lambda c: c["guards"])
    print(f"largest groups of the largest compile ({largest['guards']} guards):")
    for (kind, value, where), count in largest["groups"].most_common(10):
        print(f"  {count:6d}  {kind} on {value} ({where})")


if __name__ == "__main__":
    main()
