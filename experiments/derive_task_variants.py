"""Derive packet/entropy-model variants of a trained task codec (no retraining of its
transforms), fit the channel-wise context model, and ship them in the zoo.

    python -m experiments.derive_task_variants --codec cifar10-task_p2 --point 2

From ``--codec`` (any packet count) it writes, with the same transforms and factorized tables:

- ``<codec>_1p``: one packet, factorized tables (the plain low-rate form);
- ``<codec>_ctx``: one packet, channel-wise context model fitted here on the symbols of the
  CIFAR-10 training set (:func:`~flowcodec.codecs.train_task.fit_context`).

and prints, for every rate point, measured accuracy and bytes of both on ``--eval`` test images.
"""

from __future__ import annotations

import argparse
import json
import time


def rebuild(codec, **changes):
    """The same codec with other constructor arguments, its weights and tables carried over."""
    from flowcodec.codecs import build_codec

    cfg = {k: v for k, v in codec.config().items() if k not in ("name", "feature_shape")}
    cfg.pop("context", None)
    cfg.update(changes)
    fresh = build_codec("task", codec.feature_shape, **cfg)
    tables = ("_offset", "_quantized_cdf", "_cdf_length")  # rebuilt by update() below
    state = {k: v for k, v in codec.state_dict().items() if not k.endswith(tables)}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    if unexpected or any(not (k.endswith(tables) or k.startswith("contexts.")) for k in missing):
        raise SystemExit(f"cannot carry weights over: {missing} {unexpected}")
    fresh.update(force=True)
    for r in range(codec.rates):  # the same parameters give the same tables
        assert fresh._tables(r) == codec._tables(r)
    return fresh.eval(), cfg


def main(argv=None) -> int:
    import torch

    from flowcodec.codecs.train import evaluate_codec
    from flowcodec.codecs.train_task import fit_context
    from flowcodec.codecs.zoo import (
        CODEC_ZOO,
        load_pretrained_codec,
        save_codec,
        save_codec_variant,
    )
    from flowcodec.data import load_dataset
    from flowcodec.family import load_pretrained
    from flowcodec.family.checkpoint import read_config

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--codec", required=True)
    ap.add_argument("--point", type=int, required=True)
    ap.add_argument("--steps", type=int, default=1500, help="context-model steps per rate point")
    ap.add_argument("--eval", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-context", action="store_true",
                    help="only the one-packet form (no context model)")
    ap.add_argument("--context-hidden", type=int, default=16,
                    help="hidden units per symbol of the context model (its size grows with "
                         "symbols x hidden^2: use fewer for grid latents)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = load_pretrained_codec(args.codec)
    extra = read_config(CODEC_ZOO / args.codec)["extra"]
    fam = load_pretrained("cifar10").eval()
    train, test = load_dataset("cifar10")
    head, tail = fam.split(3, args.point)
    data = test if args.eval >= len(test) else test.subset(args.eval, seed=0)
    results = {}
    one, kw1 = rebuild(base, packets=1)
    variants = [(f"{args.codec}_1p", one, kw1)]
    if not args.no_context:
        ctx, kwc = rebuild(base, packets=1, context=True, context_hidden=args.context_hidden)
        t = time.perf_counter()
        report = fit_context(ctx, head, train, steps=args.steps)
        fit_s = time.perf_counter() - t
        variants.append((f"{args.codec}_ctx", ctx, kwc))
    for name, codec, kw in variants:
        rows = []
        for r in range(codec.rates if args.eval > 0 else 0):
            t = time.perf_counter()
            ev = evaluate_codec(codec.at_rate(r), head, tail, data)
            rows.append({"rate": r, "accuracy": ev.accuracy, "bytes": ev.bytes_per_image,
                         "session_bytes": ev.session_bytes_per_image,
                         "payload_bytes": ev.payload_bytes_per_image, "n": ev.n,
                         "seconds": round(time.perf_counter() - t, 1)})  # fmt: skip
            print(f"{name} rate {r}: {100 * ev.accuracy:.2f}% at "
                  f"{ev.session_bytes_per_image:.2f} B session, {ev.bytes_per_image:.2f} B "
                  f"self-contained, payload {ev.payload_bytes_per_image:.2f} B ({ev.n} images)")
        info = {**extra, "derived_from": args.codec, "measured": rows}
        if codec.context:
            info["context_fit"] = {"steps": args.steps, "seconds": round(fit_s, 1),
                                   "report": report}  # fmt: skip
        kw = {**kw, **({"context": True} if codec.context else {})}
        if kw.get("context_hidden") == 16:  # the default: keep older configs unchanged
            kw.pop("context_hidden")
        kw.pop("grid", None) if kw.get("grid") == 1 else None
        if codec.context:
            save_codec(codec, CODEC_ZOO / name, kw, info)
        else:  # the same weights as --codec: a JSON-only variant that loads them
            save_codec_variant(codec, CODEC_ZOO / name, args.codec, kw, info)
        results[name] = rows
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
