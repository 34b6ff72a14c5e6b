"""Provenance a result carries: library versions and the GPU (shared by runs, training, benchmarks)."""

from __future__ import annotations

from typing import Any

LIBRARIES = ("torch", "diffusers", "transformers", "compel", "peft", "accelerate", "open-clip-torch", "torchmetrics",
             "sdxl-bench")


def library_versions(packages: tuple[str, ...] = LIBRARIES) -> dict[str, str | None]:
    """Installed version of each package (None when it is not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    libs: dict[str, str | None] = {}
    for pkg in packages:
        try:
            libs[pkg] = version(pkg)
        except PackageNotFoundError:
            libs[pkg] = None
    return libs


def gpu_info(device: Any = None) -> dict[str, Any]:
    """A CUDA device's name, memory, multiprocessors, CUDA/cuDNN and driver versions (``gpu`` None without one).

    ``device`` is a ``torch.device`` or index (default: the current CUDA device); a CPU device gives ``gpu``
    None. The driver version comes from NVML (``pynvml``), else ``nvidia-smi``, else says why it is missing."""
    import torch

    if not torch.cuda.is_available() or getattr(device, "type", "cuda") != "cuda":
        return {"gpu": None}
    props = torch.cuda.get_device_properties(device)
    info: dict[str, Any] = {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                            "multiprocessors": props.multi_processor_count,
                            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    info["driver"] = _driver_version()
    return info


def _driver_version() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        return str(pynvml.nvmlSystemGetDriverVersion())
    except Exception as exc:  # optional: fall back to nvidia-smi, and say why NVML failed
        nvml_error = type(exc).__name__
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown (pynvml: {nvml_error}; nvidia-smi: {type(exc).__name__})"
    if out.returncode == 0 and out.stdout.strip():
        return out.stdout.strip().splitlines()[0]
    return f"unknown (pynvml: {nvml_error}; nvidia-smi exit {out.returncode})"
