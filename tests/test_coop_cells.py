"""Cooperative inference with spatial cells (CoopConfig(cells=c)): devices send a grid of
cells, the edge places them by each device's anchor (flowcodec.coop.cells)."""

from __future__ import annotations

import csv

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from channels import IIDPacketErasure
from flowcodec.coop.cells import CellFusion, scatter_prior
from flowcodec.coop.flow import CooperativeFlow, DeviceHop
from flowcodec.coop.fusion import CoopConfig, CoopModel, EdgeFusion, load_coop, save_coop
from flowcodec.coop.train import TrainConfig, build_cache, train_coop
from flowcodec.coop.views import N_ANCHORS, ViewConfig, ViewGenerator, anchor_id, anchor_ids
from flowcodec.errors import CheckpointError, ConfigError

LATENT, CELLS = 3, 2
SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
WIDTH = LATENT * CELLS * CELLS


@pytest.fixture(scope="module")
def model(digits_family):
    torch.manual_seed(0)
    m = CoopModel(digits_family, CoopConfig(kinds=("m1", "m2"), latent=LATENT, dim=16,
                                            hidden=16, cells=CELLS))
    # a random scatter, so that the tests do not lean on the geometric start
    with torch.no_grad():
        m.fusion.scatter.normal_()
    m.eval()
    m.update()
    return m


def _latents(b=3, n=4, seed=0, width=WIDTH):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, width, generator=g) for _ in range(n)]


# --- config and anchors ------------------------------------------------------------------------
@pytest.mark.parametrize("cells", [0, 5, -1, 1.5, True, "2"])
def test_bad_cells_is_a_config_error(cells):
    with pytest.raises(ConfigError, match="cells"):
        CoopConfig(cells=cells).check()


def test_cells_one_is_the_vector_fusion(digits_family):
    m = CoopModel(digits_family, CoopConfig(kinds=("m2",), latent=4, dim=16, hidden=16))
    assert isinstance(m.fusion, EdgeFusion) and m.width == 4
    assert m.pooled_shape("m2") == (m.devices["m2"].pooled_dim,)


def test_anchor_ids():
    assert anchor_ids(4) == (0, 2, 6, 8) and anchor_ids(1) == (4,)
    assert anchor_id((0.5, 1.0)) == 5
    with pytest.raises(ConfigError):
        anchor_id((0.3, 0.0))
    with pytest.raises(ConfigError):
        anchor_ids(5)


def test_scatter_prior_follows_the_windows():
    prior = scatter_prior(2, 4)
    assert prior.shape == (N_ANCHORS * 4, 16)
    top_left = prior[anchor_id((0.0, 0.0)) * 4 + 0]  # its top-left cell
    assert int(top_left.argmax()) == 0 and float(top_left[15]) < float(top_left[0]) - 3


# --- device side -------------------------------------------------------------------------------
def test_round_trip_with_cells(model, digits):
    x, _ = next(digits[1].batches(8))
    views = ViewGenerator(ViewConfig(devices=4, seed=1))(x, torch.arange(8))
    kinds = ["m1", "m2", "m2", "m1"]
    sent, fwd = [], []
    for k, kind in enumerate(kinds):
        h = model.device_features(kind, views[:, k])
        z = model.pooled(kind, h=h)
        assert z.shape == (8, model.devices[kind].pooled_dim, CELLS, CELLS)
        streams = model.compress(kind, h)
        sent.append(model.decompress(kind, streams))
        lat, bits = model.latent(kind, z)
        assert lat.shape == (8, WIDTH) and bits.shape == (8,)
        fwd.append(lat)
    for a, b in zip(sent, fwd):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.edge(sent, kinds).logits, model.edge(fwd, kinds).logits)


def test_own_answer_from_the_grid_is_the_members_exit(model, digits_family):
    x = torch.rand(4, 1, 8, 8)
    for kind, m in (("m1", 1), ("m2", 2)):
        torch.testing.assert_close(model.own_logits(kind, model.pooled(kind, x)),
                                   digits_family.member(m).eval()(x))


def test_device_flops_count_the_projection_per_cell(model):
    for kind in ("m1", "m2"):
        f = model.device_flops(kind)
        assert f["total"] == f["head"] + f["encoder"]
        p = model.devices[kind].pooled_dim
        # the exit's linear layer (P -> 10) out, a 1x1 convolution (P -> latent) per cell in
        proj = 2 * p * LATENT * CELLS * CELLS
        assert f["total"] - f["member"] <= proj
        assert abs(f["total"] - f["member"]) <= 0.02 * f["member"]


def test_bad_pooled_shape_is_named(model):
    with pytest.raises(ConfigError, match="pooled"):
        model.latent("m2", torch.rand(2, model.devices["m2"].pooled_dim))


# --- edge side ---------------------------------------------------------------------------------
@SETTINGS
@given(perm=st.permutations(range(4)), seed=st.integers(0, 1000),
       anchors=st.lists(st.integers(0, N_ANCHORS - 1), min_size=4, max_size=4),
       keep=st.lists(st.booleans(), min_size=4, max_size=4))
def test_invariant_to_device_order_with_anchors(model, perm, seed, anchors, keep):
    lats = _latents(b=2, seed=seed)
    kinds = ["m1", "m2", "m2", "m1"]
    mask = torch.tensor(keep).expand(2, 4)
    ref = model.edge(lats, kinds, mask, anchors=anchors)
    out = model.edge([lats[i] for i in perm], [kinds[i] for i in perm], mask[:, list(perm)],
                     anchors=[anchors[i] for i in perm])
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-4, atol=1e-5)
    assert out.empty.tolist() == ref.empty.tolist() == [not any(keep)] * 2


def test_anchors_matter(model):
    lats = _latents()
    a = model.edge(lats, ["m2"] * 4, anchors=[0, 2, 6, 8]).logits
    b = model.edge(lats, ["m2"] * 4, anchors=[8, 6, 2, 0]).logits
    assert not torch.allclose(a, b)
    torch.testing.assert_close(model.edge(lats, ["m2"] * 4).logits, a)  # the default


@SETTINGS
@given(rows=st.lists(st.lists(st.booleans(), min_size=4, max_size=4), min_size=1, max_size=4),
       gone=st.lists(st.booleans(), min_size=4, max_size=4))
def test_any_subset_missing_never_raises(model, rows, gone):
    b = len(rows)
    lats = _latents(b=b)
    mask = torch.tensor(rows)
    sent = [None if g else t for t, g in zip(lats, gone)]
    out = model.edge(sent, ["m2"] * 4, mask, batch=b)
    arrived = mask & ~torch.tensor(gone)
    assert out.present.tolist() == arrived.sum(1).tolist()
    assert out.empty.tolist() == (~arrived.any(1)).tolist()
    assert torch.isfinite(out.logits).all()
    prior = model.log_prior.expand(b, -1)
    torch.testing.assert_close(out.logits[out.empty], prior[out.empty])
    # masking a device out is the same as it never arriving
    full = model.edge(lats, ["m2"] * 4, arrived)
    torch.testing.assert_close(out.logits, full.logits)


def test_nothing_arrives_gives_the_prior_and_no_nan(model):
    out = model.edge([None] * 4, ["m2"] * 4, batch=3)
    assert out.empty.all()
    torch.testing.assert_close(out.logits, model.log_prior.expand(3, -1))
    w = model.fusion.weights(torch.tensor([0, 2, 6, 8]), torch.zeros(3, 4, dtype=torch.bool))
    assert torch.equal(w, torch.zeros_like(w))


def test_weights_sum_to_one_over_present_tokens(model):
    present = torch.tensor([[True, False, True, False], [False, False, False, True]])
    w = model.fusion.weights(torch.tensor([0, 2, 6, 8]), present)
    torch.testing.assert_close(w.sum(1), torch.ones(2, 16))
    assert float(w[0, 4:8].abs().sum()) == 0.0  # device 1 (tokens 4..7) absent


def test_bad_edge_inputs_are_named(model):
    lats = _latents()
    with pytest.raises(ConfigError, match="latent"):
        model.edge([torch.rand(3, LATENT)] + lats[1:], ["m2"] * 4)
    with pytest.raises(ConfigError, match="anchors"):
        model.edge(lats, ["m2"] * 4, anchors=[0, 1, 2])
    with pytest.raises(ConfigError, match="anchors"):
        model.edge(lats, ["m2"] * 4, anchors=[0, 1, 2, 9])
    with pytest.raises(ConfigError, match="anchor"):
        DeviceHop("m2", IIDPacketErasure(0.0), anchor=12)


def test_gradients_reach_the_scatter_and_tokens(digits_family):
    torch.manual_seed(0)
    m = CoopModel(digits_family, CoopConfig(kinds=("m2",), latent=2, dim=8, hidden=8, cells=2))
    m.train()
    z = torch.rand(4, m.devices["m2"].pooled_dim, 2, 2)
    lats = [m.latent("m2", z)[0] for _ in range(2)]
    mask = torch.tensor([[True, False], [True, True], [False, True], [True, True]])
    m.edge(lats, ["m2", "m2"], mask).logits.sum().backward()
    fu = m.fusion
    assert isinstance(fu, CellFusion)
    for p in (fu.scatter, fu.place.weight, fu.decoders["m2"].weight,
              m.devices["m2"].codec.g_a.proj.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


# --- the flow ----------------------------------------------------------------------------------
def test_flow_with_cells_and_anchors(model):
    g = torch.Generator().manual_seed(0)
    views = torch.rand(3, 4, 1, 8, 8, generator=g)
    hops = [DeviceHop("m2", IIDPacketErasure(0.0, seed=k)) for k in range(4)]
    res = CooperativeFlow(model, hops).run(views)
    lats = [model.decompress("m2", model.compress("m2", model.device_features("m2", views[:, k])))
            for k in range(4)]
    torch.testing.assert_close(res.logits, model.edge(lats, ["m2"] * 4).logits)
    # the devices listed in another order, each with its anchor: the same answer
    order = [3, 1, 0, 2]
    ids = anchor_ids(4)
    hops2 = [DeviceHop("m2", IIDPacketErasure(0.0, seed=k), anchor=ids[k]) for k in order]
    res2 = CooperativeFlow(model, hops2).run(views[:, order])
    torch.testing.assert_close(res2.logits, res.logits, rtol=1e-4, atol=1e-5)
    assert res.traces[0].edge_flops > 0
    assert res.traces[0].bytes == res2.traces[0].bytes


# --- training, cache, checkpoint, bench ----------------------------------------------------------
def test_cache_keeps_the_grid(digits_family, digits):
    m = CoopModel(digits_family, CoopConfig(kinds=("m2",), latent=2, dim=8, hidden=8, cells=2))
    data = digits[1].take(torch.arange(20))
    c = build_cache(m, ("m2", "m2"), ViewGenerator(ViewConfig(devices=2)), data, 1,
                    torch.Generator().manual_seed(0), True, False)
    assert c["z0"].shape == (1, 20, m.devices["m2"].pooled_dim, 2, 2)


def test_cache_file_records_cells(digits_family, digits, tmp_path):
    from flowcodec.coop import train as coop_train

    views = ViewGenerator(ViewConfig(devices=2))
    tc = TrainConfig()
    assert coop_train._cache_meta(tc, views) == coop_train._cache_meta(tc, views, 1)
    assert "cells" not in coop_train._cache_meta(tc, views)  # old caches still match cells 1
    assert coop_train._cache_meta(tc, views, 2)["cells"] == "2"
    m1 = CoopModel(digits_family, CoopConfig(kinds=("m2",), latent=2, dim=8, hidden=8))
    data = digits[1].take(torch.arange(20))
    cache = build_cache(m1, ("m2", "m2"), views, data, 1, torch.Generator().manual_seed(0),
                        True, False)
    path = tmp_path / "cache.safetensors"
    coop_train._save_cache(cache, path, tc, views)
    with pytest.raises(ConfigError, match="cache"):
        coop_train._load_cache(path, tc, views, 2)
    assert coop_train._load_cache(path, tc, views, 1)["z0"].shape == cache["z0"].shape


@pytest.fixture(scope="module")
def trained(tmp_path_factory, digits_family, digits):
    train, test = digits
    out = tmp_path_factory.mktemp("coopcells") / "digits-cells"
    cfg = CoopConfig(kinds=("m2",), latent=2, dim=16, hidden=16, cells=2)
    views = ViewGenerator(ViewConfig(devices=4))
    torch.manual_seed(0)
    m = CoopModel(digits_family, cfg)
    tc = TrainConfig(epochs=1, batch_size=64, copies=1, eval_n=60, lam=0.1)
    res = train_coop(m, ("m2",) * 4, views, train.take(torch.arange(256)), test, tc,
                     progress=False)
    save_coop(m, out, {"views": views.cfg.record(), "kinds": ["m2"] * 4,
                       "anchors": list(anchor_ids(4))})
    return m, out, res


def test_training_and_checkpoint_with_cells(trained, digits_family):
    m, out, res = trained
    assert res.epochs == 1 and 0.0 <= res.history[-1]["eval"]["accuracy"] <= 1.0
    loaded = load_coop(out, digits_family)
    assert loaded.cfg.cells == 2
    lats = _latents(width=m.width)
    torch.testing.assert_close(loaded.edge(lats, ["m2"] * 4).logits,
                               m.edge(lats, ["m2"] * 4).logits)
    h = torch.rand(3, 32, 4, 4)
    assert [s.to_bytes() for s in loaded.compress("m2", h)] == \
        [s.to_bytes() for s in m.compress("m2", h)]
    # a cells-2 checkpoint is not a cells-1 model's, and the other way round
    import json

    meta = json.loads(out.with_suffix(".json").read_text())
    meta["config"]["coop"]["cells"] = 1
    other = out.parent / "other"
    other.with_suffix(".json").write_text(json.dumps(meta))
    other.with_suffix(".safetensors").write_bytes(out.with_suffix(".safetensors").read_bytes())
    with pytest.raises(CheckpointError):
        load_coop(other, digits_family)


def test_cells_one_checkpoint_without_the_key_loads(digits_family, tmp_path):
    import json

    torch.manual_seed(1)
    m = CoopModel(digits_family, CoopConfig(kinds=("m2",), latent=4, dim=16, hidden=16)).eval()
    m.update()
    path = save_coop(m, tmp_path / "old", {})
    meta_path = tmp_path / "old.json"
    meta = json.loads(meta_path.read_text())
    del meta["config"]["coop"]["cells"]  # a checkpoint written before cells existed
    meta_path.write_text(json.dumps(meta))
    loaded = load_coop(tmp_path / "old", digits_family)
    assert loaded.cfg.cells == 1 and path
    lats = _latents(width=4)
    assert torch.equal(loaded.edge(lats, ["m2"] * 4).logits, m.edge(lats, ["m2"] * 4).logits)


def test_bench_with_cells(trained, tmp_path):
    from flowcodec.coop import bench

    _, out, _ = trained
    assert bench.main(["--model", str(out), "--family", "digits", "--n", "30",
                       "--out-dir", str(tmp_path), "--no-progress",
                       "--thresholds", "0.5", "1.01"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "coop.csv")))
    methods = {r["method"] for r in rows}
    assert {"coop-all", "coop-single[0]", "coop-drop[3]", "coop-loss", "selective-confidence",
            "selective-fixed", "device-own[best]"} <= methods
    coop_all = next(r for r in rows if r["method"] == "coop-all")
    assert coop_all["cells"] == "2" and coop_all["numbers_per_device"] == "8"
    everyone = [r for r in rows if r["method"] == "selective-fixed" and r["threshold"] == "1.01"]
    assert everyone[0]["accuracy"] == coop_all["accuracy"]
