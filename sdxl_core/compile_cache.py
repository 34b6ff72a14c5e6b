"""torch.compile's portable cache, saved after a run and loaded before the next one.

Compiling SDXL's two UNets, the VAE decoder and the text encoders takes minutes (328 s on an H100 in run 4, most of
an 8-minute device call). ``torch.compiler.save_cache_artifacts`` serialises what inductor made in this process
(compiled graphs, kernels, autotuning results); ``load_cache_artifacts`` in a later process, on the same GPU model
with the same torch and triton, lets those compiles come from the cache. Dynamo still traces and CUDA graphs are
still recorded, so a first call stays slower than the others.

:func:`save` writes the artifacts compressed, split into parts of at most ``part_bytes`` (a device call returns
files of at most 16 MiB), with a manifest (torch and triton versions, GPU, sizes, SHA-256); :func:`load` checks
the manifest against this process and refuses a cache from other versions rather than load it. Results record
which cache was loaded, since it changes the first call's time.
"""

from __future__ import annotations

import hashlib
import json
import lzma
from pathlib import Path
from typing import Any

import torch

from sdxl_core.atomicio import write_bytes_atomic, write_json_atomic

MANIFEST = "compile-cache.json"
PART_BYTES = 12 * 2**20
# 24 MiB in all: what a device call returns is at most 8 files of 16 MiB, and what it carries in is at most 64 MiB,
# of which the repository holds ~27 and the wheels ~9.
MAX_PARTS = 2
MAX_RAW_BYTES = 1 << 30  # above this, compressing would take a timed device call's last minute: not saved
FORMAT = 1


def _environment() -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"torch": torch.__version__, "triton": triton_version, "gpu": gpu}


def save(dest: Path, part_bytes: int = PART_BYTES, max_parts: int = MAX_PARTS,
         max_raw_bytes: int = MAX_RAW_BYTES, cases: list[str] | None = None) -> dict[str, Any]:
    """Write this process's compile artifacts under ``dest``; returns what was written (or why nothing was).
    ``cases`` names the cases compiled in this process, so that a later run can plan their first calls as cached."""
    result = torch.compiler.save_cache_artifacts()
    if result is None:
        return {"saved": False, "reason": "no compile artifacts in this process"}
    raw, _info = result
    if len(raw) > max_raw_bytes:
        return {"saved": False, "reason": f"{len(raw)} bytes of artifacts, more than {max_raw_bytes} to compress"}
    packed = lzma.compress(raw, preset=1)
    parts = [packed[i:i + part_bytes] for i in range(0, len(packed), part_bytes)]
    if len(parts) > max_parts:
        return {"saved": False, "reason": f"{len(packed)} bytes compressed need {len(parts)} parts of {part_bytes}, "
                                          f"more than {max_parts}"}
    dest.mkdir(parents=True, exist_ok=True)
    names = [f"compile-cache.{i:03d}.xz" for i in range(len(parts))]
    for name, part in zip(names, parts):
        write_bytes_atomic(dest / name, part)
    manifest = {"format": FORMAT, **_environment(), "raw_bytes": len(raw), "parts": names,
                "sha256": hashlib.sha256(packed).hexdigest(), "cases": list(cases or [])}
    write_json_atomic(dest / MANIFEST, manifest)  # last: a manifest names only parts that are complete
    return {"saved": True, "dir": str(dest), **manifest}


def load(src: Path) -> dict[str, Any]:
    """Load the artifacts that :func:`save` wrote under ``src`` into this process's compile caches, if they were
    made with this torch, triton and GPU; returns what happened, for the results."""
    path = src / MANIFEST
    if not path.is_file():
        return {"loaded": False, "reason": f"no {MANIFEST} in {src}"}
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        return {"loaded": False, "reason": f"{path} is not a manifest: {exc}"}
    here = _environment()
    if manifest.get("format") != FORMAT:
        return {"loaded": False, "reason": f"cache format {manifest.get('format')!r}, this sdxl-bench reads {FORMAT}"}
    differ = {k: (manifest.get(k), v) for k, v in here.items() if manifest.get(k) != v}
    if differ:
        return {"loaded": False, "reason": "made with other versions or another GPU: " +
                ", ".join(f"{k} {a!r} here {b!r}" for k, (a, b) in differ.items())}
    missing = [name for name in manifest["parts"] if not (src / name).is_file()]
    if missing:
        return {"loaded": False, "reason": f"parts missing from {src}: {', '.join(missing)}"}
    packed = b"".join((src / name).read_bytes() for name in manifest["parts"])
    if hashlib.sha256(packed).hexdigest() != manifest["sha256"]:
        return {"loaded": False, "reason": f"the parts in {src} do not match the manifest's SHA-256"}
    try:
        torch.compiler.load_cache_artifacts(lzma.decompress(packed))
    except Exception as exc:  # a cache that torch cannot read: the run compiles, and the results say why
        return {"loaded": False, "reason": f"torch could not load {src}: {type(exc).__name__}: {exc}"}
    return {"loaded": True, "dir": str(src), **{k: manifest[k] for k in ("torch", "triton", "gpu", "raw_bytes")},
            "cases": list(manifest.get("cases", []))}
