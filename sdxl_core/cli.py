"""``sdxl-bench``: a thin command line over :mod:`sdxl_core`."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path
from typing import Callable

from sdxl_core.errors import SdxlBenchError
from sdxl_core.model_args import add_model_args

# The names of sdxl_core.optimize.LEVELS, repeated here so building the parser does not import torch
# (tests/test_cli.py checks the two agree).
SPEED_LEVELS = ("eager", "sdpa", "vae_no_upcast", "bf16", "channels_last", "fused_qkv", "cudnn", "compile",
                "cudagraphs", "max", "fp8", "cross_kv", "host", "lean", "lean_host")


def cmd_tiny(args: argparse.Namespace) -> int:
    from sdxl_core.presets import write_tiny

    base, refiner = write_tiny(args.out)
    print(f"wrote {base} and {refiner}")
    return 0


def _check_png_target(path: str) -> Path:
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise SdxlBenchError(f"--out {path!r} must end in .png")
    if out.is_dir():
        raise SdxlBenchError(f"--out {path!r} is a folder; give a file name ending in .png")
    return out


def cmd_generate(args: argparse.Namespace) -> int:
    from sdxl_core.atomicio import write_png_atomic
    from sdxl_core.generate import GenerationRequest, GenerationSettings, generate
    from sdxl_core.loading import load_pipelines
    from sdxl_core.presets import default_size

    out = _check_png_target(args.out)
    size_default = default_size(args.base)
    settings = GenerationSettings(
        steps=args.steps, guidance_scale=args.guidance_scale, high_noise_frac=args.high_noise_frac,
        width=args.width or size_default, height=args.height or size_default, use_compel=not args.no_compel)
    request = GenerationRequest(args.prompt, args.seed, args.negative_prompt,
                                args.lora_scale if args.lora_scale is not None else (1.0 if args.lora else 0.0),
                                settings)
    request.check()  # before any model is loaded
    if args.refiner is not None:
        from sdxl_core.flops import split_steps

        split_steps(settings.steps, settings.high_noise_frac)  # SDXL's scheduler: both stages need a step
    if args.lora:
        from sdxl_core.run import check_lora

        lora, _ = check_lora(args.lora, args.allow_pickle)  # parsed and found before any model is loaded
    t0 = time.perf_counter()
    pipes = load_pipelines(args.base, args.refiner, vae=args.vae, device=args.device, dtype=args.dtype,
                           variant=args.variant)
    if args.lora:
        from sdxl_core.lora_files import load_loras

        load_loras(pipes, [lora])  # validated in full, on the base only
    t1 = time.perf_counter()
    result = generate(pipes, request)
    t2 = time.perf_counter()
    write_png_atomic(out, result.images[0])
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in result.stage_seconds.items())
    print(f"wrote {out} (load {t1 - t0:.1f}s, generate {t2 - t1:.2f}s: {stages})")
    return 0


def cmd_flops(args: argparse.Namespace) -> int:
    from sdxl_core.flops import component_flops, workload_flops

    per = component_flops(args.height, args.width)
    for name, value in per.as_dict().items():
        if name not in ("height", "width"):
            print(f"{name:16s} {value / 1e12:10.3f} TFLOP per forward (batch 1, {args.width}x{args.height})")
    w = workload_flops(per, args.steps, args.high_noise_frac, guidance=args.guidance_scale > 1)
    print(f"workload: {w.base_steps} base + {w.refiner_steps} refiner steps, guidance {'on' if w.guidance else 'off'}: "
          f"{w.total / 1e12:.1f} TFLOP per image")
    return 0


# Commands whose options live in a torch-free module: (name, help, options module, module that runs it, function).
MODULE_COMMANDS = (
    ("make-wrong-dataset", "SDXL's own bad images (13 weighted keyword prompts x 6 guidance scales) for the LoRA",
     "sdxl_core.wrong_dataset", "sdxl_core.wrong_dataset", "main"),
    ("train-lora", "Dreambooth LoRA on a folder of images (default instance prompt: wrong)",
     "sdxl_core.train_args", "sdxl_core.train_lora", "main"),
    ("score", "CLIP score, FID, KID, CMMD and sanity of image folders or a run's variants",
     "sdxl_core.score_args", "sdxl_core.score", "main"),
    ("compare", "compare two bench runs (LoRA versions, commits): deltas, intervals, gate",
     "sdxl_core.compare", "sdxl_core.compare", "main"),
    ("report", "the HTML report of one or more bench runs, from their results.json",
     "sdxl_core.report_args", "sdxl_core.report_args", "main"),
    ("toy-dataset", "rendered toy-world scenes with captions (training data, or a reference set for FID)",
     "sdxl_core.toy.world", "sdxl_core.toy.world", "main"),
    ("train-toy", "train the toy world's VAE, base, refiner and CLIP from scratch on the CPU (make train-toy)",
     "sdxl_core.toy.train_config", "sdxl_core.toy.train", "main"),
    ("run", "every prompt x seed x variant into reports/runs/<run_id>/ with report.html",
     "sdxl_core.run_args", "sdxl_core.run", "main_run"),
)


def _lazy(module: str, func: str) -> Callable[[argparse.Namespace], int]:
    """A command that imports its module only when it runs (the parser itself imports no torch)."""
    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), func)(args)
    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdxl-bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiny", help="write the embedded tiny checkpoints as DIR/base and DIR/refiner")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_tiny)

    p = sub.add_parser("generate", help="one base+refiner image")
    add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=13.0)
    p.add_argument("--high-noise-frac", type=float, default=0.8)
    p.add_argument("--width", type=int, default=None, help="default 1024 (128 for tiny, 64 for toy)")
    p.add_argument("--height", type=int, default=None, help="default 1024 (128 for tiny, 64 for toy)")
    p.add_argument("--lora", default=None, help="a LoRA for the base: NAME@VERSION=PATH, NAME=PATH or PATH")
    p.add_argument("--allow-pickle", action="store_true", help="also read LoRA pickle files (only trusted ones)")
    p.add_argument("--lora-scale", type=float, default=None, help="default 1 with --lora, else 0")
    p.add_argument("--no-compel", action="store_true", help="plain prompts instead of compel weighting")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("flops", help="count FLOPs of the SDXL 1.0 components and the workload (meta device)")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--high-noise-frac", type=float, default=0.8)
    p.add_argument("--guidance-scale", type=float, default=13.0)
    p.set_defaults(fn=cmd_flops)

    p = sub.add_parser("speed", help="time base+refiner per optimisation level (the GPU latency suite)")
    add_model_args(p, refiner_default=None)
    p.add_argument("--cases", default=None,
                   help="comma-separated level[+lora_unfused|+lora_fused][@bN]; levels, each adding to the one "
                        f"before: {', '.join(SPEED_LEVELS)} (default: a priority-ordered set)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=13.0)
    p.add_argument("--high-noise-frac", type=float, default=0.8)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=None, help="skip cases that cannot finish within this")
    p.add_argument("--skip-fp16-check", action="store_true", help="skip the fp16 activation-range check")
    p.add_argument("--compile-cache-in", default=None,
                   help="load torch.compile artifacts saved by an earlier run (--compile-cache-out) from this folder")
    p.add_argument("--compile-cache-out", default=None,
                   help="save this run's torch.compile artifacts to this folder after each compiled case")
    p.add_argument("--profile", default=None,
                   help="comma-separated cases that also get a device timeline (kernels, idle time per stage, host "
                        "syncs) from one more generation after their timed rounds, e.g. --profile fp8")
    p.add_argument("--out", required=True, help="result JSON (rewritten after every case)")
    p.set_defaults(fn=_lazy("sdxl_core.speed", "main_speed"))

    for name, help_text, args_module, run_module, func in MODULE_COMMANDS:
        p = sub.add_parser(name, help=help_text)
        importlib.import_module(args_module).add_arguments(p)
        p.set_defaults(fn=_lazy(run_module, func))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except SdxlBenchError as exc:
        print(f"sdxl-bench: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
