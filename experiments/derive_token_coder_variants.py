"""Ship arithmetic-coded variants of the ViT token codecs (no retraining).

    python -m experiments.derive_token_coder_variants cifar10vit-all cifar10vit-merge_k8_sizes

For each shipped token codec ``NAME`` it writes ``NAME_arith`` to the zoo: the same model
and weights (a variant checkpoint that loads its tensors from ``NAME``, so the zoo grows
by a JSON file) with ``coder="arith"``, the exact arithmetic coder instead of rANS for the
token latents. It checks that both decode the same features from their own streams and
prints the compact bytes of each on ``--n`` test images.
"""

from __future__ import annotations

import argparse


def main(argv=None) -> int:
    import torch

    from flowcodec.codecs import build_codec
    from flowcodec.codecs.zoo import CODEC_ZOO, load_pretrained_codec, save_codec_variant
    from flowcodec.data import load_dataset
    from flowcodec.family import load_pretrained
    from flowcodec.family.checkpoint import read_config

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("codecs", nargs="+", help="shipped token codec names")
    ap.add_argument("--n", type=int, default=200, help="test images for the byte check")
    args = ap.parse_args(argv)

    _, test = load_dataset("cifar10")
    x, _ = next(iter(test.batches(args.n, shuffle=False)))
    for name in args.codecs:
        src = load_pretrained_codec(name).eval()
        record = read_config(CODEC_ZOO / f"{name}.json")
        meta = record.get("extra", {})
        fam = load_pretrained(meta.get("family", "cifar10-vit")).eval()
        head, _ = fam.split(meta.get("member", 3), meta.get("point", 2))
        kwargs = {**record["config"]["kwargs"], "coder": "arith"}
        torch.manual_seed(0)
        var = build_codec(src.name, src.feature_shape, **kwargs)
        tables = ("_offset", "_quantized_cdf", "_cdf_length")  # rebuilt by update()
        state = {k: v for k, v in src.state_dict().items() if not k.endswith(tables)}
        missing, unexpected = var.load_state_dict(state, strict=False)
        if unexpected or any(not k.endswith(tables) for k in missing):
            raise SystemExit(f"{name}: cannot carry the weights over: {missing} {unexpected}")
        var.update(force=True)
        var.eval()
        for k, v in src.state_dict().items():  # the same parameters give the same tables
            if not torch.equal(v, var.state_dict()[k]):
                raise SystemExit(f"{name}: {k} differs in the variant")
        with torch.no_grad():
            h = head(x)
        a, b = src.compress(h), var.compress(h)
        if not torch.equal(src.decompress(a), var.decompress(b)):
            raise SystemExit(f"{name}: the arithmetic-coded variant decodes other features")
        na = sum(len(s.to_compact()) for s in a) / len(a)
        nb = sum(len(s.to_compact()) for s in b) / len(b)
        extra = {**{k: v for k, v in meta.items() if k != "history"},
                 "variant": f"{name} with coder='arith' (same weights)"}
        path = save_codec_variant(var, CODEC_ZOO / f"{name}_arith", name, kwargs, extra)
        print(f"{name}: {na:.1f} B (rANS) -> {nb:.1f} B (arith) per image in a session; "
              f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
