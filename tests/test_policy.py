"""The adaptive policy on a toy profile: choices that can be checked by hand; which member
receives each option of a measured profile."""

from __future__ import annotations

import pytest
from helpers import random_images, raw_codec, tiny_cloud_family, untrained_digits_family

from flowcodec.errors import ConfigError
from flowcodec.policy import (
    Policy,
    Profile,
    build_profile,
    channel_uses,
    option_receivers,
    packet_loss_rate,
    toy_profile,
)


def test_packet_loss_falls_with_snr_and_rises_with_mcs():
    assert packet_loss_rate(300, 9, -5.0) > 0.9
    assert packet_loss_rate(300, 9, 20.0) < 1e-3
    assert packet_loss_rate(300, 0, 0.0) < packet_loss_rate(300, 20, 0.0)


def test_channel_uses_scale_with_bytes_and_inverse_spectral_efficiency():
    assert channel_uses(1000, 0) > channel_uses(1000, 9) > channel_uses(1000, 27)
    assert channel_uses(2000, 9) > channel_uses(1000, 9)


def test_evaluate_matches_hand_computation():
    prof = toy_profile()
    pol = Policy(prof, 0.5, device_flops_per_s=1e9, remote_flops_per_s=1e12, delay_s=0.01)
    opt = prof.options[2]  # point 1, "low": packets of 40 and 60 bytes, exit fraction 0.5
    acc, lat, loss = pol.evaluate(opt, mcs=9, threshold=0.9, snr_db=30.0, symbol_rate=1e6)
    uses = channel_uses(40, 9) + channel_uses(60, 9)
    want = (400e6 + 10e6) / 1e9 + 0.5 * (uses / 1e6 + 0.01 + 1.6e9 / 1e12)
    assert loss < 1e-2  # the tables clamp at their last tabulated (small) BLER
    assert lat == pytest.approx(want)
    assert acc == pytest.approx(0.86 + (0.68 - 0.86) * loss / 0.5, abs=1e-9)


def test_slow_link_prefers_few_bytes_and_early_exits():
    pol = Policy(toy_profile(), accuracy_floor=0.8, delay_s=0.01)
    d = pol.decide(snr_db=15.0, symbol_rate=1e4)
    assert (d.point, d.rate, d.threshold) == (1, "low", 0.9) and d.feasible


def test_fast_link_and_high_floor_send_the_input():
    pol = Policy(toy_profile(), accuracy_floor=0.895, delay_s=0.0)
    d = pol.decide(snr_db=25.0, symbol_rate=1e9)
    assert d.point == 0 and d.feasible and d.expected_accuracy >= 0.895


def test_unreachable_floor_returns_most_accurate_option_flagged():
    d = Policy(toy_profile(), accuracy_floor=0.99).decide(snr_db=20.0, symbol_rate=1e6)
    assert not d.feasible and d.expected_accuracy == pytest.approx(0.90, abs=0.01)


def test_track_redecides_when_snr_drops():
    pol = Policy(toy_profile(), accuracy_floor=0.8, delay_s=0.01)
    ds = pol.track([20.0, 20.0, -3.0], symbol_rate=1e6)
    assert ds[0] == ds[1] or ds[0].mcs == ds[1].mcs
    assert ds[2].mcs < ds[0].mcs  # a lower SNR needs a more robust MCS


def test_profile_round_trip_and_bad_file(tmp_path):
    prof = toy_profile()
    prof.save(tmp_path / "p.json")
    again = Profile.load(tmp_path / "p.json")
    assert again.options == prof.options and again.loss_grid == prof.loss_grid
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a flowcodec profile"):
        Profile.load(tmp_path / "bad.json")


def test_link_adaptation_picks_the_highest_mcs_under_the_target():
    from flowcodec.policy import link_adaptation_mcs

    low, high = link_adaptation_mcs([300], 0.0), link_adaptation_mcs([300], 15.0)
    assert low < high
    assert packet_loss_rate(300, high, 15.0) <= 0.1
    if high < 28:
        assert packet_loss_rate(300, high + 1, 15.0) > 0.1
    assert link_adaptation_mcs([300], -30.0) == 0  # nothing qualifies: the most robust


# --- who receives each option (a branching family) ------------------------------------------
_KW = dict(loss_grid=(0.0, 1.0), thresholds=(None, 0.5), progress=False, batch_size=12)


def test_each_option_is_received_by_the_largest_member_through_its_point():
    fam = tiny_cloud_family()  # member 4 branches after stage 1: path [0, 1, 4]
    data = random_images(fam.input_shape)
    opts = {(1, "raw"): raw_codec(fam, 1), (2, "raw"): raw_codec(fam, 2)}
    assert option_receivers(fam, None, list(opts)) == {(1, "raw"): 4, (2, "raw"): 3}
    prof = build_profile(fam, None, opts, data, **_KW)
    assert [(o.point, o.receiver) for o in prof.options] == [(1, 4), (2, 3)]
    assert prof.meta["member"] is None
    # Each option measures what its receiver alone measures (loss 0 or 1: no draw matters).
    for o in prof.options:
        alone = build_profile(fam, o.receiver, {(o.point, "raw"): opts[(o.point, "raw")]}, data,
                              **_KW).options[0]  # fmt: skip
        assert (o.accuracy, o.remote_flops) == (alone.accuracy, alone.remote_flops)
    assert prof.options[0].remote_flops != build_profile(
        fam, 3, {(1, "raw"): opts[(1, "raw")]}, data, **_KW).options[0].remote_flops


def test_an_explicit_member_off_an_options_point_names_the_option_and_the_receiver():
    fam = tiny_cloud_family()
    opts = {(1, "raw"): raw_codec(fam, 1), (2, "raw"): raw_codec(fam, 2)}
    with pytest.raises(ConfigError, match=r"member 4 passes through split points \[0, 1, 4\] "
                                          r"only: option \(point 2, rate 'raw'\) is sent from "
                                          r"point 2, off its path \(family.receiver\(2\) = "
                                          r"member 3"):  # fmt: skip
        build_profile(fam, 4, opts, random_images(fam.input_shape), **_KW)


def test_a_chain_family_profiles_with_its_last_member_as_before():
    fam = untrained_digits_family()
    data = random_images(fam.input_shape)
    opts = {(1, "raw"): raw_codec(fam, 1), (2, "raw"): raw_codec(fam, 2)}
    kw = {**_KW, "loss_grid": (0.0, 0.5, 1.0)}  # random drops: the same seeded draws
    default, last = (build_profile(fam, m, opts, data, **kw) for m in (None, fam.num_members))
    assert default.options == last.options
    assert {o.receiver for o in default.options} == {fam.num_members}
