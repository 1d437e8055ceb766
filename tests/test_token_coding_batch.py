"""Token-prune's coding and token-merge's ``order="sizes"`` coding for the whole batch at
once (issue 30, "the receive path at line rate"): the streams, the symbols read back (lost
packets included) and the errors for damaged streams are what the per-sample coding gave,
pinned; junk and truncated streams are refused with BitstreamError only."""

from __future__ import annotations

import hashlib
import random

import pytest
import torch
from helpers import random_tokens, ready_codec
from hypothesis import given, settings
from hypothesis import strategies as st

from flowcodec.bitstream import Bitstream, BitstreamError
from flowcodec.codecs import load_pretrained_codec

SHAPE = (17, 32)

#: Seeded configurations: ``(codec name, options, stream formats)``.
CASES = {
    "prune_rans_p1": ("token-prune", dict(packets=1, threshold=1.5), (2,)),
    "prune_arith_p2": ("token-prune", dict(packets=2, threshold=2.0, coder="arith"), (1, 2)),
    "prune_arith_p3_nofirst": ("token-prune", dict(packets=3, threshold=2.2, coder="arith",
                                                   keep_first=False), (2,)),  # fmt: skip
    "prune_hyper_p3": ("token-prune", dict(packets=3, threshold=1.8, prior="hyperprior",
                                           hyper=4), (1, 2)),  # fmt: skip
    "prune_hyper_rans": ("token-prune", dict(packets=2, threshold=1.8, prior="hyperprior",
                                             hyper=4, coder="rans"), (2,)),  # fmt: skip
    "sizes_p1": ("token-merge", dict(clusters=5, packets=1, coder="arith", order="sizes"),
                 (1, 2)),  # fmt: skip
    "sizes_p2": ("token-merge", dict(clusters=7, packets=2, coder="arith", order="sizes"),
                 (2,)),  # fmt: skip
    "sizes_p3_hyper": ("token-merge", dict(clusters=7, packets=3, prior="hyperprior",
                                           hyper=4, order="sizes"), (1, 2)),  # fmt: skip
    "sizes_rans_nofirst": ("token-merge", dict(clusters=6, packets=2, keep_first=False,
                                               order="sizes"), (2,)),  # fmt: skip
}
SHIPPED = ("all_arith", "merge_k8_sizes_arith")  # cifar10vit-*


def _tokens(n, seed, shape=SHAPE):
    return random_tokens(n, seed, shape)


def _codec(name, **kw):
    return ready_codec(name, SHAPE, latent=8, hidden=32, **kw)


class _Digest:
    def __init__(self) -> None:
        self.m = hashlib.sha256()

    def bytes(self, b: bytes) -> None:
        self.m.update(len(b).to_bytes(4, "big") + b)

    def tensor(self, t: torch.Tensor) -> None:
        self.bytes(str(tuple(t.shape)).encode() + t.contiguous().numpy().tobytes())

    def hex(self) -> str:
        return self.m.hexdigest()


def _lose(streams, seed):
    """The streams with seeded packets lost (about one in three)."""
    rng = random.Random(seed)
    return [Bitstream(s.header, [None if rng.random() < 0.35 else p for p in s.packets])
            for s in streams]  # fmt: skip


def _damaged(streams, seed):
    """Batches of 4 streams of which one has one packet damaged (cut, extended, bits
    flipped, emptied, replaced by junk), seeded."""
    rng = random.Random(seed)
    out = []
    for i in range(24):
        b = rng.randrange(4)
        batch = [Bitstream(s.header, list(s.packets)) for s in streams[:4]]
        p = rng.randrange(len(batch[b].packets))
        data = batch[b].packets[p]
        kind = i % 6
        if kind == 0:
            data = data[:rng.randrange(len(data) + 1)]
        elif kind == 1:
            data = data + bytes([rng.randrange(256)])
        elif kind == 2 and data:
            j = rng.randrange(len(data))
            data = data[:j] + bytes([data[j] ^ (1 << rng.randrange(8))]) + data[j + 1:]
        elif kind == 3:
            data = b""
        elif kind == 4:
            data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 12)))
        else:
            data = b"\xff" * rng.randrange(1, 40)
        batch[b].packets[p] = data
        out.append(batch)
    return out


def _fingerprint(codec, h, fmt, seed) -> str:
    """sha256 over the streams, the symbols and positions read back (whole and with lost
    packets) and what each damaged batch decodes to or raises."""
    codec.stream_format = fmt
    d = _Digest()
    streams = codec.compress(h)
    for s in streams:
        d.bytes(s.to_bytes())
    for ss in (streams, _lose(streams, seed), _lose(streams, seed + 1)):
        got = codec._decode_symbols(ss)
        d.tensor(got.sym)
        d.tensor(got.where)
    for batch in _damaged(streams, seed):
        try:
            got = codec._decode_symbols(batch)
        except BitstreamError as e:
            d.bytes(f"BitstreamError: {e}".encode())
        else:
            d.tensor(got.sym)
            d.tensor(got.where)
    return d.hex()


# Pinned with the code as it was before the batched coding of token-prune and of the
# sizes order (commit 585b09f: one sample at a time), one thread, by running exactly what
# the tests below run.
PINNED = {
    "prune_arith_p2/1": "792a5b6698a263a33b616139aa7872a8251b8cdce5fd71ed99fd7db2e0e3368f",
    "prune_arith_p2/2": "3d53ca9ab14bf18fcfc91ef47491ae944f17bec6316d4ab1962fcb762d502956",
    "prune_arith_p3_nofirst/2": "8b1f44511d9a073b8715d6198e78a274019fec2d3b268cd88ef3e9ab277f7954",
    "prune_hyper_p3/1": "11851c2dbcad6e57fe27430e481fbff4299f22606f2e352d459343490a04816d",
    "prune_hyper_p3/2": "bb9f0f6f7fec3bcbc4a5be6a587c4380bf7d685ab21731be249459b5dea2b04d",
    "prune_hyper_rans/2": "f4a83a17bca71af46273de79a3c718138bb7f236238c7343642a6496a2848209",
    "prune_rans_p1/2": "8d63900289aaeee097ff97b2abac5ab3135f3e0ee0884a622d0ee4c835e91c30",
    "sizes_p1/1": "00343b4735962c453967578be9862ee4dee450a39d751d09f98cbe5370adddb0",
    "sizes_p1/2": "2fd11b0b0d78bbb846a90500c3b52f1c13d34723723f775759db8e52878c001f",
    "sizes_p2/2": "7e1a7b58c71ecf136849ef32de9b17688d2e3c3017f8d6f9e506446605eaefca",
    "sizes_p3_hyper/1": "bc7d37de941a2c439f4e03003eba027d0eb0029da48ff049e3eb8e33c23d1c04",
    "sizes_p3_hyper/2": "ea1fdf6ce6429d023e38ec580c6da37ae4c9183704dd7fdef993dd34faca90ed",
    "sizes_rans_nofirst/2": "43df88d9eba059637e29e32172d2d6d20fe2102f1a6a9a5c691b5e032ec72fbd",
}
SHIPPED_PINNED = {
    "all_arith/1": "091eef5db3e779b365452fc0f37e138bc8656ee42d78f8becfd8b888d562859d",
    "all_arith/2": "06145fa9e0439543899f7ac34d891938a16dd1aeb760ddbcb2b7ac006a091536",
    "merge_k8_sizes_arith/1": "53f0db5a5642e6457ca00e72a9ffd49e5559dfe5d330cac3830f2f32ed0a8111",
    "merge_k8_sizes_arith/2": "b8ae068cfbd2cfd326bc8071b17c8719d84761a856c716a82f86b08f43304be7",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_seeded_streams_reads_and_errors_are_pinned(case):
    name, kw, fmts = CASES[case]
    codec = _codec(name, **kw)
    h = 4 * _tokens(12, 31)
    for fmt in fmts:
        assert _fingerprint(codec, h, fmt, 5) == PINNED[f"{case}/{fmt}"], fmt


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_streams_reads_and_errors_are_pinned(name):
    codec = load_pretrained_codec(f"cifar10vit-{name}").eval()
    h = _tokens(16, 3, codec.feature_shape)
    for fmt in (1, 2):
        assert _fingerprint(codec, h, fmt, 9) == SHIPPED_PINNED[f"{name}/{fmt}"], fmt


_HOSTILE = {case: _codec(CASES[case][0], **CASES[case][1])
            for case in ("prune_arith_p2", "prune_hyper_p3", "sizes_p1", "sizes_p3_hyper",
                         "prune_rans_p1", "sizes_rans_nofirst")}  # fmt: skip
_HOSTILE_STREAMS = {case: c.compress(4 * _tokens(3, 8)) for case, c in _HOSTILE.items()}


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(sorted(_HOSTILE)), st.integers(0, 2), st.integers(0, 3),
       st.one_of(st.binary(max_size=40), st.integers(0, 40)))  # fmt: skip
def test_junk_and_truncated_streams_raise_bitstream_errors_only(case, b, p, junk):
    codec, streams = _HOSTILE[case], _HOSTILE_STREAMS[case]
    batch = [Bitstream(s.header, list(s.packets)) for s in streams]
    p %= len(batch[b].packets)
    old = batch[b].packets[p]
    batch[b].packets[p] = junk if isinstance(junk, bytes) else old[:junk]
    try:
        codec._decode_symbols(batch)
    except BitstreamError:
        pass
