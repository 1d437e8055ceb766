"""The ``flowcodec`` command.

    flowcodec demo                   train (or load) the digits family, report each member
    flowcodec train-family           train a family (CIFAR-10 by default) and save it
    flowcodec info                   parameters and FLOPs of a family's members

Run ``flowcodec COMMAND --help`` for the options of each.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


def _table(rows: list[dict], cols: list[str]) -> str:
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    line = "  ".join(c.rjust(w) for c, w in zip(cols, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(str(r[c]).rjust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(out)


def _member_rows(family, accs: list[float]) -> list[dict]:
    rows = []
    for m, acc in zip(family.info(), accs):
        rows.append({
            "member": m.index,
            "test acc %": f"{100 * acc:.2f}",
            "params": f"{m.params:,}",
            "MFLOPs": f"{m.flops / 1e6:.2f}",
        })  # fmt: skip
    return rows


def cmd_demo(args) -> int:
    import torch

    from flowcodec.data import load_dataset
    from flowcodec.demo import DemoConfig, format_table, run_demo
    from flowcodec.family import evaluate_family, load_pretrained

    torch.set_num_threads(max(1, args.threads))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    print(f"flowcodec demo on {args.dataset}: device -> edge -> cloud over an exact 5G-style link")
    fam = load_pretrained(args.dataset, progress=progress)
    _, test = load_dataset(args.dataset)
    rows = _member_rows(fam, evaluate_family(fam, test))
    print("\nthe family (each member on its own, no link):")
    print(_table(rows, ["member", "test acc %", "params", "MFLOPs"]))
    (out / "family.json").write_text(json.dumps(rows, indent=2))
    cfg = DemoConfig.quick(args.dataset) if args.quick else DemoConfig(dataset=args.dataset)
    table, meta = run_demo(cfg, out, progress=progress)
    print(f"\nthe flow ({meta['samples']} test samples; exits at confidence >= "
          f"{cfg.exit_threshold}; uplink {cfg.uplink_symbol_rate:.0e} symbol/s):")
    print(format_table(table))
    print(f"\nwrote {out / 'demo.csv'}, {out / 'demo.png'}, {out / 'family.json'} "
          f"in {meta['seconds']:.0f} s")
    return 0


def cmd_train_family(args) -> int:
    import torch

    from flowcodec.family import save_family
    from flowcodec.family.pretrained import train_recipe

    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(max(1, args.threads))
    pairs = (("epochs", args.epochs), ("seed", args.seed), ("lr", args.lr))
    overrides = {k: v for k, v in pairs if v is not None}
    fam, res = train_recipe(args.family, device=args.device, progress=not args.no_progress,
                            data_root=args.data, **overrides)  # fmt: skip
    fam.to("cpu")
    hw = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU"
    path = save_family(fam, args.out or f"{args.family}-family", res, hardware=hw,
                       **overrides)  # fmt: skip
    print(_table(_member_rows(fam, res.accuracies), ["member", "test acc %", "params", "MFLOPs"]))
    print(f"trained in {res.seconds:.1f} s on {hw}; saved {path}")
    return 0


def cmd_info(args) -> int:
    from flowcodec.family import build_family

    fam = build_family(args.family)
    rows = [{"member": m.index, "params": f"{m.params:,}", "MFLOPs": f"{m.flops / 1e6:.2f}"}
            for m in fam.info()]  # fmt: skip
    print(_table(rows, ["member", "params", "MFLOPs"]))
    for p in range(1, fam.num_members + 1):
        print(f"split point {p}: features {fam.feature_shape(p)}, "
              f"head {fam.head_flops(p) / 1e6:.2f} MFLOPs")  # fmt: skip
    return 0


def cmd_align(args) -> int:
    import torch

    from flowcodec.family import load_pretrained
    from flowcodec.family.aligner import align_digits

    torch.set_num_threads(max(1, args.threads))
    fam = load_pretrained("digits", progress=not args.no_progress)
    res = align_digits(fam, point=args.point, seed=args.seed, progress=not args.no_progress)
    k = fam.num_members
    rows = [
        {"model": "standalone small model (its own classifier)",
         "test acc %": f"{100 * res.small_alone:.2f}"},
        {"model": f"family member {k} on its own", "test acc %": f"{100 * res.large_alone:.2f}"},
        {"model": f"small head -> aligner -> member {k} tail (split {args.point})",
         "test acc %": f"{100 * res.through_aligner:.2f}"},
    ]  # fmt: skip
    print(_table(rows, ["model", "test acc %"]))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowcodec", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
        sp.add_argument("--no-progress", action="store_true", help="hide progress bars")

    d = sub.add_parser("demo", help="the main job: digits family end to end")
    d.add_argument("--out", default="demo_out", help="folder for results (default demo_out)")
    d.add_argument("--quick", action="store_true", help="reduced run (used by the tests)")
    d.add_argument("--dataset", default="digits", choices=["digits", "cifar10"])
    common(d)
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train-family", help="train a family and save it (safetensors + JSON)")
    t.add_argument("--family", default="cifar10", choices=["cifar10", "digits"])
    t.add_argument("--data", default=None, help="CIFAR-10 folder or tarball ($FLOWCODEC_DATA)")
    t.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--lr", type=float, default=None, help="override the recipe's peak lr")
    t.add_argument("--device", default="cpu", help="cpu or cuda:0")
    t.add_argument("--out", default=None, help="checkpoint path without suffix")
    common(t)
    t.set_defaults(func=cmd_train_family)

    a = sub.add_parser("align", help="feed a non-member model into the digits family")
    a.add_argument("--point", type=int, default=2, help="split point of the large member")
    a.add_argument("--seed", type=int, default=0)
    common(a)
    a.set_defaults(func=cmd_align)

    from flowcodec import latency

    latency.add_parser(sub)

    from flowcodec import rd as _rd
    _rd.add_parser(sub)

    i = sub.add_parser("info", help="parameters, FLOPs and split points of a family")
    i.add_argument("--family", default="cifar10")
    i.set_defaults(func=cmd_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"flowcodec {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
