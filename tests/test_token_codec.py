"""Token codecs: the position code, round trips with measured bytes, variable kept counts,
packet loss that loses tokens (not the sample), bad input, checkpoints, determinism in a
fresh process, and layout checks."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    check_position_codes,
    check_prune_round_trip,
    check_seeded_packet_loss,
    random_tokens,
    ready_codec,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from flowcodec.bitstream import Bitstream, BitstreamError
from flowcodec.codecs import CODECS, build_codec, load_codec, save_codec
from flowcodec.codecs.token import (
    TokenPruneCodec,
    decode_positions,
    encode_positions,
    position_bits,
)
from flowcodec.errors import ConfigError
from flowcodec.shapes import FeatureShape

SHAPE = (17, 32)
KW = dict(latent=8, hidden=32, packets=3)


def _tokens(n=4, seed=0, shape=SHAPE):
    return random_tokens(n, seed, shape)


def _ready(shape=SHAPE, **over):
    return ready_codec("token-prune", shape, **{**KW, **over})


def _prune_by_norm(codec):
    """Make the scorer keep exactly the tokens whose first feature is positive."""
    with torch.no_grad():
        for m in codec.scorer:
            if isinstance(m, torch.nn.Linear):
                m.weight.zero_()
                m.bias.zero_()
        codec.scorer[0] = torch.nn.Identity()
        codec.scorer[1].weight[0, 0] = 1.0  # hidden unit 0 = x0
        codec.scorer[2] = torch.nn.ReLU()
        codec.scorer[3].weight[0, 0] = 1.0
        codec.scorer[3].bias.fill_(-1e-6)
    return codec


# --- the position code ---------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.integers(1, 300).flatmap(
    lambda n: st.tuples(st.just(n), st.sets(st.integers(0, n - 1), max_size=n))))  # fmt: skip
def test_position_code_round_trips_and_is_self_delimiting(case):
    n, pos = case
    data = encode_positions(pos, n)
    assert len(data) == -(-position_bits(len(pos), n) // 8)
    back, used = decode_positions(data + b"\xff\x00tail", n)
    assert back == sorted(pos) and used == len(data)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 64), st.binary(max_size=12))
def test_position_decoder_takes_any_bytes_without_crashing(n, data):
    try:
        pos, used = decode_positions(data, n)
    except BitstreamError:
        return
    assert used <= len(data) and pos == sorted(set(pos)) and all(0 <= p < n for p in pos)
    assert encode_positions(pos, n) == data[:used]  # the code is canonical


def test_position_code_is_near_the_counting_bound():
    # 4 of 64 positions: log2(65) + log2(C(64, 4)) = 6.02 + 19.3 bits -> 4 bytes
    assert len(encode_positions([3, 9, 40, 63], 64)) == math.ceil((7 + 20) / 8)
    assert encode_positions([], 16) == b"\x00"  # nothing kept: the count only


def test_position_code_rejects_bad_values():
    with pytest.raises(ConfigError):
        encode_positions([1, 1], 4)
    with pytest.raises(ConfigError):
        encode_positions([4], 4)
    with pytest.raises(BitstreamError, match="tokens of"):
        decode_positions(bytes([0xF0]), 4)  # count 7 > 4 (3 bits)
    with pytest.raises(BitstreamError, match="needs"):
        decode_positions(b"", 4)


# --- the codec -----------------------------------------------------------------------------
def test_registered_with_the_token_layouts():
    assert CODECS["token-prune"] is TokenPruneCodec
    assert set(TokenPruneCodec.layouts) == {"tokens", "hwc"}


def test_round_trip_equals_forward_and_bytes_are_measured():
    codec = _ready()
    h = _tokens(5, seed=2)
    streams = codec.compress(h)
    assert len(streams) == 5 and all(len(s.packets) == 3 for s in streams)
    again = [Bitstream.from_bytes(s.to_bytes()) for s in streams]
    out = codec.decompress(again)
    with torch.no_grad():
        ref = codec(h).features
    assert torch.allclose(out, ref, atol=1e-5)
    kept = codec.last_kept  # the initial scorer keeps every token: none is the fill
    assert bool(kept.all())
    assert not torch.isclose(out, codec.fill.detach().expand_as(out), atol=1e-4).all(-1).any()
    raw = 4 * math.prod(SHAPE)
    assert all(s.nbytes < raw / 4 for s in streams)


def test_kept_count_varies_per_sample_and_pruned_tokens_cost_nothing():
    codec = _prune_by_norm(_ready())
    h = _tokens(6, seed=4)
    streams = codec.compress(h)
    with torch.no_grad():
        out = codec(h)
    kept = codec.last_kept
    expect = h[..., 0] > 0
    expect[:, 0] = True  # keep_first
    assert torch.equal(kept, expect)
    assert len(set(kept.sum(1).tolist())) > 1  # variable count per sample
    dec = codec.decompress(streams)
    assert torch.equal(dec[~kept], codec.fill.detach().expand(6, -1, -1)[~kept])
    assert torch.allclose(dec, out.features, atol=1e-5)
    # a sample with fewer kept tokens is coded in fewer bytes (same scorer, same data)
    fewer = h.clone()
    fewer[:, 1:, 0] = -1.0  # prune all but the class token
    assert all(a.nbytes < b.nbytes for a, b in zip(codec.compress(fewer), streams))


def test_all_pruned_without_keep_first_sends_only_positions():
    codec = _prune_by_norm(_ready(keep_first=False))
    h = _tokens(2, seed=5)
    h[..., 0] = -1.0
    streams = codec.compress(h)
    assert all(len(p) == 1 for s in streams for p in s.packets)  # the count, nothing else
    assert torch.equal(codec.decompress(streams), codec.fill.detach().expand(2, -1, -1))


def test_lost_packet_loses_its_tokens_not_the_sample():
    codec = _ready()
    h = _tokens(3, seed=6)
    streams = codec.compress(h)
    full = codec.decompress(streams)
    lossy = codec.decompress([Bitstream(s.header, [s.packets[0], None, s.packets[2]])
                              for s in streams])  # fmt: skip
    lost = torch.arange(SHAPE[0]) % 3 == 1
    assert torch.equal(lossy[:, ~lost], full[:, ~lost])
    assert torch.equal(lossy[:, lost], codec.fill.detach()[lost].expand(3, -1, -1))


def test_forward_simulates_packet_loss_with_a_generator():
    check_seeded_packet_loss(_ready(), _tokens(8, seed=7))


def test_channels_last_map_is_taken_as_tokens():
    shape = (4, 4, 16)
    codec = _ready(shape=shape, packets=2)
    assert codec.layout == "hwc" and codec.n_tokens == 16
    h = _tokens(2, seed=8, shape=shape)
    out = codec.decompress(codec.compress(h))
    assert out.shape == (2, *shape)
    with torch.no_grad():
        assert torch.allclose(out, codec(h).features, atol=1e-5)


def test_bad_input_and_bad_streams_raise_documented_errors():
    codec = _ready()
    for bad in (torch.randn(2, 16, 32), torch.zeros(0, *SHAPE), torch.full((1, *SHAPE), math.nan),
                torch.ones(1, *SHAPE, dtype=torch.int64)):  # fmt: skip
        with pytest.raises(ConfigError):
            codec.compress(bad)
    s = codec.compress(_tokens(1))[0]
    other = _ready(latent=4).compress(_tokens(1))[0]
    with pytest.raises(BitstreamError, match="fingerprint"):
        codec.decompress([other])
    with pytest.raises(BitstreamError):
        codec.decompress([Bitstream(s.header, s.packets[:2])])
    trailing = Bitstream(s.header, [b"\x00\x01\x02", *s.packets[1:]])  # count 0, then bytes
    with pytest.raises(BitstreamError, match="after a position code"):
        codec.decompress([trailing])
    short = Bitstream(s.header, [s.packets[0][:-5], *s.packets[1:]])
    with pytest.raises(BitstreamError):
        codec.decompress([short])
    for kw in (dict(packets=0), dict(packets=18), dict(latent=0), dict(threshold=math.inf)):
        with pytest.raises(ConfigError):
            build_codec("token-prune", SHAPE, **kw)
    with pytest.raises(ConfigError):
        build_codec("token-prune", (4, 4, 4, 4))


def test_layouts_are_checked_both_ways():
    with pytest.raises(ConfigError, match="token codec"):
        build_codec("factorized", FeatureShape((17, 32), "tokens"))
    with pytest.raises(ConfigError, match="channels_first=True"):
        build_codec("factorized", FeatureShape((8, 8, 16), "hwc"), latent=4)
    with pytest.raises(ConfigError, match="codes layouts"):
        build_codec("token-prune", FeatureShape((16, 8, 8), "chw"))
    assert build_codec("factorized", FeatureShape((16, 8, 8), "chw")).layout == "chw"
    assert build_codec("raw", FeatureShape((17, 32), "tokens")).layout == "tokens"


def test_checkpoint_round_trip(tmp_path):
    codec = _ready()
    path = save_codec(codec, tmp_path / "tok", KW, half=False)
    loaded = load_codec(path)
    h = _tokens(3, seed=9)
    streams = codec.compress(h)
    assert [s.to_bytes() for s in loaded.compress(h)] == [s.to_bytes() for s in streams]
    assert torch.equal(loaded.decompress(streams), codec.decompress(streams))


def test_decoding_is_deterministic_in_a_fresh_process(tmp_path, decode_in_fresh_process):
    codec = _ready()
    path = save_codec(codec, tmp_path / "tok", KW, half=False)
    streams = codec.compress(_tokens(3, seed=10))
    assert torch.equal(decode_in_fresh_process(path, streams),
                       load_codec(path).decompress(streams))


def test_training_prunes_tokens_under_a_rate_penalty():
    """A rate term makes the scorer drop tokens that the loss does not need."""
    torch.manual_seed(0)
    codec = build_codec("token-prune", (9, 8), latent=4, hidden=16, packets=1)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(codec.parameters(), 1e-2)
    codec.train()
    for _ in range(150):
        h = torch.randn(32, 9, 8, generator=g)
        out = codec(h)
        # only the first token matters to this "tail"
        loss = (out.features[:, 0] - h[:, 0]).pow(2).mean() + 1e-2 * out.bits.mean()
        opt.zero_grad()
        (loss + codec.aux_loss()).backward()
        opt.step()
    codec.eval()
    with torch.no_grad():
        codec(torch.randn(64, 9, 8, generator=g))
    kept = codec.last_kept.float().mean(0)
    assert kept[0] == 1.0 and kept[1:].mean() < 0.5, kept


_CACHE: dict = {}


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.sampled_from([1, 2, 5]),
       st.floats(-4.0, 4.0), st.booleans(), st.floats(0.1, 30.0))  # fmt: skip
def test_round_trip_over_kept_sets_packets_and_scales(seed, batch, packets, threshold, first,
                                                      scale):  # fmt: skip
    if packets not in _CACHE:
        _CACHE[packets] = _ready(packets=packets)
    h = scale * _tokens(batch, seed=seed)
    streams, kept = check_prune_round_trip(_CACHE[packets], h, threshold, first, scale)
    for b, s in enumerate(streams):  # each packet's position code names its kept tokens
        check_position_codes(s.packets, kept[b], packets)


# --- coder="arith" -------------------------------------------------------------------------
def test_the_arithmetic_coder_option_round_trips_with_fewer_bytes_and_the_same_weights():
    h = 4 * _tokens(5, seed=31)
    rans, arith = _ready(threshold=-1e9), _ready(threshold=-1e9, coder="arith")
    assert all(torch.equal(a, b) for a, b in zip(rans.state_dict().values(),
                                                 arith.state_dict().values()))  # fmt: skip
    streams = arith.compress(h)
    assert torch.equal(arith.decompress(streams), arith(h).features)
    assert torch.equal(arith(h).features, rans(h).features)  # same model, other bytes
    n_arith = sum(len(s.to_compact()) for s in streams)
    n_rans = sum(len(s.to_compact()) for s in rans.compress(h))
    assert n_arith < n_rans
    assert arith.config()["coder"] == "arith" and "coder" not in rans.config()
    with pytest.raises(BitstreamError):  # the fingerprint tells the two apart
        arith.decompress(rans.compress(h))
    with pytest.raises(ConfigError, match="coder"):
        build_codec("token-prune", SHAPE, coder="huffman")


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2), st.binary(max_size=40))
def test_arithmetic_coded_random_packets_decode_or_raise_bitstream_error(slot, junk):
    codec = _CACHE.setdefault("arith", _ready(coder="arith"))
    s = _CACHE.setdefault("arith_stream", codec.compress(_tokens(1, seed=13))[0])
    packets = list(s.packets)
    packets[slot] = junk
    try:
        out = codec.decompress([Bitstream(s.header, packets)])
    except BitstreamError:
        return
    assert out.shape == (1, *SHAPE) and bool(torch.isfinite(out).all())
