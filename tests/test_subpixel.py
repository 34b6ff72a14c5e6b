"""sdxl_core.subpixel: nearest 2x upsampling + 3x3 convolution as a 2x2 convolution at the input's resolution."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.upsampling import Upsample2D
from torch import nn

from sdxl_core.errors import InvalidConfigError
from sdxl_core.subpixel import SubpixelUpsample2D, convert_upsamplers, subpixel_weight


def _seed() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))


def _upsampler(cin: int, cout: int, gen: torch.Generator, name: str = "conv", bias: bool = True) -> Upsample2D:
    up = Upsample2D(cin, use_conv=True, out_channels=cout, name=name, bias=bias).double()
    for p in up.parameters():
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return up


@pytest.mark.parametrize("name, bias", [("conv", True), ("Conv2d_0", False)])
@pytest.mark.parametrize("h, w", [(5, 7), (8, 8), (1, 3)])
def test_same_function_as_upsample_then_convolve(name, bias, h, w):
    """Fresh random weights and inputs, float64: equal to diffusers' layer up to float64 rounding."""
    gen = _seed()
    up = _upsampler(6, 5, gen, name, bias)
    x = torch.randn(2, 6, h, w, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        ref = up(x)
        out = SubpixelUpsample2D(up)(x)
    assert out.shape == ref.shape == (2, 5, 2 * h, 2 * w)
    assert torch.allclose(out, ref, rtol=0, atol=1e-11 * ref.abs().max())


def _layers_and_input(cin: int, cout: int, h: int, w: int) -> tuple[Upsample2D, SubpixelUpsample2D, torch.Tensor]:
    gen = _seed()
    up = _upsampler(cin, cout, gen)
    return up, SubpixelUpsample2D(up), torch.randn(1, cin, h, w, generator=gen, dtype=torch.float64)


def test_a_wrong_tap_assignment_is_caught():
    """The check above can fail: summing the taps the other way round (odd rows on (0, 1+2)) gives another function."""
    up, sub, x = _layers_and_input(3, 4, 6, 6)
    with torch.no_grad():
        good = (sub(x) - up(x)).abs().max()
        sub.weight.copy_(subpixel_weight(up.conv.weight.flip(2)))  # kernel rows reversed: taps summed wrongly
        bad = (sub(x) - up(x)).abs().max()
    assert good < 1e-10 < 1e-2 < bad


def test_other_output_sizes_run_the_original_layer():
    up, sub, x = _layers_and_input(3, 3, 4, 5)
    with torch.no_grad():
        assert torch.equal(sub(x, (9, 11)), up(x, (9, 11)))
        assert torch.allclose(sub(x, (8, 10)), up(x), rtol=0, atol=1e-10)


def test_bf16_channels_last_stays_within_rounding():
    gen = _seed()
    up = _upsampler(16, 8, gen)
    x = torch.randn(2, 16, 9, 9, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        ref = up(x)
        low = up.to(torch.bfloat16).to(memory_format=torch.channels_last)
        sub = SubpixelUpsample2D(low)
        assert sub.weight.dtype == torch.bfloat16 and sub.weight.is_contiguous(memory_format=torch.channels_last)
        out = sub(x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last))
        plain = low(x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last) == plain.is_contiguous(
        memory_format=torch.channels_last) == True  # noqa: E712: the layout the next layers get is unchanged
    rel = lambda a: float(torch.linalg.norm(a.double() - ref) / torch.linalg.norm(ref))  # noqa: E731
    assert rel(out) < 2e-2 and rel(plain) < 2e-2  # both bf16 paths are bf16-close to float64


def test_convert_upsamplers_on_the_tiny_unet_and_vae():
    from sdxl_core.flops import unet_inputs
    from sdxl_core.loading import load_pipelines

    pipes = load_pipelines("tiny", "tiny", device="cpu")
    unet, vae = pipes.base.unet, pipes.base.vae
    n_unet = sum(type(m) is Upsample2D and m.use_conv for m in unet.modules())
    n_vae = sum(type(m) is Upsample2D and m.use_conv for m in vae.modules())
    pooled = pipes.base.text_encoder_2.config.projection_dim
    args, kwargs = unet_inputs(unet, 2, 64, 64, pooled, device=torch.device("cpu"), dtype=torch.float32)
    gen = _seed()
    sample = torch.randn(args[0].shape, generator=gen)
    hidden = torch.randn(args[2].shape, generator=gen)
    latents = torch.randn(1, vae.config.latent_channels, 8, 8, generator=gen)
    with torch.no_grad():
        ref = unet(sample, args[1], hidden, **kwargs)[0]
        ref_image = vae.decode(latents).sample
        assert convert_upsamplers(unet) == n_unet > 0 and convert_upsamplers(vae) == n_vae > 0
        assert convert_upsamplers(unet) == 0  # nothing left, and the kept originals are not converted again
        out = unet(sample, args[1], hidden, **kwargs)[0]
        image = vae.decode(latents).sample
    assert sum(isinstance(m, SubpixelUpsample2D) for m in unet.modules()) == n_unet
    assert float(torch.linalg.norm(out - ref) / torch.linalg.norm(ref)) < 1e-5
    assert float(torch.linalg.norm(image - ref_image) / torch.linalg.norm(ref_image)) < 1e-5


def test_an_adapter_wrapped_convolution_is_refused():
    class Wrapped(nn.Conv2d):
        pass

    gen = _seed()
    model = nn.Sequential(_upsampler(3, 3, gen))
    old = model[0].conv
    model[0].conv = Wrapped(3, 3, 3, padding=1).double()
    with pytest.raises(InvalidConfigError, match="not a plain Conv2d.*fuse the LoRA first"):
        convert_upsamplers(model)
    model[0].conv = old
    assert convert_upsamplers(model) == 1 and isinstance(model[0], SubpixelUpsample2D)
