"""``flowcodec lm sweep``: its options, its run and the summary it prints."""

from __future__ import annotations

from pathlib import Path

from flowcodec.lm.sweep import SCHEMES, LMSweepConfig, run_lm_sweep
from flowcodec.sweeps.runner import add_common_arguments

__all__ = ["add_arguments", "command", "summary_lines"]


def add_arguments(p) -> None:
    """The options of ``flowcodec lm sweep``."""
    p.add_argument("--weights", default=None,
                   help="a family saved by `train` (path stem; default: the shipped one)")
    p.add_argument("--data", default=None, help="tinyshakespeare.txt or its folder")
    p.add_argument("--out", default="runs/lm/sweep", help="output folder (default runs/lm/sweep)")
    p.add_argument("--prompts", type=int, default=20, help="validation prompts (default 20)")
    p.add_argument("--prompt-len", type=int, default=64, help="ids per prompt (default 64)")
    p.add_argument("--new", type=int, default=64, help="tokens generated per prompt (default 64)")
    p.add_argument("--schemes", nargs="+", choices=list(SCHEMES),
                   default=["device", "edge", "speculative", "gated"],
                   help="schemes to run (edge only always runs: it is the reference)")
    p.add_argument("--gammas", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--rtts", type=float, nargs="+", default=[0, 1, 2, 5, 10, 20, 50, 100],
                   help="round-trip delays in ms")  # fmt: skip
    p.add_argument("--rate-kbps", type=float, nargs="+", default=[1000.0],
                   help="uplink rates in kbit/s (default 1000)")  # fmt: skip
    p.add_argument("--down-kbps", type=float, default=None,
                   help="downlink rate in kbit/s (default: the uplink's)")  # fmt: skip
    p.add_argument("--loss", type=float, nargs="+", default=[0.0],
                   help="i.i.d. message loss rates each way (lost messages are resent after "
                        "one round trip)")  # fmt: skip
    p.add_argument("--mcs", type=int, default=None,
                   help="draw losses from the FastLink BLER tables at this MCS (with --snr-db)")
    p.add_argument("--snr-db", type=float, default=None, help="Es/N0 of the FastLink (dB)")
    p.add_argument("--link-seed", type=int, default=0)
    p.add_argument("--draft", type=int, default=1)
    p.add_argument("--target", type=int, default=None)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1,
                   help="generations per prompt; per-round wall clocks are their median")
    p.add_argument("--loss-windows", type=int, default=64,
                   help="validation windows of the teacher-forced loss (default 64)")
    p.add_argument("--codec", default=None,
                   help="a hidden-state codec (`flowcodec lm codec train`): adds the "
                        "speculative-codec scheme, which sends the draft's states through it")
    p.add_argument("--codec-rate", type=int, default=None, help="the codec's rate point")
    p.add_argument("--float64", action="store_true", help="compute in float64")
    add_common_arguments(p)


def command(args) -> int:
    """Run ``flowcodec lm sweep`` (``args``: its parsed options)."""
    from flowcodec.lm.cli import _weights
    from flowcodec.lm.data import CharVocab, load_shakespeare
    from flowcodec.lm.train import load_lm

    fam = load_lm(_weights(args.weights))
    if args.float64:
        fam = fam.double()
    vocab = CharVocab(fam.chars)
    schemes, codec = list(args.schemes), None
    if args.codec:
        from flowcodec.lm.codec import load_hidden_codec

        codec = load_hidden_codec(args.codec).to(next(fam.parameters()).device)
        schemes += [] if "speculative-codec" in schemes else ["speculative-codec"]
    cfg = LMSweepConfig(prompts=args.prompts, prompt_len=args.prompt_len, new=args.new,
                        schemes=schemes, gammas=args.gammas, thresholds=args.thresholds,
                        rtts_ms=args.rtts, up_kbps=args.rate_kbps, down_kbps=args.down_kbps,
                        losses=args.loss, mcs=args.mcs, snr_db=args.snr_db,
                        link_seed=args.link_seed, draft=args.draft, target=args.target,
                        temperature=args.temperature, seed=args.seed, repeats=args.repeats,
                        loss_windows=args.loss_windows, codec=codec,
                        codec_rate=args.codec_rate)  # fmt: skip
    cfg.check(fam)  # before the data are read
    _, val, _ = load_shakespeare(args.data, vocab)
    res = run_lm_sweep(fam, val, cfg, args.out, progress=not args.no_progress, vocab=vocab)
    print("\n".join(summary_lines(res)))
    print(f"wrote {Path(args.out) / 'sweep.csv'}, sweep.json, samples.txt and plots")
    return 0


def _num(v, spec: str) -> str:
    return format(v, spec) if v != "" else format("-", ">" + spec.split(".")[0])


def summary_lines(res: dict) -> list[str]:
    """A table of tokens per second against RTT per scheme (first link family), the pass
    times and the crossovers, as text lines."""
    recs = res["records"]
    fam0 = (recs[0]["up_kbps"], recs[0]["down_kbps"], recs[0]["loss"])
    rows = [r for r in recs if (r["up_kbps"], r["down_kbps"], r["loss"]) == fam0]
    rtts = sorted({r["rtt_ms"] for r in rows})
    labels = list(dict.fromkeys(r["label"] for r in rows))
    lines = [f"tokens per second at {fam0[0]:g}/{fam0[1]:g} kbit/s, loss {fam0[2]:g}, by RTT (ms):",
             f"{'scheme':>18} " + " ".join(f"{x:>7g}" for x in rtts)
             + "   B/token  agree %  loss nats"]  # fmt: skip
    for lab in labels:
        mine = {r["rtt_ms"]: r for r in rows if r["label"] == lab}
        r0 = mine[rtts[0]]
        lines.append(f"{lab:>18} " + " ".join(f"{mine[x]['tokens_per_s']:7.1f}" for x in rtts)
                     + f"   {r0['bytes_per_token']:7.2f}  {100 * r0['agreement']:7.1f}"
                       f"  {_num(r0['val_loss_nats'], '9.4f')}")  # fmt: skip
    mod = res["model"]
    lines.append(f"cost model inputs from the rounds (ms): T_e {1e3 * mod['t_edge']:.2f}; "
                 + "; ".join(f"gamma {g}: T_d {1e3 * m['t_draft']:.2f}, T_v "
                             f"{1e3 * m['t_verify']:.2f}" for g, m in mod["gammas"].items()))
    ps = res["pass_seconds"]
    lines.append(f"isolated pass times (ms, median of 21, cache of {ps['cached']}): "
                 + "; ".join(f"{m} x{k}: {1e3 * v:.2f}" for m, d in ps.items()
                             if m != "cached" for k, v in d.items()))  # fmt: skip
    for c in res["crossovers"]:
        pred = c["predicted_rtt_ms"]
        meas = c["measured_rtt_ms"]
        lines.append(f"gamma {c['gamma']} at {c['up_kbps']:g} kbit/s, loss {c['loss']:g}: "
                     f"acceptance {c['acceptance']:.3f}, tau {c['tau_model']:.2f} (measured "
                     f"{c['tokens_per_round_measured']:.2f} tokens/round); crossover RTT "
                     f"predicted {'none' if pred is None else f'{pred:.1f} ms'} (long run "
                     f"{c['predicted_rtt_ms_long_run']:.1f} ms), measured "
                     + (f"{meas:.1f} ms" if meas is not None else
                        "none in range (speculative " + ("faster" if c["faster_at_first_rtt"]
                                                         else "slower") + " throughout)"))
    return lines
