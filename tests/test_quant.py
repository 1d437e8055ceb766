"""The quantising codecs (quant, pca; flowcodec/codecs/quant.py) on hostile streams: a zstd
payload that declares a huge size, the wrong size or more output is a BitstreamError."""

from __future__ import annotations

import struct

import pytest
from helpers import ready_small as ready
from helpers import small_features as _features
from helpers import with_packets as _with_packets

from flowcodec.bitstream import BitstreamError


# --- zstd decompression bomb (issue 14, hole 1) ---------------------------------------------
@pytest.mark.parametrize("name", ["quant", "pca"])
@pytest.mark.parametrize("declared", [2**31, 2**34, 2**40, 2**63])
def test_zstd_frame_declaring_a_huge_size_is_an_error_not_an_allocation(name, declared):
    codec = ready(name)
    bomb = bytes.fromhex("28b52ffde0") + struct.pack("<Q", declared)
    stream = _with_packets(codec, [bomb, bomb])
    with pytest.raises(BitstreamError, match="zstd"):
        codec.decompress([stream])


@pytest.mark.parametrize("name", ["quant", "pca"])
def test_zstd_frame_of_the_wrong_size_or_with_more_output_is_refused(name):
    import zstandard

    codec = ready(name)
    good = codec.compress(_features(1))[0]
    n = len(zstandard.ZstdDecompressor().decompress(good.packets[0]))
    for data in (bytes(n + 1), bytes(n - 1), bytes(2 * n)):
        frame = zstandard.ZstdCompressor().compress(data)
        with pytest.raises(BitstreamError, match="zstd"):
            codec.decompress([_with_packets(codec, [frame, good.packets[1]])])
    # a frame without a declared size that would stream out more than expected
    cobj = zstandard.ZstdCompressor(write_content_size=False).compressobj()
    frame = cobj.compress(bytes(10 * n)) + cobj.flush()
    with pytest.raises(BitstreamError, match="zstd"):
        codec.decompress([_with_packets(codec, [frame, good.packets[1]])])
