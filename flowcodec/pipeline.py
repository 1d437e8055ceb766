"""Device -> edge -> cloud inference over simulated links, with per-sample traces.

A :class:`Flow` runs one family across a chain of tiers. Tier ``t`` computes the family's
stages up to its split point ``tiers[t].point``; if it has an exit threshold it evaluates
the exit at that point and answers every sample whose confidence (largest softmax
probability) reaches the threshold. The other samples' features are compressed by the
codec of hop ``t`` (one :class:`~flowcodec.bitstream.Bitstream` per sample), carried by
the hop's link (header and each packet as separate link packets, or only the packets when
the hop keeps a session), decoded by the next
tier with lost packets concealed, and continued there. The last tier always answers.

Trust in what arrived: the receiving tier knows which of a sample's packets it had to
conceal (lost, or failed their CRC; a lost per-sample header conceals them all). When more
than ``max_concealed`` of them were concealed (default :data:`DEFAULT_MAX_CONCEALED`), the
flow does not answer from those features: the hop resends the units that did not arrive,
up to ``Hop.retries`` rounds, and if that does not bring the concealed fraction down, the
sending tier answers through its own exit (``SampleTrace.fallback == "concealed"``; the
exit's FLOPs are added to that tier's compute and shown in ``SampleTrace.fallback_flops``).
A sender at point 0 has no exit: its sample keeps the concealed answer and is marked
``SampleTrace.untrusted``. :meth:`FlowResult.fallbacks` counts fallbacks by reason.

Latency is accounted per sample as if it were processed alone: compute time is the
sample's FLOPs on each tier divided by that tier's FLOP/s (an assumption, see
:data:`DEFAULT_TIERS`), transmission time is the channel uses its packets took
(retransmissions included) divided by the hop's symbol rate, plus the hop's fixed delay
and its per-sample transport overhead (``Hop.overhead_s``, 0 unless set).
No queueing is modelled.

Example
-------
>>> import torch
>>> from channels import IIDPacketErasure
>>> from flowcodec.codecs import build_codec
>>> from flowcodec.family import build_family
>>> from flowcodec.pipeline import Flow, Hop, Tier
>>> fam = build_family("digits").eval()
>>> flow = Flow(fam, [Tier("device", 1e9, point=1), Tier("cloud", 1e12, point=3)],
...             [Hop(build_codec("raw", fam.feature_shape(1)), IIDPacketErasure(0.0),
...                  symbol_rate=1e6)])
>>> res = flow.run(torch.randn(2, 1, 8, 8))
>>> res.logits.shape, res.traces[0].exit_tier
(torch.Size([2, 10]), 'cloud')
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from flowcodec.bitstream import Bitstream
from flowcodec.codecs.base import FeatureCodec
from flowcodec.errors import ConfigError
from flowcodec.family.base import EarlyExitFamily
from flowcodec.flops import count_flops

__all__ = [
    "DEFAULT_TIERS",
    "Tier",
    "Hop",
    "HopTrace",
    "SampleTrace",
    "FlowResult",
    "TracedLogits",
    "Flow",
    "packet_bits_per_symbol",
    "concealed_fraction",
    "check_max_concealed",
    "DEFAULT_MAX_CONCEALED",
]

#: Default compute capabilities in FLOP/s. ASSUMPTIONS, not measurements: an embedded
#: NPU/CPU running a small CNN at an effective 20 GFLOP/s, an edge GPU at an effective
#: 2 TFLOP/s, a cloud GPU at an effective 20 TFLOP/s (batch-1 inference reaches a small
#: fraction of peak). Override them with figures for your hardware.
DEFAULT_TIERS: dict[str, float] = {"device": 20e9, "edge": 2e12, "cloud": 20e12}

#: A receiver that had to conceal more than this fraction of a sample's packets does not
#: answer from those features (a retry, else the sender's exit answers; see the module
#: docstring). Measured on digits (docs/deployment.md, "When most packets are lost"): at
#: 10 % packet loss it changes no answer for the worse, at 99 % it restores the device exit.
DEFAULT_MAX_CONCEALED = 0.5


def concealed_fraction(stream: Bitstream) -> float:
    """The fraction of ``stream``'s packets the receiver must conceal (lost or failed their
    CRC). A stream of no packets has nothing to conceal (0.0)."""
    n = len(stream.packets)
    return len(stream.lost) / n if n else 0.0


def check_max_concealed(value) -> float | None:
    """``value`` as a concealment threshold: None (never fall back) or a number in [0, 1];
    :class:`ConfigError` otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"max_concealed must be a fraction in [0, 1] or None, got {value!r}")
    return float(value)


@dataclass
class Tier:
    """A place that computes: name, FLOP/s, the split point it computes up to, and the
    confidence threshold at which it answers through the exit at that point (``None``:
    it never answers early; the last tier always answers)."""

    name: str
    flops_per_s: float
    point: int
    exit_threshold: float | None = None

    def __post_init__(self) -> None:
        if not self.flops_per_s > 0:
            raise ConfigError(f"tier {self.name!r}: flops_per_s must be positive")
        if self.exit_threshold is not None and not 0.0 <= self.exit_threshold <= 1.0:
            raise ConfigError(f"tier {self.name!r}: exit_threshold must be in [0, 1]")


@dataclass
class Hop:
    """A link between adjacent tiers.

    ``codec`` compresses the sender's features; ``link`` is any object with
    ``transmit(packets: list[bytes], snr_db=None, generator=None) -> (list[bytes | None],
    report)`` (a ``channels`` link or packet-erasure channel); ``symbol_rate`` is in
    complex symbols per second; ``delay_s`` is the fixed propagation/backhaul delay;
    ``snr_db`` is passed to links that take one (None: the link's own). ``framing`` is
    ``"sample"`` (every sample sends its header as a link packet ahead of its packets) or
    ``"session"`` (the header went once at session set-up; see ``Bitstream.units``).
    ``overhead_s`` is a fixed per-sample cost of getting the sample onto and off the hop
    outside the link itself (serialisation, the RPC stack and any relay on the hosts), added
    to every sample's transmission time; 0 models the link alone. A real deployment's figure
    is measured, e.g. by ``experiments/bench_serve_sim.py`` (docs/deployment.md).
    ``retries`` is how many times a sample whose receiver had to conceal more than the
    flow's ``max_concealed`` resends the units that did not arrive intact (0: never; each
    round costs its channel uses and one more ``delay_s`` for the receiver's request).
    """

    codec: FeatureCodec
    link: object
    symbol_rate: float
    delay_s: float = 0.0
    snr_db: float | None = None
    framing: str = "sample"
    overhead_s: float = 0.0
    retries: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or not (
                0 <= self.retries <= 16):  # fmt: skip
            raise ConfigError(f"retries must be an integer in 0..16, got {self.retries!r}")
        if not self.symbol_rate > 0:
            raise ConfigError("symbol_rate must be positive")
        if self.delay_s < 0:
            raise ConfigError("delay_s must be non-negative")
        if not self.overhead_s >= 0:
            raise ConfigError("overhead_s must be non-negative")
        if getattr(self.codec, "sends_symbols", False):
            # An analog (JSCC) codec: the link is a channels.AnalogChannel, the SNR is
            # required (the codec's side information), channel uses set the time.
            from channels import AnalogChannel

            if not isinstance(self.link, AnalogChannel):
                raise ConfigError("a hop with an analog (JSCC) codec needs a "
                                  "channels.AnalogChannel as its link")  # fmt: skip
            if self.snr_db is None:
                raise ConfigError("a hop with an analog (JSCC) codec needs snr_db")
            return
        if not callable(getattr(self.link, "transmit", None)):
            raise ConfigError("link must have a transmit(packets, ...) method")
        if self.framing not in ("sample", "session"):
            raise ConfigError(f"framing must be 'sample' or 'session', got {self.framing!r}")


def packet_bits_per_symbol(link) -> float:
    """Information bits per channel use that a link without a report of channel uses
    (a packet-erasure channel) is taken to carry: its MCS's spectral efficiency if it has
    one, else 1 bit per symbol."""
    mcs = getattr(link, "mcs", None)
    return float(getattr(mcs, "spectral_efficiency", 1.0))


@dataclass
class HopTrace:
    """One sample on one hop: measured bits (what the link carried for it: header, if the
    hop sends one per sample, and framing included), channel uses, packets sent and lost
    (a per-sample header counts as a packet), and transmission time; ``concealed`` is the
    fraction of the sample's codec packets the receiver had to conceal (lost or failed
    their CRC; all of them when a per-sample header was lost) and ``retries`` the resend
    rounds it took (their bits, channel uses and time are included above)."""

    bits: int
    channel_uses: int
    packets: int
    packets_lost: int
    header_lost: bool
    tx_time_s: float
    concealed: float = 0.0
    retries: int = 0


@dataclass
class SampleTrace:
    """Where a sample exited and what its trip cost."""

    exit_tier: str
    exit_point: int
    confidence: float
    compute_flops: dict[str, int] = field(default_factory=dict)
    compute_time_s: dict[str, float] = field(default_factory=dict)
    hops: list[HopTrace] = field(default_factory=list)
    #: Why a tier answered in place of the next one (None: no fallback): "concealed" (the
    #: receiver had to conceal more than max_concealed of the sample's packets), or, from a
    #: remote hop (flowcodec.serve.RemoteHop), "unreachable", "deadline", ... ("edge:
    #: deadline" when a server fell back on its own exit); and the measured seconds from
    #: the start of Flow.run to this sample's answer (remote hops only).
    fallback: str | None = None
    wall_s: float | None = None
    #: FLOPs the fallback answer cost its tier (the exit branch; already in compute_flops).
    fallback_flops: int = 0
    #: True when the receiver concealed more than max_concealed and no tier could answer in
    #: its place (the sender was at point 0): the answer is from concealed features.
    untrusted: bool = False

    @property
    def latency_s(self) -> float:
        return sum(self.compute_time_s.values()) + sum(h.tx_time_s for h in self.hops)

    @property
    def bits(self) -> int:
        return sum(h.bits for h in self.hops)


class TracedLogits:
    """What a flow's result reads from its ``logits`` ``(B, classes)`` and its ``traces``
    (one per sample, each with ``latency_s``): predictions, accuracy and mean latency."""

    @property
    def predictions(self) -> torch.Tensor:
        return self.logits.argmax(1)

    def accuracy(self, labels: torch.Tensor) -> float:
        return float((self.predictions.cpu() == labels.cpu()).float().mean())

    @property
    def mean_latency_s(self) -> float:
        return sum(t.latency_s for t in self.traces) / max(1, len(self.traces))


@dataclass
class FlowResult(TracedLogits):
    """Logits ``(B, classes)`` and one :class:`SampleTrace` per sample."""

    logits: torch.Tensor
    traces: list[SampleTrace]

    def exit_mix(self) -> dict[str, float]:
        """Fraction of samples answered by each tier."""
        out: dict[str, float] = {}
        for t in self.traces:
            out[t.exit_tier] = out.get(t.exit_tier, 0.0) + 1 / len(self.traces)
        return out

    def fallbacks(self) -> dict[str, int]:
        """How many samples fell back, by reason (``SampleTrace.fallback``); samples kept
        although untrusted are counted under ``"untrusted"``."""
        out: dict[str, int] = {}
        for t in self.traces:
            for reason in (t.fallback, "untrusted" if t.untrusted else None):
                if reason:
                    out[reason] = out.get(reason, 0) + 1
        return out

    def mean_bits(self, hop: int = 0) -> float:
        """Mean measured bits per sample that crossed hop ``hop`` (0 if none did)."""
        used = [t.hops[hop].bits for t in self.traces if len(t.hops) > hop]
        return sum(used) / len(used) if used else 0.0


class Flow:
    """Split inference of ``family`` across ``tiers`` joined by ``hops``.

    Parameters
    ----------
    family : EarlyExitFamily
    tiers : sequence of Tier
        Increasing split points; ``tiers[-1].point >= 1`` (the last tier answers through
        the exit at its point, as member ``tiers[-1].point``). Every tier's point lies on
        that member's path (``family.path``): in a branching family a tier computes the
        member's stages between its point and the previous tier's, not the stages numbered
        between them.
    hops : sequence of Hop
        ``len(tiers) - 1`` hops; ``hops[t].codec`` must take the features at
        ``tiers[t].point``.
    max_concealed : float or None
        The most of a sample's packets a receiving tier may conceal and still answer from
        them (default :data:`DEFAULT_MAX_CONCEALED`); above it the hop retries
        (``Hop.retries``) and then the sending tier answers through its exit. ``None``:
        always answer from what arrived (the behaviour before fallbacks existed).
    """

    def __init__(self, family: EarlyExitFamily, tiers: Sequence[Tier], hops: Sequence[Hop],
                 max_concealed: float | None = DEFAULT_MAX_CONCEALED):  # fmt: skip
        self.max_concealed = check_max_concealed(max_concealed)
        self.family = family
        self.tiers = list(tiers)
        self.hops = list(hops)
        if not self.tiers:
            raise ConfigError("a flow needs at least one tier")
        if len(self.hops) != len(self.tiers) - 1:
            raise ConfigError(f"{len(self.tiers)} tiers need {len(self.tiers) - 1} hops")
        points = [t.point for t in self.tiers]
        if any(b <= a for a, b in zip(points, points[1:])):
            raise ConfigError(f"tier split points must increase, got {points}")
        if not 1 <= points[-1] <= family.num_members or points[0] < 0:
            raise ConfigError(f"split points must lie in 0..{family.num_members}, last >= 1")
        self._path = family.path(points[-1])  # the split points the answering member reads
        off = [t for t in self.tiers[:-1] if t.point not in self._path]
        if off:
            raise ConfigError(
                f"member {points[-1]} (the last tier's point) passes through split points "
                f"{self._path} only; "
                + "; ".join(f"tier {t.name!r} sends from point {t.point}, which member "
                            f"{family.receiver(t.point)} (family.receiver({t.point})) receives"
                            for t in off))  # fmt: skip
        for t, hop in enumerate(self.hops):
            if getattr(hop.codec, "views", 1) > 1 and (t > 0 or getattr(hop, "remote", False)):
                raise ConfigError(
                    f"hop {t}: a codec of {hop.codec.views} input views needs the input "
                    f"image, which only the first tier has, and runs only on a simulated "
                    f"first hop (not after tier 0, not on a RemoteHop)")  # fmt: skip
            want = family.feature_shape(points[t])
            if tuple(hop.codec.feature_shape) != want:
                raise ConfigError(
                    f"hop {t} codec takes features {hop.codec.feature_shape}, but tier "
                    f"{self.tiers[t].name!r} sends features {want} (point {points[t]})"
                )
        self._stage_flops = self._stage_costs()
        self._exit_flops = [
            count_flops(ex, family.feature_shape(p + 1)) for p, ex in enumerate(family.exits)
        ]
        self._enc_flops = [hop.codec.encoder_flops() for hop in self.hops]
        self._dec_flops = [getattr(hop.codec, "decoder_flops", lambda: 0)() for hop in self.hops]

    def _stage_costs(self) -> list[int]:
        fam = self.family  # stage i + 1 reads the features at split point parents[i]
        return [count_flops(s, fam.feature_shape(q)) for s, q in zip(fam.stages, fam.parents)]

    def _between(self, lo: int, hi: int) -> list[int]:
        """The 0-based indices of the answering member's stages after split point ``lo`` up to
        ``hi`` (``lo..hi-1`` for a chain)."""
        return [q - 1 for q in self._path if lo < q <= hi]

    @torch.no_grad()
    def run(self, x: torch.Tensor, generator: torch.Generator | None = None) -> FlowResult:
        """Run a batch ``x`` ``(B, *input_shape)`` through the flow."""
        fam = self.family
        if not isinstance(x, torch.Tensor) or tuple(x.shape[1:]) != fam.input_shape:
            raise ConfigError(f"inputs must be (B, *{fam.input_shape}), got "
                              f"{tuple(getattr(x, 'shape', ())) or type(x).__name__}")
        if x.shape[0] == 0:
            raise ConfigError("inputs are an empty batch (B = 0); run at least one sample")
        fam.eval()
        t0 = time.perf_counter()
        b = x.shape[0]
        traces = [SampleTrace("", 0, 0.0) for _ in range(b)]
        logits_out: list[torch.Tensor | None] = [None] * b
        active = list(range(b))
        h = x
        prev = 0
        for t, tier in enumerate(self.tiers):
            if not active:
                break
            if t > 0 and getattr(self.hops[t - 1], "remote", False):
                # A real server computes the tiers from here on (flowcodec.serve.RemoteHop).
                self.hops[t - 1].finish(self, t - 1, h, active, traces, logits_out, t0)
                break
            sent = h  # what tier t - 1 computed: its exit's input if it must fall back
            if t > 0 and getattr(self.hops[t - 1].codec, "views", 1) > 1:
                h = self._add_views(x, h, active, traces)
            if t > 0:
                h = self._cross(t - 1, h, active, traces, generator)
                h, active = self._distrust(t - 1, sent, h, active, traces, logits_out)
                if not active:
                    break
            # Compute this tier's stages.
            between = self._between(prev, tier.point)
            flops = sum(self._stage_flops[i] for i in between)
            for i in between:
                h = fam.stages[i](h)
            last = t == len(self.tiers) - 1
            answers = last or (tier.exit_threshold is not None and tier.point >= 1)
            if answers:
                flops += self._exit_flops[tier.point - 1]
            if t > 0:
                flops += self._dec_flops[t - 1]
            for i in active:
                traces[i].compute_flops[tier.name] = flops
            if answers:
                logits = fam.exits[tier.point - 1](h)
                conf = logits.softmax(1).amax(1)
                done = torch.ones_like(conf, dtype=torch.bool) if last else (
                    conf >= tier.exit_threshold)  # fmt: skip
                keep = []
                for j, i in enumerate(active):
                    if bool(done[j]):
                        logits_out[i] = logits[j]
                        traces[i].exit_tier, traces[i].exit_point = tier.name, tier.point
                        traces[i].confidence = float(conf[j])
                    else:
                        keep.append(j)
                active = [active[j] for j in keep]
                h = h[keep]
            if not last:
                for i in active:  # samples that go on pay for the encoder too
                    traces[i].compute_flops[tier.name] += self._enc_flops[t]
            prev = tier.point
        for tr in traces:
            tr.compute_time_s = {  # times a remote tier measured are kept
                name: tr.compute_time_s[name] if name in tr.compute_time_s
                else f / self._tier(name).flops_per_s
                for name, f in tr.compute_flops.items()
            }
        return FlowResult(torch.stack(logits_out), traces)  # type: ignore[arg-type]

    def _add_views(self, x: torch.Tensor, h: torch.Tensor, active: list[int],
                   traces: list[SampleTrace]) -> torch.Tensor:  # fmt: skip
        """For a multi-view codec on the first hop: the device also runs its stages on
        the other views of its inputs (flowcodec.codecs.task.VIEWS) and stacks their
        features after ``h`` on the channel axis; their FLOPs go to the device."""
        from flowcodec.views import VIEWS

        views = self.hops[0].codec.views
        head = self._between(0, self.tiers[0].point)
        extra = []
        for view in list(VIEWS.values())[1:views]:
            z = view(x[active])
            for i in head:
                z = self.family.stages[i](z)
            extra.append(z)
        cost = (views - 1) * sum(self._stage_flops[i] for i in head)
        for i in active:
            traces[i].compute_flops[self.tiers[0].name] += cost
        return torch.cat([h, *extra], 1)

    def _distrust(self, t: int, sent: torch.Tensor, h: torch.Tensor, active: list[int],
                  traces: list[SampleTrace], logits_out: list) -> tuple[torch.Tensor, list[int]]:
        """After hop ``t``: the samples whose receiver concealed more than max_concealed
        are answered by tier ``t`` through its exit on the features it sent (``sent``);
        returns the received features and indices of the samples that go on."""
        if self.max_concealed is None:
            return h, active
        bad = [j for j, i in enumerate(active) if traces[i].hops[-1].concealed
               > self.max_concealed]  # fmt: skip
        if not bad:
            return h, active
        tier = self.tiers[t]
        if tier.point < 1:  # nothing to fall back on: keep the answer, say it is untrusted
            for j in bad:
                traces[active[j]].untrusted = True
            return h, active
        lg = self.family.exits[tier.point - 1](sent[bad])
        conf = lg.softmax(1).amax(1)
        # An exit the tier already evaluated (it has a threshold) costs nothing more.
        cost = self._exit_flops[tier.point - 1] if tier.exit_threshold is None else 0
        for k, j in enumerate(bad):
            tr = traces[active[j]]
            logits_out[active[j]] = lg[k]
            tr.exit_tier, tr.exit_point, tr.confidence = tier.name, tier.point, float(conf[k])
            tr.fallback, tr.fallback_flops = "concealed", cost
            tr.compute_flops[tier.name] += cost
        gone = set(bad)
        keep = [j for j in range(len(active)) if j not in gone]
        return h[keep], [active[j] for j in keep]

    def _tier(self, name: str) -> Tier:
        return next(t for t in self.tiers if t.name == name)

    def _cross(self, t: int, h: torch.Tensor, active: list[int], traces: list[SampleTrace],
               generator) -> torch.Tensor:  # fmt: skip
        """Compress, transmit and decompress the features of ``active`` samples on hop t."""
        hop = self.hops[t]
        if getattr(hop.codec, "sends_symbols", False):
            return self._cross_analog(t, h, active, traces, generator)
        streams = hop.codec.compress(h)
        units: list[bytes] = []
        spans = []
        for s in streams:
            pk = s.units(hop.framing)
            spans.append((len(units), len(pk)))
            units += pk
        kwargs = {"generator": generator} if generator is not None else {}
        if hop.snr_db is not None:
            kwargs["snr_db"] = hop.snr_db
        bps = packet_bits_per_symbol(hop.link)

        def send(idx: list[int]) -> tuple[list, list[int] | None]:
            """Units ``idx`` through the link: what arrived, and each one's channel uses
            (None: the link does not report them; they follow from the bits)."""
            delivered, report = hop.link.transmit([units[k] for k in idx], **kwargs)
            uses = getattr(report, "per_packet_channel_uses", None)
            return list(delivered), None if uses is None else [int(u) for u in uses]

        got, uses = send(list(range(len(units))))
        rounds = [0] * len(streams)
        received = [Bitstream.from_units(s.header, got[a : a + n], hop.framing)
                    for (a, n), s in zip(spans, streams)]  # fmt: skip
        extra_bits, extra_uses = [0] * len(streams), [0] * len(streams)
        for _ in range(hop.retries if self.max_concealed is not None else 0):
            # The receiver asks again for the units that did not arrive intact (its CRC
            # check; the simulator compares them with what was sent).
            again = [j for j, r in enumerate(received)
                     if concealed_fraction(r) > self.max_concealed]  # fmt: skip
            idx = [k for j in again for k in range(spans[j][0], sum(spans[j]))
                   if got[k] != units[k]]  # fmt: skip
            if not idx:
                break
            back, back_uses = send(idx)
            owner = {k: j for j in again for k in range(spans[j][0], sum(spans[j]))}
            for n_k, (k, d) in enumerate(zip(idx, back)):
                j = owner[k]
                extra_bits[j] += 8 * len(units[k])
                extra_uses[j] += back_uses[n_k] if back_uses is not None else 0
                if d is not None and got[k] != units[k]:
                    got[k] = d
            for j in again:
                rounds[j] += 1
                a, n = spans[j]
                received[j] = Bitstream.from_units(streams[j].header, got[a : a + n],
                                                   hop.framing)  # fmt: skip
        for j, ((start, n), i) in enumerate(zip(spans, active)):
            mine = got[start : start + n]
            bits = 8 * sum(len(u) for u in units[start : start + n]) + extra_bits[j]
            if uses is not None:
                cu = int(sum(uses[start : start + n])) + extra_uses[j]
            else:
                cu = int(-(-bits // bps))
            traces[i].hops.append(HopTrace(
                bits=bits, channel_uses=cu, packets=n, packets_lost=sum(p is None for p in mine),
                header_lost=hop.framing == "sample" and mine[0] is None,
                tx_time_s=cu / hop.symbol_rate + (1 + rounds[j]) * hop.delay_s + hop.overhead_s,
                concealed=concealed_fraction(received[j]), retries=rounds[j],
            ))  # fmt: skip
        return hop.codec.decompress(received).to(h.device)

    def _cross_analog(self, t: int, h: torch.Tensor, active: list[int],
                      traces: list[SampleTrace], generator) -> torch.Tensor:  # fmt: skip
        """Hop t with an analog (JSCC) codec: symbols through the hop's channel at its SNR,
        as many channel uses as the codec's schedule picks; no bits, no packets."""
        hop = self.hops[t]
        feats, tx = hop.codec.transmit(h, hop.link, hop.snr_db, None, generator)
        for j, i in enumerate(active):
            cu = int(hop.link.channel_uses(int(tx.uses[j])))
            traces[i].hops.append(HopTrace(bits=0, channel_uses=cu, packets=0, packets_lost=0,
                                           header_lost=False, tx_time_s=cu / hop.symbol_rate
                                           + hop.delay_s + hop.overhead_s))
        return feats.to(h.device)
