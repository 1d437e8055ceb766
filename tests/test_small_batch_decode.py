"""Fast paths of format-2 coding (issue 30): the small-batch context decoder equals the
batched one bit for bit, and factorized payloads written without the decode check are the
checked ones."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flowcodec.codecs.task as task_mod
from flowcodec.bitstream import BitstreamError
from flowcodec.codecs import arith, load_pretrained_codec
from flowcodec.codecs.context_model import grid_probs, grid_row

CTX = load_pretrained_codec("cifar10-task_p2_ctx")


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(0, 2))
def test_one_channel_cells_and_rows_equal_the_batched_ones(seed, r):
    rng = np.random.default_rng(seed)
    c = CTX._coding(r)
    lo, hi = c["lo"], c["hi"]
    k = rng.integers(lo, hi + 1, size=(3, CTX.n_sym))
    k[:, rng.integers(0, CTX.n_sym):] = 0  # the decoder's zeros for channels not decoded
    m, si = c["ctx"].cells(k, 0, CTX.n_sym)
    for b in range(len(k)):
        for i in range(CTX.n_sym):
            assert c["ctx"].cell(k[b], i) == (int(m[b, i]), int(si[b, i]))
    n = hi - lo + 1
    ref = grid_probs(m, si, lo, n, c["width"])
    for b in range(len(k)):
        for i in range(CTX.n_sym):
            got = grid_row(int(m[b, i]), int(si[b, i]), int(lo[i]), int(n[i]), c["width"])
            assert np.array_equal(got, ref[b, i])


@settings(max_examples=40, deadline=None)
@given(st.integers(-4000, 4000), st.integers(0, 95), st.integers(-20, 20), st.integers(1, 40))
def test_a_row_of_any_cell_equals_grid_probs(m, si, lo, n):
    width = 48
    ref = grid_probs(np.int64(m), np.int64(si), lo, n, width)
    assert np.array_equal(grid_row(m, si, lo, n, width), ref)


@pytest.mark.parametrize("name", ["cifar10-task_p2_ctx", "cifar10-task_p1_lift"])
def test_small_batches_decode_like_the_batched_path(name, monkeypatch):
    codec = load_pretrained_codec(name)
    h = torch.relu(torch.randn(3, *codec.feature_shape,
                               generator=torch.Generator().manual_seed(5)))  # fmt: skip
    r = codec.rates - 1
    packets = [s.packets for s in codec.compress(h, rate=r)]
    packets[1][0] = None  # a lost packet: zeros, as in the batched path
    monkeypatch.setattr(task_mod, "SMALL_BATCH", 0)
    ref = codec._decode_format2(packets, r)
    monkeypatch.setattr(task_mod, "SMALL_BATCH", 10**6)
    assert np.array_equal(codec._decode_format2(packets, r), ref)
    bad = [list(p) for p in packets]
    bad[0][-1] = bad[0][-1] + b"\x01" * 400  # longer than its symbols can take
    with pytest.raises(BitstreamError):
        codec._decode_format2(bad, r)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 5), st.integers(0, 70))
def test_unchecked_payloads_are_the_checked_ones(seed, b_n, n):
    rng = np.random.default_rng(seed)
    width = 17
    probs = np.zeros((n, width))
    for i in range(n):
        k = int(rng.integers(1, width + 1))
        f = rng.integers(1, 60000, size=k).astype(float) ** 3
        f = 1 + np.floor(f / f.sum() * (65536 - k)).astype(np.int64)
        f[np.argmax(f)] += 65536 - f.sum()
        probs[i, :k] = f / 65536
    syms = np.stack([[rng.choice(np.flatnonzero(row)) for row in probs] for _ in range(b_n)]) \
        if n else np.zeros((b_n, 0), dtype=np.int64)  # fmt: skip
    fast = arith.encode_batch(syms, probs, verify=False)
    assert fast == arith.encode_batch(syms, probs, verify=True)
    assert np.array_equal(arith.decode_batch(fast, probs), syms)
