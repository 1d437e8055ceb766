"""The cooperative benchmark's stronger baselines (issue 28): the largest member fine-tuned on
single views, every view sent as WebP and fused by the member, and the views picture."""

from __future__ import annotations

import pytest
import torch

from flowcodec.coop.bench import check_qualities, webp_codecs, webp_fuse
from flowcodec.coop.finetune import (
    FinetuneConfig,
    finetune_member,
    load_finetuned,
    save_finetuned,
)
from flowcodec.coop.views import ViewConfig, ViewGenerator
from flowcodec.errors import CheckpointError, ConfigError

CFG = dict(epochs=1, batch_size=64, lr=1e-3, optimizer="adamw", eval_n=60)


# --- one device's view ------------------------------------------------------------------------
def test_one_view_per_sample_is_the_views_slice():
    gen = ViewGenerator(ViewConfig(devices=4, seed=2))
    x, idx = torch.rand(6, 3, 16, 16), torch.arange(10, 16)
    every = gen(x, idx)
    pos = torch.tensor([0, 3, 1, 1, 2, 0])
    assert torch.equal(gen.view(x, idx, pos), every[torch.arange(6), pos])
    assert torch.equal(gen.view(x, idx, 2), every[:, 2])
    with pytest.raises(ConfigError, match="positions"):
        gen.view(x, idx, 4)
    with pytest.raises(ConfigError, match="position"):
        gen.view(x, idx, torch.zeros(5, dtype=torch.long))
    with pytest.raises(ConfigError, match="position"):
        gen.view(x, idx, torch.zeros(6))


# --- the largest member fine-tuned on single views ---------------------------------------------
@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, digits_family, digits):
    train, test = digits
    views = ViewGenerator(ViewConfig(devices=4))
    before = {k: v.clone() for k, v in digits_family.state_dict().items()}
    flags = [p.requires_grad for p in digits_family.parameters()]
    mode = digits_family.training
    out = tmp_path_factory.mktemp("ft") / "digits-m3-views"
    model, res = finetune_member(digits_family, views, train, test, FinetuneConfig(**CFG),
                                 checkpoint=out, progress=False)
    save_finetuned(model, out, digits_family, views.cfg, {"seconds": res.seconds})
    after = digits_family.state_dict()
    untouched = all(torch.equal(before[k], after[k]) for k in before) \
        and flags == [p.requires_grad for p in digits_family.parameters()] \
        and mode == digits_family.training
    return model, res, out, views, untouched


def test_finetuning_trains_a_copy_and_leaves_the_family_alone(finetuned, digits_family):
    model, res, _, views, untouched = finetuned
    assert untouched
    assert model.index == digits_family.num_members and not model.training
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(model.parameters(),
                                                            digits_family.parameters()))
    assert res.epochs == 1 and res.steps == 1437 // 64
    assert len(res.before) == len(res.after) == views.devices
    # the shipped member sees views it was not trained on; one epoch already helps
    assert sum(res.after) > sum(res.before)


def test_finetuned_checkpoint_round_trip(finetuned, digits_family):
    model, _, out, views, _ = finetuned
    loaded = load_finetuned(out, digits_family, views.cfg)
    for k, v in model.state_dict().items():  # stored as float16
        want = v.half().float() if v.is_floating_point() else v
        torch.testing.assert_close(loaded.state_dict()[k].float(), want.float())
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-2, atol=1e-2)
    # another view seed is the same protocol; other windows are not
    load_finetuned(out, digits_family, ViewConfig(devices=4, seed=9))
    with pytest.raises(CheckpointError, match="views"):
        load_finetuned(out, digits_family, ViewConfig(devices=4, area=0.6))
    with pytest.raises(CheckpointError, match="family"):
        from flowcodec.family import build_family

        load_finetuned(out, build_family("digits", classes=5))


def test_load_refuses_other_checkpoints(finetuned, digits_family, tmp_path):
    from flowcodec.family.checkpoint import save_checkpoint

    save_checkpoint(digits_family, tmp_path / "fam", "family", digits_family.config)
    with pytest.raises(CheckpointError, match="member-views"):
        load_finetuned(tmp_path / "fam", digits_family)


def test_finetuning_resumes_and_keeps_to_its_budget(finetuned, digits_family, digits):
    _, _, out, views, _ = finetuned
    train, _ = digits
    cfg = FinetuneConfig(**{**CFG, "epochs": 2, "eval_n": 0})
    _, res = finetune_member(digits_family, views, train, None, cfg, checkpoint=out,
                             resume=True, progress=False)
    assert [h["epoch"] for h in res.history] == [1, 2] and res.epochs == 2
    short = FinetuneConfig(**{**CFG, "epochs": 5, "eval_n": 0, "time_budget": 1e-3})
    _, res = finetune_member(digits_family, views, train, None, short, progress=False)
    assert res.epochs == 1 and res.steps < 5 * (1437 // 64)


@pytest.mark.parametrize("kwargs", [dict(epochs=0), dict(lr=0.0), dict(optimizer="lbfgs"),
                                    dict(kd=1.5), dict(time_budget=-1.0), dict(eval_n=-1),
                                    dict(label_smoothing=1.0)])
def test_bad_finetune_config_is_a_config_error(kwargs):
    with pytest.raises(ConfigError):
        FinetuneConfig(**kwargs).check()


def test_finetuning_refuses_a_data_set_of_another_shape(digits_family):
    from flowcodec.data import ArrayDataset

    data = ArrayDataset(torch.rand(80, 3, 8, 8), torch.zeros(80, dtype=torch.long), (0.5,) * 3,
                        (0.5,) * 3)
    with pytest.raises(ConfigError, match="family takes"):
        finetune_member(digits_family, ViewGenerator(), data, progress=False)


# --- every view as WebP, fused by the member ---------------------------------------------------
def test_webp_views_cost_their_real_bytes(digits_family, digits):
    _, test = digits
    x, _ = next(test.batches(12))
    v = ViewGenerator(ViewConfig(devices=2))(x, torch.arange(12))
    codecs = webp_codecs((1, 8, 8), test.mean, test.std, [10, 90, 10])
    assert list(codecs) == [10, 90]
    member = digits_family.member(3).eval()
    sizes = {}
    for q, codec in codecs.items():
        assert codec.method == 6 and codec.strip
        w = webp_fuse(codec, member, v)
        assert w["bytes"].shape == w["full"].shape == w["payload"].shape == (12, 2)
        for k in range(2):
            streams = codec.compress(v[:, k])
            assert w["bytes"][:, k].tolist() == [s.compact_nbytes for s in streams]
            assert w["full"][:, k].tolist() == [len(s.to_bytes()) for s in streams]
            assert w["payload"][:, k].tolist() == [len(s.packets[0]) for s in streams]
        torch.testing.assert_close(w["probs"].sum(1), torch.ones(12))
        sizes[q] = float(w["payload"].float().mean())
    assert sizes[90] > sizes[10]
    for bad in ([0], [101], [True], [50.0]):
        with pytest.raises(ConfigError, match="qualities"):
            check_qualities(bad)


# --- the views picture --------------------------------------------------------------------------
def test_views_picture_renders(tmp_path, digits):
    from flowcodec.coop.picture import render_views

    _, test = digits
    x, _ = next(test.batches(2))
    path = render_views(x, ViewGenerator(ViewConfig(devices=4)), tmp_path / "v.png",
                        mean=test.mean, std=test.std, note="digits")
    assert path.is_file() and path.stat().st_size > 1000
    with pytest.raises(ConfigError, match="scenes"):
        render_views(torch.rand(3, 8, 8), ViewGenerator(), tmp_path / "w.png")


# --- a branching member: the copy follows its path ---------------------------------------------
def test_a_branching_member_is_copied_and_fine_tuned_along_its_path(tmp_path):
    from helpers import random_images, tiny_cloud_family

    from flowcodec.coop.finetune import _student

    fam = tiny_cloud_family()  # member 4 reads split point 1: path [0, 1, 4]
    x = torch.randn(3, *fam.input_shape, generator=torch.Generator().manual_seed(1))
    for k in range(1, 5):  # the chain members 1-3 as before (stages 1..k), member 4 its own
        student = _student(fam, k).eval()
        assert len(student.stages) == len(fam.path(k)) - 1 and student.index == k
        assert torch.equal(student(x), fam.member(k)(x))
        assert not {p.data_ptr() for p in student.parameters()} & {
            p.data_ptr() for p in fam.parameters()}  # fmt: skip
    views = ViewGenerator(ViewConfig(devices=2))
    cfg = FinetuneConfig(epochs=1, batch_size=16, lr=1e-3, optimizer="adamw", eval_n=0)
    model, res = finetune_member(fam, views, random_images((3, 32, 32), n=32), None, cfg,
                                 progress=False)  # fmt: skip
    assert model.index == 4 and len(model.stages) == 2 and res.steps == 2
    save_finetuned(model, tmp_path / "m4", fam, views.cfg)
    loaded = load_finetuned(tmp_path / "m4", fam, views.cfg)
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-2, atol=1e-2)
