"""Built-in model presets: SDXL-architecture pipelines built from configs, with no download.

* ``tiny``: a small SDXL-architecture base + refiner with deterministic seeded weights and the real CLIP
  tokenizer. It is written once to a cache folder with ``save_pretrained`` and then loaded back through
  :func:`sdxl_core.loading.load_pipelines`, the same path as real checkpoints.
* ``toy``: a small SDXL-architecture base + refiner, VAE and CLIP *trained* by the project on the procedural
  toy world (:mod:`sdxl_core.toy`; ``make train-toy``), committed as diffusers folders in
  ``sdxl_core/toy/weights`` and loaded through :func:`sdxl_core.loading.load_pipelines` like any checkpoint.
  Its images can be judged exactly by the toy oracle, so its scores mean something offline.
* ``sdxl-random``: the full SDXL 1.0 base and refiner architectures (the public configs in
  ``sdxl_core/configs/sdxl-1.0``) with random weights, built directly on the target device and dtype, for
  timing and FLOP counting without checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdxl_core.toy import train_config as toy_train_config

TINY = "tiny"
TOY = "toy"
SDXL_RANDOM = "sdxl-random"
PRESETS = (TINY, TOY, SDXL_RANDOM)
#: Presets that bring their own refiner and run offline with offline metrics.
EMBEDDED = (TINY, TOY)
TINY_SEED = 0
TINY_DEFAULT_SIZE = 128
TINY_DEFAULT_STEPS = 20
TOY_DEFAULT_SIZE, TOY_DEFAULT_STEPS, TOY_DEFAULT_GUIDANCE = toy_train_config.IMAGE_SIZE, toy_train_config.STEPS, \
    toy_train_config.GUIDANCE
DEFAULT_GUIDANCE = 13.0
# Bumped whenever the tiny configs or the way they are built change, so stale caches are not reused.
TINY_FORMAT_VERSION = 1


@dataclass(frozen=True)
class PresetDefaults:
    """What a run on an embedded preset uses unless told otherwise."""

    size: int
    steps: int
    guidance_scale: float
    clip_model: str  # MODEL:PRETRAINED as --sdxl-clip-model takes it ("smoke": a random CLIP)
    fid_features: str


def toy_weights_dir() -> Path:
    """The toy weights: ``base/``, ``refiner/`` (diffusers folders), ``clip/`` and ``training.json``; the committed
    ones in ``sdxl_core/toy/weights``, or ``$SDXL_BENCH_TOY_WEIGHTS`` (e.g. what ``train-toy --out DIR`` wrote)."""
    override = os.environ.get("SDXL_BENCH_TOY_WEIGHTS", "").strip()
    return Path(override).expanduser() if override else toy_train_config.WEIGHTS_DIR


def toy_fingerprint() -> str:
    """First 16 hex digits of the reference-set content hash over the toy base's and refiner's weight files, in
    path order: what tells a dataset or LoRA made with one training of the toy world from one made with another."""
    from sdxl_core.metrics.reference import content_hash

    base, refiner = toy_folders()  # the clear "weights are missing" error first
    return content_hash(sorted(base.rglob("*.safetensors")) + sorted(refiner.rglob("*.safetensors")))[:16]


def preset_defaults(base: str | None) -> PresetDefaults | None:
    """Defaults of an embedded preset (``tiny``, ``toy``); None for real checkpoints and ``sdxl-random``."""
    if base == TINY:
        return PresetDefaults(size=TINY_DEFAULT_SIZE, steps=TINY_DEFAULT_STEPS, guidance_scale=DEFAULT_GUIDANCE,
                              clip_model="ViT-B-32:smoke",
                              fid_features="effnet-lite0")
    if base == TOY:
        return PresetDefaults(size=TOY_DEFAULT_SIZE, steps=TOY_DEFAULT_STEPS, guidance_scale=TOY_DEFAULT_GUIDANCE,
                              clip_model=f"toy-clip:{toy_weights_dir() / 'clip' / 'toy-clip.safetensors'}",
                              fid_features="effnet-lite0")
    return None


def default_size(base: str | None) -> int:
    """Image side when none is given: the preset's own, else SDXL's 1024."""
    d = preset_defaults(base)
    return d.size if d else 1024


def default_guidance(base: str | None) -> float:
    """Guidance scale when none is given: 13 as in the reference experiment; 5 for ``toy``, whose oracle
    accuracy is best there (train-toy's evaluation)."""
    d = preset_defaults(base)
    return d.guidance_scale if d else DEFAULT_GUIDANCE


def default_steps(base: str | None) -> int:
    d = preset_defaults(base)
    return d.steps if d else 50


def load_config(group: str, name: str) -> dict[str, Any]:
    """A JSON config shipped in ``sdxl_core/configs/<group>/<name>.json``."""
    text = resources.files("sdxl_core").joinpath("configs", group, f"{name}.json").read_text()
    return json.loads(text)


@dataclass(frozen=True)
class ArchitectureConfigs:
    """The component configs of an SDXL-architecture base + refiner."""

    group: str  # folder under sdxl_core/configs

    def unet_base(self) -> dict[str, Any]:
        return load_config(self.group, "unet_base")

    def unet_refiner(self) -> dict[str, Any]:
        return load_config(self.group, "unet_refiner")

    def vae(self) -> dict[str, Any]:
        return load_config(self.group, "vae")

    def text_encoder(self) -> dict[str, Any]:
        return load_config(self.group, "text_encoder_clip_l")

    def text_encoder_2(self) -> dict[str, Any]:
        return load_config(self.group, "text_encoder_2_bigg")

    def scheduler(self) -> dict[str, Any]:
        return load_config("sdxl-1.0", "scheduler")


SDXL_1_0 = ArchitectureConfigs("sdxl-1.0")
TINY_CONFIGS = ArchitectureConfigs("tiny")


@dataclass(frozen=True)
class SkeletonConfigs(ArchitectureConfigs):
    """SDXL 1.0's structure, every block, layer and module of every component, with every width divided by
    ``divisor`` (and the head counts kept): the same Python and module-walk work per call as the full models,
    at about 1/64 of the parameters, so the host's work around the models can be measured on a CPU
    (``bench/host_overhead.py``). Random weights only; the images mean nothing."""

    group: str = "sdxl-1.0"
    divisor: int = 8

    def _w(self, width: int) -> int:
        return width // self.divisor

    def text_encoder(self) -> dict[str, Any]:
        c = SDXL_1_0.text_encoder()
        return c | {k: self._w(c[k]) for k in ("hidden_size", "intermediate_size", "projection_dim")}

    def text_encoder_2(self) -> dict[str, Any]:
        c = SDXL_1_0.text_encoder_2()
        return c | {k: self._w(c[k]) for k in ("hidden_size", "intermediate_size", "projection_dim")}

    def _unet(self, c: dict[str, Any], cross: int, pooled: int, time_ids: int) -> dict[str, Any]:
        time_dim = self._w(c["addition_time_embed_dim"])
        return c | {"block_out_channels": [self._w(w) for w in c["block_out_channels"]],
                    "norm_num_groups": self._w(c["norm_num_groups"]), "cross_attention_dim": cross,
                    "addition_time_embed_dim": time_dim,
                    "projection_class_embeddings_input_dim": time_ids * time_dim + pooled}

    def unet_base(self) -> dict[str, Any]:  # text: CLIP-L and bigG states side by side; 6 time ids
        te, te2 = self.text_encoder(), self.text_encoder_2()
        return self._unet(SDXL_1_0.unet_base(), te["hidden_size"] + te2["hidden_size"], te2["projection_dim"], 6)

    def unet_refiner(self) -> dict[str, Any]:  # bigG states only; 5 time ids (size, crop, aesthetic score)
        te2 = self.text_encoder_2()
        return self._unet(SDXL_1_0.unet_refiner(), te2["hidden_size"], te2["projection_dim"], 5)

    def vae(self) -> dict[str, Any]:
        c = SDXL_1_0.vae()
        return c | {"block_out_channels": [self._w(w) for w in c["block_out_channels"]],
                    "norm_num_groups": self._w(c["norm_num_groups"])}


SKELETON_CONFIGS = SkeletonConfigs()


# --------------------------------------------------------------------------------------------------
# Building components
# --------------------------------------------------------------------------------------------------


def build_components(configs: ArchitectureConfigs, device: torch.device | str = "cpu") -> dict[str, nn.Module]:
    """Instantiate every model of base + refiner from config on ``device`` (``"meta"`` allocates nothing)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device(device):
        return {
            "unet": UNet2DConditionModel.from_config(configs.unet_base()),
            "unet_refiner": UNet2DConditionModel.from_config(configs.unet_refiner()),
            "vae": AutoencoderKL.from_config(configs.vae()),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**configs.text_encoder())),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**configs.text_encoder_2())),
        }


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def architecture_parameter_counts(configs: ArchitectureConfigs = SDXL_1_0) -> dict[str, int]:
    """Parameter count of each component, built on the meta device (no memory, no weights)."""
    return {name: count_parameters(m) for name, m in build_components(configs, "meta").items()}


# Output layers of residual branches: their init is scaled down so the residual stream stays bounded
# through SDXL's 70 transformer blocks and the VAE decoder in fp16.
_RESIDUAL_OUTPUTS = ("to_out.0", "ff.net.2", "conv2", "proj_out", "fc2", "out_proj")


@torch.no_grad()
def init_random_weights_(module: nn.Module, seed: int, residual_gain: float = 0.5) -> nn.Module:
    """Deterministic, fp16-safe random init, generated in float32 on the module's device.

    Every weight of a linear or convolution layer is drawn from N(0, gain^2 / fan_in) (variance preserving),
    with ``gain = residual_gain`` on the output layers of residual branches; biases are zero; norm layers
    are identity; embeddings are N(0, 0.02^2). Each tensor has its own generator seeded from ``seed`` and
    its name, so the weights do not depend on dtype or on the order of construction.
    """
    for name, param in module.named_parameters():
        device = param.device
        gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        leaf = name.rsplit(".", 1)[0]
        if name.endswith("bias"):
            param.zero_()
            continue
        if param.ndim == 1:  # norm weights
            param.fill_(1.0)
            continue
        if "embedding" in name and param.ndim == 2 and "linear" not in name:
            value = torch.randn(param.shape, generator=gen, device=device, dtype=torch.float32) * 0.02
        else:
            fan_in = math.prod(param.shape[1:])
            gain = residual_gain if leaf.endswith(_RESIDUAL_OUTPUTS) else 1.0
            value = torch.randn(param.shape, generator=gen, device=device, dtype=torch.float32)
            value *= gain / math.sqrt(fan_in)
        param.copy_(value.to(param.dtype))
    return module


def _make_pipelines(parts: dict[str, nn.Module], configs: ArchitectureConfigs):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from sdxl_core.tokenizer import build_clip_tokenizer

    tokenizer_2 = build_clip_tokenizer(pad_token="!")
    base = StableDiffusionXLPipeline(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        text_encoder_2=parts["text_encoder_2"],
        tokenizer=build_clip_tokenizer(),
        tokenizer_2=tokenizer_2,
        unet=parts["unet"],
        scheduler=EulerDiscreteScheduler.from_config(configs.scheduler()),
        force_zeros_for_empty_prompt=True,
    )
    if parts.get("unet_refiner") is None:
        return base, None
    refiner = StableDiffusionXLImg2ImgPipeline(
        vae=parts["vae"],
        text_encoder=None,
        text_encoder_2=parts["text_encoder_2"],
        tokenizer=None,
        tokenizer_2=tokenizer_2,
        unet=parts["unet_refiner"],
        scheduler=EulerDiscreteScheduler.from_config(configs.scheduler()),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    return base, refiner


def build_sdxl_random(device: torch.device | str = "cuda", dtype: torch.dtype = torch.float16, seed: int = 0,
                      with_refiner: bool = True, configs: ArchitectureConfigs = SDXL_1_0):
    """The full SDXL 1.0 base (+ refiner) with random, fp16-safe weights, built on ``device`` in ``dtype``.

    Returns ``(base, refiner)`` pipelines sharing ``text_encoder_2`` and ``vae``, as the reference code does.
    ``configs`` exists so tests can run this exact path on the tiny architecture.
    """
    parts: dict[str, nn.Module | None] = dict(build_components(configs, device))
    if not with_refiner:
        parts["unet_refiner"] = None
    for name, module in parts.items():
        if module is not None:
            init_random_weights_(module, seed=seed + zlib.crc32(name.encode()))
            module.to(dtype=dtype).eval().requires_grad_(False)
    return _make_pipelines(parts, configs)


# --------------------------------------------------------------------------------------------------
# The tiny preset: built once, saved, loaded back through the real loading path
# --------------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """Where built presets are cached: ``$SDXL_BENCH_CACHE`` or ``~/.cache/sdxl-bench``."""
    return Path(os.environ.get("SDXL_BENCH_CACHE", Path.home() / ".cache" / "sdxl-bench")).expanduser()


def tiny_fingerprint() -> str:
    import diffusers
    import transformers

    payload = json.dumps(
        {
            "format": TINY_FORMAT_VERSION,
            "seed": TINY_SEED,
            "torch": torch.__version__.split("+")[0],
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
            "configs": {n: load_config("tiny", n) for n in ("unet_base", "unet_refiner", "vae",
                                                            "text_encoder_clip_l", "text_encoder_2_bigg")},
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def build_tiny(seed: int = TINY_SEED):
    """The tiny base + refiner pipelines in float32 on the CPU, weights seeded by ``seed``."""
    with torch.random.fork_rng(devices=[]):  # seeded without touching the caller's RNG state
        torch.manual_seed(seed)
        parts = build_components(TINY_CONFIGS, "cpu")
    for module in parts.values():
        module.eval().requires_grad_(False)
    return _make_pipelines(parts, TINY_CONFIGS)


def write_tiny(out: str | Path, seed: int = TINY_SEED) -> tuple[Path, Path]:
    """Write the tiny checkpoints as diffusers folders ``out/base`` and ``out/refiner``."""
    out = Path(out)
    base, refiner = build_tiny(seed)
    out.mkdir(parents=True, exist_ok=True)
    base.save_pretrained(out / "base", safe_serialization=True)
    refiner.save_pretrained(out / "refiner", safe_serialization=True)
    return out / "base", out / "refiner"


def ensure_tiny() -> tuple[Path, Path]:
    """Folders of the cached tiny checkpoints, building and saving them the first time (atomically)."""
    final = cache_root() / f"tiny-{tiny_fingerprint()}"
    if not (final / "refiner" / "model_index.json").is_file():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=final.parent))
        try:
            write_tiny(tmp)
            try:
                os.replace(tmp, final)
            except OSError:  # another process finished first
                if not (final / "refiner" / "model_index.json").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final / "base", final / "refiner"


# --------------------------------------------------------------------------------------------------
# The toy preset: trained weights committed to the repository
# --------------------------------------------------------------------------------------------------


def toy_folders() -> tuple[Path, Path]:
    """The committed toy base and refiner folders; a clear error when they are missing."""
    from sdxl_core.errors import ModelNotFoundError

    root = toy_weights_dir()
    base, refiner = root / "base", root / "refiner"
    if not (base / "model_index.json").is_file() or not (refiner / "model_index.json").is_file():
        raise ModelNotFoundError(f"the toy preset's weights are missing from {root}; they are committed to the "
                                 f"repository (check out sdxl_core/toy/weights) or rebuilt with `make train-toy`")
    return base, refiner
