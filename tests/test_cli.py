"""sdxl_core.cli: the sdxl-bench command line (tiny, generate, flops), called in-process through main()."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from sdxl_core import presets
from sdxl_core.cli import main
from sdxl_core.generate import GenerationRequest, GenerationSettings, generate


def test_tiny_writes_loadable_folders(tmp_path, capsys):
    assert main(["tiny", "--out", str(tmp_path)]) == 0
    assert "wrote" in capsys.readouterr().out
    for name in ("base", "refiner"):
        assert (tmp_path / name / "model_index.json").is_file()
        assert (tmp_path / name / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "base" / "text_encoder").is_dir() and not (tmp_path / "refiner" / "text_encoder").exists()
    # the same seeded weights as the cached preset
    cached_base, _ = presets.ensure_tiny()
    rel = "unet/diffusion_pytorch_model.safetensors"
    written, cached = load_file(tmp_path / "base" / rel), load_file(cached_base / rel)
    assert written.keys() == cached.keys()
    assert all(np.array_equal(written[k].numpy(), cached[k].numpy()) for k in written)


GENERATE = ["generate", "--base", "tiny", "--refiner", "tiny", "--prompt", "a wolf", "--seed", "1", "--steps", "4",
            "--width", "64", "--height", "64", "--device", "cpu"]


def test_generate_writes_a_png(tmp_path, capsys, tiny_pipes):
    out = tmp_path / "x.png"
    assert main(GENERATE + ["--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]  # no temporary file left behind
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (64, 64) and img.mode == "RGB"
        pixels = np.asarray(img)
    # the same image as the library call with the same settings
    settings = GenerationSettings(steps=4, width=64, height=64)
    expected = generate(tiny_pipes, GenerationRequest("a wolf", 1, settings=settings)).images[0]
    np.testing.assert_array_equal(pixels, np.asarray(expected))


@pytest.fixture
def no_loading(monkeypatch):
    import diffusers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although the input is invalid")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", refuse)


@pytest.mark.parametrize("extra, out_name, hint", [
    (["--high-noise-frac", "1.5"], "x.png", "high_noise_frac must lie strictly between 0 and 1"),
    (["--high-noise-frac", "0"], "x.png", "strictly between 0 and 1"),
    (["--width", "100"], "x.png", "multiple of 8.*try 96"),
    (["--steps", "0"], "x.png", "steps must be an integer >= 1"),
    (["--steps", "1"], "x.png", "the base runs 0 step.*each needs at least one.*raise --steps"),
    ([], "x.jpg", "must end in .png"),
    ([], "x", "must end in .png"),
])
def test_generate_refuses_bad_input(tmp_path, capsys, no_loading, extra, out_name, hint):
    out = tmp_path / out_name
    assert main(GENERATE + extra + ["--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("sdxl-bench: error: ")
    assert re.search(hint, captured.err), captured.err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_generate_refuses_empty_prompt(tmp_path, capsys, no_loading):
    args = [a if a != "a wolf" else "  " for a in GENERATE]
    assert main(args + ["--out", str(tmp_path / "x.png")]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_generate_refuses_a_folder_as_out(tmp_path, capsys, no_loading):
    folder = tmp_path / "dir.png"
    folder.mkdir()
    assert main(GENERATE + ["--out", str(folder)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert list(folder.iterdir()) == []


def test_generate_refuses_a_missing_lora(tmp_path, capsys, no_loading):
    assert main(GENERATE + ["--lora", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "x.png")]) == 2
    assert "--lora" in (err := capsys.readouterr().err) and "does not exist" in err
    assert list(tmp_path.iterdir()) == []


def test_generate_refuses_a_missing_model_folder(tmp_path, capsys):
    args = ["generate", "--base", "./nope/base", "--prompt", "a wolf", "--seed", "1", "--device", "cpu",
            "--out", str(tmp_path / "x.png")]
    assert main(args) == 2
    assert "check the path" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_flops(capsys):
    assert main(["flops"]) == 0
    out = capsys.readouterr().out
    m = re.search(r"workload: (\d+) base \+ (\d+) refiner steps, guidance on: ([\d.]+) TFLOP per image", out)
    assert m, out
    assert (int(m[1]), int(m[2])) == (40, 10)
    assert float(m[3]) == pytest.approx(697.3, rel=5e-3)
    unet = re.search(r"unet_base\s+([\d.]+) TFLOP per forward \(batch 1, 1024x1024\)", out)
    assert unet and float(unet[1]) == pytest.approx(6.761, rel=1e-3)


def test_missing_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2


def test_speed_help_lists_every_level():
    from sdxl_core.cli import SPEED_LEVELS
    from sdxl_core.optimize import LEVELS

    assert SPEED_LEVELS == tuple(LEVELS)
