"""sdxl_core.flops: per-forward FLOPs of SDXL 1.0 on meta, the workload, and the base/refiner step split."""

from __future__ import annotations

import pytest

from sdxl_core.errors import InvalidConfigError
from sdxl_core.flops import ComponentFlops, component_flops, split_steps, unet_inputs, workload_flops
from sdxl_core.generate import GenerationRequest, GenerationSettings, generate
from sdxl_core.loading import load_pipelines


@pytest.fixture(scope="module")
def flops_1024():
    return component_flops(1024, 1024)


def test_component_flops_at_1024(flops_1024):
    assert (flops_1024.height, flops_1024.width) == (1024, 1024)
    assert flops_1024.unet_base == pytest.approx(6.761e12, rel=1e-3)
    assert flops_1024.unet_refiner == pytest.approx(7.286e12, rel=1e-3)
    assert flops_1024.vae_decode == pytest.approx(10.470e12, rel=1e-3)
    # the text encoders do not depend on the image size; CLIP-L is far smaller than OpenCLIP bigG
    assert 0 < flops_1024.text_encoder < flops_1024.text_encoder_2 < flops_1024.unet_base
    assert set(flops_1024.as_dict()) == {"height", "width", "unet_base", "unet_refiner", "vae_decode",
                                         "text_encoder", "text_encoder_2"}


def test_text_encoder_flops_are_about_two_per_parameter_per_token(flops_1024):
    """A transformer's forward is ~2 FLOPs per weight per token (77 tokens), plus attention."""
    from sdxl_core.presets import SDXL_1_0, architecture_parameter_counts

    params = architecture_parameter_counts(SDXL_1_0)
    for name in ("text_encoder", "text_encoder_2"):
        per_token = getattr(flops_1024, name) / 77
        ratio = per_token / (2 * params[name])
        assert 0.5 < ratio < 1.5, (name, ratio)


def test_workload_flops_reference_settings(flops_1024):
    w = workload_flops(flops_1024, steps=50, high_noise_frac=0.8)
    assert (w.base_steps, w.refiner_steps) == (40, 10)
    assert w.guidance is True and w.batch_size == 1
    assert w.total == pytest.approx(697.3e12, rel=5e-3)
    assert w.unet_base == flops_1024.unet_base * 40 * 2
    assert w.unet_refiner == flops_1024.unet_refiner * 10 * 2
    assert w.vae_decode == flops_1024.vae_decode
    assert w.total == w.unet_base + w.unet_refiner + w.vae_decode + w.text_encoders


def test_workload_flops_variants(flops_1024):
    ref = workload_flops(flops_1024, 50, 0.8)
    no_cfg = workload_flops(flops_1024, 50, 0.8, guidance=False)
    assert no_cfg.unet_base == ref.unet_base / 2 and no_cfg.unet_refiner == ref.unet_refiner / 2
    batch = workload_flops(flops_1024, 50, 0.8, batch_size=4)
    assert batch.total == pytest.approx(4 * ref.total)
    base_only = workload_flops(flops_1024, 50, 0.8, with_refiner=False)
    assert (base_only.base_steps, base_only.refiner_steps) == (50, 0)
    assert base_only.unet_refiner == 0
    # compel: text_encoder once, text_encoder_2 twice (hidden states, then pooled)
    assert base_only.text_encoders == flops_1024.text_encoder + 2 * flops_1024.text_encoder_2


def test_component_flops_scale_with_image_size(flops_1024):
    small = component_flops(512, 512)
    assert isinstance(small, ComponentFlops)
    # 4x fewer pixels: convolutions scale by 4, self-attention by up to 16
    for name in ("unet_base", "unet_refiner", "vae_decode"):
        ratio = getattr(flops_1024, name) / getattr(small, name)
        assert 4 <= ratio < 6, (name, ratio)
    assert small.text_encoder == flops_1024.text_encoder


def test_unet_inputs_refuses_a_wrong_pooled_width(tiny_pipes):
    unet = tiny_pipes.base.unet
    pooled = tiny_pipes.base.text_encoder_2.config.projection_dim
    args, kwargs = unet_inputs(unet, 2, 64, 64, pooled)
    assert args[0].shape == (2, 4, 8, 8) and kwargs["added_cond_kwargs"]["time_ids"].shape == (2, 6)
    args, kwargs = unet_inputs(tiny_pipes.refiner.unet, 1, 64, 64, pooled)
    assert kwargs["added_cond_kwargs"]["time_ids"].shape == (1, 5)
    with pytest.raises(ValueError, match="text_time"):
        unet_inputs(unet, 1, 64, 64, pooled + 3)


@pytest.mark.parametrize("steps, frac, expected", [(50, 0.8, (40, 10)), (10, 0.8, (8, 2)), (6, 0.8, (4, 2)),
                                                   (13, 0.75, (9, 4)), (25, 0.5, (12, 13)), (2, 0.9, (1, 1))])
def test_split_steps(steps, frac, expected):
    assert split_steps(steps, frac) == expected


@pytest.mark.parametrize("steps, frac", [(1, 0.5), (50, 0.999), (2, 0.0005), (50, 0.001)])
def test_split_steps_refuses_a_stage_without_steps(steps, frac):
    with pytest.raises(InvalidConfigError, match="each needs at least one"):
        split_steps(steps, frac)


@pytest.fixture(scope="module")
def own_pipes():
    """Pipelines of this module's own (hooks are added to them), loaded like the shared ones."""
    return load_pipelines("tiny", "tiny", device="cpu")


@pytest.mark.parametrize("steps, frac", [(10, 0.8), (6, 0.3), (4, 0.5), (2, 0.9)])
def test_split_steps_is_what_the_pipelines_run(own_pipes, steps, frac):
    calls = {"base": 0, "refiner": 0}

    def counter(key):
        def hook(*_):
            calls[key] += 1
        return hook

    handles = [own_pipes.base.unet.register_forward_hook(counter("base")),
               own_pipes.refiner.unet.register_forward_hook(counter("refiner"))]
    try:
        settings = GenerationSettings(steps=steps, high_noise_frac=frac, width=64, height=64)
        generate(own_pipes, GenerationRequest("a wolf", 0, settings=settings))
    finally:
        for h in handles:
            h.remove()
    assert (calls["base"], calls["refiner"]) == split_steps(steps, frac)
    assert calls["base"] + calls["refiner"] == steps


@pytest.mark.parametrize("negative, with_refiner", [(None, True), ("wrong", True), (None, False), ("wrong", False)])
def test_text_encoder_passes_are_what_generation_runs(negative, with_refiner):
    """text_encoder_passes() (used for the workload's text FLOPs) counts the encoder forwards that compel and
    the pipelines really make."""
    from sdxl_core.flops import text_encoder_passes

    pipes = load_pipelines("tiny", "tiny" if with_refiner else None, device="cpu")
    calls = {"text_encoder": 0, "text_encoder_2": 0}
    handles = []
    for name in calls:
        def hook(*_, key=name):
            calls[key] += 1
        handles.append(getattr(pipes.base, name).register_forward_hook(hook))
    try:
        settings = GenerationSettings(steps=4, width=64, height=64)
        generate(pipes, GenerationRequest("a wolf", 0, negative_prompt=negative, settings=settings))
    finally:
        for h in handles:
            h.remove()
    assert (calls["text_encoder"], calls["text_encoder_2"]) == text_encoder_passes(negative is not None, with_refiner)
