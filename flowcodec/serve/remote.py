"""The device side: a hop whose far side is a real server.

:class:`RemoteHop` takes the place of a :class:`~flowcodec.pipeline.Hop` in a
:class:`~flowcodec.pipeline.Flow`. The flow computes the device's tier as usual, then
the hop compresses the remaining samples' features (one bitstream per sample, numbered so
that each sample's packets are bound to it), sends each sample as one request to
``address`` (an edge server, or a :class:`~flowcodec.serve.proxy.LinkProxy` in front of
one), all of the batch in flight at once, and fills every sample's trace from the answer:
exit tier and point, confidence, FLOPs and measured compute seconds of every remote tier,
and the per-hop bits, channel uses, lost packets and transmission times.

When the server is unreachable, overloaded, refuses the sample or does not answer within
``deadline_s``, the device answers through its own exit at its split point, and the
trace says so (``SampleTrace.fallback`` is the reason). ``SampleTrace.wall_s`` is the
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
from flowcodec.serve.client import RemoteError, TierClient
from flowcodec.serve.wire import Request, WireError, encode_request, parse_answer

__all__ = ["RemoteHop"]


@dataclass
class RemoteHop:
    """A hop to a real tier server.

    Parameters
    ----------
    codec : FeatureCodec
        Compresses the device's features (the server decodes with the same configuration).
    address : str
        ``host:port`` of the edge server or of the link proxy in front of it.
    deadline_s : float
        Time a sample may take from the moment it is sent to its answer.
    framing : str
        ``"sample"`` or ``"session"`` (as :class:`~flowcodec.pipeline.Hop`).
    root_cert, server_name :
        TLS: the PEM CA certificate to trust, and the name to check it against.
    first_seq : int, optional
        Sequence number of the first sample (then one more per sample); ``None``: a
        random start, so that two devices' samples are not numbered alike.
    """

    codec: FeatureCodec
    address: str
    deadline_s: float = 1.0
    framing: str = "sample"
    root_cert: bytes | None = None
    server_name: str | None = None
    first_seq: int | None = None
    remote: bool = field(default=True, init=False)

    def __post_init__(self) -> None:
        if not self.deadline_s > 0:
            raise ConfigError("deadline_s must be positive")
        if self.framing not in ("sample", "session"):
            raise ConfigError(f"framing must be 'sample' or 'session', got {self.framing!r}")
        self._client: TierClient | None = None
        if self.first_seq is not None and not 0 <= self.first_seq < 1 << 32:
            raise ConfigError("first_seq must be in 0..2^32-1")
        self._seq = secrets.randbelow(1 << 32) if self.first_seq is None else self.first_seq
        self._rid = secrets.randbelow(1 << 62)

    @property
    def client(self) -> TierClient:
        if self._client is None:
            self._client = TierClient(self.address, self.root_cert, self.server_name)
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
            out.append((Request(self._rid, s.seq, s.header_bytes(), units, self.framing),
                        8 * sum(len(u) for u in units)))  # fmt: skip
        return out

    def finish(self, flow, t: int, h: torch.Tensor, active: list[int], traces: list,
               logits_out: list, t0: float) -> None:  # fmt: skip
        """Called by :meth:`Flow.run` for tier ``t + 1`` onwards: fill ``logits_out`` and
        ``traces`` of the ``active`` samples, whose device features are ``h``."""
        from flowcodec.pipeline import HopTrace

        fam = flow.family
        dev = flow.tiers[t]
        names = {tier.name: i for i, tier in enumerate(flow.tiers)}
        with torch.no_grad():
            n_cls = fam.exits[dev.point - 1](h[:1]).shape[1] if dev.point >= 1 else None
        reqs = self._requests(h)
        sent = time.perf_counter()
        futures = [self.client.infer_future(encode_request(r), self.deadline_s) for r, _ in reqs]
        failed: list[tuple[int, str, float]] = []
        for j, ((req, bits), fut, i) in enumerate(zip(reqs, futures, active)):
            try:
                ans = parse_answer(self.client.result(fut))
                if ans["rid"] != req.rid or names.get(ans["exit_tier"], -1) <= t:
                    raise WireError("the answer is for another request or another tier")
                if n_cls is not None and len(ans["logits"]) != n_cls:
                    raise WireError("the answer has the wrong number of classes")
                if any(k not in names for k in (*ans["compute_s"], *ans["flops"])):
                    raise WireError("the answer names a tier this flow does not have")
            except RemoteError as e:
                failed.append((j, e.reason, time.perf_counter()))
                continue
            except WireError:
                failed.append((j, "bad answer", time.perf_counter()))
                continue
            tr = traces[i]
            logits_out[i] = torch.tensor(ans["logits"], dtype=torch.float32)
            tr.exit_tier, tr.exit_point = ans["exit_tier"], int(ans["exit_point"])
            tr.confidence = float(ans["confidence"])
            tr.fallback = ans["fallback"] and f"{ans['exit_tier']}: {ans['fallback']}"
            for name, f in ans["flops"].items():
                tr.compute_flops[name] = int(f)
            # Measured on the servers (the device's own time comes from its FLOPs).
            tr.compute_time_s = {k: float(v) for k, v in ans["compute_s"].items()}
            tr.hops.append(_hop(HopTrace, ans["hops"][0], bits, len(req.units)))
            tr.hops += [_hop(HopTrace, hp) for hp in ans["hops"][1:]]
            tr.wall_s = time.perf_counter() - t0
        if not failed:
            return
        # The device answers through its own exit at its split point.
        if dev.point < 1:
            raise ConfigError(f"tier {dev.name!r} has no exit (point 0) to fall back on, and "
                              f"{len(failed)} samples got no answer ({failed[0][1]})")  # fmt: skip
        rows = [j for j, _, _ in failed]
        with torch.no_grad():
            lg = fam.exits[dev.point - 1](h[rows])
        conf = lg.softmax(1).amax(1)
        exit_flops = flow._exit_flops[dev.point - 1]
        for k, (j, reason, done) in enumerate(failed):
            i, (req, bits) = active[j], reqs[j]
            tr = traces[i]
            logits_out[i] = lg[k]
            tr.exit_tier, tr.exit_point, tr.confidence = dev.name, dev.point, float(conf[k])
            tr.fallback = reason
            if dev.exit_threshold is None:  # the exit it runs now was not run before
                tr.compute_flops[dev.name] += exit_flops
            tr.hops.append(HopTrace(bits=bits, channel_uses=0, packets=len(req.units),
                                    packets_lost=len(req.units), header_lost=True,
                                    tx_time_s=done - sent))  # fmt: skip
            tr.wall_s = time.perf_counter() - t0


def _hop(cls, d: dict, bits: int | None = None, packets: int | None = None):
    return cls(bits=int(d["bits"]) if bits is None else bits,
               channel_uses=int(d["channel_uses"]),
               packets=int(d["packets"]) if packets is None else packets,
               packets_lost=int(d["packets_lost"]), header_lost=bool(d["header_lost"]),
               tx_time_s=float(d["tx_time_s"]))  # fmt: skip
