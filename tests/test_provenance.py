"""sdxl_core.provenance: library versions and GPU info, with the driver version's fallbacks."""

from __future__ import annotations

import sys

import torch

from sdxl_core.provenance import _driver_version, gpu_info, library_versions


def test_library_versions():
    libs = library_versions(("torch", "no-such-package-sdxl-bench"))
    assert libs["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert libs["no-such-package-sdxl-bench"] is None


def test_a_cpu_device_has_no_gpu():
    assert gpu_info(torch.device("cpu")) == {"gpu": None}


def test_driver_version_falls_back_to_nvidia_smi_and_says_why_it_is_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # NVML bindings not installed: import fails
    monkeypatch.setenv("PATH", str(tmp_path))
    assert _driver_version() == "unknown (pynvml: ModuleNotFoundError; nvidia-smi: FileNotFoundError)"

    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\nexit 9\n")
    smi.chmod(0o755)
    assert _driver_version() == "unknown (pynvml: ModuleNotFoundError; nvidia-smi exit 9)"

    smi.write_text("#!/bin/sh\necho 580.65.06\necho 580.65.06\n")  # one line per GPU
    assert _driver_version() == "580.65.06"
