"""Dreambooth LoRA training for the SDXL base UNet (and optionally its text encoders).

The objective and defaults follow diffusers' ``examples/dreambooth/train_dreambooth_lora_sdxl.py``: a
rank-``rank`` peft adapter (``lora_alpha = rank``, gaussian init) on the UNet's ``to_k, to_q, to_v,
to_out.0``; AdamW (betas 0.9/0.999, weight decay 1e-4, eps 1e-8) at a constant learning rate; the VAE kept
in fp32; SDXL's time ids (original size, crop, target size) and ``text_encoder_2``'s pooled embedding as
conditioning; noise-prediction MSE, optionally Min-SNR weighted (``snr_gamma``); gradients clipped at 1.0.
accelerate handles the device, mixed precision and gradient accumulation.

Two departures, both for exact resumption: every random draw of a micro-step (which image, crop, flip,
VAE sample, noise, timestep) comes from a generator seeded by ``(seed, micro_step)``, so a run resumed from
a checkpoint sees the same data and noise as one that never stopped; and checkpoints are safetensors plus
JSON (LoRA weights, AdamW state, step, loss curve), with nothing pickled. The LoRA initialisation is seeded
from ``seed`` too, so the same command trains the same LoRA.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from sdxl_core.atomicio import write_json_atomic
from sdxl_core.errors import InvalidConfigError
from sdxl_core.imagefiles import IMAGE_SUFFIXES, image_files
from sdxl_core.lora import UNET_TARGET_MODULES
from sdxl_core.train_args import MIXED_PRECISION

WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
METADATA_NAME = "lora_metadata.json"
CHECKPOINT_PREFIX = "checkpoint-"
TEXT_ENCODER_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")
# diffusers' train_dreambooth_lora_sdxl.py defaults
ADAM_BETAS = (0.9, 0.999)
ADAM_WEIGHT_DECAY = 1e-4
ADAM_WEIGHT_DECAY_TEXT_ENCODER = 1e-3
ADAM_EPSILON = 1e-8
MAX_GRAD_NORM = 1.0


@dataclass(frozen=True)
class TrainConfig:
    """One LoRA training job; names follow the diffusers script's options."""

    base: str
    data: str
    out: str
    instance_prompt: str = "wrong"
    resolution: int = 1024
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_train_steps: int = 500
    rank: int = 4
    learning_rate: float = 1e-4
    text_encoder_lr: float = 5e-6
    mixed_precision: str = "no"
    snr_gamma: float | None = None
    train_text_encoder: bool = False
    center_crop: bool = False
    random_flip: bool = False
    seed: int = 0
    checkpointing_steps: int | None = None
    checkpoints_total_limit: int | None = None
    resume: bool = False
    version_label: str | None = None
    device: str | None = None
    variant: str | None = None

    def check(self) -> None:
        """Refuse bad options before anything is loaded or written."""
        def positive_int(name: str, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidConfigError(f"--{name.replace('_', '-')} must be a whole number >= 1, got {value!r}")

        for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "rank"):
            positive_int(name, getattr(self, name))
        positive_int("resolution", self.resolution)
        if self.resolution % 8:
            raise InvalidConfigError(f"--resolution {self.resolution} is not a multiple of 8 (the VAE downsamples by "
                                     f"8); try {max(8, self.resolution // 8 * 8)}")
        for name in ("checkpointing_steps", "checkpoints_total_limit"):
            if getattr(self, name) is not None:
                positive_int(name, getattr(self, name))
        for name in ("learning_rate", "text_encoder_lr"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise InvalidConfigError(f"--{name.replace('_', '-')} must be a positive number, got {value!r}")
        if self.snr_gamma is not None and (not math.isfinite(self.snr_gamma) or self.snr_gamma <= 0):
            raise InvalidConfigError(f"--snr-gamma must be a positive number (5.0 is the usual choice), "
                                     f"got {self.snr_gamma!r}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise InvalidConfigError(f"--mixed-precision must be one of {', '.join(MIXED_PRECISION)}, "
                                     f"got {self.mixed_precision!r}")
        if not self.instance_prompt or not self.instance_prompt.strip():
            raise InvalidConfigError("--instance-prompt is empty; give the word the LoRA learns (e.g. wrong)")
        if self.version_label is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}",
                                                               self.version_label):
            raise InvalidConfigError(f"--version-label {self.version_label!r}: use letters, digits, '.', '_' "
                                     f"and '-' (up to 64, starting with a letter or digit), e.g. v2")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainResult:
    """What a finished (or already finished) training wrote."""

    weights: Path
    metadata: Path
    global_step: int
    losses: list[float]
    step_seconds: list[float] = field(default_factory=list)
    resumed_from: int | None = None
    pipes: Any = None  # the trained base pipeline with its adapter in memory, when asked for (keep_pipes)


def list_images(folder: str | Path) -> list[Path]:
    """The images of ``folder`` (not recursive), sorted by name; an error that says what is wrong if none."""
    path = Path(folder)
    if not path.is_dir():
        raise InvalidConfigError(f"--data {str(folder)!r} is not a folder; give a folder of training images "
                                 f"(e.g. one written by `sdxl-bench make-wrong-dataset`)")
    images = image_files(path)
    if not images:
        raise InvalidConfigError(f"--data {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return images


def dataset_hash(images: list[Path]) -> str:
    """sha256 over the sorted (file name, file sha256) pairs: the same pictures give the same hash."""
    outer = hashlib.sha256()
    for path in sorted(images, key=lambda p: p.name):
        outer.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return outer.hexdigest()


STEP_STREAM, EPOCH_STREAM, INIT_STREAM = 0, 1, 2


def _step_generator(seed: int, index: int, stream: int = STEP_STREAM) -> torch.Generator:
    """A CPU generator for draw ``index`` of ``stream``, independent of every other (seed, stream, index)."""
    import numpy as np

    state = np.random.SeedSequence([seed, stream, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class ImageSet:
    """The training images, resized once so the shorter side is ``resolution``; crops and flips per step."""

    def __init__(self, paths: list[Path], resolution: int, center_crop: bool, random_flip: bool) -> None:
        from PIL import Image, ImageOps
        from torchvision.transforms import functional as TF

        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        self.tensors: list[torch.Tensor] = []
        self.original_sizes: list[tuple[int, int]] = []
        for path in paths:
            try:
                with Image.open(path) as img:
                    img = ImageOps.exif_transpose(img).convert("RGB")
            except Exception as exc:
                raise InvalidConfigError(f"training image {str(path)!r} cannot be read: {exc}") from exc
            self.original_sizes.append((img.height, img.width))
            img = TF.resize(img, resolution, interpolation=TF.InterpolationMode.BILINEAR)
            self.tensors.append(TF.normalize(TF.to_tensor(img), [0.5], [0.5]))

    def __len__(self) -> int:
        return len(self.tensors)

    def sample(self, index: int, gen: torch.Generator) -> tuple[torch.Tensor, list[int]]:
        """(C,H,W) pixels in [-1, 1] and the SDXL time ids (original size, crop top-left, target size)."""
        image = self.tensors[index]
        h, w = image.shape[-2:]
        r = self.resolution
        if self.center_crop:
            top, left = (h - r) // 2, (w - r) // 2
        else:
            top = int(torch.randint(0, h - r + 1, (1,), generator=gen))
            left = int(torch.randint(0, w - r + 1, (1,), generator=gen))
        crop = image[:, top:top + r, left:left + r]
        if self.random_flip and bool(torch.rand(1, generator=gen) < 0.5):
            crop = crop.flip(-1)
        return crop, [*self.original_sizes[index], top, left, r, r]


def batch_indices(n_images: int, batch_size: int, micro_step: int, seed: int) -> list[int]:
    """Images of micro-step ``micro_step``: epochs of a seeded shuffle, read ``batch_size`` at a time."""
    out = []
    for k in range(micro_step * batch_size, (micro_step + 1) * batch_size):
        epoch, pos = divmod(k, n_images)
        perm = torch.randperm(n_images, generator=_step_generator(seed, epoch, EPOCH_STREAM))
        out.append(int(perm[pos]))
    return out


def min_snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al., 2023) as diffusers' script computes them:
    ``min(SNR, gamma) / SNR`` for epsilon prediction, ``min(SNR, gamma) / (SNR + 1)`` for v-prediction."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    clipped = torch.stack([snr, gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    return clipped / (snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr)


def _encode_prompt(text_encoders: list[Any], token_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL prompt embeddings as the diffusers script makes them: both encoders' penultimate hidden states,
    concatenated, and ``text_encoder_2``'s pooled projection."""
    embeds, pooled = [], None
    for encoder, ids in zip(text_encoders, token_ids):
        out = encoder(ids.to(encoder.device), output_hidden_states=True, return_dict=True)
        pooled = out[0]
        embeds.append(out.hidden_states[-2])
    return torch.cat(embeds, dim=-1), pooled


def _tokenize(tokenizer: Any, prompt: str) -> torch.Tensor:
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def _trainable(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Finished checkpoints in ``out``, oldest first (a folder counts only once its state.json is written)."""
    found = []
    for path in out.glob(f"{CHECKPOINT_PREFIX}*"):
        step = path.name[len(CHECKPOINT_PREFIX):]
        if path.is_dir() and step.isdigit() and (path / "state.json").is_file():
            found.append((int(step), path))
    return sorted(found)


def _save_checkpoint(out: Path, step: int, modules: dict[str, torch.nn.Module], optimizer: Any,
                     losses: list[float], step_seconds: list[float], config: TrainConfig) -> Path:
    """LoRA parameters and AdamW state as safetensors, the rest as JSON, in a folder renamed into place."""
    from safetensors.torch import save_file

    final = out / f"{CHECKPOINT_PREFIX}{step}"
    tmp = out / f".{CHECKPOINT_PREFIX}{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    params = {f"{m}.{n}": p.detach().float().cpu().contiguous()
              for m, module in modules.items() for n, p in _trainable(module).items()}
    save_file(params, str(tmp / "lora_params.safetensors"))
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, slots in state["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    doc = {"global_step": step, "losses": losses, "step_seconds": step_seconds, "config": config.as_dict(),
           "param_groups": state["param_groups"], "optimizer_scalars": scalars}
    write_json_atomic(tmp / "state.json", doc)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if config.checkpoints_total_limit:
        for _, old in checkpoints(out)[:-config.checkpoints_total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(path: Path, modules: dict[str, torch.nn.Module], optimizer: Any) -> dict[str, Any]:
    from safetensors.torch import load_file

    doc = json.loads((path / "state.json").read_text())
    params = load_file(str(path / "lora_params.safetensors"))
    with torch.no_grad():
        for m, module in modules.items():
            for n, p in _trainable(module).items():
                key = f"{m}.{n}"
                if key not in params:
                    raise InvalidConfigError(f"checkpoint {str(path)!r} has no {key}: it was written by a "
                                             f"different configuration; train into a new --out")
                p.copy_(params[key].to(p.dtype))
    tensors = load_file(str(path / "optimizer.safetensors"))
    state: dict[int, dict[str, Any]] = {}
    for flat, value in list(tensors.items()) + list(doc["optimizer_scalars"].items()):
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": doc["param_groups"]})
    return doc


def _resolved_config_matches(saved: dict[str, Any], config: TrainConfig) -> list[str]:
    """Options that must not change between a checkpoint and its resumption (the step budget may grow)."""
    fixed = ("base", "instance_prompt", "resolution", "train_batch_size", "gradient_accumulation_steps", "rank",
             "learning_rate", "text_encoder_lr", "mixed_precision", "snr_gamma", "train_text_encoder",
             "center_crop", "random_flip", "seed")
    mine = config.as_dict()
    return [k for k in fixed if saved.get(k) != mine[k]]


def train_lora(config: TrainConfig, progress: bool = True,
               on_step: Callable[[int, float], None] | None = None, keep_pipes: bool = False) -> TrainResult:
    """Train, checkpoint and write ``pytorch_lora_weights.safetensors`` plus ``lora_metadata.json`` in ``out``.

    With ``resume``, training continues from the newest checkpoint in ``out`` (same options required). An
    ``out`` that already holds checkpoints or finished weights is refused without ``resume``: nothing
    finished is overwritten.
    """
    config.check()
    images = list_images(config.data)
    out = Path(config.out)
    existing = checkpoints(out) if out.is_dir() else []
    if not config.resume and (existing or (out / WEIGHTS_NAME).exists()):
        raise InvalidConfigError(f"--out {config.out!r} already holds a training ({WEIGHTS_NAME} or checkpoints); "
                                 f"pass --resume to continue it, or choose another --out")
    return _train(config, images, out, existing[-1][1] if (config.resume and existing) else None, progress, on_step,
                  keep_pipes)


def _train(config: TrainConfig, image_paths: list[Path], out: Path, resume_from: Path | None, progress: bool,
           on_step: Callable[[int, float], None] | None, keep_pipes: bool) -> TrainResult:
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig, inject_adapter_in_model
    from tqdm.auto import tqdm

    from sdxl_core.loading import default_device, load_pipelines

    device = torch.device(config.device or default_device())
    if config.mixed_precision == "fp16" and device.type != "cuda":
        raise InvalidConfigError("--mixed-precision fp16 needs a CUDA device; use bf16 or no on the CPU")
    _release_accelerator_state(config.mixed_precision)
    accelerator = Accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps,
                              mixed_precision=config.mixed_precision, cpu=device.type == "cpu")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)
    data = ImageSet(image_paths, config.resolution, config.center_crop, config.random_flip)
    pipes = load_pipelines(config.base, None, device=accelerator.device, dtype=torch.float32,
                           variant=config.variant)
    pipe = pipes.base
    unet, vae = pipe.unet, pipe.vae
    encoders = [pipe.text_encoder, pipe.text_encoder_2]
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    for module in [unet, vae, *encoders]:
        module.requires_grad_(False)
    unet.to(dtype=weight_dtype)
    vae.to(dtype=torch.float32)  # the script keeps the stock SDXL VAE in fp32 (it overflows in fp16)
    for enc in encoders:
        enc.to(dtype=weight_dtype)
    modules: dict[str, torch.nn.Module] = {"unet": unet}
    # peft draws the gaussian LoRA A matrices from the global RNG: seed it from the run's seed (as the reference
    # script's set_seed does), inside fork_rng so the caller's RNG state is left as it was. Unseeded, two runs of
    # the same command trained different LoRAs (the same first loss, since B starts at zero; different after).
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(_step_generator(config.seed, 0, INIT_STREAM).initial_seed())
        unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.rank, init_lora_weights="gaussian",
                                    target_modules=list(UNET_TARGET_MODULES)))
        if config.train_text_encoder:
            te_config = LoraConfig(r=config.rank, lora_alpha=config.rank, init_lora_weights="gaussian",
                                   target_modules=list(TEXT_ENCODER_TARGET_MODULES))
            for name, enc in zip(("text_encoder", "text_encoder_2"), encoders):
                # peft directly: transformers 5's own add_adapter asks for a peft release newer than the registry's
                inject_adapter_in_model(te_config, enc, adapter_name="default")
                modules[name] = enc
    if config.mixed_precision == "fp16":
        cast_training_params(list(modules.values()), dtype=torch.float32)  # LoRA weights train in fp32
    groups = [{"params": list(_trainable(unet).values()), "lr": config.learning_rate,
               "weight_decay": ADAM_WEIGHT_DECAY}]
    if config.train_text_encoder:
        groups.append({"params": [p for e in encoders for p in _trainable(e).values()],
                       "lr": config.text_encoder_lr, "weight_decay": ADAM_WEIGHT_DECAY_TEXT_ENCODER})
    optimizer = torch.optim.AdamW(groups, betas=ADAM_BETAS, eps=ADAM_EPSILON)
    start, losses, step_seconds = 0, [], []
    if resume_from is not None:
        saved = json.loads((resume_from / "state.json").read_text())
        changed = _resolved_config_matches(saved["config"], config)
        if changed:
            raise InvalidConfigError(f"--resume: {', '.join(changed)} differ from checkpoint {str(resume_from)!r}; "
                                     f"resume with the same options or train into a new --out")
        doc = _load_checkpoint(resume_from, modules, optimizer)
        start, losses, step_seconds = doc["global_step"], list(doc["losses"]), list(doc["step_seconds"])
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)  # "constant", no warm-up
    prepared = accelerator.prepare(*modules.values(), optimizer, lr_scheduler)
    optimizer, lr_scheduler = prepared[-2], prepared[-1]
    token_ids = [_tokenize(pipe.tokenizer, config.instance_prompt), _tokenize(pipe.tokenizer_2, config.instance_prompt)]
    if not config.train_text_encoder:
        with torch.no_grad():
            fixed_embeds, fixed_pooled = _encode_prompt(encoders, token_ids)
    params = [p for m in modules.values() for p in _trainable(m).values()]
    bs = config.train_batch_size
    for module in modules.values():
        module.train()
    bar = tqdm(total=config.max_train_steps, initial=min(start, config.max_train_steps), desc="train-lora",
               unit="step", disable=not progress, dynamic_ncols=True)
    step = start
    while step < config.max_train_steps:
        t0 = time.perf_counter()
        step_loss = 0.0
        for micro in range(config.gradient_accumulation_steps):
            m = step * config.gradient_accumulation_steps + micro
            gen = _step_generator(config.seed, m)
            samples = [data.sample(i, gen) for i in batch_indices(len(data), bs, m, config.seed)]
            pixels = torch.stack([s[0] for s in samples]).to(accelerator.device, torch.float32)
            time_ids = torch.tensor([s[1] for s in samples], device=accelerator.device, dtype=weight_dtype)
            with accelerator.accumulate(*modules.values()):
                with torch.no_grad():
                    latents = vae.encode(pixels).latent_dist.sample(generator=gen)
                latents = (latents * vae.config.scaling_factor).to(weight_dtype)
                noise = torch.randn(latents.shape, generator=gen).to(latents.device, latents.dtype)
                timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (bs,), generator=gen)
                timesteps = timesteps.to(latents.device)
                noisy = scheduler.add_noise(latents, noise, timesteps)
                if config.train_text_encoder:
                    embeds, pooled = _encode_prompt(encoders, token_ids)
                else:
                    embeds, pooled = fixed_embeds, fixed_pooled
                embeds, pooled = embeds.repeat(bs, 1, 1), pooled.repeat(bs, 1)
                pred = unet(noisy, timesteps, embeds, added_cond_kwargs={"time_ids": time_ids, "text_embeds": pooled},
                            return_dict=False)[0]
                if scheduler.config.prediction_type == "v_prediction":
                    target = scheduler.get_velocity(latents, noise, timesteps)
                else:
                    target = noise
                if config.snr_gamma is None:
                    loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
                else:
                    weights = min_snr_weights(scheduler, timesteps, config.snr_gamma)
                    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
                    loss = (loss.mean(dim=list(range(1, loss.ndim))) * weights).mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, MAX_GRAD_NORM)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            step_loss += float(loss.detach()) / config.gradient_accumulation_steps
        if not math.isfinite(step_loss):
            raise FloatingPointError(f"train-lora: the loss became {step_loss} at step {step + 1}; lower "
                                     f"--learning-rate or use --mixed-precision no (last checkpoint kept)")
        step += 1
        losses.append(step_loss)
        step_seconds.append(time.perf_counter() - t0)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}")
        if on_step is not None:
            on_step(step, step_loss)
        if config.checkpointing_steps and step % config.checkpointing_steps == 0 and step < config.max_train_steps:
            _save_checkpoint(out, step, modules, optimizer, losses, step_seconds, config)
    bar.close()
    for module in modules.values():
        module.eval()
    result = _write_final(config, pipes, modules, out, step, losses, step_seconds, image_paths, resume_from,
                          accelerator)
    if keep_pipes:
        result.pipes = pipes
    return result


def _release_accelerator_state(mixed_precision: str) -> None:
    """accelerate keeps one process-wide state and refuses a second Accelerator with another precision; a
    process that trains several LoRAs (a benchmark, a test session) drops that state between trainings. The
    distributed set-up (accelerate's PartialState) is kept."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def _write_final(config: TrainConfig, pipes: Any, modules: dict[str, torch.nn.Module], out: Path, step: int,
                 losses: list[float], step_seconds: list[float], image_paths: list[Path],
                 resume_from: Path | None, accelerator: Any) -> TrainResult:
    """The LoRA in diffusers' format (``save_lora_weights``) and its metadata sidecar, each renamed into place."""
    import tempfile

    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = {name: convert_state_dict_to_diffusers(get_peft_model_state_dict(accelerator.unwrap_model(m)))
              for name, m in modules.items()}
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".save-") as tmp:
        StableDiffusionXLPipeline.save_lora_weights(
            tmp, unet_lora_layers=layers["unet"], text_encoder_lora_layers=layers.get("text_encoder"),
            text_encoder_2_lora_layers=layers.get("text_encoder_2"))
        os.replace(Path(tmp) / WEIGHTS_NAME, out / WEIGHTS_NAME)
    digest = hashlib.sha256((out / WEIGHTS_NAME).read_bytes()).hexdigest()
    meta = {
        "format": "sdxl-bench lora metadata v1",
        "weights": WEIGHTS_NAME,
        "sha256": digest,
        "version_label": config.version_label or f"sha-{digest[:12]}",
        "base_model": config.base,
        "base_source": pipes.base_source,
        "instance_prompt": config.instance_prompt,
        "rank": config.rank,
        "lora_alpha": config.rank,
        "target_modules": {"unet": list(UNET_TARGET_MODULES),
                           **({"text_encoders": list(TEXT_ENCODER_TARGET_MODULES)} if config.train_text_encoder
                              else {})},
        "steps": step,
        "learning_rate": config.learning_rate,
        "dataset": {"folder": str(Path(config.data)), "images": len(image_paths),
                    "sha256": dataset_hash(image_paths)},
        "loss_curve": losses,
        "step_seconds": step_seconds,
        "resumed_from_step": int(resume_from.name[len(CHECKPOINT_PREFIX):]) if resume_from else None,
        "config": config.as_dict(),
        "versions": _versions(),
    }
    write_json_atomic(out / METADATA_NAME, meta)
    return TrainResult(out / WEIGHTS_NAME, out / METADATA_NAME, step, losses, step_seconds,
                       meta["resumed_from_step"])


def _versions() -> dict[str, str]:
    from sdxl_core.provenance import library_versions

    found = library_versions(("torch", "diffusers", "transformers", "peft", "accelerate"))
    return {pkg: v or "not installed" for pkg, v in found.items()}


def config_from_args(args: Any) -> TrainConfig:
    from sdxl_core.presets import default_size

    resolution = args.resolution or default_size(args.base)
    return TrainConfig(
        base=args.base, data=args.data, out=args.out, instance_prompt=args.instance_prompt, resolution=resolution,
        train_batch_size=args.train_batch_size, gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_train_steps=args.max_train_steps, rank=args.rank, learning_rate=args.learning_rate,
        text_encoder_lr=args.text_encoder_lr, mixed_precision=args.mixed_precision, snr_gamma=args.snr_gamma,
        train_text_encoder=args.train_text_encoder, center_crop=args.center_crop, random_flip=args.random_flip,
        seed=args.seed, checkpointing_steps=args.checkpointing_steps,
        checkpoints_total_limit=args.checkpoints_total_limit, resume=args.resume, version_label=args.version_label,
        device=args.device, variant=args.variant)


def main(args: Any) -> int:
    result = train_lora(config_from_args(args), progress=not args.no_progress)
    mean = sum(result.step_seconds) / len(result.step_seconds) if result.step_seconds else float("nan")
    print(f"wrote {result.weights} and {result.metadata}: {result.global_step} steps"
          + (f" (resumed at {result.resumed_from})" if result.resumed_from else "")
          + (f", last loss {result.losses[-1]:.4f}, {mean:.3f} s/step" if result.losses else ""))
    return 0
