"""Selective transmission: the edge asks the devices in turn and stops when it is sure.

Two protocols (``order``):

- ``"confidence"``: every device first sends a one-byte confidence message (its own
  answer's top probability, quantised to 255 levels); the edge then asks the devices in
  order of decreasing confidence, one one-byte request per device asked;
- ``"fixed"``: the edge asks the devices in a fixed order (``priority``, e.g. the best
  device position on average first), one one-byte request each; no confidence round.

After each answer the edge fuses what it has; when the fused top probability reaches
``threshold`` it stops. Easy scenes then cost one device's bytes, hard ones use more. The
bytes of a sample are its requests, its confidence messages and the real streams of the
devices asked (``Bitstream.compact_nbytes``: session framing); its rounds are the
confidence round (when used) plus one per device asked.

Example
-------
>>> import torch
>>> fused = [torch.tensor([[0.9, 0.1]]).log(), torch.tensor([[0.99, 0.01]]).log()]
>>> r = run_selective(fused, torch.tensor([[0, 1]]), torch.tensor([[10, 12]]), 0.8, False)
>>> r.asked.tolist(), r.bytes.tolist()
([1], [11])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flowcodec.errors import ConfigError

__all__ = ["SelectiveResult", "ORDERS", "REQUEST_BYTES", "CONFIDENCE_BYTES", "confidence_byte",
           "device_order", "prefix_masks", "run_selective", "sweep"]

ORDERS = ("confidence", "fixed")
#: Size of one request (edge -> device) and one confidence message (device -> edge).
REQUEST_BYTES = 1
CONFIDENCE_BYTES = 1


def confidence_byte(logits: torch.Tensor) -> torch.Tensor:
    """A device's confidence message: top softmax probability as uint8 ``(B,)``."""
    p = torch.softmax(logits.float(), -1).amax(-1)
    return torch.round(p * 255).clamp(0, 255).to(torch.uint8)


def device_order(order: str, confidence: torch.Tensor | None = None,
                 priority: Sequence[int] | None = None, n: int | None = None) -> torch.Tensor:
    """The order ``(B, N)`` in which the edge asks: by decreasing confidence byte
    (``confidence`` uint8 ``(B, N)``; ties by device index) or ``priority`` for every row."""
    if order not in ORDERS:
        raise ConfigError(f"selective: order must be one of {list(ORDERS)}, got {order!r}")
    if order == "confidence":
        if confidence is None or confidence.ndim != 2:
            raise ConfigError("selective: order 'confidence' needs confidence bytes (B, N)")
        b, n_dev = confidence.shape
        key = confidence.long() * 64 - torch.arange(n_dev)  # stable: lower index first on ties
        return key.argsort(1, descending=True)
    if priority is None or n is None or sorted(priority) != list(range(n)):
        raise ConfigError(f"selective: order 'fixed' needs a priority permutation of 0..{n}, "
                          f"got {priority}")
    return torch.as_tensor(list(priority)).view(1, -1)


def prefix_masks(order: torch.Tensor, b: int) -> list[torch.Tensor]:
    """Masks ``(B, N)`` of the first ``j + 1`` devices in ``order`` (``(B, N)`` or ``(1, N)``)
    for ``j = 0..N-1``: what the edge holds after each round."""
    order = order.expand(b, -1)
    n = order.shape[1]
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n).expand(b, n).contiguous())
    return [rank <= j for j in range(n)]


@dataclass
class SelectiveResult:
    """Per sample: ``pred`` (B,), ``asked`` devices asked (B,), ``bytes`` (B,) and
    ``rounds`` (B,) of interaction."""

    pred: torch.Tensor
    asked: torch.Tensor
    bytes: torch.Tensor
    rounds: torch.Tensor


def run_selective(fused_logits: Sequence[torch.Tensor], order: torch.Tensor,
                  stream_bytes: torch.Tensor, threshold: float,
                  confidence_round: bool) -> SelectiveResult:
    """Stop at the first round whose fused top probability reaches ``threshold``.

    ``fused_logits[j]`` ``(B, classes)``: the edge's answer from the first ``j + 1`` devices
    of ``order`` ``(B, N)``; ``stream_bytes`` ``(B, N)``: each device's stream size;
    ``confidence_round``: every device sent a confidence byte first."""
    n = len(fused_logits)
    if n < 1 or order.shape[-1] != n or stream_bytes.ndim != 2 or stream_bytes.shape[1] != n:
        raise ConfigError(f"selective: {n} rounds of answers, an order of "
                          f"{order.shape[-1]} devices and stream sizes "
                          f"{tuple(stream_bytes.shape)} must agree")
    b = fused_logits[0].shape[0]
    order = order.expand(b, -1)
    done = torch.zeros(b, dtype=torch.bool)
    asked = torch.full((b,), n, dtype=torch.long)
    pred = fused_logits[-1].argmax(1)
    for j, lg in enumerate(fused_logits):
        sure = torch.softmax(lg.float(), 1).amax(1) >= threshold
        stop = sure & ~done
        asked[stop] = j + 1
        pred = torch.where(stop, lg.argmax(1), pred)
        done |= stop
    sizes = stream_bytes.gather(1, order)  # in asking order
    sent = (torch.arange(n)[None] < asked[:, None]) * sizes
    nbytes = sent.sum(1) + asked * REQUEST_BYTES
    rounds = asked.clone()
    if confidence_round:
        nbytes = nbytes + n * CONFIDENCE_BYTES
        rounds = rounds + 1
    return SelectiveResult(pred, asked, nbytes, rounds)


def sweep(fused_logits, order, stream_bytes, labels: torch.Tensor,
          thresholds: Sequence[float], confidence_round: bool) -> list[dict]:
    """One row per threshold: accuracy, mean bytes per scene, devices asked, rounds."""
    rows = []
    for t in thresholds:
        r = run_selective(fused_logits, order, stream_bytes, float(t), confidence_round)
        rows.append({"threshold": float(t),
                     "accuracy": float((r.pred == labels).float().mean()),
                     "bytes_per_scene": float(r.bytes.float().mean()),
                     "devices_asked": float(r.asked.float().mean()),
                     "rounds": float(r.rounds.float().mean())})
    return rows
