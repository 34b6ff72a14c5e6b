"""sdxl_core.lora_files: versioned specs, safe and validated LoRA files, exact on/off/unload on the tiny base."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest
import torch

from sdxl_core.errors import InvalidConfigError, ModelNotFoundError
from sdxl_core.generate import GenerationRequest, PromptEncoder, generate
from sdxl_core.loading import load_pipelines
from sdxl_core.lora import random_lora_state_dict
from sdxl_core.lora_files import (DEFAULT_VERSION, LoraFileError, LoraNotFoundError, LoraSpecError, disable_loras,
                                  enable_loras, fuse_loras, load_loras, loaded_adapters, lora_adapter_name,
                                  lora_record, parse_lora_spec, read_lora_state_dict, resolve_lora_file,
                                  set_lora_weights, unfuse_loras, unload_loras, validate_lora_state_dict)

# peft's notes when a second adapter joins or an active one is deleted: expected here.
pytestmark = [pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning"),
              pytest.mark.filterwarnings("ignore:Adapter .* was active which is now deleted:UserWarning")]

PROMPT = "a majestic wolf in a misty forest at dawn, highly detailed"
SEED = 2


# --------------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------------


def _unet_fingerprint(unet) -> tuple:
    with torch.no_grad():
        return tuple(float(p.double().sum()) for p in unet.parameters())


@pytest.fixture(scope="module")
def own_pipes():
    """A private tiny base + refiner: these tests load LoRAs, which the shared tiny_pipes must never see."""
    pipes = load_pipelines("tiny", "tiny", device="cpu")
    return pipes, _unet_fingerprint(pipes.base.unet)


@pytest.fixture
def pipes(own_pipes):
    """The private pipelines, checked clean before and after each test (no adapters, original weights)."""
    pipes, fingerprint = own_pipes
    assert not loaded_adapters(pipes)
    yield pipes
    if pipes.base.num_fused_loras:
        unfuse_loras(pipes)
    unload_loras(pipes)
    assert not loaded_adapters(pipes)
    assert not getattr(pipes.refiner.unet, "peft_config", None)
    assert _unet_fingerprint(pipes.base.unet) == fingerprint, "a test left changed base UNet weights behind"


@pytest.fixture(scope="module")
def encoder(own_pipes):
    return PromptEncoder(own_pipes[0])


def _tiny_unet(**changes):
    """A fresh UNet of the tiny base's architecture (``changes`` alter its config): LoRAs are built on it, not on
    the pipelines, since random_lora_state_dict leaves (empty) peft wrappers on the UNet it uses."""
    from diffusers import UNet2DConditionModel

    from sdxl_core.presets import TINY_CONFIGS

    return UNet2DConditionModel.from_config(dict(TINY_CONFIGS.unet_base(), **changes))


@pytest.fixture(scope="module")
def lora_state():
    """A rank-4 diffusers-format LoRA for the tiny base UNet (lora.down/lora.up keys)."""
    return random_lora_state_dict(_tiny_unet(), rank=4, seed=0, std=0.2)


@pytest.fixture(scope="module")
def lora_state_2():
    return random_lora_state_dict(_tiny_unet(), rank=2, seed=1, std=0.2)


def _save(path, state, metadata=None):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


@pytest.fixture
def lora_file(tmp_path, lora_state):
    return _save(tmp_path / "wrong.safetensors", lora_state, {"trained_on": "wrong-negative", "format": "pt"})


def _run(pipes, encoder, settings, lora_scale=1.0):
    """(base latents, refiner image pixels) for the fixed prompt and seed."""
    out = generate(pipes, GenerationRequest(PROMPT, SEED, lora_scale=lora_scale, settings=settings), encoder)
    return out.latents.detach().clone(), np.asarray(out.images[0]).astype(np.int16)


@pytest.fixture(scope="module")
def baseline(own_pipes, encoder, fast_settings):
    pipes = own_pipes[0]
    assert not loaded_adapters(pipes)
    return _run(pipes, encoder, fast_settings)


def _same(a, b) -> bool:
    """Bit-identical latents and pixels."""
    return torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def _assert_clean(pipes):
    assert not loaded_adapters(pipes)
    attn = pipes.base.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    assert type(attn.to_q) is torch.nn.Linear  # no peft wrapper left behind


# --------------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, name, version, source, weight_name", [
    ("wrong@v1=path/to/file.safetensors", "wrong", "v1", "path/to/file.safetensors", None),
    ("wrong.lora@2024-01_a=/abs/x.safetensors", "wrong.lora", "2024-01_a", "/abs/x.safetensors", None),
    ("wrong=path/to/file.safetensors", "wrong", DEFAULT_VERSION, "path/to/file.safetensors", None),
    ("mine=runs/lr=1e-4/lora.safetensors", "mine", DEFAULT_VERSION, "runs/lr=1e-4/lora.safetensors", None),
    ("path/to/wrong.safetensors", "wrong", DEFAULT_VERSION, "path/to/wrong.safetensors", None),
    ("loras/wrong/pytorch_lora_weights.safetensors", "wrong", DEFAULT_VERSION,
     "loras/wrong/pytorch_lora_weights.safetensors", None),
    ("loras/wrong-v2/", "wrong-v2", DEFAULT_VERSION, "loras/wrong-v2/", None),
    ("../x.safetensors", "x", DEFAULT_VERSION, "../x.safetensors", None),
    ("/tmp/my lora!.bin", "my_lora_", DEFAULT_VERSION, "/tmp/my lora!.bin", None),
    ("/tmp/.hidden.safetensors", "hidden", DEFAULT_VERSION, "/tmp/.hidden.safetensors", None),
    ("owner/repo", "repo", DEFAULT_VERSION, "owner/repo", None),
    ("w@v3=owner/repo:sub/w.safetensors", "w", "v3", "owner/repo", "sub/w.safetensors"),
])
def test_parse_spec(text, name, version, source, weight_name):
    spec = parse_lora_spec(text)
    assert (spec.name, spec.version, spec.source, spec.weight_name) == (name, version, source, weight_name)
    assert spec.label == f"{name}@{version}"
    assert spec.allow_pickle is False
    assert parse_lora_spec(text, allow_pickle=True).allow_pickle is True


@pytest.mark.parametrize("text, message", [
    ("", "empty"),
    ("   ", "empty"),
    ("../x=a.safetensors", "not allowed"),
    ("/abs=a.safetensors", "not allowed"),
    ("/abs@v1=a.safetensors", "not allowed"),
    ("..@v1=a.safetensors", "not allowed"),
    (".hidden=a.safetensors", "not allowed"),
    ("a/b@v1=a.safetensors", "not allowed"),
    ("a@../x=a.safetensors", "not allowed"),
    ("a@v1/x=a.safetensors", "not allowed"),
    ("a..b=a.safetensors", "not allowed"),
    ("a b=a.safetensors", "not allowed"),
    ("a\x00b=a.safetensors", "NUL"),
    ("a.safetensors\x00", "NUL"),
    ("a@=a.safetensors", "empty version"),
    ("@v1=a.safetensors", "empty name"),
    ("=a.safetensors", "empty name"),
    ("a@v1@v2=a.safetensors", "more than one '@'"),
    ("a@v1=", "no path"),
    ("x" * 101 + "=a.safetensors", "not allowed"),
])
def test_parse_spec_refuses(text, message):
    with pytest.raises(LoraSpecError, match=message):
        parse_lora_spec(text)
    assert issubclass(LoraSpecError, InvalidConfigError)


def test_adapter_names_are_module_safe():
    assert lora_adapter_name("wrong.lora", "v1.2") == "wrong_lora__v1_2"
    assert parse_lora_spec("wrong@v1=x.safetensors").adapter_name == "wrong__v1"


# --------------------------------------------------------------------------------------------------
# Finding files
# --------------------------------------------------------------------------------------------------


def test_resolve_local_files_and_folders(tmp_path, lora_state):
    folder = tmp_path / "wrong"
    folder.mkdir()
    single = _save(folder / "any-name.safetensors", lora_state)
    assert resolve_lora_file(parse_lora_spec(str(folder))) == single
    default = _save(folder / "pytorch_lora_weights.safetensors", lora_state)
    assert resolve_lora_file(parse_lora_spec(str(folder))) == default
    assert resolve_lora_file(parse_lora_spec(f"w@v1={single}")) == single
    spec = parse_lora_spec(str(folder))
    assert resolve_lora_file(type(spec)(spec.name, spec.version, spec.source, "any-name.safetensors")) == single
    with pytest.raises(LoraSpecError, match="without '..'"):
        resolve_lora_file(type(spec)(spec.name, spec.version, spec.source, "../x.safetensors"))

    two = tmp_path / "two"
    two.mkdir()
    _save(two / "a.safetensors", lora_state)
    _save(two / "b.safetensors", lora_state)
    with pytest.raises(LoraFileError, match=r"holds 2 \.safetensors files \(a\.safetensors, b\.safetensors\)"):
        resolve_lora_file(parse_lora_spec(str(two)))

    pickles = tmp_path / "pickles"
    pickles.mkdir()
    torch.save(lora_state, pickles / "pytorch_lora_weights.bin")
    with pytest.raises(LoraFileError, match="--allow-pickle"):
        resolve_lora_file(parse_lora_spec(str(pickles)))
    assert resolve_lora_file(parse_lora_spec(str(pickles), allow_pickle=True)).name == "pytorch_lora_weights.bin"

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LoraNotFoundError, match="holds no LoRA weights file"):
        resolve_lora_file(parse_lora_spec(str(empty)))


def test_resolve_missing_path_and_offline_hub_miss(tmp_path, monkeypatch):
    with pytest.raises(LoraNotFoundError, match="does not exist"):
        resolve_lora_file(parse_lora_spec(f"w={tmp_path / 'nope.safetensors'}"))
    with pytest.raises(LoraNotFoundError, match="does not exist"):
        resolve_lora_file(parse_lora_spec("./nope/lora"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoraNotFoundError, match="HF_HUB_OFFLINE") as err:
        resolve_lora_file(parse_lora_spec("wrong@v1=nobody-xyz/no-such-lora:w.safetensors"))
    assert "nobody-xyz/no-such-lora" in str(err.value) and "w.safetensors" in str(err.value)
    assert isinstance(err.value, ModelNotFoundError) and isinstance(err.value, InvalidConfigError)
    with pytest.raises(LoraFileError, match="--allow-pickle"):
        resolve_lora_file(parse_lora_spec("nobody-xyz/no-such-lora:w.bin"))


# --------------------------------------------------------------------------------------------------
# Malformed files: a clear error naming the file, and nothing loaded
# --------------------------------------------------------------------------------------------------


def _valid_bytes(state) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()})


def _first_key(state, part):
    return next(k for k in state if part in k)


def _malformed(kind, state):
    """(file name, bytes or state dict, expected message pattern) for one kind of broken LoRA file."""
    valid = _valid_bytes(state)
    header_len = struct.unpack("<Q", valid[:8])[0]
    down = _first_key(state, "lora.down")
    up = down.replace("lora.down", "lora.up")
    if kind == "empty":
        return b"", r"is empty \(0 bytes\)"
    if kind == "tiny":
        return b"\x01\x02", "truncated or not a safetensors file: 2 bytes"
    if kind == "truncated":
        return valid[: len(valid) - 100], "truncated or corrupted: tensor .* data offsets"
    if kind == "truncated_header":
        return valid[: 8 + header_len // 2], f"truncated or not a safetensors file: its header claims {header_len}"
    if kind == "garbage":
        return b"this is not a safetensors file, just some text\n" * 4, \
            "not a safetensors file .*header length of \\d+ bytes, more than the 100000000-byte limit"
    if kind == "absurd_header":
        return struct.pack("<Q", 2 ** 62) + b"{}", "header length of 4611686018427387904 bytes"
    if kind == "bad_json":
        return struct.pack("<Q", 12) + b"not json!!!!", "header is not valid JSON"
    if kind == "header_not_object":
        return struct.pack("<Q", 2) + b"[]", "header is not a JSON object"
    if kind == "offsets_beyond":
        header = json.dumps({"unet.a.lora_A.weight": {"dtype": "F32", "shape": [4, 64], "data_offsets": [0, 1024]}})
        return struct.pack("<Q", len(header)) + header.encode() + b"\0" * 16, \
            r"data offsets \[0, 1024\] beyond the 16 bytes"
    if kind == "pickle_as_safetensors":
        import io

        buf = io.BytesIO()
        torch.save(state, buf)
        return buf.getvalue(), "looks like a PyTorch pickle checkpoint"
    if kind == "no_tensors":
        return {}, "holds no tensors"
    if kind == "float64":
        return dict(state, **{down: state[down].double()}), f"unsupported dtype: '{down} \\(F64\\)'"
    if kind == "int32":
        return dict(state, **{up: state[up].to(torch.int32)}), f"unsupported dtype: '{up} \\(I32\\)'"
    if kind == "non_lora_keys":
        return dict(state, **{"unet.conv_in.weight": torch.zeros(32, 4, 3, 3)}), \
            "1 key\\(s\\) that are not LoRA keys: 'unet.conv_in.weight'"
    if kind == "unprefixed":
        return {k.removeprefix("unet."): v for k, v in state.items()}, "must start with unet\\., text_encoder\\."
    if kind == "dora":
        return dict(state, **{down.replace("lora.down.weight", "lora_magnitude_vector"): torch.ones(64)}), "DoRA"
    if kind == "nan":
        t = state[down].clone()
        t[0, 0] = float("nan")
        return dict(state, **{down: t}), f"NaN or inf weights in 1 tensor\\(s\\): '{down}' \\(NaN\\)"
    if kind == "inf":
        t = state[up].clone()
        t[1, 1] = float("-inf")
        return dict(state, **{up: t}), f"'{up}' \\(inf\\)"
    if kind == "rank_mismatch":
        return dict(state, **{up: state[up][:, :3].clone()}), "rank mismatch at .*has rank 4 but lora_B .* has rank 3"
    if kind == "missing_up":
        return {k: v for k, v in state.items() if k != up}, "has lora_A but no lora_B"
    if kind == "unknown_module":
        bad = {k.replace("down_blocks.1.attentions.0", "down_blocks.7.attentions.0"): v for k, v in state.items()}
        return bad, "layer\\(s\\) that this base model's unet does not have: 'unet.down_blocks.7"
    if kind == "wrong_ndim":
        return dict(state, **{down: state[down][:, :, None, None].clone()}), "4-D.*needs 2-D LoRA matrices"
    if kind == "non_linear_target":
        return {"unet.down_blocks.0.resnets.0.norm1.lora_A.weight": torch.zeros(4, 32),
                "unet.down_blocks.0.resnets.0.norm1.lora_B.weight": torch.zeros(32, 4)}, \
            "a GroupNorm; only Linear and Conv2d"
    raise AssertionError(kind)


MALFORMED = ["empty", "tiny", "truncated", "truncated_header", "garbage", "absurd_header", "bad_json",
             "header_not_object", "offsets_beyond", "pickle_as_safetensors", "no_tensors", "float64", "int32",
             "non_lora_keys", "unprefixed", "dora", "nan", "inf", "rank_mismatch", "missing_up", "unknown_module",
             "wrong_ndim", "non_linear_target"]


@pytest.mark.parametrize("kind", MALFORMED)
def test_malformed_file_is_refused_and_nothing_loaded(kind, pipes, lora_state, tmp_path):
    content, pattern = _malformed(kind, lora_state)
    path = tmp_path / f"broken-{kind}.safetensors"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        _save(path, content)
    with pytest.raises(LoraFileError, match=pattern) as err:
        load_loras(pipes, [f"broken@{kind}={path}"])
    assert str(path) in str(err.value)
    _assert_clean(pipes)


@pytest.mark.parametrize("cross_attention_dim, block_out, message", [
    (96, 64, r"unet\.down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k\.lora_A\.weight has shape "
               r"\(4, 96\) .*: in_features 96 expected 64"),
    (64, 128, r"(in|out)_features 128 expected 64"),
])
def test_lora_for_another_model_names_the_dimension(pipes, tmp_path, cross_attention_dim, block_out, message):
    other = _tiny_unet(cross_attention_dim=cross_attention_dim, block_out_channels=[32, block_out])
    path = _save(tmp_path / "other-model.safetensors", random_lora_state_dict(other, rank=4))
    with pytest.raises(LoraFileError, match=message) as err:
        load_loras(pipes, [f"other@v1={path}"])
    assert str(path) in str(err.value) and "another base model" in str(err.value)
    _assert_clean(pipes)


def test_text_encoder_keys_need_the_encoder(own_pipes, tmp_path):
    base = own_pipes[0].base
    te = base.text_encoder
    hidden = te.config.hidden_size
    state = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(2, hidden),
             "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(hidden, 2)}
    encoders = {"text_encoder": te, "text_encoder_2": base.text_encoder_2}
    check = validate_lora_state_dict(state, base.unet, "te.safetensors", text_encoders=encoders)
    assert check.components == ("text_encoder",) and check.ranks == (2,)
    with pytest.raises(LoraFileError, match="te.safetensors adapts text_encoder, which this base pipeline does not"):
        validate_lora_state_dict(state, base.unet, "te.safetensors", text_encoders={"text_encoder": None})
    with pytest.raises(LoraFileError, match="adapts text_encoder"):
        validate_lora_state_dict(state, base.unet, "te.safetensors")
    wrong = {k: v[:, :-1] if "lora_A" in k else v for k, v in state.items()}
    with pytest.raises(LoraFileError, match=f"in_features {hidden - 1} expected {hidden}"):
        validate_lora_state_dict(wrong, base.unet, "te.safetensors", text_encoders=encoders)


def _text_encoder_lora(encoder, component, rank=2):
    """A peft-format LoRA on the q_proj of the first layer of ``encoder``."""
    hidden = encoder.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    module = "text_model.encoder.layers.0.self_attn.q_proj"
    return {f"{component}.{module}.lora_A.weight": torch.randn(rank, hidden, generator=gen) * 0.1,
            f"{component}.{module}.lora_B.weight": torch.randn(hidden, rank, generator=gen) * 0.1}


def test_text_encoder_loras_stay_off_the_refiner(pipes, tmp_path):
    te1 = _save(tmp_path / "te1.safetensors", _text_encoder_lora(pipes.base.text_encoder, "text_encoder"))
    (record,) = load_loras(pipes, [f"te@v1={te1}"])
    assert record.components == ("text_encoder",)
    assert pipes.base.get_list_adapters() == {"text_encoder": ["te__v1"]}
    unload_loras(pipes)
    # text_encoder_2 is the refiner's encoder too: a LoRA on it would reach the refiner, so it is refused
    te2 = _save(tmp_path / "te2.safetensors", _text_encoder_lora(pipes.base.text_encoder_2, "text_encoder_2"))
    with pytest.raises(LoraFileError, match="te2.safetensors adapts text_encoder_2, which the base shares with the "
                                            "refiner"):
        load_loras(pipes, [f"te@v2={te2}"])
    _assert_clean(pipes)
    assert not getattr(pipes.base.text_encoder_2, "peft_config", None)


def test_failed_load_removes_the_partial_adapter(pipes, lora_file, lora_state_2, tmp_path, monkeypatch):
    """diffusers loads the UNet part, then fails on a text encoder: the UNet adapter is taken off again."""
    def boom(*args, **kwargs):
        raise RuntimeError("simulated failure after the UNet adapter was added")

    monkeypatch.setattr(pipes.base, "load_lora_into_text_encoder", boom)
    with pytest.raises(LoraFileError, match="nothing was left loaded.*simulated failure") as err:
        load_loras(pipes, [f"wrong@v1={lora_file}"])
    assert str(lora_file) in str(err.value)
    _assert_clean(pipes)

    # With another LoRA already loaded, only the failed one goes.
    monkeypatch.undo()
    other = _save(tmp_path / "other.safetensors", lora_state_2)
    load_loras(pipes, [f"other@v1={other}"])
    monkeypatch.setattr(pipes.base, "load_lora_into_text_encoder", boom)
    with pytest.raises(LoraFileError, match="simulated failure"):
        load_loras(pipes, [f"wrong@v1={lora_file}"])
    assert loaded_adapters(pipes) == ["other__v1"]
    attn = pipes.base.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    assert set(attn.to_q.lora_A) == {"other__v1"}


# --------------------------------------------------------------------------------------------------
# Pickle
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".bin", ".ckpt", ".pt", ".pth"])
def test_pickle_is_refused_unless_allowed(pipes, lora_state, tmp_path, suffix):
    path = tmp_path / f"wrong{suffix}"
    torch.save(lora_state, path)
    with pytest.raises(LoraFileError, match="--allow-pickle") as err:
        load_loras(pipes, [f"wrong@v1={path}"])
    assert str(path) in str(err.value)
    with pytest.raises(LoraFileError, match="--allow-pickle"):
        read_lora_state_dict(path)
    _assert_clean(pipes)
    if suffix == ".bin":
        (record,) = load_loras(pipes, [parse_lora_spec(f"wrong@v1={path}", allow_pickle=True)])
        assert record.file_format == "pickle"
        assert record.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        assert loaded_adapters(pipes) == ["wrong__v1"]


def test_allowed_pickle_is_still_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.bin"
    torch.save({"unet.a.lora_A.weight": torch.zeros(1), "x": Evil()}, path)
    with pytest.raises(LoraFileError, match="evil.bin could not be read as a PyTorch checkpoint"):
        read_lora_state_dict(path, allow_pickle=True)


# --------------------------------------------------------------------------------------------------
# Loading, switching off, unloading, fusing
# --------------------------------------------------------------------------------------------------


def test_lora_changes_image_and_switching_off_restores_it_exactly(pipes, encoder, fast_settings, baseline, lora_file):
    (record,) = load_loras(pipes, [f"wrong@v1={lora_file}"])
    assert loaded_adapters(pipes) == ["wrong__v1"] == pipes.base.get_active_adapters()
    assert not getattr(pipes.refiner.unet, "peft_config", None)  # the refiner never gets the base's LoRA
    assert not any("lora" in n for n, _ in pipes.refiner.unet.named_parameters())
    assert record.components == ("unet",) and record.ranks == (4,) and record.key_format == "diffusers_old"

    with_lora = _run(pipes, encoder, fast_settings)
    assert not torch.equal(with_lora[0], baseline[0])
    assert np.abs(with_lora[1] - baseline[1]).max() > 0, "the LoRA did not change the image"

    set_lora_weights(pipes, ["wrong__v1"], [0.0])
    assert _same(_run(pipes, encoder, fast_settings), baseline)
    set_lora_weights(pipes, ["wrong__v1"], [1.0])
    assert _same(_run(pipes, encoder, fast_settings), with_lora)

    disable_loras(pipes)
    assert _same(_run(pipes, encoder, fast_settings), baseline)
    enable_loras(pipes)
    assert _same(_run(pipes, encoder, fast_settings), with_lora)

    unload_loras(pipes)
    _assert_clean(pipes)
    assert _same(_run(pipes, encoder, fast_settings), baseline)


def test_fuse_matches_unfused_and_unfuse_restores(pipes, encoder, fast_settings, baseline, lora_file):
    load_loras(pipes, [f"wrong@v1={lora_file}"])
    unfused = _run(pipes, encoder, fast_settings)
    snapshot = {k: v.clone() for k, v in pipes.base.unet.state_dict().items()}
    fuse_loras(pipes)
    assert pipes.base.num_fused_loras == 1
    fused = _run(pipes, encoder, fast_settings)
    assert torch.allclose(fused[0], unfused[0], atol=1e-4, rtol=1e-4)
    assert np.abs(fused[1] - unfused[1]).max() <= 2
    unfuse_loras(pipes)
    assert pipes.base.num_fused_loras == 0
    after = _run(pipes, encoder, fast_settings)
    assert torch.allclose(after[0], unfused[0], atol=1e-4, rtol=1e-4)
    assert np.abs(after[1] - unfused[1]).max() <= 2
    unload_loras(pipes)
    with torch.no_grad():  # undo unfuse's float rounding, so later tests see the exact original weights
        pipes.base.unet.load_state_dict({k.replace(".base_layer", ""): v for k, v in snapshot.items()
                                         if "lora_" not in k})
    assert torch.allclose(_run(pipes, encoder, fast_settings)[0], baseline[0])


def test_two_adapters_with_weights(pipes, encoder, fast_settings, baseline, lora_file, lora_state_2, tmp_path):
    second = _save(tmp_path / "style.safetensors", lora_state_2)
    load_loras(pipes, [f"wrong@v1={lora_file}"])
    only_first = _run(pipes, encoder, fast_settings)
    unload_loras(pipes)

    records = load_loras(pipes, [f"wrong@v1={lora_file}", f"style@v2={second}"], weights=[1.0, 0.0])
    assert [r.adapter_name for r in records] == ["wrong__v1", "style__v2"]
    assert [r.weight for r in records] == [1.0, 0.0]
    assert sorted(pipes.base.get_active_adapters()) == ["style__v2", "wrong__v1"]
    assert _same(_run(pipes, encoder, fast_settings), only_first)
    set_lora_weights(pipes, ["wrong__v1", "style__v2"], [0.0, 0.0])
    assert _same(_run(pipes, encoder, fast_settings), baseline)
    set_lora_weights(pipes, ["wrong__v1", "style__v2"], [0.5, 1.0])
    both = _run(pipes, encoder, fast_settings)
    assert not torch.equal(both[0], only_first[0]) and not torch.equal(both[0], baseline[0])


def test_load_refuses_duplicates_and_bad_weights(pipes, lora_file):
    with pytest.raises(InvalidConfigError, match="would share adapter name 'wrong__v1'"):
        load_loras(pipes, [f"wrong@v1={lora_file}", f"wrong@v1={lora_file}"])
    with pytest.raises(InvalidConfigError, match="1 LoRA weight\\(s\\) for 2 LoRA"):
        load_loras(pipes, [f"a@v1={lora_file}", f"b@v1={lora_file}"], weights=[1.0])
    with pytest.raises(InvalidConfigError, match="must be a finite number"):
        load_loras(pipes, [f"a@v1={lora_file}"], weights=[float("nan")])
    _assert_clean(pipes)
    load_loras(pipes, [f"wrong@v1={lora_file}"])
    with pytest.raises(InvalidConfigError, match="already loaded"):
        load_loras(pipes, [f"wrong@v1={lora_file}"])
    load_loras(pipes, [f"wrong@v2={lora_file}"])  # another version loads beside it
    assert loaded_adapters(pipes) == ["wrong__v1", "wrong__v2"]


# --------------------------------------------------------------------------------------------------
# Records, kohya files, diffusers adapter metadata
# --------------------------------------------------------------------------------------------------


def test_record_has_hash_size_and_metadata(pipes, lora_file):
    (record,) = load_loras(pipes, [f"wrong@v1={lora_file}"], weights=[0.75])
    data = lora_file.read_bytes()
    assert record.sha256 == hashlib.sha256(data).hexdigest()
    assert record.size_bytes == len(data)
    assert dict(record.metadata) == {"trained_on": "wrong-negative", "format": "pt"}
    assert record.path == str(lora_file) and record.label == "wrong@v1" and record.weight == 0.75
    assert record.n_modules == len(read_lora_state_dict(lora_file)) // 2 == 96
    d = record.as_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["metadata"]["trained_on"] == "wrong-negative" and d["version"] == "v1"
    streamed = lora_record(parse_lora_spec(f"wrong@v1={lora_file}"), lora_file)
    assert (streamed.sha256, streamed.size_bytes, streamed.metadata) == \
        (record.sha256, record.size_bytes, record.metadata)
    with pytest.raises(Exception):
        record.sha256 = "x"  # frozen


def _to_kohya(state):
    """diffusers-format UNet LoRA -> kohya names (lora_unet_<module>.lora_down/lora_up.weight + float alpha)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft

    kohya = convert_state_dict_to_kohya(convert_unet_state_dict_to_peft(state))
    return {k: (v.float() if k.endswith(".alpha") else v) for k, v in kohya.items()}


def test_kohya_file_loads_like_the_diffusers_file(pipes, encoder, fast_settings, lora_state, lora_file, tmp_path):
    kohya = _to_kohya(lora_state)
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in kohya
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in kohya
    kohya_file = _save(tmp_path / "wrong_kohya.safetensors", kohya)

    load_loras(pipes, [f"wrong@diffusers={lora_file}"])
    reference = _run(pipes, encoder, fast_settings)
    unload_loras(pipes)
    (record,) = load_loras(pipes, [f"wrong@kohya={kohya_file}"])
    assert record.key_format == "kohya" and record.n_modules == 96 and record.ranks == (4,)
    got = _run(pipes, encoder, fast_settings)
    assert torch.allclose(got[0], reference[0], atol=1e-5, rtol=1e-5)
    assert np.abs(got[1] - reference[1]).max() <= 1

    # kohya alpha scales the LoRA by alpha/rank; int64 alphas (as diffusers' own converter writes) are accepted
    unload_loras(pipes)
    halved = dict(kohya, **{k: torch.tensor(2) for k in kohya if k.endswith(".alpha")})
    load_loras(pipes, [f"wrong@half={_save(tmp_path / 'half.safetensors', halved)}"])
    assert _lora_scaling(pipes, "wrong__half") == 0.5


def test_kohya_shapes_for_another_model_are_refused(pipes, lora_state, tmp_path):
    kohya = _to_kohya(lora_state)
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    kohya[key] = torch.zeros(4, 2048)
    path = _save(tmp_path / "sdxl_kohya.safetensors", kohya)
    with pytest.raises(LoraFileError, match="attn2.to_k.lora_A.weight has shape \\(4, 2048\\).*in_features 2048 "
                                            "expected 64"):
        load_loras(pipes, [f"k@v1={path}"])
    _assert_clean(pipes)


def _lora_scaling(pipes, adapter):
    to_q = pipes.base.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q
    return to_q.scaling[adapter]


def test_diffusers_adapter_metadata_is_honoured(pipes, lora_state, tmp_path):
    """A file saved by diffusers with its LoraConfig (lora_alpha 8, rank 4) is scaled by 2, as diffusers does."""
    from diffusers import StableDiffusionXLPipeline

    config = {"r": 4, "lora_alpha": 8, "target_modules": ["to_k", "to_q", "to_v", "to_out.0"]}
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path, unet_lora_layers={k.removeprefix("unet."): v for k, v in lora_state.items()},
        unet_lora_adapter_metadata=config)
    (record,) = load_loras(pipes, [f"meta@v1={tmp_path}"])
    assert record.path == str(tmp_path / "pytorch_lora_weights.safetensors")
    assert "lora_adapter_metadata" in dict(record.metadata)
    assert _lora_scaling(pipes, "meta__v1") == 2.0


def test_kohya_sgm_block_names_map_onto_the_base(own_pipes):
    """kohya trains SDXL on sgm's UNet (input_blocks/middle_block/output_blocks); diffusers maps the names."""
    unet = own_pipes[0].base.unet
    state = {}
    for name in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                 "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_out_0",
                 "lora_unet_output_blocks_0_1_transformer_blocks_1_attn2_to_k"):
        state.update({f"{name}.lora_down.weight": torch.zeros(4, 64), f"{name}.lora_up.weight": torch.zeros(64, 4),
                      f"{name}.alpha": torch.tensor(4.0)})
    check = validate_lora_state_dict(state, unet, "sgm.safetensors")
    assert (check.key_format, check.components, check.n_modules, check.ranks) == ("kohya", ("unet",), 3, (4,))
    state["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_down.weight"] = torch.zeros(4, 2048)
    state["lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k.lora_up.weight"] = torch.zeros(64, 4)
    with pytest.raises(LoraFileError, match="down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.lora_A.weight "
                                            "has shape \\(4, 2048\\).*in_features 2048 expected 64"):
        validate_lora_state_dict(state, unet, "sgm.safetensors")


def test_generating_at_lora_scale_zero_resets_adapter_weights(pipes, encoder, fast_settings, lora_file):
    """diffusers quirk the harness must live with: a call with cross_attention_kwargs scale 0 ends by setting every
    active adapter's weight back to 1 (unscale_lora_layers), so weights must be set again after such a call."""
    load_loras(pipes, [f"wrong@v1={lora_file}"], weights=[0.5])
    assert _lora_scaling(pipes, "wrong__v1") == 0.5
    _run(pipes, encoder, fast_settings, lora_scale=0.0)
    assert _lora_scaling(pipes, "wrong__v1") == 1.0
    set_lora_weights(pipes, ["wrong__v1"], [0.5])
    assert _lora_scaling(pipes, "wrong__v1") == 0.5
