"""sdxl_core.numerics: closeness metrics and activation tracking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from sdxl_core.numerics import (FP16_MAX, ActivationStats, image_max_abs_diff, image_psnr, relative_l2,
                                track_activations)


def test_relative_l2():
    b = torch.tensor([3.0, 4.0])
    assert relative_l2(b, b) == 0.0
    assert relative_l2(2 * b, b) == pytest.approx(1.0)
    assert relative_l2(torch.tensor([3.0, 5.0]), b) == pytest.approx(1 / 5)
    assert relative_l2(b, torch.zeros(2)) == pytest.approx(5.0)  # zero reference: the absolute norm
    # float64 accumulation: bf16/fp16 inputs are fine
    assert relative_l2(b.to(torch.bfloat16), b.half()) == 0.0


def test_image_psnr_identical_is_inf():
    img = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert image_psnr(img, img.copy()) == math.inf
    assert image_psnr(Image.fromarray(img), Image.fromarray(img)) == math.inf


def test_image_psnr_known_mse():
    a = np.zeros((4, 4, 3), dtype=np.uint8)
    b = np.full((4, 4, 3), 10, dtype=np.uint8)  # MSE 100
    assert image_psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 100))  # 28.13 dB
    assert image_psnr(b, a) == pytest.approx(28.1308, abs=1e-4)
    c = np.zeros((4, 4, 3), dtype=np.uint8)
    c[0, 0, 0] = 255  # no uint8 wrap-around: MSE = 255^2 / 48
    assert image_psnr(a, c) == pytest.approx(10 * math.log10(48))
    assert image_psnr(Image.fromarray(a), Image.fromarray(b)) == pytest.approx(28.1308, abs=1e-4)


def test_image_max_abs_diff():
    a = np.zeros((2, 2), dtype=np.uint8)
    b = a.copy()
    b[1, 1] = 200
    assert image_max_abs_diff(a, b) == 200 and image_max_abs_diff(b, a) == 200
    assert image_max_abs_diff(a, a) == 0


def _model():
    lin = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, 3.0]]))
    return nn.Sequential(lin, nn.ReLU())


def test_track_activations_known_max():
    model = _model()
    with torch.no_grad(), track_activations(model) as stats:
        model(torch.tensor([[1.0, -4.0]]))  # linear: [2, -12]; relu: [2, 0]
    (s,) = stats
    assert isinstance(s, ActivationStats)
    assert s.max_abs == 12.0
    assert s.all_finite is True
    assert s.worst_module == "0"
    assert s.fp16_headroom == pytest.approx(FP16_MAX / 12)
    # the hooks are gone afterwards
    assert all(not m._forward_hooks for m in model.modules())


def test_track_activations_nan():
    model = _model()
    with torch.no_grad(), track_activations(model) as stats:
        model(torch.tensor([[1.0, float("nan")]]))
    (s,) = stats
    assert s.all_finite is False
    assert math.isnan(s.max_abs)
    assert s.worst_module == "0"


def test_track_activations_inf_is_not_finite():
    model = _model()
    with torch.no_grad(), track_activations(model) as stats:
        model(torch.tensor([[1.0, 2e38]]))  # 6e38 overflows float32 (max 3.4e38)
    assert stats[0].all_finite is False and stats[0].max_abs == math.inf


def test_track_activations_nothing_seen():
    model = _model()
    with track_activations(model) as stats:
        pass
    assert stats == [ActivationStats(0.0, True, "")]
    assert stats[0].fp16_headroom == math.inf


def test_track_activations_tuple_outputs():
    class Pair(nn.Module):
        def forward(self, x):
            return x * 5, torch.arange(3)  # the integer tensor is ignored

    model = nn.Sequential(Pair())
    with track_activations(model) as stats:
        model(torch.ones(2))
    assert stats[0].max_abs == 5.0 and stats[0].worst_module == "0"
