"""Where the compiled SDXL base UNet spends a denoising step (batch 2: guidance), by kernel class.

    python3 bench/gpu/profile_unet.py [--level compile] [--out DIR]

Builds the base of ``sdxl-random`` on the GPU, applies an optimisation level, runs one step to compile,
then profiles 5 steps with torch.profiler and prints the share of GPU time per kernel class and the top
kernels, next to the FLOPs of each class counted on the meta device.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from sdxl_core.flops import unet_inputs
from sdxl_core.loading import Pipelines
from sdxl_core.optimize import apply_level, get_level
from sdxl_core.presets import build_sdxl_random
from sdxl_core.timeline import classify


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--level", default="compile")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", default=".")
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--tiny", action="store_true", help="the tiny architecture (a CPU check of this script)")
    args = p.parse_args()
    level = get_level(args.level)
    device = torch.device(args.device)
    from sdxl_core.presets import SDXL_1_0, ArchitectureConfigs

    base, _ = build_sdxl_random(device, level.torch_dtype, with_refiner=False, configs=ArchitectureConfigs("tiny") if args.tiny else SDXL_1_0)
    pipes = Pipelines(base, None, "sdxl-random", None, None)
    apply_level(pipes, level)
    unet = base.unet
    pos, kw = unet_inputs(unet, 2, args.size, args.size, base.text_encoder_2.config.projection_dim, device=device,
                          dtype=level.torch_dtype)
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    pos = (torch.randn_like(pos[0]), pos[1], torch.randn_like(pos[2]))
    t0 = time.perf_counter()
    with torch.no_grad():
        unet(*pos, **kw)
        sync()
        first = time.perf_counter() - t0
        for _ in range(3):
            unet(*pos, **kw)
        sync()
        t0 = time.perf_counter()
        for _ in range(10):
            unet(*pos, **kw)
        sync()
        step_ms = (time.perf_counter() - t0) / 10 * 1e3
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                unet(*pos, **kw)
            sync()
    per_class: dict[str, float] = {}
    kernels = []
    for evt in prof.key_averages():
        dev_us = evt.self_device_time_total if device.type == "cuda" else evt.self_cpu_time_total
        if dev_us <= 0:
            continue
        label = classify(evt.key)
        per_class[label] = per_class.get(label, 0.0) + dev_us
        kernels.append((dev_us, evt.count, label, evt.key))
    total = sum(per_class.values())
    print(f"level {level.name}: first call {first:.1f} s, step {step_ms:.2f} ms (batch 2, {args.size}x{args.size}), "
          f"GPU busy {total / args.steps / 1e3:.2f} ms/step in kernels")
    for label, us in sorted(per_class.items(), key=lambda kv: -kv[1]):
        print(f"  {label:32s} {us / args.steps / 1e3:7.2f} ms/step {100 * us / total:5.1f}%")
    kernels.sort(reverse=True)
    print("top kernels (ms/step, launches/step, class, name):")
    for us, count, label, name in kernels[:30]:
        print(f"  {us / args.steps / 1e3:7.3f} {count / args.steps:6.1f}  {label:10.10s} {name[:110]}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"profile-{level.name}.json").write_text(json.dumps({
        "level": level.as_dict(), "first_call_s": first, "step_ms": step_ms, "kernel_backends": pipes.kernel_backends,
        "per_class_ms_per_step": {k: v / args.steps / 1e3 for k, v in per_class.items()},
        "kernels": [{"ms_per_step": us / args.steps / 1e3, "launches_per_step": c / args.steps, "class": lb, "name": n}
                    for us, c, lb, n in kernels[:200]]}, indent=1))


if __name__ == "__main__":
    main()
