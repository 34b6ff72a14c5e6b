"""``sdxl-bench score`` on real tiny runs and image folders, with the offline feature network."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from sdxl_core.errors import InvalidConfigError, MissingDependencyError
from sdxl_core.score import ScoreConfig, fid_of_features, score

SMOKE = {"clip_model": "ViT-S-32", "clip_smoke": True, "features": "effnet-lite0"}


@pytest.mark.parametrize("n1, n2, d", [(20, 25, 64), (80, 90, 16)])
def test_fid_of_features_matches_scipy(n1, n2, d):
    from scipy import linalg

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(n1, d)), rng.normal(0.3, 1.2, size=(n2, d))
    m1, m2, s1, s2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real)
    assert fid_of_features(a, b) == pytest.approx(ref, rel=1e-6)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    from sdxl_core.generate import GenerationSettings
    from sdxl_core.run import RunConfig, run_job

    root = tmp_path_factory.mktemp("runs")
    report = run_job(RunConfig(prompts=("a wolf in a forest", "an eye, (macro)++", "a red car"), seeds=(0, 1, 2),
                               settings=GenerationSettings(steps=4, width=64, height=64), run_dir=str(root),
                               run_id="s", warmup=False), progress=False)
    return report.parent


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    import skimage.data as data

    folder = tmp_path_factory.mktemp("photos")
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        img = getattr(data, name)()
        for i, (y, x) in enumerate([(0, 0), (40, 60)]):
            Image.fromarray(img[y:y + 256, x:x + 256]).save(folder / f"{name}-{i}.png")
    return folder


def test_run_folder_variants_against_a_reference(run_folder, photos):
    doc = score(ScoreConfig(fake=str(run_folder), reference=str(photos), **SMOKE))
    assert set(doc["sets"]) == {"baseline", "wrong_negative"}
    for values in doc["sets"].values():
        assert values["sanity"] == {"n": 9, "n_flagged": 0, "flagged": []}
        assert len(values["clip"]["per_image"]) == 9 and values["clip"]["smoke"] is True
        for metric in ("fid", "kid", "cmmd"):
            assert np.isfinite(values[metric]["value"]) and values[metric]["n_real"] == 8
        assert "rank-deficient" in values["fid"]["warnings"][0]
    assert doc["metrics"]["clip"]["label"] == "smoke"
    assert "not comparable to Inception FID" in doc["metrics"]["fid"]["label"]
    comps = {c["metric"]: c for c in doc["comparisons"]}
    assert set(comps) == {"clip", "fid", "kid", "cmmd"}
    for c in comps.values():
        assert (c["reference"], c["candidate"]) == ("baseline", "wrong_negative")
        assert c["ci_low"] <= c["estimate"] <= c["ci_high"] and c["n_resamples"] >= 1000
        assert c["verdict"] in ("better", "worse", "no significant difference")
    # the FID shown per set is the one the comparison's estimate is the difference of
    assert comps["fid"]["estimate"] == pytest.approx(
        doc["sets"]["wrong_negative"]["fid"]["value"] - doc["sets"]["baseline"]["fid"]["value"], rel=1e-9)


def test_without_reference_set_metrics_are_a_shift_from_baseline(run_folder):
    doc = score(ScoreConfig(fake=str(run_folder), metrics=("fid", "cmmd"), **SMOKE))
    assert "shift from baseline" in doc["metrics"]["fid"]["label"]
    assert "fid" not in doc["sets"]["baseline"] and doc["sets"]["wrong_negative"]["fid"]["n_real"] == 9
    assert doc["comparisons"] == []  # a shift has no better/worse verdict


def test_flagged_images_are_left_out_and_counted(photos, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted(photos.iterdir())[:4]:
        (folder / p.name).write_bytes(p.read_bytes())
    Image.new("RGB", (256, 256)).save(folder / "zz-black.png")
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file": p.name, "prompt": "a photo"}) + "\n"
                                                  for p in sorted(folder.glob("*.png"))))
    doc = score(ScoreConfig(fake=str(folder), reference=str(photos), metrics=("sanity", "clip", "kid"), **SMOKE))
    values = doc["sets"]["imgs"]
    assert values["sanity"]["n_flagged"] == 1 and values["sanity"]["flagged"][0]["flags"] == ["black"]
    assert values["clip"]["n"] == 4 and values["kid"]["n"] == 4
    assert any("left out of every metric" in w for w in doc["warnings"])


def test_clip_needs_prompts(photos):
    with pytest.raises(InvalidConfigError, match="needs a prompt per image"):
        score(ScoreConfig(fake=str(photos), metrics=("clip",), **SMOKE))


@pytest.mark.parametrize("changes, match", [
    ({"metrics": ("clip", "psnr")}, "choose from clip, fid, kid, cmmd, sanity"),
    ({"features": "vgg"}, "choose from effnet-lite0, inception"),
    ({"resamples": 100}, "at least 1000"),
    ({"fake": "/no/such/folder"}, "is not a folder"),
])
def test_bad_options(photos, changes, match):
    with pytest.raises(InvalidConfigError, match=match):
        score(ScoreConfig(**{"fake": str(photos), **SMOKE, **changes}))


def test_inception_weights_missing_names_the_file(photos, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(MissingDependencyError, match="inception-2015-12-05"):
        score(ScoreConfig(fake=str(photos), reference=str(photos), metrics=("fid",), features="inception"))


def test_cli_writes_json(run_folder, tmp_path, capsys):
    from sdxl_core.cli import main

    out = tmp_path / "score.json"
    assert main(["score", "--fake", str(run_folder), "--metrics", "sanity,clip,cmmd", "--clip-model", "ViT-S-32",
                 "--clip-smoke", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["schema"] == "sdxl-bench score v1" and "wrong_negative" in doc["sets"]
    assert "clip: wrong_negative - baseline" in capsys.readouterr().out


def test_default_clip_weights_are_never_downloaded(photos, tmp_path, monkeypatch):
    """Online but the user named no CLIP weights: nothing is fetched; the error says what to pass."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in ("HF_HOME", "XDG_CACHE_HOME", "HF_HUB_CACHE", "TORCH_HOME"):
        monkeypatch.setenv(var, str(tmp_path / var))
    with pytest.raises(MissingDependencyError, match="downloads are off"):
        score(ScoreConfig(fake=str(photos), prompts=None, metrics=("cmmd",), clip_model="ViT-B-32",
                          features="effnet-lite0"))
