"""The denoising stages' starts without host syncs.

Each of diffusers' SDXL pipeline calls prepares its stage with host syncs (run 6's sync scan on an H100, per image:
55 at the base's start, 6 at the refiner's). A sync makes the host wait for everything queued on the device, so
the rest of the stage's preparation runs with the device idle: the text stage's kernels (base) or the base's last
step (refiner) could have hidden it. The syncs, and what replaces each:

* the scheduler's ``set_timesteps`` copies its timesteps and sigmas to the device from pageable memory and its
  sigmas back (three syncs per stage): :func:`timesteps_on_host` computes them on the CPU, as diffusers does for the
  sigmas anyway, and copies the timesteps to the device from pinned memory without waiting;
* ``_get_add_time_ids`` makes the micro-conditioning on the CPU, which the pipeline then copies from pageable
  memory: the override copies it from pinned memory;
* the refiner's ``get_timesteps`` counts its steps on the device (``.item()``): the override counts them in the
  scheduler's CPU copy of the timesteps, with diffusers' arithmetic;
* the base's ``denoising_end`` cuts its schedule by testing every timestep on the host (50 syncs for 50 steps):
  :func:`stopping_after` has the scheduler keep the first ``n`` timesteps instead (``n`` from
  :func:`sdxl_core.generate.check_split`, diffusers' cut computed on the CPU), and the base is called without
  ``denoising_end``: the same steps, sigmas and latents;
* the cross K/V cache's zero-row check reads the text embeddings: :meth:`CrossKVCache.claim_zero_rows` is told
  which rows are zero by whoever made them, and checks that on the device, read after the image.

The timesteps, sigmas and conditioning are the same numbers either way, so the images are bit-identical
(``tests/test_stage_starts.py``). Only ``EulerDiscreteScheduler`` with discrete timesteps (SDXL's) is taken: its
``set_timesteps`` is plain numpy; another scheduler is left as it is, and the level says so.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator

import torch

from sdxl_core.compel_uploads import HOST, upload


@functools.cache
def _scheduler_class(cls: type) -> type:
    def set_timesteps(self: Any, num_inference_steps: int | None = None, device: Any = None, *args: Any,
                      **kwargs: Any) -> None:
        cls.set_timesteps(self, num_inference_steps, HOST, *args, **kwargs)
        host = self.timesteps
        if self.stop_after is not None:
            host = host[:self.stop_after]
        self.host_timesteps = host
        self.timesteps = host if device is None else upload(host, torch.device(device))

    return type(cls.__name__, (cls,), {"__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                       "__doc__": cls.__doc__, "set_timesteps": set_timesteps,
                                       "stop_after": None, "host_timesteps": None})


def timesteps_on_host(scheduler: Any) -> bool:
    """Have ``scheduler`` compute its schedule on the CPU and copy only its timesteps to the device, without
    waiting (in place: the same object, its class a subclass of its own), keeping the CPU copy as
    ``host_timesteps``. Returns False, changing nothing, for a scheduler this does not cover (anything but Euler's
    with discrete timesteps)."""
    from diffusers import EulerDiscreteScheduler

    cls = type(scheduler)
    if "stop_after" in cls.__dict__:  # switched already
        return True
    if cls is not EulerDiscreteScheduler or scheduler.config.get("timestep_type", "discrete") != "discrete":
        return False
    scheduler.__class__ = _scheduler_class(cls)
    return True


@contextlib.contextmanager
def stopping_after(scheduler: Any, steps: int) -> Iterator[None]:
    """Within the block, ``scheduler``'s ``set_timesteps`` keeps only the first ``steps`` timesteps (its sigmas
    stay whole, as after diffusers' ``denoising_end`` cut)."""
    if "stop_after" not in type(scheduler).__dict__:
        raise TypeError(f"{type(scheduler).__name__} was not switched by timesteps_on_host()")
    scheduler.stop_after = steps
    try:
        yield
    finally:
        scheduler.stop_after = None


@functools.cache
def _pipeline_class(cls: type) -> type:
    def _get_add_time_ids(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = cls._get_add_time_ids(self, *args, **kwargs)
        device = self._execution_device
        return tuple(upload(t, device) for t in out) if isinstance(out, tuple) else upload(out, device)

    def get_timesteps(self: Any, num_inference_steps: int, strength: float, device: Any,
                      denoising_start: float | None = None) -> tuple[torch.Tensor, int]:
        scheduler = self.scheduler
        if denoising_start is None or getattr(scheduler, "host_timesteps", None) is None:
            return cls.get_timesteps(self, num_inference_steps, strength, device, denoising_start=denoising_start)
        cutoff = int(round(scheduler.config.num_train_timesteps
                           - (denoising_start * scheduler.config.num_train_timesteps)))
        steps = int((scheduler.host_timesteps < cutoff).sum())  # diffusers counts the same, on the device
        if scheduler.order == 2 and steps % 2 == 0:
            steps += 1
        t_start = len(scheduler.timesteps) - steps
        timesteps = scheduler.timesteps[t_start:]
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(t_start)
        return timesteps, steps

    attrs: dict[str, Any] = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__,
                             "_sdxl_sync_free_stage_start": True, "_get_add_time_ids": _get_add_time_ids}
    if hasattr(cls, "get_timesteps"):
        attrs["get_timesteps"] = get_timesteps
    return type(cls.__name__, (cls,), attrs)


def sync_free_stage_start(pipe: Any) -> str:
    """Switch ``pipe`` (an SDXL pipeline, text-to-image or image-to-image) and its scheduler to the overrides above,
    in place. Call before :func:`sdxl_core.host_work.pin_execution_device`, which subclasses what it finds.
    Returns what was done, for the results."""
    if not timesteps_on_host(pipe.scheduler):
        return f"unchanged: {type(pipe.scheduler).__name__} is not covered (only EulerDiscreteScheduler)"
    if not is_sync_free(pipe):
        pipe.__class__ = _pipeline_class(type(pipe))
    return "sync-free"


def is_sync_free(pipe: Any) -> bool:
    return any(c.__dict__.get("_sdxl_sync_free_stage_start") for c in type(pipe).__mro__) and \
        "stop_after" in type(pipe.scheduler).__dict__


def zero_text_rows(pipe: Any, batch: int, negative_given: bool, guidance_scale: float) -> tuple[int, ...]:
    """The rows of ``pipe``'s guided UNet batch whose text embeddings diffusers makes all zeros: the unconditional
    half (the first ``batch`` rows) when no negative prompt or negative embeddings are given and the pipeline's
    config has ``force_zeros_for_empty_prompt`` (SDXL's base; not its refiner, which encodes the empty prompt)."""
    guided = guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None
    if negative_given or not guided or not pipe.config.get("force_zeros_for_empty_prompt", False):
        return ()
    return tuple(range(batch))
