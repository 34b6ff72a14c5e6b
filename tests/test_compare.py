import argparse
import json

import numpy as np
import pytest

from sdxl_core import compare
from sdxl_core.compare import (NO_INTERVAL, NOT_COMPARABLE, FailRule, check_gate, compare_runs, gate_against,
                               load_run, match_groups, parse_fail_on, render_comparison)
from sdxl_core.errors import InvalidConfigError
from sdxl_core.results_schema import RESULTS_FILE, SCHEMA_VERSION, group_name

PROMPTS = [f"prompt {i}" for i in range(10)]
SEEDS = (0, 1, 2)
SETTINGS = {"steps": 20, "guidance_scale": 13.0, "high_noise_frac": 0.8, "width": 128, "height": 128,
            "use_compel": True}
NR = 2000  # bootstrap resamples: enough for the tests, fast


def _info(name, hib, kind, label=None):
    return {"name": name, "display_name": name.upper(), "higher_is_better": hib, "kind": kind, "unit": "",
            "description": "", "label": label, "lower_is_better": not hib}


def make_doc(*, loras=("wrong@v1",), shift=0.0, fid=None, clip_label=None, fid_label="effnet", settings=None,
             commit="aaa", rng_seed=0, sha=None, fid_ci=None, variants=("baseline", "wrong_lora")):
    """A schema-1 document; per-image clip = base(prompt, seed) + shift (+ small noise) for every group."""
    rng = np.random.default_rng(rng_seed)
    base = np.random.default_rng(123).normal(25.0, 2.0, size=(len(PROMPTS), len(SEEDS)))
    groups = [(v, None) for v in variants if v != "wrong_lora"]
    groups += [("wrong_lora", lo) for lo in loras] if "wrong_lora" in variants else []
    cases = []
    for variant, lora in groups:
        for i, p in enumerate(PROMPTS):
            for j, s in enumerate(SEEDS):
                v = float(base[i, j] + shift + rng.normal(0, 0.2))
                cases.append({"id": f"{variant}-{lora}-{i}-{s}", "variant": variant, "lora": lora, "prompt_index": i,
                              "prompt": p, "seed": s, "negative_prompt": None, "status": "ok", "message": None,
                              "image": None, "seconds": 1.0, "stage_seconds": {},
                              "metrics": {"clip": v, "sanity": []}})
    sets = {}
    for variant, lora in groups:
        entry = {"value": (fid or {}).get(variant, 10.0), "n": 30, "n_real": 30, "warnings": []}
        if fid_ci is not None:
            entry.update(ci_low=entry["value"] - fid_ci, ci_high=entry["value"] + fid_ci)
        sets[group_name(variant, lora)] = {"fid": entry}
    lora_recs = [{"name": lo.split("@")[0], "version": lo.split("@")[1], "label": lo, "path": f"/l/{lo}",
                  "sha256": (sha or {}).get(lo, "sha-" + lo), "size": 1, "metadata": {}} for lo in loras]
    return {"schema_version": SCHEMA_VERSION, "run_id": f"run-{commit}", "created_at": "2026-01-01T00:00:00+00:00",
            "finished_at": None, "git": {"commit": commit, "dirty": False},
            "machine": {}, "config": {"base": "tiny", "refiner": "tiny", "vae": None,
                                      "settings": dict(settings or SETTINGS)},
            "loras": lora_recs,
            "metrics": {"clip": _info("clip_score", True, "per_image", clip_label),
                        "fid": _info("fid", False, "set", fid_label)},
            "cases": cases, "sets": sets, "comparisons": [], "latency": [], "warnings": []}


def write(tmp_path, name, doc):
    folder = tmp_path / name
    folder.mkdir()
    (folder / RESULTS_FILE).write_text(json.dumps(doc))
    return folder


def rows(doc, metric, group_b=None):
    return [r for r in doc["rows"] if r["metric"] == metric and (group_b is None or r["group_b"] == group_b)]


def test_load_run_folder_file_and_errors(tmp_path):
    folder = write(tmp_path, "a", make_doc())
    assert load_run(folder)["run_id"] == load_run(folder / RESULTS_FILE)["run_id"] == "run-aaa"
    with pytest.raises(InvalidConfigError, match="no such file"):
        load_run(tmp_path / "missing")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InvalidConfigError, match="bad.json: not valid JSON"):
        load_run(tmp_path / "bad.json")
    (tmp_path / "old.json").write_text(json.dumps({"schema_version": 0}))
    with pytest.raises(InvalidConfigError, match="old.json: schema_version"):
        load_run(tmp_path / "old.json")


def test_match_groups_same_name_and_new_lora_version():
    a, b = make_doc(loras=("wrong@v1",)), make_doc(loras=("wrong@v2",))
    assert match_groups(a, b) == [("baseline", "baseline"), ("wrong_lora[wrong@v1]", "wrong_lora[wrong@v2]")]
    # a version present in both pairs by name; the leftover old version pairs with the single new one
    a2, b2 = make_doc(loras=("wrong@v1", "wrong@v2")), make_doc(loras=("wrong@v2", "wrong@v3"))
    assert set(match_groups(a2, b2)) == {("baseline", "baseline"), ("wrong_lora[wrong@v2]", "wrong_lora[wrong@v2]"),
                                         ("wrong_lora[wrong@v1]", "wrong_lora[wrong@v3]")}
    # a different LoRA name is not a new version
    c = make_doc(loras=("other@v1",))
    assert match_groups(a, c) == [("baseline", "baseline")]


def test_unmatched_groups_reported():
    a = make_doc(variants=("baseline", "wrong_negative", "wrong_lora"), loras=("wrong@v1",))
    b = make_doc(variants=("baseline", "wrong_lora"), loras=("other@v1",))
    doc = compare_runs(a, b, n_resamples=NR)
    assert doc["unmatched"] == {"a": ["wrong_negative", "wrong_lora[wrong@v1]"], "b": ["wrong_lora[other@v1]"]}
    assert any("only in run A" in w and "wrong_negative" in w for w in doc["warnings"])
    assert any("only in run B" in w for w in doc["warnings"])


@pytest.mark.parametrize("shift", [1.0, -1.0, 0.0])
def test_paired_ci_covers_shift_and_verdict(shift):
    a, b = make_doc(rng_seed=1), make_doc(shift=shift, rng_seed=2, loras=("wrong@v2",), commit="bbb")
    doc = compare_runs(a, b, n_resamples=NR)
    (r,) = rows(doc, "clip", "wrong_lora[wrong@v2]")
    assert r["group_a"] == "wrong_lora[wrong@v1]" and r["n"] == 30 and r["kind"] == "per_image"
    assert r["ci_low"] <= shift <= r["ci_high"] and r["ci_high"] - r["ci_low"] < 0.5
    assert r["delta"] == pytest.approx(r["b"] - r["a"]) == pytest.approx(r["comparison"]["estimate"])
    assert r["verdict"] == {1.0: "better", -1.0: "worse", 0.0: "no significant difference"}[shift]
    assert doc["a"]["commit"] == "aaa" and doc["b"]["commit"] == "bbb"
    assert doc["pairs"][1]["lora_a"] == {"label": "wrong@v1", "sha256": "sha-wrong@v1"}
    assert doc["pairs"][1]["lora_b"] == {"label": "wrong@v2", "sha256": "sha-wrong@v2"}
    json.dumps(doc, allow_nan=False)


def test_cases_matched_by_prompt_text_and_seed():
    a = make_doc()
    b = make_doc(shift=1.0)
    for c in b["cases"]:  # a prompt inserted in front of B's list: indices shift, texts stay
        c["prompt_index"] += 1
    b["cases"] = [c for c in b["cases"] if c["seed"] != 2 or c["prompt"] != "prompt 0"]
    r = rows(compare_runs(a, b, n_resamples=NR), "clip", "baseline")[0]
    assert r["n"] == 29 and any("1 case(s) without a partner" in w for w in r["warnings"])
    assert r["ci_low"] <= 1.0 <= r["ci_high"]


def test_set_metric_lower_is_better_with_and_without_interval():
    a = make_doc(fid={"baseline": 10.0, "wrong_lora": 20.0})
    b = make_doc(fid={"baseline": 10.0, "wrong_lora": 15.0})
    r = rows(compare_runs(a, b, n_resamples=NR), "fid", "wrong_lora[wrong@v1]")[0]
    assert r["kind"] == "set" and r["delta"] == -5.0 and r["relative_delta"] == -0.25
    assert r["ci_low"] is None and r["verdict"] == NO_INTERVAL
    a_ci, b_ci = (make_doc(fid={"wrong_lora": v}, fid_ci=1.0) for v in (20.0, 15.0))
    r = rows(compare_runs(a_ci, b_ci, n_resamples=NR), "fid", "wrong_lora[wrong@v1]")[0]
    assert r["ci_low"] == pytest.approx(-5 - 2 ** 0.5) and r["verdict"] == "better"  # FID fell: better
    b_worse = make_doc(fid={"wrong_lora": 25.0}, fid_ci=1.0)
    assert rows(compare_runs(a_ci, b_worse, n_resamples=NR), "fid", "wrong_lora[wrong@v1]")[0]["verdict"] == "worse"


def test_no_verdict_when_labels_differ():
    a = make_doc(clip_label="smoke", fid_label="effnet-lite0 features")
    b = make_doc(shift=3.0, fid_label=None, fid_ci=1.0)
    a["sets"]["baseline"]["fid"].update(ci_low=9.0, ci_high=11.0)
    doc = compare_runs(a, b, n_resamples=NR)
    for metric in ("clip", "fid"):
        for r in rows(doc, metric):
            assert r["verdict"] == NOT_COMPARABLE and r["ci_low"] is None
    assert rows(doc, "clip")[0]["label_a"] == "smoke"
    failures = check_gate(doc, ["clip:-0.5"])
    assert failures and all("cannot check" in f for f in failures)


def test_settings_and_sha_warnings():
    a = make_doc()
    b = make_doc(settings={**SETTINGS, "steps": 50, "width": 1024}, sha={"wrong@v1": "changed"})
    b["config"]["base"] = "stabilityai/sdxl"
    warnings = compare_runs(a, b, n_resamples=NR)["warnings"]
    assert any("settings differ" in w and "steps 20 -> 50" in w and "width 128 -> 1024" in w and "base" in w
               for w in warnings)
    assert any("wrong@v1: sha256 differs" in w for w in warnings)
    assert not compare_runs(a, make_doc(), n_resamples=NR)["warnings"]


@pytest.mark.parametrize("text, rule", [
    ("clip:-0.5", FailRule("clip", 0.5, -1, False, "clip:-0.5")),
    ("fid:+5%", FailRule("fid", 5.0, 1, True, "fid:+5%")),
    ("kid:+0.01", FailRule("kid", 0.01, 1, False, "kid:+0.01")),
    (" clip_score : 1e-1 ", FailRule("clip_score", 0.1, 0, False, "clip_score : 1e-1")),
])
def test_parse_fail_on(text, rule):
    assert parse_fail_on(text) == rule


@pytest.mark.parametrize("text", ["clip", "clip:", ":-0.5", "clip:-x", "clip:--1", "clip:5%%", "clip:1e999", ""])
def test_parse_fail_on_rejects(text):
    with pytest.raises(InvalidConfigError, match="METRIC:"):
        parse_fail_on(text)


def test_gate_semantics_each_direction_absolute_and_percent():
    a = make_doc(fid={"baseline": 10.0, "wrong_lora": 20.0})
    drop = compare_runs(a, make_doc(shift=-1.0, fid={"baseline": 10.4, "wrong_lora": 21.5}), n_resamples=NR)
    assert len(check_gate(drop, ["clip:-0.5"])) == 2  # CLIP fell by ~1 in both groups
    assert check_gate(drop, ["clip:-1.5", "clip:2"]) == []  # within threshold; no sign: drop is bad for clip
    assert len(check_gate(drop, ["clip_score:-0.5"])) == 2  # the MetricInfo name resolves to the row key
    assert check_gate(drop, ["fid:+5%"]) == [check_gate(drop, ["fid:+5%"])[0]]  # 21.5 > 20 * 1.05; 10.4 < 10.5
    assert "wrong_lora[wrong@v1]" in check_gate(drop, ["fid:+5%"])[0]
    assert check_gate(drop, ["fid:+8%"]) == [] and len(check_gate(drop, ["fid:+0.3"])) == 2
    msg = check_gate(drop, ["clip:-0.5"])[0]
    assert msg.startswith("clip:-0.5 on baseline vs baseline: clip ") and "delta -" in msg and "confident" in msg
    near = check_gate(compare_runs(a, make_doc(shift=-0.55, rng_seed=5), n_resamples=NR), ["clip:-0.5"])
    assert "may be noise" in near[0]  # delta -0.57, interval about [-0.65, -0.48]
    rise = compare_runs(a, make_doc(shift=1.0, fid={"baseline": 9.0, "wrong_lora": 10.0}), n_resamples=NR)
    assert check_gate(rise, ["clip:-0.5", "fid:+5%", "fid:+0.01"]) == []  # improvements never fail
    with pytest.raises(InvalidConfigError, match="write clip:-0.5"):
        check_gate(rise, ["clip:+0.5"])  # contradicts higher-is-better
    with pytest.raises(InvalidConfigError, match="write fid:\\+5%"):
        check_gate(rise, ["fid:-5%"])
    with pytest.raises(InvalidConfigError, match="metrics present: clip, fid"):
        check_gate(rise, ["kid:+0.01"])


def test_gate_against_run_folders(tmp_path):
    ref = write(tmp_path, "ref", make_doc())
    new = write(tmp_path, "new", make_doc(shift=-1.0, loras=("wrong@v2",)))
    assert len(gate_against(new, ref, ["clip:-0.5"])) == 2
    assert gate_against(new, ref, [parse_fail_on("clip:-2")]) == []
    other = write(tmp_path, "other", make_doc(variants=("wrong_negative",)))
    assert "nothing to gate on" in gate_against(other, ref, ["clip:-0.5"])[0]


def _cli(argv):
    p = argparse.ArgumentParser()
    compare.add_arguments(p)
    return compare.main(p.parse_args(argv))


def test_cli_exit_codes_and_json(tmp_path, capsys):
    a = write(tmp_path, "a", make_doc())
    b = write(tmp_path, "b", make_doc(shift=-1.0, loras=("wrong@v2",), commit="bbb"))
    out = tmp_path / "cmp.json"
    assert _cli([str(a), str(b), "--json", str(out), "--resamples", str(NR)]) == 0
    text = capsys.readouterr().out
    assert "wrong_lora[wrong@v1] -> wrong_lora[wrong@v2]" in text and "worse" in text and "commit bbb" in text
    doc = json.loads(out.read_text())
    assert doc["gate"] == {"rules": [], "failures": []} and len(rows(doc, "clip")) == 2
    assert _cli([str(a), str(b / RESULTS_FILE), "--fail-on", "clip:-0.5", "--resamples", str(NR)]) == 1
    assert "FAIL clip:-0.5" in capsys.readouterr().out
    assert _cli([str(a), str(b), "--fail-on", "clip:-3", "--fail-on", "fid:+5%", "--resamples", str(NR)]) == 0
    with pytest.raises(InvalidConfigError, match="METRIC:"):
        _cli([str(a), str(b), "--fail-on", "clip"])


def test_render_comparison_table():
    doc = compare_runs(make_doc(), make_doc(loras=("wrong@v2",)), n_resamples=NR)
    text = render_comparison(doc)
    header = text.splitlines()[0].split()
    assert header == ["group", "metric", "A", "B", "delta", "interval", "verdict"]
    assert NO_INTERVAL in text and "sha-wrong@v2"[:12] in text


def test_module_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, sdxl_core.compare; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
