"""channels.link.ExactLink: bytes in, bytes-or-erasure out, with a truthful report."""

import math
import os
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from channels import (
    AWGN,
    MCS,
    ChannelError,
    ExactLink,
    LinkReport,
    OFDMTDLChannel,
    RayleighBlockFading,
)
from channels.link import plan_packet
from channels.mcs import MCS_TABLE


def _packets(sizes, seed=0):
    rnd = random.Random(seed)
    return [bytes(rnd.getrandbits(8) for _ in range(n)) for n in sizes]


def test_high_snr_round_trip_mixed_lengths():
    packets = _packets([0, 1, 17, 100, 100, 500])
    link = ExactLink(mcs=9, snr_db=12.0, seed=0)
    out, rep = link.transmit(packets)
    assert out == packets
    assert isinstance(rep, LinkReport)
    assert rep.per_packet_success == [True] * 6 and rep.n_transmissions == [1] * 6
    assert rep.info_bits == 8 * sum(map(len, packets)) == rep.delivered_bits
    # channel uses: coded bits / bits per symbol, per packet
    m = MCS_TABLE[9].modulation_order
    expected = [plan_packet(len(p), MCS_TABLE[9]).n // m for p in packets]
    assert rep.per_packet_channel_uses == expected
    assert rep.channel_uses == sum(expected)
    assert rep.effective_rate == pytest.approx(rep.delivered_bits / rep.channel_uses)
    # a code rate close to the MCS rate, so the spectral efficiency is close to Qm * R
    big = expected[-1]
    assert 8 * 500 / big == pytest.approx(MCS_TABLE[9].spectral_efficiency, rel=0.05)


def test_segmentation_of_long_packets():
    plan = plan_packet(3000, MCS_TABLE[9])
    assert plan.num_cb == 3 and plan.tb_crc == "CRC24A" and plan.k <= 8448
    assert plan.num_cb * (plan.k - 24) == 3000 * 8 + 24 + plan.pad_bits
    plan2 = plan_packet(3000, MCS_TABLE[2])  # low rate -> base graph 2, K_cb = 3840
    assert plan2.bg == "bg2" and plan2.num_cb == 7
    packets = _packets([1200])
    out, rep = ExactLink(mcs=9, snr_db=8.0, seed=1).transmit(packets)
    assert out == packets and rep.num_code_blocks == [2]
    # MCS 2 (R = 0.19 < 1/5): rate-1/5 codeword repeated cyclically
    packets = _packets([500])
    out, rep = ExactLink(mcs=MCS_TABLE[2], snr_db=0.0, seed=1).transmit(packets)
    assert out == packets and rep.num_code_blocks == [2]


def test_low_snr_erases_and_never_corrupts():
    packets = _packets([40] * 200, seed=3)
    out, rep = ExactLink(mcs=9, snr_db=3.2, seed=2).transmit(packets)
    lost = [o is None for o in out]
    assert 0 < sum(lost) < len(packets)  # waterfall region: some of each
    for o, p in zip(out, packets):
        assert o is None or o == p
    assert rep.per_packet_success == [not x for x in lost]
    assert rep.delivered_bits == 8 * 40 * (len(packets) - sum(lost))


def test_harq_chase_combining():
    packets = _packets([60] * 100, seed=4)
    one, r1 = ExactLink(mcs=9, snr_db=1.0, seed=5).transmit(packets)
    three, r3 = ExactLink(mcs=9, snr_db=1.0, harq_max_tx=3, seed=5).transmit(packets)
    assert sum(o is not None for o in one) < 10
    assert sum(o is not None for o in three) > 90  # ~+4.8 dB from three combined copies
    assert max(r3.n_transmissions) <= 3 and min(r3.n_transmissions) >= 1
    per_tx = r1.per_packet_channel_uses[0]
    assert r3.per_packet_channel_uses == [n * per_tx for n in r3.n_transmissions]
    assert all(o is None or o == p for o, p in zip(three, packets))


def test_reproducible_with_seed_and_generator():
    packets = _packets([30] * 60, seed=6)
    a = ExactLink(mcs=9, snr_db=3.2, seed=11).transmit(packets)
    b = ExactLink(mcs=9, snr_db=3.2, seed=11).transmit(packets)
    assert a[0] == b[0] and a[1].per_packet_success == b[1].per_packet_success
    link = ExactLink(mcs=9, snr_db=3.2, seed=0)
    c = link.transmit(packets, generator=torch.Generator().manual_seed(5))
    d = link.transmit(packets, generator=torch.Generator().manual_seed(5))
    assert c[0] == d[0]


@pytest.mark.parametrize("channel", [
    RayleighBlockFading(coherence_length=1000, seed=0),
    OFDMTDLChannel("C", delay_spread=300e-9, speed=3.0, channel_estimation="ls", seed=0),
])
def test_fading_channels_through_the_link(channel):
    packets = _packets([100] * 20, seed=7)
    link = ExactLink(mcs=4, channel=channel, snr_db=30.0, seed=0)
    out, rep = link.transmit(packets)
    assert sum(o == p for o, p in zip(out, packets)) >= 18
    assert all(o is None or o == p for o, p in zip(out, packets))
    assert rep.channel_uses == sum(rep.per_packet_channel_uses)
    if isinstance(channel, OFDMTDLChannel):  # whole grids are counted
        assert rep.per_packet_channel_uses[0] % (14 * 72) == 0


def test_snr_override_changes_outcome():
    packets = _packets([50] * 50, seed=8)
    link = ExactLink(mcs=9, snr_db=20.0, seed=0)
    bad, _ = link.transmit(packets, snr_db=-5.0)
    assert all(o is None for o in bad)


def test_bad_inputs():
    link = ExactLink(mcs=0, snr_db=0.0)
    with pytest.raises(TypeError):
        link.transmit(b"not a list")
    with pytest.raises(TypeError):
        link.transmit(["text"])
    with pytest.raises(ChannelError):
        link.transmit([b"x"], snr_db=float("nan"))
    with pytest.raises(ChannelError):
        ExactLink(mcs=40)
    with pytest.raises(ChannelError):
        ExactLink(mcs=0, harq_max_tx=0)
    with pytest.raises(TypeError):
        ExactLink(mcs=0, channel="awgn")
    out, rep = link.transmit([])
    assert out == [] and rep.channel_uses == 0 and rep.effective_rate == 0.0


def test_custom_mcs_and_bpsk():
    packets = _packets([20] * 4)
    out, rep = ExactLink(mcs=MCS(1, 0.5), snr_db=6.0).transmit(packets)
    assert out == packets
    assert rep.per_packet_channel_uses[0] == math.ceil((20 * 8 + 16) / 0.5)


def test_simulate_code_blocks():
    link = ExactLink(mcs=MCS(2, 0.5), channel=AWGN(), seed=0)
    err_hi = link.simulate_code_blocks(256, 200, snr_db=6.0)
    err_lo = link.simulate_code_blocks(256, 200, snr_db=-3.0)
    assert err_hi.dtype == torch.bool and err_hi.shape == (200,)
    assert err_hi.sum() == 0 and err_lo.float().mean() > 0.9


def test_random_bytes_round_trip_property():
    # arbitrary byte contents, including all-zero and all-one payloads
    packets = [bytes(64), b"\xff" * 64, os.urandom(64)]
    out, _ = ExactLink(mcs=15, snr_db=25.0, seed=0).transmit(packets)
    assert out == packets


@settings(max_examples=100, deadline=None)
@given(nbytes=st.integers(0, 20_000), idx=st.integers(0, 28))
def test_plan_packet_invariants(nbytes, idx):
    mcs = MCS_TABLE[idx]
    plan = plan_packet(nbytes, mcs)
    crc = 24 if 8 * nbytes > 3824 else 16
    kcb = 8448 if plan.bg == "bg1" else 3840
    assert plan.k <= kcb and plan.k >= 12
    info_per_cb = plan.k - (24 if plan.num_cb > 1 else 0)
    assert plan.num_cb * info_per_cb == 8 * nbytes + crc + plan.pad_bits
    assert 0 <= plan.pad_bits < plan.num_cb
    assert plan.n % mcs.modulation_order == 0
    assert plan.k / plan.n <= mcs.code_rate + 1e-9  # never above the MCS rate
    assert plan.k / (plan.n - mcs.modulation_order) > mcs.code_rate  # and as close as possible
    assert plan.n_enc <= plan.n and plan.k / plan.n_enc >= 0.2
