"""The work of one tier on a batch of samples: decode, stages, exit, re-encode.

:class:`TierEngine` is synchronous and holds no network state; the server
(:mod:`flowcodec.serve.server`) calls it on the batches it forms, and the offline
throughput baseline of ``experiments/bench_serve.py`` calls the same method on the same
streams, so serving overhead is measured against exactly the same work.

Example
-------
>>> import torch
>>> from flowcodec.codecs import build_codec
>>> from flowcodec.family import build_family
>>> from flowcodec.serve.engine import TierEngine, TierSpec
>>> fam = build_family("digits").eval()
>>> codec = build_codec("raw", fam.feature_shape(1))
>>> eng = TierEngine(fam, TierSpec("edge", point_in=1, point=3), codec)
>>> streams = codec.compress(fam.features(torch.randn(2, 1, 8, 8), 1))
>>> [o.kind for o in eng.run(streams)]
['answer', 'answer']
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flowcodec.bitstream import Bitstream, BitstreamError, Header, parse_packet, varint
from flowcodec.codecs.base import FeatureCodec
from flowcodec.errors import ConfigError
from flowcodec.family.base import EarlyExitFamily
from flowcodec.flops import count_flops
from flowcodec.pipeline import DEFAULT_MAX_CONCEALED, check_max_concealed, concealed_fraction
from flowcodec.serve.wire import Request, WireError

__all__ = ["TierSpec", "TierEngine", "Outcome", "CONCEALED_INPUT"]

#: Header configurations a tier remembers (:meth:`TierEngine.streams_of`); past it, it
#: forgets them all and starts again (a client that varies its header's side information
#: costs the server full parses, never memory).
HEADER_CACHE = 64
_CRC = struct.Struct("<I")

#: The ``fallback`` of an answer whose tier concealed more than its ``max_concealed`` of
#: the sample's packets: the logits come from concealed features, and the caller answers
#: through its own exit if it has one (the device reports it as ``"concealed"``).
CONCEALED_INPUT = "concealed input"


@dataclass(frozen=True)
class TierSpec:
    """One server tier: its name, the split point its input features come from
    (``point_in``; 0 is the raw input), the point it computes up to, and the confidence
    at which it answers through the exit there when a next tier exists (``None``: it
    forwards every sample). A tier without a next tier answers every sample.

    ``max_concealed``: a sample whose incoming packets were concealed (lost or failed their
    CRC) in a larger fraction is not trusted: it is neither answered as usual nor forwarded,
    but answered with ``fallback`` :data:`CONCEALED_INPUT` (``None``: trust every sample)."""

    name: str
    point_in: int
    point: int
    exit_threshold: float | None = None
    max_concealed: float | None = DEFAULT_MAX_CONCEALED

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 32 or not self.name.isascii():
            raise ConfigError("tier name must be 1..32 ASCII characters")
        if not 0 <= self.point_in < self.point:
            raise ConfigError(f"tier {self.name!r}: need 0 <= point_in < point, got "
                              f"{self.point_in}, {self.point}")  # fmt: skip
        if self.exit_threshold is not None and not 0.0 <= self.exit_threshold <= 1.0:
            raise ConfigError(f"tier {self.name!r}: exit_threshold must be in [0, 1]")
        object.__setattr__(self, "max_concealed", check_max_concealed(self.max_concealed))


@dataclass
class Outcome:
    """What a tier did with one sample.

    ``kind``: ``"answer"`` (``logits``, ``confidence`` from this tier's exit),
    ``"forward"`` (``next_stream`` for the next tier; ``logits``/``confidence`` hold this
    tier's exit answer, the fallback when the next tier fails) or ``"error"``
    (``message``: the stream was refused) or ``"concealed"`` (more of the stream's packets
    were concealed than the tier's ``max_concealed``: ``logits`` are this tier's exit on the
    concealed features, and nothing is forwarded). ``concealed`` is the fraction of the
    stream's packets that were concealed.
    """

    kind: str
    logits: list[float] | None = None
    confidence: float = 0.0
    next_stream: Bitstream | None = None
    message: str = ""
    concealed: float = 0.0


class TierEngine:
    """Decode incoming streams, run the stages of ``family`` after ``point_in`` up to
    ``point`` (``point_in+1..point`` for a chain; in a branching family, the stages of member
    ``point``'s path, ``family.path(point)``, which must pass through ``point_in``), answer
    through the exit at ``point`` or re-encode with ``next_codec`` for the next tier.

    Parameters
    ----------
    family : EarlyExitFamily
    spec : TierSpec
    codec : FeatureCodec
        Decodes the incoming streams (features at ``spec.point_in``).
    next_codec : FeatureCodec, optional
        Encodes the features at ``spec.point`` for the next tier; ``None``: this is the
        last tier and it answers every sample.
    """

    def __init__(self, family: EarlyExitFamily, spec: TierSpec, codec: FeatureCodec,
                 next_codec: FeatureCodec | None = None) -> None:  # fmt: skip
        if spec.point > family.num_members:
            raise ConfigError(f"tier {spec.name!r}: point {spec.point} over the family's "
                              f"{family.num_members} members")  # fmt: skip
        path = family.path(spec.point)  # the split points member spec.point passes through
        if spec.point_in not in path:
            raise ConfigError(
                f"tier {spec.name!r}: member {spec.point} (the member that answers at point "
                f"{spec.point}) passes through split points {path} only, not point_in "
                f"{spec.point_in}; features from point {spec.point_in} are finished by member "
                f"{family.receiver(spec.point_in)} (family.receiver({spec.point_in}))")
        want = family.feature_shape(spec.point_in)
        if tuple(codec.feature_shape) != want:
            raise ConfigError(f"tier {spec.name!r}: codec takes {codec.feature_shape}, "
                              f"point {spec.point_in} has {want}")  # fmt: skip
        if next_codec is not None and tuple(next_codec.feature_shape) != family.feature_shape(
                spec.point):  # fmt: skip
            raise ConfigError(f"tier {spec.name!r}: next codec takes {next_codec.feature_shape},"
                              f" point {spec.point} has {family.feature_shape(spec.point)}")
        self.family = family.eval()
        self.spec = spec
        self.codec = codec.eval()
        self.next_codec = next_codec.eval() if next_codec is not None else None
        _, tail = family.split(spec.point, spec.point_in)  # member spec.point's stages from here
        self._stages = list(tail.stages)
        self._exit = tail.exit
        ours = path[path.index(spec.point_in) + 1 :]  # stage q reads split point parents[q - 1]
        stage_flops = sum(count_flops(family.stages[q - 1],
                                      family.feature_shape(family.parents[q - 1]))
                          for q in ours)  # fmt: skip
        self.exit_flops = count_flops(self._exit, family.feature_shape(spec.point))
        dec = int(getattr(codec, "decoder_flops", lambda: 0)())
        self.flops_answer = stage_flops + dec + self.exit_flops
        enc = next_codec.encoder_flops() if next_codec is not None else 0
        evaluates_exit = next_codec is None or spec.exit_threshold is not None
        self.flops_forward = stage_flops + dec + enc + (self.exit_flops if evaluates_exit else 0)
        #: What a forwarded sample costs here when this tier answers it after all (the
        #: next tier failed): its exit becomes a decision and counts.
        self.flops_fallback = self.flops_forward + (0 if evaluates_exit else self.exit_flops)
        # Header bytes up to the sample number -> (Header, packet count): see streams_of.
        self._headers: dict[bytes, tuple[Header, int]] = {}
        self._prefix_sizes: set[int] = set()

    @property
    def last(self) -> bool:
        return self.next_codec is None

    def stream_of(self, req: Request) -> Bitstream:
        """Rebuild the sample's stream from a request; :class:`WireError` or
        :class:`BitstreamError` when the header is not this tier's codec configuration or
        the unit count does not match it."""
        header, n_packets, size = Header.parse(req.header)
        if size != len(req.header):
            raise WireError(f"{len(req.header) - size} trailing bytes after the header")
        if header.codec != self.codec.name or header.fingerprint != self.codec.fingerprint:
            raise WireError(f"stream is from codec {header.codec!r} "
                            f"({header.fingerprint.hex()}), this tier decodes "
                            f"{self.codec.name!r} ({self.codec.fingerprint.hex()})")  # fmt: skip
        want = n_packets + (1 if req.framing == "sample" else 0)
        if len(req.units) != want:
            raise WireError(f"{len(req.units)} units for a {n_packets}-packet "
                            f"{req.framing}-framed sample (want {want})")  # fmt: skip
        return Bitstream.from_units(header, req.units, req.framing, seq=req.seq)

    def streams_of(self, reqs: Sequence[Request]) -> list[Bitstream | WireError | BitstreamError]:
        """:meth:`stream_of` for samples that arrived together (a batch call's, or every
        call one read of a connection delivered), checked together: per request, in
        order, its stream or the error :meth:`stream_of` refuses it with (the same stream,
        the same error type).

        The samples of a sender share a codec header but for the sample number (and the
        CRC over both), so a header is parsed once per configuration. After a full parse
        this tier keeps the header's bytes before the sample number (its serialisation
        with ``seq`` 0, less the varint and CRC); a later header is recognised when it is
        byte for byte that prefix, the request's ``seq`` and a matching CRC-32, which is
        exactly :meth:`Header.to_bytes` of the same header for that ``seq``: the parse
        would give the same result. A sample-framed request whose header unit is the
        envelope's header (as sent) is not parsed a second time, and its packets are
        checked with the header's CRC as binding, as :meth:`Bitstream.from_units` does.
        Anything else (another configuration, another ``seq`` in the header, a lost or
        altered header unit, session framing) takes the full path of :meth:`stream_of`.
        """
        out: list[Bitstream | WireError | BitstreamError] = []
        for req in reqs:
            try:
                out.append(self._known_stream(req) or self._learn(req))
            except (WireError, BitstreamError) as e:
                out.append(e)
        return out

    def _known_stream(self, req: Request) -> Bitstream | None:
        """The stream of ``req`` when its header is one seen before (else ``None``)."""
        h, seq = bytes(req.header), req.seq
        for size in self._prefix_sizes:
            hit = self._headers.get(h[:size])
            if hit is not None:
                break
        else:
            return None
        body = h[:size] + _varint(seq)
        if h != body + _CRC.pack(zlib.crc32(body)):  # = header.to_bytes(n_packets, seq)
            return None
        header, n_packets = hit
        units = req.units
        if req.framing != "sample" or len(units) != n_packets + 1 or units[0] != h:
            if len(units) != n_packets + (1 if req.framing == "sample" else 0):
                raise WireError(f"{len(units)} units for a {n_packets}-packet "
                                f"{req.framing}-framed sample (want "
                                f"{n_packets + (req.framing == 'sample')})")  # fmt: skip
            return Bitstream.from_units(header, units, req.framing, seq=seq)
        bind = h[-_CRC.size :]
        packets: list[bytes | None] = []
        for i, framed in enumerate(units[1:]):
            payload = None
            if framed is not None:
                try:
                    framed = bytes(framed)
                    index, payload, end = parse_packet(framed, 0, bind)
                    if index != i or end != len(framed):
                        payload = None
                except BitstreamError:
                    payload = None
            packets.append(payload)
        return Bitstream(header, packets, seq)

    def _learn(self, req: Request) -> Bitstream:
        """:meth:`stream_of`, remembering the header's configuration when it checks out."""
        stream = self.stream_of(req)
        header = stream.header
        n_packets = len(stream.packets)
        prefix = header.to_bytes(n_packets, 0)[: -(1 + _CRC.size)]  # seq 0: a 1-byte varint
        body = prefix + _varint(req.seq)
        if req.header == body + _CRC.pack(zlib.crc32(body)):  # the layout streams_of assumes
            if len(self._headers) >= HEADER_CACHE:
                self._headers.clear()
                self._prefix_sizes.clear()
            self._headers[prefix] = (header, n_packets)
            self._prefix_sizes.add(len(prefix))
        return stream

    def _decode(self, streams: Sequence[Bitstream]) -> tuple[torch.Tensor | None, list[str]]:
        """Decode a batch; a batch the codec refuses is decoded sample by sample so that a
        bad stream fails alone. Returns the features of the good samples and one message
        per sample (empty when it decoded)."""
        try:
            return self.codec.decompress(list(streams)), [""] * len(streams)
        except BitstreamError:
            pass
        feats, msgs = [], []
        for s in streams:
            try:
                feats.append(self.codec.decompress([s]))
                msgs.append("")
            except BitstreamError as e:
                msgs.append(str(e)[:200] or "refused by the decoder")
        return (torch.cat(feats) if feats else None), msgs

    @torch.no_grad()
    def run(self, streams: Sequence[Bitstream]) -> list[Outcome]:
        """One :class:`Outcome` per stream, in order."""
        h, msgs = self._decode(streams)
        out: list[Outcome | None] = [Outcome("error", message=m) if m else None for m in msgs]
        if h is None:
            return out  # type: ignore[return-value]
        for s in self._stages:
            h = s(h)
        good = [i for i, m in enumerate(msgs) if not m]
        thr = self.spec.max_concealed
        conc = [concealed_fraction(s) for s in streams]
        untrusted = [thr is not None and conc[i] > thr for i in good]
        # A tier that forwards also computes its exit: its answer is the fallback when the
        # next tier cannot be reached in time (its FLOPs count only when it is a decision).
        out_logits = self._exit(h)
        conf = out_logits.softmax(1).amax(1)
        finite = torch.isfinite(out_logits).all(1).tolist()
        logits, confs = out_logits.tolist(), conf.tolist()  # one conversion for the batch
        for j, i in enumerate(good):  # a decoder's contract is finite features; if not, refuse
            if not finite[j]:
                out[i] = Outcome("error", message="non-finite output for this stream")
        for j, i in enumerate(good):
            if finite[j] and untrusted[j]:
                out[i] = Outcome("concealed", logits[j], confs[j],
                                 concealed=conc[i])  # fmt: skip
        if self.last:
            for j, i in enumerate(good):
                if finite[j] and not untrusted[j]:
                    out[i] = Outcome("answer", logits[j], confs[j],
                                     concealed=conc[i])  # fmt: skip
            return out  # type: ignore[return-value]
        done = (conf >= self.spec.exit_threshold) if self.spec.exit_threshold is not None else (
            torch.zeros(len(good), dtype=torch.bool))  # fmt: skip
        fwd = [j for j in range(len(good)) if finite[j] and not bool(done[j])
               and not untrusted[j]]  # fmt: skip
        next_streams = self.next_codec.compress(h[fwd]) if fwd else []
        k = 0
        for j, i in enumerate(good):
            if not finite[j] or untrusted[j]:
                continue
            if bool(done[j]):
                out[i] = Outcome("answer", logits[j], confs[j],
                                 concealed=conc[i])  # fmt: skip
                continue
            ns = next_streams[k]
            k += 1
            ns.seq = streams[i].seq  # bind the next hop's packets to the same sample number
            out[i] = Outcome("forward", logits[j], confs[j], next_stream=ns,
                             concealed=conc[i])  # fmt: skip
        return out  # type: ignore[return-value]


def _varint(n: int) -> bytes:
    """LEB128, as the codec header writes its sample number (``flowcodec.bitstream``);
    :meth:`TierEngine._learn` checks that it agrees before it relies on it."""
    return varint(n)
