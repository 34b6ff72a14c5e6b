"""What sdxl-bench's LoRA trainer costs over a plain peft training loop, per step, on the tiny model.

    python bench/train_lora_overhead.py [--steps 12] [--resolutions 64,128] [--rounds 2] [--out FILE]

Both train the same rank-4 peft adapter on the same tiny SDXL base UNet in the same process, batch 1, with
the same objective (VAE encode, noise, UNet, MSE, backward, clip, AdamW). The plain loop is the minimum
that objective needs; the harness adds accelerate, per-step seeded data and noise, time ids, the loss
record and the progress bar. The first two steps of each run are warm-up and are not counted; the two are
interleaved over ``--rounds`` so drift of the machine hits both. Prints a table; ``--out`` writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WARMUP = 2


def plain_peft_steps(resolution: int, steps: int, seed: int = 0) -> list[float]:
    """Seconds of each step of the shortest honest loop: no accelerate, one fixed image, global RNG."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    from sdxl_core.loading import load_pipelines
    from sdxl_core.lora import UNET_TARGET_MODULES

    torch.manual_seed(seed)
    pipe = load_pipelines("tiny", None, device="cpu", dtype=torch.float32).base
    unet, vae = pipe.unet, pipe.vae
    for m in (unet, vae, pipe.text_encoder, pipe.text_encoder_2):
        m.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=list(UNET_TARGET_MODULES)))
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt("wrong", device="cpu", do_classifier_free_guidance=False)
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)
    pixels = torch.rand(1, 3, resolution, resolution) * 2 - 1
    unet.train()
    seconds = []
    for _ in range(steps):
        t0 = time.perf_counter()
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (1,))
        pred = unet(sched.add_noise(latents, noise, t), t, embeds,
                    added_cond_kwargs={"time_ids": time_ids, "text_embeds": pooled}, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        seconds.append(time.perf_counter() - t0)
    return seconds


def harness_steps(resolution: int, steps: int, data: Path, seed: int = 0) -> list[float]:
    from sdxl_core.train_lora import TrainConfig, train_lora

    with tempfile.TemporaryDirectory() as out:
        result = train_lora(TrainConfig(base="tiny", data=str(data), out=str(Path(out) / "lora"), resolution=resolution,
                                        max_train_steps=steps, seed=seed, device="cpu"), progress=False)
    return result.step_seconds


def _write_images(folder: Path, resolution: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--resolutions", default="64,128")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    p.add_argument("--out", default=None, help="JSON file for the numbers")
    args = p.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    rows = []
    for res in (int(r) for r in args.resolutions.split(",")):
        plain, harness = [], []
        with tempfile.TemporaryDirectory() as data:
            _write_images(Path(data), res)
            for _ in range(args.rounds):
                plain += plain_peft_steps(res, args.steps)[WARMUP:]
                harness += harness_steps(res, args.steps, Path(data))[WARMUP:]
        mp, mh = statistics.median(plain), statistics.median(harness)
        rows.append({"resolution": res, "batch_size": 1, "steps_timed": len(plain), "plain_peft_s_per_step": mp,
                     "harness_s_per_step": mh, "overhead": mh / mp - 1})
    print(f"LoRA training step on the tiny model, batch 1, {torch.get_num_threads()} torch threads, "
          f"{platform.processor() or platform.machine()} ({os.cpu_count()} cpus); median of {rows[0]['steps_timed']} "
          f"steps each")
    print(f"{'resolution':>10s} {'plain peft s/step':>18s} {'harness s/step':>15s} {'overhead':>9s}")
    for r in rows:
        print(f"{r['resolution']:>10d} {r['plain_peft_s_per_step']:>18.4f} {r['harness_s_per_step']:>15.4f} "
              f"{100 * r['overhead']:>8.1f}%")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                                              "threads": torch.get_num_threads(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
