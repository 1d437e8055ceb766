"""Experiment configs are checked by pydantic models (flowcodec.schema): one ConfigError names
every bad key path at once, with what is allowed there; every shipped config passes unchanged."""

from __future__ import annotations

import copy
import doctest
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from flowcodec import config as config_module
from flowcodec import schema as schema_module
from flowcodec.config import validate_latency_config, validate_rd_config
from flowcodec.errors import ConfigError
from flowcodec.snr import validate_config as validate_snr_config
from flowcodec.sweeps import get_sweep

ROOT = Path(__file__).resolve().parents[1]
VALIDATORS = {"rd": validate_rd_config, "latency": validate_latency_config,
              "snr": validate_snr_config}  # fmt: skip
SHIPPED = sorted(p for kind in VALIDATORS for p in (ROOT / "experiments").glob(f"{kind}_*.json"))


def shipped(name: str) -> dict:
    return json.loads((ROOT / "experiments" / name).read_text())


def message(fn, cfg) -> str:
    with pytest.raises(ConfigError) as e:
        fn(cfg)
    assert isinstance(e.value.__cause__, (ValidationError, type(None)))
    return str(e.value)


@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_every_shipped_config_validates_unchanged(path):
    kind = path.stem.split("_")[0]
    cfg = json.loads(path.read_text())
    before = copy.deepcopy(cfg)
    assert VALIDATORS[kind](cfg, str(path)) is cfg
    assert cfg == before  # nothing filled in or coerced: the same experiment plan
    assert get_sweep(kind).load(str(path)) == before  # found and checked by the runner


def test_several_mistakes_in_one_rd_config_are_all_named_at_once():
    cfg = shipped("rd_digits.json")
    cfg.update(member=9, seed="x", colour=1, dataset="nope")
    cfg["codecs"][1].update(kwargs={"bitz": 4}, sweep={"bits": []})
    cfg["codecs"][5]["train"].update(drop_prob=1.0, epochz=1)
    cfg["channels"][0].update(loss_rate=float("nan"))
    msg = message(validate_rd_config, cfg)
    assert msg.startswith("rd config has 9 problems:\n")
    for line in [
        "dataset: 'nope' is not allowed; allowed: cifar10, digits",
        "member: 9 is out of range; allowed: an integer in 1..3 (the digits family has 3 members)",
        "seed: expected an integer, got str 'x'",
        "colour: unknown key; allowed: title, dataset, family, member, point, test_subset, "
        "fit_samples, seed, codecs, channels",
        "codecs[1].sweep.bits: needs at least 1 item(s), got 0",
        "codecs[1].kwargs: codec 'quant' takes no argument 'bitz'; allowed: bits, packets",
        "codecs[5].train.drop_prob: 1.0 is out of range; allowed: a number in [0, 1)",
        "codecs[5].train.epochz: unknown key; allowed: lam, epochs, beta, drop_prob",
        "channels[0].loss_rate: nan is not finite; allowed: a number in [0, 1]",
    ]:  # fmt: skip
        assert "\n  " + line in msg, line
    assert isinstance(pytest.raises(ConfigError, validate_rd_config, cfg).value.__cause__,
                      ValidationError)  # fmt: skip


def test_several_mistakes_in_one_latency_config_are_all_named_at_once():
    cfg = shipped("latency_digits.json")
    cfg.update(samples=1, framing="frames", compute={"gpu": 1.0, "edge": -1}, cell_seeds="yes")
    cfg["options"][0].pop("point")
    cfg["options"][1]["train"] = {"bogus": 1}
    cfg["input_codec"]["codec"] = "png"
    msg = message(validate_latency_config, cfg)
    assert "latency config has 8 problems" in msg
    for words in ["samples: 1 is out of range; allowed: an integer >= 2",
                  "framing: 'frames' is not allowed; allowed: sample, session",
                  "compute.gpu: unknown key; allowed: device, edge, cloud",
                  "compute.edge: -1 is out of range; allowed: a number > 0",
                  "cell_seeds: expected true or false, got str 'yes'",
                  "options[0].point: missing (required)",
                  "options[1].train.bogus: unknown key; allowed: lam, beta, epochs",
                  "input_codec.codec: 'png' is not allowed; allowed: jpeg, webp"]:
        assert words in msg, words


def test_several_mistakes_in_one_snr_config_are_all_named_at_once():
    cfg = shipped("snr_digits.json")
    cfg.update(snrs=[-40, 0, "x", 10], channels=["wifi", "awgn", "rayleigh"], colour=None)
    cfg["jscc"][0].update(uses=[0], views=True)
    cfg["jscc"][1]["codec"] = "@nobody"
    cfg["digital"].update(mcs=[29], exact_budgets=[5])
    msg = message(validate_snr_config, cfg)
    assert "snr config has 9 problems" in msg
    for words in ["snrs[0]: -40 is out of range; allowed: a number in [-30, 60] (dB)",
                  "snrs[2]: expected a number in [-30, 60] (dB), got str 'x'",
                  "channels[0]: 'wifi' is not allowed; allowed: awgn, rayleigh",
                  "colour: unknown key; allowed: title, dataset, family",
                  "jscc[0].uses: expected 'schedule' or a list of channel-use counts",
                  "jscc[0].views: expected an integer in 1..4, got bool True",
                  "jscc[1].codec: '@nobody' names no earlier jscc entry; earlier: 'jscc'",
                  "digital.mcs[0]: 29 is out of range; allowed: an integer in 0..28",
                  "digital.exact_budgets[0]: 5 is not allowed; allowed: 4, 8, 16"]:
        assert words in msg, words


KEY = st.text(st.characters(min_codepoint=97, max_codepoint=122), min_size=1, max_size=8)


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(top=st.sets(KEY.map("x_{}".format), max_size=3),
       entry=st.sets(KEY.map("y_{}".format), max_size=3))  # fmt: skip
def test_unknown_keys_are_each_named_with_the_allowed_keys(top, entry):
    cfg = shipped("rd_digits.json")
    cfg.update(dict.fromkeys(top, 1))
    cfg["codecs"][0].update(dict.fromkeys(entry, 1))
    if not top and not entry:
        assert validate_rd_config(cfg) is cfg
        return
    msg = message(validate_rd_config, cfg)
    n = len(top) + len(entry)
    assert (f"has {n} problems" in msg) if n > 1 else "problems" not in msg
    for k in top:
        assert f"{k}: unknown key; allowed: title, dataset, family, member, point" in msg
    for k in entry:
        assert f"codecs[0].{k}: unknown key; allowed: group, codec, label, point, kwargs" in msg


MISTAKES = {  # one mistake each, and the path the message names
    "member": (lambda c: c.update(member=0), "member: 0 is out of range"),
    "point": (lambda c: c.update(point=4), "point: 4 is out of range"),
    "seed": (lambda c: c.update(seed=1.5), "seed: expected an integer, got float 1.5"),
    "title": (lambda c: c.update(title=None), "title: expected a string, got null"),
    "fit": (lambda c: c["codecs"][2].update(fit=1), "codecs[2].fit: expected true or false"),
    "lam": (lambda c: c["codecs"][6]["train"].update(lam=[-1]), "codecs[6].train.lam[0]: -1"),
    "views": (lambda c: c["codecs"][0].update(views=2), "codecs[0].views: only used with"),
    "label": (lambda c: c["codecs"][3].update(label="q{nope}"), "codecs[3].label: {nope}"),
    "channel": (lambda c: c["channels"][1].update(codecs=[]), "channels[1].codecs: needs at"),
    "flip": (lambda c: c["channels"][1].update(flip_prob=0.7), "channels[1].flip_prob: 0.7 is"),
}


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sets(st.sampled_from(sorted(MISTAKES)), min_size=2))
def test_any_set_of_mistakes_is_listed_whole_in_one_error(names):
    cfg = shipped("rd_digits.json")
    for n in names:
        MISTAKES[n][0](cfg)
    msg = message(validate_rd_config, cfg)
    assert f"rd config has {len(names)} problems:" in msg
    for n in names:
        assert MISTAKES[n][1] in msg, n


def test_configs_found_by_name_in_flowcodec_configs_are_checked_whole(tmp_path, monkeypatch):
    cfg = shipped("latency_digits.json")
    cfg.update(samples="many", colour=1)
    (tmp_path / "latency_mine.json").write_text(json.dumps(cfg))
    monkeypatch.setenv("FLOWCODEC_CONFIGS", str(tmp_path))
    with pytest.raises(ConfigError) as e:
        get_sweep("latency").load("mine")
    assert str(tmp_path / "latency_mine.json") in str(e.value)
    assert "2 problems" in str(e.value) and "samples: expected an integer >= 2" in str(e.value)


def test_not_an_object_is_one_problem():
    for fn in VALIDATORS.values():
        assert "expected a JSON object, got list" in message(fn, [1])


@pytest.mark.parametrize("module", [schema_module, config_module])
def test_the_documented_examples_run(module):
    assert doctest.testmod(module).failed == 0
