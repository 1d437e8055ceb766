"""The device side: a hop whose far side is a real server.

:class:`RemoteHop` takes the place of a :class:`~flowcodec.pipeline.Hop` in a
:class:`~flowcodec.pipeline.Flow`. The flow computes the device's tier as usual, then
the hop compresses the remaining samples' features (one bitstream per sample, numbered so
that each sample's packets are bound to it), sends each sample as one request to
``address`` (an edge server, or a :class:`~flowcodec.serve.proxy.LinkProxy` in front of
one; ``tcp://host:port`` for a server's TCP port, :mod:`flowcodec.serve.tcp`), all of the
batch in flight at once, asking for binary answers, and fills every sample's trace from the answer:
exit tier and point, confidence, FLOPs and measured compute seconds of every remote tier,
and the per-hop bits, channel uses, lost packets and transmission times.

When the server is unreachable, overloaded, refuses the sample or does not answer within
``deadline_s``, the device answers through its own exit at its split point, and the
trace says so (``SampleTrace.fallback`` is the reason). So it does when the server could
not trust what reached it (more of the sample's packets concealed than the server's
``TierSpec.max_concealed``, or than the flow's ``max_concealed`` as the answer's trace
reports them): reason ``"concealed"``, after ``retries`` more tries. The exit's FLOPs are
added to the device's compute (``SampleTrace.fallback_flops``). ``SampleTrace.wall_s`` is the
measured time from the start of ``Flow.run`` to the sample's answer.

Example
-------
>>> from flowcodec.codecs import build_codec
>>> from flowcodec.family import build_family
>>> from flowcodec.pipeline import Flow, Tier
>>> fam = build_family("digits").eval()
>>> hop = RemoteHop(build_codec("raw", fam.feature_shape(1)), "127.0.0.1:1", deadline_s=0.5)
>>> flow = Flow(fam, [Tier("device", 1e9, 1), Tier("edge", 1e12, 3)], [hop])
>>> import torch
>>> flow.run(torch.randn(1, 1, 8, 8)).traces[0].fallback  # nothing listens on port 1
'unreachable'
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

import torch

from flowcodec.codecs.base import FeatureCodec
from flowcodec.errors import ConfigError
from flowcodec.pipeline import DEFAULT_MAX_CONCEALED, HopTrace
from flowcodec.serve.client import RemoteError
from flowcodec.serve.engine import CONCEALED_INPUT
from flowcodec.serve.tcp import connect
from flowcodec.serve.wire import ANSWER_FORMS, Request, WireError, encode_request, parse_answer

__all__ = ["RemoteHop"]


@dataclass
class RemoteHop:
    """A hop to a real tier server.

    Parameters
    ----------
    codec : FeatureCodec
        Compresses the device's features (the server decodes with the same configuration).
    address : str
        ``host:port`` of the edge server (gRPC) or of the link proxy in front of it, or
        ``tcp://host:port``: the edge server's TCP port.
    deadline_s : float
        Time a sample may take from the moment it is sent to its answer.
    framing : str
        ``"sample"`` or ``"session"`` (as :class:`~flowcodec.pipeline.Hop`).
    root_cert, server_name :
        TLS: the PEM CA certificate to trust, and the name to check it against.
    first_seq : int, optional
        Sequence number of the first sample (then one more per sample); ``None``: a
        random start, so that two devices' samples are not numbered alike.
    retries : int
        How many times a sample the server could not trust (more of its packets concealed
        than the server's ``max_concealed`` or the flow's) is sent again (through a link
        proxy each try is a new draw of the link) before the device's exit answers it.
    answer : str
        The form of the server's answers: ``"binary"`` (default; smaller, cheaper on both
        sides) or ``"json"`` (for servers older than the binary form).
    """

    codec: FeatureCodec
    address: str
    deadline_s: float = 1.0
    framing: str = "sample"
    root_cert: bytes | None = None
    server_name: str | None = None
    first_seq: int | None = None
    retries: int = 0
    answer: str = "binary"
    remote: bool = field(default=True, init=False)

    def __post_init__(self) -> None:
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or not (
                0 <= self.retries <= 16):  # fmt: skip
            raise ConfigError(f"retries must be an integer in 0..16, got {self.retries!r}")
        if not self.deadline_s > 0:
            raise ConfigError("deadline_s must be positive")
        if self.framing not in ("sample", "session"):
            raise ConfigError(f"framing must be 'sample' or 'session', got {self.framing!r}")
        if self.answer not in ANSWER_FORMS:
            raise ConfigError(f"answer must be one of {ANSWER_FORMS}, got {self.answer!r}")
        self._client = None
        if self.first_seq is not None and not 0 <= self.first_seq < 1 << 32:
            raise ConfigError("first_seq must be in 0..2^32-1")
        self._seq = secrets.randbelow(1 << 32) if self.first_seq is None else self.first_seq
        self._rid = secrets.randbelow(1 << 62)

    @property
    def client(self):
        """The blocking client of ``address`` (gRPC, or TCP for ``tcp://``), made once."""
        if self._client is None:
            self._client = connect(self.address, self.root_cert, self.server_name)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def _requests(self, h: torch.Tensor) -> list[tuple[Request, int]]:
        streams = self.codec.compress(h)
        out = []
        for s in streams:
            s.seq, self._seq = self._seq, (self._seq + 1) & 0xFFFFFFFF
            self._rid += 1
            units = s.units(self.framing)
            out.append((Request(self._rid, s.seq, s.header_bytes(), units, self.framing,
                                answer=self.answer),
                        8 * sum(len(u) for u in units)))  # fmt: skip
        return out

    def finish(self, flow, t: int, h: torch.Tensor, active: list[int], traces: list,
               logits_out: list, t0: float) -> None:  # fmt: skip
        """Called by :meth:`Flow.run` for tier ``t + 1`` onwards: fill ``logits_out`` and
        ``traces`` of the ``active`` samples, whose device features are ``h``."""
        fam = flow.family
        dev = flow.tiers[t]
        first = flow.tiers[t + 1].name
        limit = getattr(flow, "max_concealed", DEFAULT_MAX_CONCEALED)
        names = {tier.name: i for i, tier in enumerate(flow.tiers)}
        with torch.no_grad():
            n_cls = fam.exits[dev.point - 1](h[:1]).shape[1] if dev.point >= 1 else None
        reqs = self._requests(h)
        sent = time.perf_counter()
        failed: list[tuple[int, str, float, dict | None]] = []
        spent = [[0, 0, 0.0] for _ in reqs]  # bits, channel uses, seconds of earlier tries
        pending = list(range(len(reqs)))
        for attempt in range(self.retries + 1):
            futures = [(j, self.client.infer_future(encode_request(reqs[j][0]), self.deadline_s))
                       for j in pending]  # fmt: skip
            pending = []
            for j, fut in futures:
                req, bits = reqs[j]
                try:
                    ans = parse_answer(self.client.result(fut))
                    if ans["rid"] != req.rid or names.get(ans["exit_tier"], -1) <= t:
                        raise WireError("the answer is for another request or another tier")
                    if n_cls is not None and len(ans["logits"]) != n_cls:
                        raise WireError("the answer has the wrong number of classes")
                    if any(k not in names for k in (*ans["compute_s"], *ans["flops"])):
                        raise WireError("the answer names a tier this flow does not have")
                    if not ans["hops"]:
                        raise WireError("the answer has no trace of the device's hop")
                except RemoteError as e:
                    failed.append((j, e.reason, time.perf_counter(), None))
                    continue
                except WireError:
                    failed.append((j, "bad answer", time.perf_counter(), None))
                    continue
                hop0 = ans["hops"][0]
                distrust = (ans["fallback"] == CONCEALED_INPUT and ans["exit_tier"] == first) or (
                    limit is not None and float(hop0.get("concealed", 0.0)) > limit)
                if distrust and attempt < self.retries:  # send the sample again
                    spent[j][0] += bits
                    spent[j][1] += int(hop0["channel_uses"])
                    spent[j][2] = time.perf_counter() - sent  # until this try failed
                    pending.append(j)
                    continue
                i = active[j]
                tr = traces[i]
                tr.compute_time_s = {k: float(v) for k, v in ans["compute_s"].items()}
                for name, f in ans["flops"].items():  # the servers' work, answer or not
                    tr.compute_flops[name] = int(f)
                tr.hops.append(_hop(HopTrace, hop0, bits, len(req.units), spent[j], attempt))
                tr.hops += [_hop(HopTrace, hp) for hp in ans["hops"][1:]]
                if distrust and dev.point >= 1:
                    failed.append((j, "concealed", time.perf_counter(), ans))
                    continue
                logits_out[i] = torch.tensor(ans["logits"], dtype=torch.float32)
                tr.exit_tier, tr.exit_point = ans["exit_tier"], int(ans["exit_point"])
                tr.confidence = float(ans["confidence"])
                if distrust:  # no exit on the device: the only answer, marked untrusted
                    tr.untrusted = True
                else:
                    tr.fallback = ans["fallback"] and f"{ans['exit_tier']}: {ans['fallback']}"
                tr.wall_s = time.perf_counter() - t0
            if not pending:
                break
        if not failed:
            return
        # The device answers through its own exit at its split point.
        if dev.point < 1:
            raise ConfigError(f"tier {dev.name!r} has no exit (point 0) to fall back on, and "
                              f"{len(failed)} samples got no answer ({failed[0][1]})")  # fmt: skip
        rows = [j for j, *_ in failed]
        with torch.no_grad():
            lg = fam.exits[dev.point - 1](h[rows])
        conf = lg.softmax(1).amax(1)
        # The exit it runs now was not run before unless the device has a threshold.
        exit_flops = flow._exit_flops[dev.point - 1] if dev.exit_threshold is None else 0
        for k, (j, reason, done, ans) in enumerate(failed):
            i, (req, bits) = active[j], reqs[j]
            tr = traces[i]
            logits_out[i] = lg[k]
            tr.exit_tier, tr.exit_point, tr.confidence = dev.name, dev.point, float(conf[k])
            tr.fallback, tr.fallback_flops = reason, exit_flops
            tr.compute_flops[dev.name] += exit_flops
            if ans is None:  # nothing came back: every unit counts as lost
                tr.hops.append(HopTrace(bits=bits + spent[j][0], channel_uses=spent[j][1],
                                        packets=len(req.units), packets_lost=len(req.units),
                                        header_lost=True, tx_time_s=done - sent,
                                        concealed=1.0))  # fmt: skip
            tr.wall_s = time.perf_counter() - t0


def _hop(cls, d: dict, bits: int | None = None, packets: int | None = None,
         spent: list | None = None, retries: int = 0):
    """A HopTrace from an answer's hop dict; ``spent``: bits, channel uses and seconds of
    earlier tries of the same sample, added to it."""
    more = spent or [0, 0, 0.0]
    return cls(bits=(int(d["bits"]) if bits is None else bits) + more[0],
               channel_uses=int(d["channel_uses"]) + more[1],
               packets=int(d["packets"]) if packets is None else packets,
               packets_lost=int(d["packets_lost"]), header_lost=bool(d["header_lost"]),
               tx_time_s=float(d["tx_time_s"]) + more[2],
               concealed=float(d.get("concealed", 0.0)), retries=retries)  # fmt: skip
