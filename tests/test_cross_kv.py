"""sdxl_core.cross_kv: cross-attention keys and values once per image give the same UNet output and image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdxl_core.cross_kv import CrossKVCache, _row_runs, flash_attention, install, zero_text_skippable
from sdxl_core.errors import InvalidConfigError
from sdxl_core.flops import unet_inputs
from sdxl_core.generate import GenerationRequest, generate
from sdxl_core.loading import load_pipelines
from sdxl_core.optimize import LEVELS, apply_level

PROMPT = "a majestic wolf in a misty forest at dawn, (oil on canvas)+++, highly detailed"


def _fresh(fused: bool = False):
    pipes = load_pipelines("tiny", "tiny", device="cpu")
    from diffusers.models.attention_processor import AttnProcessor2_0

    for pipe in (pipes.base, pipes.refiner):
        pipe.unet.set_attn_processor(AttnProcessor2_0())
        if fused:
            pipe.fuse_qkv_projections(unet=True, vae=False)
    return pipes


def _inputs(pipes, seed: int = 0):
    unet = pipes.base.unet
    pooled = pipes.base.text_encoder_2.config.projection_dim
    args, kwargs = unet_inputs(unet, 2, 64, 64, pooled, device=torch.device("cpu"), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(args[0].shape, generator=gen)
    hidden = torch.randn(args[2].shape, generator=gen)
    kwargs["added_cond_kwargs"]["text_embeds"] = torch.randn(kwargs["added_cond_kwargs"]["text_embeds"].shape,
                                                             generator=gen)
    return sample, args[1], hidden, kwargs


@pytest.mark.parametrize("fused", [False, True], ids=["separate_kv", "fused_kv"])
def test_unet_output_is_bit_identical(fused):
    pipes = _fresh(fused)
    unet = pipes.base.unet
    sample, t, hidden, kwargs = _inputs(pipes)
    with torch.no_grad():
        ref = unet(sample, t, hidden, **kwargs)[0]
        cache = install(pipes.base, skip_zero_text=False)
        assert pipes.base.unet is cache and cache.unet is unet
        out1 = cache(sample, t, encoder_hidden_states=hidden, **kwargs)[0]
        out2 = cache(sample, t, encoder_hidden_states=hidden, **kwargs)[0]
    assert torch.equal(out1, ref) and torch.equal(out2, ref)
    assert cache.projections_run == 1  # the second step reused the keys and values
    n_cross = sum(1 for m in unet.modules() if getattr(m, "is_cross_attention", False))
    assert len(cache.layers) == n_cross > 0
    assert cache.config is unet.config and cache.dtype == unet.dtype  # the pipeline's view of its UNet


def test_new_text_or_in_place_change_recomputes():
    pipes = _fresh()
    unet = pipes.base.unet
    sample, t, hidden, kwargs = _inputs(pipes)
    other = hidden.clone() * 0.5
    cache = install(pipes.base)
    with torch.no_grad():
        cache(sample, t, hidden, **kwargs)
        b = cache(sample, t, other, **kwargs)[0]
        assert cache.projections_run == 2
        assert torch.equal(b, unet(sample, t, other, **kwargs)[0])
        other.mul_(2.0)  # same object, new contents: the version counter changes
        c = cache(sample, t, other, **kwargs)[0]
        assert cache.projections_run == 3
        assert torch.equal(c, unet(sample, t, other, **kwargs)[0])


def test_image_is_unchanged_through_the_pipelines(fast_settings):
    request = GenerationRequest(PROMPT, 3, settings=fast_settings)
    plain = _fresh(fused=True)
    ref = generate(plain, request)
    cached = _fresh(fused=True)
    caches = [install(cached.base, skip_zero_text=False), install(cached.refiner, skip_zero_text=False)]
    out = generate(cached, request)
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(ref.images[0]))
    assert torch.equal(out.latents, ref.latents)
    assert [c.projections_run for c in caches] == [1, 1]  # once per image per UNet, not once per step
    generate(cached, request)
    assert [c.projections_run for c in caches] == [2, 2]


def test_a_lora_scale_is_applied_to_the_cached_projections(fast_settings, monkeypatch):
    """An unfused PEFT LoRA on to_k/to_v at scales other than 1: the cache scales the layers as the UNet does, and
    only the LoRA layers it runs (the projections), not by walking the whole UNet."""
    import diffusers.utils
    from peft.tuners.tuners_utils import BaseTunerLayer

    from sdxl_core.lora import random_lora_state_dict

    roots = []
    scale = diffusers.utils.scale_lora_layers
    monkeypatch.setattr(diffusers.utils, "scale_lora_layers", lambda model, weight: (roots.append(model),
                                                                                        scale(model, weight)))
    sample, t, hidden, kwargs = None, None, None, None
    results = []
    for use_cache in (False, True):
        pipes = _fresh()
        state = random_lora_state_dict(pipes.base.unet, rank=4, seed=1)
        pipes.base.load_lora_weights(state, adapter_name="t")
        unet = pipes.base.unet
        sample, t, hidden, kwargs = _inputs(pipes)
        model = install(pipes.base) if use_cache else unet
        roots.clear()
        with torch.no_grad():
            for lora_scale in (0.3, 1.0, 0.0, 0.3):
                results.append(model(sample, t, hidden, cross_attention_kwargs={"scale": lora_scale}, **kwargs)[0])
    assert not torch.equal(results[0], results[1]) and not torch.equal(results[0], results[2])  # the scale matters
    for cached, plain in zip(results[4:], results[:4]):
        assert torch.allclose(cached, plain, atol=1e-6, rtol=0)
    kv = [m for attn in model.layers for m in (attn.to_k, attn.to_v)]
    assert all(isinstance(m, BaseTunerLayer) for m in kv)
    assert roots == 3 * kv, "the cache scales the LoRA projections it runs, and nothing else"  # scales 0.3, 0, 0.3

    plain = install(_fresh().base)  # no LoRA: nothing to scale at any scale
    roots.clear()
    with torch.no_grad():
        plain(sample, t, hidden, cross_attention_kwargs={"scale": 0.0}, **kwargs)
    assert roots == [] and plain.projections_run == 1


def test_level_installs_on_both_unets_and_compiles(fast_settings):
    """The `cross_kv` level (fp8 on the CPU, compiled) against the `fp8` level: same image within fp8's noise."""
    request = GenerationRequest(PROMPT, 3, settings=fast_settings)
    outs = {}
    for name in ("fp8", "cross_kv", "lean"):
        level = LEVELS[name]
        from dataclasses import replace

        level = replace(level, compile_mode="default", compile_text_encoders=False)  # no CUDA graphs on a CPU
        pipes = load_pipelines("tiny", "tiny", device="cpu", dtype=level.torch_dtype)
        apply_level(pipes, level)
        outs[name] = generate(pipes, request)
        if name == "cross_kv":
            assert isinstance(pipes.base.unet, CrossKVCache) and isinstance(pipes.refiner.unet, CrossKVCache)
            assert pipes.kernel_backends["cross_kv_layers"] == len(pipes.base.unet.layers) + len(
                pipes.refiner.unet.layers)
            assert pipes.base.unet.zero_rows == (0,)  # compiled with the unconditional row skipped
            assert pipes.kernel_backends["cross_kv_skip_zero_text"] == [True, True]
        flash = [attn.processor.flash for pipe in (pipes.base, pipes.refiner)
                 for attn in getattr(pipe.unet, "layers", [])]
        assert flash == [] if name == "fp8" else (flash and all(flash) == (name == "lean"))
        assert pipes.kernel_backends.get("cross_attention") == {"fp8": None, "cross_kv": "sdpa", "lean": "flash"}[name]
        from sdxl_core.subpixel import SubpixelUpsample2D

        unets = [getattr(pipe.unet, "unet", pipe.unet) for pipe in (pipes.base, pipes.refiner)]
        subpixel = sum(isinstance(m, SubpixelUpsample2D) for model in (*unets, pipes.base.vae) for m in model.modules())
        if name == "lean":
            assert subpixel > 0 and pipes.kernel_backends["subpixel_upsamplers"] == subpixel
        else:
            assert subpixel == 0 and "subpixel_upsamplers" not in pipes.kernel_backends
        vae_processors = {type(p).__name__ for p in pipes.base.vae.attn_processors.values()}
        assert vae_processors == ({"AttnProcessor"} if name == "lean" else {"FusedAttnProcessor2_0"})
    from sdxl_core.numerics import image_psnr

    assert image_psnr(outs["cross_kv"].images[0], outs["fp8"].images[0]) > 40.0
    # other kernels for the same products: the same image within bf16's rounding (the fp8 noise is shared)
    assert image_psnr(outs["lean"].images[0], outs["cross_kv"].images[0]) > 40.0


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_flash_attention_is_sdpa(dtype, tol):
    """Fresh random inputs in the cross-attention's layout (keys and values split from one packed tensor, so
    their rows are strided): FlashAttention computes SDPA's function, against a float64 reference."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    for batch, heads, tokens, keys, dim in ((2, 4, 64, 77, 32), (1, 2, 17, 5, 64)):
        q = torch.randn(batch, tokens, heads * dim, generator=gen).to(dtype)
        kv = torch.randn(batch, keys, 2 * heads * dim, generator=gen).to(dtype)
        k, v = torch.split(kv, heads * dim, dim=-1)
        q, k, v = (x.view(batch, -1, heads, dim).transpose(1, 2) for x in (q, k, v))
        out = flash_attention(q, k, v)
        ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
        assert out.shape == ref.shape and out.dtype == dtype
        assert torch.linalg.norm(out.double() - ref) / torch.linalg.norm(ref) < tol


def test_refusals():
    pipes = _fresh()
    install(pipes.base)
    with pytest.raises(InvalidConfigError, match="already has a cross K/V cache"):
        install(pipes.base)
    from dataclasses import replace

    with pytest.raises(InvalidConfigError, match="attends with SDPA; set sdpa=True"):
        replace(LEVELS["eager"], cache_cross_kv=True)


def test_the_stand_in_copies_like_a_module():
    """deepcopy goes through object creation without attributes; the forwarding must not recurse there."""
    import copy

    pipes = _fresh()
    cache = install(pipes.base)
    sample, t, hidden, kwargs = _inputs(pipes)
    clone = copy.deepcopy(cache)
    assert clone.unet is not cache.unet and clone.config == cache.config
    with torch.no_grad():
        assert torch.equal(clone(sample, t, hidden, **kwargs)[0], cache(sample, t, hidden, **kwargs)[0])
    with pytest.raises(AttributeError):
        cache.no_such_attribute



def test_row_runs():
    assert _row_runs(2, (0,)) == [(0, 1, False), (1, 2, True)]
    assert _row_runs(8, (0, 1, 2, 3)) == [(0, 4, False), (4, 8, True)]
    assert _row_runs(4, (1, 2)) == [(0, 1, True), (1, 3, False), (3, 4, True)]
    assert _row_runs(3, ()) == [(0, 3, True)]


def _to_q_batches(unet):
    """Batch sizes the cross-attention query projections see, recorded by hooks."""
    seen = []
    for m in unet.modules():
        if getattr(m, "is_cross_attention", False):
            m.to_q.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    return seen


@pytest.mark.parametrize("fused", [False, True], ids=["separate_kv", "fused_kv"])
def test_zero_text_rows_skip_cross_attention(fused):
    """The unconditional half of a guided step without a negative prompt has all-zero text embeddings: its
    cross-attention output is to_out's bias whatever the query, so the cache skips those rows."""
    pipes = _fresh(fused)
    unet = pipes.base.unet
    sample, t, hidden, kwargs = _inputs(pipes)
    hidden[0] = 0.0  # row 0: the unconditional half
    with torch.no_grad():
        ref = unet(sample, t, hidden, **kwargs)[0]
        cache = install(pipes.base)
        assert cache.skip_zero_text
        seen = _to_q_batches(unet)
        out = cache(sample, t, hidden, **kwargs)[0]
    assert cache.zero_rows == (0,)
    assert seen and set(seen) == {1}  # every cross-attention query projected one row, not two
    # the kept row's GEMMs run with half the rows, so float32 rounding may differ in the last bits
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5), (out - ref).abs().max()
    rows = cache.zero_rows
    with torch.no_grad():
        cache(sample, t, hidden.clone(), **kwargs)  # new text, same zero rows: the same tuple object
    assert cache.zero_rows is rows
    with torch.no_grad():
        full = torch.randn_like(hidden)
        out2 = cache(sample, t, full, **kwargs)[0]
        assert cache.zero_rows == ()
        assert torch.equal(out2, unet(sample, t, full, **kwargs)[0])


def test_zero_text_skip_needs_bias_free_keys_and_values():
    pipes = _fresh()
    unet = pipes.base.unet
    layer = next(m for m in unet.modules() if getattr(m, "is_cross_attention", False))
    assert zero_text_skippable(layer)
    biased = torch.nn.Linear(layer.to_k.in_features, layer.to_k.out_features, bias=True)
    layer.to_k = biased
    assert not zero_text_skippable(layer)
    cache = install(pipes.base)
    assert cache.skip_zero_text is False
    sample, t, hidden, kwargs = _inputs(pipes)
    hidden[0] = 0.0
    with torch.no_grad():
        ref = unet(sample, t, hidden, **kwargs)[0]
        out = cache(sample, t, hidden, **kwargs)[0]
    assert cache.zero_rows == () and torch.equal(out, ref)


def test_zero_text_rows_with_a_lora_and_through_the_pipelines(fast_settings):
    """An unfused LoRA maps zeros to zeros, so the skip holds; and the base+refiner image without a negative
    prompt (zeros for the base's unconditional half) matches the uncached pipelines."""
    from sdxl_core.lora import random_lora_state_dict

    pipes = _fresh()
    pipes.base.load_lora_weights(random_lora_state_dict(pipes.base.unet, rank=4, seed=1), adapter_name="t")
    layer = next(m for m in pipes.base.unet.modules() if getattr(m, "is_cross_attention", False))
    assert hasattr(layer.to_out[0], "base_layer") and zero_text_skippable(layer)  # a PEFT wrapper

    request = GenerationRequest(PROMPT, 3, settings=fast_settings)
    ref = generate(_fresh(fused=True), request)
    cached = _fresh(fused=True)
    caches = [install(cached.base), install(cached.refiner)]
    out = generate(cached, request)
    assert caches[0].zero_rows == (0,)
    assert np.abs(np.asarray(out.images[0], dtype=int) - np.asarray(ref.images[0], dtype=int)).max() <= 1
    assert torch.allclose(out.latents, ref.latents, rtol=1e-4, atol=1e-4)


def test_flash_cross_attention_refuses_head_dims_flash_attention_2_does_not_take():
    from sdxl_core.optimize import _check_flash_head_dim

    pipes = _fresh()
    cache = install(pipes.base)
    attn = cache.layers[0]
    head_dim = attn.processor.width // 2 // attn.heads
    assert head_dim % 8 == 0 and head_dim <= 256
    _check_flash_head_dim(attn, torch.device("cuda"))  # the tiny model's head dim passes
    attn.heads = attn.processor.width // 2 // 4  # head dim 4: refused on CUDA, fine on the CPU's flash kernel
    with pytest.raises(InvalidConfigError, match="multiples of 8 up to 256.*without flash_cross_attention"):
        _check_flash_head_dim(attn, torch.device("cuda"))
    _check_flash_head_dim(attn, torch.device("cpu"))
