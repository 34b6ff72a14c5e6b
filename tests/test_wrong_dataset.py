"""make-wrong-dataset: prompts, plan, resumable writes, refusals, determinism and the CLI layer."""

import argparse
import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from sdxl_core import wrong_dataset as wd
from sdxl_core.atomicio import read_json_lines, write_text_atomic
from sdxl_core.degrade import degrade as degrade_image
from sdxl_core.errors import InvalidConfigError
from sdxl_core.wrong_dataset import KEYWORDS, WrongDatasetConfig, make_wrong_dataset, plan, wrong_prompts

JOINED = ("low quality, bad hands, random text, error, missing or extra fingers, cropped, jpeg artifacts, "
          "signature, watermark, blurry, ugly, duplicate, mutilated")


@pytest.fixture
def config(tmp_path, fast_settings):
    """Three 64x64 images (6 steps) on the shared tiny base + refiner."""
    return WrongDatasetConfig(base="tiny", refiner="tiny", out=str(tmp_path / "ds"), count=3,
                              width=fast_settings.width, height=fast_settings.height, steps=fast_settings.steps)


def make(config, pipes, **kw):
    return make_wrong_dataset(config, pipes=pipes, progress=False, **kw)


def lines(folder):
    return list(read_json_lines(folder / wd.METADATA_FILE))


def mtimes(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def parse(argv):
    parser = argparse.ArgumentParser()
    wd.add_arguments(parser)
    return parser.parse_args(argv)


def test_the_13_prompts_weight_one_keyword_each():
    assert len(KEYWORDS) == 13 and ", ".join(KEYWORDS) == JOINED
    prompts = wrong_prompts()
    assert len(prompts) == 13
    assert prompts[0] == "(low quality)++++, " + JOINED[len("low quality, "):]
    assert prompts[12] == JOINED[:-len("mutilated")] + "(mutilated)++++"
    assert prompts[4] == JOINED.replace("missing or extra fingers", "(missing or extra fingers)++++")
    for keyword, prompt in zip(KEYWORDS, prompts):
        assert prompt.count("++++") == 1 and prompt.replace(f"({keyword})++++", keyword) == JOINED


def test_plan_is_prompt_major_with_seed_plus_index(tmp_path):
    full = plan(WrongDatasetConfig(base="x/y", out=str(tmp_path / "o")))
    assert len(full) == 78 and [i.index for i in full] == list(range(78))
    assert [i.guidance for i in full[:7]] == [8, 9, 10, 11, 12, 13, 8]
    assert [i.keyword for i in full[:7]] == ["low quality"] * 6 + ["bad hands"]
    assert full[3].file == "wrong-0003-g11.png" and full[77].file == "wrong-0077-g13.png"
    assert full[77].prompt == wrong_prompts()[12] and [i.seed for i in full] == list(range(78))
    some = plan(WrongDatasetConfig(base="x/y", out=str(tmp_path / "o"), count=4, seed=100, guidance_scales=(7.5, 9)))
    assert [(i.file, i.seed, i.keyword) for i in some] == [
        ("wrong-0000-g7.5.png", 100, "low quality"), ("wrong-0001-g9.png", 101, "low quality"),
        ("wrong-0002-g7.5.png", 102, "bad hands"), ("wrong-0003-g9.png", 103, "bad hands")]
    assert WrongDatasetConfig(base="tiny", out="o").size == (128, 128)
    assert WrongDatasetConfig(base="x/y", out="o", width=512).size == (512, 1024)


@pytest.mark.parametrize("argv, message", [
    (["--count", "0"], "--count"), (["--count", "79"], "from 1 to 78"), (["--guidance-scales", ""], "empty"),
    (["--guidance-scales", "8,x"], "not a comma-separated"), (["--guidance-scales", "8,0"], "> 0"),
    (["--guidance-scales", "8,-1"], "> 0"), (["--guidance-scales", "8,nan"], "finite"),
    (["--guidance-scales", "8,8"], "repeats"), (["--guidance-scales", "8,200"], "guidance_scale"),
    (["--width", "60"], "multiple of 8"), (["--height", "0"], "multiple of 8"), (["--steps", "0"], "steps"),
    (["--seed", "-1"], "--seed"), (["--high-noise-frac", "1"], "high_noise_frac"), (["--base", ""], "--base"),
    (["--degrade", "sharpen"], "unknown corruption 'sharpen'; choose from blur,jpeg,noise,colour-shift,cutout"),
    (["--degrade", ""], "empty item"), (["--degrade", "blur,blur"], "repeats"),
])
def test_bad_options_are_refused_before_anything_is_made(tmp_path, argv, message):
    out = tmp_path / "ds"
    args = parse(["--base", "tiny", "--out", str(out), "--no-progress"] + argv)
    with pytest.raises(InvalidConfigError, match=message):
        wd.main(args)
    assert not out.exists()


def test_refusals_that_need_pipelines_come_before_the_folder(tmp_path, tiny_pipes, config):
    out = tmp_path / "ds"
    with pytest.raises(InvalidConfigError, match="--steps"):  # the refiner would get no step
        make(replace(config, steps=1), tiny_pipes)
    with pytest.raises(InvalidConfigError, match="refiner"):
        make(replace(config, refiner=None), tiny_pipes)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidConfigError, match="is a file"):
        make(replace(config, out=str(tmp_path / "file")), tiny_pipes)
    assert not out.exists()


def test_writes_pngs_metadata_and_dataset_json_then_resumes(tiny_pipes, config):
    folder = wd.Path(config.out)
    summary = make(config, tiny_pipes)
    assert (summary["total"], summary["written"], summary["skipped"]) == (3, 3, 0)
    assert summary["images_per_second"] > 0 and summary["seconds"] > 0
    rows = lines(folder)
    assert [r["file"] for r in rows] == [i.file for i in plan(config)]
    for row, item in zip(rows, plan(config)):
        assert (row["prompt"], row["guidance"], row["seed"], row["keyword"]) == \
               (item.prompt, item.guidance, item.seed, item.keyword)
        assert (row["width"], row["height"], row["steps"], row["high_noise_frac"]) == (64, 64, 6, 0.8)
        assert row["base"] == tiny_pipes.base_source and row["refiner"] == tiny_pipes.refiner_source
        assert row["caption"] == "wrong"
        with Image.open(folder / row["file"]) as image:
            assert image.size == (64, 64)
    document = json.loads((folder / wd.DATASET_FILE).read_text())
    assert document["config"]["count"] == 3 and document["config"]["guidance_scales"] == [8, 9, 10, 11, 12, 13]
    assert document["prompts"] == wrong_prompts()

    before = mtimes(folder)
    again = make(config, tiny_pipes)
    assert (again["written"], again["skipped"], again["images_per_second"]) == (0, 3, None)
    assert mtimes(folder) == before  # nothing rewritten, dataset.json included

    gone = plan(config)[1].file  # a deleted PNG is made again, its line is not repeated
    (folder / gone).unlink()
    assert make(config, tiny_pipes)["written"] == 1
    now = mtimes(folder)
    assert [k for k in before if k.endswith(".png") and now[k] != before[k]] == [gone]
    assert [r["file"] for r in lines(folder)] == [i.file for i in plan(config)]

    orphan = plan(config)[2].file  # a PNG without its line is overwritten and gets one line
    (folder / orphan).write_bytes(b"torn")
    write_text_atomic(folder / wd.METADATA_FILE,
                      "".join(json.dumps(r) + "\n" for r in lines(folder) if r["file"] != orphan))
    assert make(config, tiny_pipes)["written"] == 1
    with Image.open(folder / orphan) as image:
        assert image.size == (64, 64)
    assert sorted(r["file"] for r in lines(folder)) == sorted(i.file for i in plan(config))

    more = make(replace(config, count=4), tiny_pipes)  # a larger --count extends the same dataset
    assert (more["written"], more["skipped"]) == (1, 3) and len(lines(folder)) == 4


def test_a_different_configuration_is_refused_in_the_same_folder(tiny_pipes, config):
    make(replace(config, count=1), tiny_pipes)
    for change in ({"seed": 1}, {"steps": 5}, {"guidance_scales": (8.0, 9.0)}, {"width": 72}):
        with pytest.raises(InvalidConfigError, match=f"{next(iter(change)).rstrip('s')}.*another --out"):
            make(replace(config, count=1, **change), tiny_pipes)
    assert len(lines(wd.Path(config.out))) == 1
    other = wd.Path(config.out).parent / "other"
    other.mkdir()
    (other / wd.DATASET_FILE).write_text("{not json")
    with pytest.raises(InvalidConfigError, match="not a dataset.json.*another --out"):
        make(replace(config, out=str(other)), tiny_pipes)


def test_a_folder_in_use_is_refused(tiny_pipes, config):
    folder = wd.Path(config.out)
    folder.mkdir()
    with wd._folder_lock(folder), pytest.raises(InvalidConfigError, match="in use"):
        make(config, tiny_pipes)


def test_same_seed_same_png(tmp_path, tiny_pipes, config):
    one = replace(config, count=1, out=str(tmp_path / "a"))
    make(one, tiny_pipes)
    make(replace(one, out=str(tmp_path / "b")), tiny_pipes)
    make(replace(one, out=str(tmp_path / "c"), seed=7), tiny_pipes)
    name = plan(one)[0].file
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    pixels = [np.asarray(Image.open(tmp_path / d / name)) for d in "ac"]
    assert not np.array_equal(*pixels)


def test_main_with_argparse_on_tiny(tmp_path, capsys):
    out = tmp_path / "cli"
    args = parse(["--base", "tiny", "--refiner", "tiny", "--out", str(out), "--count", "2", "--width", "64",
                  "--height", "64", "--steps", "4", "--guidance-scales", "8, 13", "--seed", "3"])
    assert wd.main(args) == 0
    captured = capsys.readouterr()
    assert "wrote 2, skipped 0 of 2 images" in captured.out and "wrong dataset" in captured.err
    rows = lines(out)
    assert [(r["file"], r["seed"], r["guidance"]) for r in rows] == [("wrong-0000-g8.png", 3, 8.0),
                                                                      ("wrong-0001-g13.png", 4, 13.0)]
    assert json.loads((out / wd.DATASET_FILE).read_text())["config"]["base"] == "tiny"


OLD_LINE_KEYS = {"file", "file_name", "caption", "index", "prompt", "keyword", "guidance", "seed", "width", "height",
                 "steps", "high_noise_frac", "base", "refiner", "vae"}


def test_degrade_parses_from_the_cli_and_corrupts_each_image_reproducibly(tmp_path, tiny_pipes, config):
    plain = replace(config, count=2, out=str(tmp_path / "plain"))
    args = parse(["--base", "tiny", "--refiner", "tiny", "--out", str(tmp_path / "bad"), "--count", "2",
                  "--width", "64", "--height", "64", "--steps", "6", "--degrade", "noise, cutout,blur"])
    bad = wd.config_from_args(args)
    assert bad == replace(plain, out=str(tmp_path / "bad"), degrade=("noise", "cutout", "blur"))  # order as given
    assert wd.config_from_args(parse(["--base", "tiny", "--out", "o"])).degrade == ()
    make(plain, tiny_pipes)
    make(bad, tiny_pipes)
    plain_dir, bad_dir = wd.Path(plain.out), wd.Path(bad.out)

    # the default run is as before the option existed: no degrade key anywhere, the same metadata keys
    assert "degrade" not in json.loads((plain_dir / wd.DATASET_FILE).read_text())["config"]
    assert all(set(r) == OLD_LINE_KEYS for r in lines(plain_dir))
    # the degraded run records its list, and each image is exactly the plain image through degrade(seed + index)
    assert json.loads((bad_dir / wd.DATASET_FILE).read_text())["config"]["degrade"] == ["noise", "cutout", "blur"]
    for row, item in zip(lines(bad_dir), plan(bad)):
        assert row["degrade"] == ["noise", "cutout", "blur"] and set(row) == OLD_LINE_KEYS | {"degrade"}
        with Image.open(plain_dir / item.file) as clean, Image.open(bad_dir / item.file) as dirty:
            assert dirty.size == clean.size == (64, 64) and dirty.mode == "RGB"
            assert not np.array_equal(np.asarray(dirty), np.asarray(clean))
            assert dirty.tobytes() == degrade_image(clean, bad.degrade, item.seed).tobytes()

    # a resumed image is the same bytes; another --degrade (or none) in the same folder is refused
    first = bad_dir / plan(bad)[0].file
    before = first.read_bytes()
    first.unlink()
    assert make(bad, tiny_pipes)["written"] == 1 and first.read_bytes() == before
    for other in (("noise", "cutout"), ("cutout", "noise", "blur"), ()):
        with pytest.raises(InvalidConfigError, match="degrade.*another --out"):
            make(replace(bad, degrade=other), tiny_pipes)
    with pytest.raises(InvalidConfigError, match="degrade.*another --out"):
        make(replace(plain, degrade=("jpeg",)), tiny_pipes)


def test_retrained_toy_weights_are_refused_in_the_same_folder(tmp_path, monkeypatch):
    """The preset name `toy` stays the same when `make train-toy` retrains it: the dataset records the weights'
    fingerprint, and a folder made with other weights is refused (checked before any model is loaded)."""
    import shutil

    from sdxl_core import presets

    weights = tmp_path / "weights"
    for sub in ("base", "refiner"):
        shutil.copytree(presets.toy_weights_dir() / sub, weights / sub)
    monkeypatch.setenv("SDXL_BENCH_TOY_WEIGHTS", str(weights))
    config = WrongDatasetConfig(base="toy", refiner="toy", out=str(tmp_path / "ds"), count=1)
    document = config.document()
    assert document["config"]["toy_weights"] == presets.toy_fingerprint()
    assert "toy_weights" not in replace(config, base="tiny", refiner="tiny").document()["config"]
    folder = tmp_path / "ds"
    folder.mkdir()
    write_text_atomic(folder / wd.DATASET_FILE, json.dumps(document))
    wd._check_resume(folder, config.document())  # same weights: resumes

    unet = weights / "refiner" / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(unet.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    unet.write_bytes(bytes(data))
    with pytest.raises(InvalidConfigError, match="made with other toy weights.*delete"):
        make_wrong_dataset(config, progress=False)
    assert not (folder / wd.METADATA_FILE).exists()
