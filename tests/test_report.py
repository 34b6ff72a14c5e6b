import json
import re

import pytest

from sdxl_core.errors import InvalidConfigError
from sdxl_core.report import latest_results, render_report

SCRIPT = "<script>document.title='x'</script>"


def _variant(name, negative, scale):
    return {"name": name, "negative_prompt": negative, "lora_scale": scale, "description": ""}


def _write_run(folder, rows, prompts=("a wolf", SCRIPT), torn_tail=None):
    folder.mkdir(parents=True, exist_ok=True)
    config = {
        "schema": 1, "run_id": "r1", "created": "2026-01-01T00:00:00+00:00",
        "config": {
            "base": "tiny", "refiner": "tiny", "vae": None, "weights_variant": None, "lora": "/x/<b>.safetensors",
            "variants": [_variant("baseline", None, 0.0), _variant("wrong_negative", "wrong & <i>", 0.0)],
            "variants_note": "no --lora given", "prompts": list(prompts), "seeds": [0, 1],
            "settings": {"steps": 20, "guidance_scale": 13.0, "high_noise_frac": 0.8, "width": 128, "height": 128,
                         "use_compel": True},
            "device": "cpu", "dtype": "float32", "warmup": True,
        },
    }
    (folder / "config.json").write_text(json.dumps(config))
    with open(folder / "results.jsonl", "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
        if torn_tail:
            fh.write(torn_tail)


def _row(variant, idx, seed, status="ok", seconds=1.0, message=None, prompt="a wolf"):
    return {"variant": variant, "prompt_index": idx, "prompt": prompt, "seed": seed, "negative_prompt": None,
            "lora_scale": 0.0, "file": f"images/{variant}/{idx}-{seed}.png" if status == "ok" else None,
            "seconds": seconds, "stage_seconds": {"base_denoising": seconds / 2}, "status": status,
            "message": message}


def test_report_escapes_user_text_and_shows_grid(tmp_path):
    rows = [
        _row("baseline", 0, 0, seconds=1.0),
        _row("baseline", 0, 1, seconds=3.0),
        _row("wrong_negative", 0, 0, status="error", message="RuntimeError: <boom> & more"),
        _row("baseline", 1, 0, prompt=SCRIPT),
    ]
    _write_run(tmp_path / "r1", rows, torn_tail='{"variant": "baseline", "prompt_in')
    path = render_report(tmp_path / "r1")
    assert path == tmp_path / "r1" / "report.html"
    html = path.read_text(encoding="utf-8")
    assert SCRIPT not in html and "<script" not in html
    assert "&lt;script&gt;document.title=&#x27;x&#x27;&lt;/script&gt;" in html
    assert "<b>" not in html and "&lt;b&gt;" in html  # LoRA path
    assert "wrong &amp; &lt;i&gt;" in html  # negative prompt
    assert 'class="cell error">error: RuntimeError: &lt;boom&gt; &amp; more' in html
    assert '<img src="images/baseline/0-0.png"' in html and '<img src="images/baseline/0-1.png"' in html
    assert "not run" in html  # wrong_negative prompt 1 has no result
    assert "1.67 s" in html  # baseline mean over its latest ok images: (1 + 3 + 1) / 3
    assert "no --lora given" in html
    assert not list((tmp_path / "r1").glob(".*.tmp"))


def test_report_means_per_variant(tmp_path):
    rows = [_row("baseline", 0, 0, seconds=1.0), _row("baseline", 0, 1, seconds=2.0),
            _row("wrong_negative", 0, 0, seconds=4.0)]
    _write_run(tmp_path / "r", rows, prompts=("a wolf",))
    html = render_report(tmp_path / "r").read_text()
    table = html[html.index("<h2>Variants</h2>"):html.index("<h2>", html.index("<h2>Variants</h2>") + 5)]
    assert re.search(r"<td>baseline</td>.*<td>2</td><td>0</td><td>1\.50 s</td>", table)
    assert re.search(r"<td>wrong_negative</td>.*<td>1</td><td>0</td><td>4\.00 s</td>", table)


def test_latest_result_wins_but_ok_is_never_replaced_by_error(tmp_path):
    rows = [_row("baseline", 0, 0, status="error", message="first"), _row("baseline", 0, 0, seconds=2.0),
            _row("baseline", 0, 0, status="error", message="late")]
    _write_run(tmp_path / "r", rows)
    latest = latest_results(tmp_path / "r")
    assert latest[("baseline", 0, 0)]["status"] == "ok"


def test_report_needs_a_config(tmp_path):
    with pytest.raises(InvalidConfigError, match="config.json"):
        render_report(tmp_path)


def test_only_run_image_paths_become_links(tmp_path):
    bad = _row("baseline", 0, 0)
    bad["file"] = "javascript:alert(1)"
    outside = _row("baseline", 0, 1)
    outside["file"] = "images/../../secret.png"
    _write_run(tmp_path / "r", [bad, outside], prompts=("a wolf",))
    html = render_report(tmp_path / "r").read_text()
    assert 'href="javascript' not in html and 'src="images/../' not in html
    assert html.count("not a run image path") == 2
