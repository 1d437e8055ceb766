"""Input compression baselines: JPEG and WebP of the input image (Pillow).

What a user would do without flowcodec: compress the image, send it, decode it at the
receiver and run the whole large member there. These codecs work at split point 0: their
"features" are normalised images ``(3, H, W)``; they undo the normalisation, round to
uint8 pixels, and encode with Pillow at ``quality``. A lost packet (the whole image)
is concealed by the training mean image.

For an honest baseline use the encoders' strongest settings: WebP ``method=6`` (the
slowest, smallest search; the default stays 4 for compatibility) and JPEG with
``optimize=True`` (always on) and the chroma subsampling that costs fewer bytes at a
given accuracy (``subsampling="4:4:4"`` or ``"4:2:0"``; sweep both, see
``experiments/rd_baselines_cifar10.json``).

``strip=True`` sends only what changes from image to image, the way session framing
sends the flowcodec header once: for WebP the VP8 frame without its RIFF container, start
code and dimensions (27 bytes less; the receiver rebuilds them), for JPEG the entropy-coded
scan alone, with libjpeg's standard Huffman tables, so that everything before the scan
(tables, frame and scan headers, a constant for a given quality, subsampling and size) is
known to the receiver (``optimize`` would make the Huffman tables differ per image). This
is what an image codec costs when its constant headers travel once per session.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Sequence

import numpy as np
import torch

from flowcodec.bitstream import Bitstream, BitstreamError, TensorSpec
from flowcodec.codecs.base import CodecOutput, FeatureCodec, register_codec, round_trip
from flowcodec.errors import ConfigError

__all__ = ["ImageCodec", "JPEGCodec", "WebPCodec", "SUBSAMPLINGS"]

#: JPEG chroma subsampling modes accepted by ``subsampling``.
SUBSAMPLINGS = ("4:4:4", "4:2:2", "4:2:0")
_VP8_START = b"\x9d\x01\x2a"  # start code of a VP8 key frame


def _jpeg_split(data: bytes) -> tuple[bytes, bytes]:
    """``(everything up to the end of the SOS header, the scan data)`` of a baseline JPEG
    with one scan (the final EOI marker dropped)."""
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker, length = data[i + 1], int.from_bytes(data[i + 2 : i + 4], "big")
        if marker == 0xDA:
            end = i + 2 + length
            if data[-2:] != b"\xff\xd9" or end > len(data) - 2:
                break
            return data[:end], data[end:-2]
        i += 2 + length
    raise RuntimeError("not a single-scan JPEG: strip cannot be used")


class ImageCodec(FeatureCodec):
    """Pillow image codec over normalised images.

    Parameters
    ----------
    feature_shape : (3, H, W) or (1, H, W)
    quality : int
        1..100 (Pillow's quality; WebP ``quality=100`` is still lossy unless
        ``lossless=True``).
    mean, std : sequence of float
        The dataset's normalisation (``ArrayDataset.mean``/``.std``).
    lossless : bool
        WebP only: lossless coding.
    method : int or None
        WebP only: encoder effort 0..6 (``None``: Pillow's default, 4). 6 gives the
        smallest files.
    subsampling : str or None
        JPEG only: chroma subsampling, ``"4:4:4"``, ``"4:2:2"`` or ``"4:2:0"`` (``None``:
        Pillow's default, 4:2:0). Ignored for one-channel images.
    strip : bool
        Send only the per-image part of the file (see the module docstring); not with
        ``lossless``.

    The encoder options (``method``, ``subsampling``) enter :meth:`config`, and so the
    header fingerprint, only when set, so that streams of the defaults keep their
    fingerprint.

    Inputs ``h`` float32 ``(B, C, H, W)`` normalised images; ``compress`` returns one
    single-packet stream per image; ``decompress`` returns float32 ``(B, C, H, W)``.
    """

    format: str = ""

    def __init__(self, feature_shape: Sequence[int], quality: int = 75,
                 mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.5, 0.5, 0.5),
                 lossless: bool = False, method: int | None = None,
                 subsampling: str | None = None, strip: bool = False) -> None:  # fmt: skip
        super().__init__(feature_shape)
        c = self.feature_shape[0]
        if len(self.feature_shape) != 3 or c not in (1, 3):
            raise ConfigError(f"{self.name}: feature_shape must be (1|3, H, W), got "
                              f"{self.feature_shape}")  # fmt: skip
        if not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ConfigError(f"quality must be an int in 1..100, got {quality!r}")
        if len(mean) != c or len(std) != c or any(s <= 0 for s in std):
            raise ConfigError(f"mean and std need {c} values (std > 0)")
        if method is not None:
            if self.format != "WEBP":
                raise ConfigError(f"{self.name}: method is a WebP option (got method={method!r})")
            if isinstance(method, bool) or not isinstance(method, int) or not 0 <= method <= 6:
                raise ConfigError(f"method must be an int in 0..6, got {method!r}")
        if subsampling is not None:
            if self.format != "JPEG":
                raise ConfigError(f"{self.name}: subsampling is a JPEG option "
                                  f"(got subsampling={subsampling!r})")  # fmt: skip
            if subsampling not in SUBSAMPLINGS:
                raise ConfigError(f"subsampling must be one of {SUBSAMPLINGS}, "
                                  f"got {subsampling!r}")  # fmt: skip
        if lossless and self.format != "WEBP":
            raise ConfigError(f"{self.name}: lossless is a WebP option")
        if not isinstance(strip, bool) or (strip and lossless):
            raise ConfigError(f"strip must be a bool and not combined with lossless, "
                              f"got strip={strip!r}")  # fmt: skip
        self.quality, self.lossless = quality, bool(lossless)
        self.method, self.subsampling, self.strip = method, subsampling, strip
        self._jpeg_prefix: bytes | None = None
        self.mean_ = tuple(float(v) for v in mean)
        self.std_ = tuple(float(v) for v in std)

    def config(self) -> dict:
        cfg = {**super().config(), "quality": self.quality, "mean": self.mean_,
               "std": self.std_, "lossless": self.lossless}  # fmt: skip
        if self.method is not None:
            cfg["method"] = self.method
        if self.subsampling is not None:
            cfg["subsampling"] = self.subsampling
        if self.strip:
            cfg["strip"] = True
        return cfg

    def _stats(self, device):
        m = torch.tensor(self.mean_, device=device).view(1, -1, 1, 1)
        s = torch.tensor(self.std_, device=device).view(1, -1, 1, 1)
        return m, s

    def to_pixels(self, h: torch.Tensor) -> np.ndarray:
        """Normalised images -> uint8 ``(B, H, W, C)``."""
        m, s = self._stats(h.device)
        x = ((h * s + m) * 255).round().clamp(0, 255).to(torch.uint8)
        return x.permute(0, 2, 3, 1).cpu().numpy()

    def from_pixels(self, px: np.ndarray) -> torch.Tensor:
        m, s = self._stats("cpu")
        x = torch.from_numpy(np.array(px)).permute(0, 3, 1, 2).float() / 255
        return (x - m) / s

    def _encode(self, img: np.ndarray) -> bytes:
        from PIL import Image

        mode = "L" if img.shape[2] == 1 else "RGB"
        im = Image.fromarray(img[:, :, 0] if mode == "L" else img, mode=mode)
        buf = io.BytesIO()
        kw = {"quality": self.quality}
        if self.format == "WEBP":
            kw.update(lossless=self.lossless, method=4 if self.method is None else self.method)
        else:
            kw.update(optimize=not self.strip)
            if self.subsampling is not None and mode == "RGB":
                kw.update(subsampling=self.subsampling)
        im.save(buf, format=self.format, **kw)
        return buf.getvalue()

    # --- strip: the per-image part of the file, and back ------------------------------
    def _prefix(self) -> bytes:
        """JPEG bytes before the scan data (constant for this configuration)."""
        if self._jpeg_prefix is None:
            c, h, w = self.feature_shape
            self._jpeg_prefix = _jpeg_split(self._encode(np.zeros((h, w, c), np.uint8)))[0]
        return self._jpeg_prefix

    def _strip(self, data: bytes) -> bytes:
        if self.format == "JPEG":
            prefix, scan = _jpeg_split(data)
            if prefix != self._prefix():
                raise RuntimeError(f"{self.name}: the encoder wrote headers that differ from "
                                   "this configuration's; strip cannot be used")  # fmt: skip
            return scan
        _, h, w = self.feature_shape
        size = int.from_bytes(data[16:20], "little") if len(data) >= 20 else -1
        if (data[:4] != b"RIFF" or data[8:16] != b"WEBPVP8 " or size < 10
                or len(data) != 20 + size + (size & 1)
                or data[23:30] != _VP8_START + struct.pack("<HH", w, h)):  # fmt: skip
            raise RuntimeError(f"{self.name}: the encoder did not write a simple lossy WebP; "
                               "strip cannot be used")  # fmt: skip
        return data[20:23] + data[30 : 20 + size]

    def _unstrip(self, payload: bytes) -> bytes:
        if self.format == "JPEG":
            return self._prefix() + payload + b"\xff\xd9"
        _, h, w = self.feature_shape
        if len(payload) < 3:
            raise BitstreamError(f"{self.name}: stripped WebP payload of {len(payload)} bytes "
                                 "(at least 3)")  # fmt: skip
        chunk = payload[:3] + _VP8_START + struct.pack("<HH", w, h) + payload[3:]
        pad = b"\0" * (len(chunk) & 1)
        return (b"RIFF" + struct.pack("<I", 12 + len(chunk) + len(pad)) + b"WEBPVP8 "
                + struct.pack("<I", len(chunk)) + chunk + pad)  # fmt: skip

    def _decode(self, data: bytes) -> np.ndarray:
        from PIL import Image

        c, h, w = self.feature_shape
        try:
            with Image.open(io.BytesIO(data), formats=[self.format]) as im:
                if im.size != (w, h):
                    raise BitstreamError(f"decoded image is {im.size}, expected {(w, h)}")
                arr = np.asarray(im.convert("L" if c == 1 else "RGB"), dtype=np.uint8)
        except BitstreamError:
            raise
        except Exception as e:  # Pillow raises several types for bad data
            raise BitstreamError(f"{self.name}: payload is not a valid {self.format}: {e}") from e
        return arr.reshape(h, w, c)

    def forward(self, h: torch.Tensor) -> CodecOutput:
        """Round trip through the real codec (not differentiable); bits are measured."""
        return round_trip(self, h)

    @torch.no_grad()
    def compress(self, h: torch.Tensor) -> list[Bitstream]:
        self.check_features(h)
        header = self.make_header(tensors=[TensorSpec("float32", self.feature_shape)])
        if self.strip:
            return [Bitstream(header, [self._strip(self._encode(px))])
                    for px in self.to_pixels(h)]  # fmt: skip
        return [Bitstream(header, [self._encode(px)]) for px in self.to_pixels(h)]

    @torch.no_grad()
    def decompress(self, streams: Sequence[Bitstream]) -> torch.Tensor:
        self.check_streams(streams, 1)
        out = self.conceal.detach().cpu().expand(len(streams), *self.feature_shape).clone()
        for b, s in enumerate(streams):
            if s.packets[0] is not None:
                data = self._unstrip(bytes(s.packets[0])) if self.strip else s.packets[0]
                out[b] = self.from_pixels(self._decode(data)[None])[0]
        return out


@register_codec("jpeg")
class JPEGCodec(ImageCodec):
    """JPEG of the input image (Pillow, ``optimize=True``, optional ``subsampling``).
    See :class:`ImageCodec`.

    Example
    -------
    >>> import torch
    >>> codec = JPEGCodec((3, 8, 8), quality=90)
    >>> x = torch.zeros(2, 3, 8, 8)
    >>> tuple(codec.decompress(codec.compress(x)).shape)
    (2, 3, 8, 8)
    """

    format = "JPEG"


@register_codec("webp")
class WebPCodec(ImageCodec):
    """WebP of the input image (Pillow; ``method`` 4 unless set, 6 for the smallest files).
    See :class:`ImageCodec`.

    Example
    -------
    >>> import torch
    >>> codec = WebPCodec((3, 8, 8), quality=50)
    >>> codec.compress(torch.zeros(1, 3, 8, 8))[0].header.codec
    'webp'
    """

    format = "WEBP"
