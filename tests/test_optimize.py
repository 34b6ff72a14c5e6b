"""sdxl_core.optimize: the levels are cumulative recipes, and each one keeps the tiny image close to fp32."""

from __future__ import annotations

from dataclasses import fields, replace

import pyparsing
import pytest
import torch

from sdxl_core.errors import InvalidConfigError
from sdxl_core.generate import GenerationRequest, generate
from sdxl_core.host_work import is_pinned
from sdxl_core.loading import load_pipelines
from sdxl_core.numerics import image_psnr
from sdxl_core.optimize import LEVELS, OptimizationLevel, apply_level, get_level, set_kernel_backends

ORDER = ["eager", "sdpa", "vae_no_upcast", "bf16", "channels_last", "fused_qkv", "cudnn", "compile", "cudagraphs",
         "max", "fp8", "cross_kv", "host", "lean", "lean_host"]
EAGER_LEVELS = ORDER[:7]  # no torch.compile: fine on a CPU
PROMPT = "a majestic wolf in a misty forest at dawn, (oil on canvas)+++, highly detailed"
SEED = 3
# PSNR of each level's tiny 64x64 image against the fp32 image of the same seed. Measured on CPU over seeds
# 0-3: fp16 levels 55.1-56.9 dB, bf16 levels 41.1-44.5 dB; the bounds leave ~10 and ~6 dB of margin.
MIN_PSNR_DB = {torch.float16: 45.0, torch.bfloat16: 35.0}
# fp8 GEGLU projections (no compile), same seeds: 38.2-42.8 dB against fp32, 39.6-41.5 dB against the bf16
# recipe without fp8; the bound leaves ~6 dB of margin. Above 60 dB would mean the fp8 path did nothing.
MIN_PSNR_DB_FP8 = 32.0


def test_get_level():
    assert get_level("eager") is LEVELS["eager"]
    with pytest.raises(InvalidConfigError, match=r"unknown optimisation level 'nope'; choose from eager, sdpa"):
        get_level("nope")


def test_levels_are_in_order():
    assert list(LEVELS)[: len(ORDER)] == ORDER
    assert all(name == level.name for name, level in LEVELS.items())


def test_kernel_backends_do_not_leak_between_levels():
    """PyTorch's SDPA order and cuDNN autotuning are process-wide: each level sets them all, so a level that
    changed them leaves nothing behind for the next."""
    cpu = torch.device("cpu")
    default = set_kernel_backends(LEVELS["eager"], cpu, torch.float32)
    try:
        from torch.nn.attention import _sdpa_kernel, SDPBackend

        _sdpa_kernel([SDPBackend.MATH, SDPBackend.CUDNN_ATTENTION], set_priority=True)
        torch.backends.cudnn.benchmark = True
        chosen = set_kernel_backends(LEVELS["max"], cpu, torch.float32)
        assert chosen["cudnn_attention_probe"] == "not applicable on cpu"
        assert chosen["prompt_parser_packrat"] is True and pyparsing.ParserElement._packratEnabled
        assert chosen["sdpa_priority"] == default["sdpa_priority"]
        assert torch.backends.cudnn.benchmark is False
        assert set_kernel_backends(LEVELS["eager"], cpu, torch.float32) == default
        assert default["prompt_parser_packrat"] is False and not pyparsing.ParserElement._packratEnabled
        assert [SDPBackend(i).name for i in torch._C._get_sdp_priority_order()] == default["sdpa_priority"]
    finally:
        set_kernel_backends(LEVELS["eager"], cpu, torch.float32)


def _recipe_fields() -> list[str]:
    """Every field of a level that is part of its recipe (not its name, description or the LoRA switch)."""
    return [f.name for f in fields(OptimizationLevel) if f.name not in ("name", "description", "fuse_lora")]


def test_levels_are_cumulative():
    """Each level keeps everything the previous level changed from eager, and changes something more."""
    names = list(LEVELS)
    eager = LEVELS[names[0]]
    assert eager.name == "eager"
    for prev, cur in zip((LEVELS[n] for n in names), (LEVELS[n] for n in names[1:])):
        prev_on = {f for f in _recipe_fields() if getattr(prev, f) != getattr(eager, f)}
        cur_on = {f for f in _recipe_fields() if getattr(cur, f) != getattr(eager, f)}
        assert prev_on <= cur_on, (cur.name, prev_on - cur_on)
        changed = [f for f in _recipe_fields() if getattr(prev, f) != getattr(cur, f)]
        assert changed, f"{cur.name} is the same recipe as {prev.name}"
        if cur_on == prev_on:  # only a value changed, e.g. compile_mode default -> reduce-overhead
            assert changed == ["compile_mode"], (cur.name, changed)
        assert not cur.fuse_lora
        # booleans only ever switch one way along the ladder
        for f in ("sdpa", "channels_last", "fused_qkv", "cudnn", "fp8_geglu", "packrat_parser", "cache_cross_kv",
                  "images_on_device", "pin_execution_device", "cache_empty_negative", "fast_prompt_parse",
                  "flash_cross_attention", "vae_classic_attention", "subpixel_upsample", "text_encoder_graphs",
                  "skip_builtin_module_guards", "sync_free_compel", "sync_free_stage_starts"):
            assert getattr(cur, f) >= getattr(prev, f), (cur.name, f)
        assert cur.vae_upcast <= prev.vae_upcast
        if prev.compile_mode is not None:
            assert cur.compile_mode is not None


FLAGS = ("dtype", "sdpa", "channels_last", "fused_qkv", "vae_upcast", "cudnn", "compile_mode", "fp8_geglu",
         "packrat_parser", "cache_cross_kv", "images_on_device")


def test_level_flag_progression():
    table = {n: tuple(getattr(LEVELS[n], f) for f in FLAGS) for n in ORDER}
    assert table == {
        "eager": ("float16", False, False, False, True, False, None, False, False, False, False),
        "sdpa": ("float16", True, False, False, True, False, None, False, False, False, False),
        "vae_no_upcast": ("float16", True, False, False, False, False, None, False, False, False, False),
        "bf16": ("bfloat16", True, False, False, False, False, None, False, False, False, False),
        "channels_last": ("bfloat16", True, True, False, False, False, None, False, False, False, False),
        "fused_qkv": ("bfloat16", True, True, True, False, False, None, False, False, False, False),
        "cudnn": ("bfloat16", True, True, True, False, True, None, False, False, False, False),
        "compile": ("bfloat16", True, True, True, False, True, "default", False, False, False, False),
        "cudagraphs": ("bfloat16", True, True, True, False, True, "reduce-overhead", False, False, False, False),
        "max": ("bfloat16", True, True, True, False, True, "reduce-overhead", False, True, False, False),
        "fp8": ("bfloat16", True, True, True, False, True, "reduce-overhead", True, True, False, False),
        "cross_kv": ("bfloat16", True, True, True, False, True, "reduce-overhead", True, True, True, False),
        "host": ("bfloat16", True, True, True, False, True, "reduce-overhead", True, True, True, True),
        "lean": ("bfloat16", True, True, True, False, True, "reduce-overhead", True, True, True, True),
        "lean_host": ("bfloat16", True, True, True, False, True, "reduce-overhead", True, True, True, True),
    }
    assert LEVELS["max"].compile_text_encoders and LEVELS["max"].share_text_embeddings
    assert {n for n in ORDER if LEVELS[n].pin_execution_device} == {"host", "lean", "lean_host"}
    assert {n for n in ORDER if LEVELS[n].cache_empty_negative} == {"host", "lean", "lean_host"}
    assert {n for n in ORDER if LEVELS[n].fast_prompt_parse} == {"host", "lean", "lean_host"}
    assert {n for n in ORDER if LEVELS[n].flash_cross_attention} == {"lean", "lean_host"}
    assert {n for n in ORDER if LEVELS[n].vae_classic_attention} == {"lean", "lean_host"}
    assert {n for n in ORDER if LEVELS[n].subpixel_upsample} == {"lean", "lean_host"}
    assert {n for n in ORDER if LEVELS[n].text_encoder_graphs} == {"lean_host"}
    assert {n for n in ORDER if LEVELS[n].skip_builtin_module_guards} == {"lean_host"}
    assert {n for n in ORDER if LEVELS[n].sync_free_compel} == {"lean_host"}
    assert {n for n in ORDER if LEVELS[n].sync_free_stage_starts} == {"lean_host"}
    assert LEVELS["bf16"].torch_dtype == torch.bfloat16 and LEVELS["eager"].torch_dtype == torch.float16


@pytest.mark.parametrize("changes, hint", [
    (dict(dtype="float8"), "unknown dtype"),
    (dict(compile_mode="fast"), "compile_mode must be one of"),
    (dict(sdpa=False, fused_qkv=True), "fused QKV projections use SDPA"),
    (dict(fp8_geglu=True), "fp8 GEGLU projections write bf16 outputs"),
    (dict(flash_cross_attention=True), "set cache_cross_kv=True"),
    (dict(sdpa=True, cache_cross_kv=True, flash_cross_attention=True, dtype="float32"), "takes fp16 or bf16"),
])
def test_invalid_levels(changes, hint):
    with pytest.raises(InvalidConfigError, match=hint):
        replace(LEVELS["eager"], **changes)


@pytest.fixture(scope="module")
def fp32_image(tiny_pipes, fast_settings):
    return generate(tiny_pipes, GenerationRequest(PROMPT, SEED, settings=fast_settings)).images[0]


def _processors(module) -> set[str]:
    return {type(p).__name__ for p in module.attn_processors.values()}


@pytest.mark.parametrize("name", EAGER_LEVELS)
def test_apply_level_on_tiny(name, fast_settings, fp32_image):
    level = get_level(name)
    pipes = load_pipelines("tiny", "tiny", device="cpu")  # our own: apply_level changes them in place
    assert apply_level(pipes, level) is pipes

    modules = [pipes.base.unet, pipes.refiner.unet, pipes.base.vae, pipes.base.text_encoder,
               pipes.base.text_encoder_2]
    assert all(m.dtype == level.torch_dtype for m in modules)
    expected = {"FusedAttnProcessor2_0"} if level.fused_qkv else \
        {"AttnProcessor2_0"} if level.sdpa else {"AttnProcessor"}
    for m, conv in ((pipes.base.unet, pipes.base.unet.conv_in), (pipes.refiner.unet, pipes.refiner.unet.conv_in),
                    (pipes.base.vae, pipes.base.vae.decoder.conv_in)):
        assert _processors(m) == expected, m.__class__.__name__
        assert conv.weight.is_contiguous(memory_format=torch.channels_last) == level.channels_last
    assert pipes.base.vae.config.force_upcast == level.vae_upcast
    assert pipes.share_text_embeddings == level.share_text_embeddings
    assert pipes.images_on_device == level.images_on_device
    assert is_pinned(pipes.base) == is_pinned(pipes.refiner) == level.pin_execution_device
    assert (pipes.empty_negative is not None) == level.cache_empty_negative
    assert pipes.fast_prompt_parse == level.fast_prompt_parse
    assert pipes.sync_free_compel == level.sync_free_compel
    assert pipes.refiner.vae is pipes.base.vae and pipes.refiner.text_encoder_2 is pipes.base.text_encoder_2

    out = generate(pipes, GenerationRequest(PROMPT, SEED, settings=fast_settings))
    assert out.latents.dtype == level.torch_dtype
    psnr = image_psnr(out.images[0], fp32_image)
    assert psnr >= MIN_PSNR_DB[level.torch_dtype], f"{name}: {psnr:.1f} dB against fp32"


def test_apply_level_without_refiner():
    pipes = load_pipelines("tiny", device="cpu")
    apply_level(pipes, get_level("fused_qkv"))
    assert pipes.refiner is None
    assert _processors(pipes.base.unet) == {"FusedAttnProcessor2_0"}
    assert pipes.dtype == torch.bfloat16


def test_apply_level_fuses_a_lora_into_the_unet(fast_settings):
    """fuse_lora folds the LoRA into the base UNet's weights: same image as the unfused LoRA (fp32, so the
    comparison is not drowned in rounding: measured LoRA effect 54.8 dB / latents rel 6e-3, fused vs
    unfused 89 dB / rel 2e-6), and no adapter is left behind."""
    from sdxl_core.lora import random_lora_state_dict
    from sdxl_core.numerics import relative_l2

    pipes = load_pipelines("tiny", "tiny", device="cpu")
    request = GenerationRequest(PROMPT, SEED, lora_scale=1.0, settings=fast_settings)
    plain = generate(pipes, request)  # no adapter loaded yet: the scale does nothing
    pipes.base.load_lora_weights(random_lora_state_dict(pipes.base.unet, rank=4, seed=0), adapter_name="bench")
    assert pipes.base.get_list_adapters() == {"unet": ["bench"]}
    unfused = generate(pipes, request)
    level = OptimizationLevel("fp32_fused_lora", "test", dtype="float32", sdpa=True, fuse_lora=True)
    apply_level(pipes, level)
    assert not pipes.base.get_list_adapters()
    assert not any("lora" in name for name, _ in pipes.base.unet.named_parameters())
    fused = generate(pipes, request)

    effect = relative_l2(unfused.latents, plain.latents)
    assert effect > 1e-3 and image_psnr(unfused.images[0], plain.images[0]) < 70  # the LoRA does something
    assert relative_l2(fused.latents, unfused.latents) < 0.05 * effect
    assert image_psnr(fused.images[0], unfused.images[0]) > 70


def test_fp8_geglu_on_tiny(fast_settings, fp32_image):
    """The fp8 recipe without torch.compile (``cudnn`` + fp8 GEGLU projections) runs on the CPU's _scaled_mm:
    every GEGLU projection of both UNets is converted, and the image stays close to fp32 and to the same
    recipe in bf16, yet differs from the bf16 recipe (the fp8 products did run)."""
    from sdxl_core.fp8 import Fp8Linear

    level = replace(LEVELS["cudnn"], name="fp8_eager", description="test", fp8_geglu=True)
    bf16 = load_pipelines("tiny", "tiny", device="cpu")
    apply_level(bf16, LEVELS["cudnn"])
    ref = generate(bf16, GenerationRequest(PROMPT, SEED, settings=fast_settings))

    pipes = load_pipelines("tiny", "tiny", device="cpu")
    n_geglu = sum(type(m).__name__ == "GEGLU" for u in (pipes.base.unet, pipes.refiner.unet) for m in u.modules())
    apply_level(pipes, level)
    assert n_geglu > 0 and pipes.kernel_backends["fp8_geglu_layers"] == n_geglu
    projs = [m.proj for u in (pipes.base.unet, pipes.refiner.unet) for m in u.modules() if type(m).__name__ == "GEGLU"]
    assert all(isinstance(p, Fp8Linear) for p in projs)
    out = generate(pipes, GenerationRequest(PROMPT, SEED, settings=fast_settings))
    assert out.latents.dtype == torch.bfloat16 and torch.isfinite(out.latents).all()
    assert image_psnr(out.images[0], fp32_image) >= MIN_PSNR_DB_FP8
    assert MIN_PSNR_DB_FP8 <= image_psnr(out.images[0], ref.images[0]) < 60


@pytest.mark.slow
def test_compile_level_on_cpu(fast_settings, fp32_image):
    """torch.compile (inductor) of the tiny UNets and VAE decoder on the CPU: minutes, so opt-in."""
    pipes = load_pipelines("tiny", "tiny", device="cpu")
    apply_level(pipes, get_level("compile"))
    out = generate(pipes, GenerationRequest(PROMPT, SEED, settings=fast_settings))
    assert image_psnr(out.images[0], fp32_image) >= MIN_PSNR_DB[torch.bfloat16]


@pytest.mark.parametrize("name, decode_dtype", [("sdpa", torch.float32), ("vae_no_upcast", torch.float16),
                                                ("bf16", torch.bfloat16)])
def test_vae_upcast_is_what_the_level_says(fast_settings, name, decode_dtype):
    """fp16 levels before vae_no_upcast decode in fp32 (the stock VAE's upcast); vae_no_upcast decodes in fp16;
    bf16 never upcasts."""
    pipes = load_pipelines("tiny", "tiny", device="cpu")
    apply_level(pipes, get_level(name))
    seen = []
    handle = pipes.base.vae.decoder.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    try:
        generate(pipes, GenerationRequest(PROMPT, SEED, settings=fast_settings))
    finally:
        handle.remove()
    assert seen == [decode_dtype]


def test_lean_host_drops_builtin_module_guards_and_still_recompiles_when_the_zero_rows_change(fast_settings):
    """The guards on PyTorch's built-in modules go; those on diffusers' and sdxl-bench's own objects stay. A negative
    prompt takes away the zero text rows the first graphs were compiled to skip: the kept guards on the cross K/V
    processors must recompile, or the images would be the no-negative graph's."""
    level = replace(LEVELS["lean_host"], compile_mode="default", compile_text_encoders=False)  # no CUDA graphs here
    pipes = load_pipelines("tiny", "tiny", device="cpu", dtype=level.torch_dtype)
    apply_level(pipes, level)
    assert pipes.kernel_backends["guard_filter"] == "skip_guard_on_inbuilt_nn_modules_unsafe"
    assert pipes.sync_free_compel  # so compel's embeddings below come through sdxl_core.compel_uploads
    assert pipes.sync_free_stage_starts  # and the stages start as sdxl_core.stage_starts has them
    requests = [GenerationRequest(PROMPT, SEED, None, settings=fast_settings),
                GenerationRequest(PROMPT, SEED, "wrong", settings=fast_settings)]
    compiled = [generate(pipes, requests[0])]
    first = pipes.guard_filter.stats()
    assert first["compiles"] == 3  # base UNet, refiner UNet, VAE decoder
    assert 0.2 * first["guards"] < first["kept"] < 0.8 * first["guards"], first
    compiled.append(generate(pipes, requests[1]))
    # the base UNet again, for rows without zeros (the refiner's negative half was never zeros: its config encodes
    # the empty prompt)
    assert pipes.guard_filter.stats()["compiles"] == 4

    reference = load_pipelines("tiny", "tiny", device="cpu", dtype=level.torch_dtype)
    apply_level(reference, replace(level, compile_mode=None))
    for out, request in zip(compiled, requests):
        assert image_psnr(out.images[0], generate(reference, request).images[0]) > 35.0
    assert image_psnr(compiled[0].images[0], compiled[1].images[0]) < 30.0  # the negative prompt matters


def test_a_torch_without_the_guard_filter_helper_compiles_with_all_guards_and_says_so(monkeypatch):
    monkeypatch.delattr(torch.compiler, "skip_guard_on_inbuilt_nn_modules_unsafe")
    pipes = load_pipelines("tiny", "tiny", device="cpu", dtype="bfloat16")
    apply_level(pipes, replace(LEVELS["lean_host"], compile_mode=None, compile_text_encoders=False))
    assert pipes.guard_filter is None
    assert pipes.kernel_backends["guard_filter"].startswith("unavailable in torch ")
    from sdxl_core.optimize import BuiltinModuleGuardFilter

    with pytest.raises(InvalidConfigError, match="choose a level without skip_builtin_module_guards"):
        BuiltinModuleGuardFilter()
