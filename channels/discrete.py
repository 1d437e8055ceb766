"""Discrete channels: BSC and BEC on bit tensors; i.i.d. and Gilbert-Elliott packet erasures.

All draws go through a ``torch.Generator`` (passed in the call, or the channel's own, seeded
at construction), so the same seed gives the same flips / erasures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from channels._errors import ChannelError, ChannelTypeError

__all__ = ["BSC", "BEC", "IIDPacketErasure", "GilbertElliott", "ErasureReport"]


def _check_prob(name: str, p, upper_open: bool = False) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise ChannelTypeError(f"{name} must be a float, got {type(p).__name__}")
    if not math.isfinite(p) or p < 0 or p > 1 or (upper_open and p >= 1):
        raise ChannelError(f"{name} must be in [0, 1{')' if upper_open else ']'}, got {p!r}")
    return float(p)


def _make_gen(seed: int) -> torch.Generator:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ChannelTypeError(f"seed must be an int, got {type(seed).__name__}")
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _check_bits(bits) -> torch.Tensor:
    if not isinstance(bits, torch.Tensor):
        raise ChannelTypeError(f"bits must be a torch.Tensor, got {type(bits).__name__}")
    if bits.is_complex() or not ((bits == 0) | (bits == 1)).all():
        raise ChannelError("bits must hold only 0 and 1")
    return bits


def _rand(shape, gen: torch.Generator, device) -> torch.Tensor:
    u = torch.rand(shape, generator=gen, device=gen.device)
    return u.to(device)


class BSC(torch.nn.Module):
    """Binary symmetric channel: each bit flips independently with probability ``p``.

    Input ``bits`` any shape, float or int tensor of 0/1. Output: same shape and dtype.

    Example:
        >>> y = BSC(0.1, seed=0)(torch.zeros(1000))
    """

    def __init__(self, p: float, seed: int = 0):
        super().__init__()
        self.p = _check_prob("p", p)
        self._generator = _make_gen(seed)

    def forward(self, bits: torch.Tensor, generator: torch.Generator | None = None):
        bits = _check_bits(bits)
        gen = generator or self._generator
        flip = _rand(bits.shape, gen, bits.device) < self.p
        return torch.where(flip, 1 - bits, bits)


class BEC(torch.nn.Module):
    """Binary erasure channel: each bit is erased independently with probability ``p``.

    Input ``bits`` any shape of 0/1. Output: float tensor, same shape, erased bits set to
    ``erasure_value`` (default ``-1.0``; or ``nan``).

    Example:
        >>> y = BEC(0.2, seed=0)(torch.ones(100))
        >>> erased = y == -1
    """

    def __init__(self, p: float, erasure_value: float = -1.0, seed: int = 0):
        super().__init__()
        self.p = _check_prob("p", p)
        self.erasure_value = float(erasure_value)
        self._generator = _make_gen(seed)

    def forward(self, bits: torch.Tensor, generator: torch.Generator | None = None):
        bits = _check_bits(bits)
        gen = generator or self._generator
        erase = _rand(bits.shape, gen, bits.device) < self.p
        out = bits.to(torch.float32)
        return torch.where(erase, torch.full_like(out, self.erasure_value), out)


@dataclass
class ErasureReport:
    """Outcome of a packet erasure channel call.

    Attributes:
        per_packet_success: ``list[bool]``, True where the packet arrived.
        loss_rate: fraction of packets lost in this call.
        states: per packet state of the Gilbert-Elliott chain (0 good, 1 bad), or ``[]``.
    """

    per_packet_success: list[bool]
    loss_rate: float
    states: list[int] = field(default_factory=list)


def _check_packets(packets) -> list:
    if not isinstance(packets, (list, tuple)):
        raise ChannelTypeError(f"packets must be a list of bytes, got {type(packets).__name__}")
    for i, p in enumerate(packets):
        if not isinstance(p, (bytes, bytearray)):
            raise ChannelTypeError(f"packet {i} must be bytes, got {type(p).__name__}")
    return list(packets)


class IIDPacketErasure:
    """Each packet is lost independently with probability ``loss_rate``.

    ``transmit(packets: list[bytes], generator=None) -> (list[bytes | None], ErasureReport)``.

    Example:
        >>> out, rep = IIDPacketErasure(0.1, seed=0).transmit([b"ab", b"cd"])
    """

    def __init__(self, loss_rate: float, seed: int = 0):
        self.loss_rate = _check_prob("loss_rate", loss_rate)
        self._generator = _make_gen(seed)

    def transmit(self, packets, generator: torch.Generator | None = None):
        packets = _check_packets(packets)
        gen = generator or self._generator
        lost = (torch.rand(len(packets), generator=gen) < self.loss_rate).tolist()
        out = [None if lo else bytes(p) for p, lo in zip(packets, lost)]
        ok = [not lo for lo in lost]
        rate = (len(ok) - sum(ok)) / len(ok) if ok else 0.0
        return out, ErasureReport(per_packet_success=ok, loss_rate=rate)


class GilbertElliott:
    """Bursty packet losses from a two-state Markov chain (good: no loss, bad: loss).

    Parameterised by the stationary ``loss_rate`` pi_B and the ``mean_burst_length`` 1/r
    (mean sojourn in the bad state): ``P(bad -> good) = r = 1 / mean_burst_length`` and
    ``P(good -> bad) = p = r * pi_B / (1 - pi_B)``. The chain keeps its state across calls
    (a stream), starting from the stationary distribution; ``reset()`` restarts it.

    ``transmit(packets, generator=None) -> (list[bytes | None], ErasureReport)``.

    Example:
        >>> ge = GilbertElliott(loss_rate=0.1, mean_burst_length=4.0, seed=0)
        >>> out, rep = ge.transmit([b"x"] * 100)
    """

    def __init__(self, loss_rate: float, mean_burst_length: float, seed: int = 0):
        self.loss_rate = _check_prob("loss_rate", loss_rate, upper_open=True)
        if isinstance(mean_burst_length, bool) or not isinstance(mean_burst_length, (int, float)) \
                or not math.isfinite(mean_burst_length) or mean_burst_length < 1:
            raise ChannelError(f"mean_burst_length must be >= 1, got {mean_burst_length!r}")
        self.mean_burst_length = float(mean_burst_length)
        self.p_bad_to_good = 1.0 / self.mean_burst_length
        self.p_good_to_bad = self.p_bad_to_good * self.loss_rate / (1.0 - self.loss_rate)
        if self.p_good_to_bad > 1:
            raise ChannelError(
                f"loss_rate={loss_rate} with mean_burst_length={mean_burst_length} needs "
                f"P(good->bad) = {self.p_good_to_bad:.3f} > 1; use a longer burst length")
        self._seed = seed
        self._generator = _make_gen(seed)
        self._state: int | None = None

    def reset(self) -> None:
        """Restart the chain (next call draws the state from the stationary law)."""
        self._state = None
        self._generator = _make_gen(self._seed)

    def transmit(self, packets, generator: torch.Generator | None = None):
        packets = _check_packets(packets)
        gen = generator or self._generator
        fresh = self._state is None
        u = torch.rand(len(packets) + int(fresh), generator=gen).tolist()
        state = int(u[0] < self.loss_rate) if fresh else self._state
        states = []
        for i in range(len(packets)):
            if i > 0 or not fresh:
                v = u[i + int(fresh)]
                if state == 0:
                    state = int(v < self.p_good_to_bad)
                else:
                    state = int(v >= self.p_bad_to_good)
            states.append(state)
        self._state = state if packets else self._state
        out = [None if s else bytes(p) for p, s in zip(packets, states)]
        ok = [s == 0 for s in states]
        rate = (len(ok) - sum(ok)) / len(ok) if ok else 0.0
        return out, ErasureReport(per_packet_success=ok, loss_rate=rate, states=states)
