"""``flowcodec train-codec`` writes resumable state after every epoch, and ``--resume``
continues from it: a run stopped after epoch 1 and resumed ends with the weights of the
uninterrupted run (single process, digits)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import flowcodec.scale.ddp as ddp
from flowcodec.cli import main

ROOT = Path(__file__).resolve().parents[1]

ARGS = ["train-codec", "--family", "digits", "--point", "1", "--codec", "factorized",
        "--kwargs", '{"latent": 4, "hidden": 16}', "--epochs", "2", "--lam", "0.5",
        "--seed", "5", "--threads", "1", "--no-progress"]  # fmt: skip


class Killed(Exception):
    """Stands for the process being killed."""


def _stop_after_first_epoch(monkeypatch):
    """Let the training state of epoch 1 be written, then stop the run."""
    real = ddp.save_state

    def save_then_die(path, *args, **kwargs):
        real(path, *args, **kwargs)
        raise Killed("stopped after the state of epoch 1 was written")

    monkeypatch.setattr(ddp, "save_state", save_then_die)


def test_a_run_stopped_after_epoch_1_and_resumed_ends_with_the_uninterrupted_weights(
        tmp_path, monkeypatch, digits_family):  # fmt: skip
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main(ARGS + ["--out", str(whole)]) == 0
    assert not list(tmp_path.glob("whole.state.*"))  # removed once the codec is saved

    with monkeypatch.context() as m:
        _stop_after_first_epoch(m)
        with pytest.raises(Killed):
            main(ARGS + ["--out", str(cut)])
    state = json.loads((tmp_path / "cut.state.json").read_text())
    assert state["epoch"] == 1 and len(state["history"]) == 1
    assert state["extra"]["step"] == state["extra"]["total"] // 2
    assert not (tmp_path / "cut.safetensors").exists()  # no codec yet: the run died

    assert main(ARGS + ["--out", str(cut), "--resume"]) == 0
    assert (tmp_path / "cut.safetensors").read_bytes() == \
        (tmp_path / "whole.safetensors").read_bytes()
    rec_cut = json.loads((tmp_path / "cut.json").read_text())["extra"]
    rec_whole = json.loads((tmp_path / "whole.json").read_text())["extra"]
    assert rec_cut["resumed_from_epoch"] == 1 and "resumed_from_epoch" not in rec_whole
    assert rec_cut["epochs"] == rec_whole["epochs"] == 2
    drop = {"seconds"}
    assert [{k: v for k, v in h.items() if k not in drop} for h in rec_cut["history"]] == \
        [{k: v for k, v in h.items() if k not in drop} for h in rec_whole["history"]]
    assert rec_cut["test_accuracy"] == rec_whole["test_accuracy"]
    assert not list(tmp_path.glob("cut.state.*"))


def test_resume_refuses_a_damaged_state_and_starts_fresh_without_one(
        tmp_path, monkeypatch, capsys, digits_family):  # fmt: skip
    out = tmp_path / "c"
    with monkeypatch.context() as m:
        _stop_after_first_epoch(m)
        with pytest.raises(Killed):
            main(ARGS + ["--epochs", "1", "--out", str(out)])
    tens = tmp_path / "c.state.safetensors"
    blob = bytearray(tens.read_bytes())
    blob[-1] ^= 0x01
    tens.write_bytes(bytes(blob))
    assert main(ARGS + ["--epochs", "1", "--out", str(out), "--resume"]) == 2
    assert "SHA-256" in capsys.readouterr().err
    for f in tmp_path.glob("c.state.*"):
        f.unlink()
    # --resume with no state trains from the start
    assert main(ARGS + ["--epochs", "1", "--out", str(out), "--resume"]) == 0
    assert "resumed_from_epoch" not in json.loads((tmp_path / "c.json").read_text())["extra"]


def _ranks_of_job(job_pid: int) -> dict[int, int]:
    """``{rank: pid}`` of the worker processes torchrun (``job_pid``) started."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        rank = next((int(kv[5:]) for kv in env if kv.startswith(b"RANK=")), None)
        if parent == job_pid and rank is not None:
            found[rank] = int(proc.name)
    return found


@pytest.mark.slow
def test_a_killed_torchrun_rank_stops_codec_training_and_resume_continues_it(
        tmp_path, digits_family):  # fmt: skip
    out = tmp_path / "codec"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "flowcodec.cli", *ARGS, "--epochs", "30", "--out", str(out)]
    job = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)  # fmt: skip
    meta = ddp.state_paths(out)[1]
    deadline = time.time() + 300
    while not meta.is_file() and time.time() < deadline and job.poll() is None:
        time.sleep(0.1)
    assert meta.is_file(), "no epoch finished in time"
    os.kill(_ranks_of_job(job.pid)[1], signal.SIGKILL)
    log, _ = job.communicate(timeout=300)
    assert job.returncode != 0
    assert "SIGKILL" in log or "Signal 9" in log or "exitcode: -9" in log, log[-3000:]
    done = json.loads(meta.read_text())["epoch"]
    assert 1 <= done < 30 and not Path(f"{out}.safetensors").exists()
    again = subprocess.run(cmd + ["--resume"], cwd=tmp_path, env=env, timeout=600,
                           capture_output=True, text=True)  # fmt: skip
    assert again.returncode == 0, again.stderr[-3000:]
    extra = json.loads(Path(f"{out}.json").read_text())["extra"]
    assert extra["resumed_from_epoch"] == done and extra["ranks"] == 2
    assert extra["epochs"] == 30 and len(extra["history"]) == 30
    assert not meta.exists()
