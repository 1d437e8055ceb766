"""Batch forms of the token-merge side codes (issue 30): ``encode_positions_batch`` /
``decode_positions_batch`` and ``encode_assignment_batch`` / ``decode_assignment_batch``
give exactly the per-sample bytes and labels, refuse what the per-sample functions refuse
with the same errors, and the stream checks compute the codec's fingerprint once per
batch while a changed codec still gets a new one."""

from __future__ import annotations

import hashlib
import random
import re

import numpy as np
import pytest
import torch
from helpers import check_batch_as_per_sample, per_sample_or_error
from hypothesis import given, settings
from hypothesis import strategies as st

from flowcodec.bitstream import BitstreamError
from flowcodec.codecs import build_codec
from flowcodec.codecs.merge_codes import (
    assignment_bits,
    decode_assignment,
    decode_assignment_batch,
    encode_assignment,
    encode_assignment_batch,
)
from flowcodec.codecs.positions import (
    MAX_TOKENS,
    decode_positions,
    decode_positions_batch,
    encode_positions,
    encode_positions_batch,
)
from flowcodec.errors import ConfigError


# --- the stream format, pinned ---------------------------------------------------------------
def _pinned_inputs():
    """A fixed, seeded set of position sets ``(positions, n)`` and canonical assignments
    ``(labels, k)``."""
    rng = random.Random(30)
    pos = []
    for _ in range(300):
        n = rng.choice([1, 2, 7, 8, 9, 17, 64, 65, 66, 67, 68, 100, 197, 256, 257, 600,
                        MAX_TOKENS])  # fmt: skip
        k = rng.choice([0, 1, n, n - 1, rng.randint(0, n), rng.randint(0, min(n, 40))])
        k = max(0, min(n, k))
        if n > 1000:  # keep the big-int work small: few positions, or few left out
            k = rng.choice([rng.randint(0, 40), n - rng.randint(0, 3)])
        pos.append((sorted(rng.sample(range(n), k)), n))
    asg = []
    for _ in range(300):
        m = rng.choice([1, 2, 3, 5, 16, 31, 32, 33, 64, 65, 100, 200, 1000])
        k = rng.randint(1, min(m, rng.choice([2, 3, 4, 8, 16, 64, m])))
        opens = set(rng.sample(range(1, m), k - 1)) if k > 1 else set()
        labels, opened = [], 0
        for t in range(m):
            if t == 0:
                labels.append(0)
                opened = 1
            elif t in opens:
                labels.append(opened)
                opened += 1
            else:
                labels.append(rng.randrange(opened))
        asg.append((labels, k))
    return pos, asg


def _digest(pos_codes, asg_codes) -> str:
    h = hashlib.sha256()
    for b in list(pos_codes) + list(asg_codes):
        h.update(len(b).to_bytes(4, "big") + b)
    return h.hexdigest()


#: sha256 of the per-sample codes of :func:`_pinned_inputs` (each code's length in 4 bytes,
#: big-endian, then the code; the 300 position codes, then the 300 assignment codes),
#: computed with ``encode_positions`` / ``encode_assignment`` as they were at commit
#: 9e03c8c, before the batch forms were added (the same digest as this test's
#: ``_digest`` over ``[encode_positions(p, n) for p, n in pos]`` and
#: ``[encode_assignment(v, k) for v, k in asg]``).
PINNED = "3c1016f864e165666af3dede0918cacbf6d70fe862211a8e56d5880ea95ea044"


def test_per_sample_codes_are_pinned():
    pos, asg = _pinned_inputs()
    got = _digest([encode_positions(p, n) for p, n in pos],
                  [encode_assignment(v, k) for v, k in asg])  # fmt: skip
    assert got == PINNED


def test_batch_codes_are_pinned():
    pos, asg = _pinned_inputs()
    by_n: dict[int, list[int]] = {}
    for i, (_, n) in enumerate(pos):
        by_n.setdefault(n, []).append(i)
    pos_codes = [b""] * len(pos)
    for n, idx in by_n.items():
        for i, code in zip(idx, encode_positions_batch([pos[i][0] for i in idx], n)):
            pos_codes[i] = code
    asg_codes = encode_assignment_batch([v for v, _ in asg], [k for _, k in asg])
    assert _digest(pos_codes, asg_codes) == PINNED
    # and back
    for n, idx in by_n.items():
        members, used = decode_positions_batch([pos_codes[i] + b"\xff" for i in idx], n)
        assert members == [pos[i][0] for i in idx]
        assert used == [len(pos_codes[i]) for i in idx]
    labels, used = decode_assignment_batch(asg_codes, [len(v) for v, _ in asg],
                                           [k for _, k in asg])  # fmt: skip
    assert labels == [v for v, _ in asg] and used == [len(c) for c in asg_codes]


# --- strategies ------------------------------------------------------------------------------
#: position ranges: small, around the 63-bit rank limit of the numpy path (n = 66..68), and
#: above the numpy path's table (n > 512, per-sample inside the batch form)
_N = st.one_of(st.integers(1, 80), st.sampled_from([100, 197, 256, 300, 512, 513, 700]))


@st.composite
def _position_batch(draw):
    n = draw(_N)
    sets = draw(st.lists(st.one_of(st.sets(st.integers(0, n - 1), max_size=n),
                                   st.just(set(range(n))),
                                   st.just(set(range(n)) - {n // 2})),
                         max_size=12))  # fmt: skip
    rnd = draw(st.randoms(use_true_random=False))
    out = []
    for s in sets:
        v = list(s)
        rnd.shuffle(v)  # the codes sort; the batch form must too
        out.append(np.array(v, dtype=np.int64) if rnd.random() < 0.3 else v)
    return n, out


@st.composite
def _rgs(draw, max_m=120):
    """A canonical assignment ``(labels, k)``: a restricted growth string using ``k``
    labels."""
    m = draw(st.integers(1, max_m))
    k = draw(st.integers(1, min(m, draw(st.sampled_from([2, 3, 4, 8, 40, max_m])))))
    rnd = draw(st.randoms(use_true_random=False))
    opens = set(rnd.sample(range(1, m), k - 1))
    labels, opened = [0], 1
    for t in range(1, m):
        if t in opens:
            labels.append(opened)
            opened += 1
        else:
            labels.append(rnd.randrange(opened))
    return labels, k


# --- positions -------------------------------------------------------------------------------
@settings(max_examples=120, deadline=None)
@given(_position_batch())
def test_positions_batch_is_per_sample_and_round_trips(case):
    n, sets = case
    codes = encode_positions_batch(sets, n)
    assert codes == [encode_positions(s, n) for s in sets]
    heads = [bytes([7] * (i % 3)) for i in range(len(sets))]
    members, used = decode_positions_batch([h + c + b"\x01junk" for h, c in zip(heads, codes)],
                                           n, start=[len(h) for h in heads])  # fmt: skip
    assert members == [sorted(int(p) for p in s) for s in sets]
    assert used == [len(c) for c in codes]


@settings(max_examples=300, deadline=None)
@given(_N, st.lists(st.binary(max_size=12), min_size=1, max_size=8))
def test_positions_batch_junk_is_per_sample_or_the_same_error(n, datas):
    want = [per_sample_or_error(decode_positions, d, n) for d in datas]
    check_batch_as_per_sample(want, lambda: decode_positions_batch(datas, n))


@settings(max_examples=60, deadline=None)
@given(_position_batch(), st.data())
def test_positions_batch_truncated_raises(case, data):
    n, sets = case
    codes = encode_positions_batch(sets, n)
    if not codes:
        return
    i = data.draw(st.integers(0, len(codes) - 1))
    cut = data.draw(st.integers(0, len(codes[i]) - 1))
    bad = list(codes)
    bad[i] = codes[i][:cut]
    with pytest.raises(BitstreamError):
        decode_positions_batch(bad, n)


def test_positions_batch_refuses_what_per_sample_refuses():
    for sets, n in [([[0, 1], [3, 3]], 8), ([[0], [-1]], 8), ([[1], [8]], 8),
                    ([[0], list(range(10))], 9), ([[1]], 0),
                    ([[1]], MAX_TOKENS + 1)]:  # fmt: skip
        _, err = per_sample_or_error(lambda s=sets, n=n: [encode_positions(v, n) for v in s])
        assert isinstance(err, ConfigError)
        with pytest.raises(ConfigError) as info:
            encode_positions_batch(sets, n)
        assert str(info.value) == str(err)
    with pytest.raises(ConfigError):
        decode_positions_batch([b"\x00"], 0)
    assert encode_positions_batch([], 5) == [] and decode_positions_batch([], 5) == ([], [])
    # what is not plain ints goes through the per-sample code, which decides
    odd = [[0.0, 3.7], (True, 2), {5, 1}, torch.tensor([4, 6])]
    assert encode_positions_batch(odd, 8) == [encode_positions(s, 8) for s in odd]


def test_positions_batch_of_a_real_packet():
    """All 65 tokens of a ViT cut (the shipped ``cifar10vit-merge_k4_arith``'s one packet)
    and a half of them, among other sets."""
    sets = [list(range(65)), list(range(0, 65, 2)), [], [64], list(range(1, 65))]
    codes = encode_positions_batch(sets, 65)
    assert codes == [encode_positions(s, 65) for s in sets]
    assert decode_positions_batch(codes, 65)[0] == sets


# --- assignments -----------------------------------------------------------------------------
@settings(max_examples=120, deadline=None)
@given(st.lists(st.one_of(_rgs(), _rgs(max_m=400)), max_size=10), st.booleans())
def test_assignment_batch_is_per_sample_and_round_trips(cases, as_arrays):
    labels = [np.array(v) if as_arrays else v for v, _ in cases]
    ks = [k for _, k in cases]
    codes = encode_assignment_batch(labels, ks)
    assert codes == [encode_assignment(v, k) for v, k in cases]
    heads = [bytes([0xAB] * (i % 4)) for i in range(len(cases))]
    got, used = decode_assignment_batch([h + c + b"\xffjunk" for h, c in zip(heads, codes)],
                                        [len(v) for v, _ in cases], ks,
                                        start=[len(h) for h in heads])  # fmt: skip
    assert got == [v for v, _ in cases]
    assert used == [len(c) for c in codes]


@settings(max_examples=100, deadline=None)
@given(st.lists(_rgs(max_m=70), min_size=1, max_size=8))
def test_assignment_batch_one_k_for_all(cases):
    k = cases[0][1]
    cases = [(v, k) for v, kk in cases if kk == k and len(v) >= k]
    codes = encode_assignment_batch([v for v, _ in cases], k)
    assert codes == [encode_assignment(v, k) for v, _ in cases]
    m = [len(v) for v, _ in cases]
    assert decode_assignment_batch(codes, m, k)[0] == [v for v, _ in cases]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.binary(max_size=40), st.integers(1, 90), st.integers(1, 6)),
                min_size=1, max_size=8))  # fmt: skip
def test_assignment_batch_junk_is_per_sample_or_the_same_error(items):
    items = [(d, m, min(k, m)) for d, m, k in items]
    want = [per_sample_or_error(decode_assignment, d, m, k) for d, m, k in items]
    args = ([d for d, _, _ in items], [m for _, m, _ in items], [k for _, _, k in items])
    check_batch_as_per_sample(want, lambda: decode_assignment_batch(*args))


@settings(max_examples=100, deadline=None)
@given(st.lists(_rgs(), min_size=1, max_size=6), st.data())
def test_assignment_batch_truncated_or_flipped_raises(cases, data):
    codes = encode_assignment_batch([v for v, _ in cases], [k for _, k in cases])
    i = data.draw(st.integers(0, len(codes) - 1))
    if not codes[i]:
        return  # a zero-bit code (k = 1) cannot be cut
    bad = list(codes)
    bad[i] = codes[i][:data.draw(st.integers(0, len(codes[i]) - 1))]
    m, k = [len(v) for v, _ in cases], [k for _, k in cases]
    with pytest.raises(BitstreamError):
        decode_assignment_batch(bad, m, k)
    # a flipped byte decodes to other labels or raises, as the per-sample decoder does
    j = data.draw(st.integers(0, len(codes[i]) - 1))
    flipped = list(codes)
    flipped[i] = codes[i][:j] + bytes([codes[i][j] ^ 0xFF]) + codes[i][j + 1:]
    want, err = per_sample_or_error(decode_assignment, flipped[i], m[i], k[i])
    if err is None:
        assert decode_assignment_batch(flipped, m, k)[0][i] == want[0]
    else:
        with pytest.raises(BitstreamError, match=re.escape(str(err))):
            decode_assignment_batch(flipped, m, k)


def test_assignment_batch_refuses_what_per_sample_refuses():
    for labels, k in [([[0, 1], [0, 2]], 2), ([[0, 0]], 2), ([[1, 0]], 2), ([[0, -1]], 2),
                      ([[0], []], 1), ([[0, 1]], 3)]:  # fmt: skip
        _, err = per_sample_or_error(lambda s=labels, k=k: [encode_assignment(v, k) for v in s])
        assert isinstance(err, ConfigError), (labels, k)
        with pytest.raises(ConfigError) as info:
            encode_assignment_batch(labels, k)
        assert str(info.value) == str(err)
    with pytest.raises(ConfigError):
        decode_assignment_batch([b""], 2, 3)  # k > m
    with pytest.raises(ConfigError):
        encode_assignment_batch([[0, 1]], [2, 2])  # one k per string
    assert encode_assignment_batch([], 3) == [] and decode_assignment_batch([], 3, 2) == ([], [])
    odd = [[0, 1.0, 0.5], (False, True), np.array([0, 1], dtype=np.uint8)]
    assert encode_assignment_batch(odd, 2) == [encode_assignment(v, 2) for v in odd]


def test_assignment_batch_of_a_real_packet():
    """The shipped ``cifar10vit-merge_k4_arith``: 64 members (all but the class token) in
    3 clusters, about 100 bits; the last cluster may open late."""
    rng = random.Random(5)
    cases = []
    for last in [2, 20, 58, 63]:
        v = [0] * 64
        v[rng.randint(1, last - 1)] = 1
        v[last] = 2
        opened = 1
        for t in range(1, 64):
            if v[t] == opened:
                opened += 1
            elif t != last:
                v[t] = rng.randrange(opened)
        cases.append(v)
    codes = encode_assignment_batch(cases, 3)
    assert codes == [encode_assignment(v, 3) for v in cases]
    assert {len(c) for c in codes} == {-(-assignment_bits(64, 3) // 8)}
    assert decode_assignment_batch(codes, 64, 3)[0] == cases


# --- the fingerprint of stream checks ---------------------------------------------------------
def test_check_streams_computes_the_fingerprint_once_per_batch():
    codec = build_codec("raw", feature_shape=(4, 2, 2), dtype="float16")
    streams = codec.compress(torch.randn(6, 4, 2, 2))
    calls = []
    config = codec.config
    codec.config = lambda: calls.append(1) or config()
    codec.check_streams(streams, 1)
    assert len(calls) == 1
    codec.decompress(streams)
    assert len(calls) == 2


def test_a_changed_codec_gets_a_new_fingerprint():
    codec = build_codec("token-prune", feature_shape=(17, 32), latent=4, hidden=16,
                        packets=1).eval()  # fmt: skip
    codec.update(force=True)
    streams = codec.compress(torch.randn(3, 17, 32))
    before = codec.fingerprint
    codec.check_streams(streams, 1)
    codec.threshold = codec.threshold + 1.0  # a plain attribute that the config reads
    assert codec.fingerprint != before
    with pytest.raises(BitstreamError, match="fingerprint"):
        codec.check_streams(streams, 1)
    with pytest.raises(BitstreamError, match="fingerprint"):
        codec.decompress(streams)
    codec.threshold -= 1.0
    assert codec.fingerprint == before
    codec.check_streams(streams, 1)
    # a second codec with another config: its own fingerprint, refusing the first's streams
    other = build_codec("token-prune", feature_shape=(17, 32), latent=4, hidden=16,
                        packets=1, coder="arith")  # fmt: skip
    assert other.fingerprint != before
    with pytest.raises(BitstreamError):
        other.check_streams(streams, 1)
