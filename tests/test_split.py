"""Bring your own model: exact cuts of torchvision and transformer models, clear refusals,
and a codec trained at the cut by distillation, run over a link."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from channels import FastLink
from flowcodec.codecs import build_codec
from flowcodec.errors import ConfigError, SplitError
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


# --- the user's model is left as it was; named errors for bad input -------------------------
def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )  # fmt: skip


def snapshot(model: nn.Module):
    return ([(n, m.training) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()])  # fmt: skip


def test_train_codec_leaves_the_users_model_as_it_was():
    import torchvision

    from flowcodec.codecs import build_codec
    from flowcodec.split import split_model, train_codec

    net = torchvision.models.resnet18(num_classes=10)
    net.layer1[0].bn1.eval()  # a mixed state the user chose: one BN frozen in a training model
    net.fc.weight.requires_grad_(False)
    before = snapshot(net)
    sm = split_model(net, "layer2", torch.randn(2, 3, 32, 32))
    assert snapshot(net) == before
    codec = build_codec("factorized", sm.feature_shape, latent=4, hidden=8)
    train_codec(sm, codec, [torch.randn(2, 3, 32, 32)], steps=2, progress=False)
    assert snapshot(net) == before
    assert all(p.grad is None for p in net.parameters())  # no gradients left in the model


def test_a_refused_codec_also_leaves_the_model_as_it_was():
    from flowcodec.codecs import build_codec
    from flowcodec.split import split_model, train_codec

    net = small_cnn().train()
    before = snapshot(net)
    sm = split_model(net, "2", torch.randn(2, 1, 8, 8))
    codec = build_codec("raw", sm.feature_shape)  # no trainable parameters: refused
    with pytest.raises(ConfigError, match="no trainable parameters"):
        train_codec(sm, codec, [torch.randn(2, 1, 8, 8)], steps=1, progress=False)
    codec = build_codec("factorized", sm.feature_shape, latent=2, hidden=4)
    with pytest.raises(ConfigError, match="empty"):  # fails inside the loop
        train_codec(sm, codec, [torch.zeros(0, 1, 8, 8)], steps=1, progress=False)
    assert snapshot(net) == before


@pytest.fixture
def cut():
    from flowcodec.codecs import build_codec
    from flowcodec.split import split_model

    sm = split_model(small_cnn().eval(), "2", torch.randn(2, 1, 8, 8))
    return sm, build_codec("factorized", sm.feature_shape, latent=2, hidden=4)


def test_train_codec_names_empty_inputs(cut):
    from flowcodec.split import train_codec

    sm, codec = cut
    with pytest.raises(ConfigError, match="no batches"):
        train_codec(sm, codec, [], steps=2, progress=False)
    with pytest.raises(ConfigError, match="batch 1 of inputs is empty"):
        train_codec(sm, codec, [torch.randn(2, 1, 8, 8), torch.zeros(0, 1, 8, 8)], steps=3,
                    progress=False)  # fmt: skip
    with pytest.raises(ConfigError, match="steps"):
        train_codec(sm, codec, [torch.randn(2, 1, 8, 8)], steps=0, progress=False)


def test_train_codec_cycles_a_short_generator(cut):
    from flowcodec.split import train_codec

    sm, codec = cut
    gen = (torch.randn(4, 1, 8, 8) for _ in range(2))  # one-shot, shorter than steps
    res = train_codec(sm, codec, gen, steps=5, progress=False)
    assert res.steps == 5
    assert res.distortion == res.distortion and res.bits == res.bits  # not NaN


def test_train_codec_makes_no_float_warning(cut, recwarn):
    from flowcodec.split import train_codec

    sm, codec = cut
    train_codec(sm, codec, [torch.randn(2, 1, 8, 8)], steps=2, progress=False)
    assert not [w for w in recwarn if "requires_grad" in str(w.message)]


def test_empty_batches_are_named_errors(cut):
    from channels import IIDPacketErasure
    from flowcodec.codecs import build_codec

    sm, codec = cut
    codec.update(force=True)
    with pytest.raises(ConfigError, match="empty batch"):
        sm.flow(codec, IIDPacketErasure(0.0)).run(torch.zeros(0, 1, 8, 8))
    raw = build_codec("raw", sm.feature_shape)
    with pytest.raises(ConfigError, match="empty batch"):
        raw(torch.zeros(0, *sm.feature_shape))
    with pytest.raises(ConfigError, match="empty batch"):
        raw.compress(torch.zeros(0, *sm.feature_shape))


def test_split_model_refuses_an_unbatched_example():
    from flowcodec.split import split_model

    for at in ("0", "1", "2"):  # conv2d takes an unbatched (C, H, W); BatchNorm does not
        with pytest.raises(SplitError, match="batch"):
            split_model(small_cnn(), at, torch.zeros(1, 8, 8))
    with pytest.raises(SplitError, match="empty batch"):
        split_model(small_cnn(), "1", torch.zeros(0, 1, 8, 8))
    assert split_model(small_cnn(), "1", torch.zeros(1, 1, 8, 8)).feature_shape == (4, 8, 8)
