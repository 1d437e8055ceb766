"""Trust in what arrived: a receiver that had to conceal most of a sample's packets does
not answer from them; the sender's exit does (or a retry brings the packets), and the trace
says so, with the exit's FLOPs counted."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from channels import IIDPacketErasure
from flowcodec.codecs import build_codec
from flowcodec.errors import ConfigError
from flowcodec.family import EarlyExitFamily
from flowcodec.pipeline import DEFAULT_MAX_CONCEALED, Flow, Hop, Tier, concealed_fraction


def tiny_family(n: int = 2) -> EarlyExitFamily:
    """Linear stages of 4 -> 4 (32 FLOPs each) and linear exits 4 -> 3 (24 FLOPs each)."""
    torch.manual_seed(0)
    stages = [nn.Linear(4, 4, bias=False) for _ in range(n)]
    exits = [nn.Linear(4, 3, bias=False) for _ in range(n)]
    return EarlyExitFamily(stages, exits, (4,)).eval()


class DropLink:
    """A link that loses the units whose position (in each call) is in ``drop``; with
    ``calls`` it loses ``drop`` only on the first call(s) listed and delivers the rest."""

    def __init__(self, drop, lossy_calls: int | None = None):
        self.drop, self.lossy_calls, self.calls = set(drop), lossy_calls, 0

    def transmit(self, packets, generator=None):
        self.calls += 1
        lossy = self.lossy_calls is None or self.calls <= self.lossy_calls
        return [None if lossy and k in self.drop else p for k, p in enumerate(packets)], None


def flow(fam, link, threshold=None, retries=0, packets=1, framing="sample", **kw):
    codec = build_codec("raw", (4,), packets=packets)
    tiers = [Tier("device", 1e3, point=1, exit_threshold=threshold), Tier("cloud", 1e4, point=2)]
    hop = Hop(codec, link, symbol_rate=1e3, delay_s=0.01, framing=framing, retries=retries)
    return Flow(fam, tiers, [hop], **kw)


def test_every_packet_lost_falls_back_to_the_device_exit_and_counts_it():
    fam = tiny_family()
    x = torch.randn(5, 4)
    res = flow(fam, IIDPacketErasure(1.0)).run(x)
    assert torch.equal(res.logits, fam.member(1)(x))  # the device's own answer
    assert res.fallbacks() == {"concealed": 5}
    for tr in res.traces:
        assert (tr.exit_tier, tr.exit_point, tr.fallback) == ("device", 1, "concealed")
        assert tr.hops[0].concealed == 1.0 and tr.hops[0].header_lost
        assert tr.fallback_flops == 24  # the exit branch it ran to answer
        assert tr.compute_flops == {"device": 32 + 24}  # the cloud never computed
        assert tr.compute_time_s["device"] == pytest.approx(56 / 1e3)


def test_without_a_threshold_the_concealed_answer_is_kept():
    fam = tiny_family()
    x = torch.randn(4, 4)
    f = flow(fam, IIDPacketErasure(1.0), max_concealed=None)
    f.hops[0].codec.conceal.fill_(0.5)
    res = f.run(x)
    _, tail = fam.split(2, 1)
    assert torch.equal(res.logits, tail(torch.full((4, 4), 0.5)))
    assert res.fallbacks() == {} and all(t.fallback is None for t in res.traces)
    assert all(t.hops[0].concealed == 1.0 for t in res.traces)  # still reported


def test_no_loss_changes_nothing():
    fam = tiny_family()
    x = torch.randn(6, 4)
    a = flow(fam, IIDPacketErasure(0.0)).run(x)
    b = flow(fam, IIDPacketErasure(0.0), max_concealed=None).run(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.logits, fam.member(2)(x))
    assert [t.compute_flops for t in a.traces] == [t.compute_flops for t in b.traces]
    assert a.fallbacks() == {} and all(t.hops[0].concealed == 0.0 for t in a.traces)


@pytest.mark.parametrize("lost, limit, falls", [
    ({0}, 0.5, False), ({0, 1}, 0.5, False), ({0, 1, 2}, 0.5, True), ({0, 1}, 0.25, True),
    ({0, 1, 2, 3}, 1.0, False), (set(), 0.0, False), ({3}, 0.0, True),
])  # fmt: skip
def test_the_threshold_is_a_strict_fraction_of_the_packets(lost, limit, falls):
    fam = tiny_family()
    x = torch.randn(1, 4)
    # Session framing (no header unit): unit k is packet k of the sample's 4.
    res = flow(fam, DropLink(lost), packets=4, framing="session", max_concealed=limit).run(x)
    tr = res.traces[0]
    assert tr.hops[0].concealed == len(lost) / 4
    assert (tr.fallback == "concealed") is falls
    assert tr.exit_tier == ("device" if falls else "cloud")


def test_a_lost_header_conceals_the_whole_sample():
    fam = tiny_family()
    res = flow(fam, DropLink({0}), packets=4).run(torch.randn(1, 4))  # unit 0: the header
    assert res.traces[0].hops[0].concealed == 1.0 and res.traces[0].fallback == "concealed"


def test_a_device_that_already_ran_its_exit_pays_nothing_more():
    fam = tiny_family()
    x = torch.randn(8, 4)
    res = flow(fam, IIDPacketErasure(1.0), threshold=1.0).run(x)  # evaluates, never exits
    for tr in res.traces:
        assert tr.fallback == "concealed" and tr.fallback_flops == 0
        assert tr.compute_flops == {"device": 32 + 24}


def test_a_sender_without_an_exit_keeps_the_answer_but_marks_it_untrusted():
    fam = tiny_family()
    tiers = [Tier("device", 1e3, point=0), Tier("cloud", 1e4, point=2)]
    hop = Hop(build_codec("raw", (4,)), IIDPacketErasure(1.0), symbol_rate=1e3)
    res = Flow(fam, tiers, [hop]).run(torch.randn(3, 4))
    assert res.fallbacks() == {"untrusted": 3}
    assert all(t.untrusted and t.fallback is None and t.exit_tier == "cloud"
               for t in res.traces)  # fmt: skip


def test_a_retry_brings_the_packets_and_is_paid_for():
    fam = tiny_family()
    x = torch.randn(2, 4)
    res = flow(fam, DropLink({0, 1, 2, 3}, lossy_calls=1), retries=1).run(x)
    once = flow(fam, IIDPacketErasure(0.0)).run(x)
    assert torch.equal(res.logits, fam.member(2)(x)) and res.fallbacks() == {}
    for tr, ref in zip(res.traces, once.traces):
        h, h0 = tr.hops[0], ref.hops[0]
        assert h.retries == 1 and h.concealed == 0.0 and h.packets_lost == 0
        assert h.bits == 2 * h0.bits and h.channel_uses == 2 * h0.channel_uses
        assert h.tx_time_s == pytest.approx(h0.tx_time_s + h0.channel_uses / 1e3 + 0.01)


def test_retries_that_do_not_help_end_in_the_fallback():
    fam = tiny_family()
    res = flow(fam, IIDPacketErasure(1.0), retries=2).run(torch.randn(3, 4))
    assert res.fallbacks() == {"concealed": 3}
    assert all(t.hops[0].retries == 2 for t in res.traces)


def test_a_lossy_second_hop_falls_back_on_the_edge_exit():
    fam = tiny_family(3)
    x = torch.randn(4, 4)
    tiers = [Tier("device", 1e3, 1), Tier("edge", 1e4, 2), Tier("cloud", 1e5, 3)]
    hops = [Hop(build_codec("raw", (4,)), IIDPacketErasure(0.0), 1e3),
            Hop(build_codec("raw", (4,)), IIDPacketErasure(1.0), 1e3)]  # fmt: skip
    res = Flow(fam, tiers, hops).run(x)
    assert torch.equal(res.logits, fam.member(2)(x))
    for tr in res.traces:
        assert (tr.exit_tier, tr.fallback, tr.fallback_flops) == ("edge", "concealed", 24)
        assert tr.compute_flops == {"device": 32, "edge": 32 + 24}
        assert [h.concealed for h in tr.hops] == [0.0, 1.0]


def test_bad_thresholds_and_retries_are_refused():
    fam = tiny_family()
    for bad in (-0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(ConfigError, match="max_concealed"):
            flow(fam, IIDPacketErasure(0.0), max_concealed=bad)
    for bad in (-1, 17, 1.5):
        with pytest.raises(ConfigError, match="retries"):
            flow(fam, IIDPacketErasure(0.0), retries=bad)
    assert DEFAULT_MAX_CONCEALED == 0.5


def test_concealed_fraction_of_a_stream():
    codec = build_codec("raw", (4,), packets=4)
    s = codec.compress(torch.randn(1, 4))[0]
    assert concealed_fraction(s) == 0.0
    s.packets[1] = None
    assert concealed_fraction(s) == 0.25


def test_digits_targets(digits_family, digits):
    """The issue's targets on the trained digits family: at 99 % packet loss the flow is
    within 1 point of the device exit; at 10 % the fallback costs at most 0.2 point."""
    _, test = digits
    x, y = test.normalize(test.images), test.labels
    fam = digits_family.eval()
    with torch.no_grad():
        exit_acc = float((fam.member(1)(x).argmax(1) == y).float().mean())
    tiers = [Tier("device", 20e9, 1), Tier("edge", 2e12, 3)]
    codec = build_codec("raw", fam.feature_shape(1), dtype="float16")

    def acc(loss, limit):
        f = Flow(fam, tiers, [Hop(codec, IIDPacketErasure(loss), 1e6)], max_concealed=limit)
        res = f.run(x, generator=torch.Generator().manual_seed(0))
        return res.accuracy(y), res

    a99, res99 = acc(0.99, DEFAULT_MAX_CONCEALED)
    assert a99 >= exit_acc - 0.01
    assert acc(0.99, None)[0] < exit_acc - 0.3  # what it was: the concealed features
    assert res99.fallbacks()["concealed"] >= 0.97 * len(y)
    assert acc(0.1, DEFAULT_MAX_CONCEALED)[0] >= acc(0.1, None)[0] - 0.002
