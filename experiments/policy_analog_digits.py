"""Where the policy switches between analog (JSCC) and digital on the digits family.

A small JSCC codec (8 complex symbols at split point 2; the schedule sends 4 from 10 dB)
is trained through AWGN on the digits training set, a digital codec (4-bit quantisation
+ zstd, fitted on the training features) sits at the same split point, and
:func:`flowcodec.policy.build_profile` measures both on half of the test set (the
analog option over an SNR grid, the digital one over the packet-loss grid). The policy
(accuracy floor: uncompressed member accuracy on the other half, less ``--points``)
then decides at every SNR from -8 to 20 dB; the table says which kind it took.

    nice -n 19 .venv/bin/python experiments/policy_analog_digits.py [--out runs/policy_analog]

Dev measurement (seconds of CPU); the profile is written to ``--out/profile.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/policy_analog_digits")
    ap.add_argument("--points", type=float, default=5.0,
                    help="accuracy floor: uncompressed accuracy less this many points")
    ap.add_argument("--symbol-rate", type=float, default=1e5)
    ap.add_argument("--epochs", type=int, default=12)
    args = ap.parse_args(argv)

    from flowcodec.codecs import build_codec
    from flowcodec.codecs.jscc_train import JSCCTrainConfig, collect_features, train_jscc
    from flowcodec.data import load_digits
    from flowcodec.family import load_pretrained
    from flowcodec.family.train import accuracy
    from flowcodec.policy import Policy, build_profile
    from flowcodec.progress import tqdm

    point = 2
    fam = load_pretrained("digits", progress=False).eval()
    member = fam.num_members
    train, test = load_digits()
    half = len(test) // 2
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))
    prof_data, eval_data = test.take(idx[:half]), test.take(idx[half:])

    torch.manual_seed(0)
    jscc = build_codec("jscc", fam.feature_shape(point), symbols=8, stem=[[32, True]],
                       hidden=32, film=8, levels=[4, 8], schedule=[[-100, 8], [10, 4]])  # fmt: skip
    cfg = JSCCTrainConfig(epochs=args.epochs, batch_size=64, seed=0, lr=3e-3, stem_lr=3e-3,
                          channels={"awgn": 1.0}, eval_n=64)  # fmt: skip
    train_jscc(jscc, fam, member, point, train, None, cfg, progress=True)
    jscc.eval()
    head, _ = fam.split(member, point)
    quant = build_codec("quant", fam.feature_shape(point), bits=4)
    quant.fit(collect_features(head, train, n=2000))
    options = {(point, "quant4"): quant.eval(), (point, "jscc8"): jscc}
    prof = build_profile(fam, member, options, prof_data, thresholds=(None,),
                         snr_grid=[-10.0, -7.5, -5.0, -2.5, 0.0, 2.5, 5.0, 7.5, 10.0, 12.5,
                                   15.0, 17.5, 20.0], seed=0)  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    prof.save(out / "profile.json")
    ref = accuracy(fam.member(member), eval_data)
    floor = ref - args.points / 100
    pol = Policy(prof, floor)
    dig = next(o for o in prof.options if not o.is_analog)
    print(f"member {member} uncompressed: {100 * ref:.2f} %, floor {100 * floor:.2f} %; "
          f"digital quant4: {dig.bytes_per_sample} B/sample in {len(dig.packet_bytes)} "
          f"packets; symbol rate {args.symbol_rate:g}/s")  # fmt: skip
    print("| SNR (dB) | kind | option | MCS | channel uses | expected accuracy (%) | "
          "expected latency (ms) | feasible |")
    print("|---|---|---|---|---|---|---|---|")
    rows = []
    snrs = [s / 2 for s in range(-16, 41, 2)]
    for snr in tqdm(snrs, desc="decide", leave=False):
        d = pol.decide(snr, args.symbol_rate)
        rows.append({"snr_db": snr, "kind": d.kind, "rate": d.rate, "mcs": d.mcs,
                     "channel_uses": d.channel_uses, "accuracy": d.expected_accuracy,
                     "latency_ms": 1e3 * d.expected_latency_s, "feasible": d.feasible})
        print(f"| {snr:g} | {d.kind} | {d.rate} | {'-' if d.mcs is None else d.mcs} | "
              f"{d.channel_uses} | {100 * d.expected_accuracy:.1f} | "
              f"{1e3 * d.expected_latency_s:.3f} | {d.feasible} |")
    (out / "decisions.json").write_text(json.dumps(rows, indent=1))
    ana = next(o for o in prof.options if o.is_analog)
    print("analog accuracy per grid SNR:",
          {s: round(100 * a, 1) for s, a in zip(ana.snr_grid, ana.accuracy["none"])})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
