"""Numerical health of models and outputs: activation ranges, finiteness, and closeness between runs."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

FP16_MAX = 65504.0


@dataclass
class ActivationStats:
    """Largest absolute activation seen in any module output, and whether all outputs were finite."""

    max_abs: float
    all_finite: bool
    worst_module: str

    @property
    def fp16_headroom(self) -> float:
        """How many times the largest activation fits under fp16's maximum (inf when nothing was seen)."""
        return FP16_MAX / self.max_abs if self.max_abs > 0 else math.inf


@contextlib.contextmanager
def track_activations(module: nn.Module) -> Iterator[list[ActivationStats]]:
    """Record the largest |activation| of every submodule's tensor outputs while the block runs.

    The per-module maxima stay on the device until the block ends, so tracking adds no synchronisation.
    """
    seen: list[tuple[str, torch.Tensor]] = []

    def hook(name: str):
        def fn(_module: nn.Module, _args: Any, output: Any) -> None:
            tensors = [output] if torch.is_tensor(output) else [
                o for o in (output if isinstance(output, (tuple, list)) else getattr(output, "values", lambda: [])())
                if torch.is_tensor(o)]
            for t in tensors:
                if t.is_floating_point() and t.numel():
                    seen.append((name, t.detach().abs().amax().float()))
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in module.named_modules() if n]
    result: list[ActivationStats] = []
    try:
        yield result
    finally:
        for h in handles:
            h.remove()
    if seen:
        values = torch.stack([v for _, v in seen]).cpu()
        finite = bool(torch.isfinite(values).all())
        idx = int(torch.nan_to_num(values, nan=math.inf).argmax())
        result.append(ActivationStats(float(values[idx]), finite, seen[idx][0]))
    else:
        result.append(ActivationStats(0.0, True, ""))


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
    denom = float(b64.norm())
    return float((a64 - b64).norm()) / denom if denom else float((a64 - b64).norm())


def image_psnr(a: Any, b: Any) -> float:
    """PSNR in dB between two 8-bit images (PIL or arrays); inf when identical."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def image_max_abs_diff(a: Any, b: Any) -> int:
    return int(np.max(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))))
