"""Loading SDXL base + refiner exactly as the reference code does, from hub ids or local folders."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdxl_core.errors import InvalidConfigError, ModelNotFoundError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Components the refiner must bring itself; text_encoder_2 and vae come from the base.
_REFINER_OWN = ("unet", "scheduler", "tokenizer_2")
_BASE_OWN = ("unet", "scheduler", "tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "vae")


@dataclass
class Pipelines:
    """A loaded base (and optional refiner) sharing ``text_encoder_2`` and ``vae``, plus where they came from."""

    base: Any  # diffusers.StableDiffusionXLPipeline
    refiner: Any | None  # diffusers.StableDiffusionXLImg2ImgPipeline
    base_source: str
    refiner_source: str | None
    vae_source: str | None
    # The refiner takes its text_encoder_2 embeddings from the base's compel output instead of encoding
    # the prompt again (they are the same computation on the same shared encoder).
    share_text_embeddings: bool = False
    # The final image goes from the VAE's float output to 8 bits on the device (diffusers' arithmetic), and only
    # the 8-bit image crosses to the host, instead of diffusers' float conversion on the CPU.
    images_on_device: bool = False
    # compel parses plain words and weighted groups with sdxl_core.prompt_parse's scan (the same Conjunction),
    # instead of its pyparsing grammar.
    fast_prompt_parse: bool = False
    # compel computes embeddings with its host numbers kept on the host, without host syncs
    # (sdxl_core.compel_uploads: the same embeddings).
    sync_free_compel: bool = False
    # The denoising stages start without host syncs (sdxl_core.stage_starts): the pipelines and schedulers are
    # switched, and generate() cuts the base's schedule on the CPU and tells the cross K/V caches the zero rows.
    sync_free_stage_starts: bool = False
    # The refiner's embeddings of the empty negative prompt, made once (sdxl_core.host_work.EmptyNegativeCache);
    # None: diffusers encodes "" for every image.
    empty_negative: Any = None
    # compel's view of the base's text encoders replayed from CUDA graphs (sdxl_core.text_graphs), by component
    # name; empty: compel calls the modules themselves.
    text_encoder_graphs: dict[str, Any] = field(default_factory=dict)
    # The guard filter the level compiled with (sdxl_core.optimize.BuiltinModuleGuardFilter), for its counts; or None.
    guard_filter: Any = None
    # Process-wide kernel choices the last optimisation level made (SDPA backend order, cuDNN autotuning).
    kernel_backends: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        """Where the base runs: its pinned execution device when a level pinned it (``sdxl_core.host_work``; no
        walk over the UNet's modules, which diffusers' ``unet.device`` does at every call), else the base UNet's."""
        from sdxl_core.host_work import is_pinned

        if is_pinned(self.base):
            return self.base._execution_device
        return self.base.unet.device

    def text_encoder_for_compel(self, pipe: Any, name: str) -> Any:
        """``pipe``'s text encoder ``name`` as compel should call it: its CUDA-graph replayer when a level made one
        for that module (the refiner's ``text_encoder_2`` is the base's), else the module."""
        encoder = getattr(pipe, name)
        graphed = self.text_encoder_graphs.get(name)
        return graphed if graphed is not None and graphed.encoder is encoder else encoder

    @property
    def dtype(self) -> torch.dtype:
        return self.base.unet.dtype


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """``None`` means fp16 on CUDA (as the reference code) and fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise InvalidConfigError(f"unknown dtype {dtype!r}; use one of {sorted(set(DTYPES))}") from None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_source(name: str, role: str, required: tuple[str, ...]) -> str:
    """Check a model reference before loading anything; return what ``from_pretrained`` should get.

    A local folder must hold ``model_index.json`` and the component folders in ``required``. A hub id is
    passed on; offline, it must already be in the local cache or it fails at once with the fix.
    """
    if not name or not str(name).strip():
        raise ModelNotFoundError(f"--{role} is empty; pass a local diffusers folder, a hub id, or a preset name")
    path = Path(name).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise ModelNotFoundError(
                f"{role} folder {path} has no model_index.json, so it is not a diffusers pipeline folder; "
                f"point --{role} at the folder written by save_pretrained (it holds model_index.json and unet/)"
            )
        missing = [c for c in required if not (path / c).is_dir()]
        if missing:
            raise ModelNotFoundError(
                f"{role} folder {path} is missing {', '.join(missing)}; "
                f"copy the complete pipeline folder (save_pretrained writes every component)"
            )
        return str(path)
    if path.exists():
        raise ModelNotFoundError(f"{role} {path} is a file, not a diffusers pipeline folder")
    if not _HUB_ID.match(str(name)) or str(name).startswith((".", "/", "~")):
        raise ModelNotFoundError(
            f"{role} {name!r} is neither a folder nor a hub id (owner/name); check the path, or use a preset "
            f"(tiny, toy, sdxl-random)"
        )
    if _offline() and not _in_hub_cache(str(name)):
        raise ModelNotFoundError(
            f"{role} {name!r} is not available locally and HF_HUB_OFFLINE is set, so it cannot be downloaded; "
            f"download it once where there is network (huggingface-cli download {name}) or point --{role} at a "
            f"local diffusers folder"
        )
    return str(name)


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        return any(repo.repo_id == repo_id for repo in scan_cache_dir().repos)
    except CacheNotFound:  # no cache folder at all
        return False


def load_pipelines(
    base: str,
    refiner: str | None = None,
    *,
    vae: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    variant: str | None = None,
) -> Pipelines:
    """Load SDXL base (+ refiner) the way the reference notebooks do.

    ``base``/``refiner`` are local diffusers folders or hub ids, or the presets ``tiny`` / ``toy`` / ``sdxl-random``.
    ``vae`` optionally overrides the VAE (e.g. ``madebyollin/sdxl-vae-fp16-fix``); the refiner shares the base's
    ``text_encoder_2`` and ``vae``. Every reference is checked before any weights are read.
    """
    from diffusers import AutoencoderKL, DiffusionPipeline

    from sdxl_core import presets

    device = torch.device(device or default_device())
    torch_dtype = resolve_dtype(dtype, device)

    if base == presets.SDXL_RANDOM:
        if refiner not in (None, presets.SDXL_RANDOM) or vae is not None:
            raise InvalidConfigError("sdxl-random builds its own refiner and VAE; drop --refiner/--vae or use folders")
        b, r = presets.build_sdxl_random(device=device, dtype=torch_dtype, with_refiner=refiner is not None)
        return _quiet(Pipelines(b, r, base, refiner, None))
    if refiner in presets.PRESETS and refiner != base:
        raise InvalidConfigError(f"--refiner {refiner} only pairs with --base {refiner}")
    if base in presets.EMBEDDED:
        preset = base
        preset_base, preset_refiner = presets.ensure_tiny() if preset == presets.TINY else presets.toy_folders()
        base = str(preset_base)
        refiner = str(preset_refiner) if refiner == preset else refiner

    base_src = resolve_source(base, "base", _BASE_OWN)
    refiner_src = resolve_source(refiner, "refiner", _REFINER_OWN) if refiner is not None else None
    vae_src = None
    if vae is not None:
        vae_src = str(Path(vae).expanduser()) if Path(vae).expanduser().is_dir() else vae
        if not Path(vae_src).is_dir():
            resolve_source_hub_only(vae_src, "vae")

    kwargs: dict[str, Any] = {"dtype": torch_dtype, "use_safetensors": True}
    if variant:
        kwargs["variant"] = variant
    if vae_src is not None:
        kwargs["vae"] = AutoencoderKL.from_pretrained(vae_src, dtype=torch_dtype, use_safetensors=True)
    base_pipe = DiffusionPipeline.from_pretrained(base_src, **kwargs).to(device)
    refiner_pipe = None
    if refiner_src is not None:
        refiner_kwargs = dict(kwargs, text_encoder_2=base_pipe.text_encoder_2, vae=base_pipe.vae)
        refiner_pipe = DiffusionPipeline.from_pretrained(refiner_src, **refiner_kwargs).to(device)
    return _quiet(Pipelines(base_pipe, refiner_pipe, base_src, refiner_src, vae_src))


def _quiet(pipes: Pipelines) -> Pipelines:
    """No per-step progress bars: generation is timed and logged by the harness."""
    for pipe in (pipes.base, pipes.refiner):
        if pipe is not None:
            pipe.set_progress_bar_config(disable=True)
    return pipes


def resolve_source_hub_only(name: str, role: str) -> None:
    """Check a single-model hub id (e.g. a VAE) the same way as pipeline ids."""
    if not _HUB_ID.match(name):
        raise ModelNotFoundError(f"{role} {name!r} is neither a folder nor a hub id (owner/name)")
    if _offline() and not _in_hub_cache(name):
        raise ModelNotFoundError(
            f"{role} {name!r} is not available locally and HF_HUB_OFFLINE is set; download it where there is "
            f"network or point --{role} at a local folder holding config.json and the safetensors weights"
        )
