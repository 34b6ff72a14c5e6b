"""Images of every case (variant x LoRA version x prompt x seed) into the session's run folder.

    pytest bench/test_quality.py --sdxl-base B --sdxl-refiner R --sdxl-lora wrong@v1=PATH [--sdxl-reference DIR]

Finished images are skipped when the same ``--sdxl-run-id`` runs again. At the end of the session the images
are scored (sanity, CLIP score, FID/KID/CMMD against the reference or the baseline, paired comparisons with
intervals and verdicts), and ``results.json`` and the HTML report are written; their paths are printed last.
A case that fails is an ``error`` row in the results and a failed test.
"""

from __future__ import annotations

import pytest


@pytest.mark.bench
def test_image(sdxl_case, sdxl_run, sdxl_runner):
    row = sdxl_run.generate(sdxl_case, sdxl_runner.generate)
    assert row["status"] == "ok"
