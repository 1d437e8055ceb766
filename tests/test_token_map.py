"""token-map: tokens coded by a (C, H, W) codec on a grid layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowcodec.bitstream import Bitstream, BitstreamError
from flowcodec.codecs import build_codec, load_codec, save_codec
from flowcodec.errors import ConfigError
from flowcodec.shapes import FeatureShape


def _codec(n=65, d=16, **kw):
    kw = {"inner": "factorized", "inner_kwargs": {"latent": 4, "hidden": 8, "packets": 1},
          **kw}  # fmt: skip
    torch.manual_seed(0)
    return build_codec("token-map", FeatureShape((n, d), "tokens"), **kw)


@settings(max_examples=30, deadline=None)
@given(gh=st.integers(1, 5), gw=st.sampled_from([2, 4, 6]), first=st.integers(0, 7),
       d=st.integers(1, 6))  # fmt: skip
def test_layout_round_trips_and_keeps_the_grid(gh, gw, first, d):
    n = first + gh * gw
    if first >= n:
        return
    c = build_codec("token-map", (n, d), inner="raw", grid=(gh, gw), first=first)
    h = torch.randn(2, n, d)
    m = c.to_map(h)
    assert m.shape[1:] == c.map_shape and c.map_shape[1] % 2 == 0
    assert torch.equal(c.to_tokens(m), h)
    # patch token (r, col) sits at map cell (r, col); padding cells are zero
    assert torch.equal(m[:, :, gh - 1, gw - 1], h[:, first + gh * gw - 1])
    assert int((m.abs().sum(1) == 0).sum()) >= 2 * (c.map_shape[1] * gw - gh * gw - first)


def test_round_trip_matches_forward_and_rate_is_real_bytes():
    c = _codec()
    h = torch.randn(3, 65, 16)
    c.fit(h).eval()
    c.update(force=True)
    streams = c.compress(h)
    assert all(s.header.codec == "token-map" for s in streams)
    back = c.decompress([Bitstream.from_bytes(s.to_bytes()) for s in streams])
    assert back.shape == h.shape
    assert torch.allclose(back, c(h).features, atol=1e-5)
    assert c.encoder_flops() > 0


def test_streams_of_another_configuration_are_refused():
    a, b = _codec(), _codec(first=1, multiple=4)
    h = torch.randn(1, 65, 16)
    for c in (a, b):
        c.fit(h).eval()
        c.update(force=True)
    with pytest.raises(BitstreamError, match="fingerprint"):
        b.decompress(a.compress(h))
    inner = a.inner.compress(a.to_map(h))  # the inner codec's own stream
    with pytest.raises(BitstreamError, match="token-map"):
        a.decompress(inner)
    with pytest.raises(BitstreamError):
        a.decompress([])


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="grid"):
        build_codec("token-map", (65, 8), inner="raw", grid=(8, 7))
    with pytest.raises(ConfigError, match="first"):
        build_codec("token-map", (65, 8), inner="raw", first=65)
    with pytest.raises(ConfigError, match="tokens"):
        build_codec("token-map", FeatureShape((8, 4, 4), "chw"), inner="raw")
    with pytest.raises(ConfigError, match="multiple"):
        build_codec("token-map", (65, 8), inner="raw", grid=(2, 32), multiple=3)


def test_checkpoint_round_trip(tmp_path):
    c = _codec()
    h = torch.randn(2, 65, 16)
    c.fit(h).eval()
    c.update(force=True)
    kw = {"inner": "factorized", "inner_kwargs": {"latent": 4, "hidden": 8, "packets": 1}}
    save_codec(c, tmp_path / "tm", kw)
    back = load_codec(tmp_path / "tm").eval()
    a, b = c.compress(h), back.compress(h)
    assert [s.to_bytes() for s in a] == [s.to_bytes() for s in b]
    # the decoder's weights are stored as float16: close to the original's output
    assert torch.allclose(back.decompress(a), c.decompress(a), atol=2e-2)
