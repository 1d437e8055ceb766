"""The batched table coder (issue 30, "the receive path at line rate"): the token codecs'
format-2 payloads coded and decoded for the whole batch at once are byte for byte the
payloads of the per-payload coder as it was, decode back, and those written without the
decode check equal the checked ones; hostile batches are refused with BitstreamError."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from helpers import coder_inputs, random_tokens, ready_codec
from hypothesis import given, settings
from hypothesis import strategies as st

from flowcodec.bitstream import Bitstream, BitstreamError
from flowcodec.codecs import load_pretrained_codec
from flowcodec.codecs.table_coding import (
    range_decode,
    range_decode_batch,
    range_encode,
    range_encode_batch,
)
from flowcodec.errors import ConfigError

TOKEN_SHAPE = (17, 32)


def _tokens(n, seed):
    return random_tokens(n, seed, TOKEN_SHAPE)


def _token_codec(name, **kw):
    return ready_codec(name, TOKEN_SHAPE, latent=8, hidden=32, **kw)


def _sha(parts) -> str:
    m = hashlib.sha256()
    for p in parts:
        m.update(len(p).to_bytes(4, "big"))
        m.update(p)
    return m.hexdigest()


_HYPER = _token_codec("token-prune", packets=2, prior="hyperprior", hyper=4)


def _direct_payloads():
    """200 seeded payloads of 0..39 symbols of widening spread, every fifth with an
    outlier at the escape range's edge and one beyond it."""
    model = _HYPER.gaussian_conditional
    g = torch.Generator().manual_seed(7)
    out = []
    for i in range(200):
        n = int(torch.randint(0, 40, (1,), generator=g))
        syms = (torch.randn(n, generator=g) * (3 + i % 20)).round().long().tolist()
        out.append(coder_inputs(syms, i, model._offset.numel(), i % 5 == 0))
    return model, out


# Pinned bytes. Each sha256 (over the payloads or streams, each prefixed with its length as
# 4 big-endian bytes) was computed with the code as it was before the batched coder (commit
# d20bf5d: per-payload range_encode, np.unique row groups, every payload decoded before it
# was returned), one thread, by running exactly what each test below runs.
DIRECT_SHA = "15de8bb629be36c915fdd807fc9b99861499032f330c5eadc8b4fca74bceccf3"
CODEC_SHA = {
    "merge": "407f493b0676710c65492d56f30fddc8acd1420fba298a3249f1d5e46f667f29",
    "merge_sizes": "5a07bab9853a578a8a5688b421504912df0152bdaf7fdf205e8f1348b4c5e5fa",
    "prune": "eb00a537dbdfcd531971bd4189a0310bc1d4a8d9580c87e11a855ed19331f5dc",
}
SHIPPED_SHA = "27bb206f0a2147686c007148b7f0a3603eaf9a75959b43637ab02bc4972474f6"
CODEC_CASES = {
    "merge": ("token-merge", dict(clusters=7, packets=3, prior="hyperprior", hyper=4)),
    "merge_sizes": ("token-merge", dict(clusters=7, packets=2, coder="arith", order="sizes")),
    "prune": ("token-prune", dict(packets=2, prior="hyperprior", hyper=4)),
}


def test_range_encode_keeps_its_bytes_and_the_batch_coder_writes_them():
    model, cases = _direct_payloads()
    one = [range_encode(model, sym, idx) for idx, sym in cases]
    assert _sha(one) == DIRECT_SHA
    checked = [range_encode(model, sym, idx, verify=True) for idx, sym in cases]
    assert checked == one
    for idx, sym in cases:  # and decode back to what the per-payload decoder gives
        code = range_encode(model, sym, idx)
        got = range_decode_batch(model, [code], idx[None].numpy())[0]
        assert np.array_equal(got, range_decode(model, code, idx).numpy())


@pytest.mark.parametrize("case", sorted(CODEC_CASES))
def test_token_codec_streams_keep_their_bytes(case):
    name, kw = CODEC_CASES[case]
    codec = _token_codec(name, **kw)
    h = 4 * _tokens(16, 31)
    streams = codec.compress(h)
    assert _sha([s.to_bytes() for s in streams]) == CODEC_SHA[case]
    out = codec.decompress([Bitstream.from_bytes(s.to_bytes()) for s in streams])
    with torch.no_grad():
        assert torch.allclose(out, codec(h).features, atol=1e-5)


def test_the_shipped_merge_codec_keeps_its_bytes():
    codec = load_pretrained_codec("cifar10vit-merge_k4_arith").eval()
    h = torch.randn(32, *codec.feature_shape, generator=torch.Generator().manual_seed(3))
    streams = codec.compress(h)
    assert _sha([s.to_bytes() for s in streams]) == SHIPPED_SHA
    # the batch decodes as its samples do one at a time
    whole = codec.decompress(streams)
    for b in (0, 7, 31):
        assert torch.equal(codec.decompress(streams[b:b + 1])[0], whole[b])


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 6), st.integers(0, 12), st.booleans(),
       st.booleans())  # fmt: skip
def test_the_batch_equals_payload_by_payload(seed, batch, n, shared, far):
    model = _HYPER.gaussian_conditional
    rows = model._offset.numel()
    rng = np.random.default_rng(seed)
    sym = rng.integers(-40, 41, size=(batch, n)) * rng.integers(1, 4, size=(batch, 1))
    if far and n:
        sym[0, 0] = -(1 << 21)
    idx = rng.integers(0, rows, size=(n,) if shared else (batch, n))
    codes = range_encode_batch(model, sym, idx)
    full = np.broadcast_to(idx, (batch, n))
    for b in range(batch):
        assert codes[b] == range_encode(model, torch.from_numpy(sym[b]),
                                        torch.from_numpy(full[b].copy()), verify=True)
    assert range_encode_batch(model, sym, idx, verify=True) == codes
    got = range_decode_batch(model, codes, idx)
    for b in range(batch):
        ref = range_decode(model, codes[b], torch.from_numpy(full[b].copy()))
        assert np.array_equal(got[b], ref.numpy())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=30), min_size=1, max_size=4))
def test_hostile_batches_give_bitstream_errors_only(junk):
    model = _HYPER.entropy_bottleneck
    idx = np.arange(4)
    try:
        out = range_decode_batch(model, junk, idx)
    except BitstreamError:
        refused = 0
        for data in junk:  # some payload alone is refused too
            try:
                range_decode(model, data, torch.from_numpy(idx))
            except BitstreamError:
                refused += 1
        assert refused, "the batch was refused but every payload decodes"
        return
    assert out.shape == (len(junk), 4)


def test_bad_arguments_are_config_errors():
    model = _HYPER.entropy_bottleneck
    with pytest.raises(ConfigError):
        range_encode_batch(model, np.zeros((2, 3)), np.array([0, 1, 9]))
    with pytest.raises(ConfigError):
        range_encode_batch(model, np.zeros((2, 3)), np.zeros((3, 3), dtype=np.int64))
    with pytest.raises(ConfigError):
        range_encode(model, torch.zeros(3), torch.zeros(4, dtype=torch.int32))
    with pytest.raises(ConfigError):
        range_decode_batch(model, [b"\x01", b"\x02"], np.zeros((3, 2), dtype=np.int64))
