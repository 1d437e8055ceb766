"""Cooperative inference (issue 28): views, fusion, selective transmission, training, bench."""

from __future__ import annotations

import csv
import itertools
import subprocess
import sys

import pytest
import torch
from helpers import small_coop_model

from flowcodec.coop.fusion import CoopConfig, CoopModel, load_coop, save_coop
from flowcodec.coop.selective import device_order, prefix_masks, run_selective
from flowcodec.coop.train import TrainConfig, device_mask, train_coop
from flowcodec.coop.views import ViewConfig, ViewGenerator
from flowcodec.errors import ConfigError


@pytest.fixture(scope="module")
def model(digits_family):
    return small_coop_model(digits_family)


def _latents(b=3, n=4, latent=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, latent, generator=g) for _ in range(n)]


# --- views ----------------------------------------------------------------------------------
def test_views_deterministic_per_seed_and_different_across_devices():
    x = torch.rand(5, 3, 32, 32)
    idx = torch.arange(5)
    gen = ViewGenerator(ViewConfig(devices=4, seed=3))
    v = gen(x, idx)
    assert v.shape == (5, 4, 3, 32, 32)
    assert torch.equal(v, ViewGenerator(ViewConfig(devices=4, seed=3))(x, idx))
    # independent of batching: sample 2 alone gets the same views
    assert torch.equal(v[2:3], gen(x[2:3], idx[2:3]))
    for a, b in itertools.combinations(range(4), 2):
        assert not torch.allclose(v[:, a], v[:, b])
    other = ViewGenerator(ViewConfig(devices=4, seed=4))(x, idx)
    assert not torch.equal(v, other)


def test_four_windows_cover_the_image_and_each_about_half():
    gen = ViewGenerator(ViewConfig(devices=4, jitter=0.1))
    win = gen.windows(torch.arange(200), (32, 32))
    area = (win[..., 2] * win[..., 3]) / 32**2
    assert 0.38 <= float(area.min()) and float(area.max()) <= 0.62
    assert abs(float(area.mean()) - 0.5) < 0.03
    cover = torch.zeros(200, 32, 32, dtype=torch.bool)
    for i in range(200):
        for t, l_, h, w in win[i].tolist():
            cover[i, int(t):int(t + h + 0.999), int(l_):int(l_ + w + 0.999)] = True
    assert bool(cover.all())


def test_views_work_on_digits(digits):
    x, _ = next(digits[1].batches(6))
    v = ViewGenerator(ViewConfig(devices=2, noise=0.0))(x, torch.arange(6))
    assert v.shape == (6, 2, 1, 8, 8) and torch.isfinite(v).all()


def test_views_same_in_a_fresh_process():
    code = ("import torch; from flowcodec.coop.views import ViewConfig, ViewGenerator;"
            "x = torch.linspace(0, 1, 2 * 3 * 16 * 16).view(2, 3, 16, 16);"
            "print(repr(float(ViewGenerator(ViewConfig(seed=7))(x, torch.tensor([5, 9])).sum())))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=600).stdout
    x = torch.linspace(0, 1, 2 * 3 * 16 * 16).view(2, 3, 16, 16)
    here = repr(float(ViewGenerator(ViewConfig(seed=7))(x, torch.tensor([5, 9])).sum()))
    assert out == here + "\n"


@pytest.mark.parametrize("kwargs", [dict(devices=5), dict(devices=0), dict(area=0.1),
                                    dict(jitter=0.5), dict(noise=-1.0), dict(seed=-1),
                                    dict(area=0.26, jitter=0.2)])
def test_bad_view_config_is_a_config_error(kwargs):
    with pytest.raises(ConfigError):
        ViewGenerator(ViewConfig(**kwargs))


def test_bad_view_inputs_are_config_errors():
    gen = ViewGenerator(ViewConfig())
    with pytest.raises(ConfigError, match="index"):
        gen(torch.rand(2, 3, 32, 32), torch.arange(3))
    with pytest.raises(ConfigError, match="images"):
        gen(torch.rand(3, 32, 32), torch.arange(3))


# --- fusion ---------------------------------------------------------------------------------
def test_fusion_invariant_to_device_order(model):
    lats = _latents()
    kinds = ["m2"] * 4
    ref = model.edge(lats, kinds).logits
    for perm in itertools.permutations(range(4)):
        out = model.edge([lats[i] for i in perm], kinds).logits
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # with a mixed set, permuting the devices of one kind changes nothing either
    mixed = ["m1", "m2", "m2", "m1"]
    ref = model.edge(lats, mixed).logits
    out = model.edge([lats[3], lats[2], lats[1], lats[0]], ["m1", "m2", "m2", "m1"]).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_fusion_defined_for_every_subset(model):
    lats = _latents(b=2)
    kinds = ["m2"] * 4
    for bits in itertools.product([False, True], repeat=4):
        mask = torch.tensor(bits).expand(2, 4)
        out = model.edge(lats, kinds, mask)
        assert torch.isfinite(out.logits).all()
        assert out.empty.tolist() == [not any(bits)] * 2
        assert out.present.tolist() == [sum(bits)] * 2
        # masking a device out is the same as it never arriving
        dropped = [t if b else None for t, b in zip(lats, bits)]
        if any(bits):
            torch.testing.assert_close(model.edge(dropped, kinds).logits, out.logits)


def test_vote_is_the_mean_of_the_arrived_devices_votes(digits_family):
    """``vote``: the tail's logits plus the mean of the arrived devices' linear votes;
    order-invariant, a masked device is one that never arrived, none arriving is the prior."""
    torch.manual_seed(0)
    cfg = CoopConfig(kinds=("m1", "m2"), latent=4, dim=16, hidden=16, vote=True)
    m = CoopModel(digits_family, cfg).eval()
    plain = CoopModel(digits_family, CoopConfig(kinds=("m1", "m2"), latent=4, dim=16,
                                                hidden=16)).eval()
    plain.load_state_dict({k: v for k, v in m.state_dict().items()
                           if not k.startswith("vote.")})
    lats, kinds = _latents(), ["m1", "m2", "m2", "m1"]
    # the votes start at zero: the model starts as the fusion alone
    torch.testing.assert_close(m.edge(lats, kinds).logits, plain.edge(lats, kinds).logits)
    with torch.no_grad():
        for v in m.vote.values():
            v.weight.normal_()
            v.bias.normal_()
    mask = torch.tensor([[True, False, True, True], [False, True, False, False],
                         [True, True, True, True]])
    want = plain.edge(lats, kinds, mask).logits
    for r in range(3):
        votes = [m.vote[k](t[r:r + 1]) for t, k, on in zip(lats, kinds, mask[r]) if on]
        want[r] += torch.cat(votes).mean(0)
    got = m.edge(lats, kinds, mask).logits
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, plain.edge(lats, kinds, mask).logits)
    # order within a kind, absent = masked, none = the prior
    torch.testing.assert_close(m.edge([lats[3], lats[2], lats[1], lats[0]], kinds).logits,
                               m.edge(lats, kinds).logits, rtol=1e-5, atol=1e-5)
    dropped = [t if on else None for t, on in zip(lats, mask[1])]
    torch.testing.assert_close(m.edge(dropped, kinds).logits[1], got[1])
    out = m.edge([None] * 4, kinds, batch=2)
    assert out.empty.all()
    torch.testing.assert_close(out.logits, m.log_prior.expand(2, -1))
    base, per = m.edge_flops_parts(kinds)
    assert per["m2"] > plain.edge_flops_parts(kinds)[1]["m2"]


def test_missing_devices_never_raise_and_empty_answers_the_prior(model):
    kinds = ["m2"] * 4
    out = model.edge([None] * 4, kinds, batch=3)
    assert out.empty.all()
    torch.testing.assert_close(out.logits, model.log_prior.expand(3, -1))
    out = model.edge([None, _latents(n=1)[0], None, None], kinds)
    assert not out.empty.any() and out.present.tolist() == [1, 1, 1]
    mask = torch.tensor([[False] * 4, [True, False, False, False], [False] * 4])
    out = model.edge(_latents(), kinds, mask)
    assert out.empty.tolist() == [True, False, True]


def test_codec_round_trip_through_fusion(model, digits):
    x, _ = next(digits[1].batches(8))
    views = ViewGenerator(ViewConfig(devices=4, seed=1))(x, torch.arange(8))
    kinds = ["m1", "m2", "m2", "m1"]
    sent, fwd = [], []
    for k, kind in enumerate(kinds):
        h = model.device_features(kind, views[:, k])
        streams = model.compress(kind, h)
        assert all(len(s.to_bytes()) > 0 for s in streams)
        sent.append(model.decompress(kind, streams))
        fwd.append(model.latent(kind, model.pooled(kind, h=h))[0])
    for a, b in zip(sent, fwd):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.edge(sent, kinds).logits, model.edge(fwd, kinds).logits)


def test_a_tail_off_the_members_path_is_refused_with_the_receiver():
    from helpers import tiny_cloud_family

    fam = tiny_cloud_family()  # member 4 reads split point 1: path [0, 1, 4]
    kw = dict(kinds=("m1", "m2"), latent=4, dim=16, hidden=16)
    with pytest.raises(ConfigError, match=r"member 4 passes through split points \[0, 1, 4\] "
                                          r"only, not point 2; .* member 3 "
                                          r"\(family.receiver\(2\)\)"):  # fmt: skip
        CoopModel(fam, CoopConfig(member=4, point=2, **kw))
    m = CoopModel(fam, CoopConfig(member=4, point=1, **kw))
    x = torch.randn(2, *fam.input_shape, generator=torch.Generator().manual_seed(0))
    assert torch.equal(m.tail()(fam.features(x, 1)), fam.member(4)(x))

def test_own_answer_is_the_members_exit(model, digits_family):
    x = torch.rand(4, 1, 8, 8)
    for kind, m in (("m1", 1), ("m2", 2)):
        own = model.own_logits(kind, model.pooled(kind, x))
        torch.testing.assert_close(own, digits_family.member(m)(x))
        f = model.device_flops(kind)
        assert f["total"] == f["head"] + f["encoder"]
        # the member's FLOPs plus the linear map to the latent, less the exit's linear layer
        assert f["total"] - f["member"] <= 2 * 4 * model.devices[kind].pooled_dim


def test_bad_inputs_are_named_errors(model):
    lats = _latents()
    with pytest.raises(ConfigError, match="devices"):
        model.edge(_latents(n=5), ["m2"] * 5)
    with pytest.raises(ConfigError, match="kinds"):
        model.edge(lats, ["m2"] * 3)
    with pytest.raises(ConfigError, match="kind"):
        model.edge(lats, ["m2", "m2", "m3", "m2"])
    with pytest.raises(ConfigError, match="latent"):
        model.edge([torch.rand(3, 5)] + lats[1:], ["m2"] * 4)
    with pytest.raises(ConfigError, match="batch sizes"):
        model.edge([torch.rand(2, 4)] + lats[1:], ["m2"] * 4)
    with pytest.raises(ConfigError, match="mask"):
        model.edge(lats, ["m2"] * 4, torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ConfigError, match="mask"):
        model.edge(lats, ["m2"] * 4, torch.ones(3, 4))
    with pytest.raises(ConfigError, match="shape"):
        model.pooled("m2", h=torch.rand(2, 16, 8, 8))
    with pytest.raises(ConfigError, match="kind"):
        model.pooled("m7", torch.rand(2, 1, 8, 8))
    with pytest.raises(ConfigError):
        CoopConfig(kinds=("m2", "m2")).check()
    with pytest.raises(ConfigError):
        CoopConfig(latent=0).check()


# --- selective transmission -------------------------------------------------------------------
def test_selective_stops_when_sure_and_counts_every_byte():
    # two samples, three devices; fused answers after 1, 2, 3 devices
    p = [torch.tensor([[0.95, 0.05], [0.6, 0.4]]), torch.tensor([[0.97, 0.03], [0.7, 0.3]]),
         torch.tensor([[0.99, 0.01], [0.2, 0.8]])]
    fused = [t.log() for t in p]
    order = torch.tensor([[2, 0, 1], [0, 1, 2]])
    sizes = torch.tensor([[10, 11, 12], [20, 21, 22]])
    r = run_selective(fused, order, sizes, 0.9, confidence_round=True)
    assert r.asked.tolist() == [1, 3]
    assert r.pred.tolist() == [0, 1]
    assert r.bytes.tolist() == [12 + 1 + 3, 20 + 21 + 22 + 3 + 3]
    assert r.rounds.tolist() == [2, 4]
    everyone = run_selective(fused, order, sizes, 1.01, confidence_round=False)
    assert everyone.asked.tolist() == [3, 3] and everyone.bytes.tolist() == [36, 66]


def test_device_order_and_prefixes():
    conf = torch.tensor([[10, 200, 200, 5]], dtype=torch.uint8)
    order = device_order("confidence", conf)
    assert order.tolist() == [[1, 2, 0, 3]]
    masks = prefix_masks(order, 1)
    assert [m.sum().item() for m in masks] == [1, 2, 3, 4]
    assert masks[0].tolist() == [[False, True, False, False]]
    with pytest.raises(ConfigError):
        device_order("random", conf)
    with pytest.raises(ConfigError):
        device_order("fixed", priority=[0, 0, 1], n=3)


def test_cache_stops_making_copies_when_out_of_time(digits_family, digits):
    from flowcodec.coop.train import build_cache

    m = CoopModel(digits_family, CoopConfig(kinds=("m2",), latent=4, dim=16, hidden=16))
    data = digits[1].take(torch.arange(50))
    views = ViewGenerator(ViewConfig(devices=2))
    gen = torch.Generator().manual_seed(0)
    full = build_cache(m, ("m2", "m2"), views, data, 3, gen, True, False)
    assert full["z0"].shape == (3, 50, 48) and full["t"].shape == (3, 50, 10)
    cut = build_cache(m, ("m2", "m2"), views, data, 3, gen, True, False, time_budget=1e-9)
    assert cut["z1"].shape == (1, 50, 48) and cut["y"].shape == (1, 50)


def test_device_mask_keeps_one():
    m = device_mask(500, 4, 0.9, torch.Generator().manual_seed(0))
    assert m.any(1).all() and 0.05 < m.float().mean() < 0.5


# --- training, checkpoints, bench -------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_family, digits):
    train, test = digits
    out = tmp_path_factory.mktemp("coop") / "digits-coop"
    cfg = CoopConfig(kinds=("m2",), latent=4, dim=32, hidden=32)
    views = ViewGenerator(ViewConfig(devices=4))
    torch.manual_seed(0)
    m = CoopModel(digits_family, cfg)
    tc = TrainConfig(epochs=2, batch_size=64, copies=1, eval_n=100, lam=0.1)
    res = train_coop(m, ("m2",) * 4, views, train, test, tc, checkpoint=out, progress=False)
    extra = {"views": views.cfg.record(), "kinds": ["m2"] * 4}
    save_coop(m, out, extra)
    return m, out, res, views


def test_training_runs_and_resumes(trained, digits_family, digits):
    m, out, res, views = trained
    assert res.epochs == 2 and len(res.history) == 2
    assert 0.0 <= res.history[-1]["eval"]["accuracy"] <= 1.0
    again = CoopModel(digits_family, m.cfg)
    tc = TrainConfig(epochs=3, batch_size=64, copies=1, eval_n=0, lam=0.1)
    r2 = train_coop(again, ("m2",) * 4, views, digits[0], None, tc, checkpoint=out,
                    resume=True, progress=False)
    assert r2.epochs == 3 and [h["epoch"] for h in r2.history] == [1, 2, 3]
    with pytest.raises(ConfigError):
        train_coop(again, ("m2",) * 3, views, digits[0], None, tc, progress=False)


def test_checkpoint_round_trip(trained, digits_family):
    m, out, _, _ = trained
    loaded = load_coop(out, digits_family)
    lats = _latents()
    torch.testing.assert_close(loaded.edge(lats, ["m2"] * 4).logits,
                               m.edge(lats, ["m2"] * 4).logits)
    h = torch.rand(3, 32, 4, 4)
    assert [s.to_bytes() for s in loaded.compress("m2", h)] == \
        [s.to_bytes() for s in m.compress("m2", h)]


def test_bench_writes_csv_and_plot(trained, tmp_path):
    from flowcodec.coop import bench

    _, out, _, _ = trained
    assert bench.main(["--model", str(out), "--family", "digits", "--n", "40",
                       "--out-dir", str(tmp_path), "--no-progress",
                       "--thresholds", "0.5", "1.01"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "coop.csv")))
    methods = {r["method"] for r in rows}
    assert {"coop-all", "centralised", "average-own", "device-own[best]",
            "member3-view[best]", "selective-confidence", "selective-fixed"} <= methods
    assert (tmp_path / "coop.png").stat().st_size > 0
    everyone = [r for r in rows if r["method"] == "selective-fixed" and r["threshold"] == "1.01"]
    coop_all = next(r for r in rows if r["method"] == "coop-all")
    assert everyone[0]["accuracy"] == coop_all["accuracy"]


def test_average_own_drop_rows_leave_out_one_device(trained, digits):
    """``average-own-drop[k]``: the 8-bit average of the other devices' own answers."""
    from flowcodec.coop import bench

    m, _, _, views = trained
    test = digits[1].subset(30, seed=0)
    res = bench.collect(m, ("m2",) * 4, views, test, progress=False)
    y = res["y"]
    right = torch.nn.functional.one_hot(y, 10).float() * 20
    wrong = torch.nn.functional.one_hot((y + 1) % 10, 10).float() * 20
    res["own"] = torch.stack([right, right, wrong, wrong], 1)  # devices 0, 1 right
    rows = {r["method"]: r for r in bench.summarise(m, ("m2",) * 4, res, views.cfg.record())}
    got = [rows[f"average-own-drop[{k}]"]["accuracy"] for k in range(4)]
    assert got == [0.0, 0.0, 1.0, 1.0]  # two wrong beat one right; two right beat one wrong
    assert rows["average-own-drop[0]"]["devices"] == 3


def test_bench_with_the_finetuned_member_and_webp(trained, tmp_path, digits_family, digits):
    from flowcodec.coop import bench
    from flowcodec.coop.finetune import FinetuneConfig, finetune_member, save_finetuned

    _, out, _, views = trained
    ft, _ = finetune_member(digits_family, views, digits[0].take(torch.arange(128)), None,
                            FinetuneConfig(epochs=1, batch_size=64, eval_n=0, kd=0.5),
                            progress=False)
    save_finetuned(ft, tmp_path / "m3views", digits_family, views.cfg)
    assert bench.main(["--model", str(out), "--family", "digits", "--n", "30",
                       "--out-dir", str(tmp_path), "--no-progress", "--thresholds", "1.01",
                       "--finetuned", str(tmp_path / "m3views"),
                       "--webp-qualities", "20", "80"]) == 0
    rows = {r["method"]: r for r in csv.DictReader(open(tmp_path / "coop.csv"))}
    assert {"member3-view[best]", "member3-view-shipped[best]", "webp-q20", "webp-q80"} <= set(rows)
    assert "fine-tuned" in rows["member3-view[best]"]["note"]
    assert float(rows["webp-q80"]["bytes_per_device"]) > float(rows["webp-q20"]["bytes_per_device"])
    assert float(rows["webp-q20"]["bytes_total"]) == pytest.approx(
        4 * float(rows["webp-q20"]["bytes_per_device"]), abs=0.05)
    with pytest.raises(ConfigError, match="qualities"):
        bench.main(["--model", str(out), "--family", "digits", "--out-dir", str(tmp_path),
                    "--webp-qualities", "0"])


def test_tuned_exit_and_tail_train_their_own_copies(tmp_path, digits_family, digits):
    """``tune_exit`` / ``tune_tail``: the devices' exit and the edge's tail train as the
    model's own copies (the family is unchanged), the cache holds split-point features,
    and the checkpoint brings the trained copies back."""
    train, test = digits
    fam_before = {k: v.clone() for k, v in digits_family.state_dict().items()}
    cfg = CoopConfig(kinds=("m2",), latent=4, dim=32, hidden=32, tune_exit=True,
                     tune_tail=True)
    views = ViewGenerator(ViewConfig(devices=4))
    torch.manual_seed(0)
    m = CoopModel(digits_family, cfg)
    assert m.tail() is m.edge_tail and m.cache_shape("m2") == \
        tuple(digits_family.feature_shape(2))
    stem0 = [p.detach().clone() for p in m.devices["m2"].codec.g_a.stem.parameters()]
    tail0 = [p.detach().clone() for p in m.edge_tail.parameters()]
    tc = TrainConfig(epochs=1, batch_size=64, copies=1, eval_n=50, lam=0.1, own=0.5)
    cache_file = tmp_path / "cache.safetensors"
    res = train_coop(m, ("m2",) * 4, views, train, test, tc, progress=False,
                     cache_file=cache_file)
    assert res.epochs == 1
    moved = [not torch.equal(a, b) for a, b in
             zip(stem0, m.devices["m2"].codec.g_a.stem.parameters())]
    assert any(moved)
    assert any(not torch.equal(a, b) for a, b in zip(tail0, m.edge_tail.parameters()))
    for k, v in digits_family.state_dict().items():  # the family itself is untouched
        assert torch.equal(v, fam_before[k]), k
    # a cache of split-point features is refused by a frozen-exit run, and vice versa
    frozen = CoopModel(digits_family, CoopConfig(kinds=("m2",), latent=4, dim=32, hidden=32))
    with pytest.raises(ConfigError, match="feature cache"):
        train_coop(frozen, ("m2",) * 4, views, train, None, tc, progress=False,
                   cache_file=cache_file)
    out = tmp_path / "tuned"
    save_coop(m, out, {"views": views.cfg.record(), "kinds": ["m2"] * 4})
    loaded = load_coop(out, digits_family)
    assert loaded.cfg.tune_exit and loaded.cfg.tune_tail
    x = torch.rand(5, *digits_family.input_shape)
    torch.testing.assert_close(loaded.pooled("m2", x), m.eval().pooled("m2", x),
                               atol=2e-2, rtol=2e-2)  # float16 weights in the checkpoint
    lats = _latents()
    torch.testing.assert_close(loaded.edge(lats, ["m2"] * 4).logits,
                               m.edge(lats, ["m2"] * 4).logits, atol=5e-2, rtol=5e-2)
