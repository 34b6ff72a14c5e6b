"""Nearest-neighbour 2x upsampling followed by a 3x3 convolution, computed at the input's resolution.

diffusers' ``Upsample2D`` (every upsampler of SDXL's two UNets and its VAE decoder) repeats each pixel 2x2 and then
convolves the upsampled map with a 3x3 kernel. Each of the four output phases (even or odd row, even or odd
column) then sees a 2x2 neighbourhood of the *input*, with the 3x3 kernel's taps summed where they land on the same
input pixel: for even output rows the kernel rows (0, 1+2) fall on input rows (i-1, i), for odd ones (0+1, 2) on
(i, i+1); columns alike. So one 2x2 convolution of the input with 4x the output channels gives all four phases, and a
pixel shuffle interleaves them: the same function in 4/9 of the multiply-adds (16 against 36 per input pixel and
channel pair), without writing and reading the 4x larger upsampled map.

At 1024x1024 the upsamplers' convolutions are 0.24 TFLOP per base-UNet forward (of 6.76), 0.39 per refiner forward
(of 7.29) and 2.8 TFLOP of the VAE decode (of 10.47); this saves 5/9 of that, ~16 TFLOP per image.
The summed weights are made once in float64 and rounded to the layer's dtype, so results differ from the
upsample-then-convolve path by rounding only.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sdxl_core.errors import InvalidConfigError

# For output phase a (0: even rows, 1: odd rows): which rows of the 3x3 kernel land on each row of the 2x2 one.
_TAPS = (((0,), (1, 2)), ((0, 1), (2,)))


def subpixel_weight(weight: torch.Tensor) -> torch.Tensor:
    """The (4 * out, in, 2, 2) kernel of the four output phases (phase ``2a + b`` in block ``2a + b``) from a
    3x3 ``weight`` of shape (out, in, 3, 3), summed in float64."""
    w = weight.detach().double()
    blocks = []
    for rows in _TAPS:
        for cols in _TAPS:
            k = torch.stack([torch.stack([w[:, :, list(r)][:, :, :, list(c)].sum(dim=(2, 3)) for c in cols], dim=-1)
                             for r in rows], dim=-2)
            blocks.append(k)
    return torch.cat(blocks)


def _conv(upsample: nn.Module) -> nn.Module:
    """An ``Upsample2D``'s convolution, under either of the names diffusers gives it."""
    return upsample.conv if upsample.name == "conv" else upsample.Conv2d_0


class SubpixelUpsample2D(nn.Module):
    """Stands in for a diffusers ``Upsample2D`` with ``use_conv`` (3x3, padding 1, nearest 2x interpolation, no
    norm): the same output from a 2x2 convolution at the input's resolution and a pixel shuffle. An
    ``output_size`` other than twice the input's runs the original layer (``original``)."""

    def __init__(self, upsample: nn.Module):
        super().__init__()
        conv = _conv(upsample)
        self.channels = upsample.channels
        self.out_channels = upsample.out_channels
        self.original = upsample
        fmt = torch.channels_last if conv.weight.is_contiguous(memory_format=torch.channels_last) and \
            not conv.weight.is_contiguous() else torch.contiguous_format
        weight = subpixel_weight(conv.weight).to(conv.weight.dtype).contiguous(memory_format=fmt)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())

    def forward(self, hidden_states: torch.Tensor, output_size: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        n, c, h, w = hidden_states.shape
        if output_size is not None and tuple(output_size) != (2 * h, 2 * w):
            return self.original(hidden_states, output_size, *args, **kwargs)
        out = self.out_channels
        y = F.conv2d(hidden_states, self.weight, padding=1)  # (n, 4 * out, h + 1, w + 1)
        phases = [y[:, p * out:(p + 1) * out, a:a + h, b:b + w] for p, (a, b) in enumerate(((0, 0), (0, 1),
                                                                                           (1, 0), (1, 1)))]
        # (n, out, 2 [a], 2 [b], h, w) -> (n, out, h, 2, w, 2) -> (n, out, 2h, 2w)
        z = torch.stack(phases, dim=2).view(n, out, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, out, 2 * h, 2 * w)
        if self.bias is not None:
            z = z + self.bias.view(1, -1, 1, 1)
        if hidden_states.is_contiguous(memory_format=torch.channels_last) and not hidden_states.is_contiguous():
            z = z.contiguous(memory_format=torch.channels_last)  # as the interpolate-then-convolve path leaves it
        return z


def _eligible(module: nn.Module) -> bool:
    conv = _conv(module)
    return (module.use_conv and not module.use_conv_transpose and module.interpolate and module.norm is None
            and type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros")


def convert_upsamplers(model: nn.Module) -> int:
    """Replace every eligible diffusers ``Upsample2D`` in ``model`` by a :class:`SubpixelUpsample2D`; returns how
    many. A convolution wrapped by an adapter (e.g. an unfused LoRA) is refused: converting would drop it."""
    from diffusers.models.upsampling import Upsample2D

    inside = [name for name, m in model.named_modules() if isinstance(m, SubpixelUpsample2D)]
    todo = [(name, m) for name, m in model.named_modules() if type(m) is Upsample2D and m.use_conv
            and not any(name.startswith(prefix + ".") for prefix in inside)]  # not a converted one's original
    for name, module in todo:
        conv = _conv(module)
        if type(conv) is not nn.Conv2d:
            raise InvalidConfigError(f"{name}'s convolution is a {type(conv).__name__}, not a plain Conv2d (an "
                                     f"unfused LoRA adapter?); fuse the LoRA first or choose a level without "
                                     f"subpixel upsampling")
    converted = 0
    for name, module in todo:
        if not _eligible(module):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        if isinstance(parent, nn.ModuleList):
            parent[int(child)] = SubpixelUpsample2D(module)
        else:
            setattr(parent, child, SubpixelUpsample2D(module))
        converted += 1
    return converted
