"""sdxl_core.tokenizer: the CLIP BPE tokenizers built offline agree with open_clip's ViT-L-14 tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from sdxl_core.tokenizer import MAX_LENGTH, VOCAB_SIZE, build_clip_tokenizer, open_clip_vocab_path

BOS, EOS = 49406, 49407

LONG_PROMPT = " ".join(f"word{i}" for i in range(100))  # far more than 77 tokens: must truncate

PROMPTS = [
    "a wolf",
    "(a wolf)+++ in a forest",
    "a majestic wolf in a misty forest at dawn, (oil on canvas)+++, highly detailed",
    "A Majestic WOLF, in a misty forest; (oil on canvas)1.3 -- highly-detailed...",
    "(red:1.2) apple and a [cat|dog], (blurry)--",
    "it's 3.14159 o'clock, isn't it? we'll see (50% off) @home #tag $5",
    "café crème brûlée, naïve résumé, ÉCOLE ÜBER",
    "日本の狼 🐺 in snow, emoji 👩‍🚀",
    "  multiple   spaces\tand\nnewlines  ",
    "",
    LONG_PROMPT,
]


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    import open_clip

    return open_clip.get_tokenizer("ViT-L-14")


@pytest.fixture(scope="module")
def tokenizer():
    return build_clip_tokenizer()


@pytest.fixture(scope="module")
def tokenizer_2():
    return build_clip_tokenizer(pad_token="!")


def _ids(tok, prompt: str) -> list[int]:
    return tok(prompt, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids


def _reference(open_clip_tokenizer, prompt: str) -> list[int]:
    ids = open_clip_tokenizer([prompt])[0].tolist()
    assert len(ids) == MAX_LENGTH
    return ids


def test_vocab_file_is_the_one_open_clip_ships():
    import open_clip

    path = open_clip_vocab_path()
    assert path.is_file()
    assert path.parent == Path(open_clip.__file__).parent


def test_vocabulary_and_special_tokens(tokenizer, tokenizer_2):
    for tok in (tokenizer, tokenizer_2):
        assert len(tok) == VOCAB_SIZE == 49408
        assert tok.model_max_length == MAX_LENGTH == 77
        assert tok.bos_token_id == BOS
        assert tok.eos_token_id == EOS
        assert tok.convert_ids_to_tokens([BOS, EOS]) == ["<|startoftext|>", "<|endoftext|>"]
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == EOS
    assert tokenizer_2.pad_token == "!" and tokenizer_2.pad_token_id == 0


@pytest.mark.parametrize("prompt", PROMPTS, ids=lambda p: repr(p[:24]))
def test_tokenizer_matches_open_clip_up_to_end_token(tokenizer, open_clip_tokenizer, prompt):
    ref = _reference(open_clip_tokenizer, prompt)
    ids = _ids(tokenizer, prompt)
    assert len(ids) == MAX_LENGTH
    end = ref.index(EOS) + 1
    assert ids[:end] == ref[:end]
    # tokenizer pads with <|endoftext|> where open_clip pads with 0
    assert ids[end:] == [EOS] * (MAX_LENGTH - end)


@pytest.mark.parametrize("prompt", PROMPTS, ids=lambda p: repr(p[:24]))
def test_tokenizer_2_matches_open_clip_exactly(tokenizer_2, open_clip_tokenizer, prompt):
    assert "!" not in prompt
    assert _ids(tokenizer_2, prompt) == _reference(open_clip_tokenizer, prompt)


EXCLAIM_PROMPTS = ["wow! a wolf!!!", "hi!", "a!b"]


@pytest.mark.parametrize("prompt", EXCLAIM_PROMPTS)
def test_tokenizer_matches_open_clip_on_exclamation_marks(tokenizer, open_clip_tokenizer, prompt):
    ref = _reference(open_clip_tokenizer, prompt)
    end = ref.index(EOS) + 1
    assert _ids(tokenizer, prompt)[:end] == ref[:end]


@pytest.mark.xfail(strict=True, reason=(
    "known divergence: tokenizer_2's pad token '!' is a special token, so every '!' in a prompt is split out "
    "as id 0 ('!') instead of BPE-merged as open_clip does ('!</w>' = 256, '!!!</w>' = 995). This is how "
    "transformers treats SDXL's tokenizer_2 (pad '!') too; if it starts passing, update the docs and this test."))
@pytest.mark.parametrize("prompt", EXCLAIM_PROMPTS)
def test_tokenizer_2_exclamation_marks_divergence(tokenizer_2, open_clip_tokenizer, prompt):
    ref = _reference(open_clip_tokenizer, prompt)
    end = ref.index(EOS) + 1
    assert _ids(tokenizer_2, prompt)[:end] == ref[:end]


def test_long_prompt_truncates_to_77_with_end_token(tokenizer, tokenizer_2):
    untruncated = tokenizer(LONG_PROMPT).input_ids
    assert len(untruncated) > MAX_LENGTH
    for tok in (tokenizer, tokenizer_2):
        ids = _ids(tok, LONG_PROMPT)
        assert len(ids) == MAX_LENGTH
        assert ids[0] == BOS and ids[-1] == EOS
        assert ids[:-1] == untruncated[: MAX_LENGTH - 1]


def test_tokenizer_round_trips_text(tokenizer):
    ids = tokenizer("a majestic wolf, in a misty forest").input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "a majestic wolf , in a misty forest"


@pytest.mark.xfail(strict=True, reason=(
    "known divergence: open_clip cleans text with ftfy.fix_text + html.unescape (and treats '<|endoftext|>' in "
    "a prompt as plain text); the transformers CLIPTokenizer (NFC + whitespace + lowercase, as diffusers' SDXL "
    "tokenizers) does not. If this starts passing, the tokenizer changed: update the docs and this test."))
@pytest.mark.parametrize("prompt", ["fish &amp; chips", "a \u201cquoted\u201d wolf", "\ufb01ne ligature",
                                    "\uff21\uff22\uff23", "x <|endoftext|> y"])
def test_text_cleaning_divergence_from_open_clip(tokenizer, open_clip_tokenizer, prompt):
    ref = _reference(open_clip_tokenizer, prompt)
    end = ref.index(EOS) + 1
    assert _ids(tokenizer, prompt)[:end] == ref[:end]
