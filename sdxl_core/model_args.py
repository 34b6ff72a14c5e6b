"""The model options every command shares (no heavy imports, so building a parser stays cheap)."""

from __future__ import annotations

import argparse


def add_model_args(p: argparse.ArgumentParser, refiner_default: str | None = None) -> None:
    p.add_argument("--base", required=True, help="tiny, sdxl-random, a hub id or a diffusers folder")
    p.add_argument("--refiner", default=refiner_default, help="refiner: tiny, sdxl-random, a hub id or a folder")
    p.add_argument("--vae", default=None, help="VAE override, e.g. madebyollin/sdxl-vae-fp16-fix or a folder")
    p.add_argument("--variant", default=None, help="weights variant, e.g. fp16 for the hub SDXL repos")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float16, bfloat16 or float32 (default: fp16 on CUDA, else fp32)")
