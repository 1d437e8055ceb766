"""The ``flowcodec`` command (``flowcodec --help`` lists its commands in plain words)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]

DESCRIPTION = """\
flowcodec runs a neural network split across a device, an edge server and a cloud:
the device computes the first layers, a codec compresses the hidden features into
CRC-checked packets, a simulated 5G-style wireless link carries them, and a larger
model of the same family finishes the task.

Run "flowcodec COMMAND --help" for what a command does and its options.
"""

EPILOG = """\
examples:
    flowcodec demo                          # bundled digits set, CPU only; reruns are cached
    flowcodec rd --config digits            # experiments/rd_digits.json
    flowcodec latency --config digits --samples 200
    flowcodec info --family cifar10
    flowcodec serve   (and in another terminal)   flowcodec device --samples 200
"""


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
    from flowcodec.demo import (
        RATE_NOTE,
        DemoConfig,
        cached_family_accuracies,
        format_table,
        run_demo,
    )
    from flowcodec.family import load_pretrained

    torch.set_num_threads(max(1, args.threads))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    print(f"flowcodec demo on {args.dataset}: device -> edge -> cloud over an exact 5G-style link")
    fam = load_pretrained(args.dataset, progress=progress)
    _, test = load_dataset(args.dataset)
    accs = cached_family_accuracies(fam, test, use_cache=not args.no_cache)
    rows = _member_rows(fam, accs)
    print("\nthe family (each member on its own, no link):")
    print(_table(rows, ["member", "test acc %", "params", "MFLOPs"]))
    (out / "family.json").write_text(json.dumps(rows, indent=2))
    cfg = DemoConfig.quick(args.dataset) if args.quick else DemoConfig(dataset=args.dataset)
    table, meta = run_demo(cfg, out, progress=progress, use_cache=not args.no_cache)
    print(f"\nthe flow ({meta['samples']} test samples; exits at confidence >= "
          f"{cfg.exit_threshold}; uplink {cfg.uplink_symbol_rate:.0e} symbol/s; the MCS is "
          f"adapted to each SNR and channel for packet loss <= {cfg.target_bler:g} after HARQ "
          f"with up to {cfg.harq_max_tx} transmissions):")
    print(format_table(table))
    print(f"{RATE_NOTE}.")
    cached = " (flows read from the cache; --no-cache recomputes them)" if meta["cached"] else ""
    _write_run_record(out / "run.json", args, meta, accs)
    print(f"\nwrote {out / 'demo.csv'}, {out / 'demo.png'}, {out / 'family.json'} "
          f"in {meta['seconds']:.0f} s{cached}")
    return 0


def _write_run_record(path: Path, args, meta: dict, accs: list[float]) -> None:
    """Which run made the figures in a folder: command, date, machine, versions, timing."""
    import os
    import platform
    import time

    import torch

    from flowcodec import __version__

    argv = [a for a in sys.argv[1:]] if Path(sys.argv[0]).name == "flowcodec" else None
    record = {
        "command": "flowcodec " + " ".join(argv) if argv else f"flowcodec demo ({vars(args)})",
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()}",
        "threads": args.threads, "flowcodec": __version__, "torch": torch.__version__,
        "seconds": round(meta["seconds"], 1), "flows_from_cache": meta["cached"],
        "samples": meta["samples"], "family_test_accuracy": [round(a, 4) for a in accs],
    }  # fmt: skip
    path.write_text(json.dumps(record, indent=2))


def cmd_train_family(args) -> int:
    import torch

    from flowcodec.family import save_family
    from flowcodec.family.pretrained import train_recipe
    from flowcodec.scale.ddp import PeerLost, from_env, state_paths

    dist = from_env(args.device)  # under torchrun: this rank's place (docs/scale.md)
    device = dist.device(args.device)
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(max(1, args.threads))
    pairs = (("epochs", args.epochs), ("seed", args.seed), ("lr", args.lr))
    overrides = {k: v for k, v in pairs if v is not None}
    out = args.out or f"{args.family}-family"
    resumed = _saved_epoch(out) if args.resume else None
    from flowcodec.family.pretrained import RECIPES

    if args.grow or "grow_from" in RECIPES[args.family]:
        return _grow_family(args, device, overrides, out, resumed)

    air = RECIPES[args.family].get("trainer") == "air"
    if air and args.budget_min is not None:
        overrides["time_budget_s"] = 60.0 * args.budget_min
    try:
        fam, res = train_recipe(args.family, device=device,
                                progress=not args.no_progress and dist.is_main,
                                data_root=args.data, dist=dist, checkpoint=out,
                                resume=args.resume, init=args.init, **overrides)  # fmt: skip
    except PeerLost as e:
        print(f"flowcodec train-family: error: {e}", file=sys.stderr)
        return 3
    finally:
        dist.close()
    if not dist.is_main:
        return 0
    fam.to("cpu")
    hw = torch.cuda.get_device_name(0) if device.startswith("cuda") else "CPU"
    if dist.world > 1:
        hw = f"{dist.world} x {hw} (torchrun, DDP)"
        overrides["ranks"] = dist.world
    if resumed:
        overrides["resumed_from_epoch"] = resumed
    if args.init:
        overrides["init"] = str(args.init)
    if air:
        return _save_air(args, fam, res, out, hw, overrides)
    path = save_family(fam, out, res, hardware=hw, **overrides)
    for f in state_paths(out):  # finished: nothing left to resume
        f.unlink(missing_ok=True)
    print(_table(_member_rows(fam, res.accuracies), ["member", "test acc %", "params", "MFLOPs"]))
    print(f"trained in {res.seconds:.1f} s on {hw}; saved {path}")
    return 0


def _save_measured_half(fam, out, dataset: str, data_root, seconds: float, history: list,
                        hw: str, extra: dict):  # fmt: skip
    """Save ``fam`` as float16, load it back and measure those weights on the full test set
    (the float16 weights are what ships), then save again with the accuracies. Returns
    ``(loaded family, accuracies, weights path)``."""
    from flowcodec.data import load_dataset
    from flowcodec.family import evaluate_family, load_family, save_family
    from flowcodec.family.train import TrainResult

    save_family(fam.to("cpu"), out, None, half=True, hardware=hw, **extra)
    loaded = load_family(out)
    _, test = load_dataset(dataset, root=data_root)
    accs = evaluate_family(loaded, test)
    path = save_family(loaded, out, TrainResult(accs, seconds, history), half=True,
                       hardware=hw, **extra)  # fmt: skip
    return loaded, accs, path


def _save_air(args, fam, res, out, hw, overrides) -> int:
    """Save a family trained by the air recipe as float16 and measure it after that rounding
    (one view, the full test set). Its time budget refits the run, so a finished run leaves
    no state to resume."""
    from flowcodec.family.pretrained import family_dataset
    from flowcodec.scale.ddp import state_paths

    extra = {k: v for k, v in overrides.items() if k != "time_budget_s"}
    extra.update(steps_done=res.steps_done, total_steps=res.total_steps, history=res.history,
                 float32_test_accuracy=res.accuracies)  # fmt: skip
    loaded, accs, path = _save_measured_half(fam, out, family_dataset(args.family), args.data,
                                             res.seconds, res.history, hw, extra)  # fmt: skip
    for f in state_paths(out):  # finished: nothing left to resume
        f.unlink(missing_ok=True)
    print(_table(_member_rows(loaded, accs), ["member", "test acc %", "params", "MFLOPs"]))
    print(f"trained in {res.seconds:.1f} s on {hw}; saved {path} (float16)")
    return 0


def _grow_family(args, device, overrides, out, resumed) -> int:
    """``train-family --grow KIND``: a new last member on the trained family's frozen trunk,
    saved as float16 and measured after that rounding."""
    import torch

    from flowcodec.family.pretrained import RECIPES, family_dataset, grow_recipe, grow_settings
    from flowcodec.scale.ddp import state_paths

    if args.budget_min is not None:
        overrides["time_budget_s"] = 60.0 * args.budget_min
    fam, res = grow_recipe(args.family, args.grow, device=device,
                           progress=not args.no_progress, data_root=args.data, checkpoint=out,
                           resume=args.resume, **overrides)  # fmt: skip
    hw = torch.cuda.get_device_name(0) if device.startswith("cuda") else "CPU"
    extra = {k: v for k, v in overrides.items() if k != "time_budget_s"}
    if resumed:
        extra["resumed_from_epoch"] = resumed
    extra.update(grown=args.grow or RECIPES[args.family]["grow_from"][1],
                 epochs_done=res.epochs_done, history=res.history)  # fmt: skip
    loaded, accs, path = _save_measured_half(fam, out, family_dataset(args.family), args.data,
                                             res.seconds, res.history, hw, extra)  # fmt: skip
    epochs = overrides.get("epochs") or grow_settings(args.family, args.grow)["epochs"]
    if res.epochs_done >= epochs:
        for f in state_paths(out):  # finished: nothing left to resume
            f.unlink(missing_ok=True)
    else:
        print(f"stopped after epoch {res.epochs_done} of {epochs} (time budget); "
              "--resume goes on from there")  # fmt: skip
    print(_table(_member_rows(loaded, accs), ["member", "test acc %", "params", "MFLOPs"]))
    print(f"grown in {res.seconds:.1f} s on {hw}; saved {path} (float16)")
    return 0


def _saved_epoch(out) -> int | None:
    """The last completed epoch of the training state at ``out`` (None: no state)."""
    from flowcodec.scale.ddp import state_paths

    meta = state_paths(out)[1]
    try:
        return int(json.loads(meta.read_text())["epoch"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def cmd_info(args) -> int:
    from flowcodec.errors import CheckpointError
    from flowcodec.family import build_family
    from flowcodec.family.checkpoint import read_config
    from flowcodec.family.pretrained import pretrained_path

    # The architecture of the shipped (or cached) checkpoint when there is one: a grown
    # family's last member differs from the builder's default. No weights are loaded.
    config, accs, nats = {}, [], []
    try:
        record = read_config(pretrained_path(args.family))
        config = {k: v for k, v in record["config"].items() if k != "name"}
        accs = list(record.get("extra", {}).get("test_accuracy") or [])
        nats = list(record.get("extra", {}).get("val_loss_nats") or [])
    except CheckpointError:
        pass
    fam = build_family(args.family, **config)
    language = getattr(fam.feature_shape(1), "layout", "chw") == "tokens" and hasattr(fam, "vocab")
    flops_col = "MFLOPs/token" if language else "MFLOPs"
    cols = ["member", "params", flops_col] + (
        ["val nats/char", "bits/char"] if language else ["test acc %"])
    rows = []
    for m in fam.info():
        row = {"member": m.index, "params": f"{m.params:,}", flops_col: f"{m.flops / 1e6:.2f}"}
        if language:
            have = len(nats) >= m.index
            row["val nats/char"] = f"{nats[m.index - 1]:.4f}" if have else "-"
            row["bits/char"] = f"{nats[m.index - 1] / math.log(2):.4f}" if have else "-"
        else:
            row["test acc %"] = f"{100 * accs[m.index - 1]:.2f}" if len(accs) >= m.index else "-"
        rows.append(row)
    print(_table(rows, cols))
    for p in range(1, fam.num_members + 1):
        shape = fam.feature_shape(p)
        print(f"split point {p}: features {tuple(shape)} ({getattr(shape, 'layout', 'chw')}), "
              f"head {fam.head_flops(p) / 1e6:.2f} MFLOPs")  # fmt: skip
    if getattr(fam, "branched", False):
        for k in range(1, fam.num_members + 1):
            if fam.path(k) != list(range(k + 1)):
                print(f"member {k} branches: it passes through split points {fam.path(k)} "
                      f"only (the default receiver from points "
                      f"{[p for p in fam.path(k) if fam.receiver(p) == k]})")  # fmt: skip
    if config:
        print(f"architecture: {args.family} {config} (from {pretrained_path(args.family)}.json)")
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


def cmd_lm(args) -> int:
    from flowcodec.lm.cli import main as lm_main

    return lm_main(args.lm_args)


def _module_command(sub, name: str, module, help: str, description: str) -> None:
    """A subcommand whose options and body live in ``module`` (``add_arguments`` and
    ``run``, as ``python -m`` runs them)."""
    p = sub.add_parser(name, help=help, description=description)
    module.add_arguments(p)
    p.set_defaults(func=module.run)


def build_parser() -> argparse.ArgumentParser:
    from flowcodec import __version__
    from flowcodec.data import DATASETS
    from flowcodec.family.pretrained import RECIPES
    from flowcodec.family.zoo import FAMILIES

    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="flowcodec", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=fmt)  # fmt: skip
    p.add_argument("--version", action="version", version=f"flowcodec {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND",
                           title="commands (each has --help)")  # fmt: skip

    def common(sp):
        sp.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
        sp.add_argument("--no-progress", action="store_true", help="hide progress bars")

    d = sub.add_parser(
        "demo", formatter_class=fmt,
        help="the whole flow end to end on the bundled digits set (or CIFAR-10): accuracy, "
        "bytes and latency against SNR over AWGN and Rayleigh fading",
        description="Run the whole flow: load (or train once and cache) a 3-member family, "
        "train a packetised learned codec at three rate points, and send every test sample "
        "from the device (member 1) over an exact LDPC/QAM link to the edge (member 2) and "
        "the cloud (member 3) at several SNRs, over AWGN and Rayleigh fading. The link "
        "adapts its MCS to each SNR and channel to keep the block error rate at a target, "
        "with HARQ. Prints a table and writes demo.csv and demo.png. Results are cached: a "
        "second run with the same settings is fast.")  # fmt: skip
    d.add_argument("--out", default="demo_out", help="folder for results (default demo_out)")
    d.add_argument("--quick", action="store_true",
                   help="a reduced run: two SNRs, one rate point, 120 samples")
    d.add_argument("--dataset", default="digits", choices=sorted(DATASETS),
                   help="digits (bundled, default) or cifar10 (needs $FLOWCODEC_DATA)")
    d.add_argument("--no-cache", action="store_true",
                   help="recompute the flows even when cached results exist")
    common(d)
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser(
        "train-family", help="train a family of models (CIFAR-10 CNN or ViT, digits) and save it",
        description="Train a family of early-exit models with its recipe (docs/family.md) "
        "and save the weights (safetensors) and a JSON record of how they were made.")
    t.add_argument("--family", default="cifar10", choices=sorted(RECIPES),
                   help="which family (default cifar10; cifar10-vit is the early-exit ViT, "
                        "docs/family.md)")  # fmt: skip
    t.add_argument("--data", default=None, help="CIFAR-10 folder or tarball ($FLOWCODEC_DATA)")
    t.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    t.add_argument("--seed", type=int, default=None, help="override the recipe's seed")
    t.add_argument("--lr", type=float, default=None, help="override the recipe's peak lr")
    t.add_argument("--device", default="cpu", help="cpu (default) or cuda:0")
    t.add_argument("--out", default=None,
                   help="checkpoint path without suffix (default FAMILY-family); the training "
                        "state after each epoch goes to OUT.state.* (for --resume), removed "
                        "when training ends")  # fmt: skip
    t.add_argument("--resume", action="store_true",
                   help="continue from OUT.state.* (the last completed epoch) if it exists")
    t.add_argument("--grow", default=None, metavar="KIND", choices=["xl", "air"],
                   help="train a new, larger last member of this kind on the trained family's "
                        "frozen trunk (cifar10: xl replaces member 3, reading split point 2; "
                        "air adds a member 4 branching after stage 1, reading split point 1; "
                        "docs/family.md)")  # fmt: skip
    t.add_argument("--init", default=None, metavar="PATH",
                   help="with --family cifar10-air: start from this saved family's weights "
                        "(same configuration) with a fresh schedule: a warm restart")
    t.add_argument("--budget-min", type=float, default=None,
                   help="with --grow: stop after the epoch that passes this many minutes "
                        "(--resume goes on); with --family cifar10-air: fit the run, after "
                        "every epoch, into this many minutes (it still ends annealed)")  # fmt: skip
    common(t)
    t.set_defaults(func=cmd_train_family)

    a = sub.add_parser(
        "align", help="feed a model from outside the family into the digits family",
        description="Train an aligner that maps the features of a small model from "
        "outside the digits family onto a family member's split point, and report the "
        "accuracy of each model alone and through the aligner.")
    a.add_argument("--point", type=int, default=2,
                   help="split point of the large member (default 2)")
    a.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    common(a)
    a.set_defaults(func=cmd_align)

    from flowcodec.sweeps import add_sweep_parsers

    add_sweep_parsers(sub)  # latency, rd, snr: the registered sweeps (flowcodec.sweeps.SWEEPS)

    from flowcodec.scale import train_codec_cmd

    train_codec_cmd.add_parser(sub)  # train-codec (docs/scale.md)

    from flowcodec.serve import cli as _serve

    _serve.add_parsers(sub)  # serve, proxy, device (docs/deployment.md)

    lm = sub.add_parser(
        "lm", add_help=False, help="the language family: train, generate, eval",
        description="The shakespeare-char family (docs/language.md): `flowcodec lm train`, "
        "`flowcodec lm generate`, `flowcodec lm eval`; `flowcodec lm --help` for each.")
    lm.add_argument("lm_args", nargs=argparse.REMAINDER)
    lm.set_defaults(func=cmd_lm)

    from flowcodec.coop import bench as _coop_bench
    from flowcodec.coop import finetune as _coop_finetune
    from flowcodec.coop import targets as _coop_targets
    from flowcodec.coop import train as _coop_train

    _module_command(
        sub, "coop", _coop_bench, "several devices, one answer: the cooperative benchmark",
        "Score trained cooperative device encoders and edge fusion (train-coop) "
        "on the multi-view test set against each device alone, the devices' averaged "
        "answers, single views through the largest member and the whole image; "
        "selective transmission's threshold sweep; CSV, JSON and a plot "
        "(docs/cooperative.md).")  # fmt: skip
    _module_command(
        sub, "coop-targets", _coop_targets,
        "check cooperative benchmark files against issue 28's targets",
        "State each target of the cooperative benchmark (emergence, bytes, the "
        "centralised bound, robustness, selective transmission, device cost) as measured in "
        "coop.csv files, met or not; --markdown puts runs side by side (docs/cooperative.md).")
    _module_command(
        sub, "train-coop", _coop_train, "train cooperative device encoders and the edge fusion",
        "Train one task encoder per device kind and the edge's fusion module "
        "for the largest member's tail on seeded multi-view data (docs/cooperative.md).")
    _module_command(
        sub, "finetune-coop", _coop_finetune,
        "fine-tune the largest member on single device views",
        "Fine-tune a copy of the largest member on single views from the "
        "cooperative view generator, for as long as the fusion trained: the single-view "
        "baseline of `flowcodec coop --finetuned` (docs/cooperative.md).")

    i = sub.add_parser(
        "info", help="parameters, FLOPs and split points of a family",
        description="Print each member's parameters, FLOPs and recorded test accuracy, and "
        "the feature shape and device FLOPs at every split point (the architecture of the "
        "shipped or cached checkpoint; no weights are loaded).")
    i.add_argument("--family", default="cifar10", choices=sorted(FAMILIES),
                   help="which family (default cifar10)")
    i.set_defaults(func=cmd_info)
    _refuse_abbreviations(p)
    return p


def _refuse_abbreviations(parser: argparse.ArgumentParser) -> None:
    """Turn argparse's prefix matching off in ``parser`` and every subparser under it, so a
    flag a command does not have (``demo --data``) is an error naming it, not silently
    taken as another flag it abbreviates (``--dataset``)."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _refuse_abbreviations(sub)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["lm"]:  # its own parser (flowcodec.lm.cli), --help included
        args = argparse.Namespace(command="lm", func=cmd_lm, lm_args=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"flowcodec {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
