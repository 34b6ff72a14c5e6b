"""Static checks over sdxl_core: nothing runs code from a model repo or a pickle."""

from __future__ import annotations

import ast
from pathlib import Path

SOURCES = sorted((Path(__file__).resolve().parents[1] / "sdxl_core").rglob("*.py"))


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            yield name, {kw.arg: kw.value for kw in node.keywords}, node


def test_sources_were_found():
    assert len(SOURCES) >= 30


def test_no_remote_code_and_no_unsafe_unpickling():
    checked = {"torch.load": 0, "from_pretrained": 0}
    for path in SOURCES:
        tree = ast.parse(path.read_text(), filename=str(path))
        for name, kwargs, node in _calls(tree):
            where = f"{path.name}:{node.lineno}"
            for banned in ("trust_remote_code", "custom_pipeline"):
                assert banned not in kwargs, f"{where} passes {banned}"
            if name == "load" and isinstance(node.func, ast.Attribute) and getattr(node.func.value, "id", "") == "torch":
                checked["torch.load"] += 1
                value = kwargs.get("weights_only")
                assert isinstance(value, ast.Constant) and value.value is True, f"{where}: torch.load without weights_only=True"
            if name == "from_pretrained":
                checked["from_pretrained"] += 1
            assert name not in ("loads", "load") or getattr(getattr(node.func, "value", None), "id", "") != "pickle", \
                f"{where} unpickles"
    assert checked["torch.load"] >= 2 and checked["from_pretrained"] >= 1, checked
