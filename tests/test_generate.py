"""sdxl_core.generate: the harness makes the same pixels as the plain diffusers + compel reference code."""

from __future__ import annotations

import contextlib
import dataclasses
import io

import numpy as np
import pyparsing
import pytest
import torch

from sdxl_core.errors import InvalidConfigError
from sdxl_core.generate import (GenerationRequest, GenerationSettings, PromptEncoder, check_prompts, generate,
                                pil_from_device, refiner_embeds_from_base, with_settings)
from sdxl_core.loading import load_pipelines
from sdxl_core.numerics import image_psnr
from sdxl_core.prompt_check import set_packrat_parsing

PROMPT = "a majestic wolf in a misty forest at dawn, (oil on canvas)+++, highly detailed"


def reference_images(base, refiner, prompt, negative, seed, cfg, steps, frac, width, height):
    """The reference notebook's code, written out with plain diffusers and compel."""
    from compel import Compel, ReturnedEmbeddingsType

    with contextlib.redirect_stdout(io.StringIO()):
        compel_base = Compel(
            tokenizer=[base.tokenizer, base.tokenizer_2],
            text_encoder=[base.text_encoder, base.text_encoder_2],
            returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
            requires_pooled=[False, True],
        )
    compel_refiner = Compel(
        tokenizer=refiner.tokenizer_2,
        text_encoder=refiner.text_encoder_2,
        returned_embeddings_type=ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED,
        requires_pooled=True,
    )
    conditioning, pooled = compel_base(prompt)
    neg_conditioning = neg_pooled = None
    if negative is not None:
        neg_conditioning, neg_pooled = compel_base(negative)
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = base(
        prompt_embeds=conditioning, pooled_prompt_embeds=pooled,
        negative_prompt_embeds=neg_conditioning, negative_pooled_prompt_embeds=neg_pooled,
        guidance_scale=cfg, num_inference_steps=steps, denoising_end=frac, generator=generator,
        output_type="latent", cross_attention_kwargs={"scale": 0.0}, width=width, height=height,
    ).images

    conditioning, pooled = compel_refiner(prompt)
    neg_conditioning = neg_pooled = None
    if negative is not None:
        neg_conditioning, neg_pooled = compel_refiner(negative)
    generator = torch.Generator("cpu").manual_seed(seed)
    image = refiner(
        prompt_embeds=conditioning, pooled_prompt_embeds=pooled,
        negative_prompt_embeds=neg_conditioning, negative_pooled_prompt_embeds=neg_pooled,
        guidance_scale=cfg, num_inference_steps=steps, denoising_start=frac, image=latents, generator=generator,
    ).images[0]
    return latents, image


@pytest.fixture(scope="module")
def encoder(tiny_pipes):
    return PromptEncoder(tiny_pipes)


@pytest.fixture(scope="module")
def outputs(tiny_pipes, fast_settings, encoder):
    """Harness outputs shared by several tests, keyed by (seed, negative)."""
    cache = {}

    def get(seed, negative=None):
        if (seed, negative) not in cache:
            cache[seed, negative] = generate(tiny_pipes, GenerationRequest(PROMPT, seed, negative,
                                                                           settings=fast_settings), encoder)
        return cache[seed, negative]

    return get


def pixels(image) -> np.ndarray:
    return np.asarray(image)


@pytest.mark.parametrize("negative", [None, "wrong"])
def test_harness_matches_reference_code(tiny_pipes, fast_settings, outputs, negative):
    s = fast_settings
    ref_latents, ref_image = reference_images(tiny_pipes.base, tiny_pipes.refiner, PROMPT, negative, seed=7,
                                              cfg=s.guidance_scale, steps=s.steps, frac=s.high_noise_frac,
                                              width=s.width, height=s.height)
    out = outputs(7, negative)
    assert len(out.images) == 1
    assert out.images[0].size == ref_image.size == (s.width, s.height)
    torch.testing.assert_close(out.latents, ref_latents, rtol=0, atol=0)
    np.testing.assert_array_equal(pixels(out.images[0]), pixels(ref_image))
    # and the image is not degenerate
    assert pixels(ref_image).std() > 5


def test_same_seed_same_pixels(tiny_pipes, fast_settings, outputs):
    first = outputs(7)
    again = generate(tiny_pipes, GenerationRequest(PROMPT, 7, settings=fast_settings))  # fresh encoder too
    np.testing.assert_array_equal(pixels(first.images[0]), pixels(again.images[0]))


def test_different_seed_different_pixels(outputs):
    a, b = pixels(outputs(7).images[0]), pixels(outputs(8).images[0])
    assert not np.array_equal(a, b)
    assert image_psnr(a, b) < 30


def test_negative_prompt_changes_the_image(outputs):
    a, b = pixels(outputs(7, None).images[0]), pixels(outputs(7, "wrong").images[0])
    assert not np.array_equal(a, b)
    assert image_psnr(a, b) < 40


def test_negative_none_is_zeros_on_the_base(tiny_pipes, fast_settings, outputs):
    """None lets each pipeline use its default: zeros on the base (force_zeros_for_empty_prompt), which an
    all-zero negative embedding reproduces, and "" on the refiner."""
    encoder = PromptEncoder(tiny_pipes)
    text = encoder.embed(encoder.base, [PROMPT], None)
    s = fast_settings
    latents = tiny_pipes.base(
        prompt_embeds=text["prompt_embeds"], pooled_prompt_embeds=text["pooled_prompt_embeds"],
        negative_prompt_embeds=torch.zeros_like(text["prompt_embeds"]),
        negative_pooled_prompt_embeds=torch.zeros_like(text["pooled_prompt_embeds"]),
        guidance_scale=s.guidance_scale, num_inference_steps=s.steps, denoising_end=s.high_noise_frac,
        generator=torch.Generator("cpu").manual_seed(7), output_type="latent", width=s.width, height=s.height,
    ).images
    torch.testing.assert_close(outputs(7).latents, latents, rtol=0, atol=0)


def test_compel_matches_encode_prompt_for_unweighted_prompt(tiny_pipes, encoder):
    prompt = "a majestic wolf in a misty forest at dawn, highly detailed"
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = tiny_pipes.base.encode_prompt(
            prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
        r_embeds, _, r_pooled, _ = tiny_pipes.refiner.encode_prompt(
            prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    base_text = encoder.embed(encoder.base, [prompt], None)
    refiner_text = encoder.embed(encoder.refiner, [prompt], None)
    te1 = tiny_pipes.base.text_encoder.config.hidden_size
    te2 = tiny_pipes.base.text_encoder_2.config.hidden_size
    assert base_text["prompt_embeds"].shape == embeds.shape == (1, 77, te1 + te2)
    assert base_text["pooled_prompt_embeds"].shape == pooled.shape
    torch.testing.assert_close(base_text["prompt_embeds"], embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(base_text["pooled_prompt_embeds"], pooled, rtol=1e-5, atol=1e-6)
    assert refiner_text["prompt_embeds"].shape == r_embeds.shape == (1, 77, te2)
    torch.testing.assert_close(refiner_text["prompt_embeds"], r_embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(refiner_text["pooled_prompt_embeds"], r_pooled, rtol=1e-5, atol=1e-6)
    assert base_text["negative_prompt_embeds"] is None and base_text["negative_pooled_prompt_embeds"] is None


def test_weighted_prompt_changes_embeddings(encoder):
    plain = encoder.embed(encoder.base, ["a wolf in a forest"], None)["prompt_embeds"]
    weighted = encoder.embed(encoder.base, ["(a wolf)+++ in a forest"], None)["prompt_embeds"]
    assert plain.shape == weighted.shape
    assert (weighted - plain).abs().max() > 1e-2


@pytest.mark.parametrize("frac", [0, 1, 1.5, -0.1, float("nan")])
def test_high_noise_frac_must_be_inside_0_1(frac):
    with pytest.raises(InvalidConfigError, match="high_noise_frac must lie strictly between 0 and 1"):
        GenerationSettings(high_noise_frac=frac).check()


@pytest.mark.parametrize("field, value, hint", [
    ("width", 100, "multiple of 8.*try 96"),
    ("height", 1020, "multiple of 8.*try 1016"),
    ("width", 0, "multiple of 8"),
    ("width", 64.0, "multiple of 8"),
    ("steps", 0, "steps must be an integer >= 1"),
    ("steps", 2.5, "steps must be an integer >= 1"),
    ("guidance_scale", float("inf"), "guidance_scale must be a finite number"),
    ("guidance_scale", -1.0, "guidance_scale must be a finite number"),
    ("guidance_scale", True, "guidance_scale must be a finite number"),
    ("high_noise_frac", True, "high_noise_frac must lie strictly between 0 and 1"),
    ("steps", True, "steps must be an integer >= 1"),
])
def test_settings_check_refuses(field, value, hint):
    with pytest.raises(InvalidConfigError, match=hint):
        GenerationSettings(**{field: value}).check()


def test_default_settings_are_the_reference():
    s = GenerationSettings()
    s.check()
    assert (s.steps, s.guidance_scale, s.high_noise_frac, s.width, s.height) == (50, 13.0, 0.8, 1024, 1024)


@pytest.mark.parametrize("kwargs, hint", [
    (dict(prompt="", seed=0), "prompt is empty"),
    (dict(prompt="   ", seed=0), "prompt is empty"),
    (dict(prompt="a wolf", seed=-1), "seed must be a non-negative integer"),
    (dict(prompt="a wolf", seed=0, negative_prompt=3), "negative_prompt must be a string"),
    (dict(prompt="a wolf", seed=0, batch_size=0), "batch_size must be an integer >= 1"),
    (dict(prompt="a wolf", seed=0, batch_size=True), "batch_size must be an integer >= 1"),
    (dict(prompt="a wolf", seed=True), "seed must be a non-negative integer"),
    (dict(prompt="a wolf", seed=0, settings=GenerationSettings(width=100)), "multiple of 8"),
])
def test_request_check_refuses(kwargs, hint):
    with pytest.raises(InvalidConfigError, match=hint):
        GenerationRequest(**kwargs).check()


def test_generate_checks_before_any_work(tiny_pipes, fast_settings):
    calls = []
    handle = tiny_pipes.base.text_encoder.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(InvalidConfigError):
            generate(tiny_pipes, GenerationRequest("", 0, settings=fast_settings))
        with pytest.raises(InvalidConfigError):
            generate(tiny_pipes, with_settings(GenerationRequest("a wolf", 0, settings=fast_settings),
                                               high_noise_frac=1.0))
        # a split that leaves the refiner (or the base) without a step
        for steps, frac in ((1, 0.5), (50, 0.999)):
            with pytest.raises(InvalidConfigError, match="each needs at least one"):
                generate(tiny_pipes, with_settings(GenerationRequest("a wolf", 0, settings=fast_settings),
                                                   steps=steps, high_noise_frac=frac))
    finally:
        handle.remove()
    assert calls == []


def test_check_prompts():
    with pytest.raises(InvalidConfigError, match="prompt list is empty"):
        check_prompts([])
    with pytest.raises(InvalidConfigError, match="prompt 1 is empty"):
        check_prompts(["a wolf", "  "])
    check_prompts(["a wolf", "a fox"])


def test_stage_seconds(outputs):
    stages = outputs(7).stage_seconds
    assert set(stages) == {"text_encoding", "base_denoising", "refiner_denoising", "vae_decode"}
    assert all(v > 0 for v in stages.values()), stages


def test_without_refiner_the_base_runs_all_steps_and_decodes(fast_settings):
    pipes = load_pipelines("tiny", device="cpu")
    assert pipes.refiner is None
    counter = []
    handle = pipes.base.unet.register_forward_hook(lambda *a: counter.append(1))
    out = generate(pipes, GenerationRequest(PROMPT, 3, settings=fast_settings))
    handle.remove()
    assert len(counter) == fast_settings.steps
    assert out.latents is None
    assert len(out.images) == 1 and out.images[0].size == (fast_settings.width, fast_settings.height)
    assert pixels(out.images[0]).std() > 5
    assert set(out.stage_seconds) == {"text_encoding", "base_denoising", "vae_decode"}
    assert all(v > 0 for v in out.stage_seconds.values())


def test_batch_uses_consecutive_seeds(tiny_pipes, fast_settings, encoder, outputs):
    out = generate(tiny_pipes, GenerationRequest(PROMPT, 7, settings=fast_settings, batch_size=2), encoder)
    assert len(out.images) == 2 and out.latents.shape[0] == 2
    # batched matmuls may round differently from batch 1 (measured 89 dB), so compare closely, not bit for bit
    assert image_psnr(out.images[0], outputs(7).images[0]) > 40
    assert image_psnr(out.images[1], outputs(8).images[0]) > 40
    assert image_psnr(out.images[0], out.images[1]) < 30


def test_use_compel_off_runs_plain_prompts(tiny_pipes, fast_settings, outputs):
    """Without compel, an unweighted prompt gives the same image as compel (same embeddings; measured: identical)."""
    prompt = "a majestic wolf in a misty forest at dawn"
    s = fast_settings
    with_compel = generate(tiny_pipes, GenerationRequest(prompt, 7, "wrong", settings=s))
    plain = generate(tiny_pipes, with_settings(GenerationRequest(prompt, 7, "wrong", settings=s), use_compel=False))
    assert image_psnr(with_compel.images[0], plain.images[0]) > 60


@pytest.mark.parametrize("prompt, negative", [("a majestic wolf in a misty forest", None),
                                              ("(a wolf)+++ in a (forest)--", "wrong, (blurry)1.4"),
                                              (" ".join(["wolf"] * 90), "x")])  # longer than 77 tokens
def test_refiner_embeds_from_base_equal_the_refiner_compel(encoder, tiny_pipes, prompt, negative):
    negatives = None if negative is None else [negative]
    base_text = encoder.embed(encoder.base, [prompt], negatives)
    direct = encoder.embed(encoder.refiner, [prompt], negatives)
    shared = refiner_embeds_from_base(base_text, tiny_pipes.refiner.text_encoder_2.config.hidden_size)
    assert shared.keys() == direct.keys()
    for key, value in direct.items():
        if value is None:
            assert shared[key] is None, key
        else:
            assert shared[key].shape == value.shape, key
            torch.testing.assert_close(shared[key], value, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("negative", [None, "wrong"])
def test_shared_text_embeddings_give_the_same_pixels(tiny_pipes, fast_settings, encoder, negative):
    shared = dataclasses.replace(tiny_pipes, share_text_embeddings=True)  # same modules, new flag
    request = GenerationRequest(PROMPT, 7, negative, settings=fast_settings)
    calls = []
    handle = tiny_pipes.base.text_encoder_2.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        plain = generate(tiny_pipes, request, encoder)
        plain_calls = len(calls)
        calls.clear()
        out = generate(shared, request, encoder)
    finally:
        handle.remove()
    np.testing.assert_array_equal(pixels(out.images[0]), pixels(plain.images[0]))
    torch.testing.assert_close(out.latents, plain.latents, rtol=0, atol=0)
    # the refiner's compel pass over text_encoder_2 is skipped
    assert len(calls) < plain_calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels", [3, 1])
def test_images_from_the_device_are_diffusers_pixels(dtype, channels):
    """``pil_from_device`` against diffusers' own ``output_type="pil"`` conversion of the same tensor, on values
    that straddle every rounding boundary (k + 0.5) / 255, both ends of [0, 1] and random ones."""
    from diffusers.image_processor import VaeImageProcessor

    g = torch.Generator().manual_seed(0)
    edges = (torch.arange(256, dtype=torch.float64) + 0.5) / 255
    values = torch.cat([edges, edges - 1e-6, edges + 1e-6, torch.tensor([0.0, 1.0]),
                        torch.rand(4096 - 3 * 256 - 2, generator=g, dtype=torch.float64)]).clamp(0, 1)
    images = values.reshape(1, 1, 64, 64).expand(2, channels, 64, 64).to(dtype).contiguous()
    images[1] = images[1].flip(-1)
    ours = pil_from_device(images)
    theirs = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images))
    assert [im.mode for im in ours] == [im.mode for im in theirs] == ["RGB" if channels == 3 else "L"] * 2
    for a, b in zip(ours, theirs):
        np.testing.assert_array_equal(pixels(a), pixels(b))
    assert len(set(pixels(ours[0]).ravel().tolist())) > 200  # the values did cover the 8-bit range


@pytest.mark.parametrize("with_refiner", [True, False])
def test_images_converted_on_the_device_are_the_same_pixels(tiny_pipes, fast_settings, encoder, with_refiner):
    plain = tiny_pipes if with_refiner else dataclasses.replace(tiny_pipes, refiner=None)
    on_device = dataclasses.replace(plain, images_on_device=True)  # same modules, new flag
    request = GenerationRequest(PROMPT, 5, settings=fast_settings)
    a, b = generate(plain, request, encoder), generate(on_device, request, encoder)
    assert b.images[0].size == a.images[0].size and b.images[0].mode == a.images[0].mode
    np.testing.assert_array_equal(pixels(b.images[0]), pixels(a.images[0]))
    assert set(b.stage_seconds) == set(a.stage_seconds)


def test_packrat_parsing_gives_the_same_parse():
    """compel's parse of every default prompt and of weighting, blend and conjunction syntax is the same with
    pyparsing's packrat cache on (the ``max`` levels) as off."""
    from compel import Compel

    from sdxl_core.prompts_default import DEFAULT_PROMPTS

    prompts = [PROMPT, *DEFAULT_PROMPTS, "(a (cat)1.3 on a mat)--, [blurry] photo",
               '("a cat", "a dog").blend(0.3, 0.7)', '("red fox", "snow").and()', "a cat\\(not weighted\\)"]
    try:
        set_packrat_parsing(False)
        plain = [repr(Compel.parse_prompt_string(p)) for p in prompts]
        set_packrat_parsing(True)
        cached = [repr(Compel.parse_prompt_string(p)) for p in prompts]
        again = [repr(Compel.parse_prompt_string(p)) for p in prompts]  # now from a warm cache
    finally:
        set_packrat_parsing(False)
    assert "@1.053" in plain[-4] and "Blend" in plain[-3] and "weights [1.0, 1.0]" in plain[-2]
    assert cached == plain and again == plain


def test_prompt_encoder_switches_packrat_parsing(tiny_pipes):
    """On by default; off on request; ``None`` leaves the process-wide switch alone (the speed suite's levels)."""
    try:
        PromptEncoder(tiny_pipes, packrat=False)
        assert not pyparsing.ParserElement._packratEnabled
        PromptEncoder(tiny_pipes, packrat=None)
        assert not pyparsing.ParserElement._packratEnabled
        PromptEncoder(tiny_pipes)
        assert pyparsing.ParserElement._packratEnabled
        PromptEncoder(tiny_pipes, packrat=None)
        assert pyparsing.ParserElement._packratEnabled
    finally:
        set_packrat_parsing(False)


def test_nested_parentheses_parse_in_milliseconds(tiny_pipes):
    """Seven nested groups took 19.7 s to parse without packrat on 2 cores (~5x per level); the encoder's default
    parses them at once, with the nested weight applied (1.1**7 on 'cat')."""
    import time

    from compel import Compel

    prompt = "a " + "(" * 7 + "cat" + ")+" * 7 + " on a mat"
    try:
        encoder = PromptEncoder(tiny_pipes)
        start = time.perf_counter()
        parsed = Compel.parse_prompt_string(prompt)
        embeds = encoder.embed(encoder.base, [prompt], None)
        assert time.perf_counter() - start < 2.0
    finally:
        set_packrat_parsing(False)
    weights = [f.weight for f in parsed.prompts[0].children]
    assert max(weights) == pytest.approx(1.1 ** 7)
    assert torch.isfinite(embeds["prompt_embeds"]).all()


def test_generation_keeps_no_pipelines_alive(fast_settings):
    """Once ``generate`` returns and the caller drops them, the pipelines (on a GPU, gigabytes) are freed.

    pyparsing's packrat cache keeps the exceptions of a parse, and their tracebacks keep every calling frame and
    its locals alive until the next parse; the speed suite builds each level's pipelines after dropping the last
    level's, so a kept frame there holds two sets of weights on the card."""
    import gc
    import weakref

    def run() -> tuple[weakref.ref, weakref.ref]:
        pipes = load_pipelines("tiny", "tiny", device="cpu")
        generate(pipes, GenerationRequest(PROMPT, 0, "blurry", settings=fast_settings))  # packrat on by default
        return weakref.ref(pipes), weakref.ref(pipes.base.unet)

    try:
        pipes_ref, unet_ref = run()
        assert pyparsing.ParserElement._packratEnabled
        gc.collect()
        assert pipes_ref() is None and unet_ref() is None
    finally:
        set_packrat_parsing(False)
