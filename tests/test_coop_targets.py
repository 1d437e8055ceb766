"""Issue 28's targets read from benchmark rows (flowcodec.coop.targets)."""

from __future__ import annotations

import csv
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flowcodec.coop import targets as T
from flowcodec.errors import ConfigError


def rows(coop=0.85, m3=0.81, avg=0.82, cen=0.90, own=0.73, loss=0.80, drops=(0.845, 0.84),
         bytes_dev=11.7, dev_mflops=152.77, m2=152.77, selective=((0.84, 25.0, 0.9),),
         n=10000):
    r = [{"method": "device-own[0]", "accuracy": own, "device_mflops": m2, "kind": "m2", "n": n},
         {"method": "device-own[best]", "accuracy": own, "device_mflops": m2, "n": n},
         {"method": "member3-view[best]", "accuracy": m3, "device_mflops": 0.0, "n": n},
         {"method": "average-own", "accuracy": avg, "device_mflops": m2, "n": n},
         {"method": "centralised", "accuracy": cen, "device_mflops": 0.0, "n": n},
         {"method": "coop-all", "accuracy": coop, "bytes_per_device": bytes_dev,
          "bytes_total": 4 * bytes_dev, "device_mflops": dev_mflops, "n": n},
         {"method": "coop-loss", "accuracy": loss, "device_mflops": dev_mflops, "n": n}]
    r += [{"method": f"coop-drop[{k}]", "accuracy": a, "n": n} for k, a in enumerate(drops)]
    r += [{"method": "selective-confidence", "accuracy": a, "bytes_total": b, "threshold": t,
           "n": n} for a, b, t in selective]
    return r


def by_name(ts):
    return {t.name: t for t in ts}


def test_every_target_met_when_the_rows_meet_them():
    t = by_name(T.check(rows(coop=0.885, m3=0.84, avg=0.85, drops=(0.88, 0.878),
                             selective=((0.883, 25.0, 0.9),))))
    assert all(x.met for x in t.values()), [x for x in t.values() if not x.met]
    assert t["emergence-member3"].value == pytest.approx(4.5)
    assert t["drop-one"].value == pytest.approx(0.7)


def test_each_target_fails_on_its_own_row():
    base = dict(coop=0.885, m3=0.84, avg=0.85, drops=(0.88, 0.878),
                selective=((0.883, 25.0, 0.9),))
    # within 2 points of the bound and a 5-point single-view difficulty imply +3 over the
    # member's best view: that target cannot fail alone
    cases = {"emergence-member3": (dict(m3=0.86), {"single-view-difficulty"}),
             "emergence-average": (dict(avg=0.86), set()),
             "bytes": (dict(bytes_dev=16.5), set()),
             "centralised-gap": (dict(cen=0.91), set()),
             "single-view-difficulty": (dict(m3=0.65), set()),
             "drop-one": (dict(drops=(0.88, 0.87)), set()),
             "loss": (dict(loss=0.72), set()),
             "selective": (dict(selective=((0.881, 25.0, 0.9), (0.8845, 30.0, 0.95))), set()),
             "device-cost": (dict(dev_mflops=152.78), set())}
    for name, (change, also) in cases.items():
        t = by_name(T.check(rows(**{**base, **change})))
        assert t[name].met is False, name
        assert {x.name for x in t.values() if not x.met} == {name} | also, (name, t)


def test_selective_names_the_closest_rows_when_none_meets_it():
    t = by_name(T.check(rows(coop=0.85, selective=((0.849, 40.0, 0.95), (0.84, 20.0, 0.8)))))
    sel = t["selective"]
    assert sel.met is False
    assert "0.95" in sel.measured and "0.8" in sel.measured
    assert sel.value == pytest.approx(100 * (1 - 40.0 / (4 * 11.7)), abs=0.1)


def test_unknown_member2_cost_is_unknown_not_met():
    r = [x for x in rows() if x["method"] != "device-own[0]"]
    t = by_name(T.check(r))
    assert t["device-cost"].met is None
    assert by_name(T.check(r, member2_mflops=200.0))["device-cost"].met is True


def test_missing_rows_name_the_row():
    r = [x for x in rows() if x["method"] != "average-own"]
    with pytest.raises(ConfigError, match="average-own"):
        T.check(r)


@given(st.floats(0.05, 0.95), st.floats(0.05, 0.95), st.integers(100, 100000))
def test_difference_standard_error_shrinks_with_n(a, b, n):
    se = T._se(a, b, n)
    assert se > 0
    assert T._se(a, b, 4 * n) == pytest.approx(se / 2)


def test_csv_and_json_read_the_same_and_markdown_lists_every_run(tmp_path):
    r = rows()
    cols = sorted({k for x in r for k in x})
    with open(tmp_path / "coop.csv", "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(r)
    (tmp_path / "coop.json").write_text(json.dumps({"rows": r}))
    a = T.check(T.read_rows(tmp_path / "coop.csv"))
    b = T.check(T.read_rows(tmp_path / "coop.json"))
    assert a == b
    md = T.markdown_table([T.summary_row("run-a", r), T.summary_row("run-b", rows(coop=0.9))])
    lines = md.splitlines()
    assert len(lines) == 4 and "run-a" in lines[2] and "run-b" in lines[3]
    assert "85.00 %" in lines[2] and "90.00 %" in lines[3]


def test_bad_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such"):
        T.read_rows(tmp_path / "none.csv")
    (tmp_path / "x.json").write_text(json.dumps({"other": 1}))
    with pytest.raises(ConfigError, match="rows"):
        T.read_rows(tmp_path / "x.json")
    (tmp_path / "y.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match="method"):
        T.read_rows(tmp_path / "y.csv")


def test_command_prints_targets_and_markdown(tmp_path, capsys):
    (tmp_path / "coop.json").write_text(json.dumps({"rows": rows()}))
    assert T.main([str(tmp_path / "coop.json")]) == 0
    out = capsys.readouterr().out
    assert "emergence-member3" in out and "NOT met" in out
    assert T.main([str(tmp_path / "coop.json"), "--markdown", "--names", "x"]) == 0
    assert "| x |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no such"):
        T.main([str(tmp_path / "missing.csv")])


def test_flowcodec_coop_targets_subcommand(tmp_path, capsys):
    from flowcodec.cli import main as cli_main

    (tmp_path / "coop.json").write_text(json.dumps({"rows": rows()}))
    assert cli_main(["coop-targets", str(tmp_path / "coop.json"), "--markdown"]) == 0
    assert "85.00 %" in capsys.readouterr().out
    assert cli_main(["coop-targets", str(tmp_path / "coop.json"), "--names", "a", "b"]) != 0
    assert "2 names for 1 files" in capsys.readouterr().err
