"""SNR conventions, unit conversions, capacities and finite-length limits.

Convention used across :mod:`channels`: ``snr_db`` is Es/N0 per complex symbol in dB,
with unit average symbol energy (Es = 1), so the complex noise variance is
``N0 = 10 ** (-snr_db / 10)``. Names that mean Eb/N0 say so (``ebno_db``).
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np
from scipy.optimize import brentq
from scipy.special import erfc

from channels._errors import ChannelError

__all__ = [
    "db2lin",
    "lin2db",
    "ebno_to_esno",
    "esno_to_ebno",
    "snr_db_to_noise_var",
    "awgn_capacity",
    "qam_bicm_capacity",
    "biawgn_capacity_dispersion",
    "normal_approximation_snr",
    "normal_approximation_rate",
    "qfunc",
    "uncoded_ber",
    "rayleigh_bpsk_ber",
]

_LOG2E = math.log2(math.e)


def _check_finite(name: str, value) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise ChannelError(f"{name} must be finite, got {value!r}")
    return arr


def _out(arr: np.ndarray):
    return float(arr) if arr.ndim == 0 else arr


def db2lin(x_db):
    """Decibels to linear power ratio: ``10 ** (x_db / 10)``. Scalar or array in, same out."""
    return _out(10.0 ** (_check_finite("x_db", x_db) / 10.0))


def lin2db(x):
    """Linear power ratio (> 0) to decibels: ``10 * log10(x)``."""
    arr = _check_finite("x", x)
    if np.any(arr <= 0):
        raise ChannelError(f"lin2db needs positive values, got {x!r}")
    return _out(10.0 * np.log10(arr))


def _check_rate(bits_per_symbol, code_rate):
    if not isinstance(bits_per_symbol, (int, np.integer)) or bits_per_symbol < 1:
        raise ChannelError(f"bits_per_symbol must be a positive int, got {bits_per_symbol!r}")
    if not (0.0 < float(code_rate) <= 1.0):
        raise ChannelError(f"code_rate must be in (0, 1], got {code_rate!r}")


def ebno_to_esno(ebno_db, bits_per_symbol: int, code_rate: float = 1.0):
    """Eb/N0 [dB] to Es/N0 [dB]: ``Es/N0 = Eb/N0 + 10 log10(bits_per_symbol * code_rate)``."""
    _check_rate(bits_per_symbol, code_rate)
    return _out(_check_finite("ebno_db", ebno_db) + 10 * math.log10(bits_per_symbol * code_rate))


def esno_to_ebno(esno_db, bits_per_symbol: int, code_rate: float = 1.0):
    """Es/N0 [dB] to Eb/N0 [dB] (inverse of :func:`ebno_to_esno`)."""
    _check_rate(bits_per_symbol, code_rate)
    return _out(_check_finite("esno_db", esno_db) - 10 * math.log10(bits_per_symbol * code_rate))


def snr_db_to_noise_var(snr_db) -> float:
    """Complex noise variance N0 for unit-energy symbols at Es/N0 = ``snr_db``."""
    return _out(10.0 ** (-_check_finite("snr_db", snr_db) / 10.0))


def awgn_capacity(snr_db):
    """Capacity of the complex AWGN channel in bit per complex channel use: log2(1 + SNR)."""
    return _out(np.log2(1.0 + 10.0 ** (_check_finite("snr_db", snr_db) / 10.0)))


def qfunc(x):
    """Gaussian tail function Q(x) = P(N(0,1) > x)."""
    return _out(0.5 * erfc(np.asarray(x, dtype=np.float64) / math.sqrt(2.0)))


# ---------------------------------------------------------------------------------------------
# Constellation-constrained capacity (BICM), computed by Gauss-Hermite quadrature.


@cache
def _gray_qam(bits_per_symbol: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit-energy Gray-labelled QAM (or BPSK for m=1) points and their bit labels."""
    m = bits_per_symbol
    labels = ((np.arange(2**m)[:, None] >> np.arange(m - 1, -1, -1)[None, :]) & 1).astype(np.int8)
    if m == 1:
        return np.array([1.0 + 0j, -1.0 + 0j]), labels
    if m % 2:
        raise ChannelError(f"QAM needs an even number of bits per symbol (or 1), got {m}")
    # Use Sionna's own Gray-labelled QAM so the capacity matches what the link transmits.
    from sionna.phy.mapping import Constellation

    points = Constellation("qam", m, device="cpu").points.detach().cpu().numpy()
    return points.astype(np.complex128), labels


def qam_bicm_capacity(snr_db, bits_per_symbol: int, num_nodes: int = 48):
    """BICM capacity (sum of bit-level mutual informations) of Gray QAM over complex AWGN.

    Args:
        snr_db: Es/N0 in dB, scalar or 1-D array.
        bits_per_symbol: 1 (BPSK), 2, 4, 6, 8 (QPSK ... 256-QAM, Sionna's Gray labelling).
        num_nodes: Gauss-Hermite nodes per real dimension.

    Returns:
        float or ndarray, bit per complex channel use.

    Example:
        >>> c = qam_bicm_capacity(0.0, 2)  # about 0.97 bit per channel use
    """
    if not isinstance(bits_per_symbol, (int, np.integer)) or bits_per_symbol < 1:
        raise ChannelError(f"bits_per_symbol must be a positive int, got {bits_per_symbol!r}")
    snr = np.atleast_1d(_check_finite("snr_db", snr_db))
    points, labels = _gray_qam(int(bits_per_symbol))
    gh_x, gh_w = np.polynomial.hermite.hermgauss(num_nodes)
    # complex noise n = sqrt(N0) * (u + j v) / sqrt(2)... with hermgauss weight exp(-t^2):
    # E[f(Z)] for Z ~ N(0, s^2) equals sum w f(sqrt(2) s t) / sqrt(pi).
    t_re, t_im = np.meshgrid(gh_x, gh_x, indexing="ij")
    w2 = (np.outer(gh_w, gh_w) / math.pi).ravel()
    t = (t_re + 1j * t_im).ravel()
    out = []
    for s in snr:
        n0 = 10.0 ** (-s / 10.0)
        noise = np.sqrt(n0) * t  # sqrt(2)*sqrt(N0/2) = sqrt(N0)
        total = 0.0
        for xi, x in enumerate(points):
            y = x + noise  # [Q]
            d = -np.abs(y[:, None] - points[None, :]) ** 2 / n0  # [Q, M]
            dmax = d.max(axis=1, keepdims=True)
            e = np.exp(d - dmax)
            den = e.sum(axis=1)
            for b in range(labels.shape[1]):
                same = labels[:, b] == labels[xi, b]
                num = e[:, same].sum(axis=1)
                total += np.sum(w2 * np.log2(den / num))
        out.append(labels.shape[1] - total / len(points))
    arr = np.asarray(out)
    return float(arr[0]) if np.ndim(snr_db) == 0 else arr


def biawgn_capacity_dispersion(snr_lin: float, num_nodes: int = 200) -> tuple[float, float]:
    """Capacity [bit] and dispersion [bit^2] of the binary-input real AWGN channel.

    ``snr_lin`` is A^2 / sigma^2 per real dimension; for Gray QPSK at Es/N0 = s, each of
    the two real dimensions is such a channel with ``snr_lin = s``.
    """
    if not np.isfinite(snr_lin) or snr_lin <= 0:
        raise ChannelError(f"snr_lin must be positive and finite, got {snr_lin!r}")
    gh_x, gh_w = np.polynomial.hermite.hermgauss(num_nodes)
    # LLR given x=+1 is N(2s, 4s): L = 2s + sqrt(2)*2 sqrt(s) t
    llr = 2 * snr_lin + 2.0 * math.sqrt(2 * snr_lin) * gh_x
    info = 1.0 - np.logaddexp(0.0, -llr) * _LOG2E
    w = gh_w / math.sqrt(math.pi)
    cap = float(np.sum(w * info))
    disp = float(np.sum(w * (info - cap) ** 2))
    return cap, disp


def _cap_disp(snr_lin: float, constellation: str) -> tuple[float, float]:
    if constellation == "gaussian":
        cap = math.log2(1 + snr_lin)
        disp = snr_lin * (snr_lin + 2) / (snr_lin + 1) ** 2 * _LOG2E**2
        return cap, disp
    if constellation == "qpsk":
        c, v = biawgn_capacity_dispersion(snr_lin)
        return 2 * c, 2 * v
    if constellation == "bpsk":
        # Real BPSK in a complex channel: only the real noise (variance N0/2) matters.
        return biawgn_capacity_dispersion(2 * snr_lin)
    raise ChannelError(f"constellation must be 'gaussian', 'qpsk' or 'bpsk', got {constellation!r}")


def normal_approximation_rate(snr_db: float, n: int, target_bler: float,
                              constellation: str = "gaussian") -> float:
    """Largest number of information bits k at block length ``n`` (complex channel uses).

    Polyanskiy-Poor-Verdu normal approximation
    ``k = n C - sqrt(n V) Q^-1(eps) + 0.5 log2(n)`` with capacity C and dispersion V of the
    given input (``"gaussian"``, ``"qpsk"`` = two BI-AWGN dimensions, or ``"bpsk"``).
    """
    from scipy.stats import norm

    if n < 1:
        raise ChannelError(f"n must be >= 1, got {n}")
    if not (0.0 < target_bler < 1.0):
        raise ChannelError(f"target_bler must be in (0, 1), got {target_bler}")
    cap, disp = _cap_disp(float(db2lin(snr_db)), constellation)
    return n * cap - math.sqrt(n * disp) * norm.isf(target_bler) + 0.5 * math.log2(n)


def normal_approximation_snr(n: int, k: int, target_bler: float,
                             constellation: str = "gaussian") -> float:
    """Es/N0 [dB] at which ``k`` information bits in ``n`` complex channel uses reach BLER.

    Args:
        n: block length in complex channel uses (for QPSK, coded bits / 2).
        k: information bits.
        target_bler: block error probability, e.g. 1e-2.
        constellation: ``"gaussian"`` (unconstrained), ``"qpsk"`` or ``"bpsk"``.

    Returns:
        Es/N0 in dB (float).

    Example:
        >>> snr = normal_approximation_snr(512, 512, 1e-2, "qpsk")
    """
    if k < 1 or n < 1:
        raise ChannelError(f"n and k must be positive, got n={n}, k={k}")

    def f(s):
        return normal_approximation_rate(s, n, target_bler, constellation) - k

    lo, hi = -20.0, 40.0
    if f(hi) < 0:
        raise ChannelError(f"k={k} bits in n={n} uses is not achievable with {constellation}")
    return float(brentq(f, lo, hi, xtol=1e-6))


def uncoded_ber(snr_db, bits_per_symbol: int):
    """Closed-form uncoded bit error rate over AWGN with Gray labelling, Es/N0 = ``snr_db``.

    BPSK (m=1): Q(sqrt(2 s)); QPSK (m=2): Q(sqrt(s)); 16-QAM (m=4):
    3/4 Q(a) + 1/2 Q(3a) - 1/4 Q(5a) with a = sqrt(s / 5) (exact for Gray 16-QAM).
    """
    s = 10.0 ** (_check_finite("snr_db", snr_db) / 10.0)
    if bits_per_symbol == 1:
        return _out(np.asarray(qfunc(np.sqrt(2 * s))))
    if bits_per_symbol == 2:
        return _out(np.asarray(qfunc(np.sqrt(s))))
    if bits_per_symbol == 4:
        a = np.sqrt(s / 5.0)
        return _out(0.75 * np.asarray(qfunc(a)) + 0.5 * np.asarray(qfunc(3 * a))
                    - 0.25 * np.asarray(qfunc(5 * a)))
    raise ChannelError(f"closed form available for bits_per_symbol in (1, 2, 4), got "
                       f"{bits_per_symbol}")


def rayleigh_bpsk_ber(snr_db):
    """BPSK BER over Rayleigh fading with perfect CSI: 0.5 (1 - sqrt(s / (1 + s)))."""
    s = 10.0 ** (_check_finite("snr_db", snr_db) / 10.0)
    return _out(0.5 * (1.0 - np.sqrt(s / (1.0 + s))))
