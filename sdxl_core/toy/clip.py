"""A small CLIP in open_clip's own format, trained contrastively on the toy world (:mod:`sdxl_core.toy.world`).

The model is the open_clip architecture ``toy-clip`` (config shipped as ``sdxl_core/configs/toy/toy-clip.json``):
a tiny ModifiedResNet image tower (CLIP's RN50 design at width 8: 3-conv stem, one bottleneck per stage,
attention pooling; 64x64 input), a 2-layer width-32 causal text transformer reading the real CLIP BPE tokens
(context 77, the full 49408-token vocabulary), a 64-d joint embedding and plain GELU (not OpenAI's QuickGELU).
The token embedding is most of the 1.95 M parameters; fp16 weights are about 3.9 MB. A small ViT (64x64,
8x8 patches, width 64, 4 layers) was tried first: it learnt colour, shape, count and size but stayed at
chance on position after 900 steps (its pooled feature is a near-uniform average over patches at
initialisation, and learning *where* the minority-colour patches are took it hundreds of steps even with
direct position labels, which the ResNet learns in under 100). :func:`register_toy_clip` adds the config to
open_clip's registry
(explicitly; importing this module changes nothing); after that every open_clip entry point knows the name, and
``ClipEmbedder("toy-clip", pretrained=FILE)`` (which registers it itself) scores with it like any CLIP::

    from sdxl_core.metrics.clip import ClipEmbedder
    from sdxl_core.toy.clip import TOY_CLIP_WEIGHTS
    emb = ClipEmbedder("toy-clip", pretrained=TOY_CLIP_WEIGHTS)

:func:`train_toy_clip` trains it from scratch on freshly rendered scenes of the world ``seed`` (every step new
scenes, images through the model's own eval preprocess, exactly as :class:`ClipEmbedder` feeds them), with the
symmetric InfoNCE loss over the batch plus hard negatives: for every image, one caption per attribute with
exactly that attribute changed (:func:`one_change_captions`), and every other position of a single shape
(:func:`training_negatives`), join the text side. The weights are saved as an
fp16 safetensors state dict that open_clip's ``create_model_and_transforms("toy-clip", pretrained=FILE)`` loads
(open_clip reads ``.safetensors`` with ``safetensors.torch.load_file`` and copies into the fp32 model).

:func:`eval_toy_clip` measures what the model is for: on held-out scenes (another world seed), how often the
true caption scores above a caption with one changed attribute, per attribute and overall, through
:class:`ClipEmbedder` and :func:`~sdxl_core.metrics.clip.clip_scores_from_embeddings` (the CLIP score path).
The committed weights (``sdxl_core/toy/weights/clip/``) were trained with the defaults of :func:`train_toy_clip`;
their provenance (seed, steps, loss curve, time, evaluation) is the JSON file beside them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from sdxl_core.errors import InvalidConfigError, ModelNotFoundError
from sdxl_core.toy.world import COLOURS, MAX_COUNT, POSITIONS, SHAPES, SIZES, CaptionParams, ToyDataset, caption

if TYPE_CHECKING:
    from sdxl_core.metrics.clip import ClipEmbedder

TOY_CLIP_MODEL = "toy-clip"
#: The open_clip model config (architecture only), shipped as package data.
TOY_CLIP_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "toy" / f"{TOY_CLIP_MODEL}.json"
#: The committed trained weights and their provenance JSON.
TOY_CLIP_WEIGHTS = Path(__file__).resolve().parent / "weights" / "clip" / f"{TOY_CLIP_MODEL}.safetensors"
TOY_CLIP_PROVENANCE = TOY_CLIP_WEIGHTS.with_suffix(".json")
#: Largest weights file we ship (bytes).
MAX_WEIGHTS_BYTES = 5_000_000
#: Attributes a hard-negative caption changes, one at a time (``position`` only exists for single shapes).
ATTRIBUTES: tuple[str, ...] = ("colour", "background", "shape", "count", "size", "position")
#: World seed of the held-out evaluation scenes (the toy world's convention: world 0 trains the toy models,
#: world 1 evaluates them; ``sdxl_core.toy.train_config``); training refuses it.
EVAL_WORLD_SEED = 1

# Defaults of train_toy_clip: the committed weights were trained with exactly these.
DEFAULT_STEPS = 600
DEFAULT_BATCH_SIZE = 128
DEFAULT_SEED = 0
#: One intra-op thread: on a shared 2-core machine a two-thread OpenMP team stalls whenever another process
#: holds a core (measured here: a step 4-5x slower with 2 threads than with 1 while another job ran).
DEFAULT_THREADS = 1
DEFAULT_LR = 2e-3
DEFAULT_WEIGHT_DECAY = 0.05
DEFAULT_WARMUP_FRAC = 0.05
DEFAULT_LOG_EVERY = 10
DEFAULT_EVAL_N = 500


# ----------------------------------------------------------------------------------------------- registry

def register_toy_clip() -> None:
    """Add the ``toy-clip`` config to open_clip's model registry (idempotent; no effect when already there).

    Raises InvalidConfigError when open_clip already knows a *different* model called ``toy-clip``."""
    import open_clip

    ours = json.loads(TOY_CLIP_CONFIG.read_text())
    known = open_clip.get_model_config(TOY_CLIP_MODEL)
    if known is None:
        open_clip.add_model_config(TOY_CLIP_CONFIG)
        known = open_clip.get_model_config(TOY_CLIP_MODEL)
    if known != ours:
        raise InvalidConfigError(
            f"open_clip already has a model config named {TOY_CLIP_MODEL!r} that differs from {TOY_CLIP_CONFIG}; "
            f"remove the other config from open_clip's config paths (open_clip.add_model_config) or rename it")


def create_toy_clip(pretrained: str | os.PathLike | None = None) -> tuple[torch.nn.Module, Any]:
    """(model, eval preprocess) of ``toy-clip`` from open_clip, random init (``pretrained=None``) or a weights
    file, on the CPU in fp32 with plain GELU."""
    import open_clip

    register_toy_clip()
    if pretrained is not None and not Path(pretrained).is_file():
        raise ModelNotFoundError(f"toy CLIP weights file {str(pretrained)!r} does not exist; pass the file that "
                                 f"train_toy_clip wrote (OUT/{TOY_CLIP_MODEL}.safetensors) or {TOY_CLIP_WEIGHTS}")
    model, _, preprocess = open_clip.create_model_and_transforms(
        TOY_CLIP_MODEL, pretrained=str(pretrained) if pretrained is not None else None, device="cpu",
        force_quick_gelu=False)
    return model, preprocess


# ----------------------------------------------------------------------------------------------- captions

def _with(p: CaptionParams, **change: Any) -> CaptionParams:
    return dataclasses.replace(p.params, **change)


def change_options(params: CaptionParams, attribute: str) -> list[CaptionParams]:
    """Every valid caption that differs from ``params`` in ``attribute`` only (a shape colour never equals the
    background). Changing the count of a single shape to 2-3 drops its position (plural captions have none);
    changing 2-3 shapes to one gives each position in turn. ``position`` has no options for counts 2-3."""
    if attribute == "colour":
        return [_with(params, colour=c) for c in COLOURS if c not in (params.colour, params.background)]
    if attribute == "background":
        return [_with(params, background=c) for c in COLOURS if c not in (params.colour, params.background)]
    if attribute == "shape":
        return [_with(params, shape=s) for s in SHAPES if s != params.shape]
    if attribute == "size":
        return [_with(params, size=s) for s in SIZES if s != params.size]
    if attribute == "count":
        out = []
        for k in range(1, MAX_COUNT + 1):
            if k == params.count:
                continue
            if k == 1:
                out.extend(_with(params, count=1, position=pos) for pos in POSITIONS)
            else:
                out.append(_with(params, count=k, position=None))
        return out
    if attribute == "position":
        if params.count != 1:
            return []
        return [_with(params, position=pos) for pos in POSITIONS if pos != params.position]
    raise InvalidConfigError(f"unknown attribute {attribute!r}; expected one of {ATTRIBUTES}")


def one_change_captions(params: CaptionParams, rng: np.random.Generator) -> dict[str, str]:
    """One caption per applicable attribute (:data:`ATTRIBUTES` order), each with exactly that attribute
    changed, drawn uniformly from :func:`change_options` with ``rng``."""
    out = {}
    for attribute in ATTRIBUTES:
        options = change_options(params, attribute)
        if options:
            out[attribute] = caption(options[int(rng.integers(len(options)))])
    return out


def training_negatives(params: CaptionParams, rng: np.random.Generator) -> list[str]:
    """The hard-negative captions of one training image: :func:`one_change_captions`, plus every other
    position of a single shape (only a third of the scenes carry a position, and a caption pair that differs
    in it only is rare within a batch, so it gets all its alternatives)."""
    out = one_change_captions(params, rng)
    out.pop("position", None)
    return list(out.values()) + [caption(p) for p in change_options(params, "position")]


# ----------------------------------------------------------------------------------------------- training

class _Tokens:
    """Token ids per caption with a cache (the world has a few thousand captions)."""

    def __init__(self) -> None:
        import open_clip

        self.tokenizer = open_clip.get_tokenizer(TOY_CLIP_MODEL)
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, L) ids, cut after the longest text's end token (L <= context length)."""
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            for t, ids in zip(missing, self.tokenizer(missing)):
                self.cache[t] = ids
        ids = torch.stack([self.cache[t] for t in texts])
        return ids[:, :int((ids != 0).sum(1).max())]


def encode_text_prefix(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Unnormalised text features of open_clip ``CLIP.encode_text`` for ids cut to their first L positions.

    The causal mask means a token only sees the ones before it, and the pooled feature is the end token's, so the
    padding after the longest end token changes nothing: this equals ``model.encode_text`` on the full
    context (tested), at L/77 of the cost. Used in training only; scoring uses ``encode_text`` itself."""
    n = ids.shape[1]
    x = model.token_embedding(ids) + model.positional_embedding[:n]
    x = model.transformer(x, attn_mask=model.attn_mask[:n, :n])
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0]), ids.argmax(dim=-1)]
    return x @ model.text_projection if isinstance(model.text_projection, torch.Tensor) else model.text_projection(x)


def _batch(ds: ToyDataset, start: int, batch_size: int, preprocess: Any, tokens: _Tokens, seed: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pixels (B,3,S,S), text ids (U,L) of the unique captions, index of each image's caption (B,),
    same-caption mask (B,B)) for scenes ``start .. start + batch_size - 1``."""
    pixels, own, texts = [], [], []
    for i in range(start, start + batch_size):
        sample = ds[i]
        pixels.append(preprocess(sample.image))
        own.append(sample.caption)
        rng = np.random.default_rng([seed, i, 1])
        texts.append(sample.caption)
        texts.extend(training_negatives(sample.scene.params, rng))
    unique = list(dict.fromkeys(texts))
    where = {t: k for k, t in enumerate(unique)}
    target = torch.tensor([where[t] for t in own])
    same = target[:, None] == target[None, :]
    return torch.stack(pixels), tokens(unique), target, same


def _loss(model: torch.nn.Module, pixels: torch.Tensor, ids: torch.Tensor, target: torch.Tensor,
          same: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: image -> all unique texts (true captions of the batch + hard negatives), and each
    image's caption -> the images (other images with the same caption masked out, they are not negatives)."""
    img = torch.nn.functional.normalize(model.encode_image(pixels), dim=-1)
    txt = torch.nn.functional.normalize(encode_text_prefix(model, ids), dim=-1)
    scale = model.logit_scale.exp().clamp(max=100.0)
    i2t = scale * img @ txt.T
    t2i = scale * txt[target] @ img.T
    eye = torch.eye(len(target), dtype=torch.bool)
    t2i = t2i.masked_fill(same & ~eye, float("-inf"))
    labels = torch.arange(len(target))
    return 0.5 * (torch.nn.functional.cross_entropy(i2t, target) + torch.nn.functional.cross_entropy(t2i, labels))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on gains, biases, embeddings or the logit scale)."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.ndim >= 2 and "embedding" not in name:
            decay.append(p)
        else:
            plain.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def _fp16_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous()
            for k, v in model.state_dict().items()}


def train_toy_clip(out_dir: str | os.PathLike, *, steps: int = DEFAULT_STEPS, batch_size: int = DEFAULT_BATCH_SIZE,
                   seed: int = DEFAULT_SEED, threads: int = DEFAULT_THREADS, image_size: int = 64,
                   lr: float = DEFAULT_LR, weight_decay: float = DEFAULT_WEIGHT_DECAY,
                   log_every: int = DEFAULT_LOG_EVERY, eval_n: int = DEFAULT_EVAL_N) -> dict[str, Any]:
    """Train ``toy-clip`` from scratch and write ``out_dir/toy-clip.safetensors`` (fp16 state dict) and
    ``out_dir/toy-clip.json`` (provenance); returns the provenance dict.

    Deterministic for ``(seed, threads)``: ``seed`` is both the world seed of the training scenes (step ``s``
    uses scenes ``s * batch_size ...``, each rendered at ``image_size``) and the seed of the initialisation and
    the hard negatives. ``torch.set_num_threads(threads)`` holds while training and evaluating (restored
    after); another thread count may round differently, so reproduce the committed weights with the defaults.
    AdamW with linear warm-up and cosine decay. The loss (mean over each ``log_every`` steps) is recorded; at
    the end the saved file is evaluated with :func:`eval_toy_clip` on ``eval_n`` held-out scenes (0: skipped).
    """
    import open_clip
    from safetensors.torch import save as save_safetensors

    from sdxl_core.atomicio import write_bytes_atomic, write_json_atomic
    from sdxl_core.provenance import library_versions

    for name, value, low in (("steps", steps, 1), ("batch_size", batch_size, 2), ("threads", threads, 1),
                             ("log_every", log_every, 1), ("eval_n", eval_n, 0), ("seed", seed, 0)):
        if int(value) < low:
            raise InvalidConfigError(f"train_toy_clip {name}={value} must be >= {low}")
    if seed == EVAL_WORLD_SEED:
        raise InvalidConfigError(f"seed {seed} is the held-out evaluation world (EVAL_WORLD_SEED); train with "
                                 f"another seed")
    register_toy_clip()
    model_size = open_clip.get_model_config(TOY_CLIP_MODEL)["vision_cfg"]["image_size"]
    if image_size != model_size:
        raise InvalidConfigError(f"image_size {image_size} differs from the toy-clip input size {model_size}; "
                                 f"render at {model_size} (the model's preprocess would resize otherwise)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    t0 = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model, preprocess = create_toy_clip()
        model.train()
        opt = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
        warmup = max(1, round(DEFAULT_WARMUP_FRAC * steps))

        def lr_at(step: int) -> float:
            if step < warmup:
                return lr * (step + 1) / warmup
            return lr * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

        ds = ToyDataset(seed, image_size=image_size)
        tokens = _Tokens()
        curve: list[dict[str, float]] = []
        window: list[float] = []
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            batch = _batch(ds, step * batch_size, batch_size, preprocess, tokens, seed)
            loss = _loss(model, *batch)
            if not torch.isfinite(loss):
                raise InvalidConfigError(f"toy CLIP training diverged at step {step} (loss {loss.item()}); "
                                         f"lower lr (now {lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            window.append(float(loss.item()))
            if len(window) == log_every or step == steps - 1:
                curve.append({"step": step + 1, "loss": round(float(np.mean(window)), 5),
                              "elapsed_s": round(time.perf_counter() - t0, 2)})
                window = []
        train_s = time.perf_counter() - t0
        state = _fp16_state_dict(model)
        weights = out_dir / f"{TOY_CLIP_MODEL}.safetensors"
        meta = {"format": "open_clip state dict", "model": TOY_CLIP_MODEL, "seed": str(seed), "steps": str(steps)}
        write_bytes_atomic(weights, save_safetensors(state, metadata=meta))
        versions = library_versions(("torch", "open-clip-torch", "safetensors", "sdxl-bench"))
        record: dict[str, Any] = {
            "model": TOY_CLIP_MODEL, "config": json.loads(TOY_CLIP_CONFIG.read_text()),
            "weights": weights.name, "weights_bytes": weights.stat().st_size, "dtype": "float16",
            "n_params": int(sum(p.numel() for p in model.parameters())),
            "seed": seed, "world_seed": seed, "steps": steps, "batch_size": batch_size, "threads": threads,
            "image_size": image_size, "lr": lr, "weight_decay": weight_decay, "warmup_steps": warmup,
            "schedule": "linear warm-up, cosine decay to 0", "optimizer": "AdamW(betas=(0.9, 0.98), eps=1e-6)",
            "loss": "symmetric InfoNCE; text negatives: the batch captions + training_negatives() per image",
            "hard_negative_attributes": list(ATTRIBUTES), "log_every": log_every, "loss_curve": curve,
            "train_seconds": round(train_s, 1), "torch": versions["torch"], "open_clip": versions["open-clip-torch"],
            "versions": versions,
        }
        if eval_n:
            record["eval"] = eval_toy_clip(weights, n=eval_n, seed=EVAL_WORLD_SEED)
        record["elapsed_seconds"] = round(time.perf_counter() - t0, 1)
    finally:
        torch.set_num_threads(prev_threads)
    write_json_atomic(out_dir / f"{TOY_CLIP_MODEL}.json", record)
    return record


# ----------------------------------------------------------------------------------------------- evaluation

def toy_clip_embedder(model_or_path: "ClipEmbedder | str | os.PathLike" = TOY_CLIP_WEIGHTS) -> "ClipEmbedder":
    """A :class:`ClipEmbedder` of ``toy-clip``: the one given, or one loading the weights file (CPU)."""
    from sdxl_core.metrics.clip import ClipEmbedder

    if isinstance(model_or_path, ClipEmbedder):
        if model_or_path.model_name != TOY_CLIP_MODEL:
            raise InvalidConfigError(f"eval_toy_clip got a ClipEmbedder of {model_or_path.model_name!r}; pass one "
                                     f"of {TOY_CLIP_MODEL!r} or a toy-clip weights file")
        return model_or_path
    if not isinstance(model_or_path, (str, os.PathLike)):
        raise InvalidConfigError(f"eval_toy_clip takes a ClipEmbedder or a weights file path, not "
                                 f"{type(model_or_path).__name__}")
    return ClipEmbedder(TOY_CLIP_MODEL, pretrained=model_or_path, device="cpu")


def eval_toy_clip(model_or_path: "ClipEmbedder | str | os.PathLike" = TOY_CLIP_WEIGHTS, n: int = DEFAULT_EVAL_N,
                  seed: int = EVAL_WORLD_SEED) -> dict[str, Any]:
    """Caption ranking on ``n`` scenes of world ``seed``: for each scene and each applicable attribute
    (:data:`ATTRIBUTES`; ``position`` for single shapes only), one caption with that attribute changed
    (:func:`one_change_captions`, drawn with ``default_rng([seed, index, 2])``) is a case; the case passes when
    the true caption's CLIP score (:func:`clip_scores_from_embeddings`, the scoring path) is strictly higher.

    Returns ``{"n_scenes", "n_cases", "world_seed", "overall", "per_attribute": {attr: accuracy},
    "cases_per_attribute", "all_attributes" (scenes whose true caption beats all its negatives),
    "mean_true_score", "model"}``."""
    from sdxl_core.metrics.clip import clip_scores_from_embeddings

    if n < 1:
        raise InvalidConfigError(f"eval_toy_clip n={n} must be >= 1")
    emb = toy_clip_embedder(model_or_path)
    ds = ToyDataset(seed, n, image_size=int(_model_image_size(emb)))
    samples = list(ds)
    negatives = [one_change_captions(s.scene.params, np.random.default_rng([seed, s.index, 2])) for s in samples]
    texts = list(dict.fromkeys([s.caption for s in samples] + [t for neg in negatives for t in neg.values()]))
    where = {t: k for k, t in enumerate(texts)}
    text_emb = emb.encode_texts(texts)
    img_emb = emb.encode_images([s.image for s in samples])
    true_score = clip_scores_from_embeddings(img_emb, text_emb[[where[s.caption] for s in samples]])
    wins: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
    all_ok = []
    for i, neg in enumerate(negatives):
        attrs = list(neg)
        neg_score = clip_scores_from_embeddings(img_emb[i].expand(len(attrs), -1),
                                                text_emb[[where[neg[a]] for a in attrs]])
        ok = (true_score[i] > neg_score).tolist()
        for a, passed in zip(attrs, ok):
            wins[a].append(bool(passed))
        all_ok.append(all(ok))
    n_cases = sum(len(v) for v in wins.values())
    return {
        "n_scenes": n, "n_cases": n_cases, "world_seed": seed,
        "overall": round(sum(sum(v) for v in wins.values()) / n_cases, 4),
        "per_attribute": {a: round(sum(v) / len(v), 4) for a, v in wins.items() if v},
        "cases_per_attribute": {a: len(v) for a, v in wins.items()},
        "all_attributes": round(float(np.mean(all_ok)), 4),
        "mean_true_score": round(float(true_score.mean()), 3),
        "model": emb.description,
    }


def _model_image_size(emb: "ClipEmbedder") -> int:
    size = emb.model.visual.image_size
    return int(size if isinstance(size, int) else size[0])
