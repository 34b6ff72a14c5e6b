"""CLIP score with open_clip: how well each image matches its prompt, plus a reusable CLIP image/text embedder.

Score (Hessel et al. 2021, as torchmetrics' ``CLIPScore`` defines it): per image/prompt pair
``100 * max(cos(E_image, E_text), 0)`` with L2-normalised open_clip embeddings; :class:`ClipScore` keeps every
per-image value and returns the mean with them. It is implemented on open_clip directly because torchmetrics
1.9's ``CLIPScore`` breaks with transformers 5.

Weights. The real-run default is ``ViT-L-14`` with the ``openai`` weights. Nothing is downloaded while
``HF_HUB_OFFLINE`` is set: the weights file of a pretrained tag is looked up in the Hugging Face hub cache and in
open_clip's own cache (``~/.cache/clip``) *before* open_clip is called, and a missing file raises
:class:`~sdxl_core.errors.MissingDependencyError` naming the file and the fix instead of a network traceback.
A local weights file (``.bin``/``.pt``/``.pth``/``.safetensors``) is passed as ``pretrained=PATH`` (or
``clip_weights=PATH``) and loaded by open_clip's own ``create_model_and_transforms(name, pretrained=PATH)``.
OpenAI weights were trained with QuickGELU: the ``openai`` tag sets it; for an OpenAI weights *file* use the
``-quickgelu`` model name (``ViT-L-14-quickgelu``) or ``quick_gelu=True``. ``toy-clip`` is the toy world's
small CLIP (:mod:`sdxl_core.toy.clip`; config in sdxl_core, registered with open_clip on first use, plain GELU):
``ClipEmbedder("toy-clip", pretrained=sdxl_core.toy.clip.TOY_CLIP_WEIGHTS)``.

Smoke mode (``smoke=True``, explicit opt-in) builds a randomly initialised, seeded model of the same
architecture so the plumbing runs without any weights. Its values mean nothing: results carry
``smoke: True`` and ``MetricInfo.label == "smoke"``. The tokenizer is always the real CLIP BPE one (open_clip
ships the vocabulary).

Prompts. Compel weighting syntax (``(oil on canvas)+++``, ``word-``, ``(word)1.3``, ``("a", "b").blend(..)``,
``.and()``, ``.swap()``) is stripped to plain text with :func:`plain_prompt` before scoring, because CLIP reads
plain text: the ``+``/``(...)1.3`` markers would otherwise become tokens. Prompts longer than the text
context (77 tokens, start/end tokens included) are truncated by open_clip; every truncation is recorded in the
result (which image, the prompt, its token count), not only logged.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torchmetrics import Metric

from sdxl_core.errors import InvalidConfigError, MissingDependencyError, ModelNotFoundError
from sdxl_core.metrics.meta import MetricInfo

log = logging.getLogger(__name__)

DEFAULT_CLIP_MODEL = "ViT-L-14"
DEFAULT_CLIP_PRETRAINED = "openai"
WEIGHT_FILE_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".npz")
_FIX = ("pass a local weights file (clip_weights=FILE; sdxl-bench score --clip-pretrained FILE; pytest "
        "--sdxl-clip-model MODEL:FILE), or name the tag to allow a download (--clip-pretrained openai; "
        "--sdxl-clip-model ViT-L-14:openai)")


# ----------------------------------------------------------------------------------------------- prompts

def plain_prompt(text: str) -> str:
    """The prompt as plain text, with compel's weighting syntax removed (what CLIP should read).

    Parsed with compel's own prompt parser, so the text is the one compel conditioned the generation on:
    ``"a wolf, (oil on canvas)+++, detailed"`` -> ``"a wolf, oil on canvas, detailed"``; ``"(word)1.3 cat"`` ->
    ``"word cat"``; ``"red+ apple--"`` -> ``"red apple"``; ``.blend()``/``.and()`` prompts are joined with
    ``", "``; ``.swap(x)`` keeps the replacement text; escaped ``\\(`` stays as a literal parenthesis. Note
    that compel also reads ``c++`` as ``c`` with weight 1.21, so it becomes ``"c"`` here too. Text that
    compel cannot parse falls back to a regex strip of ``(...)`` + ``+``/``-``/number markers.
    """
    if not isinstance(text, str):
        raise InvalidConfigError(f"prompt {text!r} is not a string; pass the prompt text")
    try:
        from sdxl_core.prompt_check import compel_parser, parse_cache_released

        with parse_cache_released():
            conjunction = compel_parser().parse_conjunction(text)
        parts = [_flatten_compel(p) for p in conjunction.prompts]
        out = ", ".join(p for p in parts if p)
    except Exception:  # noqa: BLE001 - any parser failure: strip with the simple rules instead
        out = _regex_plain(text)
    return _tidy(out)


def _flatten_compel(node: Any) -> str:
    name = type(node).__name__
    if name == "Fragment":
        return node.text
    if name == "Blend":
        return ", ".join(_flatten_compel(p) for p in node.prompts)
    if name == "CrossAttentionControlSubstitute":
        return " ".join(_flatten_compel(f) for f in node.edited)
    children = getattr(node, "children", None)
    if children is not None:
        return " ".join(_flatten_compel(c) for c in children)
    return str(getattr(node, "text", ""))


def _regex_plain(text: str) -> str:
    prev = None
    while prev != text:
        prev = text
        text = re.sub(r"\(([^()]*)\)(?:[+-]+|\d+(?:\.\d+)?)?", r"\1", text)
    return re.sub(r"(?<=\w)[+-]+(?=\s|,|$)", "", text)


def _tidy(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    return re.sub(r",(\s*,)+", ",", text).strip(" ,")


# ----------------------------------------------------------------------------------------------- weights

def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (``HF_HUB_CACHE``, ``HF_HOME``, ``XDG_CACHE_HOME``)."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")), "huggingface")
    return Path(home).expanduser() / "hub"


def open_clip_cache_dir() -> Path:
    """Where open_clip keeps weights downloaded from a URL (``~/.cache/clip``)."""
    return Path(os.path.expanduser("~/.cache/clip"))


def _looks_like_path(value: str) -> bool:
    return (os.sep in value or "/" in value or value.startswith(("~", "."))
            or value.lower().endswith(WEIGHT_FILE_SUFFIXES) or os.path.exists(value))


def _check_model_name(model_name: str) -> None:
    import open_clip

    if not isinstance(model_name, str) or not model_name.strip():
        raise InvalidConfigError(f"CLIP model name {model_name!r} is empty; pass an open_clip model such as "
                                 f"{DEFAULT_CLIP_MODEL!r} (model_name=... / --sdxl-clip-model)")
    if model_name.startswith(("hf-hub:", "local-dir:")):
        raise InvalidConfigError(f"CLIP model {model_name!r}: hf-hub:/local-dir: sources are not supported; pass a "
                                 f"built-in open_clip model name (e.g. {DEFAULT_CLIP_MODEL!r}) and a weights file "
                                 f"with clip_weights=FILE (sdxl-bench score --clip-pretrained FILE)")
    if model_name == "toy-clip":  # the toy world's CLIP: its config ships with sdxl_core, not with open_clip
        from sdxl_core.toy.clip import register_toy_clip

        register_toy_clip()
    if open_clip.get_model_config(model_name) is None:
        import difflib

        close = difflib.get_close_matches(model_name, open_clip.list_models(), n=5, cutoff=0.5)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise InvalidConfigError(f"CLIP model {model_name!r} is not an open_clip model{hint}; see "
                                 f"open_clip.list_models() (model_name=... / --sdxl-clip-model)")


def _cached_weight_candidates(cfg: dict, cache_dir: str | os.PathLike | None) -> tuple[list[str], list[Path]]:
    """(what open_clip would fetch, the local paths where it may already be) for one pretrained-tag config."""
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    wanted: list[str] = []
    found: list[Path] = []
    hub = cfg.get("hf_hub", "")
    if hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hub)  # "org/name/" -> default file, as open_clip reads it
        filename = filename or HF_WEIGHTS_NAME
        names = [filename]
        if filename == HF_WEIGHTS_NAME:
            names.insert(0, HF_SAFE_WEIGHTS_NAME)
        elif filename.endswith((".bin", ".pth")):
            names.insert(0, filename[:-4] + ".safetensors")
        wanted.append(f"{' or '.join(names)} from the Hugging Face hub repo {repo_id}")
        dirs = [Path(cache_dir).expanduser()] if cache_dir else []
        dirs.append(hf_hub_cache_dir())
        for d in dirs:
            for name in names:
                try:
                    hit = try_to_load_from_cache(repo_id, name, cache_dir=str(d))
                except Exception:  # noqa: BLE001 - an unreadable cache is a miss
                    hit = None
                if isinstance(hit, str) and os.path.isfile(hit):
                    found.append(Path(hit))
    url = cfg.get("url", "")
    if url:
        base = os.path.basename(url)
        wanted.append(f"{base} ({url})")
        dirs = [Path(cache_dir).expanduser()] if cache_dir else []
        dirs.append(open_clip_cache_dir())
        found.extend(d / base for d in dirs if (d / base).is_file())
    return wanted, found


def resolve_clip_weights(model_name: str, pretrained: str, *, cache_dir: str | os.PathLike | None = None,
                         allow_download: bool | None = None) -> tuple[str, dict]:
    """Check that ``pretrained`` (a tag or a file) can be loaded for ``model_name`` without surprises.

    Returns ``(source, tag_cfg)``: ``source`` is a local file path (for a tag: the cached file) or, only when
    downloads are allowed and nothing is cached, the tag itself for open_clip to download; ``tag_cfg`` is
    open_clip's pretrained config of the tag (``{}`` for a file). ``allow_download`` defaults to
    "``HF_HUB_OFFLINE`` is not set". Raises ModelNotFoundError (bad file), InvalidConfigError (unknown
    model/tag) or MissingDependencyError (tag weights not on this machine), each naming the fix.
    """
    import open_clip

    _check_model_name(model_name)
    if not isinstance(pretrained, (str, os.PathLike)) or not str(pretrained).strip():
        raise InvalidConfigError(f"CLIP pretrained {pretrained!r} is empty; pass a tag such as "
                                 f"{DEFAULT_CLIP_PRETRAINED!r}, or {_FIX}, or use smoke=True for random weights")
    pretrained = str(pretrained)
    if _looks_like_path(pretrained) and not open_clip.get_pretrained_cfg(model_name, pretrained):
        path = Path(pretrained).expanduser()
        if not path.is_file():
            what = "is a folder, not a file" if path.is_dir() else "does not exist"
            raise ModelNotFoundError(f"CLIP weights file {str(path)!r} {what}; {_FIX} that exists "
                                     f"({'/'.join(WEIGHT_FILE_SUFFIXES)}), or a pretrained tag of {model_name!r}")
        return str(path.resolve()), {}
    cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise InvalidConfigError(
            f"CLIP pretrained tag {pretrained!r} is not known for model {model_name!r} "
            f"(known tags: {', '.join(tags) if tags else 'none'}); pass one of them, or {_FIX}")
    if "file" in cfg:
        if os.path.isfile(cfg["file"]):
            return cfg["file"], cfg
        raise ModelNotFoundError(f"CLIP weights file {cfg['file']!r} registered for {model_name}/{pretrained} does not "
                                 f"exist; {_FIX}")
    wanted, found = _cached_weight_candidates(cfg, cache_dir)
    if found:
        return str(found[0]), cfg
    if allow_download is None:
        allow_download = not _offline()
    if allow_download:
        return pretrained, cfg
    places = [str(hf_hub_cache_dir()), str(open_clip_cache_dir())]
    if cache_dir:
        places.insert(0, str(Path(cache_dir).expanduser()))
    why = "HF_HUB_OFFLINE is set" if _offline() else "downloads are off (allow_download=False)"
    raise MissingDependencyError(
        f"CLIP weights for model {model_name!r} with pretrained tag {pretrained!r} are not on this machine and "
        f"{why}, so they are not downloaded. Needed: {'; or '.join(wanted)}. "
        f"Fix: {_FIX}, or place it in {' or '.join(places)} (e.g. once with network: "
        f"huggingface-cli download {os.path.split(cfg.get('hf_hub', ''))[0] or '<repo>'}); "
        f"for a plumbing-only run use smoke=True (random weights; values are labelled smoke, not CLIP scores)")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


# ----------------------------------------------------------------------------------------------- embedder

class ClipEmbedder:
    """An open_clip model with its eval preprocess and tokenizer: L2-normalised image and text embeddings.

    ``ClipEmbedder()`` is ViT-L-14/openai (needs the weights, see the module doc); ``pretrained`` takes an
    open_clip tag or a weights file path (``clip_weights`` is an alias for the file); ``smoke=True`` gives
    a randomly initialised model (seeded with ``seed``, deterministic) and must not be combined with weights.
    Images are PIL images, HxWx3 uint8 arrays, or tensors (N,3,H,W)/(3,H,W): uint8, or float in [0, 1].
    Every image goes through open_clip's own preprocess (resize shortest side, center crop, normalise);
    tensors and arrays are turned into PIL images first so all inputs are treated identically.
    """

    def __init__(self, model_name: str = DEFAULT_CLIP_MODEL, pretrained: str | os.PathLike | None = None, *,
                 clip_weights: str | os.PathLike | None = None, smoke: bool = False, seed: int = 0,
                 device: str | torch.device | None = None, cache_dir: str | os.PathLike | None = None,
                 quick_gelu: bool | None = None, batch_size: int = 32, allow_download: bool | None = None) -> None:
        import open_clip

        if batch_size < 1:
            raise InvalidConfigError(f"CLIP batch_size {batch_size} must be >= 1")
        if clip_weights is not None and pretrained is not None and str(pretrained) != str(clip_weights):
            raise InvalidConfigError(f"both pretrained={str(pretrained)!r} and clip_weights={str(clip_weights)!r} "
                                     f"given; pass only one of them")
        if clip_weights is not None:
            pretrained = clip_weights
        _check_model_name(model_name)
        self.model_name = model_name
        self.smoke = bool(smoke)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        tag_cfg: dict = {}
        if self.smoke:
            if pretrained is not None:
                raise InvalidConfigError(
                    f"smoke=True builds a randomly initialised CLIP, but weights were given ({str(pretrained)!r}); "
                    f"drop smoke to score with the weights, or drop pretrained/clip_weights for a smoke run")
            self.pretrained = None
            source = None
            self.weights_file = None
        else:
            pretrained = DEFAULT_CLIP_PRETRAINED if pretrained is None else pretrained
            source, tag_cfg = resolve_clip_weights(model_name, str(pretrained), cache_dir=cache_dir,
                                                   allow_download=allow_download)
            self.pretrained = str(pretrained) if tag_cfg else source
        #: the local file the weights come from (a cached tag file or the given file); None for smoke/download
        self.weights_file = source if source is not None and os.path.isfile(source) else None
        if quick_gelu is None:
            quick_gelu = bool(tag_cfg.get("quick_gelu", False))
        elif quick_gelu and model_name == "toy-clip":
            raise InvalidConfigError("toy-clip was trained with plain GELU (its config says quick_gelu false); "
                                     "drop quick_gelu=True, which would change every embedding")
        pre_kw = {}
        for key, arg in (("mean", "image_mean"), ("std", "image_std"), ("interpolation", "image_interpolation"),
                         ("resize_mode", "image_resize_mode")):
            if tag_cfg.get(key) is not None:
                pre_kw[arg] = tag_cfg[key]
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                model, _, preprocess = open_clip.create_model_and_transforms(
                    model_name, pretrained=source, device="cpu", force_quick_gelu=quick_gelu,
                    pretrained_image=False, pretrained_text=False, cache_dir=str(cache_dir) if cache_dir else None,
                    **pre_kw)
        except (InvalidConfigError, MissingDependencyError, ModelNotFoundError):
            raise
        except Exception as exc:  # noqa: BLE001 - turn open_clip's errors into ones that name the fix
            if source is not None and os.path.isfile(source):
                raise ModelNotFoundError(
                    f"CLIP weights file {source!r} does not load into open_clip model {model_name!r} ({_short(exc)}); "
                    f"pass the model the file belongs to (model_name=... / --sdxl-clip-model), or {_FIX}") from None
            if source is not None:  # a tag to download (network allowed) that failed
                raise MissingDependencyError(
                    f"CLIP weights for {model_name!r} pretrained={source!r} could not be downloaded ({_short(exc)}); "
                    f"{_FIX}, or place the file in {hf_hub_cache_dir()} or {open_clip_cache_dir()}") from None
            raise MissingDependencyError(f"open_clip could not build {model_name!r} ({_short(exc)}); pick a model "
                                         f"whose config is built in (e.g. {DEFAULT_CLIP_MODEL!r})") from None
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.preprocess = preprocess
        try:
            self.tokenizer = open_clip.get_tokenizer(model_name)
        except Exception as exc:  # noqa: BLE001 - e.g. an HF tokenizer that is not cached offline
            raise MissingDependencyError(f"the tokenizer of CLIP model {model_name!r} is not available "
                                         f"({_short(exc)}); use a model with the CLIP BPE tokenizer such as "
                                         f"{DEFAULT_CLIP_MODEL!r}") from None
        self.context_length = int(getattr(self.tokenizer, "context_length", None)
                                  or getattr(model, "context_length", 77))

    def __repr__(self) -> str:
        weights = "random init (smoke)" if self.smoke else self.pretrained
        return f"ClipEmbedder({self.model_name!r}, {weights!r}, device={str(self.device)!r})"

    @property
    def description(self) -> str:
        """``"ViT-L-14/openai"``, ``"ViT-B-32/file.bin"`` or ``"ViT-B-32/random-init (smoke)"``."""
        if self.smoke:
            return f"{self.model_name}/random-init (smoke)"
        is_tag = self.weights_file is None or str(self.pretrained) != self.weights_file
        return f"{self.model_name}/{self.pretrained if is_tag else Path(self.pretrained).name}"

    @property
    def protocol(self) -> dict[str, Any]:
        """What produced the embeddings, for results (CMMD reads it): model, pretrained, smoke, label."""
        return {"clip_model": self.model_name, "clip_pretrained": self.pretrained, "smoke": self.smoke,
                "label": "smoke" if self.smoke else None}

    def __call__(self, images: Any) -> torch.Tensor:
        """Same as :meth:`encode_images` (so the embedder can be passed where a callable is expected, e.g. CMMD)."""
        return self.encode_images(images)

    # -- images
    def preprocess_images(self, images: Any) -> torch.Tensor:
        """(N, 3, S, S) float tensor, the model's input, from any supported image input."""
        pils = to_pil_images(images)
        if not pils:
            return torch.empty(0, 3, *_input_size(self.model))
        return torch.stack([self.preprocess(im) for im in pils])

    @torch.inference_mode()
    def encode_images(self, images: Any) -> torch.Tensor:
        """(N, D) float32 CPU tensor of L2-normalised image embeddings."""
        pixels = self.preprocess_images(images)
        out = [self.model.encode_image(pixels[i:i + self.batch_size].to(self.device), normalize=True).float().cpu()
               for i in range(0, len(pixels), self.batch_size)]
        return torch.cat(out) if out else torch.empty(0, _embed_dim(self.model))

    # -- texts
    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` including the start and end tokens (what must fit in ``context_length``)."""
        encode = getattr(self.tokenizer, "encode", None)
        if callable(encode) and hasattr(self.tokenizer, "sot_token_id"):
            return len(encode(text)) + 2
        ids = self.tokenizer([text], context_length=4096)
        return int((ids != 0).sum())

    @torch.inference_mode()
    def encode_texts(self, texts: str | Sequence[str]) -> torch.Tensor:
        """(N, D) float32 CPU tensor of L2-normalised text embeddings; texts are used as given (no stripping),
        and open_clip truncates past ``context_length`` tokens."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(texts[i:i + self.batch_size]).to(self.device)
            out.append(self.model.encode_text(tokens, normalize=True).float().cpu())
        return torch.cat(out) if out else torch.empty(0, _embed_dim(self.model))


def _embed_dim(model: torch.nn.Module) -> int:
    proj = getattr(model, "text_projection", None)
    if isinstance(proj, torch.Tensor):
        return int(proj.shape[-1])
    return int(getattr(getattr(model, "visual", None), "output_dim", 0) or 0)


def _input_size(model: torch.nn.Module) -> tuple[int, int]:
    size = getattr(getattr(model, "visual", None), "image_size", 224)
    return (size, size) if isinstance(size, int) else tuple(size)


def to_pil_images(images: Any) -> list:
    """PIL RGB images from a PIL image, a list of images, an (N,3,H,W)/(3,H,W) tensor or (N,)H,W,3 array.

    uint8 values are used as they are; floats must be finite and in [0, 1] (diffusers' ``pt``/``np`` output).
    """
    from PIL import Image

    if isinstance(images, Image.Image):
        return [images.convert("RGB")]
    if isinstance(images, torch.Tensor):
        t = images.detach().cpu()
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4 or t.shape[1] not in (1, 3):
            raise InvalidConfigError(f"image tensor of shape {tuple(images.shape)}: expected (N, 3, H, W) or (3, H, W)")
        arrays = [a.transpose(1, 2, 0) for a in _to_uint8(t.numpy(), "image tensor")]
        return [Image.fromarray(a if a.shape[-1] == 3 else a[..., 0]).convert("RGB") for a in arrays]
    if isinstance(images, np.ndarray):
        a = images
        if a.ndim == 3:
            a = a[None]
        if a.ndim != 4 or a.shape[-1] not in (1, 3, 4):
            raise InvalidConfigError(f"image array of shape {images.shape}: expected (N, H, W, 3) or (H, W, 3)")
        arrays = _to_uint8(a, "image array")
        return [Image.fromarray(x[..., :3] if x.shape[-1] != 1 else x[..., 0]).convert("RGB") for x in arrays]
    if isinstance(images, (list, tuple)):
        out = []
        for im in images:
            out.extend(to_pil_images(im))
        return out
    raise InvalidConfigError(f"unsupported image input {type(images).__name__}; pass PIL images, a uint8 tensor "
                             f"(N, 3, H, W) or HxWx3 uint8 arrays")


def _to_uint8(a: np.ndarray, what: str) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise InvalidConfigError(f"{what} holds NaN or inf values; CLIP cannot score it. Check it with "
                                     f"sdxl_core.metrics.sanity.image_sanity (the fp16 VAE failure) and skip it")
        return (np.clip(a, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer) and a.min() >= 0 and a.max() <= 255:
        return a.astype(np.uint8)
    raise InvalidConfigError(f"{what} of dtype {a.dtype}: expected uint8 (0-255) or float in [0, 1]")


# ----------------------------------------------------------------------------------------------- metric

def clip_scores_from_embeddings(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Per-pair CLIP score ``100 * max(cos, 0)`` (float64) of row-matched (N, D) embeddings (normalised here)."""
    if image_embeds.shape != text_embeds.shape or image_embeds.ndim != 2:
        raise InvalidConfigError(f"image embeddings {tuple(image_embeds.shape)} and text embeddings "
                                 f"{tuple(text_embeds.shape)} must both be (N, D) with the same N and D")
    img = torch.nn.functional.normalize(image_embeds.double(), dim=-1)
    txt = torch.nn.functional.normalize(text_embeds.double(), dim=-1)
    return (100.0 * (img * txt).sum(-1)).clamp_min(0.0)


class ClipScore(Metric):
    """CLIP score of images against their prompts, per image and mean (torchmetrics-style metric).

    ``update(images, prompts)`` takes N images (see :class:`ClipEmbedder`) and N prompts (a str when N == 1);
    prompts go through :func:`plain_prompt` first unless ``strip_weighting=False``. ``compute()`` returns::

        {"clip_score": mean, "per_image": [N floats], "n": N, "truncated": [{"index", "prompt",
         "n_tokens", "max_tokens"}], "smoke": bool, "label": "smoke" | None, "model": "ViT-L-14/openai"}

    Pass ``embedder=`` to share one loaded CLIP between metrics; otherwise the constructor arguments build
    one (``ClipEmbedder(model_name, pretrained, clip_weights=..., smoke=...)``). ``index`` in ``truncated``
    counts images since the last ``reset()``.
    """

    higher_is_better = True
    is_differentiable = False
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 100.0

    def __init__(self, model_name: str = DEFAULT_CLIP_MODEL, pretrained: str | os.PathLike | None = None, *,
                 clip_weights: str | os.PathLike | None = None, smoke: bool = False,
                 embedder: ClipEmbedder | None = None, strip_weighting: bool = True,
                 device: str | torch.device | None = None, cache_dir: str | os.PathLike | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if embedder is None:
            embedder = ClipEmbedder(model_name, pretrained, clip_weights=clip_weights, smoke=smoke, device=device,
                                    cache_dir=cache_dir)
        self.embedder = embedder
        self.strip_weighting = strip_weighting
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n_images", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("scores", [], dist_reduce_fx="cat")
        self.add_state("truncations", [], dist_reduce_fx=None)  # dicts; merged by list concatenation

    @property
    def smoke(self) -> bool:
        return self.embedder.smoke

    @property
    def info(self) -> MetricInfo:
        return MetricInfo(
            name="clip_score", display_name=f"CLIP score ({self.embedder.description})", higher_is_better=True,
            kind="per_image", unit="",
            description=("100 * max(cos, 0) between open_clip image and prompt embeddings "
                         f"({self.embedder.description}); compel weighting stripped"
                         + ("; SMOKE: randomly initialised CLIP, not a real score" if self.smoke else "")),
            label="smoke" if self.smoke else None)

    def update(self, images: Any, prompts: str | Sequence[str]) -> None:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        texts = [plain_prompt(p) if self.strip_weighting else p for p in prompts]
        img = self.embedder.encode_images(images)
        if len(img) != len(texts):
            raise InvalidConfigError(f"CLIP score got {len(img)} images and {len(texts)} prompts; pass one prompt "
                                     f"per image")
        if not texts:
            return
        start = int(self.n_images.item())
        for i, (raw, text) in enumerate(zip(prompts, texts)):
            n_tokens = self.embedder.count_tokens(text)
            if n_tokens > self.embedder.context_length:
                entry = {"index": start + i, "prompt": raw, "n_tokens": n_tokens,
                         "max_tokens": self.embedder.context_length}
                log.warning("CLIP score: prompt %d has %d tokens, truncated to %d: %r", start + i, n_tokens,
                            self.embedder.context_length, raw[:120])
                self.truncations.append(entry)
        scores = clip_scores_from_embeddings(img, self.embedder.encode_texts(texts)).to(self.score_sum.device)
        self.scores.append(scores)
        self.score_sum += scores.sum()
        self.n_images += len(scores)

    def compute(self) -> dict[str, Any]:
        scores = torch.cat(self.scores) if isinstance(self.scores, list) and self.scores else (
            self.scores if isinstance(self.scores, torch.Tensor) else torch.empty(0, dtype=torch.float64))
        n = int(self.n_images.item())
        return {
            "clip_score": float(self.score_sum / n) if n else float("nan"),
            "per_image": [float(v) for v in scores.reshape(-1)],
            "n": n,
            "truncated": [dict(t) for t in self.truncations],
            "smoke": self.smoke,
            "label": "smoke" if self.smoke else None,
            "model": self.embedder.description,
        }
