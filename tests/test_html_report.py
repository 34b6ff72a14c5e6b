"""The published HTML report (sdxl_core.html_report), rendered from results.json only."""

import argparse
import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
from PIL import Image

from sdxl_core.errors import InvalidConfigError
from sdxl_core.html_report import default_report_dir, render_index, render_report
from sdxl_core.metrics.meta import MetricInfo
from sdxl_core.report_args import add_arguments, main
from sdxl_core.results_schema import check_document, group_name
from sdxl_core.stats import Comparison, paired_difference

SCRIPT = "<script>document.title='x'</script>"
IMG = "<img src=x onerror=alert(1)>"
PROMPTS = ["a wolf", SCRIPT, IMG]
SEEDS = [0, 1]
WEIRD = ('we"ird<v', 'lo"ra<@v1')  # a variant and a LoRA version with a quote and a '<'
SMOKE_CLIP = MetricInfo("clip_score", "CLIP score (smoke)", True, "per_image", label="smoke")
FID = MetricInfo("fid", "FID (effnet-lite0)", False, "set",
                 label="effnet-lite0 features (not comparable to Inception FID); shift from baseline")
SANITY = MetricInfo("image_sanity", "flagged images", False, "set", unit="images")
VOID = {"meta", "img", "br", "input", "link", "hr", "source", "wbr"}


class Node:
    def __init__(self, tag, attrs, parent=None):
        self.tag, self.attrs, self.parent, self.children, self.content = tag, dict(attrs), parent, [], []

    def iter(self, tag=None):
        for child in self.children:
            if tag is None or child.tag == tag:
                yield child
            yield from child.iter(tag)

    def text(self):
        return "".join(c if isinstance(c, str) else c.text() for c in self.content)

    def by_id(self, ident):
        return next(n for n in self.iter() if n.attrs.get("id") == ident)

    def classes(self):
        return (self.attrs.get("class") or "").split()


class Tree(HTMLParser):
    """A small DOM from html.parser: enough to check structure (tags, attributes, text)."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.root = self.cur = Node("#root", [])
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        node = Node(tag, attrs, self.cur)
        self.cur.children.append(node)
        self.cur.content.append(node)
        if tag not in VOID:
            self.cur = node

    def handle_startendtag(self, tag, attrs):
        node = Node(tag, attrs, self.cur)
        self.cur.children.append(node)
        self.cur.content.append(node)

    def handle_endtag(self, tag):
        node = self.cur
        while node is not self.root and node.tag != tag:
            node = node.parent
        if node is not self.root:
            self.cur = node.parent

    def handle_data(self, data):
        self.cur.content.append(data)


def parse(path):
    return Tree(Path(path).read_text(encoding="utf-8")).root


def _png(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 16), color).save(path)


def make_run(folder, run_id="20260101-000000-aaaa", version="v1", commit="abc1234", created="2026-01-01T00:00:00Z",
             clip_shift=1.0):
    """A run folder with real PNGs and a check_document-valid results.json: 3 groups x 3 prompts x 2 seeds."""
    groups = [("baseline", None), ("wrong_lora", f"wrong@{version}"), WEIRD]
    cases, clip = [], {}
    for gi, (variant, lora) in enumerate(groups):
        for pi, prompt in enumerate(PROMPTS):
            for seed in SEEDS:
                cid = f"{group_name(variant, lora)}/{pi}-{seed}"
                error = variant == "wrong_lora" and (pi, seed) == (1, 1)
                flagged = variant == "baseline" and (pi, seed) == (0, 1)
                image = None if error else f"images/{variant}/{lora or 'none'}/{pi}-{seed}.png"
                if image:
                    _png(folder / image, (0, 0, 0) if flagged else (40 + 60 * gi, 30 * pi, 100 + 50 * seed))
                value = 20.0 + gi * clip_shift + 0.3 * pi + 0.1 * seed
                clip[(variant, pi, seed)] = value
                cases.append({
                    "id": cid, "variant": variant, "lora": lora, "prompt_index": pi, "prompt": prompt, "seed": seed,
                    "negative_prompt": "wrong" if variant != "baseline" else None,
                    "status": "error" if error else "ok",
                    "message": 'RuntimeError: <boom> & "q"' if error else None, "image": image,
                    "seconds": None if error else 1.5 + gi, "stage_seconds": {} if error else {"base": 1.0},
                    "metrics": {} if error else {"clip": value, "sanity": ["black"] if flagged else []}})
    keys = [(pi, s) for pi in range(len(PROMPTS)) for s in SEEDS]
    comparisons = [paired_difference([clip[("baseline", *k)] for k in keys], [clip[(v, *k)] for k in keys],
                                     higher_is_better=True, n_resamples=1000, metric="clip_score",
                                     reference="baseline", candidate=group_name(v, lora)).as_dict()
                   for v, lora in groups[1:]]
    comparisons.append(Comparison(metric="fid", reference="baseline", candidate=group_name(*groups[1]), n=6,
                                  estimate=3.5, ci_low=1.25, ci_high=5.5, confidence=0.95, n_resamples=1000, seed=0,
                                  verdict="worse", higher_is_better=False, method="bootstrap", reference_value=0.0,
                                  candidate_value=3.5, bootstrap_se=1.0,
                                  warnings=("only 6 images: FID <unreliable>",)).as_dict())
    doc = {
        "schema_version": 1, "run_id": run_id, "created_at": created, "finished_at": "2026-01-01T00:10:00Z",
        "git": {"commit": commit, "dirty": False},
        "machine": {"python": "3.11.2", "platform": "Linux-x86_64", "cpu_count": 2, "gpu": "NVIDIA H100 80GB HBM3",
                    "libraries": {"torch": "2.8.0", "diffusers": "0.35.1"}},
        "config": {"base": "tiny", "refiner": None, "lora": [f"wrong@{version}=/loras/<w>.safetensors"],
                   "seeds": SEEDS, "guidance_scale": 13.0, "settings": {"steps": 4, "width": 64, "height": 64}},
        "loras": [{"name": "wrong", "version": version, "path": "/loras/<w>.safetensors", "sha256": "f" * 64,
                   "size_bytes": 1234, "metadata": {"ss_note": "<b>bold</b>"}}],
        "metrics": {m.name: m.as_dict() for m in (SMOKE_CLIP, FID, SANITY)},
        "cases": cases,
        "sets": {group_name(v, lora): {"fid": {"value": 3.5 * gi, "n": 6, "n_real": 6,
                                               "warnings": ["few images"] if gi else []},
                                       "image_sanity": {"value": float(v == "baseline"), "n": 6, "n_real": 0,
                                                        "warnings": []}}
                 for gi, (v, lora) in enumerate(groups)},
        "comparisons": comparisons,
        "latency": [{"case": c["id"], "median_s": c["seconds"], "rounds": 3, "stage_seconds": {"base": 1.0},
                     "images_per_second": 1 / c["seconds"]} for c in cases if c["status"] == "ok" and c["seed"] == 0
                    and c["prompt_index"] == 0],
        "warnings": ["a run warning with <tags> & stuff"],
    }
    check_document(doc)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(doc), encoding="utf-8")
    return doc


@pytest.fixture
def run(tmp_path):
    folder = tmp_path / "reports" / "r1"
    return folder, make_run(folder)


def _grids(root):
    return [t for t in root.iter("table") if "grid" in t.classes()]


def test_report_has_every_case_grid_metrics_latency_and_provenance(run, tmp_path):
    folder, doc = run
    out = tmp_path / "out"
    path = render_report([folder], out)
    assert path == out / "index.html"
    root = parse(path)
    cells = {n.attrs["data-case"]: n for n in root.iter("td") if "data-case" in n.attrs}
    assert set(cells) == {c["id"] for c in doc["cases"]}
    groups = [group_name(*g) for g in (("baseline", None), ("wrong_lora", "wrong@v1"), WEIRD)]
    grids = _grids(root)
    assert len(grids) == len(PROMPTS)
    for grid in grids:
        assert [th.attrs["data-group"] for th in grid.iter("th") if "data-group" in th.attrs] == groups
        rows = list(next(grid.iter("tbody")).iter("tr"))
        assert [r.children[0].text() for r in rows] == ["0", "1"]
        assert all(len(r.children) == 1 + len(groups) for r in rows)
    error = cells["wrong_lora[wrong@v1]/1-1"]
    assert "error" in error.classes() and 'RuntimeError: <boom> & "q"' in error.text()
    assert not list(error.iter("img"))
    flagged = cells["baseline/0-1"]
    assert "flagged" in flagged.classes() and "flagged: black" in flagged.text()
    assert "smoke" in cells["baseline/0-0"].text()  # label next to the per-image CLIP value
    for img in root.iter("img"):  # every image copied into out/, same bytes, relative link
        target = out / unquote(img.attrs["src"])
        assert not img.attrs["src"].startswith(("/", "file:", "http")) and target.is_file()
    assert len(list(root.iter("img"))) == sum(c["status"] == "ok" for c in doc["cases"])
    copied = out / "images" / doc["run_id"] / "baseline/none/0-0.png"
    assert copied.read_bytes() == (folder / "images/baseline/none/0-0.png").read_bytes()

    values = root.by_id("metric-values")
    assert [r.children[0].text() for r in next(values.iter("tbody")).iter("tr")] == groups
    assert "smoke" in values.text() and FID.label in values.text() and "few images" in values.text()
    comp_rows = list(next(root.by_id("comparisons").iter("tbody")).iter("tr"))
    assert len(comp_rows) == len(doc["comparisons"])
    for row, comp in zip(comp_rows, doc["comparisons"]):
        texts = [c.text() for c in row.children]
        assert texts[0].startswith("FID" if comp["metric"] == "fid" else "CLIP") and texts[2] == comp["candidate"]
        assert texts[4] == f"[{comp['ci_low']:.4g}, {comp['ci_high']:.4g}] at 95 %" and texts[5] == comp["verdict"]
    assert "FID <unreliable>" in comp_rows[-1].text() and FID.label in comp_rows[-1].text()
    assert "worse" in comp_rows[-1].children[5].classes()
    captions = [f.text() for f in root.iter("figcaption")]
    assert any("CLIP" in c and "smoke" in c and "value per group" in c for c in captions)
    assert any("FID" in c and "shift from baseline" in c and "interval" in c for c in captions)
    assert len(list(root.iter("svg"))) == len(captions) == 6  # 3 metrics x values, 2 compared, latency

    latency = list(next(root.by_id("latency").iter("tbody")).iter("tr"))
    assert [r.children[0].text() for r in latency] == [x["case"] for x in doc["latency"]]
    prov = {r.children[0].text(): r.children[1].text() for r in next(root.by_id("provenance").iter("tbody")).iter("tr")}
    assert prov["commit"] == "abc1234" and prov["gpu"] == "NVIDIA H100 80GB HBM3" and prov["seeds"] == "0, 1"
    assert prov["version: torch"] == "2.8.0" and prov["config: settings.steps"] == "4"
    assert "f" * 64 in root.by_id("loras").text() and "<b>bold</b>" in root.by_id("loras").text()
    assert "a run warning with <tags> & stuff" in root.by_id("warnings").text()


def test_user_text_is_escaped(run, tmp_path):
    folder, _ = run
    path = render_report([folder], tmp_path / "out")
    html = path.read_text(encoding="utf-8")
    assert SCRIPT not in html and IMG not in html and "<b>bold" not in html and "<w>" not in html
    assert "&lt;script&gt;document.title=&#x27;x&#x27;&lt;/script&gt;" in html
    root = parse(path)
    assert len(list(root.iter("script"))) == 1  # the report's own self-check, in <head>
    assert not [n for n in root.iter() if any(a.startswith("on") for a in n.attrs)]
    headings = [h.text() for h in root.iter("h3") if h.text().startswith("#")]
    assert headings == [f"#{i}{p}" for i, p in enumerate(PROMPTS)]
    weird = [th for th in root.iter("th") if th.attrs.get("data-group") == group_name(*WEIRD)]
    assert len(weird) == len(PROMPTS) and weird[0].text().startswith(group_name(*WEIRD))
    srcs = [img.attrs["src"] for img in root.iter("img") if "%22" in img.attrs["src"]]
    assert srcs and all("%3C" in s and '"' not in s and "<" not in s for s in srcs)


def test_several_runs_side_by_side(tmp_path):
    a, b = tmp_path / "reports/a", tmp_path / "reports/b"
    make_run(a, run_id="same-id", version="v1", commit="1111111")
    make_run(b, run_id="same-id", version="v2", commit="2222222", clip_shift=2.0)
    out = tmp_path / "joint"
    root = parse(render_report([a, b], out))
    for grid in _grids(root):
        headers = [th.attrs["data-group"] for th in grid.iter("th") if "data-group" in th.attrs]
        assert headers.count("wrong_lora[wrong@v1]") == 1 and headers.count("wrong_lora[wrong@v2]") == 1
        assert len(headers) == 6
    assert sorted(p.name for p in (out / "images").iterdir()) == ["same-id", "same-id-1"]
    chart = next(s for s in root.iter("svg") if "CLIP score (smoke): value per group" in s.text())
    labels = [t.text() for t in chart.iter("title")]
    assert any("wrong@v1" in t for t in labels) and any("wrong@v2" in t for t in labels)
    prov_head = [th.text() for th in next(root.by_id("provenance").iter("thead")).iter("th")]
    assert prov_head == ["field", "same-id", "same-id"]
    assert "1111111" in root.by_id("provenance").text() and "2222222" in root.by_id("runs").text()


def test_report_is_relocatable_and_self_contained(run, tmp_path):
    folder, _ = run
    out = tmp_path / "out"
    render_report([folder], out)
    render_report([folder], out)  # re-rendering over an older report replaces its links
    moved = Path(shutil.move(str(out), str(tmp_path / "elsewhere")))
    shutil.rmtree(folder)
    html = (moved / "index.html").read_text(encoding="utf-8")
    assert "http://" not in html and "https://" not in html and str(tmp_path) not in html
    root = Tree(html).root
    assert all((moved / unquote(img.attrs["src"])).is_file() for img in root.iter("img"))
    assert not list(root.iter("link"))


def test_missing_image_file_is_an_error_cell(run, tmp_path):
    folder, _ = run
    (folder / "images/baseline/none/2-0.png").unlink()
    root = parse(render_report([folder], tmp_path / "out"))
    cell = next(n for n in root.iter("td") if n.attrs.get("data-case") == "baseline/2-0")
    assert "error" in cell.classes() and "image file missing" in cell.text() and not list(cell.iter("img"))


@pytest.mark.parametrize("content, needle", [
    (None, "does not exist"),
    ("{not json", "not readable JSON"),
    (json.dumps({"schema_version": 2}), "schema_version 2"),
    (json.dumps({"schema_version": 1}), "missing run_id"),
])
def test_bad_run_folder_names_the_file_and_fix(tmp_path, content, needle):
    folder = tmp_path / "r"
    folder.mkdir()
    if content is not None:
        (folder / "results.json").write_text(content)
    with pytest.raises(InvalidConfigError, match=needle) as info:
        render_report([folder], tmp_path / "out")
    assert str(folder / "results.json") in str(info.value)
    assert "re-run" in str(info.value) or "sdxl-bench" in str(info.value)


def test_out_must_not_be_the_run_folder_and_runs_are_needed(run, tmp_path):
    folder, _ = run
    with pytest.raises(InvalidConfigError, match="separate folder"):
        render_report([folder], folder)
    with pytest.raises(InvalidConfigError, match="no run folder"):
        render_report([], tmp_path / "out")


def test_index_lists_every_run(tmp_path):
    root = tmp_path / "reports"
    make_run(root / "old", run_id="old", created="2026-01-01T00:00:00Z")
    make_run(root / "new<x>", run_id="new<x>", created="2026-02-01T00:00:00Z", commit="beef")
    (root / "no-results").mkdir()
    (root / "broken").mkdir()
    (root / "broken/results.json").write_text("[]")
    render_report([root / "old"], default_report_dir(root / "old"))
    page = parse(render_index(root))
    rows = list(next(page.by_id("run-index").iter("tbody")).iter("tr"))
    assert [r.children[0].text().split()[0] for r in rows] == ["new<x>", "old", "broken"]
    assert "no report yet" in rows[0].text() and "beef" in rows[0].text()
    assert [c.text() for c in rows[1].children[4:7]] == ["17", "1", "1"]  # ok, errors, flagged
    link = next(rows[1].iter("a")).attrs["href"]
    assert link == "old/report/index.html" and (root / link).is_file()
    assert next(rows[0].iter("a")).attrs["href"] == "new%3Cx%3E/results.json"
    assert "error" in rows[2].classes() and "not a JSON object" in rows[2].text()


def _args(argv):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(argv)


def test_report_command(run, tmp_path, capsys):
    folder, _ = run
    assert main(_args([str(folder)])) == 0
    assert (folder / "report/index.html").is_file() and (folder.parent / "index.html").is_file()
    with pytest.raises(InvalidConfigError, match="--out"):
        main(_args([str(folder), str(folder)]))
    other = tmp_path / "reports/r2"
    make_run(other, run_id="r2")
    (folder.parent / "index.html").unlink()
    assert main(_args([str(folder), str(other), "--out", str(tmp_path / "joint")])) == 0
    assert (tmp_path / "joint/index.html").is_file() and not (folder.parent / "index.html").exists()
    assert "wrote" in capsys.readouterr().out


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium; .ci/run does)")
def test_report_in_headless_chromium(run, tmp_path):
    folder, doc = run
    path = render_report([folder], tmp_path / "out")
    expected = parse(path)
    n_images, n_tables = len(list(expected.iter("img"))), len(list(expected.iter("table")))
    title = next(expected.iter("title")).text()
    base = [CHROMIUM, "--headless=new", "--disable-gpu", "--no-sandbox", "--no-first-run",
            "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,2000"]
    env = {**os.environ, "HOME": str(tmp_path)}
    dump = subprocess.run([*base, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=90, env=env)
    assert dump.returncode == 0, dump.stderr[-2000:]
    dom = Tree(dump.stdout).root
    body = next(dom.iter("body")).attrs
    assert body.get("data-images") == str(n_images) and body.get("data-images-loaded") == str(n_images)
    assert body.get("data-tables") == str(n_tables) and body.get("data-tables-shown") == str(n_tables)
    assert next(dom.iter("title")).text() == title != "x"  # the prompt's script did not run
    assert "data-dialogs" not in next(dom.iter("html")).attrs  # no alert() from the onerror prompt
    assert next(dom.iter("p")).attrs.get("id") == "broken" and "hidden" in next(dom.iter("p")).attrs

    shot = tmp_path / "report.png"
    res = subprocess.run([*base, f"--screenshot={shot}", path.as_uri()], capture_output=True, text=True, timeout=90,
                         env=env)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1400, 2000)
        extrema = im.convert("L").getextrema()
    assert extrema[1] - extrema[0] > 100 and shot.stat().st_size > 20_000


ORACLE = MetricInfo("oracle_accuracy", "Oracle accuracy", True, "per_image", unit="fraction", label="toy world")


def add_meta_evaluation(folder, doc):
    """Turn a make_run folder into a toy-world run: oracle values per case and group, and a meta-evaluation
    computed by sdxl_core.meta_eval from synthetic per-image data (a metric display name with markup in it)."""
    from sdxl_core.meta_eval import DEFINITIONS, image_agreement, order_agreement

    groups = list(doc["sets"])
    keys = [(pi, s) for pi in range(len(PROMPTS)) for s in SEEDS]
    oracle = {g: {k: float((gi + k[0] + k[1]) % (gi + 2) != 0) for k in keys} for gi, g in enumerate(groups)}
    clip = {g: {k: v + 0.3 * ((gi + k[0]) % 2) for k, v in oracle[g].items()} for gi, g in enumerate(groups)}
    info = {"display_name": SCRIPT + " CLIP", "higher_is_better": True}
    fid = {g: 10.0 - 5 * sum(oracle[g].values()) / len(keys) for g in groups}
    per_image = image_agreement("clip_score", info, oracle, clip, n_resamples=1000, seed=0)
    ordering = order_agreement("fid", FID.as_dict(), oracle, fid, n_resamples=1000, seed=0)
    doc["metrics"]["oracle_accuracy"] = ORACLE.as_dict()
    for g in groups:
        acc = sum(oracle[g].values()) / len(keys)
        doc["sets"][g]["oracle_accuracy"] = {"value": acc, "n": len(keys), "n_correct": int(acc * len(keys)),
                                            "per_check": {"background": 1.0, "colour": acc, "count": None}}
    doc["meta_evaluation"] = {"oracle": "oracle_accuracy", "confidence": 0.95, "n_resamples": 1000, "seed": 0,
                              "definitions": DEFINITIONS, "per_image": [per_image.as_dict()],
                              "ordering": [ordering.as_dict()],
                              "skipped": [{"metric": "kid", "display_name": "KID <x>", "test": "order",
                                           "reason": "measured as a shift from baseline"}]}
    check_document(doc)
    (folder / "results.json").write_text(json.dumps(doc, allow_nan=False), encoding="utf-8")
    return doc


def test_trust_section_renders_the_meta_evaluation(run, tmp_path):
    folder, doc = run
    doc = add_meta_evaluation(folder, doc)
    path = render_report([folder], tmp_path / "out")
    html = path.read_text(encoding="utf-8")
    root = parse(path)
    assert root.by_id("trust").text() == "Which metric to trust (toy world)"
    me = doc["meta_evaluation"]
    (img_row,) = list(next(root.by_id("trust-images").iter("tbody")).iter("tr"))
    texts = [c.text() for c in img_row.children]
    r = me["per_image"][0]
    assert texts[0].startswith(SCRIPT + " CLIP") and texts[1] == f"{r['auc']:.4g}"
    assert texts[2] == f"[{r['auc_ci_low']:.4g}, {r['auc_ci_high']:.4g}]" and texts[5].startswith(str(r["n"]))
    assert texts[6] == r["verdict"] and texts[7] == r["summary"]
    assert {"agrees with the oracle": "agrees", "disagrees with the oracle": "disagrees"}.get(
        r["verdict"], "nsd") in img_row.children[6].classes()
    (order_row,) = list(next(root.by_id("trust-order").iter("tbody")).iter("tr"))
    o = me["ordering"][0]
    assert order_row.children[0].text().startswith("FID") and order_row.children[6].text() == o["verdict"]
    assert group_name(*WEIRD) in order_row.children[2].text()
    assert order_row.children[3].text() == f"{o['kendall_tau']:.4g}"
    checks = root.by_id("oracle-checks")
    assert [th.text() for th in checks.iter("th")] == ["group", "accuracy", "background", "colour", "count", "n"]
    rows = list(next(checks.iter("tbody")).iter("tr"))
    assert [row.children[0].text() for row in rows] == list(doc["sets"])
    assert rows[0].children[4].text() == "\u2014"  # a check without a value
    assert "KID <x> (order): not evaluated" in root.by_id("trust").parent.text()
    assert "Kendall tau-b" in root.by_id("trust-definitions").text()
    # escaping and CSP conventions hold in the new section
    assert SCRIPT not in html and "KID <x>" not in html and len(list(root.iter("script"))) == 1
    assert not [n for n in root.iter() if any(a.startswith("on") for a in n.attrs)]


def test_trust_section_is_omitted_without_an_oracle_and_bad_sections_are_refused(run, tmp_path):
    folder, doc = run
    root = parse(render_report([folder], tmp_path / "out"))
    assert not [n for n in root.iter() if n.attrs.get("id") in ("trust", "trust-images", "oracle-checks")]
    with pytest.raises(InvalidConfigError, match="meta_evaluation must be an object"):
        check_document({**doc, "meta_evaluation": {"per_image": 3}})
