"""``oracle_accuracy`` as a metric of ``sdxl-bench score`` (toy-world prompts): per-image verdicts, the paired
comparison with baseline, the default metric set, refusals of other prompts, and the meta-evaluation."""

from __future__ import annotations

import dataclasses
import json

import pytest
from PIL import Image

from sdxl_core.errors import InvalidConfigError
from sdxl_core.score import ScoreConfig, resolve_metrics, score_sets
from sdxl_core.score_args import DEFAULT_METRICS
from sdxl_core.score_inputs import ImageSet, ScoredImage
from sdxl_core.toy.oracle import CHECKS, is_toy_prompt_set, toy_caption
from sdxl_core.toy.world import COLOURS, Scene, ToyDataset, render, write_dataset

N = 16
CORRUPTED = {i for i in range(N) if i % 4}  # 12 of 16 images get a wrong background
ORACLE_ONLY = {"metrics": ("sanity", "oracle_accuracy"), "features": "effnet-lite0"}
SMOKE = {"clip_model": "ViT-S-32", "clip_smoke": True, "features": "effnet-lite0"}


def _wrong_background(scene):
    return dataclasses.replace(scene, background=next(c for c in COLOURS if c not in (scene.colour, scene.background)))


@pytest.fixture(scope="module")
def toy_sets(tmp_path_factory):
    """``baseline``: rendered scenes with their captions; ``corrupted``: the same keys and captions, 12 of the
    16 images rendered on another background."""
    root = tmp_path_factory.mktemp("toy")
    sets = {"baseline": [], "corrupted": []}
    for sample in ToyDataset(seed=5, length=N):
        for name in sets:
            image = render(_wrong_background(sample.scene)) if name == "corrupted" and sample.index in CORRUPTED \
                else sample.image
            path = root / name / f"{sample.index:02d}.png"
            path.parent.mkdir(exist_ok=True)
            image.save(path)
            sets[name].append(ScoredImage(path, sample.caption, (sample.index, 0)))
    return [ImageSet(name, tuple(images)) for name, images in sets.items()]


def _config(tmp_path, **kw):
    return ScoreConfig(fake=str(tmp_path), **{**ORACLE_ONLY, **kw})


def test_rendered_images_are_all_correct_and_wrong_backgrounds_are_not(toy_sets, tmp_path):
    doc = score_sets(toy_sets, _config(tmp_path))
    info = doc["metrics"]["oracle_accuracy"]
    assert (info["display_name"], info["higher_is_better"], info["kind"], info["label"]) == (
        "Oracle accuracy", True, "per_image", "toy world")
    base, corrupted = doc["sets"]["baseline"]["oracle_accuracy"], doc["sets"]["corrupted"]["oracle_accuracy"]
    assert base["value"] == 1.0 and base["n"] == base["n_correct"] == N
    assert base["per_check"] == {c: 1.0 for c in CHECKS}
    assert [it["value"] for it in base["per_image"]] == [1.0] * N
    values = {it["key"][0]: it["value"] for it in corrupted["per_image"]}
    assert values == {i: 0.0 if i in CORRUPTED else 1.0 for i in range(N)}
    assert corrupted["value"] == pytest.approx(1 - len(CORRUPTED) / N)
    assert corrupted["per_check"]["background"] == pytest.approx(1 - len(CORRUPTED) / N)
    assert all(corrupted["per_check"][c] == 1.0 for c in CHECKS if c != "background")
    wrong = next(it for it in corrupted["per_image"] if it["key"][0] in CORRUPTED)
    assert wrong["checks"]["background"] is False and wrong["checks"]["shape"] is True

    # the paired comparison with baseline, through stats.paired_difference as CLIP score's
    (comp,) = [c for c in doc["comparisons"] if c["metric"] == "oracle_accuracy"]
    assert (comp["reference"], comp["candidate"], comp["n"]) == ("baseline", "corrupted", N)
    assert comp["estimate"] == pytest.approx(-len(CORRUPTED) / N)
    assert comp["ci_high"] < 0 and comp["verdict"] == "worse" and comp["higher_is_better"] is True
    assert "paired percentile bootstrap" in comp["method"]
    # no other per-image metric here: the meta-evaluation has nothing to judge, and says so
    assert doc["meta_evaluation"]["per_image"] == [] and doc["meta_evaluation"]["ordering"] == []
    json.dumps(doc, allow_nan=False)


def test_flagged_images_are_left_out(toy_sets, tmp_path):
    black = tmp_path / "black.png"
    Image.new("RGB", (64, 64)).save(black)
    base = toy_sets[0]
    broken = ImageSet("baseline", base.images[:-1] + (dataclasses.replace(base.images[-1], path=black),))
    doc = score_sets([broken], _config(tmp_path))
    entry = doc["sets"]["baseline"]["oracle_accuracy"]
    assert doc["sets"]["baseline"]["sanity"]["n_flagged"] == 1
    assert entry["n"] == N - 1 and entry["value"] == 1.0 and len(entry["per_image"]) == N - 1


def test_prompts_outside_the_grammar_are_refused(toy_sets, tmp_path):
    base = toy_sets[0]
    odd = ImageSet("baseline", base.images[:3] + (dataclasses.replace(base.images[3], prompt="a wolf in a forest"),)
                   + tuple(dataclasses.replace(im, prompt="a red car") for im in base.images[4:]))
    with pytest.raises(InvalidConfigError, match="drop oracle_accuracy from --metrics") as info:
        score_sets([odd], _config(tmp_path))
    assert "'a wolf in a forest'" in str(info.value) and "03.png" in str(info.value)  # the first bad prompt
    none = ImageSet("baseline", (dataclasses.replace(base.images[0], prompt=None),))
    with pytest.raises(InvalidConfigError, match="has no prompt"):
        score_sets([none], _config(tmp_path))


def test_toy_prompts_and_the_default_metric_set():
    caption = "a small red circle on the left of a blue background"
    weighted = "(a small red circle)++ on the left of a (blue)- background"
    assert toy_caption(weighted) == toy_caption(caption) == toy_caption(caption.upper() + ".")
    with pytest.raises(InvalidConfigError, match="not in the toy-world grammar"):
        toy_caption("a wolf, (oil on canvas)+++")
    assert is_toy_prompt_set([caption, weighted, "two large green squares on a black background"])
    assert not is_toy_prompt_set([caption, "a wolf in a forest"])
    assert not is_toy_prompt_set([caption, None]) and not is_toy_prompt_set([])
    assert resolve_metrics(None, [caption, weighted]) == DEFAULT_METRICS + ("oracle_accuracy",)
    assert resolve_metrics(None, [caption, "a photo of a cat"]) == DEFAULT_METRICS
    assert "oracle_accuracy" not in DEFAULT_METRICS
    assert resolve_metrics(("clip",), [caption]) == ("clip",)  # asked for explicitly: as asked


def test_score_command_defaults_to_the_oracle_on_a_toy_folder_with_meta_evaluation(tmp_path, capsys):
    """A plain folder of toy images (half on a wrong background): the default metrics include the oracle, and
    the meta-evaluation judges CLIP score (smoke: random weights) against it."""
    from sdxl_core.cli import main

    folder = tmp_path / "toy"
    meta = write_dataset(folder, 12, seed=2)
    for row in [json.loads(line) for line in meta.read_text().splitlines()][::2]:
        render(_wrong_background(Scene.from_dict(row["scene"]))).save(folder / row["file"])
    out = tmp_path / "score.json"
    assert main(["score", "--fake", str(folder), "--clip-model", "ViT-S-32", "--clip-smoke", "--features",
                 "effnet-lite0", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["config"]["metrics"] == list(DEFAULT_METRICS) + ["oracle_accuracy"]
    assert doc["sets"]["toy"]["oracle_accuracy"]["value"] == 0.5
    (row,) = doc["meta_evaluation"]["per_image"]
    assert row["metric"] == "clip" and row["n"] == 12 and row["n_correct"] == 6
    assert row["verdict"] in ("agrees with the oracle", "no evidence", "disagrees with the oracle")
    assert row["auc_ci_low"] <= row["auc"] <= row["auc_ci_high"]
    printed = capsys.readouterr().out
    assert "oracle_accuracy 0.5 (toy world)" in printed and "trust: CLIP score" in printed
