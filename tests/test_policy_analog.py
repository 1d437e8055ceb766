"""The policy chooses analog (JSCC) or digital per SNR: profiling of analog options on the
digits family, hand-made profiles whose choices can be checked by hand, the decisions'
fields, JSON round trips, old profiles, and the latency run's analog hop."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowcodec.codecs import build_codec
from flowcodec.errors import ConfigError
from flowcodec.policy import (
    LOSS_GRID,
    Policy,
    Profile,
    RatePoint,
    build_profile,
    channel_uses,
    toy_profile,
)

POINT = 2


@pytest.fixture(scope="module")
def small_data(digits):
    return digits[1].subset(120, seed=0)


def _jscc(fam, seed=0):
    torch.manual_seed(seed)
    return build_codec("jscc", fam.feature_shape(POINT), symbols=8, stem=[[32, True]],
                       hidden=16, film=8, schedule=[[-100, 8], [10, 4]]).eval()  # fmt: skip


@pytest.fixture(scope="module")
def measured(digits_family, small_data):
    fam = digits_family.eval()
    codecs = {(POINT, "raw"): build_codec("raw", fam.feature_shape(POINT), dtype="float16").eval(),
              (POINT, "jscc"): _jscc(fam)}  # fmt: skip
    kw = dict(thresholds=(None, 0.9), snr_grid=(-5.0, 5.0, 20.0, 60.0), progress=False,
              batch_size=60, seed=3, loss_grid=(0.0, 0.5, 1.0))  # fmt: skip
    return fam, codecs, build_profile(fam, fam.num_members, codecs, small_data, **kw), kw


# --- profiling -------------------------------------------------------------------------------
def test_build_profile_measures_analog_options_on_the_snr_grid(measured, small_data):
    fam, codecs, prof, _ = measured
    dig, ana = prof.options
    assert not any(c.training for c in codecs.values())  # profiling keeps the eval mode
    assert (dig.kind, dig.snr_grid, dig.analog_uses, dig.uses_schedule) == ("digital", [], 0, [])
    assert dig.packet_bytes and len(dig.accuracy["none"]) == 3 == len(prof.loss_grid)
    assert ana.kind == "analog" and ana.is_analog and ana.packet_bytes == []
    assert ana.snr_grid == [-5.0, 5.0, 20.0, 60.0] and ana.analog_uses == 8
    assert sorted(ana.accuracy) == ["0.9", "none"]
    assert all(len(v) == 4 and all(0 <= a <= 1 for a in v) for v in ana.accuracy.values())
    # The schedule's channel uses: 8 below 10 dB, 4 from there.
    assert [ana.uses_at(s) for s in (-20.0, 0.0, 9.99, 10.0, 30.0)] == [8, 8, 8, 4, 4]
    # The device exit does not depend on the codec: same share for both options.
    assert ana.exit_fraction == dig.exit_fraction and 0 < ana.exit_fraction["0.9"] < 1
    assert ana.device_flops == fam.head_flops(POINT) + codecs[(POINT, "jscc")].encoder_flops()
    codecs[(POINT, "jscc")].eval()  # counting FLOPs leaves a JSCC codec in training mode
    # At 60 dB the channel adds (almost) nothing: the accuracy is the noiseless decode's.
    head, tail = fam.split(fam.num_members, POINT)
    codec = codecs[(POINT, "jscc")]
    with torch.no_grad():
        h = head(small_data.normalize(small_data.images))
        tx = codec.encode(h, snr_db=60.0)
        clean = float((tail(codec.decode(tx.symbols, tx)).argmax(1)
                       == small_data.labels).float().mean())  # fmt: skip
    assert ana.accuracy["none"][-1] == pytest.approx(clean, abs=2 / len(small_data))


def test_analog_profiles_repeat_with_the_seed(measured, small_data):
    fam, codecs, prof, kw = measured
    jscc = {(POINT, "jscc"): codecs[(POINT, "jscc")]}
    one, again = (build_profile(fam, fam.num_members, jscc, small_data, **kw) for _ in "ab")
    assert one.options == again.options


def test_build_profile_rejects_bad_snr_grids(measured, small_data):
    fam, codecs, _, kw = measured
    for grid in ((5.0, 0.0), (0.0, 0.0), (0.0, math.nan), ()):
        with pytest.raises(ConfigError, match="snr_grid"):
            build_profile(fam, fam.num_members, codecs, small_data, **{**kw, "snr_grid": grid})


# --- hand-made profiles ----------------------------------------------------------------------
def _digital(acc_clean=0.9):
    # Features at point 1 in two small packets; the cliff: 10 % accuracy when all is lost.
    acc = list(np.interp(LOSS_GRID, [0, 1], [acc_clean, 0.1]))
    return RatePoint(1, "digital", [40, 60], 1_000_000, 0, 2_000_000, {"none": acc},
                     {"none": 0.0})  # fmt: skip


def _analog(uses=2000, acc=(0.72, 0.75, 0.78, 0.8, 0.8)):
    return RatePoint(1, "jscc", [], 1_200_000, 0, 2_100_000, {"none": list(acc)},
                     {"none": 0.0}, kind="analog", analog_uses=uses,
                     snr_grid=[-10.0, -5.0, 0.0, 10.0, 20.0],
                     uses_schedule=[[-1e9, uses]])  # fmt: skip


def _profile():
    return Profile([_digital(), _analog()], list(LOSS_GRID))


def test_analog_at_low_snr_digital_at_high_snr():
    pol = Policy(_profile(), accuracy_floor=0.7, device_flops_per_s=1e9,
                 remote_flops_per_s=1e12, delay_s=0.001)  # fmt: skip
    low, high = pol.decide(-8.0, 1e6), pol.decide(20.0, 1e6)
    assert (low.kind, low.rate, low.mcs, low.feasible) == ("analog", "jscc", None, True)
    assert (high.kind, high.rate, high.feasible) == ("digital", "digital", True)
    assert isinstance(high.mcs, int)
    # One switch along a rising SNR: the digital chain's uses fall, the analog ones do not.
    trace = np.arange(-8.0, 25.1, 0.5)
    kinds = [d.kind for d in pol.track(trace, 1e6)]
    switch = kinds.index("digital")
    assert kinds[:switch] == ["analog"] * switch and set(kinds[switch:]) == {"digital"}
    assert 0 < switch < len(kinds) - 1
    # A floor the analog option cannot reach leaves the digital chain at every SNR where
    # it works, and the most accurate option (flagged) where nothing does.
    strict = Policy(_profile(), accuracy_floor=0.85)
    assert strict.decide(20.0, 1e6).kind == "digital"
    d = strict.decide(-8.0, 1e6)
    assert (d.kind, d.feasible) == ("analog", False)


def test_a_faster_analog_option_wins_where_both_keep_the_floor():
    prof = Profile([_digital(), _analog(uses=16, acc=(0.85,) * 5)], list(LOSS_GRID))
    pol = Policy(prof, accuracy_floor=0.8)
    assert {d.kind for d in pol.track([-8.0, 0.0, 10.0, 20.0], 1e6)} == {"analog"}


def test_analog_decision_fields_match_a_hand_computation():
    pol = Policy(_profile(), accuracy_floor=0.7, device_flops_per_s=1e9,
                 remote_flops_per_s=1e12, delay_s=0.001)  # fmt: skip
    opt = _profile().options[1]
    acc, lat, loss = pol.evaluate(opt, None, None, 5.0, 1e6)
    assert acc == pytest.approx(0.79)  # halfway between 0.78 at 0 dB and 0.8 at 10 dB
    assert lat == pytest.approx(1.2e6 / 1e9 + 2000 / 1e6 + 0.001 + 2.1e6 / 1e12)
    assert loss == 0.0
    # Outside the grid the ends hold.
    assert pol.evaluate(opt, None, None, -30.0, 1e6)[0] == pytest.approx(0.72)
    d = pol.decide(-8.0, 1e6)
    assert (d.point, d.rate, d.mcs, d.threshold, d.packet_loss) == (1, "jscc", None, None, 0)
    assert (d.kind, d.channel_uses) == ("analog", 2000)
    assert d.expected_accuracy == pytest.approx(float(np.interp(-8, [-10, -5], [0.72, 0.75])))
    assert d.decide_time_s > 0
    dig = pol.decide(20.0, 1e6)
    assert dig.channel_uses == channel_uses(40, dig.mcs) + channel_uses(60, dig.mcs)


def test_analog_uses_follow_the_schedule_in_the_decision():
    opt = _analog(uses=8)
    opt.uses_schedule = [[-1e9, 8], [10.0, 4]]
    pol = Policy(Profile([opt], list(LOSS_GRID)), accuracy_floor=0.5)
    for snr, uses in ((0.0, 8), (12.0, 4)):
        d = pol.decide(snr, 1e3)
        assert d.channel_uses == uses
        assert d.expected_latency_s == pytest.approx(1.2e6 / 20e9 + uses / 1e3 + 2.1e6 / 20e12)


def test_bad_analog_options_are_named_errors():
    with pytest.raises(ConfigError, match="kind"):
        RatePoint(1, "x", [], 0, 0, 0, {"none": [1.0]}, {"none": 0.0}, kind="quantum")
    with pytest.raises(ConfigError, match="snr_grid"):
        RatePoint(1, "x", [], 0, 0, 0, {"none": []}, {"none": 0.0}, kind="analog",
                  analog_uses=4)  # fmt: skip
    with pytest.raises(ConfigError, match="snr_grid"):
        RatePoint(1, "x", [], 0, 0, 0, {"none": [1, 1]}, {"none": 0.0}, kind="analog",
                  analog_uses=4, snr_grid=[5.0, 0.0])  # fmt: skip
    with pytest.raises(ConfigError, match="one value per"):
        RatePoint(1, "x", [], 0, 0, 0, {"none": [1.0]}, {"none": 0.0}, kind="analog",
                  analog_uses=4, snr_grid=[0.0, 5.0])  # fmt: skip
    with pytest.raises(ConfigError, match="analog_uses"):
        RatePoint(1, "x", [], 0, 0, 0, {"none": [1.0]}, {"none": 0.0}, kind="analog",
                  snr_grid=[0.0])  # fmt: skip
    with pytest.raises(ConfigError, match="MCS"):
        Policy(_profile(), 0.5).evaluate(_digital(), None, None, 10.0, 1e6)


# --- JSON and old profiles -------------------------------------------------------------------
def test_profile_with_analog_options_round_trips_through_json(tmp_path, measured):
    for prof in (_profile(), measured[2]):
        prof.save(tmp_path / "p.json")
        back = Profile.load(tmp_path / "p.json")
        assert back.options == prof.options and back.loss_grid == prof.loss_grid
        a, b = Policy(prof, 0.7), Policy(back, 0.7)
        for snr in (-8.0, 0.0, 7.0, 20.0):
            assert a.decide(snr, 1e6).__dict__.keys() == b.decide(snr, 1e6).__dict__.keys()
            da, db = a.decide(snr, 1e6), b.decide(snr, 1e6)
            da.decide_time_s = db.decide_time_s = 0.0
            assert da == db


def test_old_profiles_load_as_digital_and_decide_as_before(tmp_path):
    old_fields = ("point", "rate", "packet_bytes", "device_flops", "exit_flops",
                  "remote_flops", "accuracy", "exit_fraction")  # fmt: skip
    prof = toy_profile()
    old = {"loss_grid": prof.loss_grid, "meta": {},
           "options": [{k: asdict(o)[k] for k in old_fields} for o in prof.options]}
    (tmp_path / "old.json").write_text(json.dumps(old))
    back = Profile.load(tmp_path / "old.json")
    assert back.options == prof.options
    assert all(o.kind == "digital" and not o.is_analog for o in back.options)


@settings(max_examples=25, deadline=None)
@given(snr=st.floats(-10, 30), rate=st.sampled_from([1e4, 1e5, 1e6, 1e7]),
       floor=st.floats(0.3, 0.95))  # fmt: skip
def test_an_analog_option_that_never_helps_changes_no_digital_decision(snr, rate, floor):
    useless = _analog(uses=10**9, acc=(0.0,) * 5)
    prof = toy_profile()
    a = Policy(prof, floor).decide(snr, rate)
    b = Policy(Profile(prof.options + [useless], prof.loss_grid), floor).decide(snr, rate)
    a.decide_time_s = b.decide_time_s = 0.0
    assert a == b and a.kind == "digital" and isinstance(a.mcs, int)


# --- the latency run consumes analog decisions -----------------------------------------------
def test_latency_runs_an_analog_choice_through_an_analog_hop(measured, small_data):
    from flowcodec.latency import _best_mcs_for, _matched_input, _run_option

    fam, codecs, prof, _ = measured
    codecs[(POINT, "jscc")].eval()
    comp, delay = {"device": 1e9, "edge": 1e12}, {"edge": 0.002}
    x, y = small_data.normalize(small_data.images), small_data.labels
    g = torch.Generator().manual_seed(0)
    out = _run_option(fam, fam.num_members, codecs[(POINT, "jscc")], POINT, None, None, 12.0,
                      1e6, comp, delay, x, y, g)  # fmt: skip
    assert out["bytes"] == 0 and 0 <= out["accuracy"] <= 1
    assert not codecs[(POINT, "jscc")].training  # the flow ran (and left) it in eval mode
    # The schedule's uses set the time: 8 below 10 dB, 4 from there (1000 symbol/s).
    slow = [_run_option(fam, fam.num_members, codecs[(POINT, "jscc")], POINT, None, None, s,
                        1e3, comp, delay, x, y, g)["latency_ms"] for s in (0.0, 12.0)]  # fmt: skip
    assert slow[0] - slow[1] == pytest.approx(4.0)
    assert slow[1] - out["latency_ms"] == pytest.approx(4.0 - 4e-3)
    with pytest.raises(ConfigError, match="no MCS"):
        _run_option(fam, fam.num_members, codecs[(POINT, "jscc")], POINT, None, 5, 12.0, 1e6,
                    comp, delay, x, y, g)  # fmt: skip
    with pytest.raises(ConfigError, match="needs an MCS"):
        _run_option(fam, fam.num_members, codecs[(POINT, "raw")], POINT, None, None, 12.0,
                    1e6, comp, delay, x, y, g)  # fmt: skip
    pol = Policy(prof, 0.0)
    ana = next(o for o in prof.options if o.is_analog)
    assert _best_mcs_for(pol, ana, 10.0, 1e6) is None
    assert _matched_input(pol, pol.decide(10.0, 1e6), 10.0, 1e6, 100) is None


@pytest.mark.slow
def test_a_trained_analog_option_gains_accuracy_with_snr(digits, digits_family, small_data):
    from flowcodec.codecs.jscc_train import JSCCTrainConfig, train_jscc

    fam = digits_family.eval()
    torch.manual_seed(0)
    codec = build_codec("jscc", fam.feature_shape(POINT), symbols=8, stem=[[32, True]],
                        hidden=32, film=8, levels=[4, 8])  # fmt: skip
    cfg = JSCCTrainConfig(epochs=12, batch_size=64, seed=0, lr=3e-3, stem_lr=3e-3,
                          channels={"awgn": 1.0}, eval_n=64)  # fmt: skip
    train_jscc(codec, fam, fam.num_members, POINT, digits[0], None, cfg, progress=False)
    kw = dict(thresholds=(None,), snr_grid=(-10.0, 0.0, 20.0), progress=False)
    opts = {(POINT, "jscc"): codec.eval()}
    a, b = (build_profile(fam, fam.num_members, opts, small_data, seed=s, **kw).options[0]
            for s in (0, 1))  # fmt: skip
    acc = a.accuracy["none"]
    assert acc[0] + 0.3 < acc[2]  # graceful: more SNR, more accuracy
    assert a.accuracy != b.accuracy  # another seed, another noise draw
    pol = Policy(Profile([a], list(LOSS_GRID)), accuracy_floor=0.5 * (acc[0] + acc[2]))
    assert [d.feasible for d in pol.track([-10.0, 20.0], 1e6)] == [False, True]
    # The latency run's analog hop scores what the profile measured (same images).
    from flowcodec.latency import _run_option

    x, y = small_data.normalize(small_data.images), small_data.labels
    run = _run_option(fam, fam.num_members, codec, POINT, None, None, 20.0, 1e6,
                      {"device": 1e9, "edge": 1e12}, {"edge": 0.0}, x, y,
                      torch.Generator().manual_seed(0))  # fmt: skip
    assert run["accuracy"] == pytest.approx(acc[2], abs=0.05)
