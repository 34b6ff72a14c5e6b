"""sdxl_core.prompt_parse: the scan gives compel's own parse wherever it answers, and defers everywhere else."""

from __future__ import annotations

import random

import pytest

from sdxl_core.prompt_check import compel_parser, parse_cache_released, set_packrat_parsing
from sdxl_core.prompt_parse import fast_parse, parse
from sdxl_core.prompts_default import DEFAULT_PROMPTS
from sdxl_core.speed import DEFAULT_PROMPT

# Pieces of prompts: words the scan takes, groups it takes, and near misses of every rule it has.
WORDS = ["a", "wolf", "misty", "dawn,", "4k", "8K", "detailed.", "artist's", "f/1.8", "1.5", "hello!", "why?",
         "ratio:", "one;", ",", ".", "x2", "0", "oil", "on", "canvas", "close-up", "x-ray,", "1-2"]
GROUPS = ["(oil on canvas)+++", "(a)1.5", "(b c)--", "(d)-", "(e)+", "( f g )2", "(h)01.50", "(i)1.1", "(j)7",
          "(k)0.5", "(artist's work)++", "(4k)+", "(close-up shot)1.2", "(a-b)+", "(a)+++,,", "(a)+ (b)-", "(l)++++", "(m)-------", "(n)+++++++++++"]
NEAR_MISSES = ["wolf+", "wolf-", "wolf++", "(a)", "(a) +", "(a)+b", "(a)1.", "(a)1.5.2", "(a)-1", "(a)+-",
               "((a)+)+", "(a, b)+", '"a b"+', "(a)1e3", "a\\(b\\)", "(a).swap(b)", "(a).attend(1.2)",
               '("a", "b").blend(0.5, 0.5)', '("a", "b").and()', "withLora(x, 0.5)", "a=b", "(a\tb)+", "a\tb",
               "wolf(a)+", "(a)+.", "naïve", "(a.b)+", "(a,b)+", "()+", "a.and()", "-a",
               "+a", "a - b", "a--b", "well-,", "a -b", "a- b", "(a-)+", "(-a)+", "a-+"]


def _compel(prompt: str):
    with parse_cache_released():
        return compel_parser().parse_conjunction(prompt)


def _random_prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(1, 8)):
            kind = rng.random()
            pool = WORDS if kind < 0.55 else GROUPS if kind < 0.85 else NEAR_MISSES
            parts.append(rng.choice(pool))
        seps = [rng.choice([" ", " ", "  ", ",", ", ", ""]) for _ in parts]
        out.append(("" if rng.random() < 0.8 else " ") + "".join(p + s for p, s in zip(parts, seps)))
    return out


@pytest.fixture(scope="module", autouse=True)
def packrat():
    set_packrat_parsing(True)  # compel's parser on nested near misses, in milliseconds
    yield
    set_packrat_parsing(False)


def _same(ours, theirs) -> None:
    assert ours == theirs and repr(ours) == repr(theirs)
    for a, b in zip(ours.prompts[0].children, theirs.prompts[0].children):
        assert type(a.weight) is type(b.weight) is float and a.weight == b.weight


def test_the_default_prompts_take_the_fast_path_with_compels_result():
    for prompt in [DEFAULT_PROMPT, *DEFAULT_PROMPTS]:
        ours = fast_parse(prompt)
        assert ours is not None, prompt
        _same(ours, _compel(prompt))


@pytest.mark.parametrize("prompt", GROUPS + [" ".join(GROUPS), "a,(b)+,c", "(a)1.1 (b)+ c", "x  (y)-- ,z"])
def test_weighted_groups(prompt):
    ours = fast_parse(prompt)
    assert ours is not None
    _same(ours, _compel(prompt))


@pytest.mark.parametrize("prompt", NEAR_MISSES + ["", "   "])
def test_near_misses_go_to_compel(prompt):
    assert fast_parse(prompt) is None
    try:
        theirs = _compel(prompt)
    except Exception as exc:  # compel refuses some of them: so does parse(), with compel's error
        with pytest.raises(type(exc)):
            parse(prompt)
        return
    assert parse(prompt) == theirs and repr(parse(prompt)) == repr(theirs)


def test_generated_prompts_parse_as_compel_parses_them():
    prompts = _random_prompts(500, seed=0)
    taken = 0
    for prompt in prompts:
        ours = fast_parse(prompt)
        try:
            theirs = _compel(prompt)
        except Exception:
            assert ours is None, prompt  # the scan never answers where compel fails
            continue
        if ours is not None:
            taken += 1
            _same(ours, theirs)
        assert parse(prompt) == theirs, prompt
    # both paths were exercised: the generator makes plain prompts and near misses alike
    assert 150 <= taken <= 450, taken


def test_prompt_encoder_with_the_scan_makes_the_same_images_without_compels_parser(tiny_pipes, fast_settings,
                                                                                    monkeypatch):
    import dataclasses

    import numpy as np
    import torch
    from compel.prompt_parser import PromptParser

    from sdxl_core.generate import GenerationRequest, PromptEncoder, generate

    request = GenerationRequest(DEFAULT_PROMPT, 2, negative_prompt="blurry, (low quality)1.2", settings=fast_settings)
    plain = generate(tiny_pipes, request, PromptEncoder(tiny_pipes))
    parses = []
    original = PromptParser.parse_conjunction
    monkeypatch.setattr(PromptParser, "parse_conjunction", lambda self, p, *a, **k: parses.append(p) or
                        original(self, p, *a, **k))
    fast_pipes = dataclasses.replace(tiny_pipes, fast_prompt_parse=True)
    fast = generate(fast_pipes, request, PromptEncoder(fast_pipes))
    assert parses == []
    np.testing.assert_array_equal(np.asarray(fast.images[0]), np.asarray(plain.images[0]))
    torch.testing.assert_close(fast.latents, plain.latents, rtol=0, atol=0)
    # a prompt outside the scanned syntax goes through compel's parser, and still makes the same image
    other = dataclasses.replace(request, prompt="a wolf++ at dawn, (oil on canvas)1.2")  # word weights: not scanned
    fast_other = generate(fast_pipes, other, PromptEncoder(fast_pipes))
    assert parses == [other.prompt] * 2  # base and refiner compel; the negative prompt took the scan
    np.testing.assert_array_equal(np.asarray(fast_other.images[0]),
                                  np.asarray(generate(tiny_pipes, other, PromptEncoder(tiny_pipes)).images[0]))
