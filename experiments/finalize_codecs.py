"""Turn the GPU run's output into shipped codec checkpoints (needs CompressAI).

Reads ``codecs.safetensors`` / ``codecs.json`` written by ``train_codecs_cifar.py``, loads
each model into a codec built on CompressAI's entropy models (the torch twins' state dicts
fit them), rounds the transforms to float16 precision, freezes the CDF tables with
``update()`` and writes ``flowcodec/zoo/codecs/cifar10-<model>.{safetensors,json}``.

    python -m experiments.finalize_codecs --run /path/to/run --zoo flowcodec/zoo/codecs
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

FEATURE_SHAPE = (64, 16, 16)


def main(argv=None) -> int:
    from safetensors.torch import load_file

    from flowcodec.codecs import build_codec
    from flowcodec.codecs.zoo import round_half, save_codec
    from flowcodec.family.checkpoint import load_into

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--run", required=True, help="folder with codecs.safetensors/.json")
    ap.add_argument("--zoo", default="flowcodec/zoo/codecs")
    args = ap.parse_args(argv)
    run = Path(args.run)
    meta = json.loads((run / "codecs.json").read_text())
    tensors = load_file(str(run / "codecs.safetensors"))
    for name, rec in meta.items():
        state = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(name + "/")}
        codec = build_codec(rec["codec"], FEATURE_SHAPE, backend="compressai",
                            **rec["codec_kwargs"])  # fmt: skip
        load_into(codec, state, what=name)
        round_half(codec).eval()
        codec.update(force=True)
        extra = {k: rec[k] for k in ("train_kwargs", "history", "epochs", "seconds",
                                     "est_test_accuracy", "est_bytes", "device")}  # fmt: skip
        extra.update(family="cifar10", member=3, point=1)
        stem = "cifar10-" + name.replace(".", "p")  # no dots: they read as suffixes
        path = save_codec(codec, Path(args.zoo) / stem, rec["codec_kwargs"], extra)
        print(f"{name}: {path} ({path.stat().st_size / 1e3:.0f} kB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
