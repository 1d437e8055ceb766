"""Experiment configs are checked whole, before any work (flowcodec.config): every shipped
config passes, a bad one is a ConfigError naming the key and what is allowed there, and a
config name resolves outside the checkout."""

from __future__ import annotations

import json

import pytest
from helpers import ROOT, latency_digits, rd_digits

from flowcodec.errors import ConfigError


# --- configs are checked whole, before any work ---------------------------------------------
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


# --- config names resolve outside the checkout ----------------------------------------------
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
