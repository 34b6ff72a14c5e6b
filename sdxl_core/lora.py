"""LoRA adapters on the SDXL base UNet, in diffusers' key format (what ``load_lora_weights`` reads)."""

from __future__ import annotations

import torch

# The UNet attention projections that diffusers' train_dreambooth_lora_sdxl.py adapts.
UNET_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")


@torch.no_grad()
def random_lora_state_dict(unet: torch.nn.Module, rank: int = 4, seed: int = 0, std: float = 0.05,
                           adapter_name: str = "random-lora") -> dict[str, torch.Tensor]:
    """A rank-``rank`` LoRA for ``unet`` with random A and B (so it changes the output), in diffusers format.

    Built the way the Dreambooth LoRA script builds its adapter (peft ``LoraConfig`` on the attention
    projections, ``lora_alpha = rank``), exported with ``get_peft_model_state_dict`` and
    ``convert_state_dict_to_diffusers``; the adapter is removed from ``unet`` again afterwards.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                        target_modules=list(UNET_TARGET_MODULES))
    unet.add_adapter(config, adapter_name=adapter_name)
    try:
        gen = torch.Generator(device=unet.device).manual_seed(seed)
        for name, param in unet.named_parameters():
            if "lora_" in name and adapter_name in name:
                value = torch.randn(param.shape, generator=gen, device=param.device, dtype=torch.float32) * std
                param.copy_(value.to(param.dtype))
        state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
        state = {k: v.detach().clone() for k, v in convert_state_dict_to_diffusers(state).items()}
    finally:
        unet.delete_adapters(adapter_name)
    return {f"unet.{k}": v for k, v in state.items()}
