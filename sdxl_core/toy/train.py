"""Train the toy SDXL world (:mod:`sdxl_core.toy.world`) from scratch, on the CPU, seeded: ``make train-toy``.

What is trained, in order (each stage a resumable step; see :func:`train_toy`):

1. ``vae``: a small :class:`~diffusers.AutoencoderKL` (``sdxl_core/configs/toy/vae.json``, downsampling 4, so
   a 64 px image is a 16x16x4 latent) on rendered scenes, L1 reconstruction + a small KL term. Its
   ``scaling_factor`` is then set to ``1 / std`` of the latents, as SDXL's VAE config does.
2. ``base``: the SDXL-architecture base UNet (``addition_embed_type="text_time"``, cross-attention on both
   text encoders' penultimate states, pooled ``text_encoder_2`` projection and the six size/crop time ids) on
   every timestep of SDXL's own noise schedule, epsilon prediction, min-SNR-5 weighting. The text encoders are
   CLIP text models with the real CLIP tokenizer, frozen at their seeded initialisation; prompts are embedded
   with the same compel path generation uses (:class:`sdxl_core.generate.PromptEncoder`). 10% of captions
   are dropped for classifier-free guidance, replaced by what the pipeline uses for "no negative prompt":
   zeros for the base (``force_zeros_for_empty_prompt``).
   ``base_text`` then continues the base with ``text_encoder`` (CLIP-L, which only the base reads) trained
   along, with offset noise (a per-channel constant added to the noise, Guttenberg 2023). SDXL's schedule
   leaves signal at its first inference timestep, so without it the base reads the background colour from
   the mean of the initial noise of a 16x16 latent instead of from the prompt (measured: 21% background
   accuracy, near chance); and frozen random encoders leave it unsure which colour word is the background's.
3. ``refiner``: the refiner UNet (``text_encoder_2`` only, aesthetic-score time ids) on the low-noise end
   (timesteps below 200, the part ``denoising_start=0.8`` hands it). Dropped captions use the refiner's empty
   prompt embedding and the negative aesthetic score 2.5, as its unconditional branch at inference does.
4. ``clip``: a small CLIP in open_clip's format (:mod:`sdxl_core.toy.clip`), trained contrastively.
5. ``eval``: the saved pipelines are loaded back through :func:`sdxl_core.loading.load_pipelines` and judged
   by the oracle on held-out prompts; FID/KID against held-out scenes is compared with the untrained ``tiny``.

The pipelines are written as diffusers folders ``<out>/base`` and ``<out>/refiner`` (fp16 safetensors, loaded
in any dtype), plus ``<out>/training.json``: the resolved config, library versions, seconds and loss curves
per stage and the evaluation. Stage outputs are kept in ``<work>`` so an interrupted run resumes at the stage
it was in.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from sdxl_core.atomicio import write_json_atomic, write_text_atomic
from sdxl_core.errors import InvalidConfigError
from sdxl_core.presets import ArchitectureConfigs, build_components
from sdxl_core.toy.train_config import IMAGE_SIZE, ToyTrainConfig, config_from_args

TOY_CONFIGS = ArchitectureConfigs("toy")
# What the pipelines use at inference (GenerationSettings with the toy defaults): time ids must match.
AESTHETIC_SCORE = 6.0
NEGATIVE_AESTHETIC_SCORE = 2.5
REFINER_MAX_T = 200  # the refiner is trained on timesteps [0, 200): denoising_start=0.8 of 1000


# ----------------------------------------------------------------------------------------------- helpers

def _pool_images(seed: int, n: int) -> tuple[torch.Tensor, list[str]]:
    """``n`` rendered scenes as a uint8 (n, 3, 64, 64) tensor and their captions."""
    from sdxl_core.toy.world import ToyDataset

    images = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    captions = []
    for sample in ToyDataset(seed, n, image_size=IMAGE_SIZE):
        images[sample.index] = np.asarray(sample.image)
        captions.append(sample.caption)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), captions


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(127.5).sub(1.0)


def _lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return f


def _curve(losses: list[float], every: int = 10) -> list[list[float]]:
    """The loss curve as [step, mean loss over the last ``every`` steps] pairs."""
    return [[i + every, float(np.mean(losses[i:i + every]))] for i in range(0, len(losses), every)]


def _versions() -> dict[str, str]:
    from sdxl_core.provenance import library_versions

    return library_versions()


# ----------------------------------------------------------------------------------------------- stages

def train_vae(config: ToyTrainConfig, images: torch.Tensor, log: Callable[[str], None]) -> tuple[Any, dict]:
    """Stage 1: the toy AutoencoderKL. Returns the model (eval mode, scaling factor still 1) and its record."""
    from diffusers import AutoencoderKL

    gen = torch.Generator().manual_seed(config.seed * 1000 + 1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed * 1000 + 1)
        vae = AutoencoderKL.from_config(TOY_CONFIGS.vae())
    vae.train()
    opt = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(config.vae_steps, min(50, config.vae_steps // 10 + 1)))
    losses, t0 = [], time.perf_counter()
    for step in range(config.vae_steps):
        idx = torch.randint(0, images.shape[0], (config.vae_batch,), generator=gen)
        x = _to_unit(images[idx])
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = (rec - x).abs().mean() + config.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"train-toy vae: loss became {losses[-1]} at step {step + 1}; lower vae_lr")
        if (step + 1) % 100 == 0:
            log(f"vae step {step + 1}/{config.vae_steps} loss {np.mean(losses[-100:]):.4f}")
    vae.eval().requires_grad_(False)
    return vae, {"seconds": time.perf_counter() - t0, "loss_curve": _curve(losses), "final_loss": losses[-1]}


@torch.no_grad()
def encode_latents(vae: Any, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image (unscaled)."""
    means, stds = [], []
    for i in range(0, images.shape[0], batch):
        d = vae.encode(_to_unit(images[i:i + batch])).latent_dist
        means.append(d.mean)
        stds.append(d.std)
    return torch.cat(means), torch.cat(stds)


def build_text_side(seed: int) -> Any:
    """The toy pipelines with their (seeded, frozen) text encoders and real tokenizers; UNets untrained."""
    from sdxl_core.loading import Pipelines
    from sdxl_core.presets import _make_pipelines

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        parts = build_components(TOY_CONFIGS, "cpu")
    for module in parts.values():
        module.eval().requires_grad_(False)
    base, refiner = _make_pipelines(parts, TOY_CONFIGS)
    return Pipelines(base, refiner, "toy-train", "toy-train", None)


@torch.no_grad()
def embed_captions(pipes: Any, captions: list[str], batch: int = 256, check: int = 4) -> dict[str, torch.Tensor]:
    """Prompt embeddings of each caption as generation conditions the UNets on them, plus the refiner's
    unconditional embedding (its empty negative prompt).

    Batched through the base pipeline's own ``encode_prompt`` (compel encodes one prompt at a time, far too
    slowly for thousands of captions); for plain prompts the two agree, which is checked on the first
    ``check`` captions against :class:`sdxl_core.generate.PromptEncoder`, the path generation uses.
    """
    from sdxl_core.generate import PromptEncoder

    cpu = torch.device("cpu")
    embeds, pooled = [], []
    for i in range(0, len(captions), batch):
        out = pipes.base.encode_prompt(prompt=captions[i:i + batch], device=cpu, num_images_per_prompt=1,
                                       do_classifier_free_guidance=False)
        embeds.append(out[0])
        pooled.append(out[2])
    text = {"embeds": torch.cat(embeds).float(), "pooled": torch.cat(pooled).float()}
    if check:
        encoder = PromptEncoder(pipes)
        ref = encoder.embed(encoder.base, captions[:check], None)
        diff = max(float((ref["prompt_embeds"] - text["embeds"][:check]).abs().max()),
                   float((ref["pooled_prompt_embeds"] - text["pooled"][:check]).abs().max()))
        if diff > 1e-4:
            raise RuntimeError(f"train-toy: encode_prompt and compel embeddings differ by {diff:.2e} on plain "
                               f"captions; the UNets would be trained on other conditioning than generation uses")
    neg = pipes.refiner.encode_prompt(prompt="", device=cpu, num_images_per_prompt=1,
                                      do_classifier_free_guidance=False)
    text["refiner_uncond_embeds"], text["refiner_uncond_pooled"] = neg[0].float(), neg[2].float()
    return text


def train_unet(config: ToyTrainConfig, role: str, unet: Any, latents: tuple[torch.Tensor, torch.Tensor],
               scaling_factor: float, caption_ids: torch.Tensor, text: dict[str, torch.Tensor],
               log: Callable[[str], None], text_encoder: Any = None, token_ids: torch.Tensor | None = None) -> dict:
    """Stage 2/3: the base (``role="base"``, all timesteps) or refiner (``"refiner"``, t < 200) UNet.

    ``role="base_text"`` continues the base with ``text_encoder`` (CLIP-L, which only the base reads) trained
    along: its penultimate states for ``token_ids`` replace the frozen ones in the first features of the
    prompt embedding, as compel and ``encode_prompt`` compute them."""
    from diffusers import DDPMScheduler

    from sdxl_core.train_lora import min_snr_weights

    scheduler = DDPMScheduler.from_config(TOY_CONFIGS.scheduler())
    steps = {"base": config.base_steps, "base_text": config.base_text_steps, "refiner": config.refiner_steps}[role]
    max_t = REFINER_MAX_T if role == "refiner" else scheduler.config.num_train_timesteps
    gen = torch.Generator().manual_seed(config.seed * 1000 + {"base": 2, "refiner": 3, "base_text": 4}[role])
    mean, std = latents
    bs = config.unet_batch
    if role in ("base", "base_text"):
        embeds_all, pooled_all = text["embeds"], text["pooled"]
        cond_ids = torch.tensor([IMAGE_SIZE, IMAGE_SIZE, 0, 0, IMAGE_SIZE, IMAGE_SIZE], dtype=torch.float32)
        uncond_ids = cond_ids
        uncond_embeds = torch.zeros_like(embeds_all[:1])
        uncond_pooled = torch.zeros_like(pooled_all[:1])
    else:
        width = unet.config.cross_attention_dim
        embeds_all, pooled_all = text["embeds"][..., -width:], text["pooled"]
        cond_ids = torch.tensor([IMAGE_SIZE, IMAGE_SIZE, 0, 0, AESTHETIC_SCORE], dtype=torch.float32)
        uncond_ids = torch.tensor([IMAGE_SIZE, IMAGE_SIZE, 0, 0, NEGATIVE_AESTHETIC_SCORE], dtype=torch.float32)
        uncond_embeds, uncond_pooled = text["refiner_uncond_embeds"], text["refiner_uncond_pooled"]
    unet.train().requires_grad_(True)
    groups = [{"params": list(unet.parameters()), "lr": config.unet_lr}]
    params = list(unet.parameters())
    if text_encoder is not None:
        text_encoder.train().requires_grad_(True)
        groups.append({"params": list(text_encoder.parameters()), "lr": config.text_lr})
        params += list(text_encoder.parameters())
    opt = torch.optim.AdamW(groups, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps, config.warmup_steps))
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, mean.shape[0], (bs,), generator=gen)
        x0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * scaling_factor
        noise = torch.randn(x0.shape, generator=gen)
        if role == "base_text" and config.offset_noise:
            noise = noise + config.offset_noise * torch.randn((bs, x0.shape[1], 1, 1), generator=gen)
        t = torch.randint(0, max_t, (bs,), generator=gen)
        noisy = scheduler.add_noise(x0, noise, t)
        drop = torch.rand(bs, generator=gen) < config.cond_dropout
        cid = caption_ids[idx]
        cond = embeds_all[cid]
        if text_encoder is not None:
            own = text_encoder(token_ids[cid], output_hidden_states=True).hidden_states[-2]
            cond = torch.cat([own, cond[..., own.shape[-1]:]], dim=-1)
        embeds = torch.where(drop[:, None, None], uncond_embeds, cond)
        pooled = torch.where(drop[:, None], uncond_pooled, pooled_all[cid])
        time_ids = torch.where(drop[:, None], uncond_ids, cond_ids)
        pred = unet(noisy, t, embeds, added_cond_kwargs={"time_ids": time_ids, "text_embeds": pooled}).sample
        per = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (per * min_snr_weights(scheduler, t, config.snr_gamma)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(per.mean().detach()))
        if not math.isfinite(losses[-1]):
            raise FloatingPointError(f"train-toy {role}: loss became {losses[-1]} at step {step + 1}; lower unet_lr")
        if (step + 1) % 100 == 0:
            log(f"{role} step {step + 1}/{steps} mse {np.mean(losses[-100:]):.4f}")
    unet.eval().requires_grad_(False)
    if text_encoder is not None:
        text_encoder.eval().requires_grad_(False)
    return {"seconds": time.perf_counter() - t0, "loss_curve": _curve(losses), "final_loss": losses[-1],
            "timesteps": [0, max_t], "threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------- evaluation

def eval_scenes(world_seed: int, single: int, multi: int) -> list[Any]:
    """The first ``single`` one-shape and ``multi`` two/three-shape scenes of the held-out world."""
    from sdxl_core.toy.world import sample_scene

    ones: list[Any] = []
    many: list[Any] = []
    i = 0
    while len(ones) < single or len(many) < multi:
        scene = sample_scene(world_seed, i)
        group, limit = (ones, single) if scene.count == 1 else (many, multi)
        if len(group) < limit:
            group.append(scene)
        i += 1
    return ones + many


def generate_for(pipes: Any, prompts: list[str], seeds: list[int], steps: int, guidance: float,
                 size: int = IMAGE_SIZE) -> list[Any]:
    from sdxl_core.generate import GenerationRequest, GenerationSettings, PromptEncoder, generate

    settings = GenerationSettings(steps=steps, guidance_scale=guidance, width=size, height=size)
    encoder = PromptEncoder(pipes)
    return [generate(pipes, GenerationRequest(prompt=p, seed=s, settings=settings), encoder).images[0]
            for p, s in zip(prompts, seeds)]


def oracle_summary(images: list[Any], scenes: list[Any]) -> dict[str, Any]:
    """Per-check accuracy for single-shape and multi-shape prompts, judged by :func:`sdxl_core.toy.oracle.judge`."""
    from sdxl_core.toy.oracle import CHECKS, judge
    from sdxl_core.toy.world import caption

    groups: dict[str, list[Any]] = {"single": [], "multi": []}
    for image, scene in zip(images, scenes):
        groups["single" if scene.count == 1 else "multi"].append(judge(image, caption(scene)))
    out: dict[str, Any] = {}
    for name, results in groups.items():
        if results:
            out[name] = {"n": len(results), **{c: float(np.mean([getattr(r, c) for r in results])) for c in CHECKS},
                         "correct": float(np.mean([r.correct for r in results]))}
    return out


def set_distances(real: list[Any], fake: list[Any]) -> dict[str, float]:
    """FID and KID on EfficientNet-Lite0 features (offline; not comparable to Inception FID)."""
    from sdxl_core.metrics.features import extract_features, get_feature_network
    from sdxl_core.score import _set_metric_fn, fid_of_features

    net = get_feature_network("effnet-lite0")

    def feats(images: list[Any]) -> np.ndarray:
        batch = torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in images])
        with torch.no_grad():
            return extract_features(net, batch).numpy()

    r, f = feats(real), feats(fake)
    return {"fid": fid_of_features(r, f), "kid": _set_metric_fn("kid")(r, f), "features": "effnet-lite0",
            "n_real": len(real), "n_fake": len(fake)}


def evaluate(config: ToyTrainConfig, base: str | Path, refiner: str | Path,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Load the written pipelines through the real loading path and measure them against the oracle, with FID/KID
    of their images and of the untrained ``tiny`` preset's images against held-out rendered scenes."""
    from sdxl_core.loading import load_pipelines
    from sdxl_core.toy.world import caption, render

    scenes = eval_scenes(config.eval_world_seed, config.eval_single, config.eval_multi)
    prompts = [caption(s) for s in scenes]
    seeds = list(range(len(scenes)))
    t0 = time.perf_counter()
    toy = load_pipelines(str(base), str(refiner), device="cpu", dtype="float32")
    images = generate_for(toy, prompts, seeds, config.eval_steps, config.eval_guidance)
    seconds = time.perf_counter() - t0
    log(f"eval: {len(images)} toy images in {seconds:.1f} s")
    oracle = oracle_summary(images, scenes)
    tiny = load_pipelines("tiny", "tiny", device="cpu", dtype="float32")
    tiny_images = generate_for(tiny, prompts, seeds, config.eval_steps, config.eval_guidance)
    real = [render(s, IMAGE_SIZE) for s in scenes]
    return {"prompts": len(prompts), "steps": config.eval_steps, "guidance_scale": config.eval_guidance,
            "world_seed": config.eval_world_seed, "generation_seconds": seconds, "oracle": oracle,
            "oracle_real_images": oracle_summary(real, scenes),
            "toy_vs_heldout": set_distances(real, images), "tiny_vs_heldout": set_distances(real, tiny_images)}


# ----------------------------------------------------------------------------------------------- orchestration

def _done(folder: Path) -> dict[str, Any] | None:
    record = folder / "record.json"
    return json.loads(record.read_text()) if record.is_file() else None


#: The settings each stage's result depends on (its own and those of the stages it builds on).
_DATA_KEYS = ("seed", "world_seed", "pool")
_VAE_KEYS = _DATA_KEYS + ("vae_steps", "vae_batch", "vae_lr", "kl_weight")
_UNET_KEYS = _VAE_KEYS + ("unet_batch", "unet_lr", "warmup_steps", "snr_gamma", "cond_dropout")
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "vae": _VAE_KEYS, "base": _UNET_KEYS + ("base_steps",), "refiner": _UNET_KEYS + ("refiner_steps",),
    "base_text": _UNET_KEYS + ("base_steps", "base_text_steps", "text_lr", "offset_noise"),
    "clip": ("seed", "clip_steps")}


def _check_stage(record: dict[str, Any], config: ToyTrainConfig, stage: str) -> None:
    saved, now = record.get("config", {}), asdict(config)
    keys = [k for k in STAGE_KEYS[stage] if saved.get(k) != now[k]]
    if keys:
        raise InvalidConfigError(f"train-toy: stage {stage!r} in {config.work} was trained with other settings "
                                 f"({', '.join(keys)}); use the same settings or another --work folder")


def train_toy(config: ToyTrainConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every stage (skipping those already finished in ``config.work``) and write the toy weights to
    ``config.out``. Returns the ``training.json`` document."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file, save_file

    config.check()
    torch.set_num_threads(config.threads)
    work, out = Path(config.work), Path(config.out)
    work.mkdir(parents=True, exist_ok=True)
    cfg = asdict(config)
    started = time.perf_counter()
    log(f"train-toy: rendering {config.pool} scenes (world seed {config.world_seed})")
    images, captions = _pool_images(config.world_seed, config.pool)
    records: dict[str, Any] = {}

    def stage(name: str, run: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
        folder = work / name
        record = _done(folder)
        if record is not None:
            _check_stage(record, config, name)
            log(f"train-toy: {name} already trained in {folder}, reused")
        else:
            folder.mkdir(parents=True, exist_ok=True)
            record = {"config": cfg, **run(folder)}
            write_json_atomic(folder / "record.json", record)
        records[name] = {k: v for k, v in record.items() if k != "config"}
        return record

    def vae_stage(folder: Path) -> dict[str, Any]:
        vae, rec = train_vae(config, images, log)
        mean, std = encode_latents(vae, images)
        rec["scaling_factor"] = float(1.0 / mean.std())
        rec["reconstruction_l1"] = _reconstruction_error(vae, images[:512])
        vae.register_to_config(scaling_factor=rec["scaling_factor"])
        vae.save_pretrained(folder / "model", safe_serialization=True)
        save_file({"mean": mean.contiguous(), "std": std.contiguous()}, str(folder / "latents.safetensors"))
        return rec

    vae_rec = stage("vae", vae_stage)
    vae = AutoencoderKL.from_pretrained(work / "vae" / "model").eval().requires_grad_(False)
    lat = load_file(str(work / "vae" / "latents.safetensors"))
    latents = (lat["mean"], lat["std"])
    pipes = build_text_side(config.seed)
    unique = sorted(set(captions))
    index = {c: i for i, c in enumerate(unique)}
    caption_ids = torch.tensor([index[c] for c in captions])
    log(f"train-toy: embedding {len(unique)} distinct captions")
    text = embed_captions(pipes, unique)
    parts = {"base": pipes.base.unet, "refiner": pipes.refiner.unet}
    for role in ("base", "refiner"):
        def unet_stage(folder: Path, role: str = role) -> dict[str, Any]:
            rec = train_unet(config, role, parts[role], latents, vae_rec["scaling_factor"], caption_ids, text, log)
            parts[role].save_pretrained(folder / "model", safe_serialization=True)
            return rec
        stage(role, unet_stage)
        trained = UNet2DConditionModel.from_pretrained(work / role / "model").eval().requires_grad_(False)
        if role == "base":
            pipes.base.register_modules(unet=trained)
            _base_text_stage(config, stage, pipes, latents, vae_rec["scaling_factor"], unique, caption_ids, text, log)
        else:
            pipes.refiner.register_modules(unet=trained)
    pipes.base.register_modules(vae=vae)
    pipes.refiner.register_modules(vae=vae)
    base_dir, refiner_dir = write_pipelines(pipes, out)
    log(f"train-toy: wrote {base_dir} and {refiner_dir}")

    def clip_stage(folder: Path) -> dict[str, Any]:
        from sdxl_core.toy import clip as toy_clip

        kwargs: dict[str, Any] = {"seed": config.seed, "threads": config.threads}
        if config.clip_steps is not None:
            kwargs["steps"] = config.clip_steps
        result = toy_clip.train_toy_clip(folder / "clip", **kwargs)
        return {"seconds": float(result.get("elapsed_seconds", 0.0)), "result": result}

    stage("clip", clip_stage)
    (out / "clip").mkdir(parents=True, exist_ok=True)
    for f in sorted((work / "clip" / "clip").iterdir()):
        (out / "clip" / f.name).write_bytes(f.read_bytes())
    log("train-toy: evaluating")
    evaluation = evaluate(config, base_dir, refiner_dir, log)
    doc = {"config": cfg, "versions": _versions(), "stages": records, "evaluation": evaluation,
           "seconds_total_this_call": time.perf_counter() - started,
           "seconds_training": sum(float(r.get("seconds", 0.0)) for r in records.values()),
           "sizes_bytes": weights_size(out)}
    write_json_atomic(out / "training.json", doc)
    write_text_atomic(out / "loss_curves.svg", loss_curves_svg(records))
    return doc


def loss_curves_svg(records: dict[str, Any], width: int = 280, height: int = 160) -> str:
    """One small panel per trained stage: its loss curve (``loss_curve`` pairs), log-scaled, as standalone SVG."""
    panels = [(name, rec["loss_curve"]) for name, rec in records.items() if rec.get("loss_curve")]
    clip_curve = records.get("clip", {}).get("result", {}).get("loss_curve")
    if clip_curve:
        panels.append(("clip", [[p["step"], p["loss"]] for p in clip_curve]))
    pad = 28
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width * max(1, len(panels))}" height="{height}" '
             f'font-family="sans-serif" font-size="11">']
    for k, (name, curve) in enumerate(panels):
        xs = [float(p[0]) for p in curve]
        ys = [math.log10(max(float(p[1]), 1e-8)) for p in curve]
        x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
        sx = (width - 2 * pad) / ((x1 - x0) or 1.0)
        sy = (height - 2 * pad) / ((y1 - y0) or 1.0)
        pts = " ".join(f"{k * width + pad + (x - x0) * sx:.1f},{height - pad - (y - y0) * sy:.1f}"
                       for x, y in zip(xs, ys))
        parts.append(f'<text x="{k * width + pad}" y="16">{name}: loss {10 ** y0:.3g} to {10 ** y1:.3g} (log), '
                     f'{int(x1)} steps</text>')
        parts.append(f'<rect x="{k * width + pad}" y="{pad}" width="{width - 2 * pad}" height="{height - 2 * pad}" '
                     f'fill="none" stroke="#ccc"/>')
        parts.append(f'<polyline points="{pts}" fill="none" stroke="#2a6fdb" stroke-width="1.5"/>')
    parts.append("</svg>\n")
    return "\n".join(parts)


def _base_text_stage(config: ToyTrainConfig, stage: Callable[..., dict[str, Any]], pipes: Any,
                     latents: tuple[torch.Tensor, torch.Tensor], scaling_factor: float, unique: list[str],
                     caption_ids: torch.Tensor, text: dict[str, torch.Tensor],
                     log: Callable[[str], None]) -> None:
    """Stage ``base_text``: the base UNet and ``text_encoder`` (CLIP-L, read by the base only) trained together,
    so the base learns which colour word belongs to the shapes and which to the background; the refiner's
    ``text_encoder_2`` stays as it was."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    tok = pipes.base.tokenizer
    token_ids = tok(unique, padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids

    def run(folder: Path) -> dict[str, Any]:
        rec = train_unet(config, "base_text", pipes.base.unet, latents, scaling_factor, caption_ids, text, log,
                         text_encoder=pipes.base.text_encoder, token_ids=token_ids)
        pipes.base.unet.save_pretrained(folder / "model", safe_serialization=True)
        pipes.base.text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
        return rec

    stage("base_text", run)
    folder = Path(config.work) / "base_text"
    pipes.base.register_modules(
        unet=UNet2DConditionModel.from_pretrained(folder / "model").eval().requires_grad_(False),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder").eval().requires_grad_(False))


@torch.no_grad()
def _reconstruction_error(vae: Any, images: torch.Tensor) -> float:
    x = _to_unit(images)
    rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    return float((rec - x).abs().mean() * 127.5)  # mean absolute error in 0-255 units


def write_pipelines(pipes: Any, out: Path) -> tuple[Path, Path]:
    """Save base and refiner as diffusers folders with fp16 weights (half the size; any dtype loads them)."""
    out.mkdir(parents=True, exist_ok=True)
    for pipe in (pipes.base, pipes.refiner):
        pipe.to(torch.float16)
    pipes.base.save_pretrained(out / "base", safe_serialization=True)
    pipes.refiner.save_pretrained(out / "refiner", safe_serialization=True)
    for pipe in (pipes.base, pipes.refiner):
        pipe.to(torch.float32)
    _slim_tokenizers(pipes, out)
    return out / "base", out / "refiner"


def _slim_tokenizers(pipes: Any, out: Path) -> None:
    """Tokenizers as vocab.json + merges.txt (as the SDXL repositories ship them), checked to tokenize alike."""
    from transformers import CLIPTokenizer

    from sdxl_core.tokenizer import write_vocab_files

    probes = ["two small red circles on a blue background", "(wrong)++++, oil on canvas! naive cafe", ""]
    for folder, tok in ((out / "base" / "tokenizer", pipes.base.tokenizer),
                        (out / "base" / "tokenizer_2", pipes.base.tokenizer_2),
                        (out / "refiner" / "tokenizer_2", pipes.refiner.tokenizer_2)):
        write_vocab_files(folder)
        back = CLIPTokenizer.from_pretrained(folder)
        for text in probes:
            if back(text, padding="max_length", max_length=77).input_ids != \
                    tok(text, padding="max_length", max_length=77).input_ids:
                raise RuntimeError(f"train-toy: the tokenizer written to {folder} tokenizes {text!r} differently")


def weights_size(out: Path) -> dict[str, int]:
    """Bytes on disk per top-level folder of the weights, and their total."""
    sizes = {d.name: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
             for d in sorted(out.iterdir()) if d.is_dir()}
    sizes["total"] = sum(sizes.values())
    return sizes


# ----------------------------------------------------------------------------------------------- CLI

def main(args: Any) -> int:
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()  # no per-load progress bars and dtype-cast warnings
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    doc = train_toy(config_from_args(args))
    ev = doc["evaluation"]
    single = ev["oracle"].get("single", {})
    print(f"train-toy: single-shape colour {single.get('colour', float('nan')):.3f}, background "
          f"{single.get('background', float('nan')):.3f}; FID toy {ev['toy_vs_heldout']['fid']:.2f} vs tiny "
          f"{ev['tiny_vs_heldout']['fid']:.2f}; {doc['sizes_bytes']['total'] / 1e6:.1f} MB")
    return 0
