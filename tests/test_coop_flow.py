"""CooperativeFlow (issue 28): several devices over their own links, one edge, traces."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import small_coop_model

from channels import FastLink, IIDPacketErasure
from flowcodec.coop.flow import CooperativeFlow, DeviceHop, Selective
from flowcodec.coop.fusion import CoopConfig, CoopModel
from flowcodec.coop.views import ViewConfig, ViewGenerator
from flowcodec.errors import ConfigError


class LoseAll:
    """A link that loses every packet (a device out of range)."""

    def transmit(self, packets, generator=None):
        return [None] * len(packets), None


@pytest.fixture(scope="module")
def model(digits_family):
    return small_coop_model(digits_family)


def _views(b=5, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, n, 1, 8, 8, generator=g)


def _flow(model, links, kinds=None, **kw):
    kinds = kinds or ["m2"] * len(links)
    return CooperativeFlow(model, [DeviceHop(k, link, **kw) for k, link in zip(kinds, links)])


def _clean(n, seed=0):
    return [IIDPacketErasure(0.0, seed=seed + k) for k in range(n)]


def _direct(model, views, kinds, keep):
    """What the edge should answer: the streams of the kept devices decoded and fused."""
    lats = []
    for k, kind in enumerate(kinds):
        streams = model.compress(kind, model.device_features(kind, views[:, k]))
        lats.append(model.decompress(kind, streams) if keep[k] else None)
    return model.edge(lats, list(kinds), batch=len(views))


def test_devices_of_one_kind_in_any_order_give_the_same_answer(model):
    v = _views()
    ref = _flow(model, _clean(4)).run(v)
    for perm in itertools.permutations(range(4)):
        out = _flow(model, _clean(4)).run(v[:, list(perm)])
        torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    # a mixed set: swapping the two m1 devices (views and hops together) changes nothing
    kinds = ["m1", "m2", "m2", "m1"]
    ref = _flow(model, _clean(4), kinds).run(v)
    out = _flow(model, _clean(4), kinds).run(v[:, [3, 2, 1, 0]])
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)


def test_any_subset_of_lost_devices_never_raises_and_fuses_what_arrived(model):
    v = _views(b=3)
    kinds = ["m2"] * 4
    for lost in itertools.product([False, True], repeat=4):
        links = [LoseAll() if lo else IIDPacketErasure(0.0, seed=k) for k, lo in enumerate(lost)]
        out = _flow(model, links).run(v)
        keep = [not lo for lo in lost]
        assert out.present.tolist() == [sum(keep)] * 3
        assert out.empty.tolist() == [not any(keep)] * 3
        for tr in out.traces:
            assert [d.arrived for d in tr.devices] == keep
            assert [d.asked for d in tr.devices] == [True] * 4
            assert all(d.packets_lost == d.packets for d, lo in zip(tr.devices, lost) if lo)
        want = _direct(model, v, kinds, keep)
        torch.testing.assert_close(out.logits, want.logits, rtol=1e-5, atol=1e-5)


def test_all_lost_answers_the_class_prior_and_says_so(model):
    out = _flow(model, [LoseAll()] * 4).run(_views(b=4))
    assert out.empty.all() and out.present.tolist() == [0] * 4
    torch.testing.assert_close(out.logits, model.log_prior.expand(4, -1))
    for tr in out.traces:
        assert tr.empty and tr.edge_flops == 0 and tr.edge_time_s == 0.0
        assert tr.latency_s == max(d.compute_time_s + d.link_time_s for d in tr.devices)


@pytest.mark.parametrize("framing", ["session", "sample"])
def test_trace_bytes_are_the_streams_lengths(model, framing):
    v = _views(b=4)
    kinds = ["m1", "m2", "m2", "m1"]
    out = _flow(model, _clean(4), kinds, framing=framing).run(v)
    for k, kind in enumerate(kinds):
        streams = model.compress(kind, model.device_features(kind, v[:, k]))
        for tr, s in zip(out.traces, streams):
            d = tr.devices[k]
            assert d.bytes == sum(len(u) for u in s.units(framing))
            if framing == "sample":
                assert d.bytes == len(s.to_bytes())
            assert d.packets == len(s.units(framing))
    for tr in out.traces:
        assert tr.bytes == sum(d.bytes for d in tr.devices)
        assert [d.flops for d in tr.devices] == [model.device_flops(k)["total"] for k in kinds]


def test_latency_is_the_slowest_arriving_device_plus_the_edge(model):
    links = [IIDPacketErasure(0.0, seed=0), LoseAll(), IIDPacketErasure(0.0, seed=2)]
    devices = [DeviceHop("m2", link, symbol_rate=1e5, delay_s=d, flops_per_s=1e9)
               for link, d in zip(links, (0.001, 0.5, 0.01))]
    out = CooperativeFlow(model, devices, edge_flops_per_s=1e10).run(_views(b=2, n=3))
    for tr in out.traces:
        d0, d1, d2 = tr.devices
        assert not d1.arrived  # the slowest device is lost: the edge does not wait for it
        assert d2.link_time_s == pytest.approx(d2.channel_uses / 1e5 + 0.01)
        assert tr.edge_time_s == pytest.approx(tr.edge_flops / 1e10) and tr.edge_flops > 0
        assert tr.latency_s == pytest.approx(max(d0.compute_time_s + d0.link_time_s,
                                                 d2.compute_time_s + d2.link_time_s)
                                             + tr.edge_time_s)


def test_fast_link_losses_follow_the_snr(model):
    v = _views(b=6, n=2)
    good = _flow(model, [FastLink(mcs=4, snr_db=30.0, seed=k) for k in range(2)]).run(v)
    assert all(d.arrived and d.channel_uses > 0 for t in good.traces for d in t.devices)
    bad = _flow(model, [FastLink(mcs=20, snr_db=-10.0, seed=k) for k in range(2)]).run(v)
    assert bad.empty.all()
    torch.testing.assert_close(bad.logits, model.log_prior.expand(6, -1))


def test_same_seeds_same_losses(model):
    v = _views(b=20)
    a = _flow(model, [IIDPacketErasure(0.4, seed=k) for k in range(4)]).run(v)
    b = _flow(model, [IIDPacketErasure(0.4, seed=k) for k in range(4)]).run(v)
    assert torch.equal(a.logits, b.logits)
    assert [[d.arrived for d in t.devices] for t in a.traces] == \
        [[d.arrived for d in t.devices] for t in b.traces]
    assert 0.0 < sum(a.arrival_rate()) / 4 < 1.0


def test_selective_asks_in_turn_and_counts_requests_and_confidences(model):
    v = _views(b=4)
    flow = _flow(model, _clean(4))
    everyone = flow.run(v)
    asked_all = flow.run(v, selective=Selective("fixed", threshold=1.01))
    torch.testing.assert_close(asked_all.logits, everyone.logits, rtol=1e-5, atol=1e-5)
    for t_all, t in zip(everyone.traces, asked_all.traces):
        assert t.rounds == 4 and [d.round for d in t.devices] == [1, 2, 3, 4]
        assert t.bytes == t_all.bytes + 4  # one request byte per device
    first = flow.run(v, selective=Selective("fixed", threshold=0.0, priority=(2, 0, 1, 3)))
    for t in first.traces:
        assert t.rounds == 1 and [d.asked for d in t.devices] == [False, False, True, False]
        assert t.present == 1 and t.bytes == t.devices[2].bytes + 1
        assert [d.flops > 0 for d in t.devices] == [False, False, True, False]
    conf = flow.run(v, selective=Selective("confidence", threshold=1.01))
    for t_all, t in zip(everyone.traces, conf.traces):
        assert t.rounds == 5 and t.bytes == t_all.bytes + 4 + 4
        assert all(d.confidence_arrived and d.confidence_bytes == 1 for d in t.devices)
    torch.testing.assert_close(conf.logits, everyone.logits, rtol=1e-5, atol=1e-5)


def test_selective_moves_on_when_a_device_is_lost(model):
    flow = _flow(model, [LoseAll(), *_clean(3)])
    out = flow.run(_views(b=3), selective=Selective("fixed", threshold=0.0))
    for t in out.traces:
        assert not t.devices[0].arrived and t.devices[1].arrived
        assert t.rounds == 2 and t.present == 1 and not t.empty
    none = _flow(model, [LoseAll()] * 2).run(_views(b=2, n=2), selective=Selective("fixed", 0.0))
    assert none.empty.all() and [t.rounds for t in none.traces] == [2, 2]


def test_run_scene_uses_the_view_generator(model):
    gen = ViewGenerator(ViewConfig(devices=4, seed=3))
    flow = CooperativeFlow(model, [DeviceHop("m2", link) for link in _clean(4)], views=gen)
    x = torch.rand(3, 1, 8, 8)
    idx = torch.tensor([4, 5, 6])
    torch.testing.assert_close(flow.run_scene(x, idx).logits, flow.run(gen(x, idx)).logits)


def test_bad_input_gives_named_errors(model):
    flow = _flow(model, _clean(4))
    with pytest.raises(ConfigError, match="devices|views"):
        flow.run(_views(n=3))
    with pytest.raises(ConfigError, match="views"):
        flow.run(torch.rand(2, 4, 1, 9, 8))
    with pytest.raises(ConfigError, match="views"):
        flow.run(torch.rand(2, 4, 8, 8))
    with pytest.raises(ConfigError, match="views"):
        flow.run([torch.rand(2, 1, 8, 8)] * 3)
    with pytest.raises(ConfigError, match="empty"):
        flow.run(torch.rand(0, 4, 1, 8, 8))
    with pytest.raises(ConfigError, match="finite"):
        flow.run(torch.full((1, 4, 1, 8, 8), float("nan")))
    with pytest.raises(ConfigError, match="devices"):
        _flow(model, _clean(5))
    with pytest.raises(ConfigError, match="kind"):
        DeviceHop("m7", IIDPacketErasure(0.0))
    with pytest.raises(ConfigError, match="kind"):
        CooperativeFlow(CoopModel(model.family, CoopConfig(kinds=("m2",), latent=4, dim=8,
                                                           hidden=8)),
                        [DeviceHop("m1", IIDPacketErasure(0.0))])
    with pytest.raises(ConfigError, match="transmit"):
        _flow(model, [object()])
    with pytest.raises(ConfigError, match="framing"):
        _flow(model, _clean(2), framing="bytes")
    with pytest.raises(ConfigError, match="symbol_rate"):
        _flow(model, _clean(2), symbol_rate=0.0)
    with pytest.raises(ConfigError, match="flops_per_s"):
        _flow(model, _clean(2), flops_per_s=-1.0)
    with pytest.raises(ConfigError, match="order"):
        flow.run(_views(), selective=Selective("random"))
    with pytest.raises(ConfigError, match="priority"):
        flow.run(_views(), selective=Selective("fixed", priority=(0, 0, 1, 2)))
    with pytest.raises(ConfigError, match="views"):
        flow.run_scene(torch.rand(2, 1, 8, 8))
