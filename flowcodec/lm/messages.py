"""What crosses the link in collaborative generation, and what a generation records.

Every message is one byte of kind (:data:`MSG_TOKENS`, :data:`MSG_REPLY`,
:data:`MSG_DRAFTS`), a varint count, then the values as fixed-width big-endian integers
(:func:`encode_message`, :func:`decode_message`). A :class:`GenerationTrace` keeps, per
token, where it came from and the bytes each way, and every :class:`Round` of the exchange.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from flowcodec.bitstream import varint
from flowcodec.errors import ConfigError

__all__ = ["MSG_TOKENS", "MSG_REPLY", "MSG_DRAFTS", "encode_message", "decode_message", "Round",
           "GenerationTrace"]  # fmt: skip

#: Message kinds (the first byte of every message).
MSG_TOKENS = 0x54  # "T": token ids (a prompt, drafts, device tokens, a streamed token)
MSG_REPLY = 0x52  # "R": a verification reply: accepted count, then one token
MSG_DRAFTS = 0x44  # "D": drafted token ids, to be verified


def encode_message(kind: int, values: list[int], vocab: int) -> bytes:
    """``kind`` byte, LEB128 ``len(values)``, then each value in 1 byte (``vocab <= 256``)
    or 2 bytes big-endian. Values are token ids (or, in a reply, the accepted count)."""
    width = 1 if vocab <= 256 else 2
    if any(not 0 <= v < 256**width for v in values):
        raise ConfigError(f"values out of range for a {width}-byte field: {values!r}")
    return bytes([kind]) + varint(len(values)) + b"".join(v.to_bytes(width, "big") for v in values)


def decode_message(data: bytes, vocab: int, limit: int = 1 << 16) -> tuple[int, list[int]]:
    """Inverse of :func:`encode_message`: ``(kind, values)``; a malformed or over-long
    message (count above ``limit`` or not matching the length) is a :class:`ConfigError`."""
    width = 1 if vocab <= 256 else 2
    if len(data) < 2:
        raise ConfigError("a message needs at least a kind byte and a count")
    n, shift, i = 0, 0, 1
    while True:
        if i >= len(data) or shift > 21:
            raise ConfigError("a message's count is truncated or too long")
        b = data[i]
        n |= (b & 0x7F) << shift
        shift += 7
        i += 1
        if not b & 0x80:
            break
    if n > limit or len(data) != i + n * width:
        raise ConfigError(f"a message declares {n} values but holds {len(data) - i} bytes")
    return data[0], [int.from_bytes(data[i + j * width : i + (j + 1) * width], "big")
                     for j in range(n)]  # fmt: skip


@dataclass
class Round:
    """One exchange over the link (or one local step): the bytes each way, tokens drafted,
    accepted and committed, and the wall-clock seconds of each party's passes."""

    up_bytes: int = 0
    down_bytes: int = 0
    drafted: int = 0
    accepted: int = 0
    committed: int = 0
    device_seconds: float = 0.0
    edge_seconds: float = 0.0
    #: of ``up_bytes``: the hidden-state codec's (session header and samples), if any
    codec_bytes: int = 0


@dataclass
class GenerationTrace:
    """What one generation did.

    ``tokens``: the generated ids; ``source[i]``: ``"device"`` or ``"edge"``, the party whose
    member chose token ``i``; ``up_bytes[i]`` / ``down_bytes[i]``: bytes of the messages that
    completed with token ``i`` (a round's messages count at its last token, so the lists sum
    to the totals); ``rounds``: every exchange; ``round_trips``; ``device_passes`` /
    ``edge_passes``: forward passes of each member; ``min_margin``: the smallest top-two
    logit gap of a greedy edge decision (``inf`` if none)."""

    scheme: str
    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    source: list[str] = field(default_factory=list)
    up_bytes: list[int] = field(default_factory=list)
    down_bytes: list[int] = field(default_factory=list)
    rounds: list[Round] = field(default_factory=list)
    round_trips: int = 0
    device_passes: int = 0
    edge_passes: int = 0
    min_margin: float = math.inf

    @property
    def total_up(self) -> int:
        return sum(self.up_bytes)

    @property
    def total_down(self) -> int:
        return sum(self.down_bytes)

    @property
    def edge_fraction(self) -> float:
        """Share of the tokens chosen by the edge's member."""
        return self.source.count("edge") / max(1, len(self.tokens))

    @property
    def tokens_per_edge_pass(self) -> float:
        return len(self.tokens) / max(1, self.edge_passes)

    def _commit(self, toks: list[int], sources: list[str], rnd: Round) -> None:
        self.tokens += toks
        self.source += sources
        self.up_bytes += [0] * (len(toks) - 1) + [rnd.up_bytes]
        self.down_bytes += [0] * (len(toks) - 1) + [rnd.down_bytes]
        rnd.committed = len(toks)
        self.rounds.append(rnd)
