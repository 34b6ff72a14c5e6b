"""Command-line options of ``sdxl-bench train-lora``, importable without torch (the parser is built fast)."""

from __future__ import annotations

from typing import Any

MIXED_PRECISION = ("no", "fp16", "bf16")


def add_arguments(p: Any) -> None:
    """``sdxl-bench train-lora``: options named as in diffusers' train_dreambooth_lora_sdxl.py."""
    p.add_argument("--base", required=True, help="tiny, sdxl-random, a hub id or a diffusers folder")
    p.add_argument("--variant", default=None, help="weights variant, e.g. fp16")
    p.add_argument("--data", required=True, help="folder of training images (e.g. from make-wrong-dataset)")
    p.add_argument("--out", required=True, help="folder for pytorch_lora_weights.safetensors and checkpoints")
    p.add_argument("--instance-prompt", default="wrong")
    p.add_argument("--resolution", type=int, default=None, help="default 1024 (128 for tiny)")
    p.add_argument("--train-batch-size", type=int, default=1)
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--max-train-steps", type=int, default=500)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--text-encoder-lr", type=float, default=5e-6)
    p.add_argument("--mixed-precision", default="no", choices=MIXED_PRECISION)
    p.add_argument("--snr-gamma", type=float, default=None, help="Min-SNR weighting; 5.0 is the usual value")
    p.add_argument("--train-text-encoder", action="store_true")
    p.add_argument("--center-crop", action="store_true", help="centre crops instead of random crops")
    p.add_argument("--random-flip", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpointing-steps", type=int, default=None, help="save a checkpoint every N steps")
    p.add_argument("--checkpoints-total-limit", type=int, default=None, help="keep only the newest N")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--version-label", default=None, help="recorded in the metadata (default: sha-<weights hash>)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true")

