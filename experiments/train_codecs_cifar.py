"""Train every learned CIFAR-10 codec at split point 1 (tail = member 3) in one GPU run.

Needs only torch (no CompressAI): the entropy models are the torch-only twins, whose
state dicts load into CompressAI's models. Models train in parallel worker processes that
share one GPU, each within a time budget. Everything lands in two files under ``--out``
(``codecs.safetensors``: weights keyed ``<model>/<param>``; ``codecs.json``: configs,
loss curves, estimated test accuracy and rate) plus a log. Afterwards, on a machine with
CompressAI, ``python -m experiments.finalize_codecs`` freezes the CDF tables (``update()``)
and writes the zoo checkpoints.

    FLOWCODEC_DATA=.cache FLOWCODEC_CACHE=/tmp/fcc python3 -m experiments.train_codecs_cifar \
        --out $OUT --device cuda --seconds 270 --workers 5

Smoke test on CPU: ``--device cpu --max-steps 3 --only fact_l0.1``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

#: name -> (codec registry name, constructor kwargs, training kwargs)
MODELS: dict[str, tuple[str, dict, dict]] = {
    **{f"fact_l{lam:g}": ("factorized", {"latent": 32, "packets": 1}, {"lam": lam})
       for lam in (0.01, 0.03, 0.1, 0.3, 1.0)},
    **{f"hyper_l{lam:g}": ("hyperprior", {"latent": 32, "hyper": 16, "packets": 1}, {"lam": lam})
       for lam in (0.03, 0.1, 0.3)},
    "robust_l0.1": ("factorized", {"latent": 32, "packets": 8}, {"lam": 0.1, "drop_prob": 0.15}),
    "binary_m16": ("binary", {"latent": 16, "packets": 4}, {"lam": 0.0, "flip_prob": 0.08}),
}  # fmt: skip

FEATURE_SHAPE = (64, 16, 16)
MEMBER, POINT = 3, 1


def _worker(names: list[str], device: str, deadline: float, out: str, max_steps, log) -> None:
    import torch
    from safetensors.torch import save_file

    from flowcodec.codecs import build_codec
    from flowcodec.codecs.train import train_codec
    from flowcodec.data import load_dataset
    from flowcodec.family import load_pretrained

    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(2)
    train, test = load_dataset("cifar10")
    if device.startswith("cuda"):
        train.images, train.labels = train.images.to(device), train.labels.to(device)
        test.images, test.labels = test.images.to(device), test.labels.to(device)
    for i, name in enumerate(names):
        kind, ckw, tkw = MODELS[name]
        fam = load_pretrained("cifar10")
        torch.manual_seed(0)
        codec = build_codec(kind, FEATURE_SHAPE, backend="torch", **ckw)
        budget = (deadline - time.time()) / (len(names) - i) - 8  # leave time to evaluate
        res = train_codec(codec, fam, MEMBER, POINT, train, test, device=device,
                          epochs=40, batch_size=256, lr=2e-3, beta=1.0, seed=0,
                          progress=False, time_budget=budget, max_steps=max_steps,
                          **tkw)  # fmt: skip
        state = {k: v.detach().cpu().contiguous() for k, v in codec.state_dict().items()}
        save_file(state, f"{out}/{name}.part.safetensors")
        rec = {"name": name, "codec": kind, "codec_kwargs": ckw, "train_kwargs": tkw,
               "config": codec.config(), "history": res.history, "epochs": res.epochs,
               "seconds": round(res.seconds, 1), "est_test_accuracy": res.test_accuracy,
               "est_bytes": res.est_bytes, "device": device}  # fmt: skip
        Path(f"{out}/{name}.part.json").write_text(json.dumps(rec))
        print(f"[{name}] {res.epochs} epochs {res.seconds:.0f}s est acc {res.test_accuracy} "
              f"est bytes {res.est_bytes}", file=log, flush=True)  # fmt: skip


def main(argv=None) -> int:
    import multiprocessing as mp

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--seconds", type=float, default=270,
                    help="wall-time budget from start (data included)")
    ap.add_argument("--workers", type=int, default=5)
    ap.add_argument("--max-steps", type=int, default=None)
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    from flowcodec.data import load_dataset

    load_dataset("cifar10")  # extract and decode once, before the workers start
    print(f"data ready in {time.time() - t0:.0f}s", flush=True)
    deadline = t0 + args.seconds
    names = args.only or list(MODELS)
    k = max(1, min(args.workers, len(names)))
    shards = [names[i::k] for i in range(k)]
    ctx = mp.get_context("spawn")
    procs = []
    for shard in shards:
        p = ctx.Process(target=_run_shard, args=(shard, args.device, deadline, str(out),
                                                 args.max_steps))  # fmt: skip
        p.start()
        procs.append(p)
    for p in procs:
        p.join()
    _merge(out, names)
    print(f"done in {time.time() - t0:.0f}s", flush=True)
    return 0


def _run_shard(names, device, deadline, out, max_steps):
    import sys

    _worker(names, device, deadline, out, max_steps, sys.stdout)


def _merge(out: Path, names: list[str]) -> None:
    from safetensors.torch import load_file, save_file

    tensors, meta = {}, {}
    for name in names:
        w, j = out / f"{name}.part.safetensors", out / f"{name}.part.json"
        if not (w.is_file() and j.is_file()):
            print(f"missing {name}", flush=True)
            continue
        for k, v in load_file(str(w)).items():
            tensors[f"{name}/{k}"] = v
        meta[name] = json.loads(j.read_text())
        w.unlink()
        j.unlink()
    save_file(tensors, str(out / "codecs.safetensors"))
    (out / "codecs.json").write_text(json.dumps(meta, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
