"""Family training under torchrun (DDP, gloo on CPU) and resuming from the training state."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flowcodec.data import load_dataset
from flowcodec.family.pretrained import RECIPES
from flowcodec.family.train import TrainConfig, train_family
from flowcodec.family.zoo import build_family
from flowcodec.scale.ddp import Dist, load_state, state_paths

ROOT = Path(__file__).resolve().parents[1]


def _digits_run(epochs, checkpoint=None, resume=False, on_epoch=None):
    train, test = load_dataset("digits")
    cfg = TrainConfig(**{**RECIPES["digits"]["train"], "epochs": epochs, "progress": False})
    torch.manual_seed(cfg.seed)
    fam = build_family("digits")
    res = train_family(fam, train, test, cfg, checkpoint=checkpoint, resume=resume,
                       on_epoch=on_epoch)  # fmt: skip
    return fam, res


def test_shard_splits_a_global_batch_into_disjoint_rank_shares():
    x = torch.arange(10)
    parts = [Dist(rank=r, world=3).shard(x)[0] for r in range(3)]
    assert sorted(torch.cat(parts).tolist()) == list(range(10))
    assert parts[1].tolist() == [1, 4, 7]
    assert Dist().shard(x)[0] is x  # one process: the batch itself


def test_an_interrupted_run_resumed_from_its_state_ends_where_the_whole_run_does(tmp_path):
    full, res_full = _digits_run(3, checkpoint=tmp_path / "full")

    class Stop(Exception):
        pass

    def stop_after_first(rec):
        if rec["epoch"] == 1:
            raise Stop

    with pytest.raises(Stop):
        _digits_run(3, checkpoint=tmp_path / "cut", on_epoch=stop_after_first)
    assert json.loads(state_paths(tmp_path / "cut")[1].read_text())["epoch"] == 1
    resumed, res = _digits_run(3, checkpoint=tmp_path / "cut", resume=True)
    assert [h["epoch"] for h in res.history] == [1, 2, 3]
    assert res.history == res_full.history
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert res.accuracies == res_full.accuracies


def test_a_damaged_training_state_is_refused(tmp_path):
    from flowcodec.errors import CheckpointError

    fam, _ = _digits_run(1, checkpoint=tmp_path / "s")
    tens, _ = state_paths(tmp_path / "s")
    data = bytearray(tens.read_bytes())
    data[-1] ^= 0xFF
    tens.write_bytes(bytes(data))
    opt = torch.optim.AdamW(fam.parameters())
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_state(tmp_path / "s", fam, opt, None, torch.Generator())


def _cli(tmp_path, out, *extra, nproc=None, epochs=2, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = ["-m", "flowcodec.cli", "train-family", "--family", "digits", "--epochs",
            str(epochs), "--threads", "1", "--no-progress", "--out", str(out), *extra]
    if nproc:
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                str(nproc), *args]  # fmt: skip
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, timeout=timeout,
                          capture_output=True, text=True)  # fmt: skip


def _sha(path) -> str:
    return hashlib.sha256(Path(f"{path}.safetensors").read_bytes()).hexdigest()


def test_one_rank_under_torchrun_trains_the_same_family_as_the_plain_command(tmp_path):
    plain = _cli(tmp_path, tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr[-2000:]
    ddp = _cli(tmp_path, tmp_path / "ddp1", nproc=1)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    assert _sha(tmp_path / "plain") == _sha(tmp_path / "ddp1")
    a = json.loads((tmp_path / "plain.json").read_text())["extra"]["test_accuracy"]
    b = json.loads((tmp_path / "ddp1.json").read_text())["extra"]["test_accuracy"]
    assert a == b


@pytest.mark.slow
def test_two_gloo_ranks_train_digits_to_the_accuracy_band_of_one(tmp_path):
    one = _cli(tmp_path, tmp_path / "one", epochs=12)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _cli(tmp_path, tmp_path / "two", nproc=2, epochs=12)
    assert two.returncode == 0, two.stderr[-2000:]
    a = json.loads((tmp_path / "one.json").read_text())["extra"]
    b = json.loads((tmp_path / "two.json").read_text())["extra"]
    assert b["ranks"] == 2 and "torchrun" in b["hardware"]
    for acc1, acc2 in zip(a["test_accuracy"], b["test_accuracy"]):
        assert acc2 > 0.85 and abs(acc1 - acc2) < 0.04, (a["test_accuracy"], b["test_accuracy"])


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for kv in env:
        if kv.startswith(b"RANK="):
            return int(kv[5:])
    return None


@pytest.mark.slow
def test_a_killed_rank_stops_the_job_and_the_rerun_resumes_from_the_last_epoch(tmp_path):
    out = tmp_path / "fam"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "flowcodec.cli", "train-family", "--family", "digits", "--epochs", "40",
           "--threads", "1", "--no-progress", "--out", str(out)]  # fmt: skip
    job = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)  # fmt: skip
    meta = state_paths(out)[1]
    deadline = time.time() + 300
    while not meta.is_file() and time.time() < deadline and job.poll() is None:
        time.sleep(0.2)
    assert meta.is_file(), "no epoch finished in time"
    victim = next(p for p in _children(job.pid) if _rank_of(p) == 1)
    os.kill(victim, signal.SIGKILL)
    log, _ = job.communicate(timeout=300)
    assert job.returncode != 0
    assert "rank" in log.lower() and ("SIGKILL" in log or "Signal 9" in log or "-9" in log), log
    done = json.loads(meta.read_text())["epoch"]
    assert 1 <= done < 40
    again = _cli(tmp_path, out, "--resume", nproc=2, epochs=40)
    assert again.returncode == 0, again.stderr[-2000:]
    extra = json.loads(Path(f"{out}.json").read_text())["extra"]
    assert extra["resumed_from_epoch"] == done and extra["ranks"] == 2
    assert extra["test_accuracy"][-1] > 0.85
    assert not meta.exists()  # the finished run leaves no state behind


def _codec_cli(tmp_path, out, nproc=None, epochs=2, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = ["-m", "flowcodec.cli", "train-codec", "--family", "digits", "--point", "1",
            "--codec", "factorized", "--kwargs", '{"latent": 8, "hidden": 32, "packets": 2}',
            "--lam", "1.0", "--epochs", str(epochs), "--drop-prob", "0.1", "--threads", "1",
            "--no-progress", "--out", str(out)]  # fmt: skip
    if nproc:
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                str(nproc), *args]  # fmt: skip
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, timeout=timeout,
                          capture_output=True, text=True)  # fmt: skip


def test_one_rank_under_torchrun_trains_the_same_codec_as_the_plain_command(tmp_path,
                                                                            digits_family):
    plain = _codec_cli(tmp_path, tmp_path / "plain")
    assert plain.returncode == 0, plain.stderr[-2000:]
    ddp = _codec_cli(tmp_path, tmp_path / "ddp1", nproc=1)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    assert _sha(tmp_path / "plain") == _sha(tmp_path / "ddp1")
    a = json.loads((tmp_path / "plain.json").read_text())["extra"]
    b = json.loads((tmp_path / "ddp1.json").read_text())["extra"]
    assert (a["test_accuracy"], a["bytes_per_image"]) == (b["test_accuracy"],
                                                          b["bytes_per_image"])


@pytest.mark.slow
def test_two_gloo_ranks_train_a_codec_to_the_accuracy_band_of_one(tmp_path, digits_family):
    one = _codec_cli(tmp_path, tmp_path / "one", epochs=8)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _codec_cli(tmp_path, tmp_path / "two", nproc=2, epochs=8)
    assert two.returncode == 0, two.stderr[-2000:]
    a = json.loads((tmp_path / "one.json").read_text())["extra"]
    b = json.loads((tmp_path / "two.json").read_text())["extra"]
    assert b["ranks"] == 2
    assert abs(a["test_accuracy"] - b["test_accuracy"]) < 0.04, (a, b)
    assert 0.5 < b["bytes_per_image"] / a["bytes_per_image"] < 2.0
