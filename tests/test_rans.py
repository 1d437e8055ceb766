"""The rANS coder (flowcodec/codecs/rans.py) on hostile input: short and garbage payloads,
symbols in the coder's range, tiny packets, far-out symbols, bad indexes and bad tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import ready_small as ready
from helpers import shipped_codec as _shipped
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowcodec.bitstream import Bitstream, BitstreamError
from flowcodec.codecs.entropy import _tables, check_tables, rans_decode, rans_encode
from flowcodec.codecs.zoo import load_pretrained_codec
from flowcodec.errors import ConfigError


# --- the rANS decoder reading past its payload (issue 14, hole 2) ---------------------------
def test_empty_or_short_rans_packet_is_an_error_for_the_shipped_codec():
    codec = load_pretrained_codec("cifar10-fact_l0p1")
    header = codec.compress(torch.zeros(1, *codec.feature_shape))[0].header
    for payload in (b"", b"\x00", b"abc", b"1234567", b"123456789"):
        stream = Bitstream.from_bytes(Bitstream(header, [payload]).to_bytes())
        with pytest.raises(BitstreamError, match="rANS"):
            codec.decompress([stream])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=2, max_size=40).map(lambda b: b * (1 + 64 // len(b))))
def test_garbage_rans_payload_decodes_the_same_every_time_or_raises(data):
    data = data[: len(data) // 4 * 4]
    codec = _shipped("cifar10-fact_l0p1")
    header = codec.compress(torch.zeros(1, *codec.feature_shape))[0].header
    stream = Bitstream(header, [data])
    outs = []
    for _ in range(3):
        try:
            outs.append(codec.decompress([stream]))
        except BitstreamError:
            outs.append(None)
    assert all(o is None for o in outs) or all(o is not None and torch.equal(o, outs[0])
                                               for o in outs)  # fmt: skip
    if outs[0] is not None:
        assert torch.isfinite(outs[0]).all()


def test_decoded_symbols_stay_in_the_coder_range():
    eb = ready("factorized").entropy_bottleneck
    t = _tables(eb)
    idx = torch.zeros(64, dtype=torch.int32)
    for seed in range(50):
        data = np.random.default_rng(seed).integers(0, 256, 4 * (2 + seed % 20), np.uint8)
        try:
            sym = rans_decode(eb, data.tobytes(), idx)
        except BitstreamError:
            continue
        assert int(sym.min()) >= t.lo[0] and int(sym.max()) <= t.hi[0]


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 8, 13])
def test_rans_round_trip_for_tiny_packets_and_far_out_symbols(n):
    """The C++ encoder writes into one word per symbol: tiny packets and bypass-coded
    symbols get dummy symbols appended so it never overflows; far-out symbols are
    clamped to the coder's range and come back clamped."""
    eb = ready("factorized").entropy_bottleneck
    t = _tables(eb)
    g = torch.Generator().manual_seed(n)
    idx = torch.randint(0, t.rows, (n,), generator=g, dtype=torch.int32)
    for scale in (1, 1000, 10**9):
        sym = (torch.randn(n, generator=g) * scale).round().int()
        data = rans_encode(eb, sym, idx)
        got = rans_decode(eb, data, idx)
        ii = idx.long().numpy()
        lo, hi = torch.from_numpy(t.lo[ii]), torch.from_numpy(t.hi[ii])
        assert torch.equal(got.long(), torch.maximum(torch.minimum(sym.long(), hi), lo))


def test_indexes_outside_the_tables_are_refused():
    eb = ready("factorized").entropy_bottleneck
    with pytest.raises(ConfigError, match="indexes"):
        rans_encode(eb, torch.zeros(3, dtype=torch.int32), torch.tensor([0, 1, 99]))
    with pytest.raises(ConfigError, match="indexes"):
        rans_decode(eb, bytes(8), torch.tensor([-1]))


# --- table validation -----------------------------------------------------------------------
def _set(t, i, j, v):
    t = t.clone()
    t[i, j] = v
    return t


def test_check_tables_rejects_each_kind_of_bad_table():
    cdf = torch.tensor([[0, 100, 65536, 0], [0, 1, 2, 65536]], dtype=torch.int32)
    n = torch.tensor([3, 4], dtype=torch.int32)
    o = torch.tensor([-1, -2], dtype=torch.int32)
    check_tables(cdf, n, o)
    bad = [
        (cdf, torch.tensor([3, 5]), o),  # length past the row
        (cdf, torch.tensor([2, 4]), o),  # too short
        (cdf, n, torch.tensor([-1, 1 << 30])),  # offset out of range
        (cdf, n[:1], o),  # one length per row
        (_set(cdf, 1, 2, 1), n, o),  # not increasing
        (_set(cdf, 0, 0, 5), n, o),  # not starting at 0
        (_set(cdf, 0, 2, 9), n, o),  # not ending at 2^16
        (cdf.float(), n, o),
    ]
    for c, nn_, oo in bad:
        with pytest.raises(ConfigError):
            check_tables(c, nn_, oo)
