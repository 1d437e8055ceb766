"""Bring your own model: exact cuts of torchvision and transformer models, clear refusals,
and a codec trained at the cut by distillation, run over a link."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from channels import FastLink
from flowcodec.codecs import build_codec
from flowcodec.errors import SplitError
from flowcodec.split import split_model, train_codec


def _check_exact(model, at, x):
    model.eval()
    sm = split_model(model, at, x[:1])
    with torch.no_grad():
        h = sm.head(x)
        assert tuple(h.shape[1:]) == sm.feature_shape
        assert torch.allclose(sm.tail(h), model(x), atol=1e-5)
    return sm


def test_resnet18_cut_after_layer2():
    torch.manual_seed(0)
    sm = _check_exact(torchvision.models.resnet18(num_classes=10), "layer2",
                      torch.randn(2, 3, 64, 64))  # fmt: skip
    assert sm.feature_shape == (128, 8, 8)


def test_mobilenet_v3_cut_inside_features():
    torch.manual_seed(0)
    sm = _check_exact(torchvision.models.mobilenet_v3_small(num_classes=10), "features.3",
                      torch.randn(2, 3, 64, 64))  # fmt: skip
    assert sm.feature_shape[0] == 24


def test_vision_transformer_cut_between_encoder_blocks():
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=3,
                                               num_heads=2, hidden_dim=32, mlp_dim=64,
                                               num_classes=10)  # fmt: skip
    sm = _check_exact(vit, "encoder.layers.encoder_layer_0", torch.randn(2, 3, 32, 32))
    assert sm.feature_shape == (17, 32)  # 16 patches + class token, width 32


def test_sequential_is_sliced():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    sm = _check_exact(model, "1", torch.randn(5, 4))
    assert isinstance(sm.head, nn.Sequential) and len(sm.head) == 2


def test_unknown_module_suggests_names():
    with pytest.raises(SplitError, match="did you mean.*layer2"):
        split_model(torchvision.models.resnet18(), "layer_2", torch.randn(1, 3, 32, 32))


def test_cut_across_a_skip_connection_is_refused():
    with pytest.raises(SplitError, match="skip connection"):
        split_model(torchvision.models.resnet18(), "layer2.0.conv1", torch.randn(1, 3, 32, 32))


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Linear(4, 4)

    def forward(self, x):
        return self.f(self.f(x))


class _Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:  # data-dependent control flow
            return self.b(h)
        return h


def test_module_called_twice_or_untraceable_is_refused():
    with pytest.raises(SplitError, match="called 2 times"):
        split_model(_Twice(), "f", torch.randn(1, 4))
    with pytest.raises(SplitError, match="cannot trace"):
        split_model(_Branchy(), "a", torch.randn(1, 4))


def test_codec_trained_by_distillation_runs_over_a_link(digits_family, digits):
    """Five lines of user code: cut, attach, train without labels, run over a link."""
    train, test = digits
    member = digits_family.member(3)
    model = nn.Sequential(*member.stages, member.exit).eval()  # "your own model"
    sm = split_model(model, "1", torch.randn(1, 1, 8, 8))
    codec = build_codec("factorized", sm.feature_shape, latent=8, hidden=32)
    res = train_codec(sm, codec, [x for x, _ in train.batches(64, shuffle=True,
                      generator=torch.Generator().manual_seed(0))], steps=300, lam=2e-3,
                      progress=False)  # fmt: skip
    codec.update(force=True)
    flow = sm.flow(codec, FastLink(mcs=9, snr_db=15.0, seed=0), symbol_rate=1e6)
    x, _ = next(test.batches(len(test)))
    out = flow.run(x)
    agree = float((out.predictions == model(x).argmax(1)).float().mean())
    raw_bytes = 4 * torch.Size(sm.feature_shape).numel()
    assert res.steps == 300
    assert agree >= 0.85, agree
    assert out.mean_bits() / 8 < raw_bytes / 4, (out.mean_bits() / 8, raw_bytes)
