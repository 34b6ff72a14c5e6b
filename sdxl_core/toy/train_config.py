"""The settings of ``sdxl-bench train-toy`` (torch-free, so building the CLI parser imports no torch)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from sdxl_core.errors import InvalidConfigError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
#: What the toy models are trained at and generate with by default (the ``toy`` preset's size, steps, guidance).
IMAGE_SIZE = 64
STEPS = 25
GUIDANCE = 5.0


@dataclass(frozen=True)
class ToyTrainConfig:
    """Everything that decides the toy models. Saved in ``training.json``; a resumed stage must match it."""

    out: str = "sdxl_core/toy/weights"  # WEIGHTS_DIR, relative to the repository root (make train-toy)
    work: str = "reports/toy-train"
    seed: int = 0
    world_seed: int = 0  # training scenes; evaluation uses eval_world_seed
    eval_world_seed: int = 1
    pool: int = 24000  # rendered training scenes (re-drawn deterministically on resume)
    threads: int = 2  # each stage records the count it ran with: other counts round differently
    vae_steps: int = 800
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    base_steps: int = 1600
    base_text_steps: int = 1500  # the base continued with text_encoder (CLIP-L) trained along
    text_lr: float = 5e-4
    offset_noise: float = 0.1  # in base_text: noise + offset * N(0, 1) per (image, channel)
    refiner_steps: int = 600
    unet_batch: int = 64
    unet_lr: float = 5e-4
    warmup_steps: int = 100
    snr_gamma: float = 5.0
    cond_dropout: float = 0.1
    clip_steps: int | None = None  # None: sdxl_core.toy.clip's default
    eval_single: int = 200  # held-out single-shape prompts (colour and background accuracy)
    eval_multi: int = 100  # held-out prompts with 2-3 shapes
    eval_steps: int = STEPS
    eval_guidance: float = GUIDANCE

    def check(self) -> None:
        for name in ("pool", "threads", "vae_steps", "vae_batch", "base_steps", "base_text_steps", "refiner_steps",
                     "unet_batch",
                     "eval_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidConfigError(f"train-toy: {name} must be an integer >= 1, got {value!r}")
        if not 0 <= self.cond_dropout < 1:
            raise InvalidConfigError(f"train-toy: cond_dropout {self.cond_dropout} must lie in [0, 1)")
        if self.world_seed == self.eval_world_seed:
            raise InvalidConfigError("train-toy: eval_world_seed must differ from world_seed (held-out scenes)")



def add_arguments(p: Any) -> None:
    d = ToyTrainConfig()
    p.add_argument("--out", default=d.out, help="where the toy pipelines and training.json go (default: the "
                   "package's committed weights folder)")
    p.add_argument("--work", default=d.work, help="stage outputs, for resuming (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (default: %(default)s)")
    for name in ("pool", "vae_steps", "base_steps", "base_text_steps", "refiner_steps", "unet_batch", "eval_single",
                 "eval_multi", "eval_steps"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    p.add_argument("--clip-steps", type=int, default=None, help="toy CLIP steps (default: its module default)")
    p.add_argument("--eval-guidance", type=float, default=d.eval_guidance)


def config_from_args(args: Any) -> ToyTrainConfig:
    fields = {k: getattr(args, k) for k in asdict(ToyTrainConfig()) if hasattr(args, k)}
    return replace(ToyTrainConfig(), **fields)
