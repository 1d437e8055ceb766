"""Real tiers that do not trust concealed samples, and commands that fail loudly: numeric
arguments checked, fallbacks on stderr, a run in which every sample fell back exits 1."""

from __future__ import annotations

import json
import socket

import pytest
import torch

pytest.importorskip("grpc")

from helpers import raw_codec, untrained_digits_family  # noqa: E402

from channels import IIDPacketErasure  # noqa: E402
from flowcodec.codecs import build_codec  # noqa: E402
from flowcodec.pipeline import Flow, Hop, Tier  # noqa: E402
from flowcodec.serve import (  # noqa: E402
    LinkProxy,
    RemoteHop,
    ServeConfig,
    ServerThread,
    TierEngine,
    TierServer,
    TierSpec,
)
from flowcodec.serve.engine import CONCEALED_INPUT  # noqa: E402


@pytest.fixture(scope="module")
def fam():
    return untrained_digits_family()


def serve(engine, **cfg) -> ServerThread:
    return ServerThread(TierServer(engine, ServeConfig(**cfg))).start()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def xs(n, seed=0):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


class FirstCallsLost:
    """A link that loses every unit of its first ``n`` calls, then none."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def transmit(self, packets, snr_db=None, generator=None):
        self.calls += 1
        return [None if self.calls <= self.n else p for p in packets], None


def test_engine_marks_untrusted_streams(fam):
    codec = raw_codec(fam, 1, packets=4)
    streams = codec.compress(fam.features(xs(3), 1))
    streams[1].packets[0] = None  # 1 of 4: trusted at 0.5
    for k in range(3):
        streams[2].packets[k] = None  # 3 of 4: not trusted
    out = TierEngine(fam, TierSpec("edge", 1, 3), codec).run(streams)
    assert [o.kind for o in out] == ["answer", "answer", "concealed"]
    assert [o.concealed for o in out] == [0.0, 0.25, 0.75]
    lax = TierEngine(fam, TierSpec("edge", 1, 3, max_concealed=None), codec).run(streams)
    assert [o.kind for o in lax] == ["answer"] * 3
    fwd = TierEngine(fam, TierSpec("edge", 1, 2), codec, raw_codec(fam, 2)).run(streams)
    assert [o.kind for o in fwd] == ["forward", "forward", "concealed"]
    with pytest.raises(Exception, match="max_concealed"):
        TierSpec("edge", 1, 3, max_concealed=2.0)


def test_lost_packets_through_the_proxy_fall_back_on_the_device(fam):
    x = xs(4)
    with serve(TierEngine(fam, TierSpec("edge", 1, 3), raw_codec(fam, 1))) as se:
        with ServerThread(LinkProxy(se.address, IIDPacketErasure(1.0), 1e6)) as sp:
            hop = RemoteHop(raw_codec(fam, 1), sp.address, deadline_s=10.0)
            flow = Flow(fam, [Tier("device", 1e9, 1), Tier("edge", 1e12, 3)], [hop])
            res = flow.run(x)
            hop.close()
        stats = dict(se.server.stats)
    torch.testing.assert_close(res.logits, fam.member(1)(x))
    assert res.fallbacks() == {"concealed": 4} and stats["concealed_input"] == 4
    exit_flops = flow._exit_flops[0]
    for tr in res.traces:
        assert (tr.exit_tier, tr.fallback, tr.fallback_flops) == ("device", "concealed",
                                                                   exit_flops)  # fmt: skip
        assert tr.hops[0].concealed == 1.0 and tr.hops[0].packets_lost == 3
        assert tr.compute_flops["device"] == flow._stage_flops[0] + exit_flops
        assert "edge" in tr.compute_flops  # the edge's work on it is counted too


def test_a_retry_through_the_proxy_gets_a_fresh_link(fam):
    x = xs(1)
    with serve(TierEngine(fam, TierSpec("edge", 1, 3), raw_codec(fam, 1))) as se:
        with ServerThread(LinkProxy(se.address, FirstCallsLost(1), 1e6)) as sp:
            hop = RemoteHop(raw_codec(fam, 1), sp.address, deadline_s=10.0, retries=1, first_seq=0)
            res = Flow(fam, [Tier("device", 1e9, 1), Tier("edge", 1e12, 3)], [hop]).run(x)
            hop.close()
    (tr,) = res.traces
    assert tr.fallback is None and tr.exit_tier == "edge"
    assert tr.hops[0].retries == 1 and tr.hops[0].concealed == 0.0
    sent_once = 8 * sum(len(u) for u in raw_codec(fam, 1).compress(fam.features(x, 1))[0].units())
    assert tr.hops[0].bits == 2 * sent_once


def test_a_lossy_hop_behind_the_edge_falls_back_on_the_edge_exit(fam):
    x = xs(3)
    cloud = TierEngine(fam, TierSpec("cloud", 2, 3), raw_codec(fam, 2))
    with serve(cloud) as sc, ServerThread(LinkProxy(sc.address, IIDPacketErasure(1.0),
                                                    1e6)) as sp:  # fmt: skip
        edge = TierEngine(fam, TierSpec("edge", 1, 2), raw_codec(fam, 1), raw_codec(fam, 2))
        with serve(edge, next_address=sp.address) as se:
            tiers = [Tier("device", 1e9, 1), Tier("edge", 1e11, 2), Tier("cloud", 1e12, 3)]
            hop = RemoteHop(raw_codec(fam, 1), se.address, deadline_s=10.0)
            res = Flow(fam, tiers, [hop, Hop(raw_codec(fam, 2), IIDPacketErasure(0.0), 1e6)]).run(x)
            hop.close()
    torch.testing.assert_close(res.logits, fam.member(2)(x), rtol=1e-5, atol=1e-5)
    for tr in res.traces:
        assert (tr.exit_tier, tr.fallback) == ("edge", "edge: concealed")
        assert [h.concealed for h in tr.hops] == [0.0, 1.0]
        assert tr.compute_flops["edge"] == edge.flops_fallback > edge.flops_forward


def test_a_device_without_an_exit_keeps_the_answer_untrusted(fam):
    x = xs(2)
    eng = TierEngine(fam, TierSpec("edge", 0, 3), raw_codec(fam, 0, packets=1))
    with serve(eng) as se, ServerThread(LinkProxy(se.address, IIDPacketErasure(1.0), 1e6)) as sp:
        hop = RemoteHop(raw_codec(fam, 0, packets=1), sp.address, deadline_s=10.0)
        res = Flow(fam, [Tier("device", 1e9, 0), Tier("edge", 1e12, 3)], [hop]).run(x)
        hop.close()
    assert res.fallbacks() == {"untrusted": 2}
    assert all(t.exit_tier == "edge" and t.fallback is None for t in res.traces)


def test_answers_carry_the_concealed_fraction_on_the_wire():
    from flowcodec.serve.wire import WireError, encode_answer, parse_answer

    ans = {"rid": 1, "exit_tier": "edge", "exit_point": 3, "confidence": 0.5, "logits": [0.1],
           "compute_s": {}, "flops": {}, "queue_s": {}, "batch": {}, "fallback": CONCEALED_INPUT,
           "hops": [{"bits": 8, "channel_uses": 0, "packets": 1, "packets_lost": 1,
                     "header_lost": True, "tx_time_s": 0.0, "concealed": 1.0}]}  # fmt: skip
    assert parse_answer(encode_answer(ans))["hops"][0]["concealed"] == 1.0
    for bad in (1.5, -0.1, "1", True):
        ans["hops"][0]["concealed"] = bad
        with pytest.raises(WireError, match="concealed"):
            parse_answer(encode_answer(ans))


# --- commands ---------------------------------------------------------------------------
@pytest.mark.parametrize("argv, names", [
    (["device", "--samples", "-5"], ["--samples -5"]),
    (["device", "--samples", "0"], ["--samples 0"]),
    (["device", "--batch", "0", "--deadline-s", "-1"], ["--batch 0", "--deadline-s -1"]),
    (["device", "--max-concealed", "1.5"], ["--max-concealed 1.5"]),
    (["device", "--retries", "-1"], ["--retries -1"]),
    (["proxy", "--mcs", "40"], ["--mcs 40"]),
    (["proxy", "--snr-db", "nan", "--loss", "2"], ["--snr-db nan", "--loss 2"]),
    (["proxy", "--symbol-rate", "0"], ["--symbol-rate 0"]),
    (["serve", "--port", "70000"], ["--port 70000"]),
    (["serve", "--max-batch", "0", "--threads", "0"], ["--max-batch 0", "--threads 0"]),
])  # fmt: skip
def test_bad_numbers_are_one_line_errors(argv, names, capsys):
    from flowcodec.cli import main

    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"flowcodec {argv[0]}: error:")
    assert all(n in err for n in names)


def test_proxy_says_which_mcs_and_snr(capsys):
    from flowcodec.cli import build_parser
    from flowcodec.serve.cli import PROXY_MCS_WORDS, link_description

    with pytest.raises(SystemExit):
        build_parser().parse_args(["proxy", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "MCS 9" in text and "10 dB" in text and "(default 9" in text
    args = build_parser().parse_args(["proxy"])
    assert link_description(args) == ("a fast link at MCS 9 (QPSK, code rate 0.66), SNR 10 dB, "
                                      "1 transmission per packet")  # fmt: skip
    assert f"(default 9: {PROXY_MCS_WORDS})" in text
    args = build_parser().parse_args(["proxy", "--link", "erasure", "--loss", "0.2"])
    assert "losing 0.2" in link_description(args)


def test_device_with_no_server_fails_loudly(digits_family, capsys):
    from flowcodec.cli import main

    argv = ["device", "--connect", f"127.0.0.1:{free_port()}", "--samples", "6", "--batch",
            "3", "--deadline-s", "2", "--no-progress"]  # fmt: skip
    assert main(argv) == 1
    cap = capsys.readouterr()
    assert "unreachable 6" in cap.err and "--allow-fallback" in cap.err
    assert "6 of 6 samples fell back" in cap.err
    assert "accuracy" in cap.out and "fallbacks       unreachable 6" in cap.out
    assert main([*argv, "--allow-fallback", "--json"]) == 0
    cap = capsys.readouterr()
    out = json.loads(cap.out)
    assert out["fallbacks"] == {"unreachable": 6} and out["fell_back"] == 6
    assert out["exit_mix"] == {"device": 6} and "fell back" in cap.err
    assert out["fallback_mflops"] > 0
    assert out["accuracy"] == round(out["accuracy"], 4)


def test_device_summary_is_rounded_and_quiet_when_all_is_well(digits_family, capsys):
    from flowcodec.cli import main

    codec = build_codec("raw", digits_family.feature_shape(1), dtype="float16")
    with serve(TierEngine(digits_family, TierSpec("edge", 1, 3), codec)) as st:
        rc = main(["device", "--connect", st.address, "--samples", "8", "--batch", "4",
                   "--no-progress"])  # fmt: skip
    cap = capsys.readouterr()
    assert rc == 0 and cap.err == ""
    assert "fallbacks       none" in cap.out and "answered by     edge 8" in cap.out
    for line in cap.out.splitlines():  # rounded: no long runs of digits
        assert not any(len(w) > 12 and w.replace(".", "").isdigit() for w in line.split())
