"""JSCC codecs: power constraint, gradients through the channels, seeding, side information,
errors, checkpoints, the discrete variant's uncoded link and bytes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from channels import AWGN, OFDMTDLChannel, RayleighBlockFading
from flowcodec.bitstream import Bitstream, BitstreamError
from flowcodec.codecs import CODECS, build_codec, load_codec, save_codec
from flowcodec.codecs.jscc import JSCCCodec, Transmission, constellation_points
from flowcodec.errors import CheckpointError, ConfigError

SHAPE = (16, 8, 8)
KW = {"symbols": 8, "stem": [[16, True]], "hidden": 32, "film": 16, "levels": [2, 4, 8]}


def make(seed: int = 0, film: bool = True, **kw) -> JSCCCodec:
    """A small codec; ``film``: random (not identity) FiLM, so side information matters."""
    torch.manual_seed(seed)
    codec = build_codec("jscc", SHAPE, **{**KW, **kw}).eval()
    if film:
        with torch.no_grad():
            for f in (codec.film_a, codec.film_s):
                f.net[2].weight.normal_(0, 0.5)
    return codec


def features(n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed)) * 3


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- the power constraint ---------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.floats(1e-3, 1e3), st.data())
def test_every_sample_has_exactly_unit_energy_per_sent_symbol(batch, scale, data):
    codec = make()
    uses = data.draw(st.lists(st.integers(1, 8), min_size=batch, max_size=batch))
    snrs = data.draw(st.lists(st.floats(-5, 20), min_size=batch, max_size=batch))
    h = features(batch, seed=data.draw(st.integers(0, 1000))) * scale
    tx = codec.encode(h, torch.tensor(snrs), torch.tensor(uses))
    assert tx.symbols.dtype == torch.complex64
    energy = tx.symbols.abs().square().sum(1).double()
    assert torch.allclose(energy, torch.tensor(uses, dtype=torch.float64), rtol=1e-5)
    assert not tx.symbols[~tx.mask].abs().any()  # nothing past the channel uses
    assert tx.uses.tolist() == uses and tx.channel_uses == sum(uses)


def test_power_is_exact_in_training_mode_and_for_tiny_features():
    codec = make().train()
    for h in (features(5), features(5) * 1e-6, torch.zeros(5, *SHAPE)):
        tx = codec.encode(h, 3.0, 8)
        assert torch.allclose(tx.symbols.abs().square().sum(1), torch.full((5,), 8.0),
                              rtol=1e-5)  # fmt: skip


def test_discrete_points_have_unit_average_energy_and_qam16_is_sionnas():
    from sionna.phy.mapping import Constellation

    for kind in ("qam16", "psk16", "learned16"):
        codec = make(constellation=kind)
        assert math.isclose(float(codec.points().abs().square().mean()), 1.0, rel_tol=1e-5)
    assert torch.allclose(constellation_points("qam16"), Constellation("qam", 4).points)


# --- gradients, seeds, side information -----------------------------------------------------

@pytest.mark.parametrize("channel", [AWGN(), RayleighBlockFading(coherence_length=2),
                                     OFDMTDLChannel(model="A", speed=3.0)])
@pytest.mark.parametrize("kind", ["analog", "qam16"])
def test_gradients_reach_the_encoder_through_each_channel(channel, kind):
    codec = make(constellation=kind).train()
    out = codec(features(4), snr_db=5.0, channel=channel, generator=gen())
    out.features.square().mean().backward()
    for name in ("g_a.stem.0.weight", "g_a.proj.weight", "film_a.net.2.weight"):
        g = dict(codec.named_parameters())[name].grad
        assert g is not None and bool(g.abs().sum() > 0), name


@pytest.mark.parametrize("kind", ["analog", "learned16"])
def test_seeded_transmissions_repeat_bit_for_bit(kind):
    codec = make(constellation=kind)
    h = features(6)
    for ch in (AWGN(), RayleighBlockFading()):
        a, ta = codec.transmit(h, ch, torch.linspace(-5, 20, 6), 4, gen(3))
        b, tb = codec.transmit(h, ch, torch.linspace(-5, 20, 6), 4, gen(3))
        c, _ = codec.transmit(h, ch, torch.linspace(-5, 20, 6), 4, gen(4))
        assert torch.equal(a, b) and torch.equal(ta.symbols, tb.symbols)
        assert not torch.equal(a, c)  # another seed, another channel draw


def test_seeded_training_repeats_bit_for_bit(digits, digits_family):
    from flowcodec.codecs.jscc_train import JSCCTrainConfig, train_jscc

    states = []
    for noise in (1, 2):
        torch.manual_seed(0)  # the same starting weights
        codec = build_codec("jscc", digits_family.feature_shape(2), symbols=4,
                            stem=[[32, True]], hidden=16, film=8, levels=[2, 4])  # fmt: skip
        torch.manual_seed(noise)  # train_jscc seeds itself: the global RNG must not matter
        cfg = JSCCTrainConfig(epochs=1, batch_size=64, max_steps=3, seed=7,
                              channels={"awgn": 1.0, "rayleigh": 1.0})  # fmt: skip
        train_jscc(codec, digits_family, 3, 2, digits[0], None, cfg, progress=False)
        states.append(codec.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert bool(states[0]["film_a.net.2.weight"].abs().sum() > 0)  # trained (it starts at 0)


def test_snr_side_information_changes_the_symbols_and_the_features():
    codec = make()
    h = features(3)
    t0, t1 = codec.encode(h, 0.0, 8), codec.encode(h, 15.0, 8)
    assert not torch.allclose(t0.symbols, t1.symbols)
    # the same received symbols decode differently when the receiver is told another SNR
    rx = t0.symbols
    f0 = codec.decode(rx, t0)
    f1 = codec.decode(rx, Transmission(rx, t0.uses, torch.full((3,), 15.0)))
    assert not torch.allclose(f0, f1)


def test_a_fresh_film_is_the_identity():
    codec = make(film=False)
    h = features(2)
    assert torch.equal(codec.encode(h, -5.0, 8).symbols, codec.encode(h, 20.0, 8).symbols)


def test_schedule_picks_the_channel_uses_per_snr_and_records_them():
    codec = make(schedule=[[-100, 8], [5, 4], [15, 2]])
    assert [codec.uses_for(s) for s in (-5, 4.9, 5, 14, 15, 30)] == [8, 8, 4, 4, 2, 2]
    tx = codec.encode(features(3), torch.tensor([0.0, 10.0, 20.0]))
    assert tx.uses.tolist() == [8, 4, 2]
    assert tx.snr_db.tolist() == [0.0, 10.0, 20.0]
    below = make(schedule=[[0, 4], [10, 2]])
    assert below.uses_for(-20) == 4  # below every entry: the first entry's uses


def test_mismatch_sends_at_the_true_snr_while_the_codec_is_told_another():
    codec = make()
    h = features(4)
    a, ta = codec.transmit(h, AWGN(), 10.0, 8, gen(1), true_snr_db=-5.0)
    b, _ = codec.transmit(h, AWGN(), 10.0, 8, gen(1))
    assert ta.snr_db.tolist() == [10.0] * 4
    assert not torch.allclose(a, b)


# --- errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda c: c.encode(torch.rand(2, 16, 8, 4)),                      # wrong shape
    lambda c: c.encode(torch.ones(2, *SHAPE, dtype=torch.long)),      # integer features
    lambda c: c.encode(torch.full((2, *SHAPE), math.nan)),            # NaN features
    lambda c: c.encode(features(2), snr_db=math.nan),
    lambda c: c.encode(features(2), snr_db=100.0),                    # outside the range
    lambda c: c.encode(features(2), snr_db=torch.zeros(3)),           # one per sample
    lambda c: c.encode(features(2), snr_db="10"),
    lambda c: c.encode(features(2), uses=0),
    lambda c: c.encode(features(2), uses=9),
    lambda c: c.encode(features(2), uses=2.5),
    lambda c: c.decode(torch.zeros(2, 8), c.encode(features(2))),     # not complex
    lambda c: c.decode(torch.zeros(2, 7, dtype=torch.complex64), c.encode(features(2))),
    lambda c: c.equalize("awgn", c.encode(features(2))),
    lambda c: c.compress(features(2)),                                # analog: no bytes
    lambda c: c.points(),
])  # fmt: skip
def test_bad_inputs_are_named_config_errors(call):
    with pytest.raises(ConfigError):
        call(make())


@pytest.mark.parametrize("kw", [{"symbols": 0}, {"symbols": 5000}, {"constellation": "qam64"},
                                {"levels": [9]}, {"levels": []}, {"schedule": [[0, 0]]},
                                {"schedule": [["x", 2]]}, {"tau": 0}, {"hidden": True},
                                {"stem": []}])  # fmt: skip
def test_bad_configurations_are_config_errors(kw):
    with pytest.raises(ConfigError):
        build_codec("jscc", SHAPE, **{**KW, **kw})
    with pytest.raises(ConfigError):
        build_codec("jscc", (16, 7, 8))


def test_ofdm_takes_one_snr_per_batch():
    with pytest.raises(ConfigError, match="one SNR"):
        make().transmit(features(2), OFDMTDLChannel(), torch.tensor([0.0, 5.0]))


# --- registry, FLOPs, checkpoints -----------------------------------------------------------

def test_registered_with_encoder_flops():
    assert CODECS["jscc"] is JSCCCodec
    codec = make()
    flops = codec.encoder_flops()
    stem = 2 * 16 * 16 * 9 * 8 * 8  # the 3x3 convolution alone
    assert flops > stem


@pytest.mark.parametrize("kind", ["analog", "learned16"])
def test_checkpoints_round_trip(tmp_path, kind):
    codec = make(constellation=kind, schedule=[[-10, 8], [10, 4]])
    kwargs = {**KW, "constellation": kind, "schedule": [[-10, 8], [10, 4]]}
    save_codec(codec, tmp_path / "j", kwargs, half=False)
    back = load_codec(tmp_path / "j")
    assert isinstance(back, JSCCCodec) and back.config() == codec.config()
    h = features(3)
    a, _ = codec.transmit(h, AWGN(), 5.0, None, gen(2))
    b, _ = back.transmit(h, AWGN(), 5.0, None, gen(2))
    assert torch.equal(a, b)
    raw = bytearray((tmp_path / "j.safetensors").read_bytes())
    raw[-3] ^= 1
    (tmp_path / "j.safetensors").write_bytes(bytes(raw))
    with pytest.raises(CheckpointError):
        load_codec(tmp_path / "j")


def test_warm_start_from_a_task_codec_copies_and_prunes():
    task = build_codec("task", SHAPE, latent=16, stem=[[16, True]], hidden=64, rates=2)
    codec = make(hidden=32)
    copied = codec.load_task_codec(task)
    assert "g_a.stem.0.weight" in copied and "g_a.proj.weight" in copied
    assert "g_s.mlp.2.weight" in copied  # 64 hidden units pruned to the 32 strongest
    assert torch.equal(codec.g_a.proj.weight, task.g_a.proj.weight)
    w = task.g_s.mlp[0].weight
    rows = {tuple(r.tolist()) for r in w}
    assert all(tuple(r.tolist()) in rows for r in codec.g_s.mlp[0].weight)


# --- the discrete variant: uncoded link and bytes -------------------------------------------

def test_uncoded_qam_at_high_snr_equals_the_noiseless_decode():
    codec = make(constellation="qam16")
    h = features(4)
    tx = codec.encode(h, 30.0, 6)
    clean = codec.decode(tx.symbols, tx)
    f, tx2 = codec.send_uncoded(h, AWGN(), 30.0, 6, gen(0), true_snr_db=40.0)
    assert torch.equal(tx2.indices, tx.indices)
    assert torch.allclose(f, clean, atol=1e-5)
    g, _ = codec.send_uncoded(h, AWGN(), 30.0, 6, gen(0), true_snr_db=-5.0)
    assert not torch.allclose(g, clean)  # at -5 dB hard decisions go wrong


def test_discrete_bytes_round_trip_and_carry_four_bits_per_symbol():
    codec = make(constellation="psk16")
    h = features(3)
    streams = codec.compress(h, snr_db=7.5, uses=5)
    assert [len(s.packets[0]) for s in streams] == [3, 3, 3]
    again = [Bitstream.from_bytes(s.to_bytes()) for s in streams]
    tx = codec.encode(h, 7.5, 5)
    assert torch.allclose(codec.decompress(again), codec.decode(tx.symbols, tx), atol=1e-5)
    lost = codec.decompress([Bitstream(streams[0].header, [None])])
    assert torch.equal(lost[0], codec.conceal)


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=8), st.binary(min_size=0, max_size=12))
def test_hostile_discrete_streams_are_bitstream_errors_or_decode(meta, payload):
    codec = make(constellation="qam16")
    good = codec.compress(features(1), uses=4)[0]
    from flowcodec.bitstream import Header

    hd = good.header
    bad = Bitstream(Header(hd.codec, hd.fingerprint, hd.tensors, meta), [payload])
    try:
        out = codec.decompress([bad])
    except BitstreamError:
        return
    assert out.shape == (1, *SHAPE) and bool(torch.isfinite(out).all())


# --- in the flow ------------------------------------------------------------------------------

def test_a_hop_carries_an_analog_codec_and_channel_uses_set_the_time():
    from channels import IIDPacketErasure
    from flowcodec.family import build_family
    from flowcodec.pipeline import Flow, Hop, Tier

    fam = build_family("digits").eval()
    codec = build_codec("jscc", fam.feature_shape(2), symbols=8, stem=[[32, True]], hidden=16,
                        film=8, schedule=[[-100, 8], [10, 4]]).eval()  # fmt: skip
    x = torch.randn(3, *fam.input_shape, generator=gen(0))
    tiers = [Tier("device", 1e9, point=2), Tier("cloud", 1e12, point=3)]
    for snr, uses in ((0.0, 8), (12.0, 4)):
        flow = Flow(fam, tiers, [Hop(codec, AWGN(), symbol_rate=1e6, delay_s=0.001,
                                     snr_db=snr)])  # fmt: skip
        res = flow.run(x, generator=gen(1))
        again = flow.run(x, generator=gen(1))
        assert torch.equal(res.logits, again.logits)
        for tr in res.traces:
            hop = tr.hops[0]
            assert (hop.bits, hop.channel_uses, hop.packets) == (0, uses, 0)
            assert math.isclose(hop.tx_time_s, uses / 1e6 + 0.001)
    ofdm = OFDMTDLChannel()
    res = Flow(fam, tiers, [Hop(codec, ofdm, symbol_rate=1e6, snr_db=0.0)]).run(x)
    assert res.traces[0].hops[0].channel_uses == ofdm.channel_uses(8)  # whole OFDM grids
    with pytest.raises(ConfigError, match="AnalogChannel"):
        Hop(codec, IIDPacketErasure(0.1), symbol_rate=1e6, snr_db=0.0)
    with pytest.raises(ConfigError, match="snr_db"):
        Hop(codec, AWGN(), symbol_rate=1e6)


def test_the_shipped_jscc_codec_loads_sends_and_fits_on_the_device():
    from flowcodec.codecs import load_pretrained_codec
    from flowcodec.family import build_family

    codec = load_pretrained_codec("cifar10-jscc_p2")
    fam = build_family("cifar10")
    assert codec.feature_shape == fam.feature_shape(2) and codec.symbols == 16
    info = fam.info()
    assert fam.head_flops(2) + codec.encoder_flops() <= 1.05 * info[1].flops
    h = torch.rand(3, *codec.feature_shape, generator=gen(0))
    for snr in (-5.0, 20.0):
        tx = codec.encode(h, snr)
        assert tx.uses.tolist() == [codec.uses_for(snr)] * 3
        assert torch.allclose(tx.symbols.abs().square().sum(1), tx.uses.float(), rtol=1e-5)
    assert codec.uses_for(-5.0) >= codec.uses_for(20.0)  # fewer symbols on a good channel


@pytest.mark.parametrize("mode", [True, False])
def test_counting_encoder_flops_keeps_the_codec_in_its_mode(mode):
    codec = build_codec("jscc", SHAPE, **KW).train(mode)
    assert codec.encoder_flops() > 0
    assert codec.training is mode and all(m.training is mode for m in codec.modules())


# --- several input views in one transmission -------------------------------------------------

@pytest.mark.parametrize("kind", ["analog", "qam16"])
def test_views_fuse_into_one_transmission_of_the_same_channel_uses(kind):
    """views=2 takes both views' features stacked on the channel axis and sends as many
    symbols as one view (unit energy per symbol); identical views send what one sends."""
    one = make(constellation=kind)
    two = make(constellation=kind, views=2)
    assert two.input_shape == (32, 8, 8) and two.config()["views"] == 2
    assert "views" not in one.config()
    h, g = features(4), features(4, seed=9)
    same = two.encode(torch.cat([h, h], 1), 5.0, 6)
    assert torch.allclose(same.symbols, one.encode(h, 5.0, 6).symbols, atol=1e-6)
    tx = two.encode(torch.cat([h, g], 1), 5.0, torch.tensor([1, 3, 6, 8]))
    assert tx.symbols.shape == (4, 8) and tx.uses.tolist() == [1, 3, 6, 8]
    energy = tx.symbols.abs().square().sum(1)
    if kind == "analog":
        assert torch.allclose(energy, torch.tensor([1.0, 3.0, 6.0, 8.0]), rtol=1e-5)
        # the mean of the views' unit-power symbols, back to unit power
        a, b = one.encode(h, 5.0, 6).symbols, one.encode(g, 5.0, 6).symbols
        m = (a + b) / 2
        m = m * (6 / m.abs().square().sum(1, keepdim=True)).sqrt()
        assert torch.allclose(two.encode(torch.cat([h, g], 1), 5.0, 6).symbols, m, atol=1e-5)
    assert not tx.symbols[~tx.mask].abs().any()
    feats, _ = two.transmit(torch.cat([h, g], 1), AWGN(), 5.0, None, gen(1))
    assert feats.shape == (4, *SHAPE)  # one view's features at the receiver


def test_views_check_the_stacked_shape_and_keep_the_weights():
    codec = make(views=3)
    with pytest.raises(ConfigError, match="3 views"):
        codec.encode(features(2), 5.0)
    with pytest.raises(ConfigError, match="views"):
        codec.set_views(5)
    with pytest.raises(ConfigError, match="views"):
        make(views=0)
    before = {k: v.clone() for k, v in codec.state_dict().items()}
    assert codec.set_views(1).input_shape == SHAPE
    assert all(torch.equal(before[k], v) for k, v in codec.state_dict().items())
    codec.fit(features(6))  # concealment from one view's features
    assert torch.allclose(codec.conceal, features(6).float().mean(0))
    assert make(views=2).encoder_flops() == 2 * make().encoder_flops()


def test_views_round_trip_in_a_checkpoint(tmp_path):
    codec = make(views=2)
    save_codec(codec, tmp_path / "v", {**KW, "views": 2}, half=False)
    back = load_codec(tmp_path / "v")
    assert back.views == 2 and back.config() == codec.config()
    h = torch.cat([features(3), features(3, seed=4)], 1)
    a, _ = codec.transmit(h, AWGN(), 0.0, None, gen(3))
    b, _ = back.transmit(h, AWGN(), 0.0, None, gen(3))
    assert torch.equal(a, b)


def test_training_with_views_sends_every_view_and_evaluates(digits, digits_family):
    """train_jscc and eval_jscc hand a multi-view codec the stacked features of its views
    (device_features); the distillation target stays the input's own features."""
    from flowcodec.codecs.jscc_train import JSCCTrainConfig, eval_jscc, train_jscc

    torch.manual_seed(0)
    codec = build_codec("jscc", digits_family.feature_shape(2), symbols=4, stem=[[32, True]],
                        hidden=16, film=8, levels=[2, 4], views=2)  # fmt: skip
    before = {k: v.clone() for k, v in codec.state_dict().items()}
    cfg = JSCCTrainConfig(epochs=1, batch_size=64, max_steps=2, seed=1, channels={"awgn": 1.0})
    train_jscc(codec, digits_family, 3, 2, digits[0], None, cfg, progress=False)
    assert codec.views == 2
    assert any(not torch.equal(before[k], v) for k, v in codec.state_dict().items())
    head, tail = digits_family.split(3, 2)
    res = eval_jscc(codec, head, tail, digits[1], [10.0], uses=4, n=50)
    assert res[0]["uses"] == 4.0 and 0.0 <= res[0]["accuracy"] <= 1.0


def test_a_hop_carries_a_multi_view_codec_with_one_views_channel_uses():
    """A flow whose first hop is a views=2 JSCC codec: the device runs its stages on the
    mirror image too (its FLOPs), the hop spends one view's channel uses, and the logits
    are the tail of the fused transmission."""
    from flowcodec.family import build_family
    from flowcodec.pipeline import Flow, Hop, Tier
    from flowcodec.views import view_features

    fam = build_family("digits").eval()
    torch.manual_seed(0)
    two = build_codec("jscc", fam.feature_shape(2), symbols=8, stem=[[32, True]], hidden=16,
                      film=8, views=2).eval()  # fmt: skip
    one = build_codec("jscc", fam.feature_shape(2), symbols=8, stem=[[32, True]], hidden=16,
                      film=8).eval()  # fmt: skip
    one.load_state_dict(two.state_dict())
    x = torch.randn(3, *fam.input_shape, generator=gen(0))
    tiers = [Tier("device", 1e9, point=2), Tier("cloud", 1e12, point=3)]
    res, res1 = (Flow(fam, tiers, [Hop(c, AWGN(), symbol_rate=1e6, snr_db=30.0)]).run(
        x, generator=gen(1)) for c in (two, one))  # fmt: skip
    head, tail = fam.split(3, 2)
    feats, _ = two.transmit(view_features(head, x, 2), AWGN(), 30.0, None, gen(1))
    assert torch.allclose(res.logits, tail(feats), atol=1e-4)
    for tr, tr1 in zip(res.traces, res1.traces):
        assert tr.hops[0].channel_uses == tr1.hops[0].channel_uses == 8
        assert tr.compute_flops["device"] > tr1.compute_flops["device"]
