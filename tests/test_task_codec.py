"""The low-rate task codec and its exact arithmetic coder."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowcodec.bitstream import Bitstream, BitstreamError, Header
from flowcodec.codecs import arith, build_codec, load_codec, save_codec
from flowcodec.codecs.task import TaskCodec
from flowcodec.errors import ConfigError

SHAPE = (16, 8, 8)
KW = {"latent": 12, "stem": [[16, True]], "hidden": 32, "rates": 4, "packets": 3}


def ready(seed: int = 0, **kw) -> TaskCodec:
    torch.manual_seed(seed)
    codec = build_codec("task", SHAPE, **{**KW, **kw}).eval()
    # spread the entropy models a little so the tables have several symbols
    with torch.no_grad():
        for eb in codec.entropy_bottlenecks:
            eb.quantiles.copy_(torch.tensor([-6.0, 0.0, 6.0]).repeat(codec.latent, 1, 1))
    codec.update(force=True)
    return codec


def features(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed)) * 3


# --- the arithmetic coder ---------------------------------------------------------------------

@st.composite
def tables_and_symbols(draw):
    n = draw(st.integers(0, 40))
    cdfs, syms = [], []
    for _ in range(n):
        k = draw(st.integers(1, 12))  # symbols in this table
        cuts = sorted(draw(st.sets(st.integers(1, 65535), min_size=k - 1, max_size=k - 1)))
        cdf = [0, *cuts, 65536]
        cdfs.append(cdf)
        syms.append(draw(st.integers(0, k - 1)))
    return syms, cdfs


@settings(max_examples=300, deadline=None)
@given(tables_and_symbols())
def test_arith_round_trip_and_length_near_information(case):
    import math

    syms, cdfs = case
    data = arith.encode(syms, cdfs)
    assert arith.decode(data, cdfs) == syms
    info = -sum(math.log2((c[s + 1] - c[s]) / 65536) for s, c in zip(syms, cdfs))
    assert len(data) <= math.ceil(info / 8) + 1  # within one byte of the information
    assert len(data) <= arith.max_bytes(len(syms))


@settings(max_examples=300, deadline=None)
@given(tables_and_symbols(), st.binary(max_size=90))
def test_arith_decodes_any_bytes_into_range_deterministically(case, junk):
    _, cdfs = case
    if len(junk) > arith.max_bytes(len(cdfs)):
        with pytest.raises(BitstreamError):
            arith.decode(junk, cdfs)
        return
    out = arith.decode(junk, cdfs)
    assert len(out) == len(cdfs)
    assert all(0 <= s < len(c) - 1 for s, c in zip(out, cdfs))
    assert arith.decode(junk, cdfs) == out


def test_arith_rejects_bad_tables_and_symbols():
    with pytest.raises(ConfigError):
        arith.check_cdf([0, 10, 10, 65536])
    with pytest.raises(ConfigError):
        arith.check_cdf([1, 65536])
    with pytest.raises(ConfigError):
        arith.encode([3], [[0, 100, 65536]])
    with pytest.raises(ConfigError):
        arith.encode([0, 0], [[0, 65536]])


# --- the codec --------------------------------------------------------------------------------

def test_every_rate_point_round_trips_and_is_recorded_in_the_header():
    codec = ready()
    h = features(5)
    sizes = []
    for r in range(codec.rates):
        streams = codec.compress(h, rate=r)
        assert [codec.rate_of(s) for s in streams] == [r] * 5
        again = [Bitstream.from_bytes(s.to_bytes()) for s in streams]
        out = codec.decompress(again)
        # the decoder's output equals the forward pass with rounded latents at that rate
        assert torch.allclose(out, codec(h, rate=r).features, atol=1e-5)
        sizes.append(sum(len(p) for s in streams for p in s.packets))
    assert sizes == sorted(sizes)  # the gains start from coarse (rate 0) to fine


def test_one_batch_may_mix_rate_points():
    codec = ready()
    h = features(4)
    streams = codec.compress(h[:2], rate=0) + codec.compress(h[2:], rate=3)
    out = codec.decompress(streams)
    assert torch.allclose(out[:2], codec.decompress(streams[:2]))
    assert torch.allclose(out[2:], codec(h[2:], rate=3).features, atol=1e-5)


def test_lost_packets_are_concealed_with_the_medians():
    codec = ready()
    h = features(2)
    s = codec.compress(h, rate=2)[0]
    lost = Bitstream(s.header, [None, *s.packets[1:]])
    out = codec.decompress([lost])
    g = codec.groups[0]
    y = codec.g_a(h[:1]) * codec.gain[2].exp()
    sym = torch.round(y - codec._medians(2))
    sym[:, g] = 0
    want = codec.g_s((sym + codec._medians(2)) * codec.inv_gain[2].exp())
    assert torch.allclose(out, want, atol=1e-5)
    all_lost = codec.decompress([Bitstream(s.header, [None] * len(s.packets))])
    assert torch.isfinite(all_lost).all()


def test_bad_input_raises_named_errors():
    codec = ready()
    with pytest.raises(ConfigError):
        codec.compress(features(1), rate=4)
    with pytest.raises(ConfigError):
        codec.compress(features(1), rate=True)
    with pytest.raises(ConfigError):
        codec.compress(torch.rand(1, 8, 8, 8))
    with pytest.raises(ConfigError):
        codec.compress(torch.full((1, *SHAPE), float("nan")))
    s = codec.compress(features(1), rate=1)[0]
    for meta in (b"", b"\x09", b"\x01\x01"):
        bad = Bitstream(Header(s.header.codec, s.header.fingerprint, s.header.tensors, meta),
                        s.packets)
        with pytest.raises(BitstreamError):
            codec.decompress([bad])
    too_long = Bitstream(s.header, [bytes(64), *s.packets[1:]])
    with pytest.raises(BitstreamError):
        codec.decompress([too_long])
    other = ready(latent=10)
    with pytest.raises(BitstreamError):
        other.decompress([s])
    with pytest.raises(ConfigError):
        build_codec("task", SHAPE, latent=0)
    with pytest.raises(ConfigError):
        build_codec("task", (16, 1, 8))
    with pytest.raises(ConfigError):
        build_codec("task", (16, 8))
    with pytest.raises(ConfigError):
        TaskCodec(SHAPE, rates=0)


def test_odd_feature_maps_round_trip_at_their_size():
    codec = build_codec("task", (16, 7, 7), latent=8, hidden=32, rates=2).eval()
    codec.update(force=True)
    h = torch.rand(3, 16, 7, 7)
    out = codec.decompress(codec.compress(h, rate=1))
    assert out.shape == (3, 16, 7, 7)
    assert torch.equal(out, codec(h, rate=1).features)


def test_huge_finite_features_code_in_bounded_time():
    import time

    codec = ready()
    for v in (1e9, -1e20, 3e38):
        t = time.perf_counter()
        streams = codec.compress(torch.full((1, *SHAPE), v))
        assert codec.decompress(streams).shape == (1, *SHAPE)
        assert time.perf_counter() - t < 5


def test_compress_before_update_is_a_config_error():
    codec = build_codec("task", SHAPE, **KW).eval()
    with pytest.raises(ConfigError):
        codec.compress(features(1))


def test_stem_starts_from_an_exit_branch():
    from flowcodec.family import build_family

    fam = build_family("cifar10", width=8)
    codec = build_codec("task", (16, 16, 16), latent=4, stem=[[32, True], [32, False]], rates=2)
    assert codec.g_a.load_stem_from(fam.exits[0]) == 4  # conv, BN, conv, BN
    assert torch.equal(codec.g_a.stem[0].weight, fam.exits[0][0][0].weight)


def test_checkpoint_round_trip_and_fresh_process_determinism(tmp_path, decode_in_fresh_process):
    codec = ready()
    path = save_codec(codec, tmp_path / "task", KW, half=False)
    loaded = load_codec(path)
    h = features(3, seed=4)
    streams = []
    for r in (0, 3):  # one batch of two rate points
        batch = codec.compress(h, rate=r)
        assert [s.to_bytes() for s in loaded.compress(h, rate=r)] == \
            [s.to_bytes() for s in batch]
        streams += [Bitstream.from_bytes(s.to_bytes()) for s in batch]
    assert torch.equal(decode_in_fresh_process(path, streams), codec.decompress(streams))


def test_training_lowers_the_rate_and_keeps_the_family_untouched(digits, digits_family):
    from flowcodec.codecs.train_task import TaskTrainConfig, train_task_codec

    fam = digits_family
    fam.train()
    flags = [p.requires_grad for p in fam.parameters()]
    codec = build_codec("task", (16, 8, 8), latent=8, stem=[[16, True]], hidden=32, rates=2)
    train, test = digits
    cfg = TaskTrainConfig(lams=(20.0, 0.0), epochs=20, batch_size=64, warmup=0.05, eval_n=300,
                          lr=5e-3)
    res = train_task_codec(codec, fam, 3, 1, train, test, cfg, progress=False)
    assert fam.training and [p.requires_grad for p in fam.parameters()] == flags
    last = res.history[-1]["eval"]
    assert last[0]["est_bytes"] < last[1]["est_bytes"]  # the heavier rate weight sends less
    assert last[1]["accuracy"] > 0.5  # far above chance (0.1) after a few epochs


def test_training_on_cached_views_uses_them_and_learns(digits, digits_family):
    """cache=: epochs train on copies already through the head and the teacher; a cache
    whose features were zeroed trains a codec that has learnt nothing about the inputs."""
    from flowcodec.codecs.train import cache_views
    from flowcodec.codecs.train_task import TaskTrainConfig, eval_task_forward, train_task_codec

    fam = digits_family.eval()
    train, test = digits
    head, tail = fam.split(3, 1)
    cache = cache_views(head, tail, train, 2, torch.Generator().manual_seed(0), progress=False)
    assert len(cache) == 2 and cache[0][0].dtype == torch.float16
    cfg = TaskTrainConfig(lams=(0.0,), epochs=12, batch_size=64, warmup=0.05, lr=5e-3,
                          eval_every=0)
    accs = []
    for c in (cache, [(torch.zeros_like(h), y, t) for h, y, t in cache]):
        codec = build_codec("task", (16, 8, 8), latent=8, stem=[[16, True]], hidden=32, rates=1)
        train_task_codec(codec, fam, 3, 1, train, None, cfg, progress=False, cache=c)
        accs.append(eval_task_forward(codec, head, tail, test, 300)[0]["accuracy"])
    assert accs[0] > 0.4 and accs[1] < 0.25, accs  # chance: 0.1
    codec = build_codec("task", (16, 8, 8), latent=8, stem=[[16, True]], hidden=32, rates=1,
                        views=2)
    with pytest.raises(ConfigError, match="one-view"):
        train_task_codec(codec, fam, 3, 1, train, None, cfg, progress=False, cache=cache)
    codec = build_codec("task", (16, 4, 4), latent=8, stem=[[16, True]], hidden=32, rates=1)
    with pytest.raises(ConfigError, match="shape"):
        train_task_codec(codec, fam, 3, 1, train, None, cfg, progress=False, cache=cache)


def test_a_rate_point_view_works_where_a_codec_is_expected(digits_family):
    from flowcodec.codecs.train import evaluate_codec

    codec = ready()
    low, high = codec.at_rate(0), codec.at_rate(3)
    h = features(3)
    assert low.fingerprint == codec.fingerprint and low.encoder is codec.encoder
    for view, r in ((low, 0), (high, 3)):
        streams = view.compress(h)
        assert [codec.rate_of(s) for s in streams] == [r] * 3
        assert torch.equal(view.decompress(streams), codec.decompress(streams))
        assert torch.allclose(view(h).features, codec(h, rate=r).features)
    # evaluate_codec (and so rd / latency) takes the view as it takes any codec
    with pytest.raises(ConfigError):
        codec.at_rate(7)
    head, tail = digits_family.split(3, 1)
    from flowcodec.data import load_digits

    _, test = load_digits()
    small = build_codec("task", (16, 8, 8), latent=4, stem=[[16, True]], hidden=16, rates=2)
    small.fit(head(test.images[:64].float()).detach()).update(force=True)
    ev = [evaluate_codec(small.at_rate(r), head, tail, test.subset(100)) for r in (0, 1)]
    assert all(e.n == 100 and e.bytes_per_image > 0 for e in ev)


def test_context_model_round_trips_and_conceals_within_its_groups():
    codec = ready(context=True)
    h = features(4, seed=3)
    for r in (0, 3):
        streams = codec.compress(h, rate=r)
        again = [Bitstream.from_bytes(s.to_bytes()) for s in streams]
        out = codec.decompress(again)
        # the same reconstruction as the factorized path: only the probabilities differ
        assert torch.allclose(out, codec(h, rate=r).features, atol=1e-5)
    s = codec.compress(h[:1], rate=2)[0]
    one_lost = codec.decompress([Bitstream(s.header, [s.packets[0], None, s.packets[2]])])
    k = codec.symbols(h[:1], 2).float()
    k[:, codec.groups[1]] = 0
    want = codec.g_s((k + codec._medians(2)) * codec.inv_gain[2].exp())
    assert torch.allclose(one_lost, want, atol=1e-5)  # groups 0 and 2 still decode exactly


def test_context_model_mask_sees_only_earlier_channels_of_its_group():
    from flowcodec.codecs.task import ChannelContext

    groups = [slice(0, 3), slice(3, 5)]
    ctx = ChannelContext(5, groups, hidden=4)
    with torch.no_grad():
        for p in ctx.parameters():
            p.normal_()
    k = torch.randn(1, 5, requires_grad=True)
    mu, sigma = ctx(k)
    for i in range(5):
        (g,) = torch.autograd.grad(mu[0, i] + sigma[0, i], k, retain_graph=True)
        seen = {j for j in range(5) if g[0, j] != 0}
        allowed = {j for j in range(5) if j < i and any(j in range(s.start, s.stop) and
                                                        i in range(s.start, s.stop)
                                                        for s in groups)}  # fmt: skip
        assert seen <= allowed


def test_fit_context_beats_the_factorized_tables(digits, digits_family):
    from flowcodec.codecs.train_task import fit_context

    head, _ = digits_family.split(3, 1)
    torch.manual_seed(0)
    codec = build_codec("task", (16, 8, 8), latent=8, stem=[[16, True]], hidden=16, rates=2,
                        context=True)
    train, _ = digits
    codec.fit(head(train.images[:256].float()).detach())
    with torch.no_grad():
        codec.gain.fill_(1.5)  # a few symbols per channel from the random projection
        for eb in codec.entropy_bottlenecks:  # fit the factorized tables' quantiles
            opt = torch.optim.Adam([eb.quantiles], lr=0.05)
            y = (codec.g_a(head(train.images[:512].float())) * codec.gain[0].exp()).detach()
            with torch.enable_grad():
                for _ in range(300):
                    opt.zero_grad()
                    eb(y.unsqueeze(-1))
                    eb.loss().backward()
                    opt.step()
    codec.update(force=True)
    report = fit_context(codec, head, train, steps=300, batch_size=256, progress=False)
    assert all(r["context_bits"] < r["factorized_bits"] for r in report)
    x = train.images[:5].float()
    streams = codec.compress(head(x).detach(), rate=1)
    assert codec.decompress(streams).shape == (5, 16, 8, 8)


def test_a_grid_latent_round_trips_with_channel_group_packets():
    codec = ready(grid=2, latent=6, packets=2)
    assert codec.n_sym == 24 and codec.groups == [slice(0, 12), slice(12, 24)]
    h = features(3)
    for r in (0, 3):
        streams = codec.compress(h, rate=r)
        assert torch.allclose(codec.decompress(streams), codec(h, rate=r).features, atol=1e-5)
    s = codec.compress(h[:1], rate=1)[0]
    out = codec.decompress([Bitstream(s.header, [None, s.packets[1]])])
    k = codec.symbols(h[:1], 1).float()
    k[:, :12] = 0
    want = codec.g_s((k + codec._medians(1)) * codec._inv_gain(1))
    assert torch.allclose(out, want, atol=1e-5)


def test_a_grid_latent_with_the_context_model_round_trips_and_conceals():
    codec = ready(grid=2, latent=6, packets=2, context=True)
    assert codec.contexts[0].latent == codec.n_sym == 24
    with torch.no_grad():  # a context model that actually depends on earlier symbols
        for p in codec.contexts.parameters():
            p.normal_(0, 0.3, generator=torch.Generator().manual_seed(5))
    h = features(3, seed=4)
    for r in (0, 3):
        streams = [Bitstream.from_bytes(s.to_bytes()) for s in codec.compress(h, rate=r)]
        assert torch.allclose(codec.decompress(streams), codec(h, rate=r).features, atol=1e-5)
    s = codec.compress(h[:1], rate=2)[0]
    out = codec.decompress([Bitstream(s.header, [s.packets[0], None])])
    k = codec.symbols(h[:1], 2).float()
    k[:, 12:] = 0
    want = codec.g_s((k + codec._medians(2)) * codec._inv_gain(2))
    assert torch.allclose(out, want, atol=1e-5)  # the first group still decodes exactly


@pytest.mark.parametrize("name", [n for n in __import__("flowcodec.codecs.zoo", fromlist=["x"])
                                  .list_pretrained() if n.startswith("cifar10-task")])
def test_every_rate_point_of_the_shipped_task_codecs(name):
    from flowcodec.codecs import load_pretrained_codec

    codec = load_pretrained_codec(name)
    h = torch.rand(4, *codec.feature_shape, generator=torch.Generator().manual_seed(5))
    sizes = []
    for r in range(codec.rates):
        streams = codec.compress(h, rate=r)
        assert [codec.rate_of(s) for s in streams] == [r] * 4
        again = [Bitstream.from_bytes(s.to_bytes()) for s in streams]
        assert torch.allclose(codec.decompress(again), codec(h, rate=r).features, atol=1e-4)
        sizes.append(sum(len(p) for s in streams for p in s.packets))
    assert sizes[0] <= sizes[-1]


def test_latency_matches_the_input_codec_to_the_adaptive_accuracy():
    from dataclasses import replace

    from flowcodec.latency import _matched_input
    from flowcodec.policy import Policy, RatePoint, toy_profile

    prof = toy_profile()
    small = RatePoint(0, "input-small", [40, 200], 0, 0, 2_000_000_000,
                      {"none": [0.70, 0.4, 0.1]}, {"none": 0.0})  # fmt: skip
    prof.options.append(small)
    pol = Policy(prof, accuracy_floor=0.84)
    dec = pol.decide(snr_db=10.0, symbol_rate=1e6)
    opt, mcs = _matched_input(pol, dec, 10.0, 1e6, n=400)
    assert opt.point == 0
    acc, _, _ = pol.evaluate(opt, mcs, None, 10.0, 1e6)
    # as accurate as the adaptive choice (within a standard error): not the small image
    assert opt.rate == "input" and acc >= dec.expected_accuracy - 0.02
    # when no input option is accurate enough, the most accurate one is used
    weak = replace(dec, expected_accuracy=0.99)
    assert _matched_input(pol, weak, 10.0, 1e6, n=400)[0].rate == "input"
    prof.options = [o for o in prof.options if o.point != 0]
    assert _matched_input(pol, dec, 10.0, 1e6, n=400) is None


def test_warm_start_with_an_extra_identity_block_computes_the_source_codec():
    from flowcodec.codecs.train_task import warm_start

    src = ready(seed=3)
    with torch.no_grad():  # trained-looking stem statistics, so the copy matters
        for m in src.g_a.stem.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    deeper = build_codec("task", SHAPE, **{**KW, "stem": [[16, True], [16, False]]})
    summary = warm_start(deeper, src)
    assert "g_a.stem.4" in summary and "g_a.stem.5" in summary
    deeper.eval().update(force=True)
    h = features(5, seed=7)
    for r in (0, 3):
        assert torch.allclose(deeper(h, rate=r).features, src(h, rate=r).features, atol=1e-5)
    assert deeper.decompress(deeper.compress(h, rate=1)).shape == h.shape
    wider = build_codec("task", SHAPE, **{**KW, "stem": [[24, True]]})
    with pytest.raises(ConfigError, match="no identity start"):
        warm_start(wider, src)


def test_a_multi_view_codec_trains_codes_each_view_and_averages(digits, digits_family):
    """views=2: the device codes its features of the image and of its mirror image (packet
    j carries latent group j of both); the receiver averages the two decoded feature maps."""
    from flowcodec.codecs.train import evaluate_codec
    from flowcodec.codecs.train_task import TaskTrainConfig, eval_task_forward, train_task_codec
    from flowcodec.views import view_features

    train, test = digits
    fam = digits_family
    codec = build_codec("task", (16, 8, 8), latent=6, stem=[[16, True]], hidden=32, rates=2,
                        packets=2, views=2)
    assert codec.input_shape == (32, 8, 8) and codec.config()["views"] == 2
    cfg = TaskTrainConfig(lams=(5.0, 0.0), epochs=20, batch_size=64, warmup=0.05, eval_n=300,
                          lr=5e-3)
    train_task_codec(codec, fam, 3, 1, train, None, cfg, progress=False)
    codec.eval().update(force=True)
    head, tail = fam.eval().split(3, 1)
    x = test.images[:5].float()
    h = codec.device_features(head, x)
    assert torch.equal(h, view_features(head, x, 2))
    assert torch.equal(h[:, 16:], head(torch.flip(x, dims=[-1])))
    streams = codec.compress(h, rate=1)
    assert [len(s.packets) for s in streams] == [2] * 5  # one per group, whatever the views
    out = codec.decompress(streams)
    assert out.shape == (5, 16, 8, 8)
    assert torch.allclose(out, codec(h, rate=1).features, atol=1e-5)
    # each view alone decodes to what a one-view decode of its symbols gives; the stream
    # of two views decodes to their mean
    one = [codec.g_s((codec.symbols(h, 1)[v::2].float() + codec._medians(1))
                      * codec._inv_gain(1)) for v in range(2)]  # fmt: skip
    assert torch.allclose(out, (one[0] + one[1]) / 2, atol=1e-5)
    # a lost packet (group 1 of both views) is concealed by the medians, not an error
    lossy = [Bitstream(s.header, [s.packets[0], None]) for s in streams]
    k = codec.symbols(h, 1).float()
    k[:, 3:] = 0  # latent 6 in 2 groups: symbols 3.. are group 1
    conceal = codec.g_s((k + codec._medians(1)) * codec._inv_gain(1))
    assert torch.allclose(codec.decompress(lossy), conceal.view(5, 2, 16, 8, 8).mean(1), atol=1e-5)
    # single-view features are refused with the shape views need
    with pytest.raises(ConfigError, match="2 views"):
        codec.compress(head(x))
    # evaluate_codec and the training-time evaluation compute the views themselves
    ev = evaluate_codec(codec.at_rate(1), head, tail, test.subset(200, seed=0))
    fw = eval_task_forward(codec, head, tail, test.subset(200, seed=0), 200)
    assert ev.accuracy > 0.5 and abs(ev.accuracy - fw[1]["accuracy"]) <= 0.02


def test_every_codec_takes_its_feature_shape_unless_it_codes_views():
    head = torch.nn.Conv2d(3, 16, 3, padding=1)
    x = torch.rand(2, 3, 8, 8)
    for name, kw in (("raw", {}), ("quant", {"bits": 4}), ("task", {"latent": 4, "hidden": 8})):
        codec = build_codec(name, (16, 8, 8), **kw)
        assert codec.input_shape == (16, 8, 8)
        assert torch.equal(codec.device_features(head, x), head(x))
    multi = build_codec("task", (16, 8, 8), latent=4, hidden=8, views=3)
    assert multi.input_shape == (48, 8, 8) and multi.set_views(1).input_shape == (16, 8, 8)
    with pytest.raises(ConfigError):
        multi.set_views(5)


# --- a codec at an early split point lifted from a later one; zoo variants ---------------------


def _source_at_point2(digits_family) -> TaskCodec:
    shape = digits_family.feature_shape(2)
    torch.manual_seed(3)
    codec = build_codec("task", shape, latent=6, stem=[[32, True]], hidden=16, rates=2).eval()
    with torch.no_grad():
        for eb in codec.entropy_bottlenecks:
            eb.quantiles.copy_(torch.tensor([-4.0, 0.0, 4.0]).repeat(codec.latent, 1, 1))
    codec.update(force=True)
    return codec


def test_a_lifted_codec_sends_the_source_symbols_and_feeds_the_earlier_tail(digits, digits_family):
    from flowcodec.codecs.train_task import lift_codec

    fam = digits_family
    fam.train()
    source = _source_at_point2(fam)
    codec, kwargs = lift_codec(source, fam, 1)
    assert fam.training  # left as it was
    assert kwargs["via"] == list(source.feature_shape) and kwargs["stem"][-1] == [32, True]
    x = digits[1].images[:5].float()
    fam.eval()
    h1, h2 = fam.split(3, 1)[0](x), fam.split(3, 2)[0](x)
    for r in range(2):
        ours, theirs = codec.compress(h1, rate=r), source.compress(h2, rate=r)
        assert [s.packets for s in ours] == [s.packets for s in theirs]
        out = codec.decompress([Bitstream.from_bytes(s.to_bytes()) for s in ours])
        assert out.shape == (5, *fam.feature_shape(1))
        assert torch.allclose(out, codec(h1, rate=r).features, atol=1e-5)
    # the lift runs after the source's decoder: the tail from point 1 takes what it makes
    assert fam.split(3, 1)[1](out).shape == (5, 10)


def test_training_only_the_decoder_keeps_the_bytes(digits, digits_family):
    from flowcodec.codecs.train_task import TaskTrainConfig, lift_codec, train_task_codec

    fam = digits_family
    codec, _ = lift_codec(_source_at_point2(fam), fam, 1)
    x = digits[1].images[:8].float()
    h1 = fam.eval().split(3, 1)[0](x)
    before = {k: v.clone() for k, v in codec.state_dict().items()}
    streams = [s.to_bytes() for s in codec.compress(h1, rate=1)]
    cfg = TaskTrainConfig(lams=(1.0, 1.0), epochs=1, batch_size=64, eval_every=0,
                          decoder_only=True)  # fmt: skip
    train_task_codec(codec, fam, 3, 1, digits[0], None, cfg, progress=False)
    after = codec.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(("g_s.", "inv_gain", "conceal")) for k in moved), moved
    assert any(k.startswith("g_s.1.") for k in moved)  # the lift trained
    assert [s.to_bytes() for s in codec.compress(h1, rate=1)] == streams
    assert all(p.requires_grad for p in codec.parameters())  # flags restored


def test_a_stem_cannot_copy_layers_it_does_not_have():
    from flowcodec.codecs.train_task import stage_stem

    entries, layers = stage_stem([torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(), torch.nn.MaxPool2d(2))])  # fmt: skip
    assert entries == [[8, True]] and len(layers) == 2
    with pytest.raises(ConfigError, match="GELU"):
        stage_stem([torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GELU())])
    with pytest.raises(ConfigError, match="stem"):
        build_codec("task", SHAPE, stem=[["res"]])


def test_zoo_variants_share_tensors_and_are_pinned(tmp_path, digits_family):
    import json

    from flowcodec.codecs.train_task import lift_codec
    from flowcodec.codecs.zoo import save_codec_variant
    from flowcodec.errors import CheckpointError

    codec = ready()
    save_codec(codec, tmp_path / "base", KW)
    base = load_codec(tmp_path / "base")
    one = build_codec("task", SHAPE, **{**KW, "packets": 1}).eval()
    tables = ("_offset", "_quantized_cdf", "_cdf_length")
    one.load_state_dict({k: v for k, v in base.state_dict().items() if not k.endswith(tables)},
                        strict=False)  # fmt: skip
    one.update(force=True)
    meta = save_codec_variant(one, tmp_path / "base_1p", "base", {**KW, "packets": 1})
    assert not (tmp_path / "base_1p.safetensors").exists()  # every tensor shared
    loaded = load_codec(tmp_path / "base_1p")
    assert len(loaded.groups) == 1
    h = features(2)
    assert torch.equal(loaded.decompress(loaded.compress(h)), one.decompress(one.compress(h)))
    # a lifted codec shares its source's tensors and keeps the rest (stage copy, lift)
    src = _source_at_point2(digits_family)
    save_codec(src, tmp_path / "src", {"latent": 6, "stem": [[32, True]], "hidden": 16,
                                       "rates": 2})  # fmt: skip
    lifted, kw = lift_codec(load_codec(tmp_path / "src"), digits_family, 1)
    save_codec_variant(lifted, tmp_path / "lifted", "src", kw)
    rec = json.loads((tmp_path / "lifted.json").read_text())
    assert "entropy_bottlenecks.0._quantized_cdf" in rec["shared"]
    assert (tmp_path / "lifted.safetensors").is_file()
    back = load_codec(tmp_path / "lifted")
    h1 = torch.rand(2, *digits_family.feature_shape(1))
    assert [s.to_bytes() for s in back.compress(h1)] == [s.to_bytes() for s in lifted.compress(h1)]
    # the source changes: the variant refuses to load; a name outside the folder is refused
    raw = bytearray((tmp_path / "base.safetensors").read_bytes())
    raw[-1] ^= 1
    (tmp_path / "base.safetensors").write_bytes(bytes(raw))
    from flowcodec.family.checkpoint import record_sha256

    record_sha256(tmp_path / "base")
    with pytest.raises(CheckpointError, match="changed since"):
        load_codec(tmp_path / "base_1p")
    rec = json.loads(meta.read_text())
    rec["weights_of"] = "../base"
    meta.write_text(json.dumps(rec))
    with pytest.raises(CheckpointError, match="same folder"):
        load_codec(tmp_path / "base_1p")


def test_extend_rates_keeps_the_source_points_and_adds_finer_ones():
    """extend_rates: a shift-0 point sends the source's symbols with the source's likelihoods;
    each +1 shift halves the quantisation step (more bytes, closer features); bad ladders
    are named errors."""
    from flowcodec.codecs.train_task import extend_rates

    src = ready(3)
    h = features(16, seed=4)
    codec, kwargs = extend_rates(src, [(0, -1), (0, 0), (1, 0), (1, 1), (1, 2)], packets=1)
    assert kwargs["rates"] == 5 and codec.rates == 5 and len(codec.groups) == 1
    assert build_codec("task", SHAPE, **kwargs).rates == 5
    for j, r in ((1, 0), (2, 1)):
        assert torch.equal(codec.symbols(h, j), src.symbols(h, r))
        assert torch.allclose(codec(h, rate=j).bits, src(h, rate=r).bits, rtol=1e-4)
    bits = [float(codec(h, rate=j).bits.mean()) for j in range(5)]
    assert bits[0] < bits[1] and bits[2] < bits[3] < bits[4], bits
    # the rescaled entropy model fits the finer symbols about as well as the source's did
    # (a moved model that ignored the scale would spend far more on the wider symbols)
    assert bits[3] - bits[2] < 2.0 * codec.latent, bits
    err = [float((codec.decompress(codec.compress(h, rate=j)) - h).pow(2).mean())
           for j in (2, 3, 4)]
    assert len(set(err)) == 3
    for bad in ([], [(5, 0)], [(0, 40)], [("x", 0)], [(0, float("nan"))]):
        with pytest.raises(ConfigError, match="ladder"):
            extend_rates(src, bad)


# --- lifting in a branching family: the stages on the path to the source's point --------------
def _source_at(fam, point: int) -> TaskCodec:
    torch.manual_seed(3)
    codec = build_codec("task", fam.feature_shape(point), latent=6, stem=[[32, True]],
                        hidden=16, rates=2).eval()  # fmt: skip
    with torch.no_grad():
        for eb in codec.entropy_bottlenecks:
            eb.quantiles.copy_(torch.tensor([-4.0, 0.0, 4.0]).repeat(codec.latent, 1, 1))
    codec.update(force=True)
    return codec


@pytest.mark.parametrize("point", [1, 2])
def test_a_codec_lifts_along_the_chain_part_of_a_branching_family(point):
    from helpers import tiny_cloud_family

    from flowcodec.codecs.train_task import lift_codec

    fam = tiny_cloud_family()  # member 4 branches after stage 1; members 1-3 a chain
    source = _source_at(fam, 3)  # point 3: (64, 4, 4), on member 3's path [0, 1, 2, 3]
    codec, kwargs = lift_codec(source, fam, point)
    assert kwargs["via"] == list(fam.feature_shape(3))
    x = torch.randn(4, *fam.input_shape, generator=torch.Generator().manual_seed(1))
    h = fam.features(x, point)
    for s in fam.split(3, point)[1].stages:  # member 3's stages after point: the source's input
        h = s(h)
    assert torch.equal(h, fam.features(x, 3))
    for r in range(2):  # the stages' copy in the stem: the source's symbols and bytes
        ours, theirs = codec.compress(fam.features(x, point), rate=r), source.compress(h, rate=r)
        assert [s.packets for s in ours] == [s.packets for s in theirs]


def test_a_lift_from_a_point_on_another_branch_is_refused_with_the_receiver():
    from torch import nn

    from flowcodec.codecs.train_task import lift_codec
    from flowcodec.family.base import EarlyExitFamily
    from flowcodec.family.zoo import conv_bn

    def exit_(c):
        return nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(c, 10))

    torch.manual_seed(0)  # stage 2 reads the input, stage 3 point 1: point 3 is not after 2
    stages = [conv_bn(3, 8, pool=True), conv_bn(3, 8, pool=True), conv_bn(8, 16, pool=True),
              conv_bn(16, 16)]  # fmt: skip
    fam = EarlyExitFamily(stages, [exit_(8), exit_(8), exit_(16), exit_(16)], (3, 16, 16),
                          parents=[0, 0, 1, 3]).eval()  # fmt: skip
    assert fam.feature_shape(3) == (16, 4, 4) and fam.path(3) == [0, 1, 3]
    source = _source_at(fam, 3)
    with pytest.raises(ConfigError, match=r"at split point\(s\) \[3\] after point 2, on no path "
                                          r"through it \(member 3: path \[0, 1, 3\]\); point 2's "
                                          r"features are finished by member 2 "
                                          r"\(family.receiver\(2\)\)"):  # fmt: skip
        lift_codec(source, fam, 2)
    lifted, _ = lift_codec(source, fam, 1)  # point 1 is on member 3's path: stage 3 alone
    x = torch.randn(2, *fam.input_shape)
    assert [s.packets for s in lifted.compress(fam.features(x, 1))] == [
        s.packets for s in source.compress(fam.features(x, 3))]  # fmt: skip
