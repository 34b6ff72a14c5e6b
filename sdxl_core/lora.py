"""LoRA adapters on the SDXL base UNet, in diffusers' key format (what ``load_lora_weights`` reads)."""

from __future__ import annotations

import torch

# The UNet attention projections that diffusers' train_dreambooth_lora_sdxl.py adapts.
UNET_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")


@torch.no_grad()
def random_lora_state_dict(unet: torch.nn.Module, rank: int = 4, seed: int = 0, std: float = 0.05,
                           ) -> dict[str, torch.Tensor]:
    """A rank-``rank`` LoRA for ``unet`` with random down and up matrices (so it changes the output).

    It has the layout the Dreambooth LoRA script saves (peft ``LoraConfig`` on the attention projections,
    exported with ``convert_state_dict_to_diffusers``): ``unet.<module>.lora.down.weight`` of shape
    (rank, in_features) and ``unet.<module>.lora.up.weight`` of shape (out_features, rank). It is built from
    the module shapes alone, so ``unet`` is left exactly as it was (no adapter, no peft wrapper layers).
    """
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if not any(name == t or name.endswith("." + t) for t in UNET_TARGET_MODULES):
            continue
        dtype = module.weight.dtype
        state[f"unet.{name}.lora.down.weight"] = (torch.randn(rank, module.in_features, generator=gen) * std).to(dtype)
        state[f"unet.{name}.lora.up.weight"] = (torch.randn(module.out_features, rank, generator=gen) * std).to(dtype)
    return state
