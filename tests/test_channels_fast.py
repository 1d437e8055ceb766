"""channels.abstraction.FastLink: same interface as ExactLink, BLER from tables."""

import random
import time

import numpy as np
import pytest
import torch

from channels import AWGN, ChannelError, ExactLink, FastLink, RayleighBlockFading
from channels.abstraction import BlerTable, eesm, load_project_tables, load_sionna_tables
from channels.link import LinkReport


def _packets(n, size, seed=0):
    rnd = random.Random(seed)
    return [bytes(rnd.getrandbits(8) for _ in range(size)) for _ in range(n)]


def test_same_interface_and_report():
    packets = _packets(50, 126)
    fast = FastLink(mcs=9, channel=AWGN(), snr_db=3.25, harq_max_tx=1, device="cpu", seed=0)
    out, rep = fast.transmit(packets, snr_db=None, generator=None)
    exact = ExactLink(mcs=9, snr_db=3.25, seed=0)
    out_e, rep_e = exact.transmit(packets[:5])
    assert isinstance(rep, LinkReport) and len(out) == len(packets)
    assert all(o is None or o == p for o, p in zip(out, packets))
    assert rep.per_packet_success == [o is not None for o in out]
    # channel-use accounting is the same for both links
    assert rep.per_packet_channel_uses[:5] == rep_e.per_packet_channel_uses
    assert rep.channel_uses == sum(rep.per_packet_channel_uses)


def test_project_tables_cover_every_mcs():
    tables = load_project_tables()
    assert sorted(tables) == list(range(29))
    for t in tables.values():
        assert t.source == "project" and 1024 in t.ks
    sionna_tables = load_sionna_tables()
    assert 9 in sionna_tables and sionna_tables[9].source == "sionna"


def test_bler_table_interpolation():
    t = BlerTable({100: ([0.0, 1.0, 2.0], [1.0, 0.1, 0.0]),
                   400: ([0.0, 1.0, 2.0], [0.1, 0.01, 0.0])})
    assert float(t.bler(100, 0.5)) == pytest.approx(10 ** -0.5)
    assert float(t.bler(200, 0.0)) == pytest.approx(10 ** -0.5)  # halfway in log k
    assert float(t.bler(100, -5.0)) == 1.0 and float(t.bler(100, 9.0)) == 0.0
    assert float(t.bler(5000, 1.0)) == pytest.approx(0.01)  # clamped to the largest k
    with pytest.raises(ChannelError):
        BlerTable({})


def _compare(snr: float, n_exact: int, seed: int) -> tuple[float, float]:
    fast = FastLink(mcs=9, seed=seed)
    exact = ExactLink(mcs=9, seed=seed + 1)
    _, rf = fast.transmit(_packets(1, 126) * 20000, snr_db=snr)
    _, re = exact.transmit(_packets(n_exact, 126, seed=seed), snr_db=snr)
    return rf.packet_error_rate, re.packet_error_rate


def test_fast_matches_exact_at_one_snr():
    """Quick check at the top of the waterfall (MCS 9, 126-byte packets: k = 1024)."""
    b_fast, b_exact = _compare(3.0, 120, seed=1)
    assert 0.1 < b_exact < 0.9
    assert 0.5 < b_fast / b_exact < 2.0, (b_fast, b_exact)


@pytest.mark.slow
def test_fast_matches_exact_on_the_waterfall():
    """Factor-2 agreement of BLER at three SNRs on the waterfall (BLER ~0.4 ... 0.04)."""
    for snr, n_exact in ((3.0, 250), (3.2, 300), (3.4, 500)):
        b_fast, b_exact = _compare(snr, n_exact, seed=int(10 * snr))
        print(f"Es/N0 {snr} dB: fast {b_fast:.4f}, exact {b_exact:.4f} ({n_exact} packets)")
        assert 0.02 < b_exact < 0.9, (snr, b_exact)
        assert 0.5 < b_fast / b_exact < 2.0, (snr, b_fast, b_exact)


def test_fast_is_100x_faster():
    packets = _packets(40, 126)
    exact, fast = ExactLink(mcs=9, snr_db=3.5), FastLink(mcs=9, snr_db=3.5)
    exact.transmit(packets[:2])
    fast.transmit(packets[:2])
    t0 = time.perf_counter()
    exact.transmit(packets)
    t_exact = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(10):
        fast.transmit(packets)
    t_fast = (time.perf_counter() - t0) / 10
    assert t_exact / t_fast > 100, (t_exact, t_fast)


def test_harq_in_fast_link():
    packets = _packets(1, 126) * 5000
    _, r1 = FastLink(mcs=9, snr_db=1.0, seed=0).transmit(packets)
    _, r3 = FastLink(mcs=9, snr_db=1.0, harq_max_tx=3, seed=0).transmit(packets)
    assert r1.packet_error_rate > 0.99 and r3.packet_error_rate < 0.01
    assert set(r3.n_transmissions) <= {1, 2, 3} and max(r3.n_transmissions) >= 2


def test_fading_fast_link_is_worse_than_awgn_and_reproducible():
    packets = _packets(1, 126) * 3000
    _, awgn = FastLink(mcs=9, snr_db=6.0, seed=0).transmit(packets)
    ch = RayleighBlockFading(coherence_length=10_000, seed=0)
    _, fad = FastLink(mcs=9, channel=ch, snr_db=6.0, seed=0).transmit(packets)
    # block Rayleigh: outage P(|h|^2 < g) = 1 - exp(-g), g = SNR needed / mean SNR
    need = 10 ** ((3.3 - 6.0) / 10)
    assert awgn.packet_error_rate < 1e-3
    assert fad.packet_error_rate == pytest.approx(1 - np.exp(-need), abs=0.05)
    ch2 = RayleighBlockFading(coherence_length=10_000, seed=0)
    _, fad2 = FastLink(mcs=9, channel=ch2, snr_db=6.0, seed=0).transmit(packets)
    assert fad2.per_packet_success == fad.per_packet_success


def test_eesm_limits():
    s = torch.tensor([[1.0, 1.0, 1.0], [0.01, 10.0, 10.0]])
    e = eesm(s, beta=2.0)
    assert e[0].item() == pytest.approx(1.0, rel=1e-5)
    assert 0.01 < e[1].item() < s[1].mean().item()


def test_fast_link_errors():
    with pytest.raises(ChannelError):
        FastLink(mcs=9, snr_db=float("nan"))
    with pytest.raises(TypeError):
        FastLink(mcs=9).transmit([1, 2])
    with pytest.raises(TypeError):
        FastLink(mcs=9).transmit([b"x"], generator="seed")
    gen = torch.Generator().manual_seed(0)
    a, _ = FastLink(mcs=9, snr_db=3.2).transmit([b"y" * 126] * 100, generator=gen)
    b, _ = FastLink(mcs=9, snr_db=3.2).transmit([b"y" * 126] * 100,
                                                generator=torch.Generator().manual_seed(0))
    assert a == b
