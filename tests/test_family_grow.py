"""Growing a family: a new, wider last member trained on the frozen trunk of a trained one."""

from __future__ import annotations

import pytest
import torch

from flowcodec.data import ArrayDataset
from flowcodec.errors import ConfigError
from flowcodec.family import build_family, load_family, save_family
from flowcodec.family.grow import GrowConfig, cache_trunk_views, grow_member


def _tiny_data(n: int, seed: int) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    classes = [str(i) for i in range(10)]
    return ArrayDataset(x, y, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), True, classes)


@pytest.fixture(scope="module")
def source():
    torch.manual_seed(0)
    return build_family("cifar10", width=8).eval()


def test_grown_family_keeps_the_device_members_bit_for_bit(source, tmp_path):
    torch.manual_seed(1)
    grown = build_family("cifar10", width=8, cloud="xl")
    assert grown.info()[2].flops > 1.5 * source.info()[2].flops  # the new member is larger
    assert [m.flops for m in grown.info()[:2]] == [m.flops for m in source.info()[:2]]
    train, test = _tiny_data(96, 0), _tiny_data(40, 1)
    before = {k: v.clone() for k, v in grown.stages[2].state_dict().items()}
    res = grow_member(source, grown, train, test,
                      GrowConfig(epochs=2, views=2, batch_size=32, progress=False))  # fmt: skip
    assert res.epochs_done == 2 and len(res.history) == 2 and len(res.accuracies) == 3
    changed = any(not torch.equal(before[k], v) for k, v in grown.stages[2].state_dict().items())
    assert changed, "the new stage was not trained"
    x = torch.randn(5, 3, 32, 32)
    for k in (1, 2):
        assert torch.equal(grown.member(k).eval()(x), source.member(k)(x))
    for p in (1, 2):
        assert torch.equal(grown.features(x, p), source.features(x, p))
    # the source family is not touched
    assert all(not q.requires_grad or q.grad is None for q in source.parameters())
    # saved and loaded through the registry, with its config
    save_family(grown, tmp_path / "g", res)
    again = load_family(tmp_path / "g").eval()
    grown.eval()
    assert again.config["cloud"] == "xl"
    # (the trained stage is channels-last, the loaded one contiguous: same values, other
    # convolution kernels)
    torch.testing.assert_close(again.member(3)(x), grown.member(3)(x), atol=1e-6, rtol=1e-5)


def test_grow_resumes_after_the_last_saved_epoch(source, tmp_path):
    train = _tiny_data(64, 2)
    cfg = dict(views=1, batch_size=32, progress=False, ema=0.0)
    torch.manual_seed(3)
    a = build_family("cifar10", width=8, cloud="xl")
    grow_member(source, a, train, None, GrowConfig(epochs=1, **cfg), checkpoint=tmp_path / "s")
    torch.manual_seed(3)
    b = build_family("cifar10", width=8, cloud="xl")
    res = grow_member(source, b, train, None, GrowConfig(epochs=2, **cfg),
                      checkpoint=tmp_path / "s", resume=True)  # fmt: skip
    assert res.epochs_done == 2 and [r["epoch"] for r in res.history] == [1, 2]
    torch.manual_seed(3)
    c = build_family("cifar10", width=8, cloud="xl")
    grow_member(source, c, train, None, GrowConfig(epochs=2, **cfg))  # in one go
    for (k, v), w in zip(b.state_dict().items(), c.state_dict().values(), strict=True):
        assert torch.allclose(v.float(), w.float(), atol=1e-5), k


def test_cached_views_are_the_trunk_features(source):
    data = _tiny_data(10, 4)
    head, _ = source.split(3, 2)
    feats = cache_trunk_views(head, data, 3, 2, torch.Generator().manual_seed(0), progress=False)
    assert feats.shape == (3, 10, 32, 8, 8) and feats.dtype == torch.float16
    with torch.no_grad():
        want = head(data.normalize(data.images))
    assert torch.allclose(feats[0].float(), want, atol=1e-2, rtol=1e-2)  # view 0 unaugmented
    assert not torch.equal(feats[1], feats[0])


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(lr=0.0), dict(ema=1.0), dict(views=0)])
def test_bad_grow_configs_are_refused(bad):
    with pytest.raises(ConfigError):
        GrowConfig(**bad)


def test_unknown_cloud_stage_is_refused():
    with pytest.raises(ConfigError, match="cloud stage"):
        build_family("cifar10", cloud="huge")


def test_a_branching_cloud_member_reads_split_point_1_and_keeps_every_device_member(source):
    torch.manual_seed(4)
    grown = build_family("cifar10", width=8, cloud="air")
    assert grown.num_members == 4 and grown.parents == [0, 1, 2, 1] and grown.branched
    assert grown.stages[3][1].conv2.weight.shape == (64, 64, 3, 3)  # 8 x width
    assert grown.path(4) == [0, 1, 4] and grown.path(3) == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="one of \\[0, 1, 4\\]"):
        grown.split(4, 2)  # member 4 does not pass through point 2
    train, test = _tiny_data(64, 5), _tiny_data(32, 6)
    res = grow_member(source, grown, train, test,
                      GrowConfig(epochs=1, views=1, batch_size=32, progress=False))  # fmt: skip
    assert len(res.accuracies) == 4
    grown.eval()
    x = torch.randn(3, 3, 32, 32)
    for k in (1, 2, 3):  # every member of the source, bit for bit
        assert torch.equal(grown.member(k)(x), source.member(k)(x))
    head, tail = grown.split(4, 1)
    assert torch.equal(head(x), source.features(x, 1))
    assert torch.equal(tail(head(x)), grown.member(4)(x))
    assert torch.equal(grown(x)[3], grown.member(4)(x))  # the joint pass follows the branch
    assert grown.head_flops(1) == source.head_flops(1)
    assert grown.info()[3].flops > grown.info()[0].flops


def test_parents_must_name_earlier_split_points():
    fam = build_family("cifar10", width=8)
    with pytest.raises(ConfigError, match="parents"):
        type(fam)(list(fam.stages), list(fam.exits), (3, 32, 32), parents=[0, 2, 1])


def test_cifar10_cloud_is_cifar10_with_a_branching_member_4_and_names_its_receivers():
    from flowcodec.family.pretrained import RECIPES, grow_settings

    torch.manual_seed(0)
    cloud = build_family("cifar10-cloud", width=8)
    plain = build_family("cifar10", width=8)
    assert cloud.config["name"] == "cifar10-cloud" and cloud.parents == [0, 1, 2, 1]
    assert [m.flops for m in cloud.info()[:3]] == [m.flops for m in plain.info()]
    # the default receiver from each split point: member 4 from 0 and 1, member 3 beyond
    assert [cloud.receiver(p) for p in range(5)] == [4, 4, 3, 3, 4]
    assert [plain.receiver(p) for p in range(4)] == [3, 3, 3, 3]
    assert RECIPES["cifar10-cloud"]["grow_from"] == ["cifar10", "air"]
    same = grow_settings("cifar10", "air")
    assert grow_settings("cifar10-cloud", None)["epochs"] == same["epochs"]
    with pytest.raises(ConfigError, match="cloud must be one of"):
        build_family("cifar10-cloud", cloud="xl")


def test_teacher_logits_are_cached_on_the_same_augmented_views(source):
    data = _tiny_data(12, 7)
    head, _ = source.split(3, 1)
    teacher = source.member(3).eval()
    feats, logits = cache_trunk_views(head, data, 3, 2, torch.Generator().manual_seed(0),
                                      progress=False, teacher=teacher)  # fmt: skip
    again = cache_trunk_views(head, data, 3, 2, torch.Generator().manual_seed(0), progress=False)
    assert torch.equal(feats, again)  # the teacher draws nothing from the generator
    assert logits.shape == (3, 12, 10) and logits.dtype == torch.float16
    # the teacher saw the very images whose features were cached: its tail from split point 1
    # on those features gives its cached answer
    _, tail = source.split(3, 1)
    with torch.no_grad():
        for v in range(3):
            want = tail(feats[v].float())
            torch.testing.assert_close(logits[v].float(), want, atol=0.05, rtol=0.05)


def test_air_recipe_with_distillation_trains_the_branch_and_resumes_exactly(source, tmp_path):
    train, test = _tiny_data(64, 8), _tiny_data(32, 9)
    teacher = source.member(3).eval()
    cfg = dict(views=2, batch_size=32, progress=False, recipe="air", lr=10.0, momentum=0.85,
               weight_decay=0.0153, distill=0.5)  # fmt: skip
    torch.manual_seed(5)
    a = build_family("cifar10", width=8, cloud="air")
    before = {k: v.clone() for k, v in a.stages[3].state_dict().items()}
    res = grow_member(source, a, train, test, GrowConfig(epochs=2, **cfg), teacher=teacher)
    assert res.epochs_done == 2 and all(r["loss"] > 0 for r in res.history)
    assert any(not torch.equal(before[k], v) for k, v in a.stages[3].state_dict().items())
    x = torch.randn(3, 3, 32, 32)
    a.eval()
    for k in (1, 2, 3):
        assert torch.equal(a.member(k)(x), source.member(k)(x))
    # one epoch, then a resume to two: the same weights as two in one go (the lookahead
    # average is part of the saved state)
    torch.manual_seed(5)
    b = build_family("cifar10", width=8, cloud="air")
    grow_member(source, b, train, None, GrowConfig(epochs=1, **cfg), checkpoint=tmp_path / "s",
                teacher=teacher)  # fmt: skip
    torch.manual_seed(5)
    c = build_family("cifar10", width=8, cloud="air")
    grow_member(source, c, train, None, GrowConfig(epochs=2, **cfg), checkpoint=tmp_path / "s",
                resume=True, teacher=teacher)  # fmt: skip
    for (k, v), w in zip(a.state_dict().items(), c.state_dict().values(), strict=True):
        assert torch.allclose(v.float(), w.float(), atol=1e-5), k


def test_distillation_without_a_teacher_is_refused(source):
    grown = build_family("cifar10", width=8, cloud="air")
    with pytest.raises(ConfigError, match="teacher"):
        grow_member(source, grown, _tiny_data(32, 1), None,
                    GrowConfig(epochs=1, views=1, batch_size=32, progress=False, distill=0.5))


@pytest.mark.parametrize("bad", [dict(recipe="adam"), dict(distill=1.5), dict(temperature=0.0)])
def test_bad_recipe_or_distillation_settings_are_refused(bad):
    with pytest.raises(ConfigError):
        GrowConfig(**bad)


def test_airbench_is_airbench_s_network_as_a_one_member_family():
    from flowcodec.family.pretrained import RECIPES

    net = build_family("airbench")
    assert net.num_members == 1 and RECIPES["airbench"]["trainer"] == "air"
    info = net.info()[0]
    assert 1.9e6 < info.params < 2.1e6 and 230e6 < info.flops < 240e6  # airbench's size
    x = torch.randn(2, 3, 32, 32)
    assert net(x)[0].shape == (2, 10)
    with pytest.raises(ConfigError, match="3 positive widths"):
        build_family("airbench", widths=[64, 256])
