"""The hyperprior option of the token codecs (``prior="hyperprior"``): stream layout,
packet loss (token packets and the z packet), checkpoints, determinism and hostile input."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    check_position_codes,
    check_prune_round_trip,
    coder_inputs,
    random_tokens,
    ready_codec,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from flowcodec.bitstream import Bitstream, BitstreamError
from flowcodec.codecs import arith, build_codec, load_codec, save_codec
from flowcodec.codecs.entropy import check_model_tables
from flowcodec.codecs.table_coding import arith_tables as _arith_tables
from flowcodec.codecs.table_coding import to_index as _to_index
from flowcodec.codecs.token import (
    ARITH_PRECISION,
    ESCAPE_RANGE,
    arith_decode,
    arith_encode,
    decode_positions,
    range_encode,
)
from flowcodec.errors import ConfigError

SHAPE = (17, 32)
KW = {
    "token-prune": dict(latent=8, hidden=32, packets=3, prior="hyperprior", hyper=4),
    "token-merge": dict(clusters=7, latent=8, hidden=32, packets=3, prior="hyperprior",
                        hyper=4),
}  # fmt: skip
NAMES = tuple(KW)


def _tokens(n=4, seed=0, shape=SHAPE):
    return random_tokens(n, seed, shape)


def _ready(name, **over):
    return ready_codec(name, SHAPE, **{**KW[name], **over})


_CACHE: dict = {}


def _cached(name, packets=3):
    key = (name, packets)
    if key not in _CACHE:
        _CACHE[key] = _ready(name, packets=packets)
    return _CACHE[key]


def _fill(codec, b):
    return codec.fill.detach().expand(b, -1, -1)


def _lost_positions(codec, p, labels=None):
    """Positions whose token travels in token packet ``p``."""
    if labels is None:  # token-prune: token i in packet i % packets
        return torch.arange(codec.n_tokens) % codec.packets == p
    return labels % codec.packets == p


# --- layout and round trip -----------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_round_trip_equals_forward_with_z_in_packet_0(name):
    codec = _ready(name)
    h = _tokens(5, seed=2)
    streams = codec.compress(h)
    assert all(len(s.packets) == 1 + codec.packets for s in streams)
    again = [Bitstream.from_bytes(s.to_bytes()) for s in streams]
    out = codec.decompress(again)
    with torch.no_grad():
        ref = codec(h)
    assert torch.allclose(out, ref.features, atol=1e-5)
    assert set(ref.likelihoods) == {"y", "z"} and ref.likelihoods["z"].shape == (5, 4, 1)
    # packet 0 is z, arithmetic-coded: never longer than 2 bytes per value, and here
    # (untrained, 4 values) well under rANS's 8-byte minimum
    assert all(len(s.packets[0]) <= arith.max_bytes(codec.hyper, ARITH_PRECISION) for s in streams)
    assert max(len(s.packets[0]) for s in streams) < 8
    zt = arith_decode(codec.entropy_bottleneck, streams[0].packets[0],
                      torch.arange(codec.hyper, dtype=torch.int32))  # fmt: skip
    assert zt.shape == (codec.hyper,)
    # the rate estimate counts z: within a few bytes per packet of the real size
    real = torch.tensor([8.0 * sum(len(p) for p in s.packets) for s in streams])
    assert bool((ref.bits < real).all()), (ref.bits, real)
    assert bool((real - ref.bits < 8 * 16 * len(streams[0].packets)).all())


def test_factorized_default_is_untouched_and_fingerprints_differ():
    torch.manual_seed(0)
    plain = build_codec("token-prune", SHAPE, latent=8, hidden=32, packets=3)
    torch.manual_seed(0)
    named = build_codec("token-prune", SHAPE, latent=8, hidden=32, packets=3,
                        prior="factorized")  # fmt: skip
    assert "prior" not in plain.config() and plain.config() == named.config()
    sd_a, sd_b = plain.state_dict(), named.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert not any(k.startswith(("h_a", "h_s", "gaussian")) for k in sd_a)
    hyper = _ready("token-prune")
    assert hyper.fingerprint != plain.fingerprint
    plain.fit(_tokens(32, seed=1)).eval()
    plain.update(force=True)
    s = plain.compress(_tokens(1))
    with pytest.raises(BitstreamError, match="fingerprint"):
        hyper.decompress(s)


@pytest.mark.parametrize("name", NAMES)
def test_scales_follow_the_sample(name):
    """z carries a per-sample statistic: a sample of larger tokens gets larger scales."""
    codec = _ready(name)
    with torch.no_grad():  # make the latent track the input and h_s read it through z
        small, large = 0.05 * _tokens(1, seed=3), 20.0 * _tokens(1, seed=3)
        sc = []
        for h in (small, large):
            y = codec.g_a(codec._tokens(h)).transpose(1, 2)
            z = codec.h_a(codec._pool(y, torch.ones(1, y.shape[-1])))
            sc.append(codec._params(torch.round(z))[1])
    # a random h_s need not order them, but the two samples must get different scales
    assert not torch.equal(sc[0], sc[1])


# --- packet loss -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_lost_z_conceals_only_its_sample(name):
    codec = _ready(name)
    h = _tokens(3, seed=6)
    streams = codec.compress(h)
    full = codec.decompress(streams)
    damaged = [Bitstream(streams[1].header, [None, *streams[1].packets[1:]])]
    out = codec.decompress([streams[0], *damaged, streams[2]])
    assert torch.equal(out[1], codec.fill.detach())
    assert torch.equal(out[[0, 2]], full[[0, 2]])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("p", [0, 1, 2])
def test_lost_token_packet_loses_its_tokens_not_the_sample(name, p):
    codec = _ready(name)
    h = _tokens(3, seed=7)
    streams = codec.compress(h)
    full = codec.decompress(streams)
    pk = [list(s.packets) for s in streams]
    for row in pk:
        row[1 + p] = None
    lossy = codec.decompress([Bitstream(s.header, row) for s, row in zip(streams, pk)])
    with torch.no_grad():
        codec(h)
    labels = getattr(codec, "last_labels", None) if name == "token-merge" else None
    for b in range(3):
        lost = _lost_positions(codec, p, None if labels is None else labels[b])
        assert lost.any()
        assert torch.equal(lossy[b, ~lost], full[b, ~lost])
        assert torch.equal(lossy[b, lost], codec.fill.detach()[lost])


@pytest.mark.parametrize("name", NAMES)
def test_forward_drops_z_with_a_generator(name):
    codec = _ready(name)
    h = _tokens(64, seed=8)
    with torch.no_grad():
        a = codec(h, drop_prob=0.5, generator=torch.Generator().manual_seed(1)).features
        b = codec(h, drop_prob=0.5, generator=torch.Generator().manual_seed(1)).features
        c = codec(h).features
    assert torch.equal(a, b) and not torch.equal(a, c)
    whole = (a == _fill(codec, 64)).flatten(1).all(1)
    assert 0 < int(whole.sum()) < 64  # some samples lost z (or every token packet)


# --- hostile streams and bad config --------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_bad_streams_and_config_raise_documented_errors(name):
    codec = _ready(name)
    s = codec.compress(_tokens(1))[0]
    with pytest.raises(BitstreamError, match="packets"):
        codec.decompress([Bitstream(s.header, s.packets[1:])])  # the factorized count
    cap = arith.max_bytes(codec.hyper, ARITH_PRECISION)
    too_long = s.packets[0] + bytes(cap + 1 - len(s.packets[0]))
    for z in (too_long, bytes(64)):  # longer than any code of `hyper` symbols
        with pytest.raises(BitstreamError, match="longer"):
            codec.decompress([Bitstream(s.header, [z, *s.packets[1:]])])
    for z in (b"", s.packets[0][:1], b"\xff"):  # short codes are codes: finite features
        out = codec.decompress([Bitstream(s.header, [z, *s.packets[1:]])])
        assert bool(torch.isfinite(out).all())
    # a token payload longer than any code of its symbols (16 x 5 bytes per token)
    with pytest.raises(BitstreamError, match="longer"):
        codec.decompress([Bitstream(s.header, [s.packets[0], s.packets[1] + bytes(16 * 5 * 8),
                                               *s.packets[2:]])])  # fmt: skip
    for kw in (dict(prior="gaussian"), dict(hyper=0), dict(hyper=2.5)):
        with pytest.raises(ConfigError):
            build_codec(name, SHAPE, **{**KW[name], **kw})
    with pytest.raises(ConfigError):
        codec.compress(torch.full((1, *SHAPE), math.nan))


def test_tables_are_validated():
    codec = _ready("token-prune")
    check_model_tables(codec)
    with torch.no_grad():
        codec.gaussian_conditional._quantized_cdf[0, 1] = 0  # no longer strictly increasing
    with pytest.raises(ConfigError, match="gaussian_conditional"):
        check_model_tables(codec)
    with pytest.raises(ConfigError):  # the coder re-checks a changed table before using it
        codec.compress(_tokens(1))


def test_damaged_z_table_is_refused_by_the_arithmetic_coder():
    codec = _ready("token-prune")
    s = codec.compress(_tokens(1))[0]
    with torch.no_grad():
        eb = codec.entropy_bottleneck
        eb._quantized_cdf[0, 2] = eb._quantized_cdf[0, 1]  # a zero-frequency symbol
    for call in (lambda: codec.compress(_tokens(1)), lambda: codec.decompress([s])):
        with pytest.raises(ConfigError):
            call()


# --- the arithmetic coder on the frozen tables ---------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.sampled_from(("z", "y")), st.lists(st.integers(-60, 60), min_size=0, max_size=40),
       st.integers(0, 2**31 - 1), st.booleans())  # fmt: skip
def test_arith_round_trip_on_frozen_tables_is_exact_and_near_the_information(which, syms,
                                                                             seed, far):
    codec = _cached("token-prune")
    if which == "z":
        model, rows = codec.entropy_bottleneck, codec.hyper
    else:
        model, rows = codec.gaussian_conditional, codec.gaussian_conditional._offset.numel()
    idx, sym = coder_inputs(syms, seed, rows, far)
    data = arith_encode(model, sym, idx)
    assert len(data) <= arith.max_bytes(len(syms), ARITH_PRECISION)
    back = arith_decode(model, data, idx).long()
    off = model._offset.reshape(-1)[idx.long()]
    top = off + model._cdf_length.reshape(-1)[idx.long()] - 3
    want = torch.maximum(torch.minimum(sym, top + ESCAPE_RANGE), off - ESCAPE_RANGE)
    assert torch.equal(back, want)  # exact within the escape range, clamped beyond
    # at most one byte over the information content under the coder's own tables
    rows_, offs_ = _arith_tables(model)
    bits = 0.0
    for v, i in zip(back.tolist(), idx.tolist()):
        row = rows_[i]
        j = _to_index(v, offs_[i], offs_[i] + len(row.base) - 2)
        bits -= math.log2((row[j + 1] - row[j]) / 2**ARITH_PRECISION)
    assert 8 * len(data) <= bits + 8
    # an in-range symbol costs exactly what CompressAI's 16-bit row gives it
    cdf = model._quantized_cdf
    r0 = int(idx[0]) if len(syms) else 0
    lo16 = [int(c) for c in cdf[r0, : int(model._cdf_length.reshape(-1)[r0])]]
    row = rows_[r0]
    assert [row[j] >> (ARITH_PRECISION - 16) for j in range(len(lo16) - 1)] == lo16[:-1]


def test_hyperprior_token_packets_are_arithmetic_coded_and_factorized_stays_rans():
    from flowcodec.codecs.entropy import _tables, eb_symbols, rans_encode

    codec = _ready("token-prune", packets=1, threshold=-1e6)
    s = codec.compress(_tokens(1))[0]
    local, used = decode_positions(s.packets[1], SHAPE[0])
    assert len(local) == SHAPE[0]
    with torch.no_grad():
        t = codec._tokens(_tokens(1))
        y = codec.g_a(t).transpose(1, 2)
        sym, cidx, _ = codec._latent_symbols(y, torch.ones(1, SHAPE[0]))
    s_k = sym[0].T
    # format 2: the hyperprior's packet is range-coded with the same tables
    assert s.packets[1][used:] == range_encode(codec.gaussian_conditional, s_k,
                                               cidx[0].expand_as(s_k))  # fmt: skip
    torch.manual_seed(0)
    plain = build_codec("token-prune", SHAPE, latent=8, hidden=32, packets=1,
                        threshold=-1e6).fit(_tokens(32, seed=1)).eval()  # fmt: skip
    plain.update(force=True)
    p = plain.compress(_tokens(1))[0]
    assert len(p.packets) == 1
    _, used = decode_positions(p.packets[0], SHAPE[0])
    eb = plain.entropy_bottleneck
    with torch.no_grad():
        ps = eb_symbols(eb, plain.g_a(plain._tokens(_tokens(1))).transpose(1, 2))[0].T
    idx = torch.arange(plain.latent, dtype=torch.int32).expand_as(ps)
    assert p.packets[0][used:] == rans_encode(eb, ps, idx, _tables(eb))


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(NAMES), st.integers(0, 2**31 - 1), st.integers(0, 3),
       st.integers(0, 255), st.integers(0, 40))  # fmt: skip
def test_damaged_packets_decode_to_finite_features_or_raise(name, seed, pk, byte, cut):
    codec = _cached(name)
    s = codec.compress(_tokens(1, seed=seed % 1000))[0]
    packets = list(s.packets)
    data = bytearray(packets[pk])
    if cut and cut < len(data):
        data = data[:-cut]
    else:
        data[seed % len(data)] ^= byte or 1
    packets[pk] = bytes(data)
    try:
        out = codec.decompress([Bitstream(s.header, packets)])
    except BitstreamError:
        return
    assert out.shape == (1, *SHAPE) and bool(torch.isfinite(out).all())


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.sampled_from([1, 2, 5]),
       st.floats(-4.0, 4.0), st.booleans(), st.floats(0.1, 30.0))  # fmt: skip
def test_prune_round_trip_over_kept_sets_packets_and_scales(seed, batch, packets, threshold,
                                                            first, scale):  # fmt: skip
    h = scale * _tokens(batch, seed=seed)
    codec = _cached("token-prune", packets)
    streams, kept = check_prune_round_trip(codec, h, threshold, first, scale)
    for b, s in enumerate(streams):  # token packet p names its kept tokens; z comes first
        assert len(s.packets) == 1 + packets
        check_position_codes(s.packets[1:], kept[b], packets)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.sampled_from([1, 3]),
       st.floats(0.1, 30.0), st.lists(st.booleans(), min_size=4, max_size=4))
def test_merge_round_trip_under_any_loss_pattern(seed, batch, packets, scale, keep):
    codec = _cached("token-merge", packets)
    h = scale * _tokens(batch, seed=seed)
    streams = [Bitstream.from_bytes(s.to_bytes()) for s in codec.compress(h)]
    full = codec.decompress(streams)
    with torch.no_grad():
        ref = codec(h).features
    labels = codec.last_labels
    assert torch.allclose(full, ref, atol=1e-4 * max(1.0, scale))
    keep = keep[: 1 + packets]
    lossy = codec.decompress([Bitstream(s.header, [d if k else None for d, k in
                                                   zip(s.packets, keep)]) for s in streams])
    for b in range(batch):
        if not keep[0]:  # no z: the whole sample is the fill
            assert torch.equal(lossy[b], codec.fill.detach())
            continue
        lost = ~torch.tensor(keep[1:])[labels[b] % packets]
        assert torch.equal(lossy[b, ~lost], full[b, ~lost])
        assert torch.equal(lossy[b, lost], codec.fill.detach()[lost])


# --- checkpoints and determinism -----------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_round_trip(tmp_path, name):
    codec = _ready(name)
    path = save_codec(codec, tmp_path / "tok", KW[name], half=False)
    loaded = load_codec(path)
    assert loaded.config() == codec.config() and loaded.prior == "hyperprior"
    h = _tokens(3, seed=9)
    streams = codec.compress(h)
    assert [s.to_bytes() for s in loaded.compress(h)] == [s.to_bytes() for s in streams]
    assert torch.equal(loaded.decompress(streams), codec.decompress(streams))


@pytest.mark.parametrize("name", NAMES)
def test_decoding_is_deterministic_in_a_fresh_process(tmp_path, decode_in_fresh_process, name):
    codec = _ready(name)
    path = save_codec(codec, tmp_path / "tok", KW[name], half=False)
    streams = codec.compress(_tokens(3, seed=10))
    assert torch.equal(decode_in_fresh_process(path, streams),
                       load_codec(path).decompress(streams))


def test_a_sample_decodes_the_same_in_any_batch():
    codec = _ready("token-prune")
    h = _tokens(6, seed=11)
    streams = codec.compress(h)
    together = codec.decompress(streams)
    alone = torch.cat([codec.decompress([s]) for s in streams])
    assert torch.equal(together, alone)


@pytest.mark.slow
def test_training_lowers_the_loss_and_z_learns_the_sample_scale():
    """A short rate-distortion training on tokens whose scale varies per sample: the loss
    falls, and the predicted scales of loud samples end above those of quiet ones."""
    torch.manual_seed(0)
    codec = build_codec("token-merge", (9, 8), clusters=4, latent=4, hidden=16, packets=1,
                        prior="hyperprior", hyper=2)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(codec.parameters(), 1e-2)
    codec.train()

    def batch():
        loud = torch.rand(32, 1, 1, generator=g) < 0.5
        return torch.randn(32, 9, 8, generator=g) * torch.where(loud, 4.0, 0.25), loud

    losses = []
    for _ in range(150):
        h, _ = batch()
        out = codec(h)
        loss = (out.features - h).pow(2).mean() + 1e-3 * out.bits.mean()
        opt.zero_grad()
        (loss + codec.aux_loss()).backward()
        opt.step()
        losses.append(float(loss))
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10]), (losses[:10], losses[-10:])
    codec.eval()
    with torch.no_grad():
        h, loud = batch()
        merged, _ = codec._merge(codec._tokens(h))
        y = codec.g_a(merged).transpose(1, 2)
        z = codec.h_a(codec._pool(y, torch.ones(32, 4)))
        scales = codec._params(torch.round(z))[1].clamp(min=0.11).mean(1)
    loud = loud.flatten()
    assert scales[loud].mean() > scales[~loud].mean(), (scales, loud)


@pytest.mark.parametrize("name", NAMES)
def test_the_development_coder_switches_round_trip_to_the_same_features(name):
    hyper = _ready(name)
    torch.manual_seed(0)
    kw = {k: v for k, v in KW[name].items() if k not in ("prior", "hyper")}
    plain = build_codec(name, SHAPE, **kw).fit(_tokens(32, seed=1)).eval()
    plain.update(force=True)
    h = _tokens(3, seed=5)
    for codec, attr, other in ((hyper, "_token_coder", "rans"),
                               (plain, "_factorized_coder", "arith")):  # fmt: skip
        ref_streams = codec.compress(h)
        ref = codec.decompress(ref_streams)
        setattr(codec, attr, other)
        try:
            alt = codec.compress(h)
            assert torch.equal(codec.decompress(alt), ref)
        finally:
            delattr(codec, attr)
        assert [s.packets for s in alt] != [s.packets for s in ref_streams]
