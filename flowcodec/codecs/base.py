"""The FeatureCodec API and the codec registry.

A :class:`FeatureCodec` compresses the hidden features at a split point, in the style of
CompressAI:

- ``forward(h)`` (training): differentiable; returns a :class:`CodecOutput` with the
  reconstruction and a rate estimate in bits per sample;
- ``compress(h)``: one :class:`~flowcodec.bitstream.Bitstream` per sample (real bytes);
- ``decompress(streams)``: the features, with lost packets concealed;
- ``update()``: freeze whatever coding tables the codec needs before ``compress``.

Every codec states where its halves run (``encoder_site``, ``decoder_site``) and can
report its encoder's FLOPs per sample (:meth:`FeatureCodec.encoder_flops`).

Example
-------
>>> import torch
>>> from flowcodec.codecs import build_codec
>>> codec = build_codec("raw", feature_shape=(4, 2, 2), dtype="float16")
>>> h = torch.randn(3, 4, 2, 2)
>>> streams = codec.compress(h)
>>> len(streams), streams[0].nbytes > 0
(3, True)
>>> torch.allclose(codec.decompress(streams), h, atol=1e-2)
True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from flowcodec.bitstream import Bitstream, BitstreamError, Header, TensorSpec, fingerprint
from flowcodec.errors import ConfigError
from flowcodec.flops import count_flops

__all__ = [
    "CodecOutput",
    "round_trip",
    "FeatureCodec",
    "CODECS",
    "register_codec",
    "build_codec",
    "channel_groups",
    "measured_bits",
]


@dataclass
class CodecOutput:
    """What ``forward`` returns.

    Attributes
    ----------
    features : torch.Tensor
        Reconstruction, ``(B, *feature_shape)``, float32.
    bits : torch.Tensor
        Estimated bits per sample ``(B,)`` (an estimate: measured rate comes from
        :func:`measured_bits` on real bytes).
    likelihoods : dict
        Per-latent likelihoods for codecs with entropy models (empty otherwise).
    """

    features: torch.Tensor
    bits: torch.Tensor
    likelihoods: dict


def measured_bits(streams: Sequence[Bitstream]) -> list[int]:
    """The rate of each stream as it crosses a link: ``8 * len(to_bytes())``."""
    return [8 * s.nbytes for s in streams]


def round_trip(codec: FeatureCodec, h: torch.Tensor) -> CodecOutput:
    """``codec``'s ``forward`` through its real bytes: ``compress`` then ``decompress`` (on
    ``h``'s device); ``bits`` are measured, there are no likelihoods."""
    streams = codec.compress(h)
    bits = torch.tensor([8.0 * s.nbytes for s in streams])
    return CodecOutput(codec.decompress(streams).to(h.device), bits, {})


def channel_groups(channels: int, packets: int) -> list[slice]:
    """Split ``channels`` into ``packets`` contiguous, near-equal groups."""
    if not 1 <= packets <= channels:
        raise ConfigError(f"packets must be in 1..{channels}, got {packets}")
    bounds = [round(i * channels / packets) for i in range(packets + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(packets)]


class FeatureCodec(nn.Module):
    """Base class: compresses features of shape ``(B, *feature_shape)``.

    Subclasses set ``name`` (the registry name), implement ``forward``, ``compress`` and
    ``decompress``, and override ``encoder`` (the device-side module) when they have
    one, so that :meth:`encoder_flops` counts it.

    Parameters
    ----------
    feature_shape : tuple of int
        Per-sample shape of the features, e.g. ``(64, 16, 16)``.
    """

    name: str = "base"
    encoder_site: str = "device"
    decoder_site: str = "receiver"
    #: Feature layouts (``flowcodec.shapes.LAYOUTS``) the codec can code; None: any. A
    #: ``feature_shape`` that declares another layout (``split.feature_shape`` does) is
    #: refused, so a codec never takes the wrong axis for the channels.
    layouts: tuple[str, ...] | None = None

    def __init__(self, feature_shape: Sequence[int]) -> None:
        super().__init__()
        shape = tuple(int(d) for d in feature_shape)
        if not shape or any(d <= 0 for d in shape):
            raise ConfigError(f"feature_shape must be positive ints, got {feature_shape!r}")
        layout = getattr(feature_shape, "layout", None)
        if layout is not None and self.layouts is not None and layout not in self.layouts:
            raise ConfigError(_layout_refusal(self.name, shape, layout, self.layouts))
        self.feature_shape = shape
        #: the declared layout, or the codec's own when ``feature_shape`` declares none
        self.layout = layout or (self.layouts[0] if self.layouts else None)
        # Value used where a packet was lost (per element); set by ``fit`` from training
        # features (their mean), zeros until then.
        self.register_buffer("conceal", torch.zeros(shape))

    # --- configuration --------------------------------------------------------------------
    def config(self) -> dict:
        """Everything that decides the byte format (hashed into the header fingerprint)."""
        return {"name": self.name, "feature_shape": list(self.feature_shape)}

    @property
    def fingerprint(self) -> bytes:
        return fingerprint(self.config())

    def make_header(self, meta: bytes = b"", tensors: Sequence[TensorSpec] = ()) -> Header:
        return Header(self.name, self.fingerprint, tuple(tensors), meta)

    def check_stream(self, stream: Bitstream) -> None:
        """Raise BitstreamError unless ``stream`` was written by this codec configuration."""
        self._check_stream(stream, self.fingerprint)

    def _check_stream(self, stream: Bitstream, fingerprint: bytes) -> None:
        """:meth:`check_stream` against ``fingerprint``, this codec's, computed by the
        caller (once for a batch of streams)."""
        if not isinstance(stream, Bitstream):
            raise BitstreamError(f"expected a Bitstream, got {type(stream).__name__}")
        if stream.header.codec != self.name:
            raise BitstreamError(f"stream is from codec {stream.header.codec!r}, not {self.name!r}")
        if stream.header.fingerprint != fingerprint:
            raise BitstreamError(
                f"stream fingerprint {stream.header.fingerprint.hex()} does not match this "
                f"{self.name!r} configuration ({fingerprint.hex()})"
            )

    def check_streams(self, streams: Sequence[Bitstream], n_packets: int) -> None:
        """Raise BitstreamError unless ``streams`` is a non-empty sequence of streams from
        this codec configuration, each with ``n_packets`` packets.

        The fingerprint (canonical JSON of :meth:`config`, hashed) is computed once per
        call, not once per stream. It is not kept between calls: :meth:`config` reads
        plain attributes that may change after construction (a token codec's
        ``threshold``, a quantizer's ``level``, an inner codec's config, lists changed in
        place), and no cheap test tells that none did."""
        if isinstance(streams, Bitstream) or not isinstance(streams, Sequence):
            raise BitstreamError("decompress takes a sequence of Bitstreams (one per sample)")
        if len(streams) == 0:
            raise BitstreamError("no streams to decode")
        fingerprint = self.fingerprint
        for s in streams:
            self._check_stream(s, fingerprint)
            if len(s.packets) != n_packets:
                raise BitstreamError(f"{self.name}: expected {n_packets} packets, "
                                     f"got {len(s.packets)}")  # fmt: skip

    def check_features(self, h: torch.Tensor) -> None:
        """Raise ConfigError unless ``h`` is a float tensor ``(B, *feature_shape)``."""
        if not isinstance(h, torch.Tensor):
            raise ConfigError(f"features must be a torch.Tensor, got {type(h).__name__}")
        if h.ndim != len(self.feature_shape) + 1 or tuple(h.shape[1:]) != self.feature_shape:
            raise ConfigError(
                f"{self.name}: features must have shape (B, *{self.feature_shape}), "
                f"got {tuple(h.shape)}"
            )
        if h.shape[0] == 0:
            raise ConfigError(f"{self.name}: features are an empty batch (B = 0); "
                              "give at least one sample")  # fmt: skip
        if not h.is_floating_point():
            raise ConfigError(f"{self.name}: features must be floating point, got {h.dtype}")
        if not torch.isfinite(h).all():
            raise ConfigError(f"{self.name}: features contain NaN or inf")

    def conceal_nonfinite(self, out: torch.Tensor) -> torch.Tensor:
        """``out`` ``(B, *feature_shape)`` with every NaN or inf element replaced by the
        concealment value (a receiver never hands non-finite features to the tail)."""
        bad = ~torch.isfinite(out)
        if not bool(bad.any()):
            return out
        fill = torch.nan_to_num(self.conceal.detach().to(out.device, out.dtype), 0.0, 0.0, 0.0)
        return torch.where(bad, fill.expand_as(out), out)

    # --- fitting and freezing -------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample of what ``compress`` takes (``feature_shape``, except for
        codecs that code several views of the input, e.g. a multi-view task codec)."""
        return self.feature_shape

    def device_features(self, head, x: torch.Tensor) -> torch.Tensor:
        """What the device computes from inputs ``x`` for ``compress``: ``head(x)``."""
        return head(x)

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> FeatureCodec:
        """Fit statistics from training features ``(N, *feature_shape)``; returns self."""
        self.check_features(features)
        self.conceal.copy_(features.float().mean(0))
        return self

    def update(self, force: bool = False) -> bool:
        """Freeze coding tables (no-op for codecs without entropy models)."""
        return False

    # --- the three calls ------------------------------------------------------------------
    def forward(self, h: torch.Tensor) -> CodecOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def compress(self, h: torch.Tensor) -> list[Bitstream]:  # pragma: no cover - abstract
        raise NotImplementedError

    def decompress(self, streams: Sequence[Bitstream]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    # --- cost -----------------------------------------------------------------------------
    @property
    def encoder(self) -> nn.Module | None:
        """The learned module run on the device before entropy coding (None if none)."""
        return None

    def encoder_flops(self) -> int:
        """FLOPs per sample of the device-side encoder (0 when it has no learned part)."""
        enc = self.encoder
        return 0 if enc is None else count_flops(enc, self.feature_shape)


def _layout_refusal(name: str, shape: tuple, layout: str, layouts: tuple) -> str:
    hint = {
        "hwc": "split_model(..., channels_first=True) moves the channels first at the cut "
               "(exactly), or a token codec ('token-prune') takes (H, W, C) as H*W tokens",
        "tokens": "use a token codec ('token-prune'), or 'raw' / 'quant'",
    }.get(layout, "pass features in a layout it takes")
    return (f"codec {name!r} codes layouts {list(layouts)}, but the features {shape} are "
            f"{layout!r}; {hint}")


CODECS: dict[str, Callable[..., FeatureCodec]] = {}


def register_codec(name: str):
    """Class decorator adding a codec to :data:`CODECS` (and setting its ``name``)."""

    def deco(cls):
        old = CODECS.get(name)
        # Running the same definition again (a notebook cell, a reloaded module) replaces
        # it; another class under a taken name is refused.
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__,
                                                                       cls.__qualname__):
            raise ConfigError(f"codec {name!r} is already registered (by "
                              f"{old.__module__}.{old.__qualname__})")  # fmt: skip
        cls.name = name
        CODECS[name] = cls
        return cls

    return deco


def build_codec(name: str, feature_shape: Sequence[int], **kwargs) -> FeatureCodec:
    """Build a registered codec for features of ``feature_shape``."""
    if name not in CODECS:
        raise ConfigError(f"unknown codec {name!r}; known: {sorted(CODECS)}")
    import inspect

    try:  # name the codec's arguments instead of a bare TypeError from its constructor
        inspect.signature(CODECS[name]).bind(feature_shape, **kwargs)
    except TypeError as e:
        params = list(inspect.signature(CODECS[name]).parameters.values())[1:]
        args = ", ".join(p.name if p.default is p.empty else f"{p.name}={p.default!r}"
                         for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
        raise ConfigError(f"codec {name!r}: {e}; it takes feature_shape and {args or 'nothing'}"
                          ) from None  # fmt: skip
    return CODECS[name](feature_shape, **kwargs)
