"""sdxl_core.prompt_check: token counts agree with open_clip and with what compel feeds the encoders; compel syntax
that is not read as meant is reported, and valid compel syntax is not."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
import types

import pytest
import torch

from sdxl_core.errors import InvalidConfigError
from sdxl_core.prompt_check import (A1111_BRACKETS, A1111_LORA, A1111_WEIGHT, DEEP_NESTING, MAX_PARSE_DEPTH,
                                    OPERATOR_AS_TEXT, TOO_LONG, UNBALANCED_PARENTHESIS, WARNINGS, PromptCheck,
                                    check_prompt, check_prompts, set_packrat_parsing)
from sdxl_core.tokenizer import build_clip_tokenizer

SHORT = "a majestic wolf in a misty forest at dawn, highly detailed"
_TEXT = (
    "a majestic grey wolf standing on a rocky ridge above a misty pine forest at dawn with golden light "
    "breaking through low clouds and soft fog rolling between the dark trees while a cold river winds "
    "through the valley below and distant snowy mountains glow pink under the rising sun and small birds "
    "circle over the water as dew shines on the moss and ferns along the trail and the wolf watches "
    "quietly with bright amber eyes and thick fur moving in the wind painted in the style of a classic "
    "oil landscape with rich texture deep shadows warm highlights and fine brushwork across the whole "
    "canvas for a calm yet powerful mood today"
)
LONG_100 = " ".join(_TEXT.split()[:100])
assert len(LONG_100.split()) == 100


def _parse(text: str):
    from compel.prompt_parser import PromptParser

    return PromptParser().parse_conjunction(text)


def _fragments(text: str) -> list:
    return [f for p in _parse(text).prompts for f in getattr(p, "children", [])]


@pytest.fixture(scope="module")
def open_clip_count():
    """Tokens open_clip's ViT-L-14 tokenizer gives (start/end included), with a context long enough not to cut."""
    import open_clip

    tok = open_clip.get_tokenizer("ViT-L-14")

    def count(prompt: str) -> int:
        ids = tok([prompt], context_length=1024)[0]
        return int((ids != 0).sum())  # 0 is the pad id (prompts here have no "!", whose id is also 0)

    return count


# ------------------------------------------------------------------------------------------- token counts

@pytest.mark.parametrize("prompt", [SHORT, LONG_100], ids=["short", "100-words"])
def test_token_count_matches_open_clip(prompt, open_clip_count):
    check = check_prompt(prompt)
    assert check.n_tokens == open_clip_count(prompt)
    assert check.max_tokens == 77
    assert check.truncated is (check.n_tokens > 77)


def test_short_prompt_is_clean_and_the_100_word_prompt_is_truncated(open_clip_count):
    short, long = check_prompt(SHORT), check_prompt(LONG_100)
    assert short.warnings == () and not short.truncated and short.n_tokens == 14
    assert long.truncated and long.n_tokens == open_clip_count(LONG_100) > 100
    assert long.codes == (TOO_LONG,)
    text = long.warnings[0]
    assert f"{long.n_tokens} tokens" in text
    assert "compel truncates it to 77 tokens, so the words after token 75 have no effect" in text
    dropped = text.split("(dropped: '", 1)[1].split("')", 1)[0]
    assert dropped.endswith("...") and dropped[:-3] in LONG_100  # the words as written, from token 76 on
    assert not LONG_100.startswith(dropped[:-3])


def test_count_is_taken_after_compel_syntax_is_removed(open_clip_count):
    from sdxl_core.metrics.clip import plain_prompt

    weighted = "(a majestic wolf)1.3 in a (misty forest)+++ at dawn, red+ apple--, (oil on canvas)0.8"
    check = check_prompt(weighted)
    assert check.warnings == ()
    assert check.n_tokens == open_clip_count(plain_prompt(weighted)) < open_clip_count(weighted)


def test_count_and_truncation_match_compels_own_tokenization():
    """compel's EmbeddingsProvider (what Compel uses): with its default truncate=True the encoder gets start +
    the first 75 prompt tokens + end (77); only truncate=False would make 77-token chunks."""
    from compel import Compel
    from compel.embeddings_provider import EmbeddingsProvider

    assert inspect.signature(Compel).parameters["truncate_long_prompts"].default is True
    tok = build_clip_tokenizer()
    prompt = LONG_100.replace("golden light", "(golden light)1.3").replace("misty", "misty+")
    fragments = _parse(prompt).prompts[0].children
    texts, weights = [f.text for f in fragments], [f.weight for f in fragments]
    n = check_prompt(prompt).n_tokens
    ours = tok(LONG_100, add_special_tokens=False, verbose=False)["input_ids"]

    def provider(truncate):
        return EmbeddingsProvider(tokenizer=tok, text_encoder=types.SimpleNamespace(device="cpu"), device="cpu",
                                  truncate=truncate, padding_attention_mask_value=0)

    ids, _, mask = provider(True).get_token_ids_and_expand_weights(texts, weights, device="cpu")
    assert ids.shape == (77,) and int(mask.sum()) == 77
    assert ids.tolist() == [tok.bos_token_id] + ours[:75] + [tok.eos_token_id]
    ids, _, mask = provider(False).get_token_ids_and_expand_weights(texts, weights, device="cpu")
    chunks = ids.shape[0] // 77
    assert chunks == 2 and int(mask.sum()) == n + 2 * (chunks - 1)  # each extra chunk adds start + end


def test_words_after_token_75_have_no_effect_in_generation(tiny_pipes):
    """The real PromptEncoder (compel, as generation uses it) on the tiny pipelines: changing a word past token
    75 leaves the embeddings (and pooled embeddings) bit-identical; changing the first word does not."""
    from sdxl_core.generate import PromptEncoder

    encoder = PromptEncoder(tiny_pipes)
    assert check_prompt(LONG_100).truncated
    late = LONG_100.rsplit(" ", 1)[0] + " tomorrow"
    early = "an" + LONG_100[1:]
    for compel in (encoder.base, encoder.refiner):
        (a, pa), (b, pb), (c, pc) = compel(LONG_100), compel(late), compel(early)
        assert a.shape[1] == 77
        assert torch.equal(a, b) and torch.equal(pa, pb)
        assert not torch.equal(a, c) and not torch.equal(pa, pc)
    # each .and() part is encoded on its own (77 positions each), which is why parts are counted separately
    both = f'("{LONG_100}", "a cat").and()'
    check = check_prompt(both)
    assert check.truncated and check.warnings[0].startswith("too-long: part 1 of 2")
    assert encoder.base(both)[0].shape[1] == 2 * 77


def test_parts_of_and_and_blend_are_counted_separately(open_clip_count):
    half = " ".join(LONG_100.split()[:40])
    check = check_prompt(f'("{half}", "{half}").and()')
    assert check.n_tokens == open_clip_count(half) <= 77 and not check.truncated and check.warnings == ()
    check = check_prompt(f'("a cat", "{LONG_100}").blend(0.5, 0.5)')
    assert check.truncated and check.warnings[0].startswith("too-long: part 2 of 2")


def test_second_tokenizer_counts_the_same():
    tok2 = build_clip_tokenizer(pad_token="!")  # SDXL's tokenizer_2
    for prompt in (SHORT, LONG_100, "(oil on canvas)+++ a wolf"):
        assert check_prompt(prompt, tokenizer=tok2).n_tokens == check_prompt(prompt).n_tokens


# ------------------------------------------------------------------------------------------- syntax

A1111_FIXES = [
    ("(cat:1.3)", "(cat:1.3)", "(cat)1.3", 1.3),
    ("a photo, (word:0.8)", "(word:0.8)", "(word)0.8", 0.8),
    ("a (red hair: 1.25), smile", "(red hair: 1.25)", "(red hair)1.25", 1.25),
    ("((cat:1.2))", "(cat:1.2)", "(cat)1.2", 1.2),
    ("(masterpiece:1.2), (best quality:1.4)", "(masterpiece:1.2)", "(masterpiece)1.2", 1.2),
    ("(dog:.5)", "(dog:.5)", "(dog)0.5", 0.5),
]


@pytest.mark.parametrize("prompt,found,fix,weight", A1111_FIXES)
def test_a1111_weight_is_reported_with_the_compel_form(prompt, found, fix, weight):
    # compel reads the A1111 form as plain text at weight 1.0 (the number becomes words)...
    frag = [f for f in _fragments(prompt) if found.split(":")[0].strip("( ") in f.text][0]
    assert frag.weight == 1.0 and ":" in frag.text
    check = check_prompt(prompt)
    assert A1111_WEIGHT in check.codes
    text = [w for w in check.warnings if w.startswith("a1111-weight:")][0]
    assert f"{found!r} at character {prompt.index(found) + 1}" in text
    assert f"Write {fix!r}" in text
    # ...and the suggested compel form carries the weight
    (parsed,) = _fragments(fix)
    assert parsed.weight == pytest.approx(weight) and parsed.text == fix[1:fix.index(")")]
    assert check_prompt(fix).warnings == ()


def test_a1111_brackets_and_lora_tags():
    assert [f.text for f in _fragments("[cat]")] == ["[cat]"]  # literal text to compel
    check = check_prompt("a dog, [cat], [red|blue] hat <lora:pixel:0.8>")
    assert check.codes == (A1111_BRACKETS, A1111_BRACKETS, A1111_LORA)
    assert "write '(cat)-'" in check.warnings[0]
    assert "no compel form" in check.warnings[1]
    assert "--lora" in check.warnings[2]
    (frag,) = _fragments("(cat)-")
    assert frag.weight == pytest.approx(0.9)


VALID_COMPEL = [
    "(oil on canvas)+++",
    "(word)1.3",
    '("a cat", "a dog").and()',
    '("a cat", "a dog").blend(0.7, 0.3)',
    "(cat, dog).and()",
    "a cat.swap(dog)",
    "a (red cat).swap(blue dog)",
    "red+ apple--",
    "a \\(literal\\) paren and an escaped \\(cat:1.3\\)",
    "(a (nested)1.2 group)0.9",
    "masterpiece, (best quality)1.2, 8k, sharp focus",
    SHORT,
]


@pytest.mark.parametrize("prompt", VALID_COMPEL)
def test_valid_compel_syntax_gives_no_warnings(prompt):
    check = check_prompt(prompt)
    assert check.warnings == (), check.warnings
    # and compel really reads it as syntax: no operator or unescaped paren left in its fragments
    texts = " ".join(f.text for p in _parse(prompt).prompts for f in getattr(p, "children", []) if hasattr(f, "text"))
    assert ".and(" not in texts and ".blend(" not in texts


def test_operator_on_unquoted_text_is_plain_text_to_compel():
    # e.g. "a cat.and()" is NOT a conjunction: compel keeps ".and()" as words of one prompt
    for prompt, literal in [("a cat.and()", "a cat.and()"), ("(a cat, a dog).and()", "a cat , a dog .and()")]:
        assert [f.text for f in _fragments(prompt)] == [literal]
        check = check_prompt(prompt)
        assert check.codes == (OPERATOR_AS_TEXT,)
        assert '("a cat", "a dog").and()' in check.warnings[0]


UNBALANCED = [  # prompt, (char, 1-based position) of each unmatched parenthesis
    ("a (cat", [("(", 3)]),
    ("a cat)", [(")", 6)]),
    ("((a cat)", [("(", 1)]),
    ("(a (b) c", [("(", 1)]),
    ("a (cat) dog)", [(")", 12)]),
    ("(red)1.5 apple (cat", [("(", 16)]),
    (") a (b", [(")", 1), ("(", 5)]),
]


@pytest.mark.parametrize("prompt,expected", UNBALANCED)
def test_unbalanced_parentheses_are_reported_where_they_are(prompt, expected):
    # compel keeps the unmatched parenthesis as literal text
    assert any(ch in f.text for f in _fragments(prompt) for ch, _ in expected)
    check = check_prompt(prompt)
    assert check.codes == (UNBALANCED_PARENTHESIS,) * len(expected)
    for text, (ch, pos) in zip(check.warnings, expected):
        assert text.startswith(f"unbalanced-parenthesis: {ch!r} at character {pos} ")
        assert prompt[pos - 1] == ch


def test_many_unmatched_parentheses_are_summarised():
    check = check_prompt("a) " * 12 + "cat")
    assert check.codes == (UNBALANCED_PARENTHESIS,) * 6
    assert check.warnings[-1] == "unbalanced-parenthesis: 7 more unmatched parentheses are not listed"


def test_deep_nesting_is_reported_without_running_compels_exponential_parser(open_clip_count):
    deep = "((((((masterpiece)))))), a cat"
    start = time.perf_counter()
    check = check_prompt(deep)
    pathological = check_prompt("(a wolf " * 50 + ")1.2 b")  # compel's parser: RecursionError
    assert time.perf_counter() - start < 2
    assert check.codes == (DEEP_NESTING,) and "6 levels" in check.warnings[0]
    assert check.n_tokens == open_clip_count("masterpiece, a cat")
    assert pathological.codes[:2] == (TOO_LONG, DEEP_NESTING)
    ok = check_prompt("(" * MAX_PARSE_DEPTH + "cat" + ")" * MAX_PARSE_DEPTH)  # still parsed by compel
    assert ok.warnings == ()


# A table of prompts and the warning codes each must give, in order; the test counts what it tried.
CASES = [
    ("a cat", ()),
    ("(oil on canvas)+++ wolf", ()),
    ("(word)1.3", ()),
    ('("a cat", "a dog").and()', ()),
    ('("a cat", "a dog").blend(0.3, 0.7)', ()),
    ("a cat.swap(dog)", ()),
    ("a \\(cat\\)", ()),
    ("(a (nested)1.2 group)0.9", ()),
    ("(cat:1.3)", (A1111_WEIGHT,)),
    ("(cat:1.3), (dog:0.7)", (A1111_WEIGHT, A1111_WEIGHT)),
    ("a [cat]", (A1111_BRACKETS,)),
    ("a <lora:style:0.7> cat", (A1111_LORA,)),
    ("a (cat", (UNBALANCED_PARENTHESIS,)),
    ("a cat)", (UNBALANCED_PARENTHESIS,)),
    ("((a cat)", (UNBALANCED_PARENTHESIS,)),
    ("a (cat:1.3", (UNBALANCED_PARENTHESIS,)),
    ("a cat.and()", (OPERATOR_AS_TEXT,)),
    ("(((((cat)))))", (DEEP_NESTING,)),
    (LONG_100, (TOO_LONG,)),
    (LONG_100 + " (cat:1.3)", (TOO_LONG, A1111_WEIGHT)),
    ("(" + LONG_100, (TOO_LONG, UNBALANCED_PARENTHESIS)),
]


def test_warning_table():
    tried, wrong = 0, []
    codes_seen = set()
    for prompt, expected in CASES:
        check = check_prompt(prompt)
        tried += 1
        codes_seen.update(check.codes)
        if check.codes != expected:
            wrong.append((prompt[:40], expected, check.codes))
        if (TOO_LONG in expected) != check.truncated:
            wrong.append((prompt[:40], "truncated", check.truncated))
    assert wrong == []
    assert tried == len(CASES) >= 15
    # every warning kind was exercised
    assert codes_seen == {TOO_LONG, DEEP_NESTING, UNBALANCED_PARENTHESIS, A1111_WEIGHT, A1111_BRACKETS, A1111_LORA,
                          OPERATOR_AS_TEXT}


def test_every_warning_starts_with_its_code():
    for code, template in WARNINGS.items():
        assert template.startswith(code.replace("-more", "") + ": ")


# ------------------------------------------------------------------------------------------- API

@pytest.mark.parametrize("bad", ["", "   \n\t", None, 3, b"a cat", ["a cat"]])
def test_empty_or_non_string_prompt_is_an_error(bad):
    with pytest.raises(InvalidConfigError):
        check_prompt(bad)


def test_prompt_of_only_syntax_is_an_error():
    with pytest.raises(InvalidConfigError, match="no words"):
        check_prompt("()")


def test_check_prompts():
    checks = check_prompts(["a cat", "(cat:1.3)", LONG_100])
    assert [c.codes for c in checks] == [(), (A1111_WEIGHT,), (TOO_LONG,)]
    with pytest.raises(InvalidConfigError, match="prompt #2"):
        check_prompts(["a cat", ""])
    with pytest.raises(InvalidConfigError, match="single string"):
        check_prompts("a cat")
    with pytest.raises(InvalidConfigError, match="empty"):
        check_prompts([])


def test_result_is_frozen_and_serialisable():
    check = check_prompt("(cat:1.3)")
    assert isinstance(check, PromptCheck)
    with pytest.raises(dataclasses.FrozenInstanceError):
        check.prompt = "x"  # type: ignore[misc]
    d = check.as_dict()
    assert d == {"prompt": "(cat:1.3)", "warnings": list(check.warnings), "n_tokens": check.n_tokens,
                 "max_tokens": 77, "truncated": False}
    skipped = check_prompt(LONG_100, tokenizer=False)
    assert skipped.n_tokens is None and not skipped.truncated and skipped.warnings == ()


def test_no_logging_or_output(caplog, capfd):
    """Nothing is logged or printed, not even transformers' 'sequence too long' warning (fresh tokenizer: that
    warning is given once per tokenizer)."""
    import transformers

    level = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_warning()
    try:
        with caplog.at_level(logging.DEBUG):
            check_prompts([LONG_100, "(cat:1.3)", "a (cat", "((((((x))))))"], tokenizer=build_clip_tokenizer())
            out = capfd.readouterr()
            assert caplog.records == [] and out.out == "" and out.err == ""
            build_clip_tokenizer()(LONG_100)  # the detector works: a plain call does warn
            out = capfd.readouterr()
            assert caplog.records or "longer than the specified maximum" in out.err
    finally:
        transformers.utils.logging.set_verbosity(level)


@pytest.mark.parametrize("parse", ["check_prompt", "plain_prompt"])
def test_parsing_keeps_no_caller_alive(parse):
    """With pyparsing's packrat cache on (as generation turns it on), a parse leaves no frame of its callers, and
    so none of their locals, alive afterwards: the cache's exceptions and their tracebacks are dropped."""
    import gc
    import weakref

    from sdxl_core.metrics.clip import plain_prompt

    fn = {"check_prompt": lambda text: check_prompt(text, tokenizer=False), "plain_prompt": plain_prompt}[parse]

    class Held:
        pass

    def caller() -> weakref.ref:
        held = Held()
        fn("a (red)++ cat, (oil on canvas)+++ [blurry]")
        return weakref.ref(held)

    try:
        set_packrat_parsing(True)
        ref = caller()
        gc.collect()
        assert ref() is None
    finally:
        set_packrat_parsing(False)
