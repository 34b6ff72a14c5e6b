"""The committed toy weights: they load through the real path as the ``toy`` preset, and they meet issue #6's
acceptance bars, measured here on a held-out world (seed 4: neither training (0), train-toy's own evaluation (1)
nor the bench prompts (2)):

- the colour of a single shape and the background colour are right in >= 80% of 200 prompts (oracle);
- FID/KID of toy generations against held-out rendered scenes is lower than that of the untrained ``tiny``;
- everything committed is <= 30 MB.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from sdxl_core import presets
from sdxl_core.errors import ModelNotFoundError

HELD_OUT_WORLD = 4
N_SINGLE = 200
N_SET = 60


@pytest.fixture(scope="module")
def toy_pipes():
    from sdxl_core.loading import load_pipelines

    return load_pipelines("toy", "toy", device="cpu")


@pytest.fixture(scope="module")
def toy_settings():
    from sdxl_core.bench_cases import generation_settings
    from sdxl_core.bench_config import BenchConfig

    return generation_settings(BenchConfig(base="toy"))


def _generate(pipes, scenes, settings):
    from sdxl_core.generate import GenerationRequest, PromptEncoder, generate
    from sdxl_core.toy.world import caption

    encoder = PromptEncoder(pipes)
    return [generate(pipes, GenerationRequest(prompt=caption(s), seed=i, settings=settings), encoder).images[0]
            for i, s in enumerate(scenes)]


def test_toy_preset_loads_from_the_committed_folders(toy_pipes, toy_settings):
    base, refiner = presets.toy_folders()
    assert toy_pipes.base_source == str(base) and toy_pipes.refiner_source == str(refiner)
    assert (toy_settings.width, toy_settings.steps) == (presets.TOY_DEFAULT_SIZE, presets.TOY_DEFAULT_STEPS)
    assert toy_pipes.base.unet.config.sample_size * toy_pipes.base.vae_scale_factor == presets.TOY_DEFAULT_SIZE
    assert toy_pipes.refiner.text_encoder_2 is toy_pipes.base.text_encoder_2


def test_missing_toy_weights_name_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("SDXL_BENCH_TOY_WEIGHTS", str(tmp_path / "nowhere"))
    with pytest.raises(ModelNotFoundError, match="make train-toy"):
        presets.toy_folders()
    with pytest.raises(ModelNotFoundError, match="make train-toy"):
        presets.toy_fingerprint()


def test_committed_weights_fit_the_size_budget():
    root = presets.toy_weights_dir()
    total = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    assert total <= 30_000_000, f"{total / 1e6:.1f} MB committed"
    doc = json.loads((root / "training.json").read_text())
    assert doc["sizes_bytes"]["total"] == sum(f.stat().st_size for f in root.rglob("*")
                                              if f.is_file() and f.parent != root)


def test_toy_gets_colour_and_background_right(toy_pipes, toy_settings):
    from sdxl_core.toy.oracle import judge
    from sdxl_core.toy.train import eval_scenes
    from sdxl_core.toy.world import caption

    scenes = eval_scenes(HELD_OUT_WORLD, N_SINGLE, 0)
    images = _generate(toy_pipes, scenes, toy_settings)
    verdicts = [judge(im, caption(s)) for im, s in zip(images, scenes)]
    colour = np.mean([v.colour for v in verdicts])
    background = np.mean([v.background for v in verdicts])
    assert colour >= 0.8 and background >= 0.8, f"colour {colour:.3f}, background {background:.3f}"


def test_toy_is_closer_to_the_world_than_untrained_tiny(toy_pipes, tiny_pipes, toy_settings):
    from sdxl_core.toy.train import eval_scenes, set_distances
    from sdxl_core.toy.world import render

    scenes = eval_scenes(HELD_OUT_WORLD, N_SET // 2, N_SET // 2)
    real = [render(s, presets.TOY_DEFAULT_SIZE) for s in scenes]
    toy = set_distances(real, _generate(toy_pipes, scenes, toy_settings))
    tiny = set_distances(real, _generate(tiny_pipes, scenes, toy_settings))
    assert toy["fid"] < tiny["fid"] and toy["kid"] < tiny["kid"], (toy, tiny)
