"""channels.mcs: the MCS table is 3GPP 38.214 PDSCH table 1 (as decoded by Sionna)."""

import pytest
import torch

from channels import MCS, MCS_TABLE, ChannelError, get_mcs


def test_table_matches_sionna():
    from sionna.phy.nr.utils import decode_mcs_index

    q, r = decode_mcs_index(torch.arange(29), table_index=1, is_pusch=False, device="cpu")
    assert len(MCS_TABLE) == 29
    for mcs, qm, rate in zip(MCS_TABLE, q.tolist(), r.tolist()):
        assert mcs.modulation_order == qm
        assert mcs.code_rate == pytest.approx(rate, abs=1e-6)


def test_get_mcs():
    assert get_mcs(0) is MCS_TABLE[0]
    custom = MCS(2, 0.5)
    assert get_mcs(custom) is custom
    assert custom.spectral_efficiency == 1.0
    assert "QPSK" in MCS_TABLE[3].name
    with pytest.raises(ChannelError):
        get_mcs(29)
    with pytest.raises(TypeError):
        get_mcs("3")
    with pytest.raises(ChannelError):
        MCS(3, 0.5)
    with pytest.raises(ChannelError):
        MCS(2, 0.99)
