"""Host work that diffusers' SDXL pipelines redo for every image although its result cannot change.

Two such pieces sit on the critical path of a compiled generation, where the device waits for the host:

* ``pipe._execution_device`` walks every submodule of every component looking for offloading hooks (a ``hasattr``
  that raises inside ``nn.Module.__getattr__`` for each of SDXL's ~4,000 modules), at the start of each pipeline
  call. :func:`pin_execution_device` asks diffusers once and answers every later call with that device.
* The refiner's config has ``force_zeros_for_empty_prompt=False``, so without a negative prompt it tokenises and
  encodes ``""`` through ``text_encoder_2`` for every image, behind a host sync (the token ids' copy to the device).
  :class:`EmptyNegativeCache` has the refiner's own ``encode_prompt`` make those embeddings once per batch size,
  and passes them in as ``negative_prompt_embeds``.

Neither result depends on the prompt, so a workload of different prompts gains exactly what the speed suite's
repeated prompt gains, and the images are bit-identical (``tests/test_host_work.py``). Both assume the pipelines
stay as the optimisation level left them, as ``torch.compile`` does: no offloading hooks added, no device moves,
no LoRA loaded into ``text_encoder_2`` afterwards.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from sdxl_core.errors import InvalidConfigError

_PINNED_ATTR = "_sdxl_bench_execution_device"


def _pinned_device(pipe: Any) -> torch.device:
    return pipe.__dict__[_PINNED_ATTR]


@functools.cache
def _pinned_class(cls: type) -> type:
    """``cls`` with ``_execution_device`` read from the instance; same name and module, so messages and configs
    that print the class name are unchanged."""
    return type(cls.__name__, (cls,), {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                       "__doc__": cls.__doc__, "_execution_device": property(_pinned_device)})


def pin_execution_device(pipe: Any) -> torch.device:
    """Answer ``pipe._execution_device`` with what diffusers says now, without its per-call module walk.

    Call it after the pipeline's components are where they will run (offloading hooks included); returns the device.
    Idempotent: a pinned pipeline is re-pinned to diffusers' current answer."""
    cls = type(pipe)
    if _PINNED_ATTR in pipe.__dict__:
        cls = cls.__mro__[1]
    device = cls._execution_device.fget(pipe)  # diffusers' own lookup, this once
    pipe.__dict__[_PINNED_ATTR] = torch.device(device)
    pipe.__class__ = _pinned_class(cls)
    return pipe.__dict__[_PINNED_ATTR]


def is_pinned(pipe: Any) -> bool:
    return _PINNED_ATTR in pipe.__dict__ and type(pipe)._execution_device.fget is _pinned_device


def has_lora_layers(module: torch.nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # without peft nothing can have been loaded
        return False
    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


class EmptyNegativeCache:
    """The refiner's unconditional embeddings for "no negative prompt", made once per batch size by the refiner's own
    ``encode_prompt`` (the call its ``__call__`` makes, with the same arguments), then reused.

    :meth:`fill` returns the text arguments of a refiner call with ``negative_prompt_embeds`` and
    ``negative_pooled_prompt_embeds`` set, in the one case where diffusers would compute them from ``""`` itself:
    guidance on, prompt embeddings given, no negative embeddings given. Anything else passes through unchanged."""

    def __init__(self, pipe: Any):
        if getattr(pipe, "text_encoder_2", None) is None:
            raise InvalidConfigError("the empty-negative cache needs the refiner's text_encoder_2; use a level without "
                                     "cache_empty_negative for this pipeline")
        if has_lora_layers(pipe.text_encoder_2):
            raise InvalidConfigError(
                "text_encoder_2 carries LoRA layers, whose scale can change between images, so the refiner's "
                "embeddings of the empty negative prompt cannot be cached; use a level without cache_empty_negative")
        self.pipe = pipe
        self._embeds: dict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = {}
        self.encoded = 0  # how many times "" went through text_encoder_2 (the tests read it)

    def fill(self, text: dict[str, Any], guidance_scale: float) -> dict[str, Any]:
        prompt_embeds, pooled = text.get("prompt_embeds"), text.get("pooled_prompt_embeds")
        needed = (guidance_scale > 1 and self.pipe.unet.config.time_cond_proj_dim is None
                  and prompt_embeds is not None and pooled is not None
                  and text.get("negative_prompt_embeds") is None and text.get("negative_prompt") is None)
        if not needed:
            return text
        key = (tuple(prompt_embeds.shape), tuple(pooled.shape), prompt_embeds.dtype, prompt_embeds.device)
        if key not in self._embeds:
            _, negative, _, negative_pooled = self.pipe.encode_prompt(
                prompt=None, device=self.pipe._execution_device, num_images_per_prompt=1,
                do_classifier_free_guidance=True, negative_prompt=None, prompt_embeds=prompt_embeds,
                pooled_prompt_embeds=pooled, lora_scale=None, clip_skip=None)
            self._embeds[key] = (negative, negative_pooled)
            self.encoded += 1
        negative, negative_pooled = self._embeds[key]
        return dict(text, negative_prompt_embeds=negative, negative_pooled_prompt_embeds=negative_pooled)
