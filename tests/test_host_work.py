"""sdxl_core.host_work: per-image host work done once, with the same images."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sdxl_core.errors import InvalidConfigError
from sdxl_core.generate import GenerationRequest, PromptEncoder, generate, with_settings
from sdxl_core.host_work import EmptyNegativeCache, is_pinned, pin_execution_device
from sdxl_core.loading import load_pipelines

PROMPT = "a majestic wolf in a misty forest at dawn, (oil on canvas)+++, highly detailed"


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.uint8)


@pytest.fixture
def own_pipes():
    """Fresh tiny pipelines: pinning changes a pipeline's class, which the shared fixture must not see."""
    return load_pipelines("tiny", "tiny", device="cpu")


@pytest.fixture
def walks(monkeypatch):
    """Counts diffusers' group-offload lookups, the per-module walk behind ``_execution_device``."""
    from diffusers.hooks import group_offloading

    calls = []
    original = group_offloading._get_group_onload_device

    def counted(module):
        calls.append(type(module).__name__)
        return original(module)

    monkeypatch.setattr(group_offloading, "_get_group_onload_device", counted)
    return calls


def test_pinned_device_is_diffusers_answer_without_the_walk(own_pipes, walks):
    pipe = own_pipes.base
    cls = type(pipe)
    expected = pipe._execution_device
    assert walks, "the unpinned lookup walks the components (else this test measures nothing)"
    walks.clear()
    assert pin_execution_device(pipe) == expected
    assert walks, "pinning asks diffusers once"
    walks.clear()
    for _ in range(3):
        assert pipe._execution_device == expected
    assert walks == []
    assert is_pinned(pipe) and not is_pinned(own_pipes.refiner)
    assert isinstance(pipe, cls) and type(pipe).__name__ == cls.__name__ and type(pipe).__module__ == cls.__module__
    assert set(pipe.components) == set(own_pipes.refiner.components) | {"text_encoder", "tokenizer"}


def test_a_pinned_base_answers_the_harness_device_without_the_walk(own_pipes, walks):
    """``Pipelines.device`` (read by ``generate`` at every image, before its first stage) walks the base UNet's modules
    through diffusers' ``unet.device`` until the base is pinned, then answers from the pinned device."""
    expected = own_pipes.device
    assert walks and expected == torch.device("cpu")
    pin_execution_device(own_pipes.base)
    walks.clear()
    assert own_pipes.device == expected and walks == []


def test_pinning_twice_keeps_one_subclass_and_asks_again(own_pipes, walks):
    pipe = own_pipes.refiner
    pin_execution_device(pipe)
    first = type(pipe)
    walks.clear()
    pin_execution_device(pipe)
    assert type(pipe) is first and type(pipe).__mro__[1].__name__ == first.__name__
    assert walks, "re-pinning asks diffusers again"
    other = load_pipelines("tiny", "tiny", device="cpu").refiner
    pin_execution_device(other)
    assert type(other) is first  # one subclass per pipeline class


def test_pinned_pipelines_make_the_same_images(own_pipes, tiny_pipes, fast_settings, walks):
    request = GenerationRequest(PROMPT, 3, settings=fast_settings)
    encoder = PromptEncoder(tiny_pipes)
    plain = generate(tiny_pipes, request, encoder)
    for pipe in (own_pipes.base, own_pipes.refiner):
        pin_execution_device(pipe)
    walks.clear()
    pinned = generate(own_pipes, request, PromptEncoder(own_pipes))
    np.testing.assert_array_equal(pixels(pinned.images[0]), pixels(plain.images[0]))
    torch.testing.assert_close(pinned.latents, plain.latents, rtol=0, atol=0)
    # what is left are lookups of single modules (the VAE at decode, text_encoder_2 for the refiner's "")
    assert len(walks) <= 3, walks


def _second_image(pipes, request):
    """The second of two images (the first has compel's one-off pass over ""), and text_encoder_2's calls in it."""
    encoder = PromptEncoder(pipes)
    generate(pipes, request, encoder)
    calls: list[int] = []
    handle = pipes.refiner.text_encoder_2.register_forward_pre_hook(lambda m, args: calls.append(1))
    try:
        return generate(pipes, request, encoder), len(calls)
    finally:
        handle.remove()


@pytest.mark.parametrize("negative", [None, "blurry"])
def test_empty_negative_embeddings_are_made_once_with_the_same_images(own_pipes, tiny_pipes, fast_settings,
                                                                      negative):
    request = GenerationRequest(PROMPT, 4, negative_prompt=negative, settings=fast_settings)
    plain, plain_calls = _second_image(dataclasses.replace(tiny_pipes, share_text_embeddings=True), request)
    cached_pipes = dataclasses.replace(own_pipes, share_text_embeddings=True,
                                       empty_negative=EmptyNegativeCache(own_pipes.refiner))
    cached, cached_calls = _second_image(cached_pipes, request)
    np.testing.assert_array_equal(pixels(cached.images[0]), pixels(plain.images[0]))
    torch.testing.assert_close(cached.latents, plain.latents, rtol=0, atol=0)
    if negative is None:  # made by the first image, reused by the second
        assert cached_pipes.empty_negative.encoded == 1
        assert cached_calls == plain_calls - 1
    else:  # a negative prompt has its own (compel) embeddings: the cache has nothing to do
        assert cached_pipes.empty_negative.encoded == 0
        assert cached_calls == plain_calls


def test_empty_negative_cache_keys_on_the_batch(own_pipes, fast_settings):
    pipes = dataclasses.replace(own_pipes, share_text_embeddings=True,
                                empty_negative=EmptyNegativeCache(own_pipes.refiner))
    encoder = PromptEncoder(pipes)
    one = GenerationRequest(PROMPT, 0, settings=fast_settings)
    two = dataclasses.replace(one, batch_size=2)
    for request in (one, two, one, two):
        generate(pipes, request, encoder)
    assert pipes.empty_negative.encoded == 2


def test_empty_negative_cache_passes_through_where_diffusers_would_not_encode(own_pipes, fast_settings):
    cache = EmptyNegativeCache(own_pipes.refiner)
    embeds = torch.zeros(1, 77, 32)
    pooled = torch.zeros(1, 32)
    text = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "negative_prompt_embeds": None,
            "negative_pooled_prompt_embeds": None}
    assert cache.fill(text, guidance_scale=1.0) is text  # no guidance: no unconditional half
    plain = {"prompt": ["a cat"], "negative_prompt": None}
    assert cache.fill(plain, guidance_scale=7.0) is plain  # strings: diffusers encodes both itself
    given = dict(text, negative_prompt_embeds=embeds, negative_pooled_prompt_embeds=pooled)
    assert cache.fill(given, guidance_scale=7.0) is given
    assert cache.encoded == 0
    # without compel the request goes through unchanged too
    pipes = dataclasses.replace(own_pipes, empty_negative=cache)
    generate(pipes, with_settings(GenerationRequest(PROMPT, 0, settings=fast_settings), use_compel=False))
    assert cache.encoded == 0


def test_empty_negative_cache_refuses_lora_in_text_encoder_2(own_pipes):
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=2, target_modules=["q_proj"]), own_pipes.refiner.text_encoder_2)
    with pytest.raises(InvalidConfigError, match="LoRA layers.*use a level without cache_empty_negative"):
        EmptyNegativeCache(own_pipes.refiner)


def test_empty_negative_cache_needs_text_encoder_2(own_pipes):
    own_pipes.refiner.register_modules(text_encoder_2=None)
    with pytest.raises(InvalidConfigError, match="needs the refiner's text_encoder_2"):
        EmptyNegativeCache(own_pipes.refiner)
