"""Bring your own transformer: the README's five lines on torchvision's ViT, a classifier
built on nn.TransformerEncoder and a swin transformer (small random-weight configurations,
nothing downloaded), exact cuts, reported layouts, and clear refusals."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from channels import FastLink
from flowcodec.codecs import build_codec
from flowcodec.errors import ConfigError, SplitError
from flowcodec.split import split_model, train_codec


class EncoderClassifier(nn.Module):
    """A classifier on nn.TransformerEncoder, as a user would write it."""

    def __init__(self, layers=3, width=32, norm=True):
        super().__init__()
        self.embed = nn.Linear(48, width)  # 4x4x3 patches
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        layer = nn.TransformerEncoderLayer(width, 2, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, nn.LayerNorm(width) if norm else None,
                                             enable_nested_tensor=False)  # fmt: skip
        self.head = nn.Linear(width, 10)

    def forward(self, x):
        p = x.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)
        t = self.embed(p)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1)
        return self.head(self.encoder(t)[:, 0])


def _vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                                num_heads=2, hidden_dim=32, mlp_dim=64,
                                                num_classes=10)  # fmt: skip


def _swin():
    return torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1],
                                              num_heads=[2, 2], window_size=[4, 4],
                                              num_classes=10)  # fmt: skip


def _images(n, seed):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _exact(sm, model, x):
    with torch.no_grad():
        return torch.allclose(sm.tail(sm.head(x)), model(x), atol=1e-5)


CASES = {
    # model, cut, layout, feature shape, codec and its kwargs
    "vit": (_vit, "encoder.layers.encoder_layer_0", "tokens", (17, 32), "token-prune",
            dict(latent=8, hidden=32, packets=2)),
    "transformer-encoder": (EncoderClassifier, "encoder.layers.1", "tokens", (65, 32),
                            "token-prune", dict(latent=8, hidden=32, packets=4)),
    "swin": (_swin, "features.1", "chw", (16, 8, 8), "factorized",
             dict(latent=8, hidden=16, packets=2, nonneg=False)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_five_lines_work_for_transformers(name):
    """Cut, attach a codec at the cut, train it by distillation, run it over a link."""
    make, at, layout, shape, codec_name, kw = CASES[name]
    torch.manual_seed(0)
    model = make().eval()
    x = _images(8, 1)
    split = split_model(model, at, x[:1])
    assert split.feature_shape == shape and split.layout == layout
    assert _exact(split, model, x)
    codec = build_codec(codec_name, split.feature_shape, **kw)
    before = [p.detach().clone() for p in codec.parameters()]
    res = train_codec(split, codec, [_images(16, s) for s in range(4)], steps=6, lam=1e-3,
                      progress=False)  # fmt: skip
    assert res.steps == 6 and any(not torch.equal(a, b) for a, b in
                                  zip(before, codec.parameters()))  # fmt: skip
    codec.update(force=True)
    result = split.flow(codec, FastLink(mcs=9, snr_db=15.0, seed=0)).run(x)
    assert result.predictions.shape == (8,)
    assert 0 < result.mean_bits() / 8 < 4 * torch.Size(shape).numel()
    assert all(m.training is False for m in model.modules())  # the model is left as it was


def test_swin_channels_last_features_are_detected_not_misread():
    swin = _swin().eval()
    x = _images(2, 2)
    moved = split_model(swin, "features.1", x[:1])
    assert moved.native_layout == "hwc" and moved.feature_shape == (16, 8, 8)
    with torch.no_grad():
        assert torch.equal(moved.head(x), swin.features[:2](x).permute(0, 3, 1, 2))
    kept = split_model(swin, "features.1", x[:1], channels_first=False)
    assert kept.feature_shape == (8, 8, 16) and kept.layout == "hwc" and _exact(kept, swin, x)
    with pytest.raises(ConfigError, match="channels-last|channels_first=True"):
        build_codec("factorized", kept.feature_shape)  # would take H = 8 as the channels
    tok = build_codec("token-prune", kept.feature_shape, latent=4, hidden=16)
    assert tok.n_tokens == 64 and tok.width == 16


def test_transformer_encoder_cuts_between_every_layer_exactly():
    torch.manual_seed(0)
    for norm in (True, False):
        model = EncoderClassifier(norm=norm).eval()
        x = _images(3, 3)
        for i in range(3):
            sm = split_model(model, f"encoder.layers.{i}", x[:1])
            assert sm.feature_shape == (65, 32) and _exact(sm, model, x)
        assert _exact(split_model(model, "encoder", x[:1]), model, x)  # after it: a leaf


class _Gated(nn.Module):
    """A block with data-dependent control flow that a user's model might contain."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x) if x.mean() > -10 else x


class _WithGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.gate, self.out = nn.Linear(4, 8), _Gated(), nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.gate(self.stem(x)))


def test_untraceable_submodule_is_kept_whole_with_leaf_modules():
    model = _WithGate().eval()
    x = torch.randn(4, 4)
    with pytest.raises(SplitError, match="leaf_modules"):
        split_model(model, "stem", x[:1])
    for leaves in (["gate"], [_Gated]):
        sm = split_model(model, "stem", x[:1], leaf_modules=leaves)
        assert sm.feature_shape == (8,) and sm.layout == "vector"
        assert _exact(sm, model, x)
    with pytest.raises(SplitError, match="contains the cut"):
        split_model(model, "gate.lin", x[:1], leaf_modules=["gate"])
    with pytest.raises(SplitError, match="no module named"):
        split_model(model, "out", x[:1], leaf_modules=["gat"])


def test_masked_transformer_encoder_call_is_refused_with_the_reason():
    class Masked(EncoderClassifier):
        def forward(self, x):
            t = self.embed(x)
            return self.head(self.encoder(t, mask=self.mask)[:, 0])

    model = Masked()
    model.mask = torch.zeros(5, 5)
    with pytest.raises(SplitError, match="mask-free"):
        split_model(model, "encoder.layers.0", torch.randn(1, 5, 48))


def test_layouts_reported_for_cnns_and_overridable():
    r = torchvision.models.resnet18(num_classes=10).eval()
    sm = split_model(r, "layer2", _images(1, 0))
    assert sm.layout == "chw" and sm.native_layout == "chw"
    vec = split_model(r, "avgpool", _images(1, 0))
    assert vec.layout == "chw"  # (512, 1, 1)
    seq = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    assert split_model(seq, "1", torch.randn(1, 4)).layout == "vector"
    forced = split_model(r, "layer2", _images(1, 0), layout="other")
    assert forced.layout == "other"
    with pytest.raises(SplitError, match="layout must be"):
        split_model(r, "layer2", _images(1, 0), layout="nhwc")


def test_raw_codec_in_train_codec_says_there_is_nothing_to_train():
    model = _vit().eval()
    sm = split_model(model, "encoder.layers.encoder_layer_0", _images(1, 0))
    with pytest.raises(ConfigError, match="nothing to train.*token-prune"):
        train_codec(sm, build_codec("raw", sm.feature_shape), [_images(2, 0)], steps=1,
                    progress=False)  # fmt: skip
