"""The newcomer's path (issue 15): the user's model untouched, named errors for bad input,
no silent wrong results, a CLI that explains itself, progress bars fit for logs."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from flowcodec.errors import CheckpointError, ConfigError, SplitError

ROOT = Path(__file__).resolve().parents[1]


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10),
    )  # fmt: skip


def snapshot(model: nn.Module):
    return ([(n, m.training) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()])  # fmt: skip


# --- item 1: train_codec and split_model leave the user's model as it was ----------------------
def test_train_codec_leaves_the_users_model_as_it_was():
    import torchvision

    from flowcodec.codecs import build_codec
    from flowcodec.split import split_model, train_codec

    net = torchvision.models.resnet18(num_classes=10)
    net.layer1[0].bn1.eval()  # a mixed state the user chose: one BN frozen in a training model
    net.fc.weight.requires_grad_(False)
    before = snapshot(net)
    sm = split_model(net, "layer2", torch.randn(2, 3, 32, 32))
    assert snapshot(net) == before
    codec = build_codec("factorized", sm.feature_shape, latent=4, hidden=8)
    train_codec(sm, codec, [torch.randn(2, 3, 32, 32)], steps=2, progress=False)
    assert snapshot(net) == before
    assert all(p.grad is None for p in net.parameters())  # no gradients left in the model


def test_a_refused_codec_also_leaves_the_model_as_it_was():
    from flowcodec.codecs import build_codec
    from flowcodec.split import split_model, train_codec

    net = small_cnn().train()
    before = snapshot(net)
    sm = split_model(net, "2", torch.randn(2, 1, 8, 8))
    codec = build_codec("raw", sm.feature_shape)  # no trainable parameters: refused
    with pytest.raises(ConfigError, match="no trainable parameters"):
        train_codec(sm, codec, [torch.randn(2, 1, 8, 8)], steps=1, progress=False)
    codec = build_codec("factorized", sm.feature_shape, latent=2, hidden=4)
    with pytest.raises(ConfigError, match="empty"):  # fails inside the loop
        train_codec(sm, codec, [torch.zeros(0, 1, 8, 8)], steps=1, progress=False)
    assert snapshot(net) == before


# --- items 2 and 3: named errors and no silent wrong results ------------------------------------
@pytest.fixture
def cut():
    from flowcodec.codecs import build_codec
    from flowcodec.split import split_model

    sm = split_model(small_cnn().eval(), "2", torch.randn(2, 1, 8, 8))
    return sm, build_codec("factorized", sm.feature_shape, latent=2, hidden=4)


def test_train_codec_names_empty_inputs(cut):
    from flowcodec.split import train_codec

    sm, codec = cut
    with pytest.raises(ConfigError, match="no batches"):
        train_codec(sm, codec, [], steps=2, progress=False)
    with pytest.raises(ConfigError, match="batch 1 of inputs is empty"):
        train_codec(sm, codec, [torch.randn(2, 1, 8, 8), torch.zeros(0, 1, 8, 8)], steps=3,
                    progress=False)  # fmt: skip
    with pytest.raises(ConfigError, match="steps"):
        train_codec(sm, codec, [torch.randn(2, 1, 8, 8)], steps=0, progress=False)


def test_train_codec_cycles_a_short_generator(cut):
    from flowcodec.split import train_codec

    sm, codec = cut
    gen = (torch.randn(4, 1, 8, 8) for _ in range(2))  # one-shot, shorter than steps
    res = train_codec(sm, codec, gen, steps=5, progress=False)
    assert res.steps == 5
    assert res.distortion == res.distortion and res.bits == res.bits  # not NaN


def test_train_codec_makes_no_float_warning(cut, recwarn):
    from flowcodec.split import train_codec

    sm, codec = cut
    train_codec(sm, codec, [torch.randn(2, 1, 8, 8)], steps=2, progress=False)
    assert not [w for w in recwarn if "requires_grad" in str(w.message)]


def test_empty_batches_are_named_errors(cut):
    from channels import IIDPacketErasure
    from flowcodec.codecs import build_codec

    sm, codec = cut
    codec.update(force=True)
    with pytest.raises(ConfigError, match="empty batch"):
        sm.flow(codec, IIDPacketErasure(0.0)).run(torch.zeros(0, 1, 8, 8))
    raw = build_codec("raw", sm.feature_shape)
    with pytest.raises(ConfigError, match="empty batch"):
        raw(torch.zeros(0, *sm.feature_shape))
    with pytest.raises(ConfigError, match="empty batch"):
        raw.compress(torch.zeros(0, *sm.feature_shape))


def test_build_codec_names_the_codecs_arguments():
    from flowcodec.codecs import build_codec

    with pytest.raises(ConfigError, match=r"'factorized'.*latnet.*latent"):
        build_codec("factorized", (16, 8, 8), latnet=8)


def test_split_model_refuses_an_unbatched_example():
    from flowcodec.split import split_model

    for at in ("0", "1", "2"):  # conv2d takes an unbatched (C, H, W); BatchNorm does not
        with pytest.raises(SplitError, match="batch"):
            split_model(small_cnn(), at, torch.zeros(1, 8, 8))
    with pytest.raises(SplitError, match="empty batch"):
        split_model(small_cnn(), "1", torch.zeros(0, 1, 8, 8))
    assert split_model(small_cnn(), "1", torch.zeros(1, 1, 8, 8)).feature_shape == (4, 8, 8)


# --- item 2: configs are checked whole, before any work -----------------------------------------
def rd_digits() -> dict:
    return json.loads((ROOT / "experiments" / "rd_digits.json").read_text())


def latency_digits() -> dict:
    return json.loads((ROOT / "experiments" / "latency_digits.json").read_text())


def test_shipped_configs_pass():
    from flowcodec.config import validate_latency_config, validate_rd_config

    for p in sorted((ROOT / "experiments").glob("rd_*.json")):
        validate_rd_config(json.loads(p.read_text()), str(p))
    for p in sorted((ROOT / "experiments").glob("latency_*.json")):
        validate_latency_config(json.loads(p.read_text()), str(p))


@pytest.mark.parametrize("change, words", [
    (lambda c: c["codecs"][0].pop("codec"), ["codecs[0]", "'codec'", "'pretrained'"]),
    (lambda c: c.update(member=9), ["member", "1..3"]),
    (lambda c: c.update(codecs="raw"), ["codecs", "list"]),
    (lambda c: c["codecs"][1].update(kwargs={"bitz": 4}), ["codecs[1].kwargs", "'bitz'", "bits"]),
    (lambda c: c.update(dataset="nope"), ["dataset", "cifar10, digits"]),
    (lambda c: c.update(test_subset=-5), ["test_subset", ">= 1"]),
    (lambda c: c["channels"][0].update(codecs=["nope"]), ["channels[0].codecs[0]", "quant-4b"]),
    (lambda c: c.update(colour="red"), ["colour", "unknown key"]),
], ids=["no-codec", "member", "codecs-str", "kwargs", "dataset", "subset", "labels",
       "unknown"])  # fmt: skip
def test_bad_rd_configs_name_the_key_and_what_is_allowed(change, words):
    from flowcodec.config import validate_rd_config

    cfg = rd_digits()
    change(cfg)
    with pytest.raises(ConfigError) as e:
        validate_rd_config(cfg)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("change, words", [
    (lambda c: c["options"][0].pop("point"), ["options[0].point", "missing"]),
    (lambda c: c.update(samples="abc"), ["samples", "integer"]),
    (lambda c: c["fixed_split"].update(rate="nope"), ["fixed_split", "quant-4bit"]),
    (lambda c: c.update(samples=1), ["samples", ">= 2"]),
    (lambda c: c.update(snrs_db=["ten"]), ["snrs_db[0]", "number"]),
    (lambda c: c.update(framing="frames"), ["framing", "sample, session"]),
], ids=["no-point", "samples-str", "fixed-rate", "samples-1", "snr-str", "framing"])  # fmt: skip
def test_bad_latency_configs_name_the_key_and_what_is_allowed(change, words):
    from flowcodec.config import validate_latency_config

    cfg = latency_digits()
    change(cfg)
    with pytest.raises(ConfigError) as e:
        validate_latency_config(cfg)
    for w in words:
        assert w in str(e.value)


def test_every_problem_is_reported_at_once():
    from flowcodec.config import validate_rd_config

    cfg = rd_digits()
    cfg.update(member=9, point=-1, seed="x")
    with pytest.raises(ConfigError, match="3 problems"):
        validate_rd_config(cfg)


def test_cli_checks_configs_before_any_work(tmp_path, monkeypatch, capsys):
    from flowcodec.cli import main

    def no_work(*a, **k):
        raise AssertionError("work started before the config was checked")

    monkeypatch.setattr("flowcodec.family.load_pretrained", no_work)
    monkeypatch.setattr("flowcodec.data.load_dataset", no_work)
    lat = latency_digits()
    lat["snrs_db"] = ["ten"]
    (tmp_path / "lat.json").write_text(json.dumps(lat))
    assert main(["latency", "--config", str(tmp_path / "lat.json"), "--out", str(tmp_path)]) == 2
    assert "snrs_db[0]" in capsys.readouterr().err
    rd = rd_digits()
    rd["codecs"][0]["kwargs"] = {"bitz": 4}
    (tmp_path / "rd.json").write_text(json.dumps(rd))
    assert main(["rd", "--config", str(tmp_path / "rd.json"), "--out", str(tmp_path)]) == 2
    assert "bitz" in capsys.readouterr().err


def test_negative_counts_are_refused(capsys):
    from flowcodec.cli import main

    for argv in (["rd", "--config", "x.json", "--n", "-5"], ["latency", "--samples", "-3"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert ">= 1" in capsys.readouterr().err


def test_run_rd_refuses_a_negative_n(tmp_path):
    from flowcodec.rd import run_rd

    with pytest.raises(ConfigError, match="n"):
        run_rd(rd_digits(), tmp_path, n=-5, progress=False)


# --- item 4: the hint for an unknown family names what train-family accepts --------------------
def test_unknown_family_hint_names_the_trainable_families():
    from flowcodec.family import load_pretrained

    with pytest.raises(ConfigError) as e:
        load_pretrained("nope", progress=False)
    msg = str(e.value)
    assert "--family nope" not in msg and "cifar10" in msg and "digits" in msg
    assert not isinstance(e.value, CheckpointError)


# --- item 5: a CLI written for a person --------------------------------------------------------
def _help(*argv) -> str:
    return subprocess.run([sys.executable, "-m", "flowcodec.cli", *argv, "--help"],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip


def test_top_level_help_lists_every_command_in_plain_words():
    out = _help()
    for cmd in ("demo", "rd", "latency", "train-family", "align", "info"):
        assert f"    {cmd}" in out, cmd
    assert "``" not in out and ":func:" not in out


@pytest.mark.parametrize("cmd", ["demo", "rd", "latency", "train-family", "align", "info"])
def test_every_subcommand_has_a_description_and_option_help(cmd):
    import argparse

    from flowcodec.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    p = sub.choices[cmd]
    assert p.description and len(p.description) > 40
    for a in p._actions:
        if a.option_strings and a.dest != "help":
            assert a.help, f"{cmd} {a.option_strings} has no help"


def test_version_and_info_choices(capsys):
    from flowcodec import __version__
    from flowcodec.cli import main

    with pytest.raises(SystemExit):
        main(["--version"])
    assert __version__ in capsys.readouterr().out
    from flowcodec.family import FAMILIES

    # every registered family, the language family included, and nothing else
    assert "{" + ",".join(sorted(FAMILIES)) + "}" in _help("info")
    assert {"cifar10", "cifar10-vit", "digits", "shakespeare-char"} <= set(FAMILIES)


def test_default_latency_config_resolves_outside_the_checkout(tmp_path, monkeypatch):
    from flowcodec.cli import build_parser
    from flowcodec.config import resolve_config

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(["latency"])
    path = resolve_config(args.config, "latency")
    assert path.is_file() and path.name == "latency_cifar10.json"
    assert resolve_config("digits", "latency").name == "latency_digits.json"
    assert resolve_config("rd_digits", "rd").name == "rd_digits.json"
    with pytest.raises(ConfigError, match="latency_cifar10"):
        resolve_config("nope", "latency")


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


# --- item 9: progress bars fit for logs --------------------------------------------------------
def test_bars_redraw_rarely_when_stderr_is_not_a_terminal(monkeypatch):
    import time

    from flowcodec import progress

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.delenv("FLOWCODEC_PROGRESS_INTERVAL", raising=False)
    assert progress.log_interval() == progress.LOG_INTERVAL_S >= 30
    log = io.StringIO()
    for _ in progress.tqdm(range(400), file=log):
        time.sleep(0.002)  # about a second: tqdm's default would redraw ten times
    assert log.getvalue().count("\r") <= 3


def test_every_bar_in_the_library_uses_the_helper():
    offenders = []
    for p in sorted((ROOT / "flowcodec").rglob("*.py")):
        if p.name == "progress.py":
            continue
        if re.search(r"^\s*(from tqdm|import tqdm)", p.read_text(), flags=re.M):
            offenders.append(str(p.relative_to(ROOT)))
    assert not offenders, f"use flowcodec.progress.tqdm in {offenders}"


# --- item 6: link adaptation that targets a BLER on the channel the flow runs on ---------------
def test_link_adaptation_adapts_to_fading():
    from channels import AWGN, RayleighBlockFading
    from flowcodec.demo import adapt_mcs

    packets = [[bytes(48), bytes(40), bytes(40)]] * 4
    for snr in (5.0, 15.0):
        awgn = adapt_mcs(packets, snr, lambda: AWGN(seed=0), target=0.01, harq_max_tx=1)
        ray = adapt_mcs(packets, snr, lambda: RayleighBlockFading(coherence_length=64, seed=0),
                        target=0.01, harq_max_tx=1)  # fmt: skip
        assert ray.mcs < awgn.mcs  # fading needs a more robust MCS for the same target
        for c in (awgn, ray):
            assert c.expected_loss <= 0.01 or not c.feasible
    lo = adapt_mcs(packets, 5.0, lambda: AWGN(seed=0), target=0.01)
    hi = adapt_mcs(packets, 15.0, lambda: AWGN(seed=0), target=0.01)
    assert hi.mcs >= lo.mcs and hi.expected_uses <= lo.expected_uses


def test_demo_accuracy_rises_or_holds_with_snr_and_a_warm_rerun_is_fast(tmp_path, digits_family):
    import time

    from flowcodec.demo import DemoConfig, run_demo

    cfg = DemoConfig.quick("digits")
    t0 = time.perf_counter()
    rows, meta = run_demo(cfg, tmp_path, progress=False, use_cache=False)
    cold = time.perf_counter() - t0
    assert not meta["cached"]
    n = meta["samples"]
    for ch in cfg.channels:
        for rp in {r["rate_point"] for r in rows}:
            pts = sorted((r["snr_db"], r) for r in rows
                         if r["channel"] == ch and r["rate_point"] == rp)  # fmt: skip
            accs = [p[1]["accuracy"] for p in pts]
            mcs = [p[1]["mcs"] for p in pts]
            assert all(b >= a - 1.0 / n for a, b in zip(accs, accs[1:])), (ch, rp, accs)
            assert mcs == sorted(mcs), (ch, mcs)
            hi = pts[-1][1]  # at the highest SNR the target is met
            assert hi["uplink_packet_loss"] <= 0.05, hi
    t0 = time.perf_counter()
    again, meta2 = run_demo(cfg, tmp_path, progress=False)
    warm = time.perf_counter() - t0
    assert meta2["cached"] and again == rows
    assert warm < cold / 2
    import csv

    with open(tmp_path / "demo.csv") as f:
        assert {"mcs", "target_bler", "expected_loss"} <= set(next(csv.DictReader(f)))


# --- item 8: the digits figures in the docs come from one recorded run -------------------------
def test_docs_quote_the_digits_figures_of_one_recorded_run():
    """docs/demo_run.json records the run (command, date, machine) behind docs/demo.csv and the
    digits family's accuracies; README, family.md and results.md quote exactly those."""
    from flowcodec.demo import markdown_table, read_csv

    run = json.loads((ROOT / "docs" / "demo_run.json").read_text())
    accs = [f"{100 * a:.2f}" for a in run["family_test_accuracy"]]
    assert run["command"].startswith("flowcodec demo") and run["date_utc"]
    readme = (ROOT / "README.md").read_text()
    family = (ROOT / "docs" / "family.md").read_text()
    results = (ROOT / "docs" / "results.md").read_text()
    for doc, text in (("README.md", readme), ("family.md", family), ("results.md", results)):
        assert " / ".join(f"{a} %" for a in accs) in text or all(
            f"| {a} %" in text for a in accs), f"{doc} does not quote {accs}"
        assert "demo_run.json" in text, f"{doc} does not say which run"
    assert "99.2 % or above" not in readme
    table = markdown_table(read_csv(ROOT / "docs" / "demo.csv"))
    assert table in results, "results.md's demo table is not the one made from docs/demo.csv"


def test_demo_plot_shows_the_mcs_and_explains_rate_points(tmp_path, monkeypatch):
    import matplotlib.figure

    from flowcodec.demo import DemoConfig, _write

    seen = {}

    def savefig(fig, path, **kw):
        seen["ylabels"] = [a.get_ylabel() for a in fig.axes]
        seen["title"] = fig._suptitle.get_text()
        seen["notes"] = [t.get_text() for a in fig.axes for t in a.texts]

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    rows = [{"channel": ch, "snr_db": s, "rate_point": "lam1", "mcs": m, "accuracy": 0.9,
             "bytes_per_sample": 100.0, "latency_ms": 1.0, "exit_device": 0.9, "exit_edge": 0.05,
             "exit_cloud": 0.05, "uplink_packet_loss": 0.0}
            for ch in ("awgn", "rayleigh") for s, m in ((0.0, 3), (10.0, 12))]  # fmt: skip
    _write(rows, tmp_path, DemoConfig())
    assert any("MCS" in y for y in seen["ylabels"])
    assert "12" in seen["notes"] and "3" in seen["notes"]  # each point names its MCS
    assert "rate weight" in seen["title"]  # what "lam1" means
