"""sdxl_core.fp8: row-wise scaled e4m3 linear layers, checked against a float reference of the same arithmetic."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sdxl_core.errors import InvalidConfigError
from sdxl_core.fp8 import FP8_DTYPE, FP8_MAX, Fp8Linear, check_fp8_device, convert_geglu_projections, quantize_rowwise


def _linear(k: int = 64, n: int = 96, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(torch.bfloat16)


def test_quantize_rowwise_round_trip():
    torch.manual_seed(0)
    x = torch.randn(16, 32) * torch.logspace(-3, 3, 16).unsqueeze(1)  # rows six decades apart
    x[3] = 0.0
    values, scale = quantize_rowwise(x)
    assert values.dtype == FP8_DTYPE and scale.shape == (16, 1) and scale.dtype == torch.float32
    # each row's largest magnitude lands on e4m3's largest value, whatever the row's own range
    assert torch.equal(values.float().abs().amax(dim=1)[x.abs().amax(dim=1) > 0], torch.full((15,), FP8_MAX))
    back = values.float() * scale
    assert torch.equal(back[3], torch.zeros(32))
    rel = (back - x).abs().amax(dim=1) / x.abs().amax(dim=1).clamp(min=1e-30)
    assert rel[x.abs().amax(dim=1) > 0].max() <= 2 ** -4  # e4m3: 3 mantissa bits, half an ulp of the top binade


@pytest.mark.parametrize("bias", [True, False])
def test_fp8_linear_matches_its_float_reference(bias):
    """The layer computes (q(x) * sx) @ (q(W) * sw)^T + b: compare with that product done in float64."""
    linear = _linear(bias=bias)
    layer = Fp8Linear.from_linear(linear)
    x = torch.randn(2, 5, 64, dtype=torch.bfloat16)
    out = layer(x)
    assert out.shape == (2, 5, 96) and out.dtype == torch.bfloat16

    xq, xs = quantize_rowwise(x.reshape(-1, 64))
    wq, ws = quantize_rowwise(linear.weight)
    ref = (xq.double() * xs.double()) @ (wq.double() * ws.double()).t()
    if bias:
        ref = ref + linear.bias.double()
    err = (out.reshape(-1, 96).double() - ref).abs().max().item()
    assert err <= 2 ** -7 * ref.abs().max().item()  # only the bf16 rounding of the output remains
    assert torch.equal(layer.dequantized_weight(), wq.float() * ws)


def test_fp8_linear_is_close_to_the_bf16_linear():
    linear = _linear(k=640, n=512)
    layer = Fp8Linear.from_linear(linear)
    x = torch.randn(64, 640, dtype=torch.bfloat16)
    exact = x.double() @ linear.weight.double().t() + linear.bias.double()
    rel = ((layer(x).double() - exact).norm() / exact.norm()).item()
    rel_bf16 = ((linear(x).double() - exact).norm() / exact.norm()).item()
    assert rel_bf16 < rel < 0.05, (rel, rel_bf16)  # coarser than bf16, within a few per cent


def test_fp8_linear_keeps_no_bf16_weight():
    layer = Fp8Linear.from_linear(_linear())
    assert not list(layer.parameters())
    assert {k: v.dtype for k, v in layer.state_dict().items()} == {
        "weight_fp8": FP8_DTYPE, "weight_scale": torch.float32, "bias": torch.bfloat16}
    assert "fp8" in repr(layer)


def _geglu_block() -> nn.Module:
    from diffusers.models.attention import FeedForward

    torch.manual_seed(0)
    return nn.Sequential(FeedForward(32, activation_fn="geglu"), FeedForward(32, activation_fn="geglu")).to(
        torch.bfloat16)


def test_convert_geglu_projections_converts_each_once():
    block = _geglu_block()
    x = torch.randn(3, 7, 32, dtype=torch.bfloat16)
    before = block(x)
    assert convert_geglu_projections(block) == 2
    assert convert_geglu_projections(block) == 0  # already converted
    after = block(x)
    assert isinstance(block[0].net[0].proj, Fp8Linear) and isinstance(block[0].net[2], nn.Linear)
    assert ((after.float() - before.float()).norm() / before.float().norm()).item() < 0.1


def test_convert_refuses_a_wrapped_projection():
    class Wrapped(nn.Module):
        def __init__(self, inner: nn.Linear):
            super().__init__()
            self.base_layer = inner

    block = _geglu_block()
    block[1].net[0].proj = Wrapped(block[1].net[0].proj)
    with pytest.raises(InvalidConfigError, match=r"1\.net\.0\.proj is a Wrapped.*fuse the LoRA first"):
        convert_geglu_projections(block)
    assert type(block[0].net[0].proj) is nn.Linear  # nothing converted before the refusal


def test_check_fp8_device():
    check_fp8_device(torch.device("cpu"))
    with pytest.raises(InvalidConfigError, match="not meta; choose a level without fp8"):
        check_fp8_device(torch.device("meta"))


def test_check_fp8_device_refuses_a_cpu_build_without_rowwise_scales(monkeypatch):
    """torch 2.11's CPU build asserts "_scaled_mm only supports per-tensor scaling" at the first row-wise product
    (seen with the GPU image's versions, reports/gpu/NOTES.md); the check, which apply_level makes before it
    converts any layer, refuses such a build with the fixes."""
    def per_tensor_only(a, b, scale_a=None, scale_b=None, **kwargs):
        if scale_a.numel() != 1 or scale_b.numel() != 1:
            raise RuntimeError("(scale_a.numel() == 1 && scale_b.numel() == 1) INTERNAL ASSERT FAILED at "
                               "\"Linear.cpp\":516. Now _scaled_mm only supports per-tensor scaling for CPU backend.")
        return (a.float() @ b.float() * scale_a * scale_b).to(kwargs["out_dtype"])

    monkeypatch.setattr(torch, "_scaled_mm", per_tensor_only)
    with pytest.raises(InvalidConfigError, match=r"CPU _scaled_mm takes no row-wise scales \(\(scale_a.*run the fp8 "
                                                 r"levels on CUDA.*choose a level without fp8"):
        check_fp8_device(torch.device("cpu"))


def test_fp8_geglu_compiles_fullgraph():
    """The fp8 level compiles the UNets with fullgraph=True: a converted FeedForward must trace without graph
    breaks (inductor on the CPU here; the CUDA lowering is checked by the GPU run) and give the eager result."""
    block = _geglu_block()
    convert_geglu_projections(block)
    x = torch.randn(2, 16, 32, dtype=torch.bfloat16)
    # Inference only, as diffusers' pipelines call the UNet (under no_grad): _scaled_mm has no derivative.
    with torch.no_grad():
        eager = block(x)
        torch._dynamo.reset()
        compiled = torch.compile(block, fullgraph=True, dynamic=False)(x)
    assert compiled.dtype == torch.bfloat16
    assert (compiled.float() - eager.float()).abs().max().item() <= 2 ** -6 * eager.float().abs().max().item()
