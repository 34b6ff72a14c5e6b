"""sdxl_core.presets: the SDXL 1.0 architecture sizes, the tiny pipelines' wiring, deterministic init."""

from __future__ import annotations

import pytest
import torch

from sdxl_core import presets
from sdxl_core.presets import SDXL_1_0, TINY_CONFIGS, architecture_parameter_counts, init_random_weights_

# Parameter counts of the public SDXL 1.0 base/refiner components (stabilityai/stable-diffusion-xl-*-1.0).
SDXL_PARAMS = {
    "unet": 2_567_463_684,
    "unet_refiner": 2_259_526_660,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
}


def test_sdxl_1_0_parameter_counts_on_meta():
    assert architecture_parameter_counts(SDXL_1_0) == SDXL_PARAMS


def test_tiny_base_has_two_text_encoders(tiny_pipes):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    base = tiny_pipes.base
    assert isinstance(base, StableDiffusionXLPipeline)
    assert isinstance(base.text_encoder, CLIPTextModel)
    assert isinstance(base.text_encoder_2, CLIPTextModelWithProjection)
    assert base.tokenizer is not None and base.tokenizer_2 is not None
    assert base.tokenizer.pad_token == "<|endoftext|>"
    assert base.tokenizer_2.pad_token == "!"
    assert base.config.force_zeros_for_empty_prompt is True


def test_tiny_refiner_has_only_text_encoder_2(tiny_pipes):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    refiner = tiny_pipes.refiner
    assert isinstance(refiner, StableDiffusionXLImg2ImgPipeline)
    assert refiner.text_encoder is None
    assert refiner.tokenizer is None
    assert refiner.tokenizer_2 is not None and refiner.tokenizer_2.pad_token == "!"
    assert refiner.config.requires_aesthetics_score is True
    assert refiner.config.force_zeros_for_empty_prompt is False


def test_refiner_shares_text_encoder_2_and_vae_with_base(tiny_pipes):
    assert tiny_pipes.refiner.text_encoder_2 is tiny_pipes.base.text_encoder_2
    assert tiny_pipes.refiner.vae is tiny_pipes.base.vae
    assert tiny_pipes.refiner.unet is not tiny_pipes.base.unet


def test_tiny_unets_have_sdxl_conditioning(tiny_pipes):
    """Base: 6 time ids (sizes, crop); refiner: 5 (with the aesthetic score); pooled width of encoder 2."""
    pooled = tiny_pipes.base.text_encoder_2.config.projection_dim
    for unet, n_ids, ctx in ((tiny_pipes.base.unet, 6, tiny_pipes.base.text_encoder.config.hidden_size
                              + tiny_pipes.base.text_encoder_2.config.hidden_size),
                             (tiny_pipes.refiner.unet, 5, tiny_pipes.base.text_encoder_2.config.hidden_size)):
        cfg = unet.config
        assert cfg.addition_embed_type == "text_time"
        assert cfg.projection_class_embeddings_input_dim == pooled + n_ids * cfg.addition_time_embed_dim
        assert cfg.cross_attention_dim == ctx


def test_tiny_loaded_weights_equal_a_fresh_build(tiny_pipes):
    """The cached checkpoints hold exactly what build_tiny() makes (seeded, so rebuilding is reproducible)."""
    base, refiner = presets.build_tiny(presets.TINY_SEED)
    pairs = [(base.unet, tiny_pipes.base.unet), (refiner.unet, tiny_pipes.refiner.unet),
             (base.vae, tiny_pipes.base.vae), (base.text_encoder, tiny_pipes.base.text_encoder),
             (base.text_encoder_2, tiny_pipes.base.text_encoder_2)]
    for fresh, loaded in pairs:
        a, b = fresh.state_dict(), loaded.state_dict()
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def _tiny_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_config(TINY_CONFIGS.unet_base())


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_init_random_weights_is_deterministic():
    a = _state(init_random_weights_(_tiny_unet(), seed=1))
    b = _state(init_random_weights_(_tiny_unet(), seed=1))
    c = _state(init_random_weights_(_tiny_unet(), seed=2))
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    weights = [k for k in a if k.endswith("weight") and a[k].ndim > 1]
    assert weights
    for k in weights:
        assert not torch.equal(a[k], c[k]), k


def test_init_random_weights_does_not_depend_on_dtype_or_prior_state():
    torch.manual_seed(123)  # the global RNG must not matter
    a = _state(init_random_weights_(_tiny_unet(), seed=5))
    torch.manual_seed(456)
    b = _state(init_random_weights_(_tiny_unet().to(torch.bfloat16), seed=5))
    for k in a:
        assert b[k].dtype == torch.bfloat16
        assert torch.equal(a[k].to(torch.bfloat16), b[k]), k


def test_init_random_weights_scheme():
    unet = init_random_weights_(_tiny_unet(), seed=0)
    for name, p in unet.named_parameters():
        if name.endswith("bias"):
            assert torch.count_nonzero(p) == 0, name
        elif p.ndim == 1:
            assert torch.all(p == 1), name
    w = unet.conv_in.weight  # fan_in = 4 * 3 * 3, gain 1
    fan_in = w[0].numel()
    assert float(w.detach().std()) == pytest.approx(1 / fan_in**0.5, rel=0.25)
    out = dict(unet.named_parameters())["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.weight"]
    assert float(out.detach().std()) == pytest.approx(0.5 / out.shape[1] ** 0.5, rel=0.25)  # residual output: gain 0.5


def test_ensure_tiny_builds_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDXL_BENCH_CACHE", str(tmp_path))
    base, refiner = presets.ensure_tiny()
    assert base.parent.parent == tmp_path
    for folder in (base, refiner):
        assert (folder / "model_index.json").is_file()
        assert (folder / "unet").is_dir()
    assert not (refiner / "text_encoder").exists() and not (refiner / "tokenizer").exists()
    stamp = (base / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert presets.ensure_tiny() == (base, refiner)
    assert (base / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [base.parent.name]  # no temporary folders left


def test_build_sdxl_random_on_the_tiny_architecture():
    """The sdxl-random path (random fp16-safe init, shared encoder 2 and VAE), run on the tiny configs."""
    import zlib

    base, refiner = presets.build_sdxl_random(device="cpu", dtype=torch.bfloat16, seed=3, configs=TINY_CONFIGS)
    assert refiner.text_encoder_2 is base.text_encoder_2 and refiner.vae is base.vae
    assert refiner.text_encoder is None and refiner.config.requires_aesthetics_score is True
    for m in (base.unet, refiner.unet, base.vae, base.text_encoder, base.text_encoder_2):
        assert m.dtype == torch.bfloat16 and not m.training
        assert not any(p.requires_grad for p in m.parameters())
    # each component is seeded from the seed and its own name
    expected = init_random_weights_(_tiny_unet(), seed=3 + zlib.crc32(b"unet")).to(torch.bfloat16)
    for (k, a), b in zip(base.unet.state_dict().items(), expected.state_dict().values()):
        assert torch.equal(a, b), k
    base_only, none = presets.build_sdxl_random(device="cpu", dtype=torch.float32, with_refiner=False,
                                                configs=TINY_CONFIGS)
    assert none is None and base_only.unet.dtype == torch.float32


def test_skeleton_keeps_sdxl_structure_at_a_fraction_of_the_widths():
    """Divisor 1 gives back the SDXL 1.0 configs exactly (so the derived sizes follow SDXL's own rules), and the
    default skeleton has the same modules, of the same types in the same order, in every component."""
    from sdxl_core.presets import SKELETON_CONFIGS, SkeletonConfigs, build_components, count_parameters

    same = SkeletonConfigs(divisor=1)
    for part in ("unet_base", "unet_refiner", "vae", "text_encoder", "text_encoder_2", "scheduler"):
        assert getattr(same, part)() == getattr(SDXL_1_0, part)(), part
    full, skeleton = build_components(SDXL_1_0, "meta"), build_components(SKELETON_CONFIGS, "meta")
    for name in full:
        assert [type(m).__name__ for m in full[name].modules()] == \
               [type(m).__name__ for m in skeleton[name].modules()], name
    assert count_parameters(skeleton["unet"]) * 60 < count_parameters(full["unet"])


def test_skeleton_pipelines_generate():
    from sdxl_core.generate import GenerationRequest, GenerationSettings, generate
    from sdxl_core.loading import Pipelines
    from sdxl_core.presets import SKELETON_CONFIGS

    base, refiner = presets.build_sdxl_random(device="cpu", dtype=torch.float32, configs=SKELETON_CONFIGS)
    pipes = Pipelines(base, refiner, "skeleton", "skeleton", None)
    out = generate(pipes, GenerationRequest("a wolf, (oil on canvas)+", 0,
                                            settings=GenerationSettings(steps=3, width=64, height=64)))
    assert out.images[0].size == (64, 64) and torch.isfinite(out.latents).all()
