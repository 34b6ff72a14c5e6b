"""sdxl_core.compile_cache: a compile saved by one process comes from the cache in the next."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdxl_core import compile_cache
from sdxl_core.compile_cache import MANIFEST

# Compiles a small conv + linear module (inductor, CPU), then does what argv[1] says; prints a JSON line with the
# FX graph cache's hits and misses and the module's output.
SCRIPT = r"""
import json, sys
from pathlib import Path
import torch
from torch._dynamo.utils import counters
from sdxl_core import compile_cache

action, folder = sys.argv[1], Path(sys.argv[2])
loaded = compile_cache.load(folder) if action == "load" else None
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Flatten(),
                            torch.nn.Linear(8 * 8 * 8, 4)).eval()
with torch.no_grad():
    out = torch.compile(model, fullgraph=True)(torch.ones(1, 3, 8, 8))
saved = None
if action == "save":
    saved = compile_cache.save(folder, cases=["host", "host@b4"])
    tiny = compile_cache.save(folder / "tiny", part_bytes=64, max_parts=2)
    assert not tiny["saved"] and "more than 2" in tiny["reason"], tiny
    big = compile_cache.save(folder / "big", max_raw_bytes=1000)
    assert not big["saved"] and "more than 1000 to compress" in big["reason"], big
print(json.dumps({"hit": counters["inductor"]["fxgraph_cache_hit"], "miss": counters["inductor"]["fxgraph_cache_miss"],
                  "out": out.tolist(), "loaded": loaded, "saved": saved}))
"""


def _run(action: str, folder: Path, inductor_dir: Path) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(inductor_dir), TORCHINDUCTOR_FX_GRAPH_CACHE="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, action, str(folder)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def saved_cache(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cache")
    first = _run("save", folder, tmp_path_factory.mktemp("inductor"))
    return folder, first


def test_a_saved_compile_comes_from_the_cache_in_a_fresh_process(saved_cache, tmp_path):
    folder, first = saved_cache
    assert first["miss"] >= 1 and first["hit"] == 0
    assert first["saved"]["saved"] and (folder / MANIFEST).is_file()
    assert all((folder / name).stat().st_size <= compile_cache.PART_BYTES for name in first["saved"]["parts"])
    # a fresh process with an empty inductor cache folder compiles nothing: everything comes from the load (the
    # first process, which started the same way, had only misses)
    again = _run("load", folder, tmp_path / "fresh")
    assert again["loaded"]["loaded"] and again["hit"] >= 1 and again["miss"] == 0
    assert again["out"] == first["out"]
    assert first["saved"]["cases"] == again["loaded"]["cases"] == ["host", "host@b4"]


def test_a_cache_from_other_versions_is_refused(saved_cache, tmp_path):
    folder, _ = saved_cache
    manifest = json.loads((folder / MANIFEST).read_text())
    other = tmp_path / "other"
    other.mkdir()
    for name in manifest["parts"]:
        (other / name).write_bytes((folder / name).read_bytes())
    (other / MANIFEST).write_text(json.dumps(dict(manifest, torch="0.0.1")))
    result = compile_cache.load(other)
    assert not result["loaded"] and "torch '0.0.1' here" in result["reason"]


def test_damaged_or_missing_parts_are_refused(saved_cache, tmp_path):
    folder, _ = saved_cache
    manifest = json.loads((folder / MANIFEST).read_text())
    here = compile_cache._environment()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / MANIFEST).write_text(json.dumps(dict(manifest, **here)))
    assert "parts missing" in compile_cache.load(broken)["reason"]
    for name in manifest["parts"]:
        (broken / name).write_bytes(b"x" + (folder / name).read_bytes()[1:])
    assert "SHA-256" in compile_cache.load(broken)["reason"]
    assert "no compile-cache.json" in compile_cache.load(tmp_path)["reason"]
    (broken / MANIFEST).write_text("{not json")
    assert "is not a manifest" in compile_cache.load(broken)["reason"]
