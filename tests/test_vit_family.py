"""The early-exit ViT family: exact splits with a tokens layout, distillation, fp16 storage."""

from __future__ import annotations

import pytest
import torch

from flowcodec.codecs import build_codec
from flowcodec.data import ArrayDataset
from flowcodec.errors import ConfigError
from flowcodec.family import TrainConfig, build_family, load_family, save_family, train_family
from flowcodec.family.pretrained import ZOO_DIR
from flowcodec.family.vit import copy_stem

TINY = {"dim": 32, "heads": 2, "depths": [1, 1, 1]}


def _tiny(seed: int = 0):
    torch.manual_seed(seed)
    return build_family("cifar10-vit", **TINY)


def test_split_is_bit_exact_and_reports_tokens():
    fam = _tiny().eval()
    x = torch.randn(3, 3, 32, 32)
    for k in range(1, 4):
        want = fam.member(k)(x)
        assert torch.equal(fam(x)[k - 1], want)
        for p in range(k + 1):
            head, tail = fam.split(k, p)
            h = head(x)
            assert torch.equal(tail(h), want), (k, p)
            shape = fam.feature_shape(p)
            assert tuple(h.shape[1:]) == shape
            assert getattr(shape, "layout", "chw") == ("chw" if p == 0 else "tokens")
    assert fam.feature_shape(2) == (65, 32)


def test_members_grow_and_exits_are_a_block_norm_and_head():
    info = _tiny().info()
    assert [m.params for m in info] == sorted(m.params for m in info)
    assert info[0].flops < info[1].flops < info[2].flops
    ex = _tiny().exits[0]
    assert [type(m).__name__ for m in ex.children()] == ["Block", "LayerNorm", "Linear"]


def test_map_codecs_refuse_tokens_and_token_codecs_take_them():
    shape = _tiny().feature_shape(1)
    with pytest.raises(ConfigError, match="tokens"):
        build_codec("factorized", shape)
    codec = build_codec("token-merge", shape, clusters=4, latent=4, hidden=16).eval()
    h = _tiny().eval().features(torch.randn(2, 3, 32, 32), 1)
    codec.fit(h)
    codec.update(force=True)
    assert codec.decompress(codec.compress(h)).shape == h.shape


def test_bad_configs_are_config_errors():
    with pytest.raises(ConfigError, match="multiple of heads"):
        build_family("cifar10-vit", dim=30, heads=4)
    with pytest.raises(ConfigError, match="depths"):
        build_family("cifar10-vit", depths=[2, 0])


def test_copy_stem_takes_the_cnn_first_stage():
    vit, cnn = _tiny(), build_family("cifar10")
    copy_stem(vit, cnn)
    for (k, a), b in zip(vit.stages[0][0].stem.state_dict().items(),
                         cnn.stages[0].state_dict().values()):  # fmt: skip
        assert torch.equal(a, b), k
    with pytest.raises(ConfigError, match="does not fit"):
        copy_stem(vit, build_family("cifar10", width=16))


def _toy_data(n: int = 64) -> ArrayDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return ArrayDataset(x, y, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_distillation_changes_training_and_needs_a_teacher():
    data = _toy_data()
    cfg = dict(epochs=1, batch_size=32, lr=1e-3, optimizer="adamw", progress=False, amp=False)
    with pytest.raises(ConfigError, match="teacher"):
        train_family(_tiny(), data, config=TrainConfig(**cfg, distill=0.5))
    with pytest.raises(ConfigError, match="distill"):
        TrainConfig(**cfg, distill=1.5)
    torch.manual_seed(1)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    plain, kd, kd2 = _tiny(), _tiny(), _tiny()
    train_family(plain, data, config=TrainConfig(**cfg))
    train_family(kd, data, config=TrainConfig(**cfg, distill=0.5), teacher=teacher)
    train_family(kd2, data, config=TrainConfig(**cfg, distill=0.5), teacher=teacher)
    w = "exits.2.head.weight"
    assert not torch.equal(plain.state_dict()[w], kd.state_dict()[w])
    assert torch.equal(kd.state_dict()[w], kd2.state_dict()[w])  # seeded: repeatable
    assert not any(p.requires_grad for p in teacher.parameters())  # frozen by training


def test_half_storage_round_trip(tmp_path):
    fam = _tiny().eval()
    weights = save_family(fam, tmp_path / "vit", half=True)
    full = save_family(fam, tmp_path / "vit32")
    assert weights.stat().st_size < 0.6 * full.stat().st_size
    back = load_family(tmp_path / "vit").eval()
    assert back.layout == "tokens"
    for (k, a), b in zip(fam.state_dict().items(), back.state_dict().values()):
        assert b.dtype == a.dtype, k
        assert torch.equal(a.half().to(a.dtype), b) if a.is_floating_point() else torch.equal(a, b)


@pytest.mark.skipif(not (ZOO_DIR / "cifar10-vit-family.json").is_file(),
                    reason="the ViT family is not in this checkout's zoo")
@pytest.mark.data
def test_shipped_vit_family_loads_and_is_accurate(cifar10):
    from flowcodec.family import evaluate_family, load_pretrained

    fam = load_pretrained("cifar10-vit")
    accs = evaluate_family(fam, cifar10[1].subset(1000, seed=0))
    assert accs[0] < accs[2] and accs[2] >= 0.75, accs


def _vit_codecs() -> list[str]:
    from flowcodec.codecs.zoo import list_pretrained

    return [n for n in list_pretrained() if n.startswith("cifar10vit-")]


@pytest.mark.skipif(not (ZOO_DIR / "cifar10-vit-family.json").is_file(),
                    reason="the ViT family is not in this checkout's zoo")
@pytest.mark.data
@pytest.mark.parametrize("name", _vit_codecs())
def test_shipped_vit_token_codecs_round_trip(cifar10, name):
    """Every shipped ViT token codec decodes what it sends (equal to forward in eval mode),
    on real tokens of the shipped family, and a lost packet is concealed, not fatal."""
    from flowcodec.codecs.zoo import load_pretrained_codec
    from flowcodec.family import load_pretrained

    fam = load_pretrained("cifar10-vit")
    codec = load_pretrained_codec(name).eval()
    x, _ = next(cifar10[1].batches(16))
    with torch.no_grad():
        h = fam.features(x, 2)
        want = codec(h).features
    streams = codec.compress(h)
    torch.testing.assert_close(codec.decompress(streams), want, atol=1e-4, rtol=1e-4)
    streams[0].packets[0] = None
    got = codec.decompress(streams)
    assert got.shape == h.shape and torch.isfinite(got).all()
