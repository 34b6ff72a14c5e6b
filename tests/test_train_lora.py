"""Dreambooth LoRA training on the tiny model: what it writes, that it learns, and exact resumption."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from sdxl_core.errors import InvalidConfigError
from sdxl_core.generate import GenerationRequest, generate
from sdxl_core.loading import load_pipelines
from sdxl_core.train_lora import (CHECKPOINT_PREFIX, WEIGHTS_NAME, TrainConfig, batch_indices,
                                  checkpoints, dataset_hash, list_images, min_snr_weights, train_lora)

RES = 64


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Four small pictures of different sizes (so crops and original-size time ids vary)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("wrong-data")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(64, 64), (80, 96), (96, 72), (70, 70)]):
        base = rng.integers(0, 255, (1, 1, 3))
        img = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"img{i}.png")
    (folder / "metadata.jsonl").write_text("{}\n")  # not an image: ignored
    return folder


def _config(data_dir, out, **kw) -> TrainConfig:
    return TrainConfig(**{"base": "tiny", "data": str(data_dir), "out": str(out), "resolution": RES,
                          "max_train_steps": 3, "device": "cpu", **kw})


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """3 steps with a checkpoint every 2, the trained pipeline kept in memory."""
    out = tmp_path_factory.mktemp("lora") / "out"
    seen = []
    result = train_lora(_config(data_dir, out, checkpointing_steps=2), progress=False,
                        on_step=lambda step, loss: seen.append(step), keep_pipes=True)
    return result, seen


def _image(pipes, settings, lora_scale: float) -> np.ndarray:
    out = generate(pipes, GenerationRequest("a wolf in a forest", 7, "wrong", lora_scale, settings))
    return np.asarray(out.images[0], dtype=np.int16)


def test_writes_diffusers_lora_and_metadata(trained, data_dir):
    from safetensors.torch import load_file

    result, seen = trained
    assert seen == [1, 2, 3] and result.global_step == 3 and len(result.losses) == 3
    assert all(np.isfinite(result.losses)) and all(s > 0 for s in result.step_seconds)
    state = load_file(str(result.weights))
    assert state and all(k.startswith("unet.") for k in state)
    assert all(".lora.down.weight" in k or ".lora.up.weight" in k for k in state)
    modules = {k.rsplit(".lora.", 1)[0].rsplit(".", 1)[1] for k in state}
    assert modules == {"to_k", "to_q", "to_v", "0"}  # to_out.0
    downs = [v for k, v in state.items() if k.endswith("lora.down.weight")]
    assert {v.shape[0] for v in downs} == {4}  # rank 4
    meta = json.loads(result.metadata.read_text())
    assert meta["rank"] == 4 and meta["lora_alpha"] == 4 and meta["steps"] == 3
    assert meta["learning_rate"] == 1e-4 and meta["loss_curve"] == result.losses
    assert meta["dataset"] == {"folder": str(data_dir), "images": 4, "sha256": dataset_hash(list_images(data_dir))}
    assert meta["base_model"] == "tiny" and meta["version_label"] == f"sha-{meta['sha256'][:12]}"
    assert meta["config"]["instance_prompt"] == "wrong"
    assert [step for step, _ in checkpoints(result.weights.parent)] == [2]


def test_training_changes_the_image_and_the_file_reproduces_the_adapter(trained, fast_settings):
    """A fresh, unmodified diffusers pipeline loading the file gives the in-memory adapter's image."""
    result, _ = trained
    in_memory = _image(result.pipes, fast_settings, 1.0)
    fresh = load_pipelines("tiny", None, device="cpu")
    without = _image(fresh, fast_settings, 0.0)
    fresh.base.load_lora_weights(str(result.weights.parent), weight_name=WEIGHTS_NAME, adapter_name="wrong")
    loaded = _image(fresh, fast_settings, 1.0)
    assert np.abs(loaded - in_memory).max() <= 1
    assert np.abs(loaded - without).max() > 0, "3 training steps did not change the image"
    assert _image(fresh, fast_settings, 0.0).tolist() == without.tolist()


def test_resume_continues_at_the_checkpoint_with_the_same_optimizer_state(trained, data_dir, tmp_path):
    """Resumed from checkpoint-2, step 3 gives bit-identical weights to the run that never stopped."""
    from safetensors.torch import load_file

    result, _ = trained
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(result.weights.parent / f"{CHECKPOINT_PREFIX}2", out / f"{CHECKPOINT_PREFIX}2")
    seen = []
    resumed = train_lora(_config(data_dir, out, checkpointing_steps=2, resume=True), progress=False,
                         on_step=lambda step, loss: seen.append(step))
    assert seen == [3] and resumed.resumed_from == 2
    assert resumed.losses == result.losses
    a, b = load_file(str(result.weights)), load_file(str(resumed.weights))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_same_command_trains_the_same_lora(trained, data_dir, tmp_path):
    """The LoRA initialisation is seeded from --seed: a second run gives bit-identical weights and losses (peft
    draws the A matrices from the global RNG; unseeded, runs matched at step 1 and drifted after), a new seed
    other weights, and the caller's RNG is left as it was."""
    from safetensors.torch import load_file

    result, _ = trained
    torch.manual_seed(1234)
    before = torch.rand(3)
    torch.manual_seed(1234)
    again = train_lora(_config(data_dir, tmp_path / "again", checkpointing_steps=2), progress=False)
    assert torch.equal(torch.rand(3), before)
    other = train_lora(_config(data_dir, tmp_path / "other", seed=1), progress=False)
    a, b, c = (load_file(str(r.weights)) for r in (result, again, other))
    assert again.losses == result.losses and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resume_without_checkpoint_or_with_other_options(trained, data_dir, tmp_path):
    result, _ = trained
    with pytest.raises(InvalidConfigError, match="already holds a training.*--resume"):
        train_lora(_config(data_dir, result.weights.parent), progress=False)
    out = tmp_path / "other"
    out.mkdir()
    shutil.copytree(result.weights.parent / f"{CHECKPOINT_PREFIX}2", out / f"{CHECKPOINT_PREFIX}2")
    with pytest.raises(InvalidConfigError, match="rank differ"):
        train_lora(_config(data_dir, out, rank=8, resume=True), progress=False)


def test_text_encoder_training_saves_all_three_prefixes(data_dir, tmp_path):
    from safetensors.torch import load_file

    result = train_lora(_config(data_dir, tmp_path / "te", max_train_steps=2, train_text_encoder=True,
                                snr_gamma=5.0, gradient_accumulation_steps=2, train_batch_size=2), progress=False)
    prefixes = {k.split(".", 1)[0] for k in load_file(str(result.weights))}
    assert prefixes == {"unet", "text_encoder", "text_encoder_2"}
    assert all(np.isfinite(result.losses))


def test_bf16_mixed_precision_on_cpu(data_dir, tmp_path):
    result = train_lora(_config(data_dir, tmp_path / "bf16", max_train_steps=1, mixed_precision="bf16"),
                        progress=False)
    assert np.isfinite(result.losses[0])


def test_min_snr_weights_match_the_formula():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012)
    t = torch.tensor([0, 10, 500, 999])
    ac = sched.alphas_cumprod[t].double()
    snr = ac / (1 - ac)
    expected = torch.minimum(snr, torch.full_like(snr, 5.0)) / snr
    assert torch.allclose(min_snr_weights(sched, t, 5.0).double(), expected, rtol=1e-5)
    sched.register_to_config(prediction_type="v_prediction")
    assert torch.allclose(min_snr_weights(sched, t, 5.0).double(), expected * snr / (snr + 1), rtol=1e-5)


def test_batches_cover_every_image_once_per_epoch():
    order = [batch_indices(5, 1, m, seed=3)[0] for m in range(10)]
    assert sorted(order[:5]) == list(range(5)) and sorted(order[5:]) == list(range(5))
    assert batch_indices(5, 2, 1, seed=3) == order[2:4]
    epochs = {tuple(batch_indices(5, 5, e, seed=3)) for e in range(6)}
    assert len(epochs) > 1, "every epoch had the same order: no shuffle"
    assert [batch_indices(5, 5, e, seed=4) for e in range(6)] != [batch_indices(5, 5, e, seed=3) for e in range(6)]


@pytest.mark.parametrize("kw, match", [
    ({"resolution": 60}, "not a multiple of 8"),
    ({"max_train_steps": 0}, "--max-train-steps must be a whole number >= 1"),
    ({"rank": 1.5}, "--rank must be a whole number"),
    ({"learning_rate": -1.0}, "--learning-rate must be a positive number"),
    ({"learning_rate": float("nan")}, "--learning-rate must be a positive number"),
    ({"snr_gamma": 0.0}, "--snr-gamma must be a positive number"),
    ({"mixed_precision": "fp8"}, "--mixed-precision must be one of no, fp16, bf16"),
    ({"instance_prompt": " "}, "--instance-prompt is empty"),
    ({"checkpointing_steps": 0}, "--checkpointing-steps must be"),
    ({"version_label": "../v1"}, "--version-label"),
    ({"mixed_precision": "fp16"}, "fp16 needs a CUDA device"),
])
def test_bad_options_are_refused_before_anything_is_written(kw, match, data_dir, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(InvalidConfigError, match=match):
        train_lora(_config(data_dir, out, **kw), progress=False)
    assert not out.exists()


def test_data_folder_errors(tmp_path):
    with pytest.raises(InvalidConfigError, match="is not a folder"):
        train_lora(_config(tmp_path / "missing", tmp_path / "o"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidConfigError, match="holds no images"):
        train_lora(_config(tmp_path / "empty", tmp_path / "o"), progress=False)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    with pytest.raises(InvalidConfigError, match="x.png.*cannot be read"):
        train_lora(_config(tmp_path / "bad", tmp_path / "o"), progress=False)
    assert not (tmp_path / "o").exists()


def test_cli_train_lora(data_dir, tmp_path, capsys):
    from sdxl_core.cli import main

    out = tmp_path / "cli"
    argv = ["train-lora", "--base", "tiny", "--data", str(data_dir), "--out", str(out), "--resolution", "64",
            "--max-train-steps", "2", "--checkpointing-steps", "1", "--device", "cpu", "--no-progress",
            "--version-label", "v1"]
    assert main(argv) == 0
    assert "2 steps" in capsys.readouterr().out
    assert json.loads((out / "lora_metadata.json").read_text())["version_label"] == "v1"
    assert main(argv) == 2  # a finished training is never overwritten
    assert "pass --resume" in capsys.readouterr().err
    assert main(argv + ["--resume", "--max-train-steps", "3"]) == 0
    assert "3 steps (resumed at 1)" in capsys.readouterr().out


def test_the_trained_lora_drives_the_wrong_lora_variant(trained, tmp_path):
    """train-lora's file goes through the run's loading path: validated, on the base, recorded with its version."""
    from PIL import Image

    from sdxl_core.generate import GenerationSettings
    from sdxl_core.run import RunConfig, run_job

    result, _ = trained
    report = run_job(RunConfig(lora=f"wrong@v1={result.weights.parent}", prompts=("a wolf in a forest",),
                               seeds=(0,), settings=GenerationSettings(steps=6, width=64, height=64),
                               run_dir=str(tmp_path), run_id="loop", warmup=False), progress=False)
    doc = json.loads((report.parent / "config.json").read_text())["config"]["lora"]
    meta = json.loads(result.metadata.read_text())
    assert doc["label"] == "wrong@v1" and doc["sha256"] == meta["sha256"]
    assert doc["training"]["version_label"] == meta["version_label"] and doc["training"]["steps"] == 3
    assert doc["training"]["final_loss"] == result.losses[-1]
    lines = [json.loads(x) for x in (report.parent / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in lines] == ["ok"] * 3
    img = {r["variant"]: np.asarray(Image.open(report.parent / r["file"]), dtype=np.int16) for r in lines}
    assert np.abs(img["wrong_lora"] - img["wrong_negative"]).max() > 0
