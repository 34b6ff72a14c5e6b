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


def gpu_info() -> dict[str, Any]:
    """The first CUDA device's name, memory, CUDA/cuDNN and driver versions (``gpu`` None without one)."""
    import torch

    if not torch.cuda.is_available():
        return {"gpu": None}
    props = torch.cuda.get_device_properties(0)
    info: dict[str, Any] = {"gpu": props.name, "gpu_memory_gib": round(props.total_memory / 2**30, 1),
                            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    try:
        import pynvml

        pynvml.nvmlInit()
        info["driver"] = pynvml.nvmlSystemGetDriverVersion()
    except Exception as exc:  # optional: the driver version only; say why it is missing
        info["driver"] = f"unknown ({type(exc).__name__})"
    return info
