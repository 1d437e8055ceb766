"""``encode_positions_mask`` (issue 30): the position codes of sets given as the rows of a
boolean mask, as the token codecs hold them, are the per-sample ``encode_positions``
bytes (and so ``encode_positions_batch``'s)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowcodec.codecs.positions import (
    MAX_TOKENS,
    encode_positions,
    encode_positions_batch,
    encode_positions_mask,
)
from flowcodec.errors import ConfigError

#: position ranges: small, around the 63-bit rank limit of the numpy path (n = 66..68), and
#: above the numpy path's table (n > 512, per-sample inside)
_N = st.one_of(st.integers(1, 80), st.sampled_from([100, 197, 256, 300, 512, 513, 700]))


@settings(max_examples=150, deadline=None)
@given(_N, st.lists(st.integers(0, 2**32), max_size=12), st.floats(0, 1))
def test_positions_mask_is_per_sample(n, seeds, density):
    """Sets of every size (empty, full, one left out, random), ranks on both sides of 63
    bits, ``n`` on both sides of the numpy path's table."""
    rows = []
    for s in seeds:
        r = np.random.default_rng(s)
        row = r.random(n) < r.choice([density, 0.0, 1.0, 0.5])
        if r.random() < 0.2:
            row[:] = True
            row[r.integers(n)] = False
        rows.append(row)
    mask = np.array(rows, dtype=bool).reshape(len(rows), n)
    want = [encode_positions(np.flatnonzero(m), n) for m in mask]
    assert encode_positions_mask(mask) == want
    assert encode_positions_batch([np.flatnonzero(m) for m in mask], n) == want


def test_positions_mask_of_a_real_packet():
    """The shipped ``cifar10vit-merge_k4_arith``'s one packet: all 65 tokens; and every
    second token, as a two-packet split sends them."""
    mask = np.ones((3, 65), dtype=bool)
    mask[1, 1::2] = False
    mask[2, 5] = False
    assert encode_positions_mask(mask) == [encode_positions(np.flatnonzero(m), 65) for m in mask]


def test_positions_mask_refuses_what_is_not_a_mask():
    with pytest.raises(ConfigError):
        encode_positions_mask(np.zeros((2, 3), dtype=np.int64))
    with pytest.raises(ConfigError):
        encode_positions_mask(np.zeros(3, dtype=bool))
    with pytest.raises(ConfigError):
        encode_positions_mask(np.zeros((1, MAX_TOKENS + 1), dtype=bool))
    with pytest.raises(ConfigError):
        encode_positions_mask(np.zeros((1, 0), dtype=bool))
    assert encode_positions_mask(np.zeros((0, 5), dtype=bool)) == []
