"""`sdxl-bench train-toy` on a miniature schedule: every stage runs, writes diffusers folders that load through the
real loading path, resumes stage by stage, and refuses to mix settings; the prompt embeddings it trains on are
the ones generation uses."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sdxl_core.errors import InvalidConfigError
from sdxl_core.toy.train_config import ToyTrainConfig

MINI = dict(pool=48, vae_steps=3, vae_batch=4, base_steps=3, base_text_steps=2, refiner_steps=3, unet_batch=4, warmup_steps=1,
            clip_steps=2, eval_single=2, eval_multi=1, eval_steps=4, threads=1)


def _digests(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*.safetensors"))}


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory):
    from sdxl_core.toy.train import train_toy

    root = tmp_path_factory.mktemp("toy")
    config = replace(ToyTrainConfig(), out=str(root / "out"), work=str(root / "work"), **MINI)
    logs: list[str] = []
    doc = train_toy(config, log=logs.append)
    return config, doc, logs


def test_every_stage_runs_and_is_recorded(mini_run):
    config, doc, _ = mini_run
    out = Path(config.out)
    assert set(doc["stages"]) == {"vae", "base", "base_text", "refiner", "clip"}
    for name in ("vae", "base", "base_text", "refiner"):
        stage = doc["stages"][name]
        assert stage["seconds"] > 0 and stage["loss_curve"] and all(v == v for _, v in stage["loss_curve"])
    assert doc["stages"]["refiner"]["timesteps"] == [0, 200]
    assert json.loads((out / "training.json").read_text())["config"] == doc["config"]
    import xml.etree.ElementTree as ET

    svg = ET.parse(out / "loss_curves.svg").getroot()
    assert len(svg.findall("{http://www.w3.org/2000/svg}polyline")) == 5  # vae, base, base_text, refiner, clip
    ev = doc["evaluation"]
    assert ev["prompts"] == 3 and set(ev["oracle"]) == {"single", "multi"}
    assert ev["oracle_real_images"]["single"]["correct"] == 1.0  # the oracle itself is exact on the world
    assert ev["toy_vs_heldout"]["fid"] >= 0 and ev["tiny_vs_heldout"]["fid"] >= 0
    assert doc["sizes_bytes"]["total"] == sum(f.stat().st_size for f in out.rglob("*") if f.is_file()
                                              and f.parent != out)


def test_written_folders_load_through_the_real_path(mini_run):
    from transformers import CLIPTokenizer

    from sdxl_core.loading import load_pipelines
    from sdxl_core.tokenizer import build_clip_tokenizer

    config, doc, _ = mini_run
    out = Path(config.out)
    pipes = load_pipelines(str(out / "base"), str(out / "refiner"), device="cpu", dtype="float32")
    assert pipes.base.vae.config.scaling_factor == pytest.approx(doc["stages"]["vae"]["scaling_factor"])
    assert pipes.base.vae.config.scaling_factor != 1.0
    assert pipes.base.unet.config.sample_size * pipes.base.vae_scale_factor == 64
    assert pipes.refiner.config.requires_aesthetics_score
    # tokenizers stored as the SDXL repositories store them, tokenizing like the real CLIP tokenizer
    for folder in ("base/tokenizer", "base/tokenizer_2", "refiner/tokenizer_2"):
        assert (out / folder / "vocab.json").is_file() and not (out / folder / "tokenizer.json").exists()
    text = "two small red circles on a blue background, (wrong)++"
    assert CLIPTokenizer.from_pretrained(out / "base" / "tokenizer_2")(text).input_ids == \
        build_clip_tokenizer(pad_token="!")(text).input_ids
    # weights are stored in fp16 and loaded in the requested dtype
    assert pipes.base.unet.dtype == torch.float32


def test_a_second_call_reuses_every_stage(mini_run):
    from sdxl_core.toy.train import train_toy

    config, _, _ = mini_run
    before = _digests(Path(config.work))
    logs: list[str] = []
    train_toy(replace(config, eval_single=2, eval_multi=0), log=logs.append)
    assert sum("already trained" in line for line in logs) == 5
    assert _digests(Path(config.work)) == before


def test_resume_with_other_settings_is_refused(mini_run):
    from sdxl_core.toy.train import train_toy

    config, _, _ = mini_run
    with pytest.raises(InvalidConfigError, match="vae_steps"):
        train_toy(replace(config, vae_steps=4), log=lambda _: None)


def test_caption_embeddings_equal_what_generation_conditions_on(tiny_pipes):
    """The batched encode_prompt path equals compel's (PromptEncoder) on plain captions, base and refiner."""
    from sdxl_core.generate import PromptEncoder
    from sdxl_core.toy.train import embed_captions
    from sdxl_core.toy.world import bench_prompts

    captions = list(bench_prompts(6))
    text = embed_captions(tiny_pipes, captions, batch=4, check=0)
    encoder = PromptEncoder(tiny_pipes)
    ref = encoder.embed(encoder.base, captions, None)
    assert torch.allclose(text["embeds"], ref["prompt_embeds"], atol=1e-5)
    assert torch.allclose(text["pooled"], ref["pooled_prompt_embeds"], atol=1e-5)
    neg = tiny_pipes.refiner.encode_prompt(prompt="", device=torch.device("cpu"), num_images_per_prompt=1,
                                           do_classifier_free_guidance=False)
    assert torch.equal(text["refiner_uncond_embeds"], neg[0])


def test_config_checks_name_the_setting():
    with pytest.raises(InvalidConfigError, match="base_steps"):
        replace(ToyTrainConfig(), base_steps=0).check()
    with pytest.raises(InvalidConfigError, match="eval_world_seed"):
        replace(ToyTrainConfig(), eval_world_seed=0).check()
    with pytest.raises(InvalidConfigError, match="cond_dropout"):
        replace(ToyTrainConfig(), cond_dropout=1.0).check()


def test_cli_builds_the_config_without_torch():
    import subprocess
    import sys

    code = ("import sys; from sdxl_core.cli import build_parser; "
            "from sdxl_core.toy.train_config import config_from_args; "
            "a = build_parser().parse_args(['train-toy', '--base-steps', '7', '--threads', '1']); "
            "c = config_from_args(a); assert c.base_steps == 7 and c.threads == 1, c; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
