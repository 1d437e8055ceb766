"""Hostile streams and damaged checkpoints (issue 14): one regression test per hole found by
the fuzzing run, and fast hypothesis properties over every registered feature codec.

The long fuzzing run (child processes, every registered codec, both framings) is
``experiments/fuzz_streams.py``; docs/bitstream.md records its figures.
"""

from __future__ import annotations

import json
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowcodec.bitstream import Bitstream, BitstreamError, Header, TensorSpec
from flowcodec.codecs import build_codec
from flowcodec.codecs.entropy import (
    BYPASS_LIMIT,
    _tables,
    check_tables,
    rans_decode,
    rans_encode,
)
from flowcodec.codecs.zoo import load_codec, load_pretrained_codec, save_codec
from flowcodec.errors import CheckpointError, ConfigError
from flowcodec.family.checkpoint import record_sha256

SHAPE = (16, 8, 8)
CODECS = {
    "raw": dict(dtype="float16", packets=2),
    "quant": dict(bits=4, packets=2),
    "pca": dict(rank=6, bits=6, packets=2),
    "factorized": dict(latent=8, hidden=16, packets=2),
    "hyperprior": dict(latent=8, hidden=16, packets=2, hyper=4),
    "binary": dict(latent=4, hidden=16, packets=2),
}
SAFE = (BitstreamError,)


def _features(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(n, *SHAPE, generator=g))


_READY: dict = {}


def ready(name):
    if name not in _READY:
        torch.manual_seed(0)
        codec = build_codec(name, SHAPE, **CODECS[name])
        codec.fit(_features(32, seed=1)).eval()
        codec.update(force=True)
        _READY[name] = codec
    return _READY[name]


def _shipped(name):
    if name not in _READY:
        _READY[name] = load_pretrained_codec(name)
    return _READY[name]


def _with_packets(codec, packets, seq=0):
    """A CRC-valid stream of ``codec`` carrying ``packets`` (as it crosses a link)."""
    header = codec.compress(_features(1))[0].header
    return Bitstream.from_bytes(Bitstream(header, list(packets), seq).to_bytes())


# --- hole 1: zstd decompression bomb --------------------------------------------------------
@pytest.mark.parametrize("name", ["quant", "pca"])
@pytest.mark.parametrize("declared", [2**31, 2**34, 2**40, 2**63])
def test_zstd_frame_declaring_a_huge_size_is_an_error_not_an_allocation(name, declared):
    codec = ready(name)
    bomb = bytes.fromhex("28b52ffde0") + struct.pack("<Q", declared)
    stream = _with_packets(codec, [bomb, bomb])
    with pytest.raises(BitstreamError, match="zstd"):
        codec.decompress([stream])


@pytest.mark.parametrize("name", ["quant", "pca"])
def test_zstd_frame_of_the_wrong_size_or_with_more_output_is_refused(name):
    import zstandard

    codec = ready(name)
    good = codec.compress(_features(1))[0]
    n = len(zstandard.ZstdDecompressor().decompress(good.packets[0]))
    for data in (bytes(n + 1), bytes(n - 1), bytes(2 * n)):
        frame = zstandard.ZstdCompressor().compress(data)
        with pytest.raises(BitstreamError, match="zstd"):
            codec.decompress([_with_packets(codec, [frame, good.packets[1]])])
    # a frame without a declared size that would stream out more than expected
    cobj = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    frame = cobj.compress(bytes(10 * n)) + cobj.flush()
    with pytest.raises(BitstreamError, match="zstd"):
        codec.decompress([_with_packets(codec, [frame, good.packets[1]])])


# --- hole 2: the rANS decoder reading past its payload --------------------------------------
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


# --- hole 3: damaged checkpoints --------------------------------------------------------------
def _saved(tmp_path, name="hyperprior"):
    return save_codec(ready(name), tmp_path / name, CODECS[name], half=False)


def _flip_tensor_bit(path, key, bit=30, rehash=False):
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    t = state[key].clone().view(-1)
    t[0] ^= 1 << bit
    state[key] = t.view(state[key].shape)
    save_file(state, str(path))
    if rehash:
        record_sha256(path.with_suffix(""))


@pytest.mark.parametrize("key", ["gaussian_conditional._cdf_length",
                                 "gaussian_conditional._quantized_cdf",
                                 "gaussian_conditional._offset",
                                 "entropy_bottleneck._cdf_length",
                                 "entropy_bottleneck._quantized_cdf"])  # fmt: skip
@pytest.mark.parametrize("rehash", [False, True])
def test_flipped_table_bits_are_a_checkpoint_error(tmp_path, key, rehash):
    """Without a new hash the SHA-256 catches the flip; with one (a deliberate edit), the
    table validation does, before any C++ code sees the tables."""
    path = _saved(tmp_path)
    _flip_tensor_bit(path, key, rehash=rehash)
    why = "CDF|_offset|_cdf_length" if rehash else "SHA-256"
    with pytest.raises(CheckpointError, match=why):
        load_codec(path)


def test_zoo_stored_hyperprior_with_a_flipped_table_bit_is_refused(tmp_path):
    # stored as the zoo stores codecs (float16 transforms); the shipped hyperprior left the
    # zoo to keep it under 30 MB
    save_codec(ready("hyperprior"), tmp_path / "h", CODECS["hyperprior"])
    load_codec(tmp_path / "h")
    _flip_tensor_bit(tmp_path / "h.safetensors", "gaussian_conditional._cdf_length", bit=20)
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_codec(tmp_path / "h")


def test_flipped_weight_bits_and_missing_hash_are_checkpoint_errors(tmp_path):
    path = _saved(tmp_path, "factorized")
    raw = bytearray(path.read_bytes())
    for pos in (len(raw) - 1, len(raw) // 2, 9):
        bad = bytearray(raw)
        bad[pos] ^= 0x01
        path.write_bytes(bytes(bad))
        with pytest.raises(CheckpointError):
            load_codec(path)
    path.write_bytes(bytes(raw))
    load_codec(path)
    meta = path.with_suffix(".json")
    cfg = json.loads(meta.read_text())
    del cfg["sha256"]
    meta.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_codec(path)


@pytest.mark.parametrize("change", [
    {"feature_shape": [16, 2**20, 2**20]},
    {"feature_shape": [2**40, 8, 8]},
    {"kwargs": {"latent": 10**9, "hidden": 16, "packets": 2}},
    {"kwargs": {"latent": 8, "hidden": 2**31, "packets": 2}},
    {"kwargs": {"latent": 8, "hidden": 16, "packets": 2, "hyper": 10**8}},
    {"feature_shape": "abc"},
    {"kwargs": []},
])  # fmt: skip
def test_config_asking_for_huge_or_odd_models_is_a_checkpoint_error(tmp_path, change):
    path = _saved(tmp_path)
    meta = path.with_suffix(".json")
    cfg = json.loads(meta.read_text())
    cfg["config"].update(change)
    meta.write_text(json.dumps(cfg))
    t = time.perf_counter()
    with pytest.raises(CheckpointError):
        load_codec(path)
    assert time.perf_counter() - t < 30


def test_save_codec_records_the_hash_and_shipped_checkpoints_carry_one():
    from flowcodec.codecs.zoo import CODEC_ZOO

    for meta in CODEC_ZOO.glob("*.json"):
        rec = json.loads(meta.read_text())
        if "weights_of" in rec:  # a variant pins the checkpoint it shares tensors with
            assert len(rec.get("weights_of_sha256", "")) == 64, meta.name
            assert ("sha256" in rec) == meta.with_suffix(".safetensors").is_file(), meta.name
        if "sha256" in rec or "weights_of" not in rec:
            assert len(rec.get("sha256", "")) == 64, meta.name


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


# --- hole 4: packets bound to their stream and sample ----------------------------------------
@pytest.mark.parametrize("framing", ["sample", "session"])
@pytest.mark.parametrize("name", sorted(CODECS))
def test_packets_of_another_sample_or_codec_are_lost_not_decoded(name, framing):
    codec = ready(name)
    a, b = codec.compress(_features(2, seed=3))
    a.seq, b.seq = 10, 11
    other = ready("raw" if name != "raw" else "quant").compress(_features(1))[0]
    other.seq = 10
    for donor in (b, other):
        units = a.units(framing)
        donor_units = donor.units(framing)
        off = 1 if framing == "sample" else 0
        units[off] = donor_units[off]
        got = Bitstream.from_units(a.header, units, framing, seq=a.seq)
        assert got.packets[0] is None and got.packets[1] == a.packets[1]
        out = codec.decompress([got])
        assert torch.isfinite(out).all()


# --- hole 5: encoders on huge finite (and non-finite) features -------------------------------
def test_factorized_encoder_returns_on_huge_features():
    codec = build_codec("factorized", SHAPE, latent=8, hidden=16, packets=2)
    codec.update(force=True)
    for v in (1e8, 1e9, 1e20, 3e38, -3e38):
        t = time.perf_counter()
        streams = codec.compress(torch.full((1, *SHAPE), v))
        assert time.perf_counter() - t < 10
        out = codec.decompress([Bitstream.from_bytes(streams[0].to_bytes())])
        assert torch.isfinite(out).all()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(CODECS)),
       st.floats(-1e38, 1e38, allow_nan=False, allow_infinity=False) | st.sampled_from(
           [float("nan"), float("inf"), -float("inf"), 1e38, -1e38, 0.0]),
       st.integers(0, 2**32 - 1))  # fmt: skip
def test_every_encoder_returns_or_raises_a_named_error_for_any_magnitude(name, value, seed):
    codec = ready(name)
    g = torch.Generator().manual_seed(seed % 1000)
    h = _features(2, seed=seed % 1000)
    mask = torch.rand(h.shape, generator=g) < 0.5
    h = torch.where(mask, torch.full_like(h, value), h)
    t = time.perf_counter()
    try:
        streams = codec.compress(h)
    except ConfigError:
        assert not torch.isfinite(h).all()
        return
    assert time.perf_counter() - t < 10
    out = codec.decompress([Bitstream.from_bytes(s.to_bytes()) for s in streams])
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("value", [6868074240.0, -6868074240.0, 1e38])
def test_hyperprior_decodes_its_own_stream_of_huge_features(value):
    """z's symbols are clamped to their table's range before they set y's scales (found by
    the property test above: the encoder used unclamped z, the decoder the clamped one,
    and y's tables no longer matched)."""
    codec = ready("hyperprior")
    g = torch.Generator().manual_seed(0)
    h = _features(2, seed=0)
    h = torch.where(torch.rand(h.shape, generator=g) < 0.5, torch.full_like(h, value), h)
    out = codec.decompress([Bitstream.from_bytes(s.to_bytes()) for s in codec.compress(h)])
    assert torch.isfinite(out).all()


# --- hole 6: non-finite decoded features -------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_raw_stream_of_inf_and_nan_decodes_to_concealment_not_non_finite(dtype):
    codec = build_codec("raw", SHAPE, dtype=dtype, packets=2).fit(_features(8))
    npd = np.dtype("<f2" if dtype == "float16" else "<f4")
    vals = np.full(8 * 8 * 8, np.inf, dtype=npd)
    vals[::3] = np.nan
    vals[1::3] = -np.inf
    vals[::7] = 1.5
    stream = _with_packets(codec, [vals.tobytes(), vals.tobytes()])
    out = codec.decompress([stream])
    assert torch.isfinite(out).all()
    flat = out[0, :8].reshape(-1)
    finite = torch.from_numpy(np.isfinite(vals))
    assert torch.all(flat[finite] == 1.5)
    assert torch.equal(flat[~finite], codec.conceal[:8].reshape(-1)[~finite])


# --- properties over every codec: mutated CRC-valid streams -------------------------------------
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(CODECS)), st.data())
def test_mutated_crc_valid_streams_decode_deterministically_or_raise(name, data):
    codec = ready(name)
    stream = codec.compress(_features(1, seed=5))[0]
    packets = list(stream.packets)
    i = data.draw(st.integers(0, len(packets) - 1))
    p = bytearray(packets[i])
    kind = data.draw(st.sampled_from(["flip", "byte", "truncate", "extend", "random"]))
    if kind == "flip" and p:
        bit = data.draw(st.integers(0, 8 * len(p) - 1))
        p[bit // 8] ^= 1 << (bit % 8)
    elif kind == "byte" and p:
        p[data.draw(st.integers(0, len(p) - 1))] = data.draw(st.integers(0, 255))
    elif kind == "truncate":
        p = p[: data.draw(st.integers(0, len(p)))]
    elif kind == "extend":
        p += data.draw(st.binary(max_size=64))
    else:
        p = bytearray(data.draw(st.binary(max_size=2 * len(p) + 8)))
    packets[i] = bytes(p)
    # re-framed, so every CRC is valid: only the decoder stands between the bytes and the tail
    mutated = Bitstream.from_bytes(Bitstream(stream.header, packets, 3).to_bytes())
    outs = []
    for _ in range(2):
        try:
            outs.append(codec.decompress([mutated]))
        except SAFE:
            outs.append(None)
    if outs[0] is None:
        assert outs[1] is None
        return
    assert torch.equal(outs[0], outs[1])
    assert outs[0].shape == (1, *SHAPE) and torch.isfinite(outs[0]).all()


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(sorted(CODECS)), st.binary(max_size=300))
def test_random_bytes_are_a_bitstream_error_or_a_stream(name, data):
    codec = ready(name)
    header = codec.compress(_features(1))[0].header
    for parse in (Bitstream.from_bytes, lambda b: Bitstream.from_compact(b, header)):
        try:
            stream = parse(data)
        except BitstreamError:
            continue
        try:
            codec.decompress([stream])
        except SAFE:
            pass


def test_stream_crc_is_what_the_docs_say():
    """The packet CRC-32 of a self-contained stream starts from the CRC-32 of the header's
    own CRC (the binding), as docs/bitstream.md describes."""
    h = Header("raw", b"\0" * 8, (TensorSpec("float32", (1,)),))
    bs = Bitstream(h, [b"abcd"], seq=5)
    head = bs.header_bytes()
    framed = bs.link_packets()[0]
    body = framed[:-4]
    assert struct.unpack("<I", framed[-4:])[0] == zlib.crc32(head[-4:] + body)
    assert BYPASS_LIMIT == 1 << 20
