"""Send the device's answer: the exit's top-1 class, or its top-k with quantised confidences.

At split point ``p`` the device has already run stages ``1..p``, so it can run exit ``p``
(member ``p``'s classifier) and send its answer instead of features. That answer is the
floor every feature codec at ``p`` has to beat: a codec earns its bytes only where the
larger member, decoding its features, is more accurate than the device's own exit.

- ``"exit-top1"``: the exit's top-1 class, ``ceil(log2(classes))`` bits in one byte.
- ``"exit-topk"``: the top ``k`` classes in rank order, each with its softmax confidence
  quantised to ``bits`` bits (``round(p * (2**bits - 1))``), bit-packed MSB first and
  zero-padded to a whole byte: ``ceil(k * (ceil(log2(classes)) + bits) / 8)`` bytes.

These are codecs like the others: ``compress`` returns one real :class:`Bitstream` per
sample (one packet), so the rate is ``8 * len(to_bytes())`` (self-contained) or
``compact_nbytes`` (session framing), headers included. What differs is what
``decompress`` returns: not features but class scores ``(B, classes)`` (``answers =
True``), which the receiver uses as its answer (``flowcodec rd`` scores their argmax
directly, with no tail). The scores are the received confidences at the received
classes and the remaining mass shared evenly by the others (``bits=0``: 1, 1/2, 1/3...
by rank, 0 elsewhere); a decoded row's argmax is always the device's top-1 class (ties
between equal quantised confidences are broken by rank, with steps of 1e-6). A lost
packet is concealed with the prior (the mean exit probabilities on training features,
from :meth:`ExitCodec.fit`; uniform before it).

The device-side cost is the exit branch: :meth:`encoder_flops` counts it.

Example
-------
>>> import torch
>>> from torch import nn
>>> from flowcodec.codecs import build_codec
>>> exit_branch = nn.Sequential(nn.Flatten(), nn.Linear(4 * 2 * 2, 10))
>>> codec = build_codec("exit-topk", (4, 2, 2), exit_branch=exit_branch, k=2, bits=4)
>>> h = torch.randn(3, 4, 2, 2)
>>> streams = codec.compress(h)
>>> len(streams[0].packets[0])          # 2 x (4 class bits + 4 confidence bits)
2
>>> bool((codec.decompress(streams).argmax(1) == exit_branch(h).argmax(1)).all())
True
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from flowcodec.bitstream import Bitstream, BitstreamError, TensorSpec
from flowcodec.codecs.base import CodecOutput, FeatureCodec, register_codec, round_trip
from flowcodec.errors import ConfigError

__all__ = ["ExitCodec", "ExitTop1Codec", "ExitTopKCodec"]

MAX_CLASSES = 1 << 16
MAX_BITS = 16
_TIE = 1e-6


class ExitCodec(FeatureCodec):
    """The device exit's top-``k`` answer as a bitstream (see the module docstring).

    Parameters
    ----------
    feature_shape : tuple of int
        Per-sample shape of the split point's features (the exit's input).
    exit_branch : nn.Module or None
        The device's exit at this split point (``family.exits[p - 1]``), mapping
        ``(B, *feature_shape)`` to logits ``(B, classes)``. The codec keeps its own copy.
        ``None`` builds a receiver-only codec (``decompress`` works, ``compress`` raises
        ``ConfigError``); then ``num_classes`` is required.
    num_classes : int or None
        Number of classes (2..65536); taken from the exit when ``None``, checked
        against it otherwise.
    k : int
        Classes sent, in rank order (1..num_classes).
    bits : int
        Bits per quantised confidence (0..16; 0 sends ranks only).

    Inputs ``h`` float ``(B, *feature_shape)``; ``compress`` returns one single-packet
    stream per sample; ``decompress`` returns float32 scores ``(B, num_classes)``.
    """

    answers = True  # decompress returns the receiver's class scores, not features
    needs_exit = True  # built with the device exit at its split point (flowcodec rd)

    def __init__(self, feature_shape: Sequence[int], exit_branch: nn.Module | None = None,
                 num_classes: int | None = None, k: int = 1,
                 bits: int = 0) -> None:  # fmt: skip
        super().__init__(feature_shape)
        if exit_branch is not None and not isinstance(exit_branch, nn.Module):
            raise ConfigError(f"{self.name}: exit_branch must be an nn.Module, "
                              f"got {type(exit_branch).__name__}")  # fmt: skip
        if exit_branch is None and num_classes is None:
            raise ConfigError(f"{self.name}: give exit_branch (the device exit) or num_classes")
        self.exit_branch = None if exit_branch is None else copy.deepcopy(exit_branch).eval()
        if self.exit_branch is not None:
            self.exit_branch.requires_grad_(False)
            found = self._exit_classes()
            if num_classes is not None and num_classes != found:
                raise ConfigError(f"{self.name}: num_classes={num_classes!r} but the exit "
                                  f"gives {found} logits")  # fmt: skip
            num_classes = found
        if (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                or not 2 <= num_classes <= MAX_CLASSES):  # fmt: skip
            raise ConfigError(f"num_classes must be an int in 2..{MAX_CLASSES}, "
                              f"got {num_classes!r}")  # fmt: skip
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_classes:
            raise ConfigError(f"k must be an int in 1..{num_classes}, got {k!r}")
        if isinstance(bits, bool) or not isinstance(bits, int) or not 0 <= bits <= MAX_BITS:
            raise ConfigError(f"bits must be an int in 0..{MAX_BITS}, got {bits!r}")
        self.num_classes, self.k, self.bits = num_classes, k, bits
        self.class_bits = max(1, math.ceil(math.log2(num_classes)))
        self.payload_bytes = math.ceil(k * (self.class_bits + bits) / 8)
        self.register_buffer("prior", torch.full((num_classes,), 1.0 / num_classes))

    def _exit_classes(self) -> int:
        p = next(iter(self.exit_branch.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
        with torch.no_grad():
            out = self.exit_branch(torch.zeros((1, *self.feature_shape), device=device))
        if out.ndim != 2 or out.shape[0] != 1:
            raise ConfigError(f"{self.name}: the exit must return logits (B, classes), "
                              f"got {tuple(out.shape)}")  # fmt: skip
        return int(out.shape[1])

    def config(self) -> dict:
        return {**super().config(), "num_classes": self.num_classes, "k": self.k,
                "bits": self.bits}  # fmt: skip

    @property
    def encoder(self) -> nn.Module | None:
        return self.exit_branch

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> ExitCodec:
        """Set the concealment prior to the exit's mean probabilities on ``features``."""
        self.check_features(features)
        if self.exit_branch is not None:
            probs = self._probs(features)
            self.prior.copy_(probs.mean(0).to(self.prior))
        return self

    def _probs(self, h: torch.Tensor) -> torch.Tensor:
        p = next(iter(self.exit_branch.parameters()), None)
        if p is not None:
            h = h.to(p.device, p.dtype)
        logits = self.exit_branch(h).float()
        if logits.shape != (h.shape[0], self.num_classes):
            raise ConfigError(f"{self.name}: the exit returned {tuple(logits.shape)}, "
                              f"expected {(h.shape[0], self.num_classes)}")  # fmt: skip
        return logits.softmax(1).cpu()

    # --- payload ----------------------------------------------------------------------------
    def _pack(self, classes: list[int], levels: list[int]) -> bytes:
        value, nbits = 0, 0
        for c, q in zip(classes, levels, strict=True):
            value = (value << self.class_bits) | c
            nbits += self.class_bits
            if self.bits:
                value = (value << self.bits) | q
                nbits += self.bits
        pad = 8 * self.payload_bytes - nbits
        return (value << pad).to_bytes(self.payload_bytes, "big")

    def _unpack(self, payload: bytes) -> tuple[list[int], list[int]]:
        if len(payload) != self.payload_bytes:
            raise BitstreamError(f"{self.name}: payload has {len(payload)} bytes, expected "
                                 f"{self.payload_bytes}")  # fmt: skip
        value = int.from_bytes(payload, "big")
        pad = 8 * self.payload_bytes - self.k * (self.class_bits + self.bits)
        if value & ((1 << pad) - 1):
            raise BitstreamError(f"{self.name}: padding bits are not zero")
        value >>= pad
        classes, levels = [], []
        for _ in range(self.k):
            q = value & ((1 << self.bits) - 1) if self.bits else 0
            value >>= self.bits
            c = value & ((1 << self.class_bits) - 1)
            value >>= self.class_bits
            classes.append(c)
            levels.append(q)
        classes.reverse()
        levels.reverse()
        if any(c >= self.num_classes for c in classes):
            raise BitstreamError(f"{self.name}: class index {max(classes)} outside "
                                 f"0..{self.num_classes - 1}")  # fmt: skip
        if len(set(classes)) != len(classes):
            raise BitstreamError(f"{self.name}: a class is sent twice: {classes}")
        if any(a < b for a, b in zip(levels, levels[1:])):
            raise BitstreamError(f"{self.name}: confidences {levels} are not in rank order")
        return classes, levels

    def _scores(self, classes: list[int], levels: list[int]) -> torch.Tensor:
        out = torch.zeros(self.num_classes)
        if self.bits:
            top = 2**self.bits - 1
            conf = [q / top for q in levels]
            if self.k < self.num_classes:
                rest = max(0.0, 1.0 - sum(conf)) / (self.num_classes - self.k)
                out.fill_(min(rest, conf[-1]))
        else:
            conf = [1.0 / (r + 1) for r in range(self.k)]
        for r, (c, v) in enumerate(zip(classes, conf, strict=True)):
            out[c] = v + (self.k - r) * _TIE  # rank breaks ties: argmax is the top-1 class
        return out

    # --- the three calls ----------------------------------------------------------------------
    def forward(self, h: torch.Tensor) -> CodecOutput:
        """Round trip through the real bytes; ``features`` are the receiver's scores."""
        return round_trip(self, h)

    @torch.no_grad()
    def compress(self, h: torch.Tensor) -> list[Bitstream]:
        self.check_features(h)
        if self.exit_branch is None:
            raise ConfigError(f"{self.name}: a receiver-only codec (no exit_branch) cannot "
                              "compress")  # fmt: skip
        probs = self._probs(h)
        conf, idx = probs.topk(self.k, dim=1)  # sorted, largest first
        top = 2**self.bits - 1
        levels = (conf * top).round().clamp(0, top).long() if self.bits else torch.zeros_like(idx)
        header = self.make_header(tensors=[TensorSpec("float32", (self.num_classes,))])
        return [Bitstream(header, [self._pack(c, q)])
                for c, q in zip(idx.tolist(), levels.tolist(), strict=True)]  # fmt: skip

    @torch.no_grad()
    def decompress(self, streams: Sequence[Bitstream]) -> torch.Tensor:
        self.check_streams(streams, 1)
        out = self.prior.detach().cpu().expand(len(streams), self.num_classes).clone()
        for b, s in enumerate(streams):
            if s.packets[0] is not None:
                out[b] = self._scores(*self._unpack(bytes(s.packets[0])))
        return out


@register_codec("exit-top1")
class ExitTop1Codec(ExitCodec):
    """The device exit's top-1 class in one byte (``ExitCodec`` with ``k=1, bits=0``).

    Example
    -------
    >>> import torch
    >>> from torch import nn
    >>> codec = ExitTop1Codec((8,), exit_branch=nn.Linear(8, 10))
    >>> len(codec.compress(torch.randn(1, 8))[0].packets[0])
    1
    """

    def __init__(self, feature_shape: Sequence[int], exit_branch: nn.Module | None = None,
                 num_classes: int | None = None) -> None:  # fmt: skip
        super().__init__(feature_shape, exit_branch, num_classes, k=1, bits=0)


@register_codec("exit-topk")
class ExitTopKCodec(ExitCodec):
    """The device exit's top-``k`` classes with ``bits``-bit confidences (default 3 and 4).

    See :class:`ExitCodec`.
    """

    def __init__(self, feature_shape: Sequence[int], exit_branch: nn.Module | None = None,
                 num_classes: int | None = None, k: int = 3,
                 bits: int = 4) -> None:  # fmt: skip
        super().__init__(feature_shape, exit_branch, num_classes, k=k, bits=bits)
