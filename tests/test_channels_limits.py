"""5G LDPC (k = 512, n = 1024, QPSK) over AWGN against the normal approximation."""

import pytest
import torch

from channels import MCS, ExactLink
from channels.units import normal_approximation_snr

K, N_BITS, TARGET = 512, 1024, 1e-2
N_USES = N_BITS // 2  # QPSK: complex channel uses per block


def _bler(snr_db: float, blocks: int, seed: int) -> float:
    link = ExactLink(mcs=MCS(2, 0.5), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    errors = 0
    for _ in range(blocks // 400 or 1):
        errors += int(link.simulate_code_blocks(K, min(400, blocks), snr_db, gen).sum())
    return errors / (max(1, blocks // 400) * min(400, blocks))


def test_block_length_matches_the_setup():
    link = ExactLink(mcs=MCS(2, 0.5))
    enc, _ = link._coder(K, N_BITS, "bg2")
    assert (enc.k, enc.n) == (K, N_BITS)


def test_bler_below_target_within_1p5_db_of_normal_approximation():
    limit = normal_approximation_snr(N_USES, K, TARGET, "qpsk")
    # at limit + 1.5 dB the code must already be below BLER 1e-2
    bler = _bler(limit + 1.5, 400, seed=0)
    assert bler < TARGET, (limit, bler)


@pytest.mark.slow
def test_gap_to_normal_approximation_sweep():
    """Find where BLER crosses 1e-2 (0.25 dB grid, 2000 blocks per point) and report the gap."""
    limit = normal_approximation_snr(N_USES, K, TARGET, "qpsk")
    crossing = None
    snr = limit
    while snr <= limit + 1.5 + 1e-9:
        if _bler(snr, 2000, seed=1) < TARGET:
            crossing = snr
            break
        snr += 0.25
    assert crossing is not None, "BLER not below 1e-2 within 1.5 dB of the limit"
    print(f"NA(QPSK) limit {limit:.2f} dB, BLER<1e-2 at {crossing:.2f} dB, "
          f"gap {crossing - limit:.2f} dB")
