"""Token merging codec (DPC-KNN): the assignment code, the clustering, round trips with
measured bytes, packet loss that loses clusters (not the sample), hostile streams,
checkpoints, determinism in a fresh process, and training at a ViT cut."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from helpers import check_seeded_packet_loss, random_tokens, ready_codec
from hypothesis import given, settings
from hypothesis import strategies as st

from flowcodec.bitstream import Bitstream, BitstreamError
from flowcodec.codecs import CODECS, build_codec, load_codec, save_codec
from flowcodec.codecs.token_merge import (
    TokenMergeCodec,
    assignment_bits,
    decode_assignment,
    decode_sizes,
    dpc_knn,
    encode_assignment,
    encode_sizes,
    size_bits,
)
from flowcodec.errors import ConfigError
from flowcodec.split import split_model, train_codec

SHAPE = (17, 32)
KW = dict(clusters=6, latent=8, hidden=32, packets=2)


def _tokens(n=4, seed=0, shape=SHAPE):
    return random_tokens(n, seed, shape)


def _ready(shape=SHAPE, **over):
    return ready_codec("token-merge", shape, **{**KW, **over})


def _is_rgs(labels, k):
    opened = 0
    for v in labels:
        if v > opened:
            return False
        opened += v == opened
    return opened == k


# --- the assignment code -------------------------------------------------------------------
def _rgs(raw, kmax):
    """A restricted growth string built from arbitrary ints (hypothesis input)."""
    out, opened = [], 0
    for r in raw:
        v = r % min(opened + 1, kmax)
        out.append(v)
        opened += v == opened
    return out, opened


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=1, max_size=80), st.integers(1, 20))
def test_assignment_code_round_trips_and_is_self_delimiting(raw, kmax):
    labels, k = _rgs(raw, kmax)
    data = encode_assignment(labels, k)
    assert len(data) == -(-assignment_bits(len(labels), k) // 8)
    back, used = decode_assignment(data + b"\xffjunk", len(labels), k)
    assert back == labels and used == len(data)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 40).flatmap(lambda m: st.tuples(st.just(m), st.integers(1, m))),
       st.binary(max_size=20))  # fmt: skip
def test_assignment_decoder_takes_any_bytes_and_is_canonical(mk, data):
    m, k = mk
    try:
        labels, used = decode_assignment(data, m, k)
    except BitstreamError:
        return
    assert len(labels) == m and _is_rgs(labels, k) and used <= len(data)
    assert encode_assignment(labels, k) == data[:used]  # one code per assignment


def test_assignment_code_beats_fixed_width_labels():
    # 64 members in 16 clusters: log2(16!) + 48 * 4 = 236.3 bits -> 30 bytes, not 32
    assert assignment_bits(64, 16) == math.ceil(math.log2(math.factorial(16)) + 48 * 4)
    assert assignment_bits(64, 16) < 64 * 4
    assert encode_assignment([0, 0, 0], 1) == b""  # one cluster: nothing to send


def test_assignment_code_rejects_bad_values_and_bytes():
    with pytest.raises(ConfigError, match="restricted growth"):
        encode_assignment([1, 0], 2)  # not numbered by first appearance
    with pytest.raises(ConfigError, match="clusters, not"):
        encode_assignment([0, 0, 1], 3)  # cluster 2 empty
    with pytest.raises(ConfigError):
        encode_assignment([0], 2)  # more clusters than members
    good = encode_assignment([0, 1, 2, 0, 1], 3)
    with pytest.raises(BitstreamError, match="needs"):
        decode_assignment(good[:-1], 5, 3)
    with pytest.raises(BitstreamError, match="padding"):
        decode_assignment(bytes([good[0] | 1]), 5, 3)  # 1 * 2 * 3 * 3 * 3 = 54: 6 bits
    with pytest.raises(BitstreamError, match="uses 1 clusters"):
        decode_assignment(b"\x00", 5, 3)  # all in cluster 0


# --- DPC-KNN -------------------------------------------------------------------------------
def test_dpc_knn_recovers_separated_groups():
    g = torch.Generator().manual_seed(0)
    centres = 10 * torch.randn(3, 8, generator=g)
    which = torch.tensor([2, 0, 1, 0, 2, 2, 1, 0, 1, 1, 0, 2])
    x = (centres[which] + 0.1 * torch.randn(12, 8, generator=g))[None]
    lab = dpc_knn(x, 3, neighbors=3)[0]
    first = {int(w): i for i, w in reversed(list(enumerate(which.tolist())))}
    order = sorted(first, key=first.get)  # groups by first position
    assert lab.tolist() == [order.index(int(w)) for w in which]


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 24), st.integers(1, 6), st.integers(1, 4))
def test_dpc_knn_labels_are_canonical_and_batch_independent(seed, n, kfrac, neighbors):
    k = max(1, n * kfrac // 6)
    x = torch.randn(3, n, 5, generator=torch.Generator().manual_seed(seed))
    x[1] = x[0].round()  # duplicate-ish tokens: ties must still give k clusters
    lab = dpc_knn(x, k, neighbors)
    assert lab.shape == (3, n)
    for b in range(3):
        assert _is_rgs(lab[b].tolist(), k)
        assert torch.equal(dpc_knn(x[b:b + 1], k, neighbors)[0], lab[b])


# --- the codec -----------------------------------------------------------------------------
def test_registered_with_the_token_layouts():
    assert CODECS["token-merge"] is TokenMergeCodec
    assert set(TokenMergeCodec.layouts) == {"tokens", "hwc"}


def test_round_trip_equals_forward_and_bytes_are_measured():
    codec = _ready()
    h = _tokens(5, seed=2)
    streams = codec.compress(h)
    assert len(streams) == 5 and all(len(s.packets) == 2 for s in streams)
    out = codec.decompress([Bitstream.from_bytes(s.to_bytes()) for s in streams])
    with torch.no_grad():
        ref = codec(h)
    assert torch.allclose(out, ref.features, atol=1e-5)
    lab = codec.last_labels
    assert torch.equal(lab[:, 0], torch.zeros(5, dtype=torch.int64))  # class token alone
    assert bool((lab[:, 1:] > 0).all())
    assert all(_is_rgs(r, 6) for r in lab.tolist())
    # positions of one cluster share its decoded vector: they differ only by the position
    # embedding, which is zero in an untrained codec
    for b in range(5):
        for c in range(6):
            rows = out[b, lab[b] == c]
            assert torch.allclose(rows, rows[:1].expand_as(rows), atol=1e-6)
    assert all(s.nbytes < 4 * math.prod(SHAPE) / 8 for s in streams)


def test_merged_tokens_are_cluster_means():
    codec = _ready(weighted=False)
    h = _tokens(3, seed=3)
    merged, lab = codec._merge(h)
    for b in range(3):
        for c in range(6):
            assert torch.allclose(merged[b, c], h[b, lab[b] == c].mean(0), atol=1e-6)
    weighted = _ready()
    with torch.no_grad():
        weighted.scorer[1].weight.normal_()
    wm, wl = weighted._merge(h)
    assert torch.equal(wl, lab) and not torch.allclose(wm, merged, atol=1e-3)


def test_more_clusters_cost_more_bytes():
    h = _tokens(4, seed=11)
    sizes = [sum(s.nbytes for s in _ready(clusters=k).compress(h)) for k in (3, 8, 16)]
    assert sizes[0] < sizes[1] < sizes[2], sizes


def test_lost_packet_loses_its_clusters_not_the_sample():
    codec = _ready(packets=3)
    h = _tokens(3, seed=6)
    streams = codec.compress(h)
    full = codec.decompress(streams)
    with torch.no_grad():
        codec(h)
    lab = codec.last_labels
    lossy = codec.decompress([Bitstream(s.header, [s.packets[0], None, s.packets[2]])
                              for s in streams])  # fmt: skip
    lost = lab % 3 == 1
    assert bool(lost.any()) and bool((~lost).any())
    assert torch.equal(lossy[~lost], full[~lost])
    assert torch.equal(lossy[lost], codec.fill.detach().expand(3, -1, -1)[lost])
    nothing = codec.decompress([Bitstream(s.header, [None] * 3) for s in streams])
    assert torch.equal(nothing, codec.fill.detach().expand(3, -1, -1))


def test_forward_simulates_packet_loss_with_a_generator():
    check_seeded_packet_loss(_ready(), _tokens(8, seed=7))


def test_channels_last_map_is_taken_as_tokens():
    shape = (4, 4, 16)
    codec = _ready(shape=shape, keep_first=False, clusters=5)
    assert codec.layout == "hwc" and codec.n_tokens == 16
    h = _tokens(2, seed=8, shape=shape)
    out = codec.decompress(codec.compress(h))
    with torch.no_grad():
        assert out.shape == (2, *shape) and torch.allclose(out, codec(h).features, atol=1e-5)


def test_bad_settings_and_features_raise_config_errors():
    for kw in (dict(clusters=1), dict(clusters=18), dict(clusters=2.5), dict(packets=7),
               dict(packets=0), dict(neighbors=0), dict(latent=0)):  # fmt: skip
        with pytest.raises(ConfigError):
            build_codec("token-merge", SHAPE, **{**KW, **kw})
    with pytest.raises(ConfigError):
        build_codec("token-merge", (4, 4, 4, 4))
    codec = _ready()
    for bad in (torch.randn(2, 16, 32), torch.zeros(0, *SHAPE), torch.full((1, *SHAPE), math.nan)):
        with pytest.raises(ConfigError):
            codec.compress(bad)


def test_hostile_streams_raise_bitstream_errors():
    codec = _ready()
    s = codec.compress(_tokens(1, seed=12))[0]
    p0, p1 = s.packets
    with pytest.raises(BitstreamError, match="fingerprint"):
        codec.decompress([_ready(clusters=5).compress(_tokens(1))[0]])
    with pytest.raises(BitstreamError, match="packets"):
        codec.decompress([Bitstream(s.header, [p0])])
    with pytest.raises(BitstreamError, match="class token"):
        codec.decompress([Bitstream(s.header, [p1, p0])])  # packet 0 without token 0
    # without keep_first both packets share one code: swapped or repeated packets decode
    # on their own, and the stream as a whole is refused
    free = _ready(keep_first=False)
    f0, f1 = free.compress(_tokens(1, seed=12))[0].packets
    hdr = free.compress(_tokens(1, seed=12))[0].header
    with pytest.raises(BitstreamError, match="another packet"):
        free.decompress([Bitstream(hdr, [f0, f0])])  # positions claimed twice
    with pytest.raises(BitstreamError, match="numbered"):
        free.decompress([Bitstream(hdr, [f1, f0])])  # both decode, order is wrong
    with pytest.raises(BitstreamError):
        codec.decompress([Bitstream(s.header, [p0[:-3], p1])])  # truncated payload
    with pytest.raises(BitstreamError):
        codec.decompress([Bitstream(s.header, [b"\x00", p1])])  # no positions, 3 clusters
    # packet 0 alone holding every position but only its own clusters: not a full cover
    from flowcodec.codecs.token import encode_positions

    own = encode_positions(range(17), 17) + encode_assignment([0] * 15 + [1, 2], 3)
    with pytest.raises(BitstreamError):
        codec.decompress([Bitstream(s.header, [own + p0[-8:], p1])])


def _decodes_or_refuses(codec, stream: Bitstream) -> None:
    """A damaged stream decodes to finite features of the right shape or raises
    BitstreamError; nothing else."""
    try:
        out = codec.decompress([stream])
    except BitstreamError:
        return
    assert out.shape == (1, *SHAPE) and bool(torch.isfinite(out).all())


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=60), st.integers(0, 1))
def test_random_packets_decode_or_raise_bitstream_error(junk, slot):
    codec = _CACHE.setdefault("hostile", _ready())
    s = _CACHE.setdefault("stream", codec.compress(_tokens(1, seed=13))[0])
    packets = list(s.packets)
    packets[slot] = junk
    _decodes_or_refuses(codec, Bitstream(s.header, packets))


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 1), st.integers(0, 10**6), st.integers(1, 255), st.integers(0, 8))
def test_damaged_packets_decode_or_raise_bitstream_error(slot, where, mask, cut):
    """A valid packet with one byte changed and its tail cut (a CRC-valid forgery)."""
    codec = _CACHE.setdefault("hostile", _ready())
    s = _CACHE.setdefault("stream", codec.compress(_tokens(1, seed=13))[0])
    packets = list(s.packets)
    data = bytearray(packets[slot])
    data[where % len(data)] ^= mask
    packets[slot] = bytes(data[:len(data) - cut])
    _decodes_or_refuses(codec, Bitstream(s.header, packets))


def test_checkpoint_round_trip(tmp_path):
    codec = _ready()
    path = save_codec(codec, tmp_path / "merge", KW, half=False)
    loaded = load_codec(path)
    h = _tokens(3, seed=9)
    streams = codec.compress(h)
    assert [s.to_bytes() for s in loaded.compress(h)] == [s.to_bytes() for s in streams]
    assert torch.equal(loaded.decompress(streams), codec.decompress(streams))


def test_encoding_and_decoding_are_deterministic_in_a_fresh_process(tmp_path,
                                                                   decode_in_fresh_process):
    codec = _ready()
    path = save_codec(codec, tmp_path / "merge", KW, half=False)
    h = _tokens(3, seed=10)
    streams = codec.compress(h)
    assert [s.to_bytes() for s in codec.compress(h)] == [s.to_bytes() for s in streams]
    assert torch.equal(decode_in_fresh_process(path, streams),
                       load_codec(path).decompress(streams))


_CACHE: dict = {}


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.sampled_from([(3, 1), (6, 2), (9, 4)]),
       st.floats(0.1, 30.0))  # fmt: skip
def test_round_trip_over_inputs_clusters_packets_and_scales(seed, batch, kp, scale):
    if kp not in _CACHE:
        _CACHE[kp] = _ready(clusters=kp[0], packets=kp[1])
    codec = _CACHE[kp]
    h = scale * _tokens(batch, seed=seed)
    streams = [Bitstream.from_bytes(s.to_bytes()) for s in codec.compress(h)]
    with torch.no_grad():
        ref = codec(h).features
    out = codec.decompress(streams)
    assert torch.allclose(out, ref, atol=1e-4 * max(1.0, scale))


# --- training at a ViT cut -----------------------------------------------------------------
def _vit():
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                                num_heads=2, hidden_dim=32, mlp_dim=64,
                                                num_classes=10)  # fmt: skip


def _images(n, seed):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _kl(split, codec, x):
    with torch.no_grad():
        h = split.head(x)
        ref = split.tail(h).log_softmax(1)
        got = split.tail(codec(h).features).log_softmax(1)
    return float(torch.nn.functional.kl_div(got, ref, log_target=True, reduction="batchmean"))


def test_training_at_a_vit_cut_lowers_the_loss():
    torch.manual_seed(0)
    model = _vit().eval()
    with torch.no_grad():  # torchvision zeroes the head: give the tail outputs to match
        model.heads.head.weight.normal_(0.0, 1.0)
    split = split_model(model, "encoder.layers.encoder_layer_0", _images(1, 0))
    assert split.layout == "tokens" and split.feature_shape == SHAPE
    codec = build_codec("token-merge", split.feature_shape, **KW)
    batches = [_images(16, s) for s in range(4)]
    with torch.no_grad():
        codec.fit(torch.cat([split.head(x) for x in batches]))
    held = _images(32, 99)
    codec.eval()
    before = _kl(split, codec, held)
    res = train_codec(split, codec, batches, steps=20, lam=1e-4, lr=3e-3, progress=False)
    assert res.steps == 20
    after = _kl(split, codec, held)
    assert after < 0.5 * before, (before, after)  # about 14.0 -> 2.9 here
    codec.update(force=True)
    streams = codec.compress(split.head(held))
    with torch.no_grad():
        assert torch.allclose(codec.decompress(streams), codec(split.head(held)).features,
                              atol=1e-4)  # fmt: skip
    assert all(m.training is False for m in model.modules())


def test_keep_first_codes_the_class_token_alone_for_free():
    """With keep_first, token 0 is cluster 0 by construction: packet 0's assignment code
    covers only the other members, so K = 2 sends the partition in no bits at all, and
    the exact side bits of forward's rate are the stream's."""
    from flowcodec.codecs.token import encode_positions

    n = SHAPE[0]
    codec = _ready(clusters=2, packets=1)
    t = _tokens(3, seed=4)
    side = codec._side_bits(codec.cluster(t))
    assert side.tolist() == [8.0 * len(encode_positions(range(n), n))] * 3
    for s in codec.compress(t):
        assert s.packets[0].startswith(encode_positions(range(n), n))
    k4 = _ready(clusters=4, packets=1)
    lab = k4.cluster(t)
    want = -(-assignment_bits(n - 1, 3) // 8) + len(encode_positions(range(n), n))
    assert k4._side_bits(lab).tolist() == [8.0 * want] * 3
    torch.testing.assert_close(k4.decompress(k4.compress(t)), k4(t).features, atol=1e-5,
                               rtol=1e-5)  # fmt: skip


# --- order="sizes" -------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(st.integers(1, 80).flatmap(lambda m: st.tuples(
    st.just(m), st.sets(st.integers(1, max(1, m - 1)), max_size=m - 1))), st.booleans())
def test_size_code_round_trips_and_is_self_delimiting(m_cuts, with_bound):
    m, cuts = m_cuts
    ends = sorted(c for c in cuts if c < m) + [m]
    sizes = [e - b for b, e in zip([0] + ends[:-1], ends)]
    n = m + 3 if with_bound else None
    data = encode_sizes(sizes, n)
    assert len(data) == -(-size_bits(m, len(sizes), n) // 8)
    got, used = decode_sizes(data + b"\xff\x01", len(sizes), m=None if n else m, n=n)
    assert got == sizes and used == len(data)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 12), st.integers(1, 70), st.binary(max_size=12))
def test_size_decoder_takes_any_bytes_and_is_canonical(k, n, data):
    if k > n:
        return
    try:
        sizes, used = decode_sizes(data, k, n=n)
    except BitstreamError:
        return
    assert len(sizes) == k and min(sizes) >= 1 and sum(sizes) <= n
    assert encode_sizes(sizes, n) == data[:used]  # one code per composition


def test_size_code_is_tiny_against_the_assignment_code():
    # the ViT's 64 patch tokens in 7 clusters (K = 8 with the class token alone)
    assert size_bits(64, 7) == 27 and assignment_bits(64, 7) > 160
    with pytest.raises(ConfigError):
        encode_sizes([3, 0, 2])
    with pytest.raises(BitstreamError, match="size code"):
        decode_sizes(b"", 3, n=10)


@pytest.mark.parametrize("packets,prior", [(1, "factorized"), (3, "factorized"),
                                           (2, "hyperprior")])  # fmt: skip
def test_sizes_order_round_trips_and_sends_fewer_bytes(packets, prior):
    h = _tokens(5, seed=21)
    sizes = _ready(order="sizes", packets=packets, prior=prior)
    pos = _ready(packets=packets, prior=prior)
    out = sizes(h).features
    streams = sizes.compress(h)
    assert torch.equal(sizes.decompress(streams), out)
    nbytes = [sum(len(p) for p in s.packets) for s in streams]
    assert all(a < b for a, b in zip(nbytes, [sum(len(p) for p in s.packets)
                                              for s in pos.compress(h)]))  # fmt: skip
    assert sizes.config()["order"] == "sizes" and "order" not in pos.config()


def test_sizes_order_gives_the_same_tokens_in_another_order():
    """With no position embedding the two orders restore the same multiset of tokens,
    the class token first; so a ViT tail (attention, class-token readout) answers the
    same from either."""
    from flowcodec.family import build_family

    torch.manual_seed(0)
    fam = build_family("cifar10-vit", dim=32, heads=2, depths=[1, 1, 1]).eval()
    _, tail = fam.split(3, 2)
    h = 30 * _tokens(4, seed=5, shape=(65, 32))  # latents that do not all round to 0
    a = _ready(shape=(65, 32), order="sizes", clusters=8)
    b = _ready(shape=(65, 32), clusters=8)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        b.pos.zero_()
    ta, tb = a(h).features, b(h).features
    assert not torch.allclose(ta, tb)  # other positions ...
    assert torch.allclose(ta.sort(1).values, tb.sort(1).values, atol=1e-6)  # ... same tokens
    assert torch.allclose(ta[:, 0], tb[:, 0])
    with torch.no_grad():
        assert torch.allclose(tail(ta), tail(tb), atol=1e-5)


def test_sizes_order_lost_packets_get_the_fill_and_the_class_token_keeps_slot_0():
    h = _tokens(2, seed=8)
    codec = _ready(order="sizes", packets=3)
    full = codec.decompress(codec.compress(h))
    s = codec.compress(h)[0]
    lost1 = codec.decompress([Bitstream(s.header, [s.packets[0], None, s.packets[2]])])[0]
    assert torch.equal(lost1[0], full[0, 0])  # cluster 0 is in packet 0: still in slot 0
    n_lost = int((lost1 != full[0]).any(-1).sum())
    assert n_lost >= 1 and torch.equal(lost1[-n_lost:], codec.fill.detach()[-n_lost:])
    lost0 = codec.decompress([Bitstream(s.header, [None, s.packets[1], s.packets[2]])])[0]
    assert torch.equal(lost0[0], codec.fill.detach()[0])
    # forward's simulated loss follows the same layout
    g = torch.Generator().manual_seed(3)
    sim = codec(h, drop_prob=0.5, generator=g).features
    assert sim.shape == h.shape and bool(torch.isfinite(sim).all())


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 2), st.binary(max_size=40))
def test_sizes_order_random_packets_decode_or_raise_bitstream_error(slot, junk):
    codec = _CACHE.setdefault("sizes", _ready(order="sizes", packets=3))
    s = _CACHE.setdefault("sizes_stream", codec.compress(_tokens(1, seed=13))[0])
    packets = list(s.packets)
    packets[slot] = junk
    _decodes_or_refuses(codec, Bitstream(s.header, packets))


def test_sizes_order_checkpoint_round_trip_and_refuses_positions_streams(tmp_path):
    codec = _ready(order="sizes")
    path = save_codec(codec, tmp_path / "merge_sizes", {**KW, "order": "sizes"}, half=False)
    loaded = load_codec(path)
    h = _tokens(3, seed=9)
    assert [s.to_bytes() for s in loaded.compress(h)] == [s.to_bytes() for s in codec.compress(h)]
    with pytest.raises(BitstreamError):  # another configuration's fingerprint
        codec.decompress(_ready().compress(h))
