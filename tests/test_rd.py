"""The rate-distortion run (flowcodec.rd): counts checked, progress passed to codec training,
the member that receives each row."""

from __future__ import annotations

import pytest
from helpers import random_images, rd_digits, tiny_cloud_family, untrained_digits_family

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


# --- the member that receives each row ----------------------------------------------------------
def _raw_rows(dataset, family, member, points, test_subset=24):
    """An rd config of lossless float32 raw rows at ``points``, reference at point 1."""
    return {"dataset": dataset, "family": family, "member": member, "point": 1,
            "test_subset": test_subset, "fit_samples": 16, "seed": 0,
            "codecs": [{"codec": "raw", "label": f"raw-p{p}", "point": p, "fit": False}
                       for p in points]}  # fmt: skip


def test_rows_off_the_members_path_are_received_by_the_largest_member_through_their_point(
        tmp_path, monkeypatch):  # fmt: skip
    from flowcodec.rd import reference_accuracy, run_rd

    fam = tiny_cloud_family()  # member 4 branches after stage 1: path [0, 1, 4]
    test = random_images(fam.input_shape, 24)
    monkeypatch.setattr("flowcodec.data.load_dataset",
                        lambda name, **kw: (random_images(fam.input_shape, 32, seed=1), test))
    cfg = _raw_rows("cifar10", "cifar10-cloud", 4, [1, 2])
    rows = {r.label: r for r in run_rd(cfg, tmp_path, progress=False, family=fam)}
    assert {k: r.receiver for k, r in rows.items()} == {"uncompressed": 4, "raw-p1": 4,
                                                        "raw-p2": 3}  # fmt: skip
    flops = [m.flops for m in fam.info()]
    for r in rows.values():  # the device's share of the member that received the row
        assert r.device_flops_pct == pytest.approx(100 * fam.head_flops(r.point)
                                                   / flops[r.receiver - 1])  # fmt: skip
    # lossless rows: each receiver's own accuracy from its point
    assert rows["raw-p1"].accuracy == rows["uncompressed"].accuracy
    assert rows["raw-p2"].accuracy == reference_accuracy(*fam.split(3, 2), test)
    assert "receiver" in (tmp_path / "rd.csv").read_text().splitlines()[0].split(",")


def test_a_chain_familys_rows_are_all_received_by_the_configs_member(tmp_path):
    from flowcodec.data import load_digits
    from flowcodec.rd import reference_accuracy, run_rd

    fam = untrained_digits_family()
    cfg = _raw_rows("digits", "digits", 3, [1, 2], test_subset=30)
    rows = {r.label: r for r in run_rd(cfg, tmp_path, progress=False, family=fam)}
    assert {r.receiver for r in rows.values()} == {3}
    test = load_digits()[1].subset(30, seed=0)
    for p in (1, 2):
        r = rows[f"raw-p{p}"]
        assert r.accuracy == reference_accuracy(*fam.split(3, p), test)
        assert r.device_flops_pct == pytest.approx(100 * fam.head_flops(p)
                                                   / fam.info()[2].flops)  # fmt: skip
