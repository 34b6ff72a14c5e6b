"""Base + refiner "ensemble of experts" generation with compel prompt weighting, as the reference code does."""

from __future__ import annotations

import contextlib
import io
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch

from sdxl_core.errors import InvalidConfigError
from sdxl_core.loading import Pipelines
from sdxl_core.prompt_check import parse_cache_released, set_packrat_parsing


@dataclass(frozen=True)
class GenerationSettings:
    """How an image is made; everything except the prompt, negative prompt, seed and LoRA scale."""

    steps: int = 50
    guidance_scale: float = 13.0
    high_noise_frac: float = 0.8
    width: int = 1024
    height: int = 1024
    use_compel: bool = True

    def check(self) -> None:
        """Raise :class:`InvalidConfigError` naming the setting and the fix; called before any work."""
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise InvalidConfigError(f"steps must be an integer >= 1, got {self.steps!r}; pass e.g. --steps 50")
        if isinstance(self.guidance_scale, bool) or not isinstance(self.guidance_scale, (int, float)) \
                or not math.isfinite(self.guidance_scale) \
                or not 0 <= self.guidance_scale <= 100:
            raise InvalidConfigError(
                f"guidance_scale must be a finite number in [0, 100], got {self.guidance_scale!r}; "
                f"SDXL is usually run at 5-13"
            )
        if isinstance(self.high_noise_frac, bool) or not isinstance(self.high_noise_frac, (int, float)) \
                or not 0 < self.high_noise_frac < 1:
            raise InvalidConfigError(
                f"high_noise_frac must lie strictly between 0 and 1, got {self.high_noise_frac!r}; "
                f"the reference uses 0.8 (the base denoises the first 80%, the refiner the rest)"
            )
        for name in ("width", "height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 8 or value % 8:
                raise InvalidConfigError(
                    f"{name} must be a positive multiple of 8 (the VAE downsamples by 8), got {value!r}; "
                    f"try {max(8, (int(value) // 8) * 8) if isinstance(value, (int, float)) else 1024}"
                )


@dataclass(frozen=True)
class GenerationRequest:
    """One image (or one batch): prompt, negative prompt (None lets each pipeline use its default), seed(s)."""

    prompt: str
    seed: int
    negative_prompt: str | None = None
    lora_scale: float = 0.0
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    batch_size: int = 1  # images of the same prompt with seeds seed, seed+1, ...

    def check(self) -> None:
        self.settings.check()
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise InvalidConfigError("prompt is empty; pass a non-empty --prompt")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise InvalidConfigError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise InvalidConfigError(f"negative_prompt must be a string or None, got {self.negative_prompt!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InvalidConfigError(f"batch_size must be an integer >= 1, got {self.batch_size!r}")

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.batch_size)]


@dataclass
class GenerationOutput:
    images: list[Any]  # PIL images
    latents: torch.Tensor | None  # what the base handed to the refiner (None without a refiner)
    stage_seconds: dict[str, float]


class StageClock:
    """Marks points of a generation on the device's stream; durations are read after one synchronisation.

    ``marker(name)``, when given, runs at every mark first (the profiler puts a stage marker on the device)."""

    def __init__(self, device: torch.device, marker: Callable[[str], None] | None = None):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, Any]] = []
        self.marker = marker

    def mark(self, name: str) -> None:
        if self.marker is not None:
            self.marker(name)
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))
        else:
            self.marks.append((name, time.perf_counter()))

    def durations(self) -> dict[str, float]:
        """Seconds from each mark to the next, keyed by the earlier mark's name (summed if repeated)."""
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for (name, a), (_, b) in zip(self.marks, self.marks[1:]):
            seconds = a.elapsed_time(b) / 1000 if self.cuda else b - a
            out[name] = out.get(name, 0.0) + seconds
        return out


class PromptEncoder:
    """Compel embeddings for the base (two encoders, pooled from encoder 2) and the refiner (encoder 2 only).

    ``packrat`` switches pyparsing's packrat cache (process-wide) for compel's prompt parser: on by default, for
    the same parse in about half the time, and in milliseconds for nested parentheses, where the parser without
    it takes time exponential in the depth (depth 7: 19.7 s -> 10 ms on 2 cores). ``None`` leaves the switch as it
    is: the speed suite sets it per optimisation level, so ``eager`` times compel as it ships. With
    ``pipes.fast_prompt_parse`` compel parses through :mod:`sdxl_core.prompt_parse` (the same parse, faster); with
    ``pipes.text_encoder_graphs`` it calls the text encoders through their CUDA graphs
    (:mod:`sdxl_core.text_graphs`); with ``pipes.sync_free_compel`` its embeddings providers keep the host's
    numbers on the host (:mod:`sdxl_core.compel_uploads`: the same embeddings, no host syncs)."""

    def __init__(self, pipes: Pipelines, packrat: bool | None = True):
        from compel import ReturnedEmbeddingsType

        from sdxl_core.prompt_parse import compel_class

        if packrat is not None:
            set_packrat_parsing(packrat)
        compel_cls = compel_class(pipes.fast_prompt_parse)

        kind = ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
        base = pipes.base
        with contextlib.redirect_stdout(io.StringIO()):  # compel prints a deprecation note for the list form
            self.base = compel_cls(
                tokenizer=[base.tokenizer, base.tokenizer_2],
                text_encoder=[pipes.text_encoder_for_compel(base, "text_encoder"),
                              pipes.text_encoder_for_compel(base, "text_encoder_2")],
                returned_embeddings_type=kind,
                requires_pooled=[False, True],
            )
        self.refiner = None
        if pipes.refiner is not None:
            self.refiner = compel_cls(
                tokenizer=pipes.refiner.tokenizer_2,
                text_encoder=pipes.text_encoder_for_compel(pipes.refiner, "text_encoder_2"),
                returned_embeddings_type=kind,
                requires_pooled=True,
            )
        if pipes.sync_free_compel:
            from sdxl_core.compel_uploads import use_uploads

            for compel in (self.base, self.refiner):
                if compel is not None:
                    use_uploads(compel)

    @staticmethod
    def embed(compel: Any, prompt: list[str], negative: list[str] | None) -> dict[str, torch.Tensor | None]:
        with parse_cache_released():  # else the parser's cache keeps the caller's frames, and the pipelines, alive
            embeds, pooled = compel(prompt)
            neg_embeds = neg_pooled = None
            if negative is not None:
                neg_embeds, neg_pooled = compel(negative)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled,
                "negative_prompt_embeds": neg_embeds, "negative_pooled_prompt_embeds": neg_pooled}


def refiner_embeds_from_base(base_text: dict[str, Any], width: int) -> dict[str, Any]:
    """The refiner's compel embeddings taken from the base's: the base concatenates CLIP-L and bigG penultimate
    states along the feature axis, and the refiner's single-encoder compel on the same (shared) bigG encoder
    computes exactly the last ``width`` features; the pooled embeddings are the same tensor."""
    out = dict(base_text)
    for key in ("prompt_embeds", "negative_prompt_embeds"):
        if out[key] is not None:
            out[key] = out[key][..., -width:]
    return out


def _plain_embeds(prompt: list[str], negative: list[str] | None) -> dict[str, Any]:
    return {"prompt": prompt, "negative_prompt": negative}


def generate(pipes: Pipelines, request: GenerationRequest, encoder: PromptEncoder | None = None,
             clock: StageClock | None = None) -> GenerationOutput:
    """Make ``request.batch_size`` images: base to ``high_noise_frac`` in latent space, then the refiner.

    Mirrors the reference notebook call for call: compel embeddings (unless ``use_compel`` is off), one
    ``torch.Generator(device).manual_seed(seed)`` per stage, ``cross_attention_kwargs={"scale": lora_scale}``
    on the base only. Without a refiner the base runs all steps and decodes.
    """
    request.check()
    s = request.settings
    if pipes.refiner is not None:
        base_steps, _ = check_split(pipes.base.scheduler, s.steps, s.high_noise_frac)
    device = pipes.device
    clock = clock or StageClock(device)
    prompts = [request.prompt] * request.batch_size
    negatives = None if request.negative_prompt is None else [request.negative_prompt] * request.batch_size

    clock.mark("text_encoding")
    if s.use_compel:
        encoder = encoder or PromptEncoder(pipes)
        base_text = encoder.embed(encoder.base, prompts, negatives)
        if pipes.refiner is None:
            refiner_text = None
        elif pipes.share_text_embeddings:
            refiner_text = refiner_embeds_from_base(base_text, pipes.refiner.text_encoder_2.config.hidden_size)
        else:
            refiner_text = encoder.embed(encoder.refiner, prompts, negatives)
    else:
        base_text = _plain_embeds(prompts, negatives)
        refiner_text = base_text

    def generators() -> torch.Generator | list[torch.Generator]:
        gens = [torch.Generator(device).manual_seed(seed) for seed in request.seeds]
        return gens[0] if len(gens) == 1 else gens

    clock.mark("base_denoising")
    common = dict(num_inference_steps=s.steps, guidance_scale=s.guidance_scale, width=s.width, height=s.height)
    base_kwargs = dict(common, **base_text, generator=generators(),
                       cross_attention_kwargs={"scale": request.lora_scale})
    final = {"output_type": "pt"} if pipes.images_on_device else {}
    sync_free = pipes.sync_free_stage_starts and _still_sync_free(pipes)
    if pipes.refiner is None:
        latents = None
        with _vae_mark(pipes.base.vae, clock), _claims(pipes.base, base_text, request.batch_size, s, sync_free):
            images = pipes.base(**base_kwargs, **final).images
    else:
        base_kwargs.update(output_type="latent")
        with contextlib.ExitStack() as stack:
            stack.enter_context(_claims(pipes.base, base_text, request.batch_size, s, sync_free))
            if sync_free:  # the same cut as denoising_end, made on the CPU (sdxl_core.stage_starts)
                from sdxl_core.stage_starts import stopping_after

                stack.enter_context(stopping_after(pipes.base.scheduler, base_steps))
            else:
                base_kwargs.update(denoising_end=s.high_noise_frac)
            latents = pipes.base(**base_kwargs).images
        clock.mark("refiner_denoising")
        if pipes.empty_negative is not None:
            refiner_text = pipes.empty_negative.fill(refiner_text, s.guidance_scale)
        refiner_kwargs = dict(num_inference_steps=s.steps, guidance_scale=s.guidance_scale, **refiner_text,
                              denoising_start=s.high_noise_frac, image=latents, generator=generators())
        with _vae_mark(pipes.refiner.vae, clock), \
                _claims(pipes.refiner, refiner_text, request.batch_size, s, sync_free):
            images = pipes.refiner(**refiner_kwargs, **final).images
    if pipes.images_on_device:
        images = pil_from_device(images)
    clock.mark("end")
    if sync_free:
        for pipe in (pipes.base, pipes.refiner):
            if pipe is not None and hasattr(pipe.unet, "verify_claims"):
                pipe.unet.verify_claims()
    return GenerationOutput(images=list(images), latents=latents, stage_seconds=clock.durations())


def pil_from_device(images: torch.Tensor) -> list[Any]:
    """PIL images from the denormalised ``[0, 1]`` batch that diffusers returns for ``output_type="pt"``, by
    diffusers' own arithmetic (``VaeImageProcessor.numpy_to_pil(pt_to_numpy(images))``: float32, times 255,
    round half to even, to uint8) done where the tensor is; only the 8-bit image is copied to the host. The
    pixels are the same as diffusers' ``output_type="pil"``."""
    from PIL import Image

    pixels = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
    if pixels.shape[-1] == 1:
        return [Image.fromarray(image.squeeze(-1)) for image in pixels]  # 2-D uint8: mode "L"
    return [Image.fromarray(image) for image in pixels]


def _still_sync_free(pipes: Pipelines) -> bool:
    """Whether the pipelines are still as the level switched them (a scheduler swapped in since is not)."""
    from sdxl_core.stage_starts import is_sync_free

    return all(is_sync_free(pipe) for pipe in (pipes.base, pipes.refiner) if pipe is not None)


@contextlib.contextmanager
def _claims(pipe: Any, text: dict[str, Any], batch: int, s: Any, sync_free: bool):
    """With ``sync_free``, tell ``pipe``'s cross K/V cache which rows of its text diffusers will make all zeros, so
    that it need not ask the device (sdxl_core.stage_starts); an unused claim is withdrawn after the call."""
    claim = getattr(pipe.unet, "claim_zero_rows", None) if sync_free else None
    if claim is None:
        yield
        return
    from sdxl_core.stage_starts import zero_text_rows

    negative_given = text.get("negative_prompt_embeds") is not None or text.get("negative_prompt") is not None
    claim(zero_text_rows(pipe, batch, negative_given, s.guidance_scale))
    try:
        yield
    finally:
        claim(None)


@contextlib.contextmanager
def _vae_mark(vae: Any, clock: StageClock):
    """Mark ``vae_decode`` when the VAE's ``post_quant_conv`` runs (the first layer of ``decode``)."""
    layer = getattr(vae, "post_quant_conv", None)
    if layer is None:
        yield
        return
    handle = layer.register_forward_pre_hook(lambda module, args: clock.mark("vae_decode"))
    try:
        yield
    finally:
        handle.remove()


def check_split(scheduler: Any, steps: int, high_noise_frac: float) -> tuple[int, int]:
    """Steps the base and the refiner get, as diffusers cuts ``scheduler``'s timesteps at ``high_noise_frac``;
    refuses a split that leaves either stage without a step."""
    probe = type(scheduler).from_config(scheduler.config)
    probe.set_timesteps(steps)
    train_steps = probe.config.num_train_timesteps
    cutoff = int(round(train_steps - high_noise_frac * train_steps))
    base = int((probe.timesteps >= cutoff).sum())
    if base == 0 or base == steps:
        raise InvalidConfigError(
            f"with steps={steps} and high_noise_frac={high_noise_frac} the base runs {base} step(s) and the refiner "
            f"{steps - base}; each needs at least one: raise --steps (the reference uses 50) or move high_noise_frac")
    return base, steps - base


def with_settings(request: GenerationRequest, **changes: Any) -> GenerationRequest:
    return replace(request, settings=replace(request.settings, **changes))


def check_prompts(prompts: Sequence[str]) -> None:
    """An empty prompt list or an empty prompt is refused before any model is loaded."""
    if not prompts:
        raise InvalidConfigError("the prompt list is empty; give at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise InvalidConfigError(f"prompt {i} is empty; remove it or write a prompt")
