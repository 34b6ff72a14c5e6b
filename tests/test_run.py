import json
import os
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from sdxl_core import run as run_mod  # noqa: E402
from sdxl_core.cli import main as cli_main  # noqa: E402
from sdxl_core.errors import InvalidConfigError  # noqa: E402
from sdxl_core.generate import GenerationSettings  # noqa: E402
from sdxl_core.run import RunConfig, run_job  # noqa: E402

SMALL = GenerationSettings(steps=4, width=64, height=64)


# ------------------------------------------------------------------------------------------------
# The real tiny pipelines behind a spy: it counts model loads, records each generation request, and makes
# chosen requests fail (fault injection); everything else is the real diffusers code path.
# ------------------------------------------------------------------------------------------------


class Spy:
    def __init__(self, pipes, fail=lambda request: False):
        self.loads = 0
        self.requests = []
        self.fail = fail
        self.pipes = pipes

    def load_pipelines(self, *args, **kwargs):
        self.loads += 1
        return self.pipes

    def generate(self, pipes, request, encoder=None, clock=None):
        from sdxl_core.generate import generate

        self.requests.append(request)
        if self.fail(request):
            raise RuntimeError(f"boom <{request.prompt}>")
        return generate(pipes, request, encoder, clock)


@pytest.fixture
def spy(monkeypatch, tiny_pipes):
    """Runs on the session's shared tiny pipelines (a run without a LoRA leaves them unchanged)."""
    s = Spy(tiny_pipes)
    monkeypatch.setattr(run_mod, "load_pipelines", s.load_pipelines)
    monkeypatch.setattr(run_mod, "generate", s.generate)
    return s


def config(tmp_path, **changes):
    base = RunConfig(prompts=("a wolf", "an eye"), seeds=(0, 1), settings=SMALL, run_dir=str(tmp_path / "runs"),
                     run_id="r1", warmup=False)
    return replace(base, **changes)


def rows(folder):
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------
# Validation happens before any folder or model
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("run_id", ["../x", "..", "a/b", "/abs", "a\0b", "", ".hidden", "a\\b", "x" * 200])
def test_unsafe_run_ids_are_refused(tmp_path, spy, run_id):
    with pytest.raises(InvalidConfigError, match="run id"):
        run_job(config(tmp_path, run_id=run_id))
    assert spy.loads == 0 and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("changes, match", [
    ({"settings": GenerationSettings(steps=0)}, "steps"),
    ({"settings": GenerationSettings(high_noise_frac=1.0)}, "high_noise_frac"),
    ({"prompts": ()}, "prompt list is empty"),
    ({"prompts": ("a wolf", "  ")}, "prompt 1 is empty"),
    ({"seeds": ()}, "seeds"),
    ({"seeds": (0, -1)}, "seed"),
    ({"seeds": (1, 1)}, "more than once"),
    ({"variants": ("baseline", "nope")}, "valid variants are baseline, wrong_negative, wrong_lora"),
    ({"variants": ("wrong_lora",)}, "--lora"),
    ({"lora": "/no/such/lora.safetensors"}, "--lora"),
    ({"dtype": "int8"}, "dtype"),
    ({"device": "not-a-device"}, "device"),
])
def test_bad_configs_fail_before_loading(tmp_path, spy, changes, match):
    with pytest.raises(InvalidConfigError, match=match):
        run_job(config(tmp_path, **changes))
    assert spy.loads == 0 and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("changes, match", [
    ({"base": "/no/such/sdxl-base", "refiner": None}, "neither a folder nor a hub id"),
    ({"base": "nobody-has/this-model-xyz", "refiner": None}, "HF_HUB_OFFLINE"),
    ({"refiner": "/no/such/refiner"}, "refiner"),
    ({"vae": "nobody-has/this-vae-xyz"}, "vae"),
    ({"base": "/no/such/sdxl-base"}, "--refiner tiny only pairs with --base tiny"),
    ({"base": "sdxl-random", "refiner": "tiny"}, "sdxl-random"),
])
def test_missing_models_fail_before_the_run_folder(tmp_path, spy, monkeypatch, changes, match):
    from sdxl_core.errors import SdxlBenchError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SdxlBenchError, match=match):
        run_job(config(tmp_path, **changes))
    assert spy.loads == 0 and not (tmp_path / "runs").exists()


def test_cuda_without_cuda_is_refused(tmp_path, spy):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(InvalidConfigError, match="no CUDA device"):
        run_job(config(tmp_path, device="cuda"))


def test_default_variants_without_lora_leave_out_wrong_lora_and_say_so(tmp_path, spy, capsys):
    report = run_job(config(tmp_path))
    folder = report.parent
    doc = json.loads((folder / "config.json").read_text())
    assert [v["name"] for v in doc["config"]["variants"]] == ["baseline", "wrong_negative"]
    assert "wrong_lora needs --lora" in doc["config"]["variants_note"]
    assert "wrong_lora needs --lora" in capsys.readouterr().err
    assert "wrong_lora needs --lora" in report.read_text()


def test_variants_with_lora(tmp_path, spy):
    from safetensors.torch import save_file

    from sdxl_core.loading import load_pipelines
    from sdxl_core.lora import random_lora_state_dict

    spy.pipes = load_pipelines("tiny", "tiny", device="cpu")  # its own: the LoRA is loaded onto it
    lora = tmp_path / "wrong.safetensors"
    save_file(random_lora_state_dict(spy.pipes.base.unet, rank=4, seed=0), str(lora))
    report = run_job(config(tmp_path, lora=f"wrong@v3={lora}", prompts=("a wolf",), seeds=(3,)))
    assert spy.pipes.base.get_list_adapters() == {"unet": ["wrong__v3"]}
    assert not getattr(spy.pipes.refiner.unet, "peft_config", None)  # never on the refiner
    assert [(r.negative_prompt, r.lora_scale) for r in spy.requests] == [(None, 0.0), ("wrong", 0.0), ("wrong", 1.0)]
    result = rows(report.parent)
    assert [r["variant"] for r in result] == ["baseline", "wrong_negative", "wrong_lora"]
    record = json.loads((report.parent / "config.json").read_text())["config"]["lora"]
    import hashlib

    assert record["label"] == "wrong@v3" and record["path"] == str(lora)
    assert record["sha256"] == hashlib.sha256(lora.read_bytes()).hexdigest()
    assert record["size_bytes"] == lora.stat().st_size
    assert [r["lora"] for r in result] == [None, None, {"label": "wrong@v3", "sha256": record["sha256"]}]


def test_lora_pickle_refused_unless_allowed(tmp_path, spy):
    lora = tmp_path / "wrong.bin"
    lora.write_bytes(b"pickle")
    with pytest.raises(InvalidConfigError, match="--allow-pickle"):
        run_job(config(tmp_path, lora=str(lora)))
    assert spy.loads == 0 and not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------
# The run folder
# ------------------------------------------------------------------------------------------------


def test_run_folder_layout(tmp_path, spy):
    report = run_job(config(tmp_path))
    folder = tmp_path / "runs" / "r1"
    assert report == folder / "report.html"
    assert spy.loads == 1
    doc = json.loads((folder / "config.json").read_text())
    assert doc["run_id"] == "r1" and doc["config"]["prompts"] == ["a wolf", "an eye"]
    assert doc["config"]["settings"]["steps"] == 4 and doc["config"]["device"] == "cpu"
    assert {"python", "torch", "diffusers", "compel"} <= set(doc["environment"])
    result = rows(folder)
    assert len(result) == 2 * 2 * 2
    for r in result:
        assert r["status"] == "ok" and r["message"] is None and r["sanity"] == []
        assert r["file"] == f"images/{r['variant']}/{r['prompt_index']}-{r['seed']}.png"
        assert (folder / r["file"]).is_file()
        assert set(r) >= {"variant", "prompt", "prompt_index", "seed", "negative_prompt", "lora_scale", "file",
                          "seconds", "stage_seconds", "status", "message"}
    html = report.read_text()
    assert html.count("<img ") == 8
    assert not list(folder.rglob(".*.tmp"))


def test_a_failing_image_is_an_error_row_and_the_run_goes_on(tmp_path, spy):
    spy.fail = lambda request: request.prompt == "an eye" and request.negative_prompt == "wrong"
    report = run_job(config(tmp_path))
    result = rows(report.parent)
    errors = [r for r in result if r["status"] == "error"]
    assert len(result) == 8 and len(errors) == 2
    assert all(r["message"] == "RuntimeError: boom <an eye>" and r["file"] is None for r in errors)
    assert "error: RuntimeError: boom &lt;an eye&gt;" in report.read_text()
    assert run_mod.summarize(report.parent) == {"ok": 6, "error": 2, "missing": 0}

    # Resume: only the failed images are made again; they now succeed.
    spy.fail = lambda request: False
    spy.requests.clear()
    run_job(config(tmp_path))
    assert [(r.prompt, r.negative_prompt, r.seed) for r in spy.requests] == [("an eye", "wrong", 0),
                                                                                ("an eye", "wrong", 1)]
    assert run_mod.summarize(report.parent) == {"ok": 8, "error": 0, "missing": 0}
    assert len(rows(report.parent)) == 10  # append-only


def test_resume_skips_done_images_and_redoes_missing_files(tmp_path, spy):
    run_job(config(tmp_path))
    folder = tmp_path / "runs" / "r1"
    (folder / "images" / "baseline" / "1-0.png").unlink()
    with open(folder / "results.jsonl", "a") as fh:
        fh.write('{"variant": "baseline", "prom')  # a torn line from a crash
    spy.requests.clear()
    spy.loads = 0
    run_job(config(tmp_path))
    assert [(r.prompt, r.seed, r.negative_prompt) for r in spy.requests] == [("an eye", 0, None)]
    lines = (folder / "results.jsonl").read_text().splitlines()
    assert lines[-2] == '{"variant": "baseline", "prom'  # the torn line stays alone on its line
    last = json.loads(lines[-1])
    assert (last["variant"], last["prompt_index"], last["seed"], last["status"]) == ("baseline", 1, 0, "ok")
    assert (folder / "images" / "baseline" / "1-0.png").is_file()

    # Nothing left: the models are not even loaded.
    spy.loads = 0
    run_job(config(tmp_path))
    assert spy.loads == 0


def test_resume_with_another_config_is_refused(tmp_path, spy):
    run_job(config(tmp_path))
    with pytest.raises(InvalidConfigError, match="different configuration .*seeds"):
        run_job(config(tmp_path, seeds=(0, 1, 2)))
    run_job(config(tmp_path, warmup=True))  # the warm-up does not change images, so it may differ


def test_a_run_folder_in_use_is_refused(tmp_path, spy):
    folder = tmp_path / "runs" / "r1"
    folder.mkdir(parents=True)
    with run_mod._RunLock(folder):
        with pytest.raises(InvalidConfigError, match="in use"):
            run_job(config(tmp_path))


def test_warmup_runs_once_per_variant_and_is_not_recorded(tmp_path, spy):
    report = run_job(config(tmp_path, warmup=True, prompts=("a wolf",), seeds=(0,)))
    assert [(r.negative_prompt, r.settings.steps) for r in spy.requests] == [
        (None, 4), ("wrong", 4), (None, 4), ("wrong", 4)]
    assert len(rows(report.parent)) == 2


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def test_cli_run_prints_the_report_path_last(tmp_path, spy, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a wolf\n\n(oil on canvas)+++ a fox\nan eye\n")
    code = cli_main(["run", "--prompts-file", str(prompts), "--num-prompts", "2", "--seeds", "5",
                     "--size", "64", "--run-dir", str(tmp_path / "runs"), "--run-id", "cli", "--no-warmup"])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    assert out[-1] == str(tmp_path / "runs" / "cli" / "report.html")
    doc = json.loads((tmp_path / "runs" / "cli" / "config.json").read_text())["config"]
    assert doc["prompts"] == ["a wolf", "(oil on canvas)+++ a fox"] and doc["seeds"] == [5]
    assert doc["settings"]["steps"] == 20 and doc["settings"]["width"] == 64  # tiny defaults, --size
    assert doc["refiner"] == "tiny"


def test_cli_run_exit_codes(tmp_path, spy, capsys):
    spy.fail = lambda request: True
    argv = ["run", "--num-prompts", "1", "--seeds", "0", "--size", "64", "--run-dir", str(tmp_path), "--no-warmup"]
    assert cli_main(argv + ["--run-id", "a"]) == 1
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith("report.html")
    assert cli_main(argv + ["--variants", "wrong_lora"]) == 2
    assert "--lora" in capsys.readouterr().err
    assert cli_main(argv + ["--seeds", "x"]) == 2
    assert cli_main(argv + ["--num-prompts", "99"]) == 2


# ------------------------------------------------------------------------------------------------
# The real tiny pipelines, with a LoRA on the base
# ------------------------------------------------------------------------------------------------


def test_tiny_run_with_lora_switches_it_per_call(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from sdxl_core.loading import load_pipelines
    from sdxl_core.lora import random_lora_state_dict

    lora = tmp_path / "wrong.safetensors"
    save_file(random_lora_state_dict(load_pipelines("tiny", None).base.unet, rank=4, seed=0, std=0.2), str(lora))

    loaded = []

    def spy(*args, **kwargs):
        loaded.append(load_pipelines(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(run_mod, "load_pipelines", spy)
    common = dict(prompts=("a wolf in a forest, (oil on canvas)+++",), seeds=(0,), warmup=False)
    plain = run_job(config(tmp_path, run_id="plain", variants=("baseline",), **common)).parent
    with_lora = run_job(config(tmp_path, run_id="lora", lora=str(lora), **common)).parent

    assert all(r["status"] == "ok" for r in rows(with_lora)), rows(with_lora)
    images = {v: np.asarray(Image.open(with_lora / f"images/{v}/0-0.png"))
              for v in ("baseline", "wrong_negative", "wrong_lora")}
    assert images["baseline"].shape == (64, 64, 3)
    # Scale 0 is the plain model even with the LoRA loaded; scale 1 changes the image.
    assert np.array_equal(images["baseline"], np.asarray(Image.open(plain / "images/baseline/0-0.png")))
    assert not np.array_equal(images["wrong_lora"], images["wrong_negative"])
    unet = loaded[-1].base.unet
    lora_layers = [m for m in unet.modules() if hasattr(m, "merged") and hasattr(m, "lora_A")]
    assert lora_layers and not any(m.merged for m in lora_layers)  # never fused
    assert "wrong__unversioned" in unet.peft_config
