"""channels.discrete: BSC, BEC and packet erasure channels."""

import numpy as np
import pytest
import torch

from channels import BEC, BSC, ChannelError, GilbertElliott, IIDPacketErasure


def test_bsc_flip_rate_and_reproducible():
    bits = torch.randint(0, 2, (200_000,), generator=torch.Generator().manual_seed(0))
    y1 = BSC(0.1, seed=3)(bits)
    y2 = BSC(0.1, seed=3)(bits)
    assert torch.equal(y1, y2)
    assert y1.dtype == bits.dtype and y1.shape == bits.shape
    assert (y1 != bits).float().mean().item() == pytest.approx(0.1, abs=0.003)
    assert torch.equal(BSC(0.0)(bits), bits)


def test_bec_erasure_rate():
    bits = torch.ones(100_000)
    y = BEC(0.25, seed=1)(bits)
    erased = y == -1
    assert erased.float().mean().item() == pytest.approx(0.25, abs=0.005)
    assert torch.all(y[~erased] == 1)


@pytest.mark.parametrize("bad", [-0.1, 1.1, float("nan")])
def test_bad_probability(bad):
    with pytest.raises(ChannelError):
        BSC(bad)
    with pytest.raises(ChannelError):
        IIDPacketErasure(bad)


def test_bad_bits():
    with pytest.raises(ChannelError):
        BSC(0.1)(torch.tensor([0.0, 2.0]))
    with pytest.raises(TypeError):
        BEC(0.1)([0, 1])


def test_iid_packet_erasure():
    packets = [bytes([i % 256]) * 3 for i in range(20_000)]
    out, rep = IIDPacketErasure(0.2, seed=5).transmit(packets)
    assert len(out) == len(packets)
    lost = [o is None for o in out]
    assert rep.per_packet_success == [not x for x in lost]
    assert np.mean(lost) == pytest.approx(0.2, abs=0.01)
    assert all(o == p for o, p in zip(out, packets) if o is not None)
    out2, _ = IIDPacketErasure(0.2, seed=5).transmit(packets)
    assert out == out2
    g = torch.Generator().manual_seed(9)
    out3, _ = IIDPacketErasure(0.2, seed=0).transmit(packets, generator=g)
    out4, _ = IIDPacketErasure(0.2, seed=1).transmit(packets, generator=torch.Generator()
                                                     .manual_seed(9))
    assert out3 == out4


def test_gilbert_elliott_rate_and_bursts():
    ge = GilbertElliott(loss_rate=0.1, mean_burst_length=5.0, seed=2)
    out, rep = ge.transmit([b"p"] * 100_000)
    lost = np.array([o is None for o in out])
    assert lost.mean() == pytest.approx(0.1, abs=0.01)
    # mean length of runs of consecutive losses
    edges = np.diff(np.concatenate([[0], lost.astype(int), [0]]))
    runs = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
    assert runs.mean() == pytest.approx(5.0, rel=0.1)
    # i.i.d. losses at the same rate have much shorter bursts
    iid, _ = IIDPacketErasure(0.1, seed=2).transmit([b"p"] * 100_000)
    li = np.array([o is None for o in iid]).astype(int)
    e2 = np.diff(np.concatenate([[0], li, [0]]))
    assert (np.flatnonzero(e2 == -1) - np.flatnonzero(e2 == 1)).mean() < 1.5


def test_gilbert_elliott_stream_and_reset():
    ge = GilbertElliott(0.3, 3.0, seed=11)
    a, _ = ge.transmit([b"x"] * 50)
    b, _ = ge.transmit([b"x"] * 50)
    ge.reset()
    c, _ = ge.transmit([b"x"] * 100)
    assert a + b == c


def test_gilbert_elliott_bad_params():
    with pytest.raises(ChannelError):
        GilbertElliott(0.5, 0.5)
    with pytest.raises(ChannelError):
        GilbertElliott(1.0, 3.0)
    with pytest.raises(ChannelError):
        GilbertElliott(0.9, 1.0)  # P(good->bad) would exceed 1
    with pytest.raises(TypeError):
        GilbertElliott(0.1, 2.0).transmit(["not bytes"])
