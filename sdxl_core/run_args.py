"""The arguments of ``sdxl-bench run`` (no heavy imports, so building the parser stays cheap)."""

from __future__ import annotations

import argparse

DEFAULT_RUN_DIR = "reports/runs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", default="tiny", help="tiny (default), a hub id or a diffusers folder")
    p.add_argument("--refiner", default=None,
                   help="refiner: tiny, a hub id or a folder; 'none' for the base alone (default: tiny with --base "
                        "tiny, else none)")
    p.add_argument("--vae", default=None, help="VAE override, e.g. madebyollin/sdxl-vae-fp16-fix or a folder")
    p.add_argument("--variant", default=None, help="weights variant, e.g. fp16 for the hub SDXL repos")
    p.add_argument("--lora", default=None,
                   help="the LoRA for the base (needed by wrong_lora): NAME@VERSION=PATH, NAME=PATH or PATH "
                        "(a .safetensors file or a folder with pytorch_lora_weights.safetensors)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="also read LoRA pickle files (.bin/.ckpt/.pt/.pth); only for files you trust")
    p.add_argument("--variants", default=None,
                   help="comma-separated: baseline, wrong_negative, wrong_lora (default: all three with --lora, "
                        "else the first two)")
    p.add_argument("--prompts-file", default=None, help="text file, one prompt per line (default: built-in set)")
    p.add_argument("--num-prompts", type=int, default=None, help="use the first N prompts")
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds (default 0,1)")
    p.add_argument("--steps", type=int, default=None, help="default 50 (20 for tiny)")
    p.add_argument("--guidance-scale", type=float, default=13.0)
    p.add_argument("--high-noise-frac", type=float, default=0.8)
    p.add_argument("--size", type=int, default=None, help="width = height, default 1024 (128 for tiny)")
    p.add_argument("--no-compel", action="store_true", help="plain prompts instead of compel weighting")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up generation")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float16, bfloat16 or float32 (default: fp16 on CUDA, else fp32)")
    p.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help=f"folder of run folders (default {DEFAULT_RUN_DIR})")
    p.add_argument("--run-id", default=None, help="run folder name; reuse it to resume (default: date-time)")
