"""CLIP score on open_clip: values against open_clip's own embeddings, state handling, prompts, weights, smoke."""

from __future__ import annotations

import logging
import os
import socket
import time

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from sdxl_core.errors import InvalidConfigError, MissingDependencyError, ModelNotFoundError
from sdxl_core.metrics.clip import (
    ClipEmbedder,
    ClipScore,
    clip_scores_from_embeddings,
    plain_prompt,
    resolve_clip_weights,
)

SMALL = "ViT-S-32"  # 63M params, random init in ~1 s; no weights exist offline, so every model here is smoke


@pytest.fixture(scope="module")
def emb() -> ClipEmbedder:
    return ClipEmbedder(SMALL, smoke=True, device="cpu")


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    out = []
    for i, (h, w) in enumerate([(64, 64), (80, 48), (40, 96), (64, 64)]):
        base = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        base[..., i % 3] = (np.arange(w) * 255 // max(w - 1, 1)).astype(np.uint8)  # a bit of structure
        out.append(Image.fromarray(base))
    return out


PROMPTS = ["a red fox in the snow", "a bowl of ramen, (watercolor)++", "a city street at night",
           "(oil on canvas)+++ portrait of a fisherman"]
PLAIN = ["a red fox in the snow", "a bowl of ramen, watercolor", "a city street at night",
         "oil on canvas portrait of a fisherman"]


def _reference_scores(model: torch.nn.Module, images: list[Image.Image], texts: list[str]) -> np.ndarray:
    """100 * cos with open_clip's own calls: default eval transform, tokenizer, encode_*, numpy normalise/dot."""
    preprocess = open_clip.image_transform(model.visual.image_size, is_train=False)
    tokenizer = open_clip.get_tokenizer(SMALL)
    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(im) for im in images])).numpy().astype(np.float64)
        txt = model.encode_text(tokenizer(texts)).numpy().astype(np.float64)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return 100.0 * np.einsum("nd,nd->n", img, txt)


def test_score_equals_100_cos_of_open_clip_embeddings(emb, images):
    metric = ClipScore(embedder=emb)
    metric.update(images, PROMPTS)
    out = metric.compute()
    ref = _reference_scores(emb.model, images, PLAIN)
    assert out["n"] == 4
    np.testing.assert_allclose(out["per_image"], np.maximum(ref, 0.0), rtol=1e-4, atol=1e-4)
    assert out["clip_score"] == pytest.approx(float(np.mean(np.maximum(ref, 0.0))), abs=1e-4)


def test_embedder_outputs_are_normalised_and_inputs_agree(emb, images):
    e = emb.encode_images(images)
    assert e.shape == (4, emb.model.text_projection.shape[1]) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=1), torch.ones(4))
    t = emb.encode_texts(PLAIN)
    assert t.shape == e.shape
    torch.testing.assert_close(t.norm(dim=1), torch.ones(4))
    # uint8 (N,3,H,W) tensor, float [0,1] tensor and HxWx3 arrays give the same embedding as the PIL image
    arr = np.array(images[0])
    as_u8 = torch.from_numpy(arr).permute(2, 0, 1)[None]
    torch.testing.assert_close(emb.encode_images(as_u8), e[:1])
    torch.testing.assert_close(emb.encode_images(as_u8.float() / 255.0), e[:1])
    torch.testing.assert_close(emb.encode_images([arr]), e[:1])
    assert emb.encode_images([]).shape == (0, e.shape[1])
    torch.testing.assert_close(emb(images[:2]), e[:2])  # callable, as CMMD uses it
    assert emb.protocol == {"clip_model": SMALL, "clip_pretrained": None, "smoke": True, "label": "smoke"}
    with pytest.raises(InvalidConfigError, match="NaN"):
        emb.encode_images(torch.full((1, 3, 8, 8), float("nan")))


def test_clamp_at_zero_on_given_embeddings():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0]])
    txt = torch.tensor([[-1.0, 0.0], [0.6, 0.8], [3.0, 4.0]])
    got = clip_scores_from_embeddings(img, txt)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor([0.0, 60.0, 100.0], dtype=torch.float64))


class _FixedEmbedder:
    """Stub with fixed embeddings, to drive ClipScore through a negative-cosine pair."""

    smoke = True
    context_length = 77
    description = "stub"

    def encode_images(self, images):
        return torch.tensor([[1.0, 0.0], [0.0, 1.0]])

    def encode_texts(self, texts):
        return torch.tensor([[-0.8, 0.6], [0.0, 2.0]])

    def count_tokens(self, text):
        return 3


def test_metric_clamps_negative_cos_to_zero():
    metric = ClipScore(embedder=_FixedEmbedder())
    metric.update([None, None], ["a", "b"])
    out = metric.compute()
    assert out["per_image"] == [0.0, 100.0]
    assert out["clip_score"] == 50.0


def test_batching_reset_and_float64_state(emb, images):
    one = ClipScore(embedder=emb)
    one.update(images, PROMPTS)
    many = ClipScore(embedder=emb)
    many.update(images[:1], PROMPTS[0])  # a single prompt as str
    many.update(images[1:3], PROMPTS[1:3])
    many.update(images[3:], PROMPTS[3:])
    a, b = one.compute(), many.compute()
    np.testing.assert_allclose(b["per_image"], a["per_image"], atol=1e-4)
    assert b["clip_score"] == pytest.approx(a["clip_score"], abs=1e-4)
    assert many.score_sum.dtype == torch.float64 and many.n_images.dtype == torch.float64
    assert all(s.dtype == torch.float64 for s in many.scores)
    many.reset()
    assert many.n_images.item() == 0 and many.scores == [] and many.truncations == []
    with pytest.warns(UserWarning, match="before the ``update``"):  # torchmetrics' own notice
        empty = many.compute()
    assert empty["n"] == 0 and empty["per_image"] == [] and np.isnan(empty["clip_score"])
    many.update(images[:2], PROMPTS[:2])
    np.testing.assert_allclose(many.compute()["per_image"], a["per_image"][:2], atol=1e-4)
    with pytest.raises(InvalidConfigError, match="2 images and 1 prompts"):
        many.update(images[:2], PROMPTS[:1])


def test_truncation_of_long_prompt_is_recorded(emb, images, caplog):
    long_prompt = " ".join(f"word{i}" for i in range(100))
    n_expected = len(open_clip.get_tokenizer(SMALL).encode(long_prompt)) + 2
    metric = ClipScore(embedder=emb)
    with caplog.at_level(logging.WARNING, logger="sdxl_core.metrics.clip"):
        metric.update(images[:2], ["a short prompt", long_prompt])
    out = metric.compute()
    assert out["truncated"] == [{"index": 1, "prompt": long_prompt, "n_tokens": n_expected, "max_tokens": 77}]
    assert n_expected > 77
    assert any("truncated" in r.getMessage() for r in caplog.records)
    # the scored text is open_clip's truncation: same value as scoring the first 77 tokens directly
    tok = open_clip.get_tokenizer(SMALL)
    ids = tok([long_prompt])
    with torch.no_grad():
        t = torch.nn.functional.normalize(emb.model.encode_text(ids), dim=-1)
    ref = 100 * float(emb.encode_images(images[1:2])[0].double() @ t[0].double())
    assert out["per_image"][1] == pytest.approx(max(ref, 0.0), abs=1e-4)


@pytest.mark.parametrize("text, plain", [
    ("a wolf in a misty pine forest at dawn, (oil on canvas)+++, highly detailed",
     "a wolf in a misty pine forest at dawn, oil on canvas, highly detailed"),
    ("(word)1.3 cat", "word cat"),
    ("red+ apple--, (big (fat)1.2 cat)0.8", "red apple, big fat cat"),
    ('("a cat", "a dog").blend(0.7, 0.3)', "a cat, a dog"),
    ("the front page, (black and white)++", "the front page, black and white"),
    ("a plain prompt, no weights", "a plain prompt, no weights"),
    ("a cat-dog hybrid", "a cat-dog hybrid"),
])
def test_plain_prompt_strips_compel_syntax(text, plain):
    assert plain_prompt(text) == plain


def test_compel_prompt_scores_as_its_plain_text(emb, images):
    weighted, stripped_off, plain = ClipScore(embedder=emb), ClipScore(embedder=emb, strip_weighting=False), \
        ClipScore(embedder=emb)
    weighted.update(images[:1], ["(oil on canvas)+++ portrait of a fisherman"])
    stripped_off.update(images[:1], ["(oil on canvas)+++ portrait of a fisherman"])
    plain.update(images[:1], ["oil on canvas portrait of a fisherman"])
    assert weighted.compute()["per_image"] == plain.compute()["per_image"]
    assert stripped_off.compute()["per_image"] != plain.compute()["per_image"]


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Empty HF hub + open_clip caches in tmp, offline, and any socket connect fails loudly."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    return tmp_path


def test_missing_weights_fail_fast_with_the_fix(empty_caches, monkeypatch):
    def never(*a, **k):
        raise AssertionError("open_clip was called before the weights check")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", never)
    t0 = time.perf_counter()
    with pytest.raises(MissingDependencyError) as err:
        ClipScore()  # the real-run default: ViT-L-14 / openai
    assert time.perf_counter() - t0 < 5
    msg = str(err.value)
    for part in ("'ViT-L-14'", "'openai'", "open_clip_pytorch_model.bin", "timm/vit_large_patch14_clip_224.openai",
                 "ViT-L-14.pt", "clip_weights=FILE", "--clip-pretrained FILE", str(empty_caches / "hf" / "hub"),
                 os.path.join(str(empty_caches / "home"), ".cache", "clip"), "smoke=True"):
        assert part in msg, part
    assert "Traceback" not in msg


def test_weights_found_in_caches_without_network(empty_caches, emb, monkeypatch):
    # HF hub cache layout, as hf_hub_download leaves it
    repo = empty_caches / "hf" / "hub" / "models--timm--vit_base_patch32_clip_224.openai"
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    (snap / "open_clip_pytorch_model.bin").write_bytes(b"x")
    path, cfg = resolve_clip_weights("ViT-B-32", "openai")
    assert path == str(snap / "open_clip_pytorch_model.bin") and cfg["quick_gelu"] is True
    # the embedder hands that file to open_clip with the tag's QuickGELU and preprocess settings (model stubbed)
    calls = []

    def fake_create(name, pretrained=None, **kw):
        calls.append((name, pretrained, kw))
        return emb.model, None, emb.preprocess

    monkeypatch.setattr(open_clip, "create_model_and_transforms", fake_create)
    tagged = ClipEmbedder("ViT-B-32", "openai")
    (name, src, kw), = calls
    assert (name, src, kw["force_quick_gelu"], kw["image_interpolation"]) == ("ViT-B-32", path, True, "bicubic")
    assert tagged.pretrained == "openai" and tagged.weights_file == path and not tagged.smoke
    assert ClipScore(embedder=tagged).info.display_name == "CLIP score (ViT-B-32/openai)"
    # open_clip's own URL cache (~/.cache/clip)
    clip_dir = empty_caches / "home" / ".cache" / "clip"
    clip_dir.mkdir(parents=True)
    (clip_dir / "ViT-B-16.pt").write_bytes(b"x")
    assert resolve_clip_weights("ViT-B-16", "openai")[0] == str(clip_dir / "ViT-B-16.pt")
    with pytest.raises(MissingDependencyError, match=r"open_clip_pytorch_model\.bin"):
        resolve_clip_weights("ViT-B-16", "laion400m_e31")


def test_bad_weight_arguments(empty_caches, tmp_path):
    with pytest.raises(ModelNotFoundError, match=r"nope\.bin.*does not exist.*--clip-pretrained FILE"):
        ClipEmbedder(SMALL, clip_weights=str(tmp_path / "nope.bin"))
    with pytest.raises(InvalidConfigError, match="'laion9' is not known for model 'ViT-B-32'.*openai"):
        ClipEmbedder("ViT-B-32", "laion9")
    with pytest.raises(InvalidConfigError, match="'ViT-Q-32' is not an open_clip model"):
        ClipEmbedder("ViT-Q-32", smoke=True)
    with pytest.raises(InvalidConfigError, match="smoke=True"):
        ClipEmbedder(SMALL, "openai", smoke=True)
    junk = tmp_path / "junk.bin"
    torch.save({"foo": torch.zeros(2)}, junk)
    with pytest.raises(ModelNotFoundError, match="does not load into open_clip model 'ViT-S-32'"):
        ClipEmbedder(SMALL, clip_weights=str(junk))


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_local_weights_file_loads_through_open_clip(emb, images, tmp_path, monkeypatch, suffix):
    path = tmp_path / f"clip{suffix}"
    state = {k: v.clone().contiguous() for k, v in emb.model.state_dict().items()}
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    calls = []
    real = open_clip.create_model_and_transforms

    def spy(name, pretrained=None, **kw):
        calls.append((name, pretrained))
        return real(name, pretrained=pretrained, **kw)

    monkeypatch.setattr(open_clip, "create_model_and_transforms", spy)
    loaded = ClipEmbedder(SMALL, clip_weights=str(path), seed=123)  # another seed: weights must come from the file
    assert calls == [(SMALL, str(path.resolve()))]
    assert loaded.smoke is False and loaded.pretrained == str(path.resolve())
    torch.testing.assert_close(loaded.encode_images(images), emb.encode_images(images))
    torch.testing.assert_close(loaded.encode_texts(PLAIN), emb.encode_texts(PLAIN))
    metric = ClipScore(embedder=loaded)
    metric.update(images[:2], PROMPTS[:2])
    out = metric.compute()
    assert out["smoke"] is False and out["label"] is None and metric.info.label is None
    assert metric.info.display_name == f"CLIP score ({SMALL}/clip{suffix})"


def test_smoke_is_labelled_and_deterministic(emb, images):
    metric = ClipScore(embedder=emb)
    assert metric.info.label == "smoke" and metric.info.higher_is_better and metric.info.kind == "per_image"
    assert "SMOKE" in metric.info.description and "smoke" in metric.info.display_name
    metric.update(images[:1], PROMPTS[:1])
    out = metric.compute()
    assert out["smoke"] is True and out["label"] == "smoke" and out["model"] == f"{SMALL}/random-init (smoke)"
    assert emb.smoke is True and emb.pretrained is None and emb.model_name == SMALL
    state = torch.random.get_rng_state()
    again = ClipEmbedder(SMALL, smoke=True)  # same seed -> same weights, and the global RNG is left alone
    torch.testing.assert_close(again.encode_images(images[:2]), emb.encode_images(images[:2]))
    assert torch.equal(state, torch.random.get_rng_state())
    # the tokenizer is the real CLIP BPE
    assert emb.tokenizer.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
