"""The token codecs' coding, apart from their networks: ``compress`` is
``_code_symbols(_analysis(h))`` and ``decompress`` is ``_synthesis(_decode_symbols(s))``.
The coding half writes exactly what ``compress`` writes, reads back the symbols and the
side information the analysis gave, and the synthesis of what it reads is ``decompress``,
lost packets included (``experiments/bench_receive.py`` times the coding half alone)."""

from __future__ import annotations

import pytest
import torch
from helpers import random_tokens, ready_codec

from flowcodec.bitstream import Bitstream
from flowcodec.codecs.token import TokenDecoded, TokenSymbols

SHAPE = (17, 32)
CASES = {
    "prune": ("token-prune", dict(packets=2, threshold=2.0, coder="arith")),
    "prune_rans": ("token-prune", dict(packets=1, threshold=2.0)),
    "prune_hyper": ("token-prune", dict(packets=2, prior="hyperprior", hyper=4)),
    "merge": ("token-merge", dict(clusters=4, packets=1, coder="arith")),
    "merge_hyper": ("token-merge", dict(clusters=7, packets=3, prior="hyperprior", hyper=4)),
    "merge_sizes": ("token-merge", dict(clusters=7, packets=2, coder="arith", order="sizes")),
}


def _tokens(n, seed):
    return random_tokens(n, seed, SHAPE)


def _codec(name, **kw):
    return ready_codec(name, SHAPE, latent=8, hidden=32, **kw)


def _sent(s: TokenSymbols) -> list[torch.Tensor]:
    if s.where.dtype == torch.bool:  # token-prune: the kept tokens, token-major
        return [s.sym[b][:, s.where[b]].T for b in range(len(s.sym))]
    return [s.sym[b].T for b in range(len(s.sym))]


def _received(d: TokenDecoded) -> list[torch.Tensor]:
    if d.where.dtype == torch.bool:
        return [d.sym[b][d.where[b]] for b in range(len(d.sym))]
    return list(d.sym)


@pytest.mark.parametrize("fmt", [1, 2])
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_coding_half_is_what_compress_writes_and_decompress_reads(case, fmt):
    name, kw = CASES[case]
    codec = _codec(name, **kw)
    codec.stream_format = fmt
    h = 4 * _tokens(6, 31)
    s = codec._analysis(h)
    streams = codec.compress(h)
    coded = codec._code_symbols(s)
    assert [q.to_bytes() for q in coded] == [q.to_bytes() for q in streams]
    assert [q.to_bytes() for q in codec._code_symbols(s)] == [q.to_bytes() for q in coded]
    d = codec._decode_symbols([Bitstream.from_bytes(q.to_bytes()) for q in coded])
    for a, b in zip(_received(d), _sent(s), strict=True):
        assert torch.equal(a.long(), b.long())
    if name == "token-prune":
        assert torch.equal(d.where, s.where)
    elif codec.order == "positions":
        assert torch.equal(d.where, s.where)
    else:  # the clusters laid out one after another, each repeated by its size
        nothing_lost = torch.zeros(len(h), codec.clusters, dtype=torch.bool)
        assert torch.equal(d.where, codec._slots(s.where, nothing_lost)[0])
    assert torch.equal(codec._synthesis(d), codec.decompress(streams))
    # a lost packet: the coding half reads what decompress reads
    lost = [Bitstream(q.header, [None if (i + b) % 2 else p for i, p in enumerate(q.packets)])
            for b, q in enumerate(streams)]  # fmt: skip
    assert torch.equal(codec._synthesis(codec._decode_symbols(lost)), codec.decompress(lost))
