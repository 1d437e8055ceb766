"""The rate-distortion run (flowcodec.rd): counts checked, progress passed to codec training."""

from __future__ import annotations

import pytest
from helpers import rd_digits

from flowcodec.errors import ConfigError


# --- arguments ------------------------------------------------------------------------------
def test_run_rd_refuses_a_negative_n(tmp_path):
    from flowcodec.rd import run_rd

    with pytest.raises(ConfigError, match="n"):
        run_rd(rd_digits(), tmp_path, n=-5, progress=False)


def test_rd_passes_its_progress_flag_to_codec_training(monkeypatch):
    # the serial rd run shows training progress unless told not to (Ray workers never draw)
    import flowcodec.codecs.train as train_mod
    from flowcodec import rd
    from flowcodec.config import resolve_config

    seen = []

    class Stop(Exception):
        pass

    def fake_train(*args, progress=None, **kwargs):
        seen.append(progress)
        raise Stop

    monkeypatch.setattr(train_mod, "train_codec", fake_train)
    cfg = rd.load_config(resolve_config("rd_digits", "rd"))
    ctx = rd.RDContext(cfg, 20, progress=False)
    for flag in (True, False):
        jobs = rd.build_jobs(cfg, ctx, flag, "cpu")
        build = next(job[3] for job in jobs if job[4] == "trained")
        with pytest.raises(Stop):
            build()
    assert seen == [True, False]
