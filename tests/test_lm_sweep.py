"""The generate sweep (issue 29 item 4): session timelines on a duplex link add up as the
rules say, the cost model's crossover is where its two times are equal, the sweep's rows and
CSV hold every scheme, parameter and link, new schemes register with one line, and
``flowcodec lm sweep`` writes its files."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from flowcodec.errors import ConfigError
from flowcodec.family import build_family
from flowcodec.family.lm import SHAKESPEARE_CHARS
from flowcodec.lm import speculative as sp
from flowcodec.lm.speculative import GenerationTrace, Round
from flowcodec.lm.sweep import (
    FIELDS,
    SCHEMES,
    LMSweepConfig,
    Scheme,
    cost_model_inputs,
    crossover,
    expected_tokens_per_round,
    predict_edge,
    predict_speculative,
    predicted_crossover,
    run_lm_sweep,
    validation_prompts,
)
from flowcodec.lm.timeline import Duplex, LinkSetting, session_timeline

MS = 1e-3


def trace(*rounds: Round, scheme: str = "speculative") -> GenerationTrace:
    tr = GenerationTrace(scheme, [1, 2, 3])
    for r in rounds:
        tr._commit([0] * max(1, r.accepted + 1), ["edge"] * max(1, r.accepted + 1), r)
    return tr


def spec_round() -> Round:
    return Round(up_bytes=6, down_bytes=4, drafted=4, accepted=2, device_seconds=10 * MS,
                 edge_seconds=5 * MS)  # fmt: skip


def test_sequential_rounds_add_compute_transmission_and_the_round_trip():
    # per round: 10 ms drafting + 6 B at 8 kbit/s (6 ms) + 10 ms + 5 ms verifying
    # + 4 B at 4 kbit/s (8 ms) + 10 ms = 49 ms
    link = Duplex(LinkSetting(rtt_ms=20, up_kbps=8, down_kbps=4))
    tl = session_timeline(trace(spec_round(), spec_round()), link)
    assert tl.seconds == pytest.approx(98 * MS, abs=1e-12)
    assert tl.device_seconds == pytest.approx(20 * MS) and tl.edge_seconds == pytest.approx(10 * MS)
    assert (tl.messages, tl.up_attempts, tl.down_attempts, tl.retransmissions) == (4, 2, 2, 0)
    assert (tl.up_bytes, tl.down_bytes) == (12, 8)


def test_device_only_steps_do_not_touch_the_link():
    # gating: a step the device is sure of (1 ms), then one it asks about: 1 ms + 3 B at
    # 24 kbit/s (1 ms) + 2 ms at the edge + 3 B down (1 ms), no propagation delay
    tr = trace(Round(device_seconds=1 * MS),
               Round(up_bytes=3, down_bytes=3, device_seconds=1 * MS, edge_seconds=2 * MS),
               scheme="gated")  # fmt: skip
    tl = session_timeline(tr, Duplex(LinkSetting(rtt_ms=0, up_kbps=24)))
    assert tl.seconds == pytest.approx(6 * MS, abs=1e-12)
    assert tl.messages == 2


@pytest.mark.parametrize("down_kbps, expected_ms", [(8, 48), (1, 107)])
def test_edge_only_streams_while_the_downlink_keeps_up(down_kbps, expected_ms):
    # the prompt (10 B at 8 kbit/s: 10 ms) arrives at 20 ms; the edge computes a token every
    # 5 ms from 20 ms on; each 3-B token takes 3 ms down at 8 kbit/s (the edge is the
    # bottleneck: last token sent at 35 + 3, arrives 48 ms) or 24 ms at 1 kbit/s (the
    # downlink is: sends at 25-49, 49-73, 73-97, the last arrives at 107 ms)
    first = Round(up_bytes=10, down_bytes=3, edge_seconds=5 * MS)
    rest = [Round(down_bytes=3, edge_seconds=5 * MS) for _ in range(2)]
    tl = session_timeline(trace(first, *rest, scheme="edge"),
                          Duplex(LinkSetting(rtt_ms=20, up_kbps=8, down_kbps=down_kbps)))
    assert tl.seconds == pytest.approx(expected_ms * MS, abs=1e-12)


def test_a_lost_message_costs_its_transmission_and_a_round_trip():
    rounds = [spec_round() for _ in range(30)]
    clean = session_timeline(trace(*rounds), Duplex(LinkSetting(rtt_ms=20, up_kbps=8,
                                                                down_kbps=4)))  # fmt: skip
    lossy_link = LinkSetting(rtt_ms=20, up_kbps=8, down_kbps=4, loss=0.3, seed=5)
    lossy = session_timeline(trace(*rounds), Duplex(lossy_link, stream=2))
    again = session_timeline(trace(*rounds), Duplex(lossy_link, stream=2))
    lost_up, lost_down = lossy.up_attempts - 30, lossy.down_attempts - 30
    assert lost_up > 0 and lost_down > 0
    extra = lost_up * (6 * MS + 20 * MS) + lost_down * (8 * MS + 20 * MS)
    assert lossy.seconds == pytest.approx(clean.seconds + extra, abs=1e-9)
    assert lossy.up_bytes == 6 * lossy.up_attempts
    assert again.seconds == lossy.seconds  # the same seed and stream: the same losses


def test_a_fast_link_times_channel_uses_and_draws_losses_from_its_tables():
    from channels import FastLink

    mcs, snr = 9, 30.0
    d = Duplex(LinkSetting(up_kbps=100, mcs=mcs, snr_db=snr))
    times, attempts = d.send("up", 20)
    probe = FastLink(mcs=mcs, snr_db=snr)
    _, rep = probe.transmit([bytes(20)])
    sym_rate = 100e3 / probe.mcs.spectral_efficiency
    assert attempts == 1 and times == [pytest.approx(rep.per_packet_channel_uses[0] / sym_rate)]
    assert times[0] > 8 * 20 / 100e3  # coding and CRC cost time
    with pytest.raises(ConfigError, match="lost a 20-byte message"):
        Duplex(LinkSetting(up_kbps=100, mcs=mcs, snr_db=-20.0)).send("up", 20)


def test_bad_link_settings_name_every_problem():
    with pytest.raises(ConfigError) as e:
        LinkSetting(rtt_ms=-1, up_kbps=0, loss=1.0)
    assert all(k in str(e.value) for k in ("rtt_ms", "up_kbps", "loss"))
    with pytest.raises(ConfigError, match="either loss"):
        LinkSetting(loss=0.1, mcs=4, snr_db=5.0)


def test_the_cost_model_and_the_crossover_on_a_synthetic_case():
    assert expected_tokens_per_round(0.5, 2) == pytest.approx(1.75)
    assert expected_tokens_per_round(1.0, 4) == 5 and expected_tokens_per_round(0.0, 4) == 1
    # n = 60, tau = 3: 20 rounds of 2 x 1 ms + 3 ms + R against R + 60 x 2 ms:
    # 20 (5 + R) = R + 120  ->  R = 20 / 19 ms
    r = predicted_crossover(60, 3.0, 2, 1 * MS, 3 * MS, 2 * MS)
    assert r == pytest.approx(20 / 19 * MS)
    assert predict_speculative(60, 3.0, 2, 1 * MS, 3 * MS, r) == pytest.approx(
        predict_edge(60, 2 * MS, r))  # fmt: skip
    assert predict_speculative(60, 3.0, 2, 1 * MS, 3 * MS, 0.0) == pytest.approx(60 / 0.1)
    # long runs: the docs' tau T_e - gamma T_d - T_v(gamma) = 6 - 2 - 3 = 1 ms
    assert predicted_crossover(10**7, 3.0, 2, 1 * MS, 3 * MS, 2 * MS) == pytest.approx(1 * MS,
                                                                                      rel=1e-5)
    assert predicted_crossover(3, 3.0, 2, 1 * MS, 3 * MS, 2 * MS) is None  # one round
    # measured: the first sign change of a - b, interpolated
    assert crossover([0, 10, 20], [10, 6, 2], [8, 8, 8]) == pytest.approx(5.0)
    assert crossover([0, 10, 20], [10, 9, 9], [8, 8, 8]) is None
    assert crossover([0, 10], [8, 6], [8, 8]) == 0.0
    assert crossover([0, 10, 30], [4, 6, 12], [8, 8, 8]) == pytest.approx(10 + 20 / 3)


def test_the_cost_model_inputs_come_from_the_rounds_after_the_first():
    def rounds(*spec, scheme):
        return trace(*(Round(drafted=d, accepted=a, device_seconds=ds * MS,
                             edge_seconds=es * MS) for d, a, ds, es in spec), scheme=scheme)

    edge = rounds((0, 0, 0, 50), (0, 0, 0, 2), (0, 0, 0, 4), (0, 0, 0, 3), scheme="edge")
    # gamma 2: the first round (the prompt) and the last (1 draft) are not timed; an
    # examined draft was accepted 4 times and rejected twice (a = 2/3, not 4 of 7 drafted)
    spec = rounds((2, 2, 10, 40), (2, 0, 2, 5), (2, 1, 4, 7), (1, 1, 1, 3), scheme="speculative")
    m = cost_model_inputs({("edge", None): [edge], ("speculative", 2): [spec]})
    assert m["t_edge"] == pytest.approx(3 * MS)
    g = m["gammas"][2]
    assert g["acceptance"] == pytest.approx(2 / 3)
    assert g["tau"] == pytest.approx((1 - (2 / 3) ** 3) / (1 / 3))
    assert g["t_draft"] == pytest.approx(1.5 * MS) and g["t_verify"] == pytest.approx(6 * MS)
    assert g["tokens_per_round"] == pytest.approx(len(spec.tokens) / 4)


@pytest.fixture(scope="module")
def fam():
    torch.manual_seed(0)
    f = build_family("shakespeare-char", dim=32, heads=2, depths=(1, 1, 1), context=16)
    with torch.no_grad():  # peaked exits, so gating sends some tokens and keeps others
        for ex in f.exits:
            ex.head.weight.mul_(25.0)
    return f.eval()


VAL = torch.randint(0, 65, (400,), generator=torch.Generator().manual_seed(1))


def small(**kw) -> LMSweepConfig:
    base = dict(prompts=2, prompt_len=4, new=8, gammas=[1, 3], thresholds=[0.5],
                rtts_ms=[0, 20], losses=[0.0, 0.2], loss_windows=2)  # fmt: skip
    return LMSweepConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def swept(fam, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    return run_lm_sweep(fam, VAL, small(), out, progress=False), out


def test_the_sweep_has_a_row_per_scheme_parameter_and_link(swept):
    res, out = swept
    recs = res["records"]
    labels = ["edge", "device", "speculative g=1", "speculative g=3", "gated t=0.5"]
    assert len(recs) == 4 * len(labels)  # 2 RTTs x 2 loss rates
    for lab in labels:
        assert sorted((r["loss"], r["rtt_ms"]) for r in recs if r["label"] == lab) == [
            (0.0, 0), (0.0, 20), (0.2, 0), (0.2, 20)]  # fmt: skip
    with open(out / "sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == FIELDS and len(rows) == len(recs)
    assert [r["label"] for r in rows] == [r["label"] for r in recs]
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["config"]["gammas"] == [1, 3] and len(saved["records"]) == len(recs)
    for name in ("tokens_per_s.png", "bytes_per_token.png", "quality.png", "samples.txt"):
        assert (out / name).stat().st_size > 0
    assert all(lab in (out / "samples.txt").read_text() for lab in labels)


def test_rows_measure_what_the_schemes_do(swept, fam):
    res, _ = swept
    by = {(r["label"], r["loss"], r["rtt_ms"]): r for r in res["records"]}
    n = 2 * 8
    for g in (1, 3):  # exact: greedy speculative output is edge-only's
        r = by[(f"speculative g={g}", 0.0, 0)]
        assert r["agreement"] == r["identical_outputs"] == 1.0 and r["identical_prefix"] == 8
        assert r["val_loss_nats"] == by[("edge", 0.0, 0)]["val_loss_nats"]
        assert r["tokens_per_s"] > by[(f"speculative g={g}", 0.0, 20)]["tokens_per_s"]
        assert r["predicted_tokens_per_s"] > 0 and by[(f"speculative g={g}", 0.2, 0)][
            "predicted_tokens_per_s"] == ""  # no prediction on a lossy link
    edge = by[("edge", 0.0, 0)]
    prompt_msg, token_msg = 2 + 4, 3
    assert edge["bytes_up_per_token"] == pytest.approx(2 * prompt_msg / n)
    assert edge["bytes_down_per_token"] == pytest.approx(token_msg)
    assert edge["round_trips_per_token"] == pytest.approx(2 / n)
    assert edge["edge_passes_per_token"] == 1.0 and edge["edge_token_fraction"] == 1.0
    device = [r for r in res["records"] if r["label"] == "device"]
    assert {r["tokens_per_s"] for r in device} == {device[0]["tokens_per_s"]}  # no link
    assert device[0]["bytes_per_token"] == 0 and device[0]["round_trips_per_token"] == 0
    lossy = [r for r in res["records"] if r["loss"] == 0.2 and r["scheme"] != "device"]
    assert sum(r["retransmissions_per_token"] for r in lossy) > 0
    for r in lossy:  # the same generations: losses only add time and bytes
        clean = by[(r["label"], 0.0, r["rtt_ms"])]
        assert r["tokens_per_s"] <= clean["tokens_per_s"]
        assert r["bytes_sent_per_token"] >= clean["bytes_sent_per_token"] == r["bytes_per_token"]
        if r["scheme"] != "edge":  # every message is on the critical path (edge only can
            # resend a streamed token while the edge computes the next)
            slower = r["tokens_per_s"] < clean["tokens_per_s"]
            assert slower == (r["retransmissions_per_token"] > 0)
    assert len(res["crossovers"]) == 2 * 2  # per (rate, loss) and gamma
    tl = res["teacher_forced"]
    assert by[("device", 0.0, 0)]["val_loss_nats"] == tl["draft_loss"]


def test_a_scheme_registers_with_one_line(fam, monkeypatch):
    monkeypatch.setitem(SCHEMES, "edge-twice", Scheme(
        lambda f, p, n, g, c: sp.generate_speculative(f, p, n, gamma=g), "gammas"))
    res = run_lm_sweep(fam, VAL, small(schemes=["edge-twice"], gammas=[2], rtts_ms=[5],
                                       losses=[0.0]), progress=False)  # fmt: skip
    assert [r["label"] for r in res["records"]] == ["edge", "edge-twice g=2"]
    assert res["records"][1]["agreement"] == 1.0


def test_the_codec_scheme_runs_with_a_codec_and_counts_its_bytes(fam):
    from flowcodec.lm.codec import HiddenStateCodec

    torch.manual_seed(0)
    codec = HiddenStateCodec(fam.feature_shape(1), point=1, latent=4, hidden=16, rates=2,
                             vocab=fam.vocab).init_from(fam).eval()  # fmt: skip
    codec.update(force=True)
    cfg = small(schemes=["speculative-codec"], gammas=[2], rtts_ms=[0], losses=[0.0])
    with pytest.raises(ConfigError, match="--codec"):
        run_lm_sweep(fam, VAL, cfg, progress=False)
    res = run_lm_sweep(fam, VAL, small(schemes=["speculative-codec"], gammas=[2], rtts_ms=[0],
                                       losses=[0.0], codec=codec, codec_rate=1),
                       progress=False)  # fmt: skip
    row = res["records"][1]
    assert row["label"] == "speculative-codec g=2"
    assert 0 < row["codec_bytes_per_token"] < row["bytes_up_per_token"]
    assert res["records"][0]["codec_bytes_per_token"] == 0  # edge only sends ids
    assert res["config"]["codec"] == "HiddenStateCodec"


def test_a_bad_config_names_every_problem(fam):
    with pytest.raises(ConfigError) as e:
        run_lm_sweep(fam, VAL, small(schemes=["speculative", "nope"], gammas=[0],
                                     prompt_len=12, new=8, repeats=0), progress=False)
    msg = str(e.value)
    assert all(k in msg for k in ("nope", "gammas", "context", "repeats"))


def test_prompts_are_evenly_spaced_validation_windows():
    val = torch.arange(101)
    got = validation_prompts(val, 4, 10)
    assert [s for s, _ in got] == [0, 22, 45, 67]
    assert got[1][1] == list(range(22, 32))
    with pytest.raises(ConfigError):
        validation_prompts(val[:5], 1, 10)


def test_the_command_writes_its_files(fam, tmp_path, capsys):
    from flowcodec.lm.cli import main
    from flowcodec.lm.train import save_lm

    save_lm(fam, tmp_path / "fam", half=False)
    g = torch.Generator().manual_seed(2)
    text = "".join(SHAKESPEARE_CHARS[i] for i in torch.randint(0, 65, (600,), generator=g))
    (tmp_path / "tinyshakespeare.txt").write_text(text)
    argv = ["sweep", "--weights", str(tmp_path / "fam"), "--data", str(tmp_path),
            "--out", str(tmp_path / "out"), "--prompts", "2", "--prompt-len", "4", "--new", "6",
            "--gammas", "2", "--thresholds", "0.5", "--rtts", "0", "10", "--loss-windows", "2",
            "--threads", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "speculative g=2" in printed and "crossover RTT" in printed
    for name in ("sweep.csv", "sweep.json", "samples.txt", "tokens_per_s.png"):
        assert (tmp_path / "out" / name).is_file()
    bad = list(argv)
    bad[bad.index("--gammas") + 1] = "0"
    bad[bad.index("--data") + 1] = str(tmp_path / "nowhere")
    assert main(bad) == 2  # a ConfigError, found before the (missing) data are looked for
    assert "gammas" in capsys.readouterr().err
