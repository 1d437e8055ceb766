"""The receive path's fast paths equal their references (issue 30): the format-2 tables from
the padded normal tables bit for bit, and the decoders' inference path (channels-last memory,
upsampling fused into the next convolution) up to float rounding, with ``forward`` in eval
mode and ``decompress`` on the same path, and gradients still flowing in eval mode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowcodec.codecs import build_codec
from flowcodec.codecs.context_model import _NORMAL, grid_probs
from flowcodec.codecs.task_nets import GridDecoder, Lift, TaskDecoder, upsample_conv_kernel


def _grid_probs_reference(m, si, lo, n, width):
    """grid_probs as first written: the clamped lookup for every entry, numpy's diff."""
    j = np.arange(width, dtype=np.int64)
    d = (m - 32 * lo)[..., None]
    n = np.broadcast_to(n, m.shape)[..., None]
    edge = _NORMAL.at(si[..., None], 32 * j + 16 - d)
    edge = np.where(j < n - 1, edge, np.int64(1) << 32)
    p = np.diff(edge, prepend=np.zeros_like(edge[..., :1]), axis=-1)
    spare = (1 << 16) - n
    freq = np.where(j < n, 1 + ((p * spare) >> 32), 0)
    top = np.argmax(np.where(j < n, p, -1), axis=-1)[..., None]
    freq = freq + np.where(j == top, (1 << 16) - freq.sum(-1, keepdims=True), 0)
    return np.ldexp(freq.astype(np.float64), -16)


@settings(max_examples=150, deadline=None)
@given(st.integers(2, 130), st.integers(1, 4), st.integers(1, 5), st.booleans(),
       st.integers(0, 2**31 - 1))  # fmt: skip
def test_grid_tables_equal_the_reference_bit_for_bit(width, channels, batch, wild, seed):
    rng = np.random.default_rng(seed)
    n = rng.integers(1, width + 1, size=channels)
    lo = rng.integers(-300, 300, size=channels)
    if wild:  # cells outside the context model's clamp take the clamped lookup
        m = rng.integers(-(10**6), 10**6, size=(batch, channels))
    else:
        m = rng.integers(32 * (lo - 1), 32 * (lo + n) + 1, size=(batch, channels))
    si = rng.integers(0, 96, size=(batch, channels))
    got = grid_probs(m, si, lo, n, width)
    assert got.shape == (batch, channels, width)
    assert np.array_equal(got, _grid_probs_reference(m, si, lo, n, width))
    # one channel at a time (the decoder's calls) gives the same rows
    for c in range(channels):
        one = grid_probs(m[:, c : c + 1], si[:, c : c + 1], lo[c : c + 1], n[c : c + 1], width)
        assert np.array_equal(one[:, 0], got[:, c])


def test_the_fused_kernel_is_upsampling_then_the_convolution():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(5, 3, 3, padding=1).double()
    x = torch.randn(2, 5, 4, 6, dtype=torch.float64)
    want = conv(torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"))
    got = torch.nn.functional.conv_transpose2d(x, upsample_conv_kernel(conv.weight), conv.bias,
                                               stride=2, padding=1)  # fmt: skip
    assert torch.allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("net, inp", [
    (TaskDecoder(6, 16, (8, 8, 8), True), (3, 6)),
    (TaskDecoder(6, 16, (8, 7, 7), False), (3, 6)),
    (Lift((8, 4, 4), (4, 8, 8), True), (3, 8, 4, 4)),
    (GridDecoder(6, 2, (8, 8, 8), True), (3, 24)),
])  # fmt: skip
def test_the_inference_path_equals_forward(net, inp):
    torch.manual_seed(1)
    net = net.eval()
    x = torch.randn(*inp)
    with torch.no_grad():
        want = net(x)
        got = net.fast(x)
        again = net.fast(x)  # the cached kernel
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got, again)


def test_eval_forward_and_decompress_agree_and_train_on_the_fast_path():
    codec = build_codec("task", (16, 8, 8), latent=8, hidden=32, rates=2,
                        via=(32, 4, 4)).eval()  # fmt: skip
    codec.update(force=True)
    h = torch.rand(4, 16, 8, 8)
    out = codec(h, rate=1)
    assert out.features.is_contiguous()
    assert torch.equal(codec.decompress(codec.compress(h, rate=1)), out.features.detach())
    # gradients reach the decoder's weights through the fused convolution in eval mode
    out.features.sum().backward()
    conv = codec.g_s[1].conv[3]
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    # and the training path is the plain one
    codec.train()
    with torch.no_grad():
        codec.eval()
        fast = codec._synthesize(torch.randn(2, 8), fast=True)
    assert fast.shape == (2, 16, 8, 8)
