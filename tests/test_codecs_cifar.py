"""The shipped CIFAR-10 codecs (skipped when the CIFAR-10 copy is not found)."""

from __future__ import annotations

import pytest
import torch

from flowcodec.codecs.zoo import list_pretrained, load_pretrained_codec
from flowcodec.errors import DataNotFoundError

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def cifar():
    from flowcodec.data import cache_dir, find_cifar10, load_dataset
    from flowcodec.family import load_pretrained

    try:  # an already extracted copy first: finding the tarball extracts it again
        folder = find_cifar10(cache_dir() / "cifar10")
    except DataNotFoundError:
        try:
            folder = find_cifar10()
        except DataNotFoundError as e:
            pytest.skip(f"CIFAR-10 not available: {e}")
    _, test = load_dataset("cifar10", root=folder)
    fam = load_pretrained("cifar10")
    return fam, next(test.batches(32))


# JSCC codecs send channel symbols, not bytes: tests/test_jscc.py covers them
SHIPPED = [n for n in list_pretrained() if n.startswith("cifar10-") and "jscc" not in n]


def test_codecs_are_shipped():
    assert {"cifar10-fact_l0p1", "cifar10-robust_l0p1", "cifar10-binary_m16"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_codec_round_trip_and_device_share(cifar, name):
    fam, (x, y) = cifar
    codec = load_pretrained_codec(name)
    # the split point whose features the codec takes
    point = next(p for p in (1, 2) if fam.feature_shape(p) == tuple(codec.feature_shape))
    head, tail = fam.split(3, point)
    with torch.no_grad():
        h = head(x)
        want = codec(h).features
    streams = codec.compress(h)
    got = codec.decompress(streams)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the device runs the head and the codec's encoder: the encoder adds at most 25% of
    # member 3's FLOPs, and the device never spends more than its own member at that point
    # would (the task codecs' encoders have the shape of that member's exit branch)
    info = fam.info()
    # a lifted codec (via: the later point's features) runs the trunk up to that point on
    # the device, so it spends what the member at that later point would
    if getattr(codec, "via", None) is None:
        assert codec.encoder_flops() <= 0.25 * info[2].flops
        at = point
    else:
        at = next(p for p in (1, 2) if fam.feature_shape(p) == tuple(codec.via))
    assert fam.head_flops(point) + codec.encoder_flops() <= 1.05 * info[at - 1].flops
    assert all(8 * len(s.to_bytes()) == 8 * s.nbytes for s in streams)
