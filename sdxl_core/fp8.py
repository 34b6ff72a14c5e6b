"""fp8 (e4m3) matrix products for the UNets' GEGLU input projections, the largest GEMMs of an SDXL step.

A kernel profile of one compiled base-UNet step on an H200 (``reports/gpu/NOTES.md``, run 3) put the GEGLU
projection first among kernels (5.3 of 29.4 ms), and a probe of row-wise scaled fp8 GEMMs on the UNet's
shapes measured 1.29x and 1.46x over bf16 on exactly these projections (0.75-1.1x on the others). So only
they are converted.

Scaling is row-wise on both sides: one float32 scale per output channel of the weight (computed once) and
one per token of the activation (computed every call, "dynamic" quantisation), so an outlier token or
channel costs precision only in its own row. The product runs in ``torch._scaled_mm`` with bf16 output.
"""

from __future__ import annotations

import torch
from torch import nn

from sdxl_core.errors import InvalidConfigError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
# The smallest scale: an all-zero row would otherwise divide by zero.
_MIN_AMAX = 1e-12


def quantize_rowwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (rows, k) to (e4m3 values, float32 scales of shape (rows, 1)) with ``x ~= values * scales``."""
    xf = x.float()
    scale = xf.abs().amax(dim=1, keepdim=True).clamp(min=_MIN_AMAX) / FP8_MAX
    values = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return values, scale


class Fp8Linear(nn.Module):
    """A drop-in for ``nn.Linear`` whose weight is stored in e4m3 with one scale per output channel.

    ``forward`` quantises its input per row and multiplies with ``torch._scaled_mm``; the bias is added in the
    output dtype. Built with :meth:`from_linear`; the original weight is not kept. Inference only, as diffusers'
    pipelines run the UNet (under ``no_grad``): ``torch._scaled_mm`` has no derivative.
    """

    def __init__(self, weight_fp8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 out_dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features = weight_fp8.shape[1]
        self.out_features = weight_fp8.shape[0]
        self.out_dtype = out_dtype
        self.register_buffer("weight_fp8", weight_fp8)
        # (1, out): the layout torch._scaled_mm wants for row-wise scales of its second operand.
        self.register_buffer("weight_scale", weight_scale.reshape(1, -1).contiguous())
        self.register_buffer("bias", bias)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, out_dtype: torch.dtype = torch.bfloat16) -> "Fp8Linear":
        values, scale = quantize_rowwise(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach().to(out_dtype)
        return cls(values.contiguous(), scale, bias, out_dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight this layer multiplies by, in float32 (for checks)."""
        return self.weight_fp8.float() * self.weight_scale.reshape(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        values, scale = quantize_rowwise(x.reshape(-1, self.in_features))
        # weight_fp8 is (out, in) row-major, so its transpose is the column-major operand _scaled_mm expects.
        out = torch._scaled_mm(values, self.weight_fp8.t(), scale_a=scale, scale_b=self.weight_scale,
                               out_dtype=self.out_dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8={FP8_DTYPE}, row-wise scales"


def check_fp8_device(device: torch.device) -> None:
    """Raise unless ``device`` can run fp8 ``_scaled_mm`` (CUDA compute capability 8.9+, or a CPU build of torch
    whose ``_scaled_mm`` takes row-wise scales: torch 2.14's does, 2.11's takes only one scale per operand)."""
    if device.type == "cpu":
        _check_cpu_rowwise()
        return
    if device.type != "cuda":
        raise InvalidConfigError(f"fp8 GEMMs run on CUDA (compute capability 8.9+) or the CPU, not {device.type}; "
                                 f"choose a level without fp8 (e.g. max)")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise InvalidConfigError(
            f"fp8 GEMMs need CUDA compute capability 8.9+ (Ada, Hopper or newer); {torch.cuda.get_device_name(device)}"
            f" has {major}.{minor}; choose a level without fp8 (e.g. max)")


def _check_cpu_rowwise() -> None:
    """One 16x16 row-wise scaled product on the CPU: older builds fail it with an internal assert."""
    values, scale = quantize_rowwise(torch.ones(16, 16))
    try:
        torch._scaled_mm(values, values.t(), scale_a=scale, scale_b=scale.reshape(1, -1), out_dtype=torch.bfloat16)
    except RuntimeError as exc:
        raise InvalidConfigError(
            f"torch {torch.__version__}'s CPU _scaled_mm takes no row-wise scales ({str(exc).splitlines()[0][:160]}); "
            f"run the fp8 levels on CUDA (compute capability 8.9+), on the CPU with a newer torch (2.14 has them), "
            f"or choose a level without fp8 (e.g. max)") from exc


def convert_geglu_projections(unet: nn.Module, out_dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace the ``proj`` of every diffusers ``GEGLU`` in ``unet`` by an :class:`Fp8Linear`; returns how many.

    Only a plain ``nn.Linear`` is converted: a projection wrapped by an unfused LoRA adapter is refused, since
    converting it would drop the adapter (fuse the LoRA first)."""
    from diffusers.models.activations import GEGLU

    todo = [(name, m) for name, m in unet.named_modules() if isinstance(m, GEGLU) and not isinstance(m.proj, Fp8Linear)]
    for name, module in todo:  # check all before changing any
        if type(module.proj) is not nn.Linear:
            raise InvalidConfigError(
                f"{name}.proj is a {type(module.proj).__name__}, not a plain Linear (an unfused LoRA adapter?); "
                f"fuse the LoRA first (--lora fused) or choose a level without fp8")
    for _, module in todo:
        module.proj = Fp8Linear.from_linear(module.proj, out_dtype)
    return len(todo)
