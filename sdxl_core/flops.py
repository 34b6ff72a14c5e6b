"""FLOP accounting for SDXL components with ``torch.utils.flop_counter`` on the meta device.

No weights and no accelerator are needed: models are built from their configs on ``meta`` and run on
meta tensors, so counting the full SDXL 1.0 architecture at 1024x1024 takes seconds on a CPU. A
multiply-add counts as two FLOPs (PyTorch's convention).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sdxl_core.presets import SDXL_1_0, ArchitectureConfigs, build_components

LATENT_FACTOR = 8  # the SDXL VAE downsamples by 8


def unet_inputs(unet: nn.Module, batch: int, height: int, width: int, pooled_dim: int,
                device: torch.device | str = "meta", dtype: torch.dtype = torch.float32,
                ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Inputs of one SDXL UNet forward (``text_time`` conditioning) at image size ``height`` x ``width``.

    ``pooled_dim`` is the width of ``text_encoder_2``'s pooled projection; the remaining class-embedding
    inputs are the time ids (6 on the base: sizes and crop; 5 on the refiner: with the aesthetic score).
    """
    cfg = unet.config
    n_time_ids, rest = divmod(cfg.projection_class_embeddings_input_dim - pooled_dim, cfg.addition_time_embed_dim)
    if rest or n_time_ids not in (5, 6):
        raise ValueError(f"UNet config does not fit SDXL text_time conditioning with pooled width {pooled_dim}")
    kw = dict(device=device, dtype=dtype)
    sample = torch.zeros(batch, cfg.in_channels, height // LATENT_FACTOR, width // LATENT_FACTOR, **kw)
    cond = {"text_embeds": torch.zeros(batch, pooled_dim, **kw), "time_ids": torch.zeros(batch, n_time_ids, **kw)}
    hidden = torch.zeros(batch, 77, cfg.cross_attention_dim, **kw)
    timestep = torch.tensor(999, device=device)
    return (sample, timestep, hidden), {"added_cond_kwargs": cond, "return_dict": False}


def count_flops(fn, *args, **kwargs) -> int:
    """Total FLOPs of one call of ``fn`` as counted by ``FlopCounterMode``."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn(*args, **kwargs)
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class ComponentFlops:
    """FLOPs of one forward of each component at ``height`` x ``width``, batch 1."""

    height: int
    width: int
    unet_base: int
    unet_refiner: int
    vae_decode: int
    text_encoder: int
    text_encoder_2: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def component_flops(height: int = 1024, width: int = 1024,
                    configs: ArchitectureConfigs = SDXL_1_0) -> ComponentFlops:
    """Count every component's forward at batch 1 on the meta device."""
    parts = build_components(configs, "meta")
    counts: dict[str, int] = {}
    for name in ("unet", "unet_refiner"):
        pooled = parts["text_encoder_2"].config.projection_dim
        args, kwargs = unet_inputs(parts[name], 1, height, width, pooled)
        counts[name] = count_flops(parts[name], *args, **kwargs)
    vae = parts["vae"]
    latents = torch.zeros(1, vae.config.latent_channels, height // LATENT_FACTOR, width // LATENT_FACTOR,
                          device="meta")
    counts["vae"] = count_flops(vae.decode, latents)
    ids = torch.zeros(1, 77, dtype=torch.long, device="meta")
    for name in ("text_encoder", "text_encoder_2"):
        counts[name] = count_flops(parts[name], ids, output_hidden_states=True)
    return ComponentFlops(height, width, counts["unet"], counts["unet_refiner"], counts["vae"],
                          counts["text_encoder"], counts["text_encoder_2"])


@dataclass(frozen=True)
class WorkloadFlops:
    """FLOPs of one base+refiner generation: ``steps`` split at ``high_noise_frac``, guidance doubling the batch."""

    base_steps: int
    refiner_steps: int
    guidance: bool
    batch_size: int
    unet_base: float
    unet_refiner: float
    vae_decode: float
    text_encoders: float

    @property
    def total(self) -> float:
        return self.unet_base + self.unet_refiner + self.vae_decode + self.text_encoders


def split_steps(steps: int, high_noise_frac: float, configs: ArchitectureConfigs = SDXL_1_0) -> tuple[int, int]:
    """Steps run by the base and by the refiner, counted the way diffusers' ``denoising_end`` and
    ``denoising_start`` cut SDXL's Euler schedule: the base keeps timesteps at or above the cut-off."""
    from diffusers import EulerDiscreteScheduler

    from sdxl_core.generate import check_split

    return check_split(EulerDiscreteScheduler.from_config(configs.scheduler()), steps, high_noise_frac)


def text_encoder_passes(negative_prompt: bool, with_refiner: bool = True) -> tuple[int, int]:
    """Forward passes of (text_encoder, text_encoder_2) per image with compel, as the reference code runs them.

    Compel runs ``text_encoder_2`` twice per text (hidden states, then pooled) and ``text_encoder`` once, for
    the prompt and for the negative when one is given; the refiner's compel repeats ``text_encoder_2``; with a
    None negative the base uses zeros and the refiner encodes "" once itself.
    """
    texts = 2 if negative_prompt else 1
    te2 = 2 * texts
    if with_refiner:
        te2 += 2 * texts + (0 if negative_prompt else 1)
    return texts, te2


def workload_flops(per_forward: ComponentFlops, steps: int = 50, high_noise_frac: float = 0.8,
                   guidance: bool = True, batch_size: int = 1, with_refiner: bool = True,
                   negative_prompt: bool = False) -> WorkloadFlops:
    """FLOPs of generating ``batch_size`` images: UNet forwards at batch ``2 * batch_size`` with guidance."""
    if with_refiner:
        base_steps, refiner_steps = split_steps(steps, high_noise_frac)
    else:
        base_steps, refiner_steps = steps, 0
    cfg = 2 if guidance else 1
    te1, te2 = text_encoder_passes(negative_prompt, with_refiner)
    text = per_forward.text_encoder * te1 + per_forward.text_encoder_2 * te2
    return WorkloadFlops(
        base_steps=base_steps,
        refiner_steps=refiner_steps,
        guidance=guidance,
        batch_size=batch_size,
        unet_base=float(per_forward.unet_base) * base_steps * cfg * batch_size,
        unet_refiner=float(per_forward.unet_refiner) * refiner_steps * cfg * batch_size,
        vae_decode=float(per_forward.vae_decode) * batch_size,
        text_encoders=float(text) * batch_size,
    )
