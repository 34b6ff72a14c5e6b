"""``sdxl-bench``: a thin command line over :mod:`sdxl_core`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sdxl_core.errors import SdxlBenchError

# The names of sdxl_core.optimize.LEVELS, repeated here so building the parser does not import torch
# (tests/test_cli.py checks the two agree).
SPEED_LEVELS = ("eager", "sdpa", "vae_no_upcast", "bf16", "channels_last", "fused_qkv", "cudnn", "compile", "cudagraphs", "max")


def _add_model_args(p: argparse.ArgumentParser, refiner_default: str | None = None) -> None:
    p.add_argument("--base", required=True, help="tiny, sdxl-random, a hub id or a diffusers folder")
    p.add_argument("--refiner", default=refiner_default, help="refiner: tiny, sdxl-random, a hub id or a folder")
    p.add_argument("--vae", default=None, help="VAE override, e.g. madebyollin/sdxl-vae-fp16-fix or a folder")
    p.add_argument("--variant", default=None, help="weights variant, e.g. fp16 for the hub SDXL repos")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float16, bfloat16 or float32 (default: fp16 on CUDA, else fp32)")


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
    from sdxl_core.presets import TINY, TINY_DEFAULT_SIZE

    out = _check_png_target(args.out)
    size_default = TINY_DEFAULT_SIZE if args.base == TINY else 1024
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


def cmd_speed(args: argparse.Namespace) -> int:
    from sdxl_core import speed

    return speed.main_speed(args)


def cmd_run(args: argparse.Namespace) -> int:
    from sdxl_core import run

    return run.main_run(args)


def cmd_make_wrong_dataset(args: argparse.Namespace) -> int:
    from sdxl_core import wrong_dataset

    return wrong_dataset.main(args)


def cmd_score(args: argparse.Namespace) -> int:
    from sdxl_core import score

    return score.main(args)


def cmd_compare(args: argparse.Namespace) -> int:
    from sdxl_core import compare

    return compare.main(args)


def cmd_report(args: argparse.Namespace) -> int:
    from sdxl_core import report_args

    return report_args.main(args)


def cmd_train_lora(args: argparse.Namespace) -> int:
    from sdxl_core import train_lora

    return train_lora.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdxl-bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("tiny", help="write the embedded tiny checkpoints as DIR/base and DIR/refiner")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_tiny)

    p = sub.add_parser("generate", help="one base+refiner image")
    _add_model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance-scale", type=float, default=13.0)
    p.add_argument("--high-noise-frac", type=float, default=0.8)
    p.add_argument("--width", type=int, default=None, help="default 1024 (128 for tiny)")
    p.add_argument("--height", type=int, default=None, help="default 1024 (128 for tiny)")
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
    _add_model_args(p, refiner_default=None)
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
    p.add_argument("--out", required=True, help="result JSON (rewritten after every case)")
    p.set_defaults(fn=cmd_speed)

    p = sub.add_parser("make-wrong-dataset",
                       help="SDXL's own bad images (13 weighted keyword prompts x 6 guidance scales) for the LoRA")
    from sdxl_core.wrong_dataset import add_arguments as add_dataset_arguments
    add_dataset_arguments(p)
    p.set_defaults(fn=cmd_make_wrong_dataset)

    p = sub.add_parser("train-lora", help="Dreambooth LoRA on a folder of images (default instance prompt: wrong)")
    from sdxl_core.train_args import add_arguments as add_train_arguments
    add_train_arguments(p)
    p.set_defaults(fn=cmd_train_lora)

    p = sub.add_parser("score", help="CLIP score, FID, KID, CMMD and sanity of image folders or a run's variants")
    from sdxl_core.score_args import add_arguments as add_score_arguments
    add_score_arguments(p)
    p.set_defaults(fn=cmd_score)

    p = sub.add_parser("compare", help="compare two bench runs (LoRA versions, commits): deltas, intervals, gate")
    from sdxl_core.compare import add_arguments as add_compare_arguments
    add_compare_arguments(p)
    p.set_defaults(fn=cmd_compare)

    p = sub.add_parser("report", help="the HTML report of one or more bench runs, from their results.json")
    from sdxl_core.report_args import add_arguments as add_report_arguments
    add_report_arguments(p)
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("run", help="every prompt x seed x variant into reports/runs/<run_id>/ with report.html")
    from sdxl_core.run_args import add_arguments as add_run_arguments
    add_run_arguments(p)
    p.set_defaults(fn=cmd_run)
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
