"""sdxl_core.loading: bad model references fail before any loading, with the fix in the message."""

from __future__ import annotations

import shutil
import time

import pytest
import torch

from sdxl_core import presets
from sdxl_core.errors import InvalidConfigError, ModelNotFoundError, SdxlBenchError
from sdxl_core.loading import Pipelines, load_pipelines, resolve_dtype


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if any pipeline or model weights are read (the checks must come first)."""
    import diffusers

    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError(f"from_pretrained called with {args}: the input should have been refused first")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", refuse)
    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", refuse)
    return calls


@pytest.fixture(scope="module")
def tiny_folders():
    return presets.ensure_tiny()


def test_errors_are_value_errors():
    for cls in (ModelNotFoundError, InvalidConfigError):
        assert issubclass(cls, SdxlBenchError) and issubclass(cls, ValueError)


def test_nonexistent_folder(no_loading):
    with pytest.raises(ModelNotFoundError, match=r"neither a folder nor a hub id.*check the path"):
        load_pipelines("./nope/base", device="cpu")
    assert not no_loading


def test_folder_without_model_index(tmp_path, no_loading):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelNotFoundError, match="no model_index.json") as info:
        load_pipelines(str(tmp_path), device="cpu")
    assert str(tmp_path) in str(info.value)
    assert "save_pretrained" in str(info.value)  # the fix: point at a save_pretrained folder


def test_file_instead_of_folder(tmp_path, no_loading):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="is a file, not a diffusers pipeline folder"):
        load_pipelines(str(f), device="cpu")


def test_refiner_folder_missing_unet(tmp_path, tiny_folders, no_loading):
    base, refiner = tiny_folders
    broken = tmp_path / "refiner"
    shutil.copytree(refiner, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(ModelNotFoundError, match=r"refiner folder .* is missing unet") as info:
        load_pipelines(str(base), str(broken), device="cpu")
    assert "copy the complete pipeline folder" in str(info.value)
    assert not no_loading


def test_hub_id_offline_fails_fast(monkeypatch, no_loading):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as info:
        load_pipelines("stabilityai/stable-diffusion-xl-base-1.0", device="cpu")
    assert time.perf_counter() - t0 < 5
    msg = str(info.value)
    assert "stabilityai/stable-diffusion-xl-base-1.0" in msg
    assert "not available locally" in msg
    assert "HF_HUB_OFFLINE" in msg
    assert "local diffusers folder" in msg


def test_hub_refiner_offline_fails_before_the_base_loads(monkeypatch, tiny_folders, no_loading):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="refiner .* not available locally"):
        load_pipelines(str(tiny_folders[0]), "stabilityai/stable-diffusion-xl-refiner-1.0", device="cpu")


def test_hub_vae_offline_fails_before_loading(monkeypatch, tiny_folders, no_loading):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="vae .* not available locally"):
        load_pipelines(str(tiny_folders[0]), vae="madebyollin/sdxl-vae-fp16-fix", device="cpu")


def test_empty_model_name(no_loading):
    with pytest.raises(ModelNotFoundError, match="empty"):
        load_pipelines("  ", device="cpu")


@pytest.mark.parametrize("dtype", ["float8", "half-ish", "int8"])
def test_unknown_dtype(dtype, no_loading):
    with pytest.raises(InvalidConfigError, match=rf"unknown dtype '{dtype}'.*float16"):
        load_pipelines("tiny", "tiny", device="cpu", dtype=dtype)


def test_tiny_refiner_needs_tiny_base(tmp_path, no_loading):
    with pytest.raises(InvalidConfigError, match="only pairs with --base tiny"):
        load_pipelines(str(tmp_path), "tiny", device="cpu")


def test_resolve_dtype():
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype(None, "cuda") == torch.float16
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype("fp16", "cpu") == torch.float16
    assert resolve_dtype(torch.float64, "cpu") == torch.float64


def test_load_tiny(tiny_pipes):
    assert isinstance(tiny_pipes, Pipelines)
    assert tiny_pipes.device == torch.device("cpu")
    assert tiny_pipes.dtype == torch.float32
    assert tiny_pipes.base_source.endswith("base") and tiny_pipes.refiner_source.endswith("refiner")
    assert tiny_pipes.vae_source is None
    for m in (tiny_pipes.base.unet, tiny_pipes.refiner.unet, tiny_pipes.base.vae, tiny_pipes.base.text_encoder):
        assert m.device.type == "cpu" and m.dtype == torch.float32


def test_load_tiny_base_only_in_bfloat16():
    pipes = load_pipelines("tiny", device="cpu", dtype="bf16")
    assert pipes.refiner is None and pipes.refiner_source is None
    assert pipes.dtype == torch.bfloat16
    assert pipes.base.vae.dtype == torch.bfloat16 and pipes.base.text_encoder_2.dtype == torch.bfloat16


def test_load_from_a_copied_folder(tmp_path, tiny_folders, tiny_pipes):
    """A plain diffusers folder anywhere on disk loads the same weights as the preset."""
    base = shutil.copytree(tiny_folders[0], tmp_path / "my-base")
    pipes = load_pipelines(str(base), device="cpu")
    assert pipes.base_source == str(base)
    torch.testing.assert_close(pipes.base.unet.conv_in.weight, tiny_pipes.base.unet.conv_in.weight, rtol=0, atol=0)


@pytest.mark.parametrize("base, refiner", [("tiny", "sdxl-random"), ("./some/folder", "tiny"),
                                           ("./some/folder", "sdxl-random")])
def test_preset_refiner_needs_its_own_base(base, refiner):
    with pytest.raises(InvalidConfigError, match=f"--refiner {refiner} only pairs with --base {refiner}"):
        load_pipelines(base, refiner, device="cpu")
