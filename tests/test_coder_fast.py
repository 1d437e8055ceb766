"""Stream format 2: the compiled range coder and the fixed-point context model (issue 30).

What they promise: exact round trips; the fast paths equal to their references bit for bit
(the interval code and the searched one, lockstep and whole-payload decoding, the context
model for the batch and channel by channel, the range coder's symbols and the exact
coder's); decoding that does not depend on the batch, the thread count or the process;
hostile payloads refused with BitstreamError only; format-1 streams still decoded.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import coder_inputs, random_tokens, ready_codec
from hypothesis import given, settings
from hypothesis import strategies as st

from flowcodec.bitstream import Bitstream, BitstreamError, Header
from flowcodec.codecs import arith, build_codec, load_pretrained_codec
from flowcodec.codecs.context_model import (
    _NORMAL,
    ChannelContext,
    FixedContext,
    grid_probs,
)
from flowcodec.codecs.context_model import grid_cdf as _grid_cdf
from flowcodec.codecs.context_model import snap_cell as _snap
from flowcodec.codecs.task import FORMAT2
from flowcodec.codecs.token import (
    FLAG_RANGE,
    arith_decode,
    arith_encode,
    range_decode,
    range_encode,
)
from flowcodec.errors import ConfigError

SHAPE = (16, 8, 8)


# --- the range coder ------------------------------------------------------------------------
@st.composite
def rows_and_symbols(draw, max_n=24):
    """Integer CDF rows (16-bit, every symbol at least 1) and a symbol of each."""
    n = draw(st.integers(0, max_n))
    cdfs, syms = [], []
    for _ in range(n):
        k = draw(st.integers(1, 24))
        cuts = sorted(draw(st.sets(st.integers(1, 65535), min_size=k - 1, max_size=k - 1)))
        cdfs.append([0, *cuts, 65536])
        syms.append(draw(st.integers(0, k - 1)))
    return syms, cdfs


def _encoder(syms, probs):
    enc = arith.constriction.stream.queue.RangeEncoder()
    if syms:
        enc.encode(np.asarray(syms, dtype=np.int32), arith.CATEGORICAL, probs)
    return enc


@settings(max_examples=100, deadline=None)
@given(rows_and_symbols())
def test_range_round_trip_is_exact_and_as_short_as_the_exact_coder(case):
    syms, cdfs = case
    probs = arith.dyadic_probs(cdfs)
    data = arith.encode_rows(syms, probs)
    assert arith.decode_rows(data, probs).tolist() == syms
    assert not data.endswith(b"\0")
    assert len(data) <= arith.range_max_bytes(len(syms))
    # the exact coder's code is the shortest of its interval; the range coder's interval
    # is a hair narrower, so at most one byte more
    assert len(data) <= len(arith.encode(syms, cdfs)) + 1
    info = -sum(math.log2((c[s + 1] - c[s]) / 65536) for s, c in zip(syms, cdfs))
    assert len(data) <= math.ceil(info / 8) + 1


@settings(max_examples=100, deadline=None)
@given(rows_and_symbols())
def test_the_interval_code_is_the_searched_shortest_code(case):
    syms, cdfs = case
    probs = arith.dyadic_probs(cdfs)
    enc = _encoder(syms, probs)

    def decodes(c: bytes) -> bool:
        try:
            return arith.decode_rows(c, probs).tolist() == syms
        except BitstreamError:
            return False

    fast = arith.interval_code(enc)
    searched = arith.shortest_code(enc.get_compressed(), decodes, 0)
    assert decodes(searched)
    assert fast is not None and decodes(fast) and len(fast) == len(searched)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(0, 12), st.integers(0, 2**31 - 1))
def test_lockstep_decoding_equals_whole_payload_decoding(samples, n, seed):
    rng = np.random.default_rng(seed)
    width = 9
    probs = np.zeros((samples, n, width))
    syms = np.zeros((samples, n), dtype=np.int64)
    for b in range(samples):
        for i in range(n):
            k = int(rng.integers(1, width + 1))
            f = rng.integers(1, 4000, size=k)
            f = 1 + np.floor(f / f.sum() * (65536 - k)).astype(np.int64)
            f[np.argmax(f)] += 65536 - f.sum()
            probs[b, i, :k] = f / 65536
            syms[b, i] = rng.choice(k, p=f / 65536)
    payloads = [arith.encode_rows(syms[b], probs[b]) for b in range(samples)]
    dec = arith.RowDecoders(payloads, n)
    got = np.stack([dec.next(probs[:, i]) for i in range(n)], 1) if n else syms
    assert np.array_equal(got, syms)
    for b in range(samples):
        assert np.array_equal(arith.decode_rows(payloads[b], probs[b]), syms[b])
    if n:
        with pytest.raises(ConfigError):  # no more symbols than declared
            dec.next(probs[:, 0])


@settings(max_examples=100, deadline=None)
@given(rows_and_symbols(max_n=12), st.binary(max_size=40))
def test_any_bytes_decode_into_the_support_or_to_a_bitstream_error(case, junk):
    _, cdfs = case
    probs = arith.dyadic_probs(cdfs)
    try:
        out = arith.decode_rows(junk, probs)
    except BitstreamError:
        with pytest.raises(BitstreamError):  # the same bytes, the same answer
            arith.decode_rows(junk, probs)
        return
    assert len(out) == len(cdfs)
    assert all(0 <= s < len(c) - 1 for s, c in zip(out.tolist(), cdfs))
    assert np.array_equal(arith.decode_rows(junk, probs), out)


def test_payload_limits_and_bad_arguments():
    probs = arith.dyadic_probs([[0, 30000, 65536]] * 3)
    data = arith.encode_rows([1, 0, 1], probs)
    with pytest.raises(BitstreamError, match="longer"):
        arith.decode_rows(data + b"\0", probs)  # a zero byte no encoder writes
    with pytest.raises(BitstreamError, match="longer"):
        arith.decode_rows(b"\x01" * (arith.range_max_bytes(3) + 1), probs)
    with pytest.raises(BitstreamError):
        arith.decode_rows("text", probs)
    with pytest.raises(ConfigError):
        arith.encode_rows([2, 0, 0], probs)  # a zero-probability (padding) symbol
    with pytest.raises(ConfigError):
        arith.encode_rows([0, 0], probs)
    # a payload that decodes to a padding entry is refused
    wide = np.zeros((1, 3))
    wide[0, :2] = 0.5
    with pytest.raises(BitstreamError, match="support"):
        arith.decode_rows(b"\xff\xff\xff\xff", wide)


def test_normal_cdf_is_accurate_and_its_tables_are_pinned():
    x = np.linspace(-6.99, 6.99, 2001)
    want = np.array([0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x])
    assert np.abs(arith.normal_cdf(x) - want).max() < 1e-13
    assert arith.normal_cdf(np.array([-7.0, 0.0, 7.0])).tolist() == [0.0, 0.5, 1.0]
    # the integer tables the coder depends on, pinned: a platform whose arithmetic gave
    # other bits would fail here rather than decode wrongly
    q = np.arange(-3000, 3001)
    digest = hashlib.sha256()
    for level in (0, 17, 48, 95):
        digest.update(_NORMAL.at(np.full_like(q, level), q).astype("<i8").tobytes())
    assert digest.hexdigest()[:16] == NORMAL_TABLES_SHA


NORMAL_TABLES_SHA = "f4bec6680f347918"


# --- the fixed-point context model ---------------------------------------------------------
def _context(latent=7, groups=(slice(0, 4), slice(4, 7)), hidden=5, seed=0, scale=0.7):
    torch.manual_seed(seed)
    ctx = ChannelContext(latent, list(groups), hidden)
    with torch.no_grad():
        for p in ctx.parameters():
            p.normal_(0, scale)
    return ctx


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 9))
def test_the_context_model_for_the_batch_equals_it_channel_by_channel(seed, batch):
    rng = np.random.default_rng(seed)
    ctx = _context(seed=seed % 7)
    lo = rng.integers(-12, 0, size=7)
    hi = lo + rng.integers(0, 25, size=7)
    fx = FixedContext(ctx, lo, hi)
    k = rng.integers(lo, hi + 1, size=(batch, 7))
    m, si = fx.cells(k, 0, 7)
    for i in range(7):
        mi, sii = fx.cells(k, i, i + 1)
        assert np.array_equal(mi[:, 0], m[:, i]) and np.array_equal(sii[:, 0], si[:, i])
        # channel i reads only the earlier channels of its group: the rest may be anything
        group = range(0, 4) if i < 4 else range(4, 7)
        other = k.copy()
        for j in range(7):
            if not (j in group and j < i):
                other[:, j] = rng.integers(lo[j], hi[j] + 1, size=batch)
        assert np.array_equal(fx.cells(other, i, i + 1)[0], mi)
    for b in range(batch):  # a sample's cells do not depend on the batch it is in
        mb, sb = fx.cells(k[b : b + 1], 0, 7)
        assert np.array_equal(mb[0], m[b]) and np.array_equal(sb[0], si[b])
    assert ((m >= 32 * (lo - 1)) & (m <= 32 * (hi + 1))).all()
    assert ((si >= 0) & (si <= 95)).all()


@settings(max_examples=100, deadline=None)
@given(st.integers(-40, 40), st.integers(1, 70), st.integers(0, 95), st.data())
def test_grid_tables_are_integer_frequencies_over_the_support(lo, n, si, data):
    m = data.draw(st.integers(32 * (lo - 1), 32 * (lo + n)))
    width = n + data.draw(st.integers(0, 5))
    row = grid_probs(np.array([m]), np.array([si]), np.array([lo]), np.array([n]), width)[0]
    freq = np.ldexp(row, 16)
    assert np.array_equal(freq, np.round(freq))
    assert freq.sum() == 65536 and (freq[:n] >= 1).all() and (freq[n:] == 0).all()
    # close to the format-1 table of the same cell (erf from libm there): every entry within
    # one unit but the largest, which takes the rounding remainder; where two entries tie for
    # the largest before it (a flat cell), the formats may give it to different ones: the
    # two entries then swap values (within one unit)
    if n > 1:
        old = np.diff(np.array(_grid_cdf(lo, lo + n - 1, m, si)))
        diff = np.abs(old - freq[:n])
        big = np.flatnonzero(diff > 1)
        assert len(big) <= 2, diff
        if len(big) == 2:
            a, b = big
            assert abs(old[a] - freq[b]) <= 1 and abs(old[b] - freq[a]) <= 1, (big, old[big])
        assert np.delete(diff, big).sum() <= 2 * n


def test_the_fixed_point_cells_track_the_float_model():
    codec = load_pretrained_codec("cifar10-task_p2_ctx")
    h = torch.relu(torch.randn(64, *codec.feature_shape, generator=torch.Generator()
                               .manual_seed(3)))  # fmt: skip
    r = 2
    k = codec.symbols(h, r)
    lo, hi = (t.tolist() for t in codec.support(r))
    m, si = codec._coding(r)["ctx"].cells(k.numpy(), 0, codec.n_sym)
    mu, sigma = codec._ctx64(r)(k.double())
    same = total = 0
    for b in range(len(k)):
        for i in range(codec.n_sym):
            cell = _snap(float(mu[b, i]), float(sigma[b, i]), lo[i], hi[i])
            same += cell == (int(m[b, i]), int(si[b, i]))
            total += 1
            assert abs(cell[0] - m[b, i]) <= 1 and abs(cell[1] - si[b, i]) <= 1
    assert same / total > 0.95


# --- the task codec -------------------------------------------------------------------------
def ready(seed: int = 0, **kw):
    torch.manual_seed(seed)
    base = {"latent": 12, "stem": [[16, True]], "hidden": 32, "rates": 4, "packets": 3}
    codec = build_codec("task", SHAPE, **{**base, **kw}).eval()
    with torch.no_grad():
        for eb in codec.entropy_bottlenecks:
            eb.quantiles.copy_(torch.tensor([-6.0, 0.0, 6.0]).repeat(codec.latent, 1, 1))
        if codec.context:  # a context model that depends on the earlier symbols
            for p in codec.contexts.parameters():
                p.normal_(0, 0.3)
    codec.update(force=True)
    return codec


def features(n: int, seed: int = 1, views: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, SHAPE[0] * views, *SHAPE[1:], generator=g) * 3


VARIANTS = [{}, {"context": True}, {"context": True, "packets": 1},
            {"context": True, "views": 2}, {"grid": 2, "latent": 6, "packets": 2,
                                             "context": True}]  # fmt: skip


@pytest.mark.parametrize("kw", VARIANTS)
def test_format2_round_trips_and_equals_format1(kw):
    codec = ready(**kw)
    h = features(6, views=kw.get("views", 1))
    for r in (0, codec.rates - 1):
        new = codec.compress(h, rate=r)
        assert all(s.header.meta == bytes([FORMAT2 | r]) for s in new)
        assert [codec.rate_of(s) for s in new] == [r] * 6
        codec.stream_format = 1
        old = codec.compress(h, rate=r)
        codec.stream_format = 2
        assert all(s.header.meta == bytes([r]) for s in old)
        out = codec.decompress([Bitstream.from_bytes(s.to_bytes()) for s in new])
        assert torch.equal(out, codec.decompress(old))  # the same symbols either way
        assert torch.allclose(out, codec(h, rate=r).features, atol=1e-5)
        mixed = codec.decompress(old[:3] + new[3:])  # one batch may mix formats and rates
        assert torch.equal(mixed, out)


@pytest.mark.parametrize("kw", VARIANTS[1:])
def test_decoding_does_not_depend_on_the_batch(kw):
    codec = ready(**kw)
    h = features(5, seed=2, views=kw.get("views", 1))
    streams = codec.compress(h, rate=1)
    packets = [s.packets for s in streams]
    whole = codec._decode_format2(packets, 1)
    v = codec.views
    for b in range(len(streams)):
        assert np.array_equal(codec._decode_format2(packets[b : b + 1], 1),
                              whole[b * v : (b + 1) * v])  # fmt: skip
    # a lost packet in one sample changes no other sample
    lost = [list(p) for p in packets]
    lost[2][0] = None
    part = codec._decode_format2(lost, 1)
    keep = np.ones(len(whole), dtype=bool)
    keep[2 * v : 3 * v] = False
    assert np.array_equal(part[keep], whole[keep])


_FRESH = """
import sys, torch, numpy as np
torch.set_num_threads(int(sys.argv[1]))
from flowcodec.codecs import arith, load_pretrained_codec
codec = load_pretrained_codec("cifar10-task_p2_ctx")
rng = np.random.default_rng(11)
out = []
for r in (0, 4):
    c = codec._coding(r)
    k = rng.integers(c["lo"], c["hi"] + 1, size=(6, codec.n_sym))
    k[:3] = np.clip(rng.integers(-2, 3, size=(3, codec.n_sym)), c["lo"], c["hi"])
    probs = codec._context_probs(r, k, 0, codec.n_sym)
    codes = [arith.encode_rows(k[b] - c["lo"], probs[b]) for b in range(len(k))]
    got = codec._decode_format2([[p] for p in codes], r)
    assert np.array_equal(got, k)
    out += [p.hex() for p in codes]
print(" ".join(out))
"""


def _fresh_codes(threads: int) -> list[str]:
    res = subprocess.run([sys.executable, "-c", _FRESH, str(threads)], capture_output=True,
                         text=True, timeout=600, check=True)  # fmt: skip
    return res.stdout.split()


def test_format2_bytes_are_the_same_in_a_fresh_process_at_any_thread_count():
    one = _fresh_codes(1)
    assert one == _fresh_codes(2)
    # and pinned: these bytes are the format (a coder update that changes them fails here)
    assert hashlib.sha256(" ".join(one).encode()).hexdigest()[:16] == FORMAT2_CODES_SHA


FORMAT2_CODES_SHA = "51cb84256055e77f"


def test_a_checkpoint_decodes_the_same_in_a_fresh_process(tmp_path, decode_in_fresh_process):
    from flowcodec.codecs import save_codec

    codec = ready(context=True)
    kw = {"latent": 12, "stem": [[16, True]], "hidden": 32, "rates": 4, "packets": 3,
          "context": True}  # fmt: skip
    path = save_codec(codec, tmp_path / "ctx", kw, half=False)
    streams = codec.compress(features(4, seed=5), rate=2)
    assert torch.equal(decode_in_fresh_process(path, streams), codec.decompress(streams))


@settings(max_examples=80, deadline=None)
@given(st.sampled_from([0, 1]), st.lists(st.binary(max_size=30), min_size=3, max_size=3))
def test_hostile_format2_payloads_give_bitstream_errors_only(which, junk):
    codec = _HOSTILE[which]
    header = codec.compress(features(1), rate=1)[0].header
    try:
        out = codec.decompress([Bitstream(header, list(junk))])
    except BitstreamError:
        return
    assert out.shape == (1, *SHAPE) and bool(torch.isfinite(out).all())


_HOSTILE = [ready(), ready(context=True)]


def test_bad_format2_streams_name_what_is_wrong():
    codec = ready(context=True)
    s = codec.compress(features(1), rate=1)[0]
    for meta in (bytes([FORMAT2 | 4]), bytes([0x40]), b"\x81\x00", b""):
        with pytest.raises(BitstreamError, match="meta"):
            codec.decompress([Bitstream(Header(s.header.codec, s.header.fingerprint,
                                               s.header.tensors, meta), s.packets)])  # fmt: skip
    with pytest.raises(BitstreamError, match="longer"):
        codec.decompress([Bitstream(s.header, [s.packets[0] + b"\0", *s.packets[1:]])])
    with pytest.raises(BitstreamError, match="longer"):
        codec.decompress([Bitstream(s.header, [bytes(range(1, 40)), *s.packets[1:]])])
    # a factorized payload naming the escape bin (which no encoder sends) is refused
    plain = ready()
    c = plain._coding(1)
    g = plain.groups[0]
    idx = np.zeros(g.stop - g.start, dtype=np.int64)
    idx[0] = c["last"][g][0] + 1
    bad = arith.encode_rows(idx, c["probs"][g])
    s = plain.compress(features(1), rate=1)[0]
    with pytest.raises(BitstreamError, match="escape"):
        plain.decompress([Bitstream(s.header, [bad, *s.packets[1:]])])
    with pytest.raises(ConfigError):
        plain.stream_format = 3
        plain.compress(features(1))


# --- streams written before format 2 (by the code as shipped before it) ----------------------
#: Written by the codecs as shipped before format 2 (that commit's code, one thread), with the
#: symbols its decoder read and the sums of its decoded features.
GOLDEN = json.loads("".join(r"""
{"cifar10-task_p2_ctx":[{"stream":"464c57430200047461736b3260bb97e67b1dae0101038000000008000
00008000000010000010000d3f166630000050000008a9b43a7307fd9ba6d","rate":0,"symbols":[0,0,0,0,0
,1,0,1,1,0,0,0,-1,0,0,1,0,0,0,0,-1,0,0,1,0,0,0,-1,1,0,0,0]},{"stream":"464c57430200047461736
b3260bb97e67b1dae010103800000000800000008000000010000010000d3f1666300000500000086aa0b24c5d9b
a2d43","rate":0,"symbols":[0,0,0,0,0,0,0,0,1,0,0,0,0,0,0,1,0,0,1,0,-1,0,0,0,1,0,0,-1,0,0,0,0
]},{"stream":"464c57430200047461736b3260bb97e67b1dae0101038000000008000000080000000100040100
00846604ec00000b0000008231b205e6ac641eeb9cab157dffc5","rate":4,"symbols":[0,-2,1,0,0,2,2,2,3
,2,-1,1,-4,2,0,5,-2,0,0,-1,-2,1,0,3,-1,1,-1,-2,3,-1,1,1]},{"stream":"464c57430200047461736b3
260bb97e67b1dae010103800000000800000008000000010004010000846604ec000009000000b1736ae9559b3db
c18e7c495f8","rate":4,"symbols":[1,-1,2,-1,-1,1,2,2,3,1,-2,0,0,0,-1,2,-1,-1,2,-1,-3,1,0,1,2,
1,-1,-3,2,-2,1,-1]}],"cifar10-task_p2_1p":[{"stream":"464c57430200047461736bf4d9731340bcae98
0101038000000008000000080000000100020100007a1842bf0000090000006ea92f54bea4243e7f01b54d97","r
ate":2,"features_sum":2369.4929942800663},{"stream":"464c57430200047461736bf4d9731340bcae980
101038000000008000000080000000100020100007a1842bf000009000000d147f63ffba279f74434848db0","ra
te":2,"features_sum":2077.689186998381}],"cifar10vit-merge_k4_arith":[{"stream":"464c5743020
00b746f6b656e2d6d657267659c43243d0c7127310101024100000080000000000001000073dd307400001600000
082390e16911948652043ed2f64d0758e57341cec27cfc5c35f3f","features_sum":-15.642629922396736}]}
""".split()))


def test_format1_streams_of_the_shipped_codecs_still_decode():
    ctx = load_pretrained_codec("cifar10-task_p2_ctx")
    for rec in GOLDEN["cifar10-task_p2_ctx"]:
        s = Bitstream.from_bytes(bytes.fromhex(rec["stream"]))
        assert ctx.format_of(s) == (rec["rate"], 1)
        sym = torch.tensor(rec["symbols"], dtype=torch.float32)[None]
        r = rec["rate"]
        want = ctx._synthesize((sym + ctx._medians(r)) * ctx._inv_gain(r))
        assert torch.allclose(ctx.decompress([s]), want, atol=1e-5)
    for name in ("cifar10-task_p2_1p", "cifar10vit-merge_k4_arith"):
        codec = load_pretrained_codec(name)
        for rec in GOLDEN[name]:
            s = Bitstream.from_bytes(bytes.fromhex(rec["stream"]))
            got = float(codec.decompress([s]).double().sum())
            assert got == pytest.approx(rec["features_sum"], rel=1e-5, abs=1e-3)


# --- the token codecs -----------------------------------------------------------------------
TOKEN_SHAPE = (17, 32)


def _tokens(n, seed=0):
    return random_tokens(n, seed, TOKEN_SHAPE)


def _token_codec(name, **kw):
    return ready_codec(name, TOKEN_SHAPE, latent=8, hidden=32, **kw)


TOKEN_CASES = [("token-prune", dict(packets=3, threshold=-1e9, coder="arith")),
               ("token-prune", dict(packets=2, prior="hyperprior", hyper=4)),
               ("token-merge", dict(clusters=7, packets=3, prior="hyperprior", hyper=4)),
               ("token-merge", dict(clusters=7, packets=2, coder="arith", order="sizes"))]


@pytest.mark.parametrize("name,kw", TOKEN_CASES)
def test_token_codecs_write_format2_and_read_both(name, kw):
    codec = _token_codec(name, **kw)
    h = 4 * _tokens(5, seed=31)
    new = codec.compress(h)
    assert all(s.header.flags == FLAG_RANGE for s in new)
    codec.stream_format = 1
    old = codec.compress(h)
    codec.stream_format = 2
    assert all(s.header.flags == 0 for s in old)
    out = codec.decompress([Bitstream.from_bytes(s.to_bytes()) for s in new])
    assert torch.equal(out, codec.decompress(old))
    with torch.no_grad():
        assert torch.allclose(out, codec(h).features, atol=1e-5)
    flagged = Bitstream(Header(new[0].header.codec, new[0].header.fingerprint,
                               new[0].header.tensors, new[0].header.meta, 0x02), new[0].packets)
    with pytest.raises(BitstreamError, match="flags"):
        codec.decompress([flagged])


def test_the_rans_token_codec_keeps_its_bytes():
    codec = _token_codec("token-prune", packets=3)
    h = _tokens(3, seed=4)
    new = codec.compress(h)
    codec.stream_format = 1
    assert [s.to_bytes() for s in new] == [s.to_bytes() for s in codec.compress(h)]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-60, 60), min_size=0, max_size=40), st.integers(0, 2**31 - 1),
       st.booleans())  # fmt: skip
def test_range_token_coder_gives_the_exact_coders_symbols(syms, seed, far):
    codec = _TOKEN_MODEL[0]
    model = codec.gaussian_conditional
    idx, sym = coder_inputs(syms, seed, model._offset.numel(), far)
    fast = range_encode(model, sym, idx)
    ref = arith_encode(model, sym, idx)
    got = range_decode(model, fast, idx)
    assert torch.equal(got, arith_decode(model, ref, idx))  # clamped the same way
    assert len(fast) <= len(ref) + 1


_TOKEN_MODEL = [_token_codec("token-prune", packets=2, prior="hyperprior", hyper=4)]


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=30))
def test_hostile_token_payloads_give_bitstream_errors_only(junk):
    model = _TOKEN_MODEL[0].entropy_bottleneck
    idx = torch.arange(4, dtype=torch.int32)
    try:
        out = range_decode(model, junk, idx)
    except BitstreamError:
        return
    assert out.shape == (4,)
