"""``flowcodec snr``: config validation, the separation choice, and a small digits run."""

from __future__ import annotations

import copy
import csv
import json

import pytest

from flowcodec.errors import ConfigError
from flowcodec.snr import best_digital, load_config, run_snr, validate_config

TINY = {
    "dataset": "digits", "family": "digits", "member": 3, "point": 2, "samples": 40,
    "seed": 0, "snrs": [-5, 10], "channels": ["awgn", "rayleigh"], "budgets": [8, 64],
    "uses_plot_snrs": [10],
    "jscc": [
        {"label": "j", "uses": [2, 4],
         "train": {"kwargs": {"symbols": 4, "stem": [[32, True]], "hidden": 16, "film": 8,
                              "levels": [2, 4]},
                   "epochs": 1, "batch_size": 64, "max_steps": 2}},
        {"label": "j told", "codec": "@j", "uses": [4], "told_snr": 10, "channels": ["awgn"]},
        {"label": "j 2 views", "codec": "@j", "uses": [4], "views": 2, "channels": ["awgn"]},
        {"label": "q", "uses": [4], "uncoded": True, "channels": ["awgn"],
         "train": {"kwargs": {"symbols": 4, "stem": [[32, True]], "hidden": 16, "film": 8,
                              "constellation": "qam16"},
                   "epochs": 1, "batch_size": 64, "max_steps": 2}},
    ],
    "digital": {"train": {"kwargs": {"latent": 4, "stem": [[32, True]], "hidden": 16,
                                     "rates": 2},
                          "lams": [1.0, 0.3], "epochs": 1, "batch_size": 64},
                "mcs": [0, 9, 20], "exact_budgets": [64], "exact_samples": 10},
}  # fmt: skip


def test_shipped_configs_validate():
    for name in ("digits", "cifar10"):
        cfg = load_config(name)
        assert cfg["snrs"] and cfg["jscc"]


@pytest.mark.parametrize("path,value,word", [
    (("snrs",), [], "snrs"),
    (("snrs",), [-5, 99], "snrs"),
    (("channels",), ["wifi"], "channels"),
    (("budgets",), [0], "budgets"),
    (("member",), 4, "member"),
    (("jscc", 0, "uses"), [0], "uses"),
    (("jscc", 1, "codec"), "@nobody", "earlier"),
    (("jscc", 1, "views"), 5, "views"),
    (("jscc", 1, "views"), True, "views"),
    (("jscc", 0, "train", "epochz"), 3, "epochz"),
    (("jscc", 0, "train", "kwargs", "symbols"), 0, "symbols"),
    (("digital", "mcs"), [29], "mcs"),
    (("digital", "exact_budgets"), [16], "exact_budgets"),
    (("uses_plot_snrs",), [3], "uses_plot_snrs"),
    (("colour",), "red", "colour"),
])  # fmt: skip
def test_bad_configs_name_the_key(path, value, word):
    cfg = copy.deepcopy(TINY)
    node = cfg
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=word):
        validate_config(cfg)


def test_best_digital_takes_the_most_accurate_then_the_lowest_mcs():
    assert best_digital({(0, 5): 0.5, (1, 3): 0.7, (0, 9): 0.7}) == (1, 3)
    assert best_digital({(2, 4): 0.1, (0, 4): 0.1}) == (0, 4)


def test_a_small_digits_run_writes_rows_csv_and_plots(tmp_path, digits_family):
    rows = run_snr(copy.deepcopy(TINY), tmp_path, progress=False)
    ref = rows[0]
    assert ref.scheme == "reference" and 0 < ref.accuracy <= 1 and ref.n == 40
    jscc = [r for r in rows if r.scheme == "jscc"]
    # j: 2 channels x 2 SNRs x 2 uses; j told, j 2 views, q (uncoded): 2 SNRs each
    assert len(jscc) == 8 + 2 + 2 + 2
    views = [r for r in jscc if r.label == "j 2 views"]
    assert [r.uses for r in views] == [4.0, 4.0]  # one view's channel uses
    assert [r.snr_db for r in views] == [-5.0, 10.0] and all(r.n == 40 for r in views)
    assert {r.uses for r in jscc if r.label == "j"} == {2.0, 4.0}
    assert all(r.told_snr_db == 10.0 for r in jscc if r.label == "j told")
    assert all(r.link == "uncoded" for r in jscc if r.label == "q")
    sep = [r for r in rows if r.scheme == "separation" and r.link == "fast"]
    assert len(sep) == 2 * 2 * 2  # channels x SNRs x budgets
    assert all(r.uses <= r.budget for r in sep)
    exact = [r for r in rows if r.link == "exact"]
    assert len(exact) == 2 * 2 and all(r.n == 10 for r in exact)
    with open(tmp_path / "snr.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert json.loads((tmp_path / "snr.json").read_text())["rows"]
    assert (tmp_path / "snr.png").stat().st_size > 0 and (tmp_path / "uses.png").is_file()


def test_cli_runs_a_config_file(tmp_path):
    from flowcodec.cli import main

    cfg = copy.deepcopy(TINY)
    cfg["jscc"] = cfg["jscc"][:1]
    cfg["jscc"][0]["uses"] = [4]
    cfg["channels"] = ["awgn"]
    cfg["digital"]["exact_budgets"] = []
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert main(["snr", "--config", str(tmp_path / "c.json"), "--out", str(tmp_path / "o"),
                 "--no-progress"]) == 0
    assert (tmp_path / "o" / "snr.csv").is_file()
    bad = {**cfg, "snrs": "loud"}
    (tmp_path / "b.json").write_text(json.dumps(bad))
    assert main(["snr", "--config", str(tmp_path / "b.json"), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()  # nothing ran: the config was refused whole


def test_choose_compares_at_equal_channel_uses_and_names_the_winner():
    from flowcodec.snr import SNRRow, choose

    def row(scheme, acc, uses, budget=None, snr=0.0, told=None, link="analog"):
        return SNRRow(scheme, scheme, "awgn", link, snr, told, budget, uses, acc, 100)

    rows = [row("jscc", 0.80, 8, 8), row("jscc", 0.85, 16, 16), row("jscc", 0.99, 8, 8, told=5),
            row("separation", 0.10, 0, 8, link="fast"), row("separation", 0.90, 16, 16,
                                                            link="fast"),
            row("separation", 0.85, 16, 32, link="fast"),
            row("jscc", 0.5, 8, 8, snr=10.0)]  # fmt: skip
    picks = {p["budget"]: p for p in choose(rows)}
    assert picks[8]["winner"] == "jscc" and picks[8]["jscc_accuracy"] == 0.80  # no mismatch row
    assert picks[16]["winner"] == "separation" and picks[16]["jscc_uses"] == 16
    assert picks[32]["winner"] == "tie"
