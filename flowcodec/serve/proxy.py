"""A wireless hop in user space: a proxy that puts a ``channels`` link on real packets.

:class:`LinkProxy` listens where a device expects its edge server and forwards every
request to the real server (``upstream``). On the way it passes the sample's link units
through a ``channels`` link (:class:`~channels.FastLink`, :class:`~channels.ExactLink` or
a packet-erasure channel): the units the link loses are forwarded as lost, so the edge
conceals them exactly as in the simulated :class:`~flowcodec.pipeline.Flow`. The request
is held for the time the link takes, ``channel uses / symbol_rate + delay_s``:

- a device's samples share its link, so a device's next sample starts transmitting when
  its previous one has left the air (devices are told apart by their connection); the
  propagation delay is paid by each sample but does not occupy the link;
- the answer travels back unchanged (the downlink carries tens of bytes of logits and is
  not emulated, as the simulator does not count it either).

The request reaching the edge carries a link report (bits, channel uses, packets, lost,
transmission time) that the edge copies into the sample's trace, so a real run reports
the same per-hop figures as a simulated one.

The link is called in a worker thread, one call at a time in arrival order, so a seeded
link gives the same losses as the simulator given the same samples in the same order.
The kernel's ``netem`` qdisc would do the delaying and dropping below the transport, but it
cannot know which bytes form a packet of the codec; here the loss is per link unit.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import grpc

from flowcodec.errors import ConfigError
from flowcodec.pipeline import packet_bits_per_symbol
from flowcodec.serve.client import RemoteError
from flowcodec.serve.listen import ServeConfig, bind, server_options
from flowcodec.serve.tcp import connect_async
from flowcodec.serve.wire import LinkReport, Request, WireError, encode_request, parse_request

__all__ = ["LinkProxy"]

#: The last part of a hold (seconds) is slept by a timer thread, not by the event loop.
_FINE_S = 0.002
#: Timer threads: each holds one sample for at most _FINE_S, so a few cover many devices
#: (a sample that finds them all busy waits for one: late by under _FINE_S).
_TIMER_THREADS = 8

_STATUS = {"unreachable": grpc.StatusCode.UNAVAILABLE,
           "deadline": grpc.StatusCode.DEADLINE_EXCEEDED,
           "overloaded": grpc.StatusCode.RESOURCE_EXHAUSTED,
           "rejected": grpc.StatusCode.INVALID_ARGUMENT,
           "draining": grpc.StatusCode.UNAVAILABLE}


class LinkProxy:
    """Forward requests to ``upstream`` through an emulated link.

    Parameters
    ----------
    upstream : str
        ``host:port`` of the edge server (gRPC), or ``tcp://host:port``: its TCP port.
    link : object
        Anything with ``transmit(packets, snr_db=None, generator=None)`` (``channels``).
    symbol_rate : float
        Complex symbols per second of the link.
    delay_s : float
        Propagation delay added to every sample.
    snr_db : float, optional
        Passed to links that take one (``None``: the link's own).
    config : ServeConfig, optional
        Listening address and limits (only ``host``, ``port``, the message and connection
        limits and TLS apply).
    """

    def __init__(self, upstream: str, link, symbol_rate: float, delay_s: float = 0.0,
                 snr_db: float | None = None, config: ServeConfig | None = None,
                 upstream_root_cert: bytes | None = None,
                 upstream_server_name: str | None = None) -> None:  # fmt: skip
        if not callable(getattr(link, "transmit", None)):
            raise ConfigError("link must have a transmit(packets, ...) method")
        if not symbol_rate > 0 or delay_s < 0:
            raise ConfigError("symbol_rate must be positive and delay_s non-negative")
        self.upstream = upstream
        self.link = link
        self.symbol_rate = float(symbol_rate)
        self.delay_s = float(delay_s)
        self.snr_db = snr_db
        self.config = config or ServeConfig()
        self._up_tls = (upstream_root_cert, upstream_server_name)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flowcodec-link")
        self._timers = ThreadPoolExecutor(_TIMER_THREADS, thread_name_prefix="flowcodec-hold")
        self._busy_until: dict[str, float] = {}
        self.stats: dict[str, int] = {"received": 0, "forwarded": 0, "rejected": 0,
                                      "units": 0, "units_lost": 0}  # fmt: skip
        self.port: int | None = None

    async def start(self) -> int:
        cfg = self.config
        self._loop = asyncio.get_running_loop()
        self._client = connect_async(self.upstream, *self._up_tls)
        self._server = grpc.aio.server(options=server_options(cfg),
                                       maximum_concurrent_rpcs=cfg.max_concurrent_rpcs)
        handler = grpc.method_handlers_generic_handler("flowcodec.Tier", {
            "Infer": grpc.unary_unary_rpc_method_handler(self._infer)})  # fmt: skip
        self._server.add_generic_rpc_handlers((handler,))
        self.port = bind(self._server, cfg)
        await self._server.start()
        return self.port

    async def stop(self, grace_s: float = 5.0) -> None:
        await self._server.stop(grace_s)
        await self._client.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._timers.shutdown(wait=False, cancel_futures=True)

    async def _hold_until(self, when: float) -> None:
        """Wait until loop time ``when``. asyncio's timers wake up to a millisecond late
        (epoll's timeout is in whole milliseconds, rounded up), which a link of a few
        milliseconds would feel: the loop sleeps until ``_FINE_S`` before ``when``, and a
        timer thread sleeps the rest with the kernel's finer clock."""
        left = when - self._loop.time()
        if left > _FINE_S:
            await asyncio.sleep(left - _FINE_S)
            left = when - self._loop.time()
        if left > 0:
            await self._loop.run_in_executor(self._timers, time.sleep, left)

    def _transmit(self, units: list[bytes]) -> tuple[list, int]:
        kwargs = {"snr_db": self.snr_db} if self.snr_db is not None else {}
        delivered, report = self.link.transmit(units, **kwargs)
        uses = getattr(report, "per_packet_channel_uses", None)
        if uses is not None:
            cu = int(sum(uses))
        else:
            cu = int(-(-8 * sum(len(u) for u in units) // packet_bits_per_symbol(self.link)))
        return list(delivered), cu

    async def _infer(self, request: bytes, context) -> bytes:
        self.stats["received"] += 1
        arrived = self._loop.time()
        try:
            req = parse_request(request)
            if any(u is None for u in req.units) or not req.units:
                raise WireError("a device sends every unit (none lost) and at least one")
        except WireError as e:
            self.stats["rejected"] += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e)[:200])
        delivered, cu = await self._loop.run_in_executor(self._pool, self._transmit, req.units)
        air_s = cu / self.symbol_rate
        peer = context.peer() or ""
        start = max(arrived, self._busy_until.get(peer, 0.0))
        self._busy_until[peer] = start + air_s
        if len(self._busy_until) > 4096:  # forget idle devices: the table stays bounded
            now = self._loop.time()
            self._busy_until = {p: t for p, t in self._busy_until.items() if t > now}
        lost = sum(d is None for d in delivered)
        self.stats["units"] += len(delivered)
        self.stats["units_lost"] += lost
        tx = start - arrived + air_s + self.delay_s
        report = LinkReport(bits=8 * sum(len(u) for u in req.units), channel_uses=cu,
                            packets=len(req.units), packets_lost=lost,
                            header_lost=req.framing == "sample" and delivered[0] is None,
                            tx_time_s=tx)  # fmt: skip
        out = encode_request(Request(req.rid, req.seq, req.header, delivered, req.framing,
                                     report, req.answer))  # fmt: skip
        await self._hold_until(arrived + tx)
        remaining = context.time_remaining()
        timeout = self.config.default_deadline_s if remaining is None else remaining
        try:
            answer = await self._client.infer(out, timeout)
        except RemoteError as e:
            await context.abort(_STATUS.get(e.reason, grpc.StatusCode.UNKNOWN), e.detail or
                                e.reason)  # fmt: skip
        self.stats["forwarded"] += 1
        return answer
