import dataclasses

import pytest

from sdxl_core.errors import InvalidConfigError
from sdxl_core.prompts_default import DEFAULT_PROMPTS, read_prompts_file
from sdxl_core.variants import (BASELINE, VARIANTS, WRONG_LORA, WRONG_NEGATIVE, Variant, get_variant,
                                parse_variant_list)


def test_builtin_variants():
    assert BASELINE == Variant("baseline", None, 0.0, BASELINE.description)
    assert (WRONG_NEGATIVE.negative_prompt, WRONG_NEGATIVE.lora_scale) == ("wrong", 0.0)
    assert (WRONG_LORA.negative_prompt, WRONG_LORA.lora_scale) == ("wrong", 1.0)
    assert list(VARIANTS) == ["baseline", "wrong_negative", "wrong_lora"]
    assert [v.needs_lora for v in VARIANTS.values()] == [False, False, True]
    for v in VARIANTS.values():
        assert get_variant(v.name) is v and v.description


def test_variant_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        BASELINE.lora_scale = 1.0  # type: ignore[misc]


def test_unknown_variant_lists_valid_names():
    with pytest.raises(InvalidConfigError) as info:
        get_variant("wrong-lora")
    for name in VARIANTS:
        assert name in str(info.value)


def test_parse_variant_list():
    assert parse_variant_list("baseline, wrong_lora") == ("baseline", "wrong_lora")
    for bad in ("", "baseline,", "baseline,baseline", "baseline,nope"):
        with pytest.raises(InvalidConfigError):
            parse_variant_list(bad)


def test_default_prompts_are_varied():
    assert len(DEFAULT_PROMPTS) == 12
    assert len(set(DEFAULT_PROMPTS)) == 12
    text = " ".join(DEFAULT_PROMPTS)
    for word in ("wolf", "eye", "food", "newspaper", "portrait", "night", "+++"):
        assert word in text


def test_read_prompts_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# a comment\n\na cat\n  a dog  \n", encoding="utf-8")
    assert read_prompts_file(f) == ("a cat", "a dog")
    f.write_text("\n# only a comment\n", encoding="utf-8")
    with pytest.raises(InvalidConfigError, match="no prompts"):
        read_prompts_file(f)
    with pytest.raises(InvalidConfigError, match="not a file"):
        read_prompts_file(tmp_path / "missing.txt")
