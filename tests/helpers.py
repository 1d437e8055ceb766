"""Builders several test modules share (imported as ``helpers``: pytest puts tests/ on the path)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowcodec.bitstream import BitstreamError
from flowcodec.codecs import build_codec
from flowcodec.codecs.examples import SMALL_CODECS, SMALL_SHAPE, build_small
from flowcodec.errors import ConfigError
from flowcodec.family import build_family

ROOT = Path(__file__).resolve().parents[1]


def untrained_digits_family():
    """The digits family's architecture, seeded (``torch.manual_seed(0)``), in eval mode."""
    torch.manual_seed(0)
    return build_family("digits").eval()


def tiny_cloud_family():
    """``cifar10-cloud`` at width 8 (untrained, seeded, eval mode): members 1-3 a chain, member
    4 branching after stage 1 (path ``[0, 1, 4]``; ``receiver``: 4 from points 0 and 1, 3 from
    points 2 and 3)."""
    torch.manual_seed(0)
    return build_family("cifar10-cloud", width=8).eval()


def random_images(shape, n=24, seed=0):
    """An ``ArrayDataset`` of ``n`` seeded random uint8 images of ``shape`` and labels in 0..9
    (for untrained families: what is measured needs no real data)."""
    from flowcodec.data import ArrayDataset

    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    c = shape[0]
    return ArrayDataset(images, torch.randint(0, 10, (n,), generator=g), (0.5,) * c, (0.25,) * c)


def raw_codec(fam, point, packets=2):
    """A raw codec for ``fam``'s features at split point ``point``."""
    return build_codec("raw", fam.feature_shape(point), packets=packets)


def small_coop_model(family):
    """A small two-kind cooperative model on ``family`` (seeded, eval mode, tables ready)."""
    from flowcodec.coop.fusion import CoopConfig, CoopModel

    torch.manual_seed(0)
    m = CoopModel(family, CoopConfig(kinds=("m1", "m2"), latent=4, dim=16, hidden=16))
    m.eval()
    m.update()
    return m


TOKEN_SHAPE = (17, 32)


def random_tokens(n=4, seed=0, shape=TOKEN_SHAPE):
    """``n`` samples of standard-normal token features of ``shape``, seeded."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g)


def ready_codec(name, shape=TOKEN_SHAPE, **kwargs):
    """Codec ``name`` built seeded, fitted on 32 random samples, in eval mode, tables ready."""
    torch.manual_seed(0)
    codec = build_codec(name, shape, **kwargs)
    codec.fit(random_tokens(32, seed=1, shape=shape)).eval()
    codec.update(force=True)
    return codec


def check_seeded_packet_loss(codec, h):
    """``forward`` with ``drop_prob`` loses the same packets for the same generator seed, and
    differs from the lossless pass."""
    with torch.no_grad():
        a = codec(h, drop_prob=0.5, generator=torch.Generator().manual_seed(1)).features
        b = codec(h, drop_prob=0.5, generator=torch.Generator().manual_seed(1)).features
        c = codec(h).features
    assert torch.equal(a, b) and not torch.equal(a, c)


def coder_inputs(syms, seed, rows, far):
    """``(indexes, symbols)`` for a table coder test: seeded random rows in ``0..rows-1`` for
    ``syms``; with ``far``, the first symbol far beyond the escape range and the last at its
    edge."""
    from flowcodec.codecs.table_coding import ESCAPE_RANGE

    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(rows, (len(syms),), generator=g, dtype=torch.int32)
    sym = torch.tensor(syms, dtype=torch.int64)
    if far and len(syms):  # an outlier at the escape range's edge, and one beyond it
        sym[0] = -(ESCAPE_RANGE + 10**6)
        sym[-1] = ESCAPE_RANGE
    return idx, sym


def check_prune_round_trip(codec, h, threshold, first, scale):
    """Set a token-prune codec's keep rule, send ``h`` through bytes and back, and check the
    decode against ``forward`` (the fill at pruned positions). Returns ``(streams, kept)``."""
    from flowcodec.bitstream import Bitstream

    codec.threshold, codec.keep_first = threshold, first
    streams = [Bitstream.from_bytes(s.to_bytes()) for s in codec.compress(h)]
    with torch.no_grad():
        ref = codec(h).features
    kept = codec.last_kept
    out = codec.decompress(streams)
    assert torch.allclose(out, ref, atol=1e-4 * max(1.0, scale))
    assert torch.equal(out[~kept], codec.fill.detach().expand_as(out)[~kept])
    return streams, kept


def check_position_codes(token_packets, kept_row, packets):
    """Token packet ``p`` (token ``i`` travels in packet ``i % packets``) starts with the
    position code of exactly its kept tokens."""
    from flowcodec.codecs.positions import decode_positions

    n = len(kept_row)
    for p, data in enumerate(token_packets):
        local, _ = decode_positions(data, len(range(p, n, packets)))
        assert [p + packets * j for j in local] == [i for i in range(p, n, packets)
                                                    if kept_row[i]]  # fmt: skip


def raw_edge_engine(family):
    """An edge tier (exit 3 of member 1) behind a float16 raw codec at split point 1."""
    from flowcodec.serve import TierEngine, TierSpec

    codec = build_codec("raw", family.feature_shape(1), dtype="float16")
    return TierEngine(family, TierSpec("edge", 1, 3), codec)


def device_json(address, capsys):
    """``flowcodec device --connect ADDRESS`` on 40 samples in batches of 4: its exit code and
    its JSON report."""
    import json

    from flowcodec.cli import main

    rc = main(["device", "--connect", address, "--samples", "40", "--batch", "4",
               "--no-progress", "--json"])  # fmt: skip
    return rc, json.loads(capsys.readouterr().out)


# --- small feature codecs on hostile streams (the table: flowcodec.codecs.examples) -----------
#: the six feature codecs the hostile-stream tests run over, with their small instances' kwargs
STREAM_CODECS = {
    name: SMALL_CODECS[name]
    for name in ("raw", "quant", "pca", "factorized", "hyperprior", "binary")
}

_READY: dict = {}


def small_features(n=4, seed=0):
    """``n`` samples of ReLU'd standard-normal features of ``SMALL_SHAPE``, seeded."""
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(n, *SMALL_SHAPE, generator=g))


def ready_small(name):
    """The small instance of codec ``name`` (``build_small``), fitted on 32 samples, in eval
    mode, tables ready; built once per process."""
    if name not in _READY:
        codec = build_small(name)
        codec.fit(small_features(32, seed=1)).eval()
        codec.update(force=True)
        _READY[name] = codec
    return _READY[name]


def shipped_codec(name):
    """The shipped codec ``name`` (``load_pretrained_codec``), loaded once per process."""
    from flowcodec.codecs.zoo import load_pretrained_codec

    if name not in _READY:
        _READY[name] = load_pretrained_codec(name)
    return _READY[name]


def with_packets(codec, packets, seq=0):
    """A CRC-valid stream of ``codec`` carrying ``packets`` (as it crosses a link)."""
    from flowcodec.bitstream import Bitstream

    header = codec.compress(small_features(1))[0].header
    return Bitstream.from_bytes(Bitstream(header, list(packets), seq).to_bytes())


# --- the shipped digits configs -----------------------------------------------------------------
def rd_digits() -> dict:
    """experiments/rd_digits.json, parsed (a fresh dict each call)."""
    import json

    return json.loads((ROOT / "experiments" / "rd_digits.json").read_text())


def latency_digits() -> dict:
    """experiments/latency_digits.json, parsed (a fresh dict each call)."""
    import json

    return json.loads((ROOT / "experiments" / "latency_digits.json").read_text())


def per_sample_or_error(fn, *args, **kw):
    """``(fn(*args, **kw), None)``, or ``(None, error)`` when it raises a BitstreamError or
    a ConfigError: what a per-sample decoder gives for one item."""
    try:
        return fn(*args, **kw), None
    except (BitstreamError, ConfigError) as e:
        return None, e


def check_batch_as_per_sample(want, batch) -> None:
    """``batch()`` (a batch decoder's call returning ``(values, bytes used)``) gives the
    per-sample results ``want`` (pairs from :func:`per_sample_or_error`), or raises the first
    per-sample error, of the same type and with the same message."""
    first = next((e for _, e in want if e is not None), None)
    if first is None:
        got, used = batch()
        assert got == [w[0][0] for w in want] and used == [w[0][1] for w in want]
    else:
        with pytest.raises(BitstreamError) as info:
            batch()
        assert type(info.value) is type(first) and str(info.value) == str(first)
