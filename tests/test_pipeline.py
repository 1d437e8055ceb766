"""The device-edge-cloud flow: trace arithmetic by hand, exits, concealment."""

from __future__ import annotations

import pytest
import torch
from helpers import tiny_cloud_family
from torch import nn

from channels import ExactLink, FastLink, IIDPacketErasure
from flowcodec.bitstream import PACKET_OVERHEAD
from flowcodec.codecs import build_codec
from flowcodec.errors import ConfigError
from flowcodec.family import EarlyExitFamily, build_family
from flowcodec.flops import count_flops
from flowcodec.pipeline import Flow, Hop, Tier


def tiny_family() -> EarlyExitFamily:
    """Two linear stages of 4 -> 4 (32 FLOPs each) and linear exits 4 -> 3 (24 FLOPs)."""
    torch.manual_seed(0)
    stages = [nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)]
    exits = [nn.Linear(4, 3, bias=False), nn.Linear(4, 3, bias=False)]
    return EarlyExitFamily(stages, exits, (4,)).eval()


def two_tier(fam, link, threshold=None, delay=0.01):
    codec = build_codec("raw", (4,))
    tiers = [Tier("device", 1e3, point=1, exit_threshold=threshold), Tier("cloud", 1e4, point=2)]
    return Flow(fam, tiers, [Hop(codec, link, symbol_rate=1e3, delay_s=delay)]), codec


def test_trace_arithmetic_by_hand():
    fam = tiny_family()
    flow, codec = two_tier(fam, IIDPacketErasure(0.0))
    x = torch.randn(3, 4)
    res = flow.run(x)
    stream = codec.compress(fam.features(x[:1], 1))[0]
    nbytes = len(stream.to_bytes())
    assert nbytes == len(stream.header_bytes()) + 16 + PACKET_OVERHEAD  # 4 float32 values
    for tr in res.traces:
        assert tr.exit_tier == "cloud" and tr.exit_point == 2
        assert tr.compute_flops == {"device": 32, "cloud": 32 + 24}
        assert tr.compute_time_s["device"] == pytest.approx(32 / 1e3)
        assert tr.compute_time_s["cloud"] == pytest.approx(56 / 1e4)
        (hop,) = tr.hops
        assert hop.bits == 8 * nbytes
        # An erasure channel carries 1 bit per channel use: header and packet, bit by bit.
        assert hop.channel_uses == 8 * nbytes
        assert hop.packets == 2 and hop.packets_lost == 0
        assert hop.tx_time_s == pytest.approx(8 * nbytes / 1e3 + 0.01)
        assert tr.latency_s == pytest.approx(0.032 + 0.0056 + 8 * nbytes / 1e3 + 0.01)
    # Lossless float32 features: the flow computes exactly what the member computes.
    assert torch.equal(res.logits, fam.member(2)(x))


def test_early_exit_answers_on_the_device():
    fam = tiny_family()
    flow, _ = two_tier(fam, IIDPacketErasure(0.0), threshold=0.0)
    x = torch.randn(5, 4)
    res = flow.run(x)
    assert res.exit_mix() == {"device": 1.0}
    assert torch.equal(res.logits, fam.member(1)(x))
    for tr in res.traces:
        assert tr.hops == [] and tr.compute_flops == {"device": 32 + 24}


def test_threshold_splits_samples_by_confidence():
    fam = tiny_family()
    x = torch.randn(64, 4)
    conf = fam.member(1)(x).softmax(1).amax(1)
    thr = float(conf.median())
    flow, _ = two_tier(fam, IIDPacketErasure(0.0), threshold=thr)
    res = flow.run(x)
    for c, tr, lg, full, small in zip(conf, res.traces, res.logits, fam.member(2)(x),
                                      fam.member(1)(x)):  # fmt: skip
        if c >= thr:
            assert tr.exit_tier == "device" and torch.equal(lg, small)
            assert tr.compute_flops["device"] == 56
        else:
            assert tr.exit_tier == "cloud" and torch.equal(lg, full)
            assert tr.compute_flops["device"] == 56  # it paid for the exit it did not take


def test_lost_packets_are_concealed_not_decoded():
    fam = tiny_family()
    flow, codec = two_tier(fam, IIDPacketErasure(1.0))
    flow.max_concealed = None  # answer from what arrived (tests/test_fallback.py: the default)
    codec.conceal.fill_(0.5)
    x = torch.randn(4, 4)
    res = flow.run(x)
    _, tail = fam.split(2, 1)
    want = tail(torch.full((4, 4), 0.5))
    assert torch.equal(res.logits, want)
    assert all(tr.hops[0].header_lost and tr.hops[0].packets_lost == 2 for tr in res.traces)


def test_session_framing_sends_no_header_and_counts_its_own_bytes():
    fam = tiny_family()
    codec = build_codec("raw", (4,), packets=2)
    tiers = [Tier("device", 1e3, point=1), Tier("cloud", 1e4, point=2)]
    x = torch.randn(3, 4)
    stream = codec.compress(fam.features(x[:1], 1))[0]
    for framing, want_packets in (("sample", 3), ("session", 2)):
        hop = Hop(codec, IIDPacketErasure(0.0), symbol_rate=1e3, framing=framing)
        res = Flow(fam, tiers, [hop]).run(x)
        nbytes = sum(len(u) for u in stream.units(framing))
        # 2 packets of 2 float32: header + 2 x (8 + 10) bytes, or 2 x (1 + 8 + 2) bytes
        assert nbytes == (len(stream.header_bytes()) + 36 if framing == "sample" else 22)
        for tr in res.traces:
            (h,) = tr.hops
            assert h.bits == 8 * nbytes and h.channel_uses == 8 * nbytes
            assert h.packets == want_packets and not h.header_lost
        assert torch.equal(res.logits, fam.member(2)(x))
    lossy = Hop(codec, IIDPacketErasure(1.0), symbol_rate=1e3, framing="session")
    res = Flow(fam, tiers, [lossy]).run(x)
    assert all(tr.hops[0].packets_lost == 2 and not tr.hops[0].header_lost
               for tr in res.traces)  # fmt: skip
    with pytest.raises(ConfigError, match="framing"):
        Hop(codec, IIDPacketErasure(0.0), symbol_rate=1e3, framing="frame")


def test_three_tiers_over_digital_links():
    fam = build_family("digits").eval()
    torch.manual_seed(0)
    hops = [
        Hop(build_codec("raw", fam.feature_shape(1), dtype="float16", packets=4),
            FastLink(mcs=9, snr_db=20.0, seed=1), symbol_rate=1e6, delay_s=1e-3),
        Hop(build_codec("raw", fam.feature_shape(2), dtype="float16"),
            ExactLink(mcs=9, snr_db=20.0, seed=2), symbol_rate=1e7, delay_s=1e-2),
    ]  # fmt: skip
    tiers = [Tier("device", 20e9, 1, 0.9), Tier("edge", 2e12, 2, 0.9), Tier("cloud", 2e13, 3)]
    flow = Flow(fam, tiers, hops)
    x = torch.randn(6, 1, 8, 8)
    res = flow.run(x)
    for tr in res.traces:
        assert len(tr.hops) == {"device": 0, "edge": 1, "cloud": 2}[tr.exit_tier]
        for h in tr.hops:
            assert h.packets_lost == 0 and h.channel_uses > 0
    # At 20 dB nothing is lost, float16 features stay close to the exact member.
    ref = [fam.member(3)(x), fam.member(2)(x), fam.member(1)(x)]
    for i, tr in enumerate(res.traces):
        want = ref[3 - tr.exit_point][i]
        assert torch.allclose(res.logits[i], want, atol=5e-2)


def test_bad_configurations_are_named():
    fam = tiny_family()
    raw = build_codec("raw", (4,))
    with pytest.raises(ConfigError, match="hops"):
        Flow(fam, [Tier("d", 1, 1), Tier("c", 1, 2)], [])
    with pytest.raises(ConfigError, match="increase"):
        Flow(fam, [Tier("d", 1, 2), Tier("c", 1, 1)], [Hop(raw, IIDPacketErasure(0), 1)])
    with pytest.raises(ConfigError, match="takes features"):
        Flow(build_family("digits"), [Tier("d", 1, 1), Tier("c", 1, 2)],
             [Hop(raw, IIDPacketErasure(0), 1)])  # fmt: skip
    with pytest.raises(ConfigError, match="inputs must be"):
        two_tier(fam, IIDPacketErasure(0))[0].run(torch.randn(2, 5))


def test_a_multi_view_codec_on_the_first_hop_gets_the_views_from_the_device():
    from flowcodec.views import view_features

    fam = build_family("digits").eval()
    torch.manual_seed(0)
    shape = fam.feature_shape(1)
    codec = build_codec("task", shape, latent=4, stem=[[shape[0], True]], hidden=16, rates=2,
                        packets=2, views=2).eval()
    one = build_codec("task", shape, latent=4, stem=[[shape[0], True]], hidden=16, rates=2,
                      packets=2).eval()
    one.load_state_dict(codec.state_dict())  # the same weights; one view or two
    codec.update(force=True)
    one.update(force=True)
    tiers = [Tier("device", 1e9, point=1), Tier("cloud", 1e12, point=3)]
    x = torch.randn(3, *fam.input_shape)
    flows = [Flow(fam, tiers, [Hop(c, IIDPacketErasure(0.0), symbol_rate=1e6)])
             for c in (codec, one)]  # fmt: skip
    res, res_one = flows[0].run(x), flows[1].run(x)
    head, tail = fam.split(3, 1)
    want = tail(codec.decompress(codec.compress(view_features(head, x, 2))))
    assert torch.allclose(res.logits, want, atol=1e-5)
    head_flops = count_flops(fam.stages[0], fam.input_shape)
    for tr, tr1 in zip(res.traces, res_one.traces):
        # the second view runs the device's stage once more and its encoder once more
        extra = head_flops + one.encoder_flops()
        assert tr.compute_flops["device"] == tr1.compute_flops["device"] + extra
        assert tr.hops[0].packets == tr1.hops[0].packets  # a packet per group, both views
        assert tr.hops[0].bits > tr1.hops[0].bits
    with pytest.raises(ConfigError, match="input views"):
        Flow(fam, [Tier("device", 1e9, 1), Tier("edge", 1e10, 2), Tier("cloud", 1e12, 3)],
             [Hop(build_codec("raw", shape), IIDPacketErasure(0.0), symbol_rate=1e6),
              Hop(build_codec("task", fam.feature_shape(2), latent=4, hidden=16, views=2),
                  IIDPacketErasure(0.0), symbol_rate=1e6)])  # fmt: skip


# --- a branching family -------------------------------------------------------------------------
def test_a_branching_member_runs_its_own_stages_from_the_split_point():
    fam = tiny_cloud_family()  # member 4 reads split point 1: path [0, 1, 4]
    codec = build_codec("raw", fam.feature_shape(1))  # float32: lossless
    tiers = [Tier("device", 1e9, point=1), Tier("cloud", 1e12, point=4)]
    flow = Flow(fam, tiers, [Hop(codec, IIDPacketErasure(0.0), symbol_rate=1e6)])
    x = torch.randn(3, *fam.input_shape)
    res = flow.run(x)
    assert torch.equal(res.logits, fam.member(4)(x))  # stage 4 on point 1, not stages 2-4
    cloud = count_flops(fam.stages[3], fam.feature_shape(1)) + count_flops(
        fam.exits[3], fam.feature_shape(4))  # fmt: skip
    assert {tr.compute_flops["cloud"] for tr in res.traces} == {cloud}


def test_a_tier_off_the_answering_members_path_is_refused_with_the_receiver_to_use():
    fam = tiny_cloud_family()
    codec = build_codec("raw", fam.feature_shape(2))
    hop = Hop(codec, IIDPacketErasure(0.0), symbol_rate=1e6)
    with pytest.raises(ConfigError, match=r"\[0, 1, 4\] only.*'device' sends from point 2, "
                                          r"which member 3 \(family.receiver\(2\)\)"):  # fmt: skip
        Flow(fam, [Tier("device", 1e9, point=2), Tier("cloud", 1e12, point=4)], [hop])
    res = Flow(fam, [Tier("device", 1e9, point=2), Tier("cloud", 1e12, point=3)], [hop]).run(
        torch.randn(2, *fam.input_shape))  # fmt: skip
    assert res.logits.shape == (2, 10)
