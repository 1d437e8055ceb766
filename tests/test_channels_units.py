"""channels.units: conversions, capacities and the normal approximation."""

import math

import numpy as np
import pytest

from channels import ChannelError
from channels.units import (
    awgn_capacity,
    biawgn_capacity_dispersion,
    db2lin,
    ebno_to_esno,
    esno_to_ebno,
    lin2db,
    normal_approximation_rate,
    normal_approximation_snr,
    qam_bicm_capacity,
    rayleigh_bpsk_ber,
    snr_db_to_noise_var,
    uncoded_ber,
)


def test_db_round_trip():
    x = np.array([-10.0, 0.0, 3.0, 17.5])
    assert np.allclose(lin2db(db2lin(x)), x)
    assert db2lin(10.0) == pytest.approx(10.0)
    assert snr_db_to_noise_var(20.0) == pytest.approx(0.01)


def test_ebno_esno():
    assert ebno_to_esno(0.0, 2, 0.5) == pytest.approx(0.0)
    assert ebno_to_esno(1.0, 4, 0.5) == pytest.approx(1.0 + 10 * math.log10(2))
    assert esno_to_ebno(ebno_to_esno(3.3, 6, 0.7), 6, 0.7) == pytest.approx(3.3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_rejected(bad):
    with pytest.raises(ChannelError):
        db2lin(bad)
    with pytest.raises(ChannelError):
        awgn_capacity(bad)


def test_bad_arguments():
    with pytest.raises(ChannelError):
        lin2db(0.0)
    with pytest.raises(ChannelError):
        ebno_to_esno(0.0, 0, 0.5)
    with pytest.raises(ChannelError):
        ebno_to_esno(0.0, 2, 1.5)
    with pytest.raises(ChannelError):
        qam_bicm_capacity(0.0, 3)
    with pytest.raises(ChannelError):
        normal_approximation_snr(100, 1000, 1e-2, "qpsk")  # rate 10 > 2 bit/use
    with pytest.raises(ChannelError):
        normal_approximation_rate(0.0, 100, 1.5)


def test_awgn_capacity():
    assert awgn_capacity(0.0) == pytest.approx(1.0)
    assert awgn_capacity(10 * math.log10(3)) == pytest.approx(2.0)


def test_bicm_capacity_bounds_and_limits():
    snrs = np.array([-5.0, 0.0, 5.0, 10.0, 20.0, 30.0])
    for m in (2, 4, 6):
        c = qam_bicm_capacity(snrs, m)
        assert np.all(np.diff(c) > -1e-12), "capacity grows with SNR"
        assert np.all(np.diff(c[:4]) > 0)
        assert np.all(c <= awgn_capacity(snrs) + 1e-9), "below Shannon"
        assert np.all(c <= m + 1e-9)
    assert qam_bicm_capacity(30.0, 4) == pytest.approx(4.0, abs=1e-3)
    assert qam_bicm_capacity(35.0, 6) == pytest.approx(6.0, abs=1e-3)


def test_qpsk_is_two_biawgn():
    for s in (-3.0, 0.0, 4.0):
        c_bi, _ = biawgn_capacity_dispersion(db2lin(s))
        assert qam_bicm_capacity(s, 2) == pytest.approx(2 * c_bi, abs=2e-3)


def test_normal_approximation_properties():
    # The finite-length SNR is above the capacity SNR and approaches it as n grows.
    snr_inf = 10 * math.log10(2 ** 1.0 - 1)  # Gaussian input, 1 bit per use
    prev = math.inf
    for n in (100, 1000, 10000):
        s = normal_approximation_snr(n, n, 1e-3, "gaussian")
        assert snr_inf < s < prev
        prev = s
    # QPSK needs more SNR than Gaussian input at the same (n, k, eps)
    assert normal_approximation_snr(512, 512, 1e-2, "qpsk") > \
        normal_approximation_snr(512, 512, 1e-2, "gaussian")
    # the returned SNR solves the rate equation
    s = normal_approximation_snr(512, 512, 1e-2, "qpsk")
    assert normal_approximation_rate(s, 512, 1e-2, "qpsk") == pytest.approx(512, abs=1e-3)


def test_closed_form_ber_values():
    assert uncoded_ber(10 * math.log10(0.5 * 9.0), 1) == pytest.approx(
        0.5 * math.erfc(3 / math.sqrt(2)), rel=1e-9)
    assert uncoded_ber(0.0, 2) == pytest.approx(0.158655, rel=1e-4)
    assert rayleigh_bpsk_ber(10.0) == pytest.approx(0.5 * (1 - math.sqrt(10 / 11)))
    with pytest.raises(ChannelError):
        uncoded_ber(0.0, 6)
