"""Batch forms of token-merge's size codes (issue 30): ``encode_sizes_batch`` /
``decode_sizes_batch`` give exactly the per-sample bytes and sizes, and refuse what
``encode_sizes`` / ``decode_sizes`` refuse with the same errors (items outside their numpy
path, and refused items, go through the per-sample functions)."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest
import torch
from helpers import check_batch_as_per_sample, per_sample_or_error
from hypothesis import given, settings
from hypothesis import strategies as st

from flowcodec.bitstream import BitstreamError
from flowcodec.codecs import merge_codes
from flowcodec.codecs.merge_codes import (
    decode_sizes,
    decode_sizes_batch,
    encode_sizes,
    encode_sizes_batch,
    size_bits,
)
from flowcodec.codecs.positions import MAX_TOKENS
from flowcodec.errors import ConfigError


@pytest.fixture(autouse=True, scope="module")
def _numpy_path_for_every_batch():
    """Every batch here takes the numpy path (small batches go per sample by default)."""
    before = merge_codes._BATCH_MIN
    merge_codes._BATCH_MIN = 0
    yield
    merge_codes._BATCH_MIN = before


def _composition(rnd: random.Random, m: int, k: int) -> list[int]:
    ends = sorted(rnd.sample(range(1, m), k - 1)) + [m]
    return [e - b for b, e in zip([0] + ends[:-1], ends)]


# --- the stream format, pinned ---------------------------------------------------------------
def _pinned_inputs() -> list[tuple[list[int], int | None]]:
    """A fixed, seeded set of ``(sizes, n)``: small and large totals, few and many
    clusters (ranks on both sides of 63 bits), with and without the bound."""
    rng = random.Random(30)
    out = []
    for _ in range(300):
        n = rng.choice([None, None, 8, 64, 65, 100, 513, 514, 600, MAX_TOKENS])
        m = rng.randint(1, min(n or 700, 700))
        k = rng.randint(1, min(m, rng.choice([1, 2, 4, 8, 16, 40, m])))
        out.append((_composition(rng, m, k), n))
    return out


def _digest(codes) -> str:
    h = hashlib.sha256()
    for b in codes:
        h.update(len(b).to_bytes(4, "big") + b)
    return h.hexdigest()


#: sha256 of the per-sample codes of :func:`_pinned_inputs` (each code's length in 4 bytes,
#: big-endian, then the code), computed with ``encode_sizes`` as it was at commit 39f0850,
#: before the batch forms were added.
PINNED = "62f0cbc9f6ac3b666918170e102b4af190012308ae739a9cb9e0abcd9c079a2e"


def test_per_sample_size_codes_are_pinned():
    assert _digest([encode_sizes(s, n) for s, n in _pinned_inputs()]) == PINNED


def test_batch_size_codes_are_pinned():
    cases = _pinned_inputs()
    codes = [b""] * len(cases)
    for bound in {n for _, n in cases}:
        idx = [i for i, (_, n) in enumerate(cases) if n == bound]
        for i, code in zip(idx, encode_sizes_batch([cases[i][0] for i in idx], bound)):
            codes[i] = code
        sizes = [cases[i][0] for i in idx]
        m = None if bound else [sum(s) for s in sizes]
        got, used = decode_sizes_batch([codes[i] + b"\xff" for i in idx],
                                       [len(s) for s in sizes], m=m, n=bound)  # fmt: skip
        assert got == sizes and used == [len(codes[i]) for i in idx]
    assert _digest(codes) == PINNED


# --- strategies ------------------------------------------------------------------------------
#: bounds: none (the decoder knows the total), small, the shipped 65, and around the numpy
#: path's limits (totals above 513 go per sample)
_BOUND = st.sampled_from([None, None, 1, 9, 64, 65, 100, 513, 600])


@st.composite
def _size_batch(draw):
    n = draw(_BOUND)
    rnd = draw(st.randoms(use_true_random=False))
    top = min(n or 600, draw(st.sampled_from([8, 70, 600])))
    out = []
    for _ in range(draw(st.integers(0, 10))):
        m = rnd.randint(1, top)
        k = rnd.randint(1, min(m, rnd.choice([1, 2, 3, 8, 30, m])))
        s = _composition(rnd, m, k)
        out.append(np.array(s) if rnd.random() < 0.3 else s)
    return n, out


# --- the tests -------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(_size_batch(), st.booleans())
def test_sizes_batch_is_per_sample_and_round_trips(case, one_k):
    n, sizes = case
    codes = encode_sizes_batch(sizes, n)
    assert codes == [encode_sizes(s, n) for s in sizes]
    if one_k:  # one k (and total) for all: keep the items that share the first's
        keep = [i for i, s in enumerate(sizes) if len(s) == len(sizes[0])
                and sum(s) == sum(sizes[0])] if sizes else []  # fmt: skip
        sizes, codes = [sizes[i] for i in keep], [codes[i] for i in keep]
        k = len(sizes[0]) if sizes else 1
        m = None if n else (int(sum(sizes[0])) if sizes else 1)
    else:
        k = [len(s) for s in sizes]
        m = None if n else [int(sum(s)) for s in sizes]
    heads = [bytes([0x5A] * (i % 3)) for i in range(len(sizes))]
    got, used = decode_sizes_batch([h + c + b"\x80junk" for h, c in zip(heads, codes)], k,
                                   m=m, n=n, start=[len(h) for h in heads])  # fmt: skip
    assert got == [[int(v) for v in s] for s in sizes]
    assert used == [len(c) for c in codes]
    assert used == [-(-size_bits(int(sum(s)), len(s), n) // 8) for s in sizes]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=12), st.integers(1, 9), st.integers(1, 80)),
                min_size=1, max_size=8), st.sampled_from([None, 9, 65, 100, 600]))  # fmt: skip
def test_sizes_batch_junk_is_per_sample_or_the_same_error(items, n):
    """Random bytes: the sizes the per-sample decoder reads, or its first error."""
    datas, ks = [d for d, _, _ in items], [k for _, k, _ in items]
    ms = None if n else [max(k, m) for _, k, m in items]
    want = [per_sample_or_error(decode_sizes, d, k, m=None if n else mm, n=n)
            for d, k, mm in zip(datas, ks, ms or ks)]  # fmt: skip
    check_batch_as_per_sample(want, lambda: decode_sizes_batch(datas, ks, m=ms, n=n))


@settings(max_examples=100, deadline=None)
@given(_size_batch(), st.data())
def test_sizes_batch_truncated_or_flipped_is_per_sample(case, data):
    n, sizes = case
    codes = encode_sizes_batch(sizes, n)
    if not codes or not any(codes):
        return
    i = data.draw(st.sampled_from([j for j, c in enumerate(codes) if c]))
    k = [len(s) for s in sizes]
    m = None if n else [int(sum(s)) for s in sizes]
    for bad_code in (codes[i][:data.draw(st.integers(0, len(codes[i]) - 1))],
                     bytes([codes[i][0] ^ data.draw(st.integers(1, 255))]) + codes[i][1:]):
        bad = list(codes)
        bad[i] = bad_code
        want, err = per_sample_or_error(decode_sizes, bad_code, k[i],
                                         m=None if n else m[i], n=n)  # fmt: skip
        if err is None:
            got, used = decode_sizes_batch(bad, k, m=m, n=n)
            assert (got[i], used[i]) == want
        else:
            with pytest.raises(BitstreamError) as info:
                decode_sizes_batch(bad, k, m=m, n=n)
            assert type(info.value) is type(err) and str(info.value) == str(err)


def test_sizes_batch_refuses_what_per_sample_refuses():
    for sizes, n in [([[1, 2], [0, 3]], None), ([[2], []], None), ([[3], [-1, 4]], 8),
                     ([[4, 4], [5, 5]], 9), ([[1]], MAX_TOKENS + 1),
                     ([[3], [600, 1]], 513)]:  # fmt: skip
        _, err = per_sample_or_error(lambda s=sizes, n=n: [encode_sizes(v, n) for v in s])
        assert isinstance(err, ConfigError), (sizes, n)
        with pytest.raises(ConfigError) as info:
            encode_sizes_batch(sizes, n)
        assert str(info.value) == str(err)
    for kw in [dict(m=None, n=None), dict(m=4, n=9), dict(m=3), dict(m=4, k=0),
               dict(m=MAX_TOKENS + 1)]:  # fmt: skip
        k = kw.pop("k", 4)
        _, err = per_sample_or_error(decode_sizes, b"\x00" * 8, k, **kw)
        assert isinstance(err, ConfigError), kw
        with pytest.raises(ConfigError) as info:
            decode_sizes_batch([b"\x00" * 8], k, **kw)
        assert str(info.value) == str(err)
    with pytest.raises(ConfigError):
        decode_sizes_batch([b"", b""], [1, 2, 3], n=9)  # one k per item
    assert encode_sizes_batch([], 5) == [] and decode_sizes_batch([], 3, n=9) == ([], [])
    # what is not plain ints goes through the per-sample code, which decides
    odd = [[2.0, 3.7], (True, 2), torch.tensor([4, 6]), np.array([1, 2], dtype=np.uint8)]
    assert encode_sizes_batch(odd, 16) == [encode_sizes(s, 16) for s in odd]
    with pytest.raises(ConfigError, match=r"positive ints, got \[3, 0\]"):
        encode_sizes_batch(np.array([[1, 2], [3, 0]]))  # a matrix row refused as a list


def test_sizes_batch_of_a_real_packet():
    """The shipped ``cifar10vit-merge_k8_sizes_arith``: one packet, 64 tokens (all but the
    class token) in 7 clusters, the total known; and two packets, the total under 65."""
    rng = random.Random(8)
    sizes = [_composition(rng, 64, 7) for _ in range(50)] + [[58, 1, 1, 1, 1, 1, 1]]
    codes = encode_sizes_batch(sizes)
    assert codes == [encode_sizes(s) for s in sizes]
    assert encode_sizes_batch(np.array(sizes)) == codes  # a matrix: one list per row
    assert {len(c) for c in codes} == {4}
    assert decode_sizes_batch(codes, 7, m=64) == (sizes, [4] * len(sizes))
    halves = [s[:4] for s in sizes]
    codes = encode_sizes_batch(halves, 65)
    assert codes == [encode_sizes(s, 65) for s in halves]
    assert decode_sizes_batch(codes, 4, n=65)[0] == halves


def test_small_and_large_batches_by_default(monkeypatch):
    """With the default threshold a small batch goes per sample and a large one through
    numpy: the same bytes and sizes either way."""
    monkeypatch.setattr(merge_codes, "_BATCH_MIN", 32)
    rng = random.Random(3)
    for count in (1, 31, 32, 100):
        sizes = [_composition(rng, 64, 7) for _ in range(count)]
        codes = encode_sizes_batch(sizes, 65)
        assert codes == [encode_sizes(s, 65) for s in sizes]
        assert decode_sizes_batch(codes, 7, n=65) == (sizes, [len(c) for c in codes])
