"""``--sdxl-*`` options over ``[tool.sdxl-bench]`` over defaults."""

from __future__ import annotations

import pytest

from sdxl_core.bench_config import DEFAULTS, OPTION_KEYS, option_name, read_pyproject, resolve
from sdxl_core.errors import InvalidConfigError

PYPROJECT = """
[project]
name = "x"

[tool.sdxl-bench]
base = "/models/sdxl-base"
seeds = [3, 4]
guidance-scale = 9
lora = ["wrong@v1=/l/v1.safetensors", "subject@v2=/l/s.safetensors"]

[tool.sdxl-bench.variants]
select = "baseline,mix"

[tool.sdxl-bench.variants.mix]
negative_prompt = "wrong"
loras = { "wrong@v1" = 1.0, "subject@v2" = 0.8 }
guidance_scale = 7.5
"""


def _table(tmp_path, text=PYPROJECT):
    (tmp_path / "pyproject.toml").write_text(text)
    return read_pyproject(tmp_path)


def test_defaults():
    c = resolve({}, {})
    assert c == DEFAULTS and c.base == "tiny" and c.seeds == (0, 1)
    assert c.feature_network() == "effnet-lite0" and c.clip_spec() == ("ViT-B-32", None, True)  # tiny: offline
    real = resolve({"base": "/models/sdxl"}, {})
    assert real.feature_network() == "inception" and real.clip_spec() == ("ViT-L-14", "openai", False)
    assert resolve({"clip_model": "ViT-B-16:/w/clip.bin"}, {}).clip_spec() == ("ViT-B-16", "/w/clip.bin", False)


def test_command_line_over_pyproject_over_defaults(tmp_path):
    table = _table(tmp_path)
    c = resolve({"seeds": "5", "steps": 12, "base": None}, table)
    assert c.seeds == (5,)  # command line
    assert c.steps == 12  # command line (not in pyproject)
    assert c.base == "/models/sdxl-base" and c.guidance_scale == 9.0  # pyproject
    assert c.high_noise_frac == 0.8  # default
    assert c.lora == ("wrong@v1=/l/v1.safetensors", "subject@v2=/l/s.safetensors")
    assert c.variants == ("baseline", "mix")
    (mix,) = c.declared_variants
    assert (mix.name, mix.negative_prompt, mix.loras, mix.guidance_scale) == (
        "mix", "wrong", (("wrong@v1", 1.0), ("subject@v2", 0.8)), 7.5)


def test_every_option_has_a_flag_name():
    assert option_name("guidance_scale") == "--sdxl-guidance-scale"
    assert {"base", "refiner", "vae", "lora", "prompts", "seeds", "steps", "guidance_scale", "high_noise_frac",
            "size", "variants", "reference", "clip_model", "fid_features", "run_dir", "run_id"} == set(OPTION_KEYS)


@pytest.mark.parametrize("cli, match", [
    ({"seeds": "1,x"}, "seed 'x' is not a whole number"),
    ({"seeds": "1,1"}, "repeat a seed"),
    ({"seeds": "-1"}, "seed '-1'"),
    ({"steps": 0}, "--sdxl-steps must be >= 1"),
    ({"steps": 2.5}, "steps must be a whole number"),
    ({"size": 100}, "multiple of 8"),
    ({"high_noise_frac": 1.0}, "between 0 and 1"),
    ({"guidance_scale": -1}, "outside 0-100"),
    ({"guidance_scale": 1e6}, "outside 0-100"),
    ({"guidance_scale": float("nan")}, "must be a number"),
    ({"fid_features": "vgg"}, "choose from effnet-lite0, inception"),
    ({"variants": "baseline,nope"}, "unknown variant.*nope"),
    ({"run_id": "../x"}, "--sdxl-run-id"),
])
def test_bad_command_line_values(cli, match):
    with pytest.raises(InvalidConfigError, match=match):
        resolve(cli, {})


@pytest.mark.parametrize("text, match", [
    ("[tool.sdxl-bench]\nbsae = 'x'\n", "unknown key 'bsae'"),
    ("[tool.sdxl-bench\n", "not valid TOML"),
    ("[tool.sdxl-bench.variants.v]\nloras = { 'wrong@v9' = 1 }\n", "uses LoRA wrong@v9, which no --sdxl-lora"),
    ("[tool.sdxl-bench.variants.baseline]\nnegative_prompt = 'x'\n", "reuse a built-in name"),
    ("[tool.sdxl-bench.variants.v]\ncfg = 3\n", "unknown key"),
    ("[tool.sdxl-bench]\nseeds = 3\n", "seeds must be a list"),
])
def test_bad_pyproject(tmp_path, text, match):
    with pytest.raises(InvalidConfigError, match=match):
        resolve({}, _table(tmp_path, text))


def test_no_pyproject_is_an_empty_table(tmp_path):
    assert read_pyproject(tmp_path) == {}
