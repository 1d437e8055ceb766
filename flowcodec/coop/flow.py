"""Cooperative inference over links: several device hops, one edge, per-device traces.

A :class:`CooperativeFlow` runs a trained :class:`~flowcodec.coop.fusion.CoopModel` the
way it would be deployed. Device ``k`` (a :class:`DeviceHop`: its kind, its own uplink to
the edge and its compute speed) runs its member's head and its task encoder on its view,
compresses the features into real streams (one
:class:`~flowcodec.bitstream.Bitstream` per sample) and sends their units over its link,
as :class:`flowcodec.pipeline.Flow` sends one device's (``Bitstream.units``, sample or
session framing). Any object with ``transmit(packets, snr_db=None, generator=None) ->
(delivered, report)`` is a link: the exact and the fast link of :mod:`channels`, or a
packet-erasure channel. A device whose stream does not arrive intact (a unit lost or
failing its CRC) is simply absent for that sample: the edge fuses the devices that arrived
(:meth:`CoopModel.edge`), and with none it answers the class prior with ``empty`` set.
Nothing is decoded from a damaged stream.

Traces, per sample:

- per device (:class:`DeviceTrace`): the bytes its link carried (the stream's units,
  framing included: ``len(stream.to_bytes())`` in sample framing), channel uses, packets
  sent and lost, whether the stream arrived, link time (channel uses over the symbol rate,
  plus the hop's delay and overhead), the device's FLOPs (head plus encoder, plus its exit's
  linear layer when it sends a confidence) and compute time;
- overall (:class:`CoopTrace`): devices fused, the empty flag, edge FLOPs (per-kind decoders
  of the devices that arrived, pooling, synthesis, the largest member's tail) and time, the
  bytes of the scene, the rounds, and the latency: the slowest *arriving* device's compute
  and link time plus the edge's compute (with no device arriving, the slowest device's time:
  the edge waited for every slot, and the prior costs nothing).

Selective transmission (``run(..., selective=Selective(...))``, the protocols of
:mod:`flowcodec.coop.selective`): the edge asks devices one at a time and stops when its
fused top probability reaches the threshold. Each request is ``REQUEST_BYTES`` and costs the
hop's delay (the downlink is not simulated); in the ``"confidence"`` protocol every device
first sends a ``CONFIDENCE_BYTES`` message over its link (a lost one counts as confidence 0:
that device is asked last), and the edge asks in decreasing confidence. A round's time is
the request's delay, the device's compute (``"fixed"``: a device computes when asked;
``"confidence"``: every device computed before the confidence round), its link time and
the edge's fusion; the latency is the confidence round (the slowest confidence message) plus
the rounds taken.

Compute time is FLOPs over the FLOP/s of the device or edge (assumptions, as
:data:`flowcodec.pipeline.DEFAULT_TIERS`); the entropy coders are not counted; no queueing.

Example
-------
>>> import torch
>>> from channels import IIDPacketErasure
>>> from flowcodec.coop.fusion import CoopConfig, CoopModel
>>> from flowcodec.family import build_family
>>> fam = build_family("digits").eval()
>>> model = CoopModel(fam, CoopConfig(kinds=("m2",), latent=4, dim=16, hidden=16)).eval()
>>> model.update()
>>> flow = CooperativeFlow(model, [DeviceHop("m2", IIDPacketErasure(0.0, seed=k))
...                               for k in range(2)])
>>> res = flow.run(torch.rand(3, 2, 1, 8, 8))
>>> tuple(res.logits.shape), res.traces[0].present, res.traces[0].devices[1].arrived
((3, 10), 2, True)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flowcodec.bitstream import Bitstream
from flowcodec.coop.fusion import KINDS, CoopModel
from flowcodec.coop.selective import (
    CONFIDENCE_BYTES,
    ORDERS,
    REQUEST_BYTES,
    confidence_byte,
    device_order,
)
from flowcodec.coop.views import N_ANCHORS, ViewGenerator, anchor_ids
from flowcodec.errors import ConfigError
from flowcodec.pipeline import DEFAULT_TIERS, Hop, TracedLogits, packet_bits_per_symbol

__all__ = ["DeviceHop", "Selective", "DeviceTrace", "CoopTrace", "CoopFlowResult",
           "CooperativeFlow"]


@dataclass
class DeviceHop:
    """One device and its own uplink to the edge.

    ``kind``: the device kind (a kind the model has: ``"m1"``, ``"m2"``); ``link``: any
    object with ``transmit(packets, snr_db=None, generator=None) -> (list[bytes | None],
    report)``; ``symbol_rate`` complex symbols per second; ``flops_per_s`` the device's
    compute speed (an assumption: :data:`~flowcodec.pipeline.DEFAULT_TIERS`); ``delay_s``
    the link's fixed delay (also what one request from the edge costs); ``snr_db`` passed
    to links that take one (None: the link's own); ``framing`` ``"session"`` (the header
    went once at set-up: only the packets travel) or ``"sample"`` (header and packets per
    sample); ``overhead_s`` a fixed per-sample transport cost; ``name`` for traces;
    ``anchor`` the id of the device's window anchor (:func:`~flowcodec.coop.views.anchor_id`;
    None: its slot's in the ``N``-device protocol). A camera's anchor is fixed: it travels
    once, with the session header, not with each sample, so it costs no per-sample bytes."""

    kind: str
    link: object
    symbol_rate: float = 1e6
    flops_per_s: float = DEFAULT_TIERS["device"]
    delay_s: float = 0.0
    snr_db: float | None = None
    framing: str = "session"
    overhead_s: float = 0.0
    name: str = ""
    anchor: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"device hop: unknown device kind {self.kind!r}; known: "
                              f"{list(KINDS)}")
        if isinstance(self.flops_per_s, bool) or not isinstance(self.flops_per_s, int | float) \
                or not self.flops_per_s > 0:
            raise ConfigError(f"device hop: flops_per_s must be positive, got "
                              f"{self.flops_per_s!r}")
        if self.anchor is not None and (isinstance(self.anchor, bool)
                                        or not isinstance(self.anchor, int)
                                        or not 0 <= self.anchor < N_ANCHORS):
            raise ConfigError(f"device hop: anchor must be an anchor id in 0..{N_ANCHORS - 1}, "
                              f"got {self.anchor!r}")


@dataclass(frozen=True)
class Selective:
    """Selective transmission: ``order`` ``"confidence"`` or ``"fixed"``, the fused top
    probability ``threshold`` at which the edge stops asking (above 1: it asks everybody),
    and for ``"fixed"`` the ``priority`` of the device positions (default 0, 1, ...)."""

    order: str = "fixed"
    threshold: float = 0.9
    priority: tuple[int, ...] | None = None

    def check(self, n: int) -> Selective:
        if self.order not in ORDERS:
            raise ConfigError(f"selective: order must be one of {list(ORDERS)}, got "
                              f"{self.order!r}")
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, int | float) \
                or not 0 <= self.threshold:
            raise ConfigError(f"selective: threshold must be a number >= 0, got "
                              f"{self.threshold!r}")
        if self.priority is not None and (self.order != "fixed"
                                          or sorted(self.priority) != list(range(n))):
            raise ConfigError(f"selective: priority must be a permutation of 0..{n - 1} with "
                              f"order 'fixed', got {self.priority!r} with {self.order!r}")
        return self


@dataclass
class DeviceTrace:
    """One device on one sample. ``asked``: it sent its stream (always, unless selective
    transmission stopped first); ``arrived``: the whole stream arrived intact (fused);
    ``bytes`` what its link carried for the stream (units, framing included), with
    ``channel_uses``, ``packets`` and ``packets_lost`` (link units); ``link_time_s``;
    ``flops`` and ``compute_time_s`` on the device; ``confidence_bytes`` and
    ``confidence_arrived`` (the confidence protocol's message), ``request_bytes`` (the
    edge's request) and ``round`` (1-based; None when not asked) of selective transmission."""

    device: int
    kind: str
    name: str
    asked: bool = False
    arrived: bool = False
    bytes: int = 0
    channel_uses: int = 0
    packets: int = 0
    packets_lost: int = 0
    link_time_s: float = 0.0
    flops: int = 0
    compute_time_s: float = 0.0
    confidence_bytes: int = 0
    confidence_arrived: bool = False
    request_bytes: int = 0
    round: int | None = None

    @property
    def mflops(self) -> float:
        return self.flops / 1e6

    @property
    def total_bytes(self) -> int:
        """Stream, confidence message and request: every byte this device's exchange cost."""
        return self.bytes + self.confidence_bytes + self.request_bytes


@dataclass
class CoopTrace:
    """One sample: its devices' traces, ``present`` devices fused, ``empty`` (none: the
    class prior answered), the edge's FLOPs and time, ``latency_s``, ``rounds`` of
    interaction (1 when every device sends at once) and the fused top probability."""

    devices: list[DeviceTrace]
    present: int = 0
    empty: bool = True
    edge_flops: int = 0
    edge_time_s: float = 0.0
    latency_s: float = 0.0
    rounds: int = 1
    confidence: float = 0.0

    @property
    def bytes(self) -> int:
        """Every byte of the scene: streams, confidence messages and requests."""
        return sum(d.total_bytes for d in self.devices)

    @property
    def device_flops(self) -> int:
        """FLOPs the devices spent together."""
        return sum(d.flops for d in self.devices)


@dataclass
class CoopFlowResult(TracedLogits):
    """Fused ``logits`` ``(B, classes)``, ``empty`` bool ``(B,)``, ``present`` int ``(B,)``
    and one :class:`CoopTrace` per sample."""

    logits: torch.Tensor
    empty: torch.Tensor
    present: torch.Tensor
    traces: list[CoopTrace]

    @property
    def mean_bytes(self) -> float:
        """Mean bytes per scene (streams, confidences and requests)."""
        return sum(t.bytes for t in self.traces) / max(1, len(self.traces))

    def arrival_rate(self) -> list[float]:
        """Per device position, the share of samples whose stream arrived."""
        n = len(self.traces[0].devices) if self.traces else 0
        return [sum(t.devices[k].arrived for t in self.traces) / len(self.traces)
                for k in range(n)]


class CooperativeFlow:
    """Several devices (``devices``: one :class:`DeviceHop` per view slot) over their own
    links to one edge running ``model``'s fusion and its largest member's tail.

    Parameters
    ----------
    model : CoopModel
        Trained, with its entropy tables frozen (``update()``; ``load_coop`` does it).
    devices : sequence of DeviceHop
        1..``model.cfg.max_devices``, of kinds the model has.
    edge_flops_per_s : float
        The edge's compute speed (an assumption; default ``DEFAULT_TIERS["edge"]``).
    views : ViewGenerator or None
        For :meth:`run_scene`: makes each device's view of a scene.

    :meth:`run` takes the devices' views ``(B, N, *input_shape)`` (or a list of ``N``
    tensors ``(B, *input_shape)``); :meth:`run_scene` takes scenes ``(B, *input_shape)``.
    """

    def __init__(self, model: CoopModel, devices: Sequence[DeviceHop],
                 edge_flops_per_s: float = DEFAULT_TIERS["edge"],
                 views: ViewGenerator | None = None) -> None:
        if not isinstance(model, CoopModel):
            raise ConfigError(f"a cooperative flow needs a CoopModel, got "
                              f"{type(model).__name__}")
        devices = list(devices) if isinstance(devices, Sequence) else devices
        if not isinstance(devices, list) or not devices \
                or not all(isinstance(d, DeviceHop) for d in devices):
            raise ConfigError("devices must be a non-empty list of DeviceHop")
        if len(devices) > model.cfg.max_devices:
            raise ConfigError(f"{len(devices)} devices; this model fuses "
                              f"1..{model.cfg.max_devices}")
        if isinstance(edge_flops_per_s, bool) or not isinstance(edge_flops_per_s, int | float) \
                or not edge_flops_per_s > 0:
            raise ConfigError(f"edge_flops_per_s must be positive, got {edge_flops_per_s!r}")
        if views is not None and (not isinstance(views, ViewGenerator)
                                  or views.devices != len(devices)):
            raise ConfigError(f"views must be a ViewGenerator of {len(devices)} devices, got "
                              f"{getattr(views, 'devices', type(views).__name__)}")
        self.model, self.devices, self.views = model, devices, views
        self.edge_flops_per_s = float(edge_flops_per_s)
        self.kinds = [d.kind for d in devices]
        # the anchors (None: each slot's in the N-device protocol, the edge's default)
        self.anchors = None
        if any(d.anchor is not None for d in devices):
            slots = anchor_ids(len(devices))
            self.anchors = [slots[k] if d.anchor is None else d.anchor
                            for k, d in enumerate(devices)]
        # The pipeline's hop checks the link, symbol rate, delay and framing.
        self._hops = [Hop(model._kind(d.kind).codec, d.link, d.symbol_rate, d.delay_s,
                          d.snr_db, d.framing, d.overhead_s) for d in devices]
        self._dev_flops = {k: model.device_flops(k)["total"] for k in set(self.kinds)}
        self._dev_flops_own = {k: model.device_flops(k, own_answer=True)["total"]
                               for k in set(self.kinds)}
        self._edge_base, self._edge_per = model.edge_flops_parts(self.kinds)

    # --- input ---------------------------------------------------------------------------
    def _check_views(self, views) -> torch.Tensor:
        n, shape = len(self.devices), tuple(self.model.family.input_shape)
        if isinstance(views, (list, tuple)):
            if len(views) != n:
                raise ConfigError(f"{len(views)} views for {n} devices")
            if not all(isinstance(v, torch.Tensor) for v in views) \
                    or len({tuple(v.shape) for v in views}) != 1:
                raise ConfigError("views: one tensor (B, *input) per device, all of one shape, "
                                  f"got {[tuple(getattr(v, 'shape', ())) for v in views]}")
            views = torch.stack(list(views), 1)
        if not isinstance(views, torch.Tensor) or views.ndim != 2 + len(shape) \
                or views.shape[1] != n or tuple(views.shape[2:]) != shape:
            raise ConfigError(f"views must be (B, {n}, *{shape}) (one view per device), got "
                              f"{tuple(getattr(views, 'shape', ())) or type(views).__name__}")
        if views.shape[0] == 0:
            raise ConfigError("views are an empty batch (B = 0); run at least one sample")
        if not views.is_floating_point() or not torch.isfinite(views).all():
            raise ConfigError("views must be finite floating-point images")
        return views

    def run_scene(self, x: torch.Tensor, index: torch.Tensor | None = None,
                  generator: torch.Generator | None = None,
                  selective: Selective | None = None) -> CoopFlowResult:
        """Each device's view of scenes ``x`` ``(B, *input)`` (ids ``index``, default
        ``0..B-1``) from the flow's view generator, then :meth:`run`."""
        if self.views is None:
            raise ConfigError("run_scene needs the flow's views (a ViewGenerator)")
        if not isinstance(x, torch.Tensor) or x.ndim < 1:
            raise ConfigError(f"scenes must be a tensor (B, *input), got {type(x).__name__}")
        index = torch.arange(len(x)) if index is None else index
        return self.run(self.views(x, index), generator, selective)

    # --- the links -----------------------------------------------------------------------
    def _send(self, k: int, units: list[list[bytes]], generator) -> tuple[list, list[int]]:
        """Units of several samples through device ``k``'s link: what arrived per sample,
        and each sample's channel uses."""
        dev, hop = self.devices[k], self._hops[k]
        flat = [u for us in units for u in us]
        kwargs = {"generator": generator} if generator is not None else {}
        if dev.snr_db is not None:
            kwargs["snr_db"] = dev.snr_db
        delivered, report = hop.link.transmit(flat, **kwargs)
        delivered = list(delivered)
        if len(delivered) != len(flat):
            raise ConfigError(f"device {k}'s link returned {len(delivered)} packets for "
                              f"{len(flat)}")
        per = getattr(report, "per_packet_channel_uses", None)
        bps = packet_bits_per_symbol(hop.link)
        got, uses, at = [], [], 0
        for us in units:
            got.append(delivered[at:at + len(us)])
            if per is not None:
                uses.append(int(sum(per[at:at + len(us)])))
            else:
                uses.append(int(-(-8 * sum(len(u) for u in us) // bps)))
            at += len(us)
        return got, uses

    def _link_time(self, k: int, uses: int) -> float:
        d = self.devices[k]
        return uses / d.symbol_rate + d.delay_s + d.overhead_s

    def _stream(self, k: int, streams: list[Bitstream], rows: list[int],
                traces: list[CoopTrace], generator) -> tuple[list[int], torch.Tensor | None]:
        """Send samples ``rows``' streams of device ``k``; fill their traces; returns the
        rows whose stream arrived intact and their decoded latents."""
        framing = self.devices[k].framing
        units = [streams[i].units(framing) for i in rows]
        got, uses = self._send(k, units, generator)
        ok, received = [], []
        for j, i in enumerate(rows):
            r = Bitstream.from_units(streams[i].header, got[j], framing, streams[i].seq)
            tr = traces[i].devices[k]
            tr.asked = True
            tr.bytes = sum(len(u) for u in units[j])
            tr.channel_uses = uses[j]
            tr.packets = len(units[j])
            tr.packets_lost = sum(u is None for u in got[j])
            tr.link_time_s = self._link_time(k, uses[j])
            tr.arrived = not r.lost and all(u is not None for u in got[j])
            if tr.arrived:
                ok.append(i)
                received.append(r)
        if not ok:
            return ok, None
        return ok, self.model.decompress(self.devices[k].kind, received)

    def _edge_flops(self, mask_row: torch.Tensor) -> int:
        if not bool(mask_row.any()):
            return 0
        return self._edge_base + sum(self._edge_per[self.kinds[k]]
                                     for k in mask_row.nonzero().flatten().tolist())

    # --- running -------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, views, generator: torch.Generator | None = None,
            selective: Selective | None = None) -> CoopFlowResult:
        """Run a batch of the devices' views ``(B, N, *input)`` through the flow: every
        device sends (``selective=None``), or the edge asks them in turn."""
        v = self._check_views(views)
        if selective is not None:
            if not isinstance(selective, Selective):
                raise ConfigError(f"selective must be a Selective, got "
                                  f"{type(selective).__name__}")
            return self._run_selective(v, selective.check(len(self.devices)), generator)
        model = self.model.eval()
        b, n = v.shape[:2]
        traces = self._new_traces(b)
        latents: list[torch.Tensor | None] = [None] * n
        mask = torch.zeros(b, n, dtype=torch.bool)
        for k, kind in enumerate(self.kinds):
            streams = model.compress(kind, model.device_features(kind, v[:, k]))
            flops = self._dev_flops[kind]
            for tr in traces:
                tr.devices[k].flops = flops
                tr.devices[k].compute_time_s = flops / self.devices[k].flops_per_s
            ok, lat = self._stream(k, streams, list(range(b)), traces, generator)
            if ok:
                full = torch.zeros(b, model.width)
                full[ok] = lat.float()
                latents[k] = full
                mask[ok, k] = True
        out = model.edge(latents, self.kinds, mask, batch=b, anchors=self.anchors)
        conf = torch.softmax(out.logits.float(), 1).amax(1)
        for i, tr in enumerate(traces):
            tr.present, tr.empty = int(out.present[i]), bool(out.empty[i])
            tr.edge_flops = self._edge_flops(mask[i])
            tr.edge_time_s = tr.edge_flops / self.edge_flops_per_s
            ready = [d.compute_time_s + d.link_time_s for d in tr.devices if d.arrived]
            wait = max(ready) if ready else max(d.compute_time_s + d.link_time_s
                                                for d in tr.devices)
            tr.latency_s = wait + tr.edge_time_s
            tr.rounds, tr.confidence = 1, float(conf[i])
        return CoopFlowResult(out.logits, out.empty, out.present, traces)

    def _new_traces(self, b: int) -> list[CoopTrace]:
        return [CoopTrace([DeviceTrace(k, d.kind, d.name or f"device{k}")
                           for k, d in enumerate(self.devices)]) for _ in range(b)]

    def _run_selective(self, v: torch.Tensor, sel: Selective, generator) -> CoopFlowResult:
        model = self.model.eval()
        b, n = v.shape[:2]
        traces = self._new_traces(b)
        streams = []
        conf_uses = torch.zeros(b, n, dtype=torch.long)  # the confidence round, per device
        conf_time = torch.zeros(b, n, dtype=torch.float64)
        conf = torch.zeros(b, n, dtype=torch.uint8)
        for k, kind in enumerate(self.kinds):
            h = model.device_features(kind, v[:, k])
            streams.append(model.compress(kind, h))
            if sel.order != "confidence":
                continue
            # every device computes its own answer and sends its confidence byte
            sent = confidence_byte(model.own_logits(kind, model.pooled(kind, h=h)))
            got, uses = self._send(k, [[bytes([c])] for c in sent.tolist()], generator)
            flops = self._dev_flops_own[kind]
            for i, tr in enumerate(traces):
                d = tr.devices[k]
                d.flops, d.compute_time_s = flops, flops / self.devices[k].flops_per_s
                d.confidence_bytes = CONFIDENCE_BYTES
                d.confidence_arrived = got[i][0] is not None
                conf[i, k] = got[i][0][0] if d.confidence_arrived else 0  # lost: asked last
                conf_uses[i, k] = uses[i]
                conf_time[i, k] = self._link_time(k, uses[i])
        if sel.order == "confidence":
            order = device_order("confidence", conf)
            clock = [max(d.compute_time_s + float(conf_time[i, k])
                         for k, d in enumerate(tr.devices)) for i, tr in enumerate(traces)]
        else:
            prio = sel.priority if sel.priority is not None else tuple(range(n))
            order = device_order("fixed", priority=prio, n=n).expand(b, n)
            clock = [0.0] * b
        latents = torch.zeros(b, n, model.width)
        mask = torch.zeros(b, n, dtype=torch.bool)
        logits = model.log_prior.expand(b, -1).clone()
        done = torch.zeros(b, dtype=torch.bool)
        for j in range(n):
            active = (~done).nonzero().flatten().tolist()
            if not active:
                break
            for k, dev in enumerate(self.devices):
                rows = [i for i in active if int(order[i, j]) == k]
                if not rows:
                    continue
                ok, lat = self._stream(k, streams[k], rows, traces, generator)
                if ok:
                    latents[ok, k] = lat.float()
                    mask[ok, k] = True
                for i in rows:
                    d = traces[i].devices[k]
                    d.round, d.request_bytes = j + 1, REQUEST_BYTES
                    if sel.order == "fixed":  # a device computes when it is asked
                        d.flops = self._dev_flops[dev.kind]
                        d.compute_time_s = d.flops / dev.flops_per_s
                        clock[i] += d.compute_time_s
                    clock[i] += dev.delay_s + d.link_time_s  # the request, then the stream
            out = model.edge(list(latents[active].unbind(1)), self.kinds, mask[active],
                             anchors=self.anchors)
            top = torch.softmax(out.logits.float(), 1).amax(1)
            for a, i in enumerate(active):
                tr = traces[i]
                ef = self._edge_flops(mask[i])
                tr.edge_flops += ef
                clock[i] += ef / self.edge_flops_per_s
                logits[i] = out.logits[a]
                tr.present, tr.empty = int(out.present[a]), bool(out.empty[a])
                tr.confidence = float(top[a])
                tr.rounds = j + 1 + (sel.order == "confidence")
                if float(top[a]) >= sel.threshold and not tr.empty:
                    done[i] = True
        for i, tr in enumerate(traces):
            tr.edge_time_s = tr.edge_flops / self.edge_flops_per_s
            tr.latency_s = clock[i]
            if sel.order == "confidence":  # the confidence message rode the same link
                for k, d in enumerate(tr.devices):
                    d.channel_uses += int(conf_uses[i, k])
                    d.link_time_s += float(conf_time[i, k])
        present = torch.tensor([t.present for t in traces])
        empty = torch.tensor([t.empty for t in traces])
        return CoopFlowResult(logits, empty, present, traces)

    # --- summaries -----------------------------------------------------------------------
    def device_flops(self) -> list[int]:
        """FLOPs per sample of each device (head plus encoder), in device order."""
        return [self._dev_flops[k] for k in self.kinds]
