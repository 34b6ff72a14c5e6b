"""compel's embeddings with the host's numbers kept on the host (sdxl_core/compel_uploads.py).

Two claims: the embeddings (and token ids, and pooled embeddings) are bit-identical to compel's own, for every kind
of prompt the direct path takes and for those it leaves to compel; and the direct path never reads a value that
lives on the device. The second is what saves the host syncs on a GPU. On the CPU it is checked with ``OnDevice``,
a tensor subclass standing for device memory: ``upload`` returns it and the text encoders' outputs are wrapped in
it, everything computed from it stays one, and reading one on the host (``bool``, ``item``, ``tolist``, ...: a
sync on a GPU) fails the test.
"""

from __future__ import annotations

import contextlib
import io
import random
from typing import Any

import pytest
import torch
from compel import Compel, DownweightMode, ReturnedEmbeddingsType
from compel.embeddings_provider import EmbeddingsProvider
from torch.utils._pytree import tree_map

import sdxl_core.compel_uploads as uploads
from sdxl_core.compel_uploads import provider_class, use_uploads
from sdxl_core.errors import InvalidConfigError
from sdxl_core.generate import GenerationRequest, PromptEncoder, generate
from sdxl_core.prompt_check import set_packrat_parsing

KIND = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
PIECES = ["a majestic wolf", "in a misty forest", "(oil on canvas)+++", "(blurry)0.5", "(b c)--", "(d)1.3",
          "highly detailed,", "(k)0.01", "wrong", "(soft light)-", "dawn"]
PROMPTS = ["", "wrong", "a majestic wolf in a misty forest at dawn, (oil on canvas)+++, highly detailed",
           "(a red fox)0.6 in snow", "a (cat)0 on a mat", " ".join(["(many words)+ here"] * 20),  # over 77 tokens
           '("a cat", "a dog").blend(0.3, 0.7)', '("a cat", "(a dog)0.5").and()']


def _random_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [", ".join(rng.choice(PIECES) for _ in range(rng.randint(1, 6))) for _ in range(n)]


@pytest.fixture(scope="module", autouse=True)
def packrat():
    set_packrat_parsing(True)
    yield
    set_packrat_parsing(False)


def _base_compel(pipes, **kwargs: Any) -> Compel:
    with contextlib.redirect_stdout(io.StringIO()):  # compel's deprecation note for the list form
        return Compel(tokenizer=[pipes.base.tokenizer, pipes.base.tokenizer_2],
                      text_encoder=[pipes.base.text_encoder, pipes.base.text_encoder_2],
                      returned_embeddings_type=KIND, requires_pooled=[False, True], **kwargs)


def _refiner_compel(pipes, **kwargs: Any) -> Compel:
    return Compel(tokenizer=pipes.refiner.tokenizer_2, text_encoder=pipes.refiner.text_encoder_2,
                  returned_embeddings_type=KIND, requires_pooled=True, **kwargs)


def _plain(value: Any) -> Any:
    return tree_map(lambda t: t.as_subclass(torch.Tensor) if isinstance(t, torch.Tensor) else t, value)


def _assert_identical(got: Any, want: Any, what: str) -> None:
    got, want = _plain(got), _plain(want)
    if isinstance(want, (tuple, list)):
        assert len(got) == len(want), what
        for i, (g, w) in enumerate(zip(got, want)):
            _assert_identical(g, w, f"{what}[{i}]")
        return
    assert _same_value(got, want), what


def _same_value(got: Any, want: Any) -> bool:
    if isinstance(want, torch.Tensor):
        return isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want)
    return got == want


@pytest.mark.parametrize("make", [_base_compel, _refiner_compel], ids=["base", "refiner"])
@pytest.mark.parametrize("options", [{}, {"downweight_mode": DownweightMode.REMOVE}, {"truncate_long_prompts": False}],
                         ids=["mask", "remove", "no-truncation"])
def test_embeddings_and_tokens_are_compels_own(tiny_pipes, make, options):
    theirs, ours = make(tiny_pipes, **options), make(tiny_pipes, **options)
    assert use_uploads(ours) == (2 if make is _base_compel else 1)
    for prompt in PROMPTS + _random_prompts(12, seed=3):
        _same_outcome(lambda c: c(prompt, return_tokenization=True), ours, theirs, prompt)
        _same_outcome(lambda c: c([prompt, "wrong"]), ours, theirs, f"batch of {prompt!r}")


def _same_outcome(call, ours: Compel, theirs: Compel, what: str) -> None:
    try:
        want = call(theirs)
    except Exception as exc:  # compel's own failures (a blend through two encoders, say) are ours too
        with pytest.raises(type(exc)):
            call(ours)
        return
    _assert_identical(call(ours), want, what)


def test_the_direct_path_covers_truncated_prompts_and_leaves_the_rest_to_compel(tiny_pipes, monkeypatch):
    calls: list[str] = []
    compel_build = EmbeddingsProvider.build_weighted_embedding_tensor

    def spy(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append("compel")
        return compel_build(self, *args, **kwargs)

    monkeypatch.setattr(EmbeddingsProvider, "build_weighted_embedding_tensor", spy)
    ours = _base_compel(tiny_pipes)
    use_uploads(ours)
    ours("a wolf, (oil on canvas)+++, (fog)0.5")
    assert calls == []
    long_prompts = _base_compel(tiny_pipes, truncate_long_prompts=False)
    use_uploads(long_prompts)
    long_prompts("a wolf, (oil on canvas)+++")
    assert calls == ["compel"] * 2  # one per provider: chunked prompts are compel's


class OnDevice(torch.Tensor):
    """A CPU tensor standing for one in device memory: reading its values on the host fails."""

    HOST_READS = {torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__,
                  torch.Tensor.__float__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.__iter__}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in cls.HOST_READS:
            raise AssertionError(f"a host read of a device value: {func.__name__}")
        return super().__torch_function__(func, types, args, kwargs or {})


class DeviceEncoder:
    """The real text encoder, called on plain tensors, its outputs handed back as ``OnDevice`` (the encoder's own
    host reads, which a CUDA graph replay does not have, are not what is tested)."""

    def __init__(self, encoder: torch.nn.Module):
        self.encoder = encoder

    def __getattr__(self, name: str) -> Any:
        if name == "encoder":
            raise AttributeError(name)
        return getattr(self.encoder, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.encoder(*_plain(args), **_plain(kwargs))
        return tree_map(lambda t: t.as_subclass(OnDevice) if isinstance(t, torch.Tensor) else t, out)


@pytest.mark.parametrize("mode", [DownweightMode.MASK, DownweightMode.REMOVE], ids=["mask", "remove"])
def test_the_direct_path_reads_no_device_value(tiny_pipes, monkeypatch, mode):
    monkeypatch.setattr(uploads, "upload", lambda tensor, device: tensor.to(device).as_subclass(OnDevice))
    with contextlib.redirect_stdout(io.StringIO()):
        ours = Compel(tokenizer=[tiny_pipes.base.tokenizer, tiny_pipes.base.tokenizer_2],
                      text_encoder=[DeviceEncoder(tiny_pipes.base.text_encoder),
                                    DeviceEncoder(tiny_pipes.base.text_encoder_2)],
                      returned_embeddings_type=KIND, requires_pooled=[False, True], downweight_mode=mode)
    use_uploads(ours)
    for provider in ours.conditioning_provider.embedding_providers:
        provider.empty_z  # noqa: B018  (made once per provider, before any image; compel's own code)
    theirs = _base_compel(tiny_pipes, downweight_mode=mode)
    for prompt in ["a majestic wolf, (oil on canvas)+++", "(a red fox)0.6 in snow, (soft light)-", "", "wrong"]:
        embeds, pooled = ours(prompt)
        assert type(embeds) is OnDevice and type(pooled) is OnDevice
        _assert_identical((embeds, pooled), theirs(prompt), prompt)


def test_use_uploads_refuses_a_provider_it_would_replace(tiny_pipes):
    class Custom(EmbeddingsProvider):
        pass

    compel = _refiner_compel(tiny_pipes)
    compel.conditioning_provider.__class__ = Custom
    with pytest.raises(InvalidConfigError, match="sync_free_compel off"):
        use_uploads(compel)
    assert type(compel.conditioning_provider) is Custom
    again = _refiner_compel(tiny_pipes)
    assert use_uploads(again) == use_uploads(again) == 1  # idempotent
    assert type(again.conditioning_provider) is provider_class()


def test_prompt_encoder_switches_both_compels_and_the_image_is_unchanged(tiny_pipes, fast_settings):
    from dataclasses import replace

    switched = replace(tiny_pipes, sync_free_compel=True)
    ours, theirs = PromptEncoder(switched), PromptEncoder(tiny_pipes)
    assert [type(p) for p in ours.base.conditioning_provider.embedding_providers] == [provider_class()] * 2
    assert type(ours.refiner.conditioning_provider) is provider_class()
    assert type(theirs.refiner.conditioning_provider) is EmbeddingsProvider
    request = GenerationRequest("a wolf, (oil on canvas)+++", 5, "(blurry)0.5, wrong", settings=fast_settings)
    assert generate(switched, request, ours).images[0].tobytes() == \
        generate(tiny_pipes, request, theirs).images[0].tobytes()
