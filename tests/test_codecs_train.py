"""Training codecs for the task, evaluating them, and the rd command (digits, CPU)."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from flowcodec.codecs import build_codec
from flowcodec.codecs.train import evaluate_codec, train_codec
from flowcodec.data import load_dataset
from flowcodec.errors import ConfigError
from flowcodec.family import build_family


@pytest.fixture(scope="module")
def digits():
    torch.manual_seed(0)
    fam = build_family("digits").eval()  # untrained weights: fast, and enough for contracts
    train, test = load_dataset("digits")
    return fam, train.subset(256), test.subset(64)


def test_rate_term_lowers_the_estimated_rate(digits):
    fam, train, test = digits
    bits = {}
    for lam in (0.0, 20.0):
        torch.manual_seed(0)
        codec = build_codec("factorized", (16, 8, 8), latent=4, hidden=8)
        res = train_codec(codec, fam, 3, 1, train, test, lam=lam, epochs=1, max_steps=20,
                          batch_size=32, progress=False)  # fmt: skip
        assert not codec.training
        assert res.history and all(k in res.history[-1] for k in ("task", "distill", "kbits"))
        assert 0.0 <= res.test_accuracy <= 1.0
        bits[lam] = res.est_bytes
    assert bits[20.0] < bits[0.0]


def test_drop_and_flip_training_run_and_evaluate_with_real_bytes(digits):
    fam, train, test = digits
    head, tail = fam.split(3, 1)
    for name, kw in (("factorized", {"drop_prob": 0.2}), ("binary", {"flip_prob": 0.1})):
        codec = build_codec(name, (16, 8, 8), latent=4, hidden=8, packets=2)
        train_codec(codec, fam, 3, 1, train, None, lam=0.1, epochs=1, max_steps=5,
                    batch_size=32, progress=False, **kw)  # fmt: skip
        codec.update(force=True)
        ev = evaluate_codec(codec, head, tail, test)
        want = sum(len(s.to_bytes()) for s in codec.compress(head(next(test.batches(64))[0])))
        assert ev.bytes_per_image == pytest.approx(want / len(test))
        assert ev.n == len(test)


def test_kd_loss_is_zero_on_the_teacher_and_positive_elsewhere():
    from flowcodec.training import kd_loss as _kd_loss

    g = torch.Generator().manual_seed(0)
    t = torch.randn(16, 10, generator=g)
    assert float(_kd_loss(t, t, 2.0)) == pytest.approx(0.0, abs=1e-6)
    s = torch.randn(16, 10, generator=g)
    assert float(_kd_loss(s, t, 2.0)) > 0.01


def test_cached_views_hold_the_frozen_parts_outputs(digits):
    from flowcodec.codecs.train import cache_views

    fam, train, _ = digits
    head, tail = fam.split(3, 1)
    plain = train.subset(len(train))
    plain.augment = False  # without augmentation every view equals head(x) and tail(head(x))
    views = cache_views(head, tail, plain, 2, torch.Generator().manual_seed(0), progress=False)
    assert len(views) == 2
    x, y = next(plain.batches(len(plain)))
    with torch.no_grad():
        h = head(x)
        t = tail(h)
    for hs, ys, ts in views:
        assert hs.dtype == torch.float16 and torch.equal(ys, y)
        torch.testing.assert_close(hs.float(), h, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(ts, t)


def test_distillation_from_cached_views_lowers_the_kd_term(digits):
    fam, train, test = digits
    torch.manual_seed(0)
    codec = build_codec("factorized", (16, 8, 8), latent=4, hidden=8)
    res = train_codec(codec, fam, 3, 1, train, test, lam=0.0, beta=0.0, kd=1.0, views=2,
                      epochs=4, batch_size=32, progress=False)  # fmt: skip
    assert res.epochs == 4 and all("kd" in h for h in res.history)
    assert res.history[-1]["kd"] < res.history[0]["kd"]
    with pytest.raises(ConfigError):
        train_codec(codec, fam, 3, 1, train, views=-1)


def test_train_codec_rejects_bad_settings(digits):
    fam, train, _ = digits
    codec = build_codec("factorized", (16, 8, 8), latent=4, hidden=8)
    with pytest.raises(ConfigError):
        train_codec(codec, fam, 3, 1, train, epochs=0)
    with pytest.raises(ConfigError):
        train_codec(codec, fam, 3, 1, train, drop_prob=1.0)


def test_rd_writes_csv_json_and_plots(digits, tmp_path):
    from flowcodec.rd import run_rd

    fam, _, _ = digits
    cfg = {
        "dataset": "digits", "family": "digits", "member": 3, "point": 1,
        "test_subset": 40, "fit_samples": 200,
        "codecs": [
            {"group": "raw", "codec": "raw", "label": "raw-{dtype}",
             "sweep": {"dtype": ["float32", "float16"]}},
            {"group": "quant", "codec": "quant", "label": "q{bits}", "sweep": {"bits": [2, 8]}},
            {"group": "jpeg", "codec": "jpeg", "point": 0, "label": "jpeg-q{quality}",
             "sweep": {"quality": [50]}},
            {"group": "learned", "codec": "factorized", "label": "f-{lam}",
             "kwargs": {"latent": 4, "hidden": 8, "packets": 2},
             "train": {"lam": [0.5], "epochs": 1, "batch_size": 256}},
        ],
        "channels": [{"loss_rate": 0.5, "seed": 0, "codecs": ["q8", "f-0.5"]}],
    }  # fmt: skip
    rows = run_rd(cfg, tmp_path, progress=False, family=fam)
    labels = {(r.label, r.condition) for r in rows}
    assert ("raw-float32", "clean") in labels and ("f-0.5", "iid loss 0.5") in labels
    raw32 = next(r for r in rows if r.label == "raw-float32")
    assert raw32.bytes_per_image > 16 * 8 * 8 * 4  # payload plus header and framing
    q = {r.label: r for r in rows if r.condition == "clean"}
    assert q["q2"].bytes_per_image < q["q8"].bytes_per_image
    assert q["jpeg-q50"].point == 0 and q["jpeg-q50"].device_flops_pct == 0
    assert q["f-0.5"].est_bytes is not None and q["f-0.5"].coder_overhead_pct is not None
    with open(tmp_path / "rd.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert json.loads((tmp_path / "rd.json").read_text())["rows"]
    assert (tmp_path / "rd.png").stat().st_size > 0 and (tmp_path / "channel.png").is_file()
    # session framing drops the header: 48 + 10 * packets bytes less, minus its own framing
    assert q["f-0.5"].session_bytes < q["f-0.5"].bytes_per_image - 40
    with open(tmp_path / "targets.csv") as f:
        targets = list(csv.DictReader(f))
    assert {t["framing"] for t in targets} == {"self-contained", "session"}
    assert all(t["label"] == "f-0.5" for t in targets)


def test_compare_finds_the_cheapest_input_row_at_least_as_accurate():
    from flowcodec.rd import RDRow, compare

    def row(label, group, codec, acc, b, s):
        return RDRow(label, group, codec, 1, "clean", acc, b, s, b, None, None, 0, 0, 10, 0)

    rows = [row("uncompressed", "reference", "none", 0.90, 0, 0),
            row("raw-float32", "raw", "raw", 0.90, 1000, 960),
            row("webp-a", "webp", "webp", 0.85, 100, 60),
            row("webp-b", "webp", "webp", 0.89, 300, 260),
            row("jpeg-c", "jpeg", "jpeg", 0.895, 400, 360),
            row("fact", "learned", "factorized", 0.88, 80, 30),
            row("fact-hi", "learned", "factorized", 0.95, 80, 30)]  # fmt: skip
    got = {(c.label, c.framing): c for c in compare(rows)}
    c = got[("fact", "self-contained")]
    assert c.input_label == "webp-b" and c.input_ratio == pytest.approx(80 / 300)
    assert c.gap_points == pytest.approx(2.0) and c.float32_ratio == pytest.approx(0.08)
    s = got[("fact", "session")]
    assert s.input_bytes == 260 and s.input_ratio == pytest.approx(30 / 260)
    assert got[("fact-hi", "session")].input_label is None  # no input row is as accurate


def test_rd_config_errors(tmp_path):
    from flowcodec.rd import load_config

    with pytest.raises(ConfigError):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"dataset": "digits"}')
    with pytest.raises(ConfigError):
        load_config(bad)
