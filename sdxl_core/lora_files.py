"""Versioned, validated, safe LoRA loading onto the SDXL base.

A LoRA is named ``NAME@VERSION`` and given on the command line as a *spec*:

* ``NAME@VERSION=PATH`` e.g. ``wrong@v1=loras/wrong/pytorch_lora_weights.safetensors``
* ``NAME=PATH`` the version is :data:`DEFAULT_VERSION` (``"unversioned"``)
* ``PATH`` the name is the file's stem (the folder's name for a folder or for
  ``pytorch_lora_weights.*``, the repo's name for a hub id), with characters outside the name charset
  replaced by ``_``; the version is :data:`DEFAULT_VERSION`.

The text is split at its first ``=``; everything before it must be a valid ``NAME[@VERSION]`` (so a path
that itself contains ``=`` needs an explicit name: ``mylora=runs/lr=1e-4/lora.safetensors``). Names and
versions become path components later, so they are restricted to ``[A-Za-z0-9._-]``, at most 100 characters,
not starting with ``.`` and without ``..``.

PATH is a ``.safetensors`` file, a folder (``pytorch_lora_weights.safetensors`` inside it, or its only
``.safetensors`` file), or a hub id ``owner/repo`` with an optional ``:weight_name`` (default
``pytorch_lora_weights.safetensors``); a local path wins over a hub id. Prefix a local path containing ``:``
with ``./``.

Only safetensors files are read unless pickle is allowed (``--allow-pickle``; then ``.bin``/``.ckpt``/``.pt``/
``.pth`` files are read with ``torch.load(weights_only=True)``). Before anything touches the pipeline, the file's
bytes are read once (hashed, so the recorded sha256 is that of the weights actually loaded), the safetensors
header is checked by hand (length, JSON, dtypes, data offsets), and the whole state dict is checked against
the base pipeline: only LoRA keys, finite float weights, every targeted module present in the base UNet (or
text encoder) with matching in/out features and consistent ranks. Each problem raises :class:`LoraFileError`
naming the file and the problem. Loading goes on ``pipes.base`` only (a LoRA trained for the base never
touches the refiner); if diffusers still fails part way, the partially added adapter is removed again.

Text-encoder LoRA keys are loaded into the base's ``text_encoder`` (and ``text_encoder_2`` only when no
refiner shares it). The harness encodes prompts with compel outside the pipeline call, so a text-encoder
LoRA acts at its adapter weight whatever ``lora_scale`` a generation passes (that scale reaches the UNet only).

diffusers quirk to know about: generating with ``cross_attention_kwargs={"scale": 0.0}`` (the harness's
``lora_scale=0``) resets every active adapter's weight to 1.0 after the call (``unscale_lora_layers``), so
weights set with :func:`set_lora_weights` must be set again after such a run.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from sdxl_core.errors import InvalidConfigError, ModelNotFoundError

if TYPE_CHECKING:
    import torch

    from sdxl_core.loading import Pipelines

DEFAULT_VERSION = "unversioned"
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth")
WEIGHT_SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
MAX_NAME_LENGTH = 100
LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# safetensors dtype -> bytes per element. Weights must be one of the first three.
WEIGHT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4}
# kohya ``.alpha`` scalars may also be integers or float64 (diffusers' convert_state_dict_to_kohya writes int64).
ALPHA_DTYPES = {**WEIGHT_DTYPES, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1}
SHOWN_KEYS = 5  # offending keys quoted in an error message

_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
_HUB_WITH_WEIGHT = re.compile(r"^([A-Za-z0-9][\w.-]*/[\w.-]+):([^/:][^:]*)$")
_DIFFUSERS_KEY = re.compile(
    r"^(unet|text_encoder|text_encoder_2)\.(.+)\.(lora_A\.weight|lora_B\.weight|lora\.down\.weight|lora\.up\.weight"
    r"|lora_linear_layer\.down\.weight|lora_linear_layer\.up\.weight)$")
_DIFFUSERS_OLD_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_KOHYA_KEY = re.compile(r"^lora_(unet|te|te1|te2)_([A-Za-z0-9_]+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_PEFT_KEY = re.compile(r"^(.+)\.(lora_A|lora_B)\.weight$")


class LoraFileError(InvalidConfigError):
    """A LoRA file that is unsafe, malformed, or made for another model; the message names the file."""


class LoraNotFoundError(LoraFileError, ModelNotFoundError):
    """A LoRA path or hub id that cannot be found (or, offline, is not in the local hub cache)."""


class LoraSpecError(InvalidConfigError):
    """A LoRA spec (``NAME@VERSION=PATH``) that cannot be parsed or names an unsafe name or version."""


# --------------------------------------------------------------------------------------------------
# Specs and records
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to load: its name and version, where it comes from, and whether pickle files are allowed."""

    name: str
    version: str
    source: str  # local file or folder, or hub id owner/repo
    weight_name: str | None = None  # file inside a folder or hub repo
    allow_pickle: bool = False

    @property
    def label(self) -> str:
        """``NAME@VERSION``."""
        return f"{self.name}@{self.version}"

    @property
    def adapter_name(self) -> str:
        """The diffusers/peft adapter name (no ``.`` or ``@``: peft uses it as a module key)."""
        return lora_adapter_name(self.name, self.version)


@dataclass(frozen=True)
class LoraRecord:
    """What a run records about one LoRA, so results can be tracked across versions."""

    name: str
    version: str
    source: str
    path: str  # the file actually read
    sha256: str
    size_bytes: int
    file_format: str  # "safetensors" or "pickle"
    metadata: tuple[tuple[str, str], ...] = ()  # safetensors __metadata__, sorted by key
    adapter_name: str | None = None
    weight: float | None = None  # adapter weight given to set_adapters
    key_format: str | None = None  # "diffusers", "diffusers_old" or "kohya"
    components: tuple[str, ...] = ()  # e.g. ("unet",)
    n_modules: int = 0  # layers the LoRA adapts
    ranks: tuple[int, ...] = ()  # distinct ranks, ascending

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (metadata as a dict, tuples as lists)."""
        return {
            "name": self.name, "version": self.version, "label": self.label, "source": self.source,
            "path": self.path, "sha256": self.sha256, "size_bytes": self.size_bytes,
            "file_format": self.file_format, "metadata": dict(self.metadata), "adapter_name": self.adapter_name,
            "weight": self.weight, "key_format": self.key_format, "components": list(self.components),
            "n_modules": self.n_modules, "ranks": list(self.ranks),
        }


@dataclass(frozen=True)
class LoraCheck:
    """What :func:`validate_lora_state_dict` found in a valid LoRA."""

    key_format: str
    components: tuple[str, ...]
    n_modules: int
    ranks: tuple[int, ...]


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file read once: its tensors, safetensors metadata, and the hash and size of the bytes read."""

    path: Path
    state_dict: dict[str, Any] = field(repr=False)
    metadata: dict[str, str]
    sha256: str
    size_bytes: int
    file_format: str


def _check_label_part(value: str, what: str, text: str) -> str:
    if not value:
        raise LoraSpecError(f"LoRA spec {text!r} has an empty {what}; write NAME@VERSION=PATH, NAME=PATH or PATH")
    if "\x00" in value:
        raise LoraSpecError(f"LoRA {what} in spec {text!r} contains a NUL character")
    if len(value) > MAX_NAME_LENGTH or not _NAME.match(value) or ".." in value:
        raise LoraSpecError(
            f"LoRA {what} {value!r} in spec {text!r} is not allowed: use at most {MAX_NAME_LENGTH} of "
            f"A-Z a-z 0-9 . _ -, not starting with '.' and without '..' (it becomes a folder name); "
            f"if '=' is part of the path, give the LoRA a name: NAME=PATH")
    return value


def _name_from_source(source: str) -> str:
    """A safe name from a path or hub id: the file stem, or the folder's name for pytorch_lora_weights.*."""
    trimmed = source.rstrip("/\\")
    parts = [p for p in re.split(r"[/\\]", trimmed) if p]
    last = parts[-1] if parts else ""
    stem = last
    lowered = last.lower()
    for suffix in WEIGHT_SUFFIXES:
        if lowered.endswith(suffix):
            stem = last[: -len(suffix)]
            break
    if stem.startswith("pytorch_lora_weights") and len(parts) > 1:
        stem = parts[-2]
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", stem).lstrip(".")
    stem = re.sub(r"\.{2,}", ".", stem)[:MAX_NAME_LENGTH]
    return stem or "lora"


def parse_lora_spec(text: str, *, allow_pickle: bool = False) -> LoraSpec:
    """Parse ``NAME@VERSION=PATH``, ``NAME=PATH`` or ``PATH`` (see the module docstring).

    A hub source may carry its weight file as ``owner/repo:file.safetensors``. Raises :class:`LoraSpecError`.
    """
    if not isinstance(text, str) or not text.strip():
        raise LoraSpecError("LoRA spec is empty; write NAME@VERSION=PATH, NAME=PATH or PATH")
    text = text.strip()
    if "\x00" in text:
        raise LoraSpecError(f"LoRA spec {text!r} contains a NUL character")
    if "=" in text:
        label, source = text.split("=", 1)
        if "@" in label:
            name, version = label.split("@", 1)
            if "@" in version:
                raise LoraSpecError(f"LoRA spec {text!r} has more than one '@'; write NAME@VERSION=PATH")
            _check_label_part(name, "name", text)
            _check_label_part(version, "version", text)
        else:
            name, version = _check_label_part(label, "name", text), DEFAULT_VERSION
    else:
        source, name, version = text, "", DEFAULT_VERSION
    if not source.strip():
        raise LoraSpecError(f"LoRA spec {text!r} has no path; write NAME@VERSION=PATH")
    weight_name = None
    hub = _HUB_WITH_WEIGHT.match(source)
    if hub and not Path(source).exists():
        source, weight_name = hub.group(1), hub.group(2)
    if not name:
        name = _name_from_source(source)
    return LoraSpec(name=name, version=version, source=source, weight_name=weight_name, allow_pickle=allow_pickle)


def lora_adapter_name(name: str, version: str) -> str:
    """``NAME__VERSION`` with every character outside ``[A-Za-z0-9_-]`` replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{name}__{version}")


# --------------------------------------------------------------------------------------------------
# Finding the file
# --------------------------------------------------------------------------------------------------


def _pickle_refused(path: Path | str) -> LoraFileError:
    return LoraFileError(
        f"LoRA file {path} is a pickle file ({Path(path).suffix}); unpickling can run arbitrary code, so only "
        f".safetensors LoRAs are read by default. Convert it to .safetensors, or pass --allow-pickle if you trust "
        f"the file (it is then read with torch.load(weights_only=True))")


def _is_pickle_name(path: Path | str) -> bool:
    return str(path).lower().endswith(PICKLE_SUFFIXES)


def resolve_lora_file(spec: LoraSpec) -> Path:
    """The weights file ``spec`` names: a local file, a file in a local folder, or a hub file (downloaded, or
    offline taken from the hub cache). Raises :class:`LoraNotFoundError` or :class:`LoraFileError`."""
    from sdxl_core.loading import _HUB_ID, _offline

    source = spec.source
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        return _file_in_folder(path, spec)
    if path.exists():
        raise LoraNotFoundError(f"LoRA {spec.label}: {path} is neither a file nor a folder")
    if not _HUB_ID.match(source) or source.startswith((".", "/", "~")):
        raise LoraNotFoundError(
            f"LoRA {spec.label}: {source!r} does not exist and is not a hub id (owner/repo); check the path")
    weight = spec.weight_name or DEFAULT_WEIGHT_NAME
    _check_weight_name(weight, spec)
    if _is_pickle_name(weight) and not spec.allow_pickle:
        raise _pickle_refused(f"{source}/{weight}")
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    if _offline():
        cached = try_to_load_from_cache(source, weight)
        if isinstance(cached, str):
            return Path(cached)
        raise LoraNotFoundError(
            f"LoRA {spec.label}: {source!r} is no local file or folder, and as a hub repo its {weight} is not in "
            f"the local hub cache; HF_HUB_OFFLINE is "
            f"set, so it cannot be downloaded: download it once where there is network "
            f"(huggingface-cli download {source} {weight}) or give a local path")
    try:
        return Path(hf_hub_download(source, weight))
    except Exception as exc:  # huggingface_hub raises many kinds (not found, gated, network)
        raise LoraNotFoundError(f"LoRA {spec.label}: {source!r} is no local file or folder, and {weight} could not "
                                f"be downloaded from it as a hub repo: {exc}") from exc


def _check_weight_name(weight: str, spec: LoraSpec) -> None:
    parts = Path(weight).parts
    if not weight or "\x00" in weight or Path(weight).is_absolute() or ".." in parts:
        raise LoraSpecError(f"LoRA {spec.label}: weight name {weight!r} must be a relative path inside the "
                            f"folder or repo, without '..'")


def _file_in_folder(folder: Path, spec: LoraSpec) -> Path:
    if spec.weight_name:
        _check_weight_name(spec.weight_name, spec)
        path = folder / spec.weight_name
        if not path.is_file():
            raise LoraNotFoundError(f"LoRA {spec.label}: folder {folder} has no file {spec.weight_name}")
        return path
    default = folder / DEFAULT_WEIGHT_NAME
    if default.is_file():
        return default
    safes = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(".safetensors"))
    if len(safes) == 1:
        return safes[0]
    if len(safes) > 1:
        raise LoraFileError(
            f"LoRA {spec.label}: folder {folder} holds {len(safes)} .safetensors files "
            f"({', '.join(p.name for p in safes[:SHOWN_KEYS])}) and no {DEFAULT_WEIGHT_NAME}; give the file's path")
    pickles = sorted(p for p in folder.iterdir() if p.is_file() and _is_pickle_name(p))
    if pickles and not spec.allow_pickle:
        raise _pickle_refused(pickles[0])
    if len(pickles) == 1:
        return pickles[0]
    if pickles:
        raise LoraFileError(f"LoRA {spec.label}: folder {folder} holds several pickle files "
                            f"({', '.join(p.name for p in pickles[:SHOWN_KEYS])}); give the file's path")
    raise LoraNotFoundError(f"LoRA {spec.label}: folder {folder} holds no LoRA weights file "
                            f"({DEFAULT_WEIGHT_NAME} or another .safetensors)")


# --------------------------------------------------------------------------------------------------
# Reading the file
# --------------------------------------------------------------------------------------------------


def _shown(keys: Sequence[str]) -> str:
    shown = ", ".join(repr(k) for k in list(keys)[:SHOWN_KEYS])
    return shown + (f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else "")


def _check_safetensors_header(data: bytes, path: Path) -> dict[str, str]:
    """Check the safetensors layout by hand before safetensors parses it; returns ``__metadata__``."""
    size = len(data)
    if size == 0:
        raise LoraFileError(f"LoRA file {path} is empty (0 bytes)")
    pickle_hint = ""
    if data[:4] == b"PK\x03\x04" or data[:1] == b"\x80":
        pickle_hint = (" It looks like a PyTorch pickle checkpoint: convert it to .safetensors, or rename it to .bin "
                       "and pass --allow-pickle if you trust it.")
    if size < 8:
        raise LoraFileError(f"LoRA file {path} is truncated or not a safetensors file: {size} bytes, fewer than the "
                            f"8-byte header length a safetensors file starts with")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > MAX_HEADER_BYTES:
        raise LoraFileError(
            f"LoRA file {path} is not a safetensors file (or is corrupted): its first 8 bytes give a header length "
            f"of {header_len} bytes, more than the {MAX_HEADER_BYTES}-byte limit.{pickle_hint}")
    if 8 + header_len > size:
        raise LoraFileError(
            f"LoRA file {path} is truncated or not a safetensors file: its header claims {header_len} bytes but "
            f"only {size - 8} bytes follow the header length.{pickle_hint}")
    try:
        header = json.loads(data[8:8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise LoraFileError(f"LoRA file {path} is not a safetensors file (or is corrupted): its header is not "
                            f"valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise LoraFileError(f"LoRA file {path} is not a safetensors file: its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise LoraFileError(f"LoRA file {path} has a malformed __metadata__ (it must map strings to strings)")
    data_len = size - 8 - header_len
    bad_dtype: list[str] = []
    for key, info in header.items():
        if not isinstance(info, dict) or not isinstance(info.get("dtype"), str) \
                or not isinstance(info.get("shape"), list) or not isinstance(info.get("data_offsets"), list):
            raise LoraFileError(f"LoRA file {path} is corrupted: header entry {key!r} lacks dtype, shape or "
                                f"data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if len(offsets) != 2 or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets) \
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise LoraFileError(f"LoRA file {path} is corrupted: header entry {key!r} has a malformed shape or "
                                f"data_offsets")
        allowed = ALPHA_DTYPES if key.endswith(".alpha") and math.prod(shape) == 1 else WEIGHT_DTYPES
        if dtype not in allowed:
            bad_dtype.append(f"{key} ({dtype})")
            continue
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise LoraFileError(
                f"LoRA file {path} is truncated or corrupted: tensor {key!r} has data offsets [{begin}, {end}] "
                f"beyond the {data_len} bytes of data in the file")
        if end - begin != math.prod(shape) * allowed[dtype]:
            raise LoraFileError(
                f"LoRA file {path} is corrupted: tensor {key!r} of shape {shape} and dtype {dtype} needs "
                f"{math.prod(shape) * allowed[dtype]} bytes but its data offsets span {end - begin}")
    if bad_dtype:
        raise LoraFileError(
            f"LoRA file {path} holds tensors of an unsupported dtype: {_shown(bad_dtype)}; LoRA weights must be "
            f"float16, bfloat16 or float32")
    return dict(metadata)


def read_lora_file(path: Path | str, allow_pickle: bool = False) -> LoraFile:
    """Read ``path`` once, hash it, check its layout and load its tensors (on the CPU)."""
    import torch

    path = Path(path)
    if _is_pickle_name(path) and not allow_pickle:
        raise _pickle_refused(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LoraNotFoundError(f"LoRA file {path} cannot be read: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if _is_pickle_name(path):
        if not data:
            raise LoraFileError(f"LoRA file {path} is empty (0 bytes)")
        try:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # unpickling errors come in many types
            raise LoraFileError(f"LoRA file {path} could not be read as a PyTorch checkpoint "
                                f"(torch.load(weights_only=True)): {exc}") from exc
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            raise LoraFileError(f"LoRA file {path} does not hold a flat dict of named tensors (a LoRA state dict)")
        _check_dtypes(state, path)
        return LoraFile(path, dict(state), {}, digest, len(data), "pickle")
    metadata = _check_safetensors_header(data, path)
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        state = load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise LoraFileError(f"LoRA file {path} is not a readable safetensors file: {exc}") from exc
    return LoraFile(path, state, metadata, digest, len(data), "safetensors")


def read_lora_state_dict(path: Path | str, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file, after the layout checks of :func:`read_lora_file`."""
    return read_lora_file(path, allow_pickle).state_dict


def _check_dtypes(state: Mapping[str, Any], path: Path | str) -> None:
    import torch

    weight_dtypes = (torch.float16, torch.bfloat16, torch.float32)
    alpha_dtypes = weight_dtypes + (torch.float64, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
    bad = [f"{k} ({str(v.dtype).removeprefix('torch.')})" for k, v in sorted(state.items())
           if v.dtype not in (alpha_dtypes if k.endswith(".alpha") and v.numel() == 1 else weight_dtypes)]
    if bad:
        raise LoraFileError(f"LoRA file {path} holds tensors of an unsupported dtype: {_shown(bad)}; LoRA weights "
                            f"must be float16, bfloat16 or float32")


# --------------------------------------------------------------------------------------------------
# Validating the state dict against the base pipeline
# --------------------------------------------------------------------------------------------------


def _key_format(state: Mapping[str, Any], path: Path | str) -> str:
    """``kohya``, ``diffusers_old`` or ``diffusers``; refuses anything that is not a LoRA key."""
    keys = sorted(state)  # messages quote keys in a fixed order (safetensors returns them in any order)
    dora = [k for k in keys if "dora_scale" in k or "lora_magnitude_vector" in k]
    if dora:
        raise LoraFileError(f"LoRA file {path} is a DoRA (keys {_shown(dora)}); DoRA adapters are not supported")
    kohya = [k for k in keys if _KOHYA_KEY.match(k)]
    old = [k for k in keys if _DIFFUSERS_OLD_KEY.match(k)]
    new = [k for k in keys if _DIFFUSERS_KEY.match(k)]
    known = set(kohya) | set(old) | set(new)
    other = [k for k in keys if k not in known]
    if other:
        hint = ""
        if any("lora" in k.lower() for k in other):
            hint = (" (LoRA keys must start with unet., text_encoder. or text_encoder_2. in diffusers format, or "
                    "lora_unet_/lora_te1_/lora_te2_ in kohya format)")
        raise LoraFileError(
            f"LoRA file {path} holds {len(other)} key(s) that are not LoRA keys: {_shown(other)}{hint}; a LoRA file "
            f"holds only <module>.lora_A/lora_B (or lora.down/lora.up, or kohya lora_down/lora_up/alpha) tensors, "
            f"so this looks like a full model checkpoint or another kind of adapter")
    if kohya and (old or new):
        raise LoraFileError(f"LoRA file {path} mixes kohya keys ({_shown(kohya)}) with diffusers keys "
                            f"({_shown(old + new)}); diffusers only converts files that are all kohya")
    if kohya:
        bad_alpha = [k for k in kohya if k.endswith(".alpha") and state[k].numel() != 1]
        if bad_alpha:
            raise LoraFileError(f"LoRA file {path}: alpha tensors {_shown(bad_alpha)} must be scalars")
        return "kohya"
    return "diffusers_old" if old or any(".lora.down." in k or ".lora.up." in k or "lora_linear_layer" in k
                                         for k in new) else "diffusers"


def _check_finite(state: Mapping[str, Any], path: Path | str) -> None:
    import torch

    bad = [k for k, v in sorted(state.items()) if v.dtype.is_floating_point and not bool(torch.isfinite(v).all())]
    if bad:
        kinds = []
        for k in bad[:SHOWN_KEYS]:
            v = state[k].float()
            kinds.append("NaN" if bool(torch.isnan(v).any()) else "inf")
        shown = ", ".join(f"{k!r} ({kind})" for k, kind in zip(bad, kinds))
        more = f" and {len(bad) - SHOWN_KEYS} more" if len(bad) > SHOWN_KEYS else ""
        raise LoraFileError(f"LoRA file {path} holds NaN or inf weights in {len(bad)} tensor(s): {shown}{more}")


def _component_keys(state: Mapping[str, Any], component: str, model: Any) -> dict[str, Any]:
    """The keys of ``component`` in peft form (``<module>.lora_A.weight``), converted as diffusers converts them."""
    from diffusers.utils.state_dict_utils import (convert_state_dict_to_diffusers, convert_state_dict_to_peft,
                                                  convert_unet_state_dict_to_peft)

    prefix = f"{component}."
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not sub:
        return sub
    if component == "unet":
        return convert_unet_state_dict_to_peft(sub) if "lora_A" not in next(iter(sub)) else sub
    sub = convert_state_dict_to_peft(convert_state_dict_to_diffusers(sub))
    if not hasattr(model, "text_model"):
        sub = {k.removeprefix("text_model."): v for k, v in sub.items()}
    return sub


def _check_module(path: Path | str, component: str, module_name: str, module: Any, down: Any, up: Any) -> int:
    """Shape checks of one adapted layer; returns the rank."""
    import torch

    base = getattr(module, "base_layer", module)  # already wrapped by peft for another adapter
    where = f"{component}.{module_name}"
    a_key, b_key = f"{where}.lora_A.weight", f"{where}.lora_B.weight"
    if isinstance(base, torch.nn.Linear):
        kind, ndim = f"Linear(in_features={base.in_features}, out_features={base.out_features})", 2
        in_name, in_dim, out_name, out_dim = "in_features", base.in_features, "out_features", base.out_features
    elif isinstance(base, torch.nn.Conv2d):
        kind, ndim = (f"Conv2d(in_channels={base.in_channels}, out_channels={base.out_channels}, "
                      f"kernel_size={tuple(base.kernel_size)})"), 4
        in_name, in_dim, out_name, out_dim = "in_channels", base.in_channels, "out_channels", base.out_channels
    else:
        raise LoraFileError(f"LoRA file {path}: {a_key} targets {where}, a {type(base).__name__}; only Linear and "
                            f"Conv2d layers take a LoRA")
    for key, t in ((a_key, down), (b_key, up)):
        if t.ndim != ndim:
            raise LoraFileError(f"LoRA file {path}: {key} has shape {tuple(t.shape)} ({t.ndim}-D) but {where} in "
                                f"this base model is a {kind}, which needs {ndim}-D LoRA matrices")
    problems = []
    if down.shape[1] != in_dim:
        problems.append((a_key, down, f"{in_name} {down.shape[1]} expected {in_dim}"))
    if up.shape[0] != out_dim:
        problems.append((b_key, up, f"{out_name} {up.shape[0]} expected {out_dim}"))
    if ndim == 4 and tuple(down.shape[2:]) != tuple(base.kernel_size):
        problems.append((a_key, down, f"kernel size {tuple(down.shape[2:])} expected {tuple(base.kernel_size)}"))
    if ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        problems.append((b_key, up, f"kernel size {tuple(up.shape[2:])} expected (1, 1)"))
    if problems:
        key, t, what = problems[0]
        raise LoraFileError(
            f"LoRA file {path} was made for another base model: {key} has shape {tuple(t.shape)} but {where} is a "
            f"{kind} here: {what} (found vs expected)")
    if down.shape[0] != up.shape[1]:
        raise LoraFileError(
            f"LoRA file {path}: rank mismatch at {where}: lora_A (down) {tuple(down.shape)} has rank {down.shape[0]} "
            f"but lora_B (up) {tuple(up.shape)} has rank {up.shape[1]}")
    if down.shape[0] < 1:
        raise LoraFileError(f"LoRA file {path}: {a_key} has rank 0")
    return int(down.shape[0])


def validate_lora_state_dict(state: Mapping[str, Any], unet: Any, path: Path | str,
                             text_encoders: Mapping[str, Any] | None = None) -> LoraCheck:
    """Check a whole LoRA state dict against the base ``unet`` (and ``text_encoders``, e.g.
    ``{"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}``; a missing or ``None`` encoder
    means the pipeline has none, so keys for it are refused). Touches no model. Raises :class:`LoraFileError`."""
    import torch

    if not state:
        raise LoraFileError(f"LoRA file {path} holds no tensors")
    bad_types = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad_types:
        raise LoraFileError(f"LoRA file {path}: entries {_shown([str(k) for k in bad_types])} are not named tensors")
    _check_dtypes(state, path)
    key_format = _key_format(state, path)
    _check_finite(state, path)

    from diffusers import StableDiffusionXLPipeline

    try:
        converted, alphas = StableDiffusionXLPipeline.lora_state_dict(dict(state), unet_config=unet.config)
    except Exception as exc:  # diffusers' converters raise ValueError/KeyError/IndexError
        raise LoraFileError(f"LoRA file {path}: diffusers cannot convert its {key_format} keys: {exc}") from exc
    for key, alpha in (alphas or {}).items():
        if not math.isfinite(float(alpha)) or float(alpha) <= 0:
            raise LoraFileError(f"LoRA file {path}: alpha of {key} is {alpha}; it must be a positive finite number")

    models = {"unet": unet, **{name: (text_encoders or {}).get(name) for name in LORA_COMPONENTS[1:]}}
    unprefixed = [k for k in sorted(converted) if not k.startswith(tuple(f"{c}." for c in LORA_COMPONENTS))]
    if unprefixed:
        raise LoraFileError(f"LoRA file {path}: keys {_shown(unprefixed)} target no component of the base pipeline")
    components, ranks, n_modules = [], set(), 0
    for component in LORA_COMPONENTS:
        if not any(k.startswith(f"{component}.") for k in converted):
            continue
        model = models[component]
        if model is None:
            raise LoraFileError(
                f"LoRA file {path} adapts {component}, which this base pipeline does not have "
                f"(keys like {_shown([k for k in converted if k.startswith(component + '.')][:1])})")
        try:
            sub = _component_keys(converted, component, model)
        except ValueError as exc:
            raise LoraFileError(f"LoRA file {path}: diffusers cannot read its {component} keys: {exc}") from exc
        pairs: dict[str, dict[str, Any]] = {}
        odd = []
        for key, value in sorted(sub.items()):
            m = _PEFT_KEY.match(key)
            if not m:
                odd.append(f"{component}.{key}")
                continue
            pairs.setdefault(m.group(1), {})[m.group(2)] = value
        if odd:
            raise LoraFileError(f"LoRA file {path}: keys {_shown(odd)} are not LoRA matrices diffusers can load")
        missing_modules = []
        for module_name, pair in pairs.items():
            if set(pair) != {"lora_A", "lora_B"}:
                have, lack = next(iter(pair)), ({"lora_A", "lora_B"} - set(pair)).pop()
                raise LoraFileError(f"LoRA file {path}: {component}.{module_name} has {have} but no {lack}; each "
                                    f"adapted layer needs both a down (lora_A) and an up (lora_B) matrix")
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                missing_modules.append(f"{component}.{module_name}")
                continue
            ranks.add(_check_module(path, component, module_name, module, pair["lora_A"], pair["lora_B"]))
            n_modules += 1
        if missing_modules:
            raise LoraFileError(
                f"LoRA file {path} targets {len(missing_modules)} layer(s) that this base model's {component} does "
                f"not have: {_shown(missing_modules)}; it was made for another model architecture")
        components.append(component)
    return LoraCheck(key_format, tuple(components), n_modules, tuple(sorted(ranks)))


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


def _safetensors_metadata(path: Path) -> dict[str, str]:
    with path.open("rb") as f:
        head = f.read(8)
        size = path.stat().st_size
        if len(head) < 8:
            return {}
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            return {}
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def lora_record(spec: LoraSpec, path: Path | str) -> LoraRecord:
    """sha256, size and safetensors ``__metadata__`` of ``path`` (streamed; no tensors loaded, nothing checked)."""
    path = Path(path)
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    pickle = _is_pickle_name(path)
    meta = {} if pickle else _safetensors_metadata(path)
    return LoraRecord(name=spec.name, version=spec.version, source=spec.source, path=str(path),
                      sha256=digest.hexdigest(), size_bytes=size, file_format="pickle" if pickle else "safetensors",
                      metadata=tuple(sorted(meta.items())), adapter_name=spec.adapter_name)


def _record(spec: LoraSpec, lf: LoraFile, check: LoraCheck, weight: float) -> LoraRecord:
    return LoraRecord(name=spec.name, version=spec.version, source=spec.source, path=str(lf.path), sha256=lf.sha256,
                      size_bytes=lf.size_bytes, file_format=lf.file_format,
                      metadata=tuple(sorted(lf.metadata.items())), adapter_name=spec.adapter_name, weight=weight,
                      key_format=check.key_format, components=check.components, n_modules=check.n_modules,
                      ranks=check.ranks)


# --------------------------------------------------------------------------------------------------
# Loading onto the base pipeline
# --------------------------------------------------------------------------------------------------


def loaded_adapters(pipes: Pipelines) -> list[str]:
    """Adapter names loaded on the base pipeline (any component), in load order."""
    names: list[str] = []
    for adapters in pipes.base.get_list_adapters().values():
        names.extend(a for a in adapters if a not in names)
    return names


def _adapter_metadata(lf: LoraFile) -> dict[str, Any] | None:
    """diffusers' own adapter config (``lora_adapter_metadata``) stored in the file, if any."""
    raw = lf.metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise LoraFileError(f"LoRA file {lf.path}: __metadata__ lora_adapter_metadata is not valid JSON ({exc})") \
            from None
    if not isinstance(meta, dict):
        raise LoraFileError(f"LoRA file {lf.path}: __metadata__ lora_adapter_metadata is not a JSON object")
    return meta


def _load_one(pipe: Any, lf: LoraFile, adapter_name: str) -> None:
    meta = _adapter_metadata(lf)
    if meta is None:
        pipe.load_lora_weights(dict(lf.state_dict), adapter_name=adapter_name)
        return
    # load_lora_weights drops the adapter config when given a dict; pass it on as it does for a file.
    state, alphas = pipe.lora_state_dict(dict(lf.state_dict), unet_config=pipe.unet.config)
    pipe.load_lora_into_unet(state, network_alphas=alphas, unet=pipe.unet, adapter_name=adapter_name, metadata=meta,
                             _pipeline=pipe)
    for prefix in LORA_COMPONENTS[1:]:
        pipe.load_lora_into_text_encoder(state, network_alphas=alphas, text_encoder=getattr(pipe, prefix, None),
                                         prefix=prefix, lora_scale=pipe.lora_scale, adapter_name=adapter_name,
                                         metadata=meta, _pipeline=pipe)


def _remove_adapters(pipe: Any, names: Sequence[str], had_before: bool) -> None:
    """Undo a failed load: with no adapters before, unload everything (plain layers back); else delete ``names``
    from every component that holds them (even partially: layers injected before the failure)."""
    if not had_before:
        pipe.unload_lora_weights()
        return
    from diffusers import ModelMixin
    from diffusers.utils.peft_utils import delete_adapter_layers
    from peft.tuners.tuners_utils import BaseTunerLayer

    for component in LORA_COMPONENTS:
        model = getattr(pipe, component, None)
        if model is None:
            continue
        for name in names:
            in_config = name in (getattr(model, "peft_config", None) or {})
            in_layers = any(name in getattr(m, "lora_A", {}) for m in model.modules() if isinstance(m, BaseTunerLayer))
            if isinstance(model, ModelMixin) and in_config:
                model.delete_adapters([name])
            elif in_config or in_layers:
                delete_adapter_layers(model, name)


def _check_weights(specs: Sequence[LoraSpec], weights: Sequence[float] | None) -> list[float]:
    if weights is None:
        return [1.0] * len(specs)
    weights = list(weights)
    if len(weights) != len(specs):
        raise InvalidConfigError(f"{len(weights)} LoRA weight(s) for {len(specs)} LoRA(s); give one weight per LoRA")
    for spec, w in zip(specs, weights):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise InvalidConfigError(f"LoRA {spec.label}: weight {w!r} must be a finite number")
    return [float(w) for w in weights]


def load_loras(pipes: Pipelines, specs: Sequence[LoraSpec | str], weights: Sequence[float] | None = None,
               ) -> list[LoraRecord]:
    """Load LoRAs onto ``pipes.base`` only (never the refiner) and activate exactly them with ``weights``.

    Every file is found, read, hashed and validated before the pipeline is touched; a load that still fails
    removes what it added, so nothing is left half-loaded. Adapters loaded earlier stay loaded but inactive.
    Strings in ``specs`` are parsed with :func:`parse_lora_spec`. Returns one record per LoRA.
    """
    if isinstance(specs, (str, LoraSpec)):
        specs = [specs]
    parsed = [parse_lora_spec(s) if isinstance(s, str) else s for s in specs]
    if not parsed:
        raise InvalidConfigError("no LoRA given to load")
    weight_list = _check_weights(parsed, weights)
    pipe = pipes.base
    existing = loaded_adapters(pipes)
    seen: dict[str, str] = {}
    for spec in parsed:
        name = spec.adapter_name
        if name in seen:
            raise InvalidConfigError(f"LoRAs {seen[name]} and {spec.label} would share adapter name {name!r}; "
                                     f"give them different names or versions")
        if name in existing:
            raise InvalidConfigError(f"LoRA {spec.label} (adapter {name!r}) is already loaded; unload it first")
        seen[name] = spec.label
    text_encoders = {c: getattr(pipe, c, None) for c in LORA_COMPONENTS[1:]}
    prepared = []
    for spec, weight in zip(parsed, weight_list):
        lf = read_lora_file(resolve_lora_file(spec), allow_pickle=spec.allow_pickle)
        check = validate_lora_state_dict(lf.state_dict, pipe.unet, lf.path, text_encoders=text_encoders)
        _adapter_metadata(lf)  # refuse malformed adapter metadata now, not half way
        shared = pipes.refiner is not None and getattr(pipes.refiner, "text_encoder_2", None) is pipe.text_encoder_2
        if "text_encoder_2" in check.components and shared:
            raise LoraFileError(
                f"LoRA file {lf.path} adapts text_encoder_2, which the base shares with the refiner, so it would "
                f"change the refiner too (a LoRA for the base must not); load it without a refiner, or use a file "
                f"without text_encoder_2 (lora_te2_) keys")
        prepared.append((spec, lf, check, weight))
    added: list[str] = []
    for spec, lf, check, _ in prepared:
        added.append(spec.adapter_name)
        try:
            _load_one(pipe, lf, spec.adapter_name)
        except Exception as exc:
            _remove_adapters(pipe, added, had_before=bool(existing))
            raise LoraFileError(f"LoRA {spec.label} from {lf.path} could not be loaded (nothing was left loaded): "
                                f"{type(exc).__name__}: {exc}") from exc
    pipe.set_adapters(added, weight_list)
    return [_record(spec, lf, check, w) for spec, lf, check, w in prepared]


def set_lora_weights(pipes: Pipelines, adapter_names: Sequence[str], weights: Sequence[float] | float | None = None,
                     ) -> None:
    """Activate exactly ``adapter_names`` with ``weights`` (default 1 each); weight 0 switches one off."""
    pipes.base.set_adapters(list(adapter_names), list(weights) if isinstance(weights, Sequence) else weights)


def set_lora_scale(pipes: Pipelines, scale: float) -> None:
    """Give every loaded adapter the weight ``scale``."""
    names = loaded_adapters(pipes)
    if names:
        pipes.base.set_adapters(names, [float(scale)] * len(names))


def disable_loras(pipes: Pipelines) -> None:
    """Switch all LoRAs off (the base runs exactly as without them); :func:`enable_loras` switches them on."""
    pipes.base.disable_lora()


def enable_loras(pipes: Pipelines) -> None:
    pipes.base.enable_lora()


def unload_loras(pipes: Pipelines) -> None:
    """Remove every LoRA from the base (the original layers come back)."""
    pipes.base.unload_lora_weights()


def _lora_components(pipes: Pipelines) -> list[str]:
    return [c for c, names in pipes.base.get_list_adapters().items() if names]


def fuse_loras(pipes: Pipelines, lora_scale: float = 1.0, adapter_names: Sequence[str] | None = None) -> None:
    """Merge the active LoRAs into the base weights for speed (undo with :func:`unfuse_loras`)."""
    components = _lora_components(pipes)
    if components:
        pipes.base.fuse_lora(components=components, lora_scale=lora_scale,
                             adapter_names=list(adapter_names) if adapter_names is not None else None)


def unfuse_loras(pipes: Pipelines) -> None:
    """Subtract fused LoRAs from the base weights again (exact up to float rounding)."""
    components = _lora_components(pipes)
    if components:
        pipes.base.unfuse_lora(components=components)
