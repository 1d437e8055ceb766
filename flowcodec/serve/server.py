"""A tier (edge or cloud) as an asyncio gRPC server with dynamic batching.

Each ``Infer`` request is one sample (:mod:`flowcodec.serve.wire`); an ``InferBatch``
request carries several (up to ``max_samples_per_request``), see below. The same calls
also come over plain TCP when ``tcp_port`` is set (:mod:`flowcodec.serve.tcp`: framed
calls, many in flight per connection, without gRPC's per-call cost). The server

1. parses and checks it on arrival (a malformed request is answered ``INVALID_ARGUMENT``
   at once and never queued). The samples that arrive together (the samples of a batch
   call, or every call a TCP read delivered) are parsed in one pass and their streams
   checked together (:meth:`TierEngine.streams_of`: a codec header is parsed once per
   configuration, then recognised by its bytes);
2. puts it in a bounded queue; a full queue answers ``RESOURCE_EXHAUSTED`` at once
   (back-pressure: the caller falls back or retries, the server's memory stays bounded);
3. a batcher takes up to ``max_batch`` samples, waiting at most ``max_wait_s`` after the
   first for more, drops those whose deadline has passed, and runs
   :meth:`TierEngine.run` on the batch in a worker thread (the event loop keeps
   accepting meanwhile); the next batch is formed while one computes and waits behind
   it, so the worker does not idle while the loop answers;
4. answers through its exit, or forwards the re-encoded features to the next tier's
   server within what is left of the request's deadline; when the next tier fails or is
   late it answers through its own exit and the answer says why (``fallback``). The
   answer is in the form the request asked for (``Request.answer``): binary, or JSON.

Trust in what arrived: a sample more of whose packets had to be concealed than the tier's
``TierSpec.max_concealed`` is neither answered as usual nor forwarded: its answer has
``fallback`` ``"concealed input"`` (:data:`~flowcodec.serve.engine.CONCEALED_INPUT`) and
the caller answers through its own exit (a device: ``"concealed"``; a tier in front:
``"concealed"`` too, with the next tier's hop in the trace). Every hop of an answer's
trace carries ``concealed``, the fraction of the sample's packets concealed there; the
``concealed_input`` counter counts such samples.

A batch call's samples are parsed one by one: bad framing (magic, count, lengths,
trailing bytes) refuses the whole call ``INVALID_ARGUMENT``; a sample whose own envelope
or stream is bad gets a per-sample error entry and the others are served. The valid
samples go into the same queue as single-sample requests, so they batch with other
clients' samples, and all of them or none: when the queue cannot take them all, the
call is refused ``RESOURCE_EXHAUSTED`` with none of them queued (a device's frames stay
together, and the caller falls back or retries as for one sample). The call's deadline
covers all its samples; a sample still unanswered when it passes gets a per-sample
``"deadline"`` entry, and the others are answered (when every sample of the call missed
it, the call fails ``DEADLINE_EXCEEDED``, as a single-sample call does). The answer lists
every sample in request order. The counters (``Stats``) count samples, whichever call
carried them: ``received``, ``answered``, ``rejected``, ``overloaded``, ``deadline``,
``failed``; ``batch_calls`` and ``batch_rejected`` (bad framing) count calls.

Every request has a deadline: the caller's gRPC deadline, capped by
``default_deadline_s``. :meth:`TierServer.stop` drains: new requests get ``UNAVAILABLE``
("draining") while queued and running ones are answered, up to ``grace_s``.

Limits that bound memory whatever the clients send: message size
(``max_message_bytes``, checked by gRPC from the length prefix before the body is
read), queue length, samples per call (``max_samples_per_request``), concurrent calls
(``max_concurrent_rpcs``), and connection age (slow senders are cut off after
``max_connection_age_s`` plus a grace period).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc

from flowcodec.errors import ConfigError
from flowcodec.serve.client import RemoteError, reason_of
from flowcodec.serve.engine import CONCEALED_INPUT, TierEngine
from flowcodec.serve.listen import ServeConfig, bind, freeze_heap, server_options
from flowcodec.serve.tcp import INFER_BATCH, Call, FrameServer, connect_async
from flowcodec.serve.thread import ServerThread
from flowcodec.serve.wire import (
    Request,
    SampleError,
    WireError,
    encode_answer,
    encode_batch_answer,
    encode_request,
    parse_answer,
    parse_batch,
    parse_requests,
)

__all__ = ["ServeConfig", "TierServer", "ServerThread", "server_options", "freeze_heap"]


@dataclass(slots=True)
class _Item:
    req: Request
    stream: object
    deadline: float  # loop time
    fut: asyncio.Future
    arrived: float  # perf_counter
    timer: asyncio.TimerHandle | None = None


class TierServer:
    """Serve one :class:`TierEngine` (see the module docstring).

    Use from asyncio: ``port = await server.start()``, ``await server.stop()``; or from
    blocking code through :class:`ServerThread`.
    """

    def __init__(self, engine: TierEngine, config: ServeConfig | None = None) -> None:
        self.engine = engine
        self.config = config or ServeConfig()
        if not engine.last and not self.config.next_address:
            raise ConfigError(f"tier {engine.spec.name!r} forwards samples: set next_address")
        self.port: int | None = None
        self.tcp_port: int | None = None
        self.stats: collections.Counter = collections.Counter()
        self.batch_sizes: collections.Counter = collections.Counter()
        self._server = None
        self._queue: asyncio.Queue | None = None
        self._batcher: asyncio.Task | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="flowcodec-tier")
        self._next = None
        self._tcp: FrameServer | None = None
        self._draining = False
        self._forwards: set[asyncio.Task] = set()
        self._batches: set[asyncio.Task] = set()

    # --- life cycle --------------------------------------------------------------------
    async def start(self) -> int:
        cfg = self.config
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(cfg.queue_size)
        self._server = grpc.aio.server(options=server_options(cfg),
                                       maximum_concurrent_rpcs=cfg.max_concurrent_rpcs)
        handler = grpc.method_handlers_generic_handler("flowcodec.Tier", {
            "Infer": grpc.unary_unary_rpc_method_handler(self._infer),
            "InferBatch": grpc.unary_unary_rpc_method_handler(self._infer_batch),
            "Stats": grpc.unary_unary_rpc_method_handler(self._stats),
        })  # fmt: skip
        self._server.add_generic_rpc_handlers((handler,))
        self.port = bind(self._server, cfg)
        if cfg.next_address:
            self._next = connect_async(cfg.next_address, cfg.next_root_cert,
                                       cfg.next_server_name)  # fmt: skip
        self._batcher = asyncio.create_task(self._batch_loop())
        await self._server.start()
        if cfg.tcp_port is not None:
            self._tcp = FrameServer(self._tcp_infer, self._tcp_call, self._deadline, cfg)
            self.tcp_port = await self._tcp.start()
        return self.port

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop accepting, answer what is queued or running (up to ``grace_s``), close."""
        self._draining = True
        stopping = []
        if self._server is not None:
            stopping.append(self._server.stop(grace_s))
        if self._tcp is not None:
            stopping.append(self._tcp.stop(grace_s))
        await asyncio.gather(*stopping)
        if self._forwards:
            await asyncio.wait(self._forwards, timeout=grace_s)
        if self._batcher is not None:
            self._batcher.cancel()
            try:
                await self._batcher
            except asyncio.CancelledError:
                pass
        for task in list(self._batches):  # answered by now unless grace ran out
            task.cancel()
        if self._next is not None:
            await self._next.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def serve_forever(self) -> None:
        """Run until SIGINT or SIGTERM, then drain and stop."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await self.stop()

    # --- handlers ----------------------------------------------------------------------
    def _stats_bytes(self) -> bytes:
        stats = {**self.stats, "batch_sizes": dict(self.batch_sizes),
                 "queued": self._queue.qsize()}  # fmt: skip
        if self._tcp is not None:
            stats["tcp"] = dict(self._tcp.stats)
        return json.dumps(stats).encode()

    async def _stats(self, request: bytes, context) -> bytes:
        return self._stats_bytes()

    async def _infer(self, request: bytes, context) -> bytes:
        self.stats["received"] += 1
        if self._draining:
            self.stats["refused_draining"] += 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "draining")
        (item,) = self._admit([request], [self._deadline(context.time_remaining())])
        if isinstance(item, SampleError):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, item.detail)
        if not self._queue_one(item):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        try:
            code, payload = self._single_result(await item.fut)
        finally:
            item.timer.cancel()
        if code != grpc.StatusCode.OK:
            await context.abort(code, payload)
        return payload

    def _tcp_infer(self, calls: list[Call]) -> None:
        """The ``Infer`` calls one read of a TCP connection delivered: admitted together,
        each queued (or refused) and answered on its own, through callbacks (no task or
        coroutine per call)."""
        self.stats["received"] += len(calls)
        if self._draining:
            self.stats["refused_draining"] += len(calls)
            for c in calls:
                c.reply(grpc.StatusCode.UNAVAILABLE, "draining")
            return
        items = self._admit([c.body for c in calls], [c.deadline for c in calls])
        for c, item in zip(calls, items):
            if isinstance(item, SampleError):
                c.reply(grpc.StatusCode.INVALID_ARGUMENT, item.detail)
            elif not self._queue_one(item):
                c.reply(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
            else:
                item.fut.add_done_callback(functools.partial(self._tcp_answer, c, item))

    def _tcp_answer(self, call: Call, item: _Item, fut: asyncio.Future) -> None:
        item.timer.cancel()
        call.reply(*self._single_result(fut.result()))

    async def _tcp_call(self, method: int, body: bytes, deadline: float):
        """``InferBatch`` and ``Stats`` over TCP: ``(code, payload)``."""
        if method == INFER_BATCH:
            return await self._batch_call(body, deadline)
        return grpc.StatusCode.OK, self._stats_bytes()

    def _deadline(self, remaining: float | None) -> float:
        """A call's deadline in loop time: the caller's (``remaining`` seconds, ``None``:
        none given), capped by default_deadline_s."""
        budget = self.config.default_deadline_s
        if remaining is not None:
            budget = min(budget, remaining)
        return self._loop.time() + budget

    def _admit(self, envelopes: list[bytes], deadlines: list[float],
               numbered: bool = False) -> list[_Item | SampleError]:  # fmt: skip
        """Queue items for samples that arrived together (not queued yet), or the
        ``rejected`` :class:`SampleError` of each refused one (counted; ``numbered``: its
        detail names the sample's place in the call): the envelopes are parsed in one pass
        and their streams checked together."""
        reqs = parse_requests(envelopes)
        streams = iter(self.engine.streams_of([r for r in reqs if isinstance(r, Request)]))
        loop, now = self._loop, time.perf_counter()
        out: list[_Item | SampleError] = []
        for i, (r, deadline) in enumerate(zip(reqs, deadlines)):
            s = r if isinstance(r, WireError) else next(streams)
            if isinstance(s, Exception):
                self.stats["rejected"] += 1
                where = f"sample {i}: " if numbered else ""
                out.append(SampleError("rejected", f"{where}{s}"[:200]))
            else:
                out.append(_Item(r, s, deadline, loop.create_future(), now))
        return out

    def _queue_one(self, item: _Item) -> bool:
        """Queue one sample with a timer that settles it at its deadline (cheaper per
        request than wait_for, which wraps every wait in a task of its own); ``False``
        (counted ``overloaded``) when the queue is full."""
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            self.stats["overloaded"] += 1
            return False
        item.timer = self._loop.call_at(item.deadline, _settle, item.fut, _EXPIRED, "")
        return True

    def _single_result(self, result: tuple) -> tuple:
        """A single-sample call's ``(code, payload)`` from its item's result, counted."""
        code, payload = result
        if code is _EXPIRED:
            self.stats["deadline"] += 1
            return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed in queue"
        if code != grpc.StatusCode.OK:
            self.stats["failed"] += 1
            return code, payload
        self.stats["answered"] += 1
        return code, payload

    async def _infer_batch(self, request: bytes, context) -> bytes:
        """Several samples in one call (see the module docstring for what is refused
        whole and what per sample)."""
        code, payload = await self._batch_call(request,
                                               self._deadline(context.time_remaining()))
        if code != grpc.StatusCode.OK:
            await context.abort(code, payload)
        return payload

    async def _batch_call(self, request: bytes, deadline: float) -> tuple:
        """An ``InferBatch`` call, whichever transport carried it: ``(code, payload)``."""
        self.stats["batch_calls"] += 1
        try:
            envelopes = parse_batch(request, self.config.max_samples_per_request)
        except WireError as e:
            self.stats["batch_rejected"] += 1
            return grpc.StatusCode.INVALID_ARGUMENT, str(e)[:200]
        n = len(envelopes)
        self.stats["received"] += n
        if self._draining:
            self.stats["refused_draining"] += n
            return grpc.StatusCode.UNAVAILABLE, "draining"
        entries = self._admit(envelopes, [deadline] * n, numbered=True)
        items = [e for e in entries if isinstance(e, _Item)]
        q = self._queue
        if items and q.maxsize - q.qsize() < len(items):
            # All or none: nothing is queued, so no sample of a refused call is computed.
            self.stats["overloaded"] += len(items)
            return grpc.StatusCode.RESOURCE_EXHAUSTED, (
                f"queue full: {len(items)} samples, room for {q.maxsize - q.qsize()} of "
                f"{q.maxsize}")  # fmt: skip
        for it in items:  # no await in between: the room checked above is still there
            q.put_nowait(it)
        if items:
            # One timer for the call: it settles every unanswered sample at the deadline.
            timer = self._loop.call_at(deadline, _expire, [it.fut for it in items])
            try:
                await asyncio.gather(*(it.fut for it in items))
            finally:
                timer.cancel()
        answer = []
        expired = 0
        for e in entries:
            if isinstance(e, SampleError):
                answer.append(e)
                continue
            code, payload = e.fut.result()
            if code is _EXPIRED:
                self.stats["deadline"] += 1
                expired += 1
                answer.append(SampleError("deadline", "deadline passed before the answer"))
            elif code != grpc.StatusCode.OK:
                self.stats["failed"] += 1
                answer.append(SampleError(reason_of(code, payload), str(payload)[:200]))
            else:
                self.stats["answered"] += 1
                answer.append(payload)
        if expired == n:  # nothing to say per sample: fail as a single-sample call does
            return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before any sample's answer"
        try:
            return grpc.StatusCode.OK, encode_batch_answer(answer)
        except WireError as e:  # answers too large together: nothing sensible to send
            self.stats["internal_errors"] += 1
            return grpc.StatusCode.INTERNAL, str(e)[:200]

    # --- batching ----------------------------------------------------------------------
    async def _next_batch(self) -> list[_Item]:
        q, cfg = self._queue, self.config
        batch = [await q.get()]
        end = self._loop.time() + cfg.max_wait_s
        while len(batch) < cfg.max_batch:
            try:
                batch.append(q.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            left = end - self._loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(q.get(), left))
            except TimeoutError:
                break
        return batch

    async def _batch_loop(self) -> None:
        # Two batches in flight (by default): while the worker computes one, the next is formed and
        # queued behind it, so the worker goes from batch to batch without waiting for the
        # event loop to answer the last one. A slot is taken before a batch is formed, so
        # with both in flight the queue keeps filling the next batch.
        slots = asyncio.Semaphore(self.config.batches_in_flight)
        while True:
            await slots.acquire()
            try:
                batch = await self._next_batch()
            except BaseException:
                slots.release()
                raise
            now = self._loop.time()
            live = [it for it in batch if not it.fut.done() and it.deadline > now]
            self.stats["expired_in_queue"] += len(batch) - len(live)
            if not live:
                slots.release()
                continue
            task = asyncio.create_task(self._run_batch(live))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)
            task.add_done_callback(lambda _: slots.release())

    def _timed_run(self, streams: list) -> tuple[list, float, float]:
        """The engine on one batch, in the worker thread; its compute time is measured
        there (the wait behind another batch is queueing, not compute)."""
        t0 = time.perf_counter()
        out = self.engine.run(streams)
        return out, t0, time.perf_counter()

    async def _run_batch(self, live: list[_Item]) -> None:
        self.batch_sizes[len(live)] += 1
        try:
            outcomes, t0, t1 = await self._loop.run_in_executor(
                self._pool, self._timed_run, [it.stream for it in live])
        except Exception as e:  # a bug must not take the server down: answer INTERNAL
            self.stats["internal_errors"] += 1
            for it in live:
                _settle(it.fut, grpc.StatusCode.INTERNAL, f"{type(e).__name__}")
            return
        for it, oc in zip(live, outcomes):
            try:
                self._settle_one(it, oc, t0, t1, len(live))
            except Exception as e:  # one sample's answer must not stop the others
                self.stats["internal_errors"] += 1
                _settle(it.fut, grpc.StatusCode.INTERNAL, f"{type(e).__name__}")

    def _settle_one(self, it: _Item, oc, t0: float, t1: float, batch: int) -> None:
        if oc.kind == "error":
            self.stats["rejected"] += 1
            _settle(it.fut, grpc.StatusCode.INVALID_ARGUMENT, oc.message)
            return
        base = self._answer_base(it, oc, t0, t1, batch)
        spec = self.engine.spec
        if oc.kind in ("answer", "concealed"):
            base["flops"] = {spec.name: self.engine.flops_answer}
            fallback = None
            if oc.kind == "concealed":
                self.stats["concealed_input"] += 1
                fallback = CONCEALED_INPUT
            base.update(exit_tier=spec.name, exit_point=spec.point, confidence=oc.confidence,
                        logits=oc.logits, fallback=fallback)  # fmt: skip
            _settle(it.fut, grpc.StatusCode.OK,
                    encode_answer(base, it.req.answer == "binary"))  # fmt: skip
        else:
            task = asyncio.create_task(self._forward(it, oc, base))
            self._forwards.add(task)
            task.add_done_callback(self._forwards.discard)

    def _answer_base(self, it: _Item, oc, t0: float, t1: float, batch: int) -> dict:
        name = self.engine.spec.name
        req = it.req
        if req.link is not None:
            r = req.link
            hop = {"bits": r.bits, "channel_uses": r.channel_uses, "packets": r.packets,
                   "packets_lost": r.packets_lost, "header_lost": r.header_lost,
                   "tx_time_s": r.tx_time_s, "concealed": oc.concealed}  # fmt: skip
        else:
            units = [u for u in req.units if u is not None]
            hop = {"bits": 8 * sum(map(len, units)), "channel_uses": 0,
                   "packets": len(req.units), "packets_lost": len(req.units) - len(units),
                   "header_lost": req.framing == "sample" and req.units[0] is None,
                   "tx_time_s": 0.0, "concealed": oc.concealed}  # fmt: skip
        return {"rid": it.req.rid, "compute_s": {name: t1 - t0},
                "queue_s": {name: max(0.0, t0 - it.arrived)}, "batch": {name: batch},
                "hops": [hop]}  # fmt: skip

    async def _forward(self, it: _Item, oc, base: dict) -> None:
        try:
            await self._forward_one(it, oc, base)
        except Exception as e:  # never leave a caller waiting for its deadline on a bug
            self.stats["internal_errors"] += 1
            _settle(it.fut, grpc.StatusCode.INTERNAL, f"{type(e).__name__}")

    async def _forward_one(self, it: _Item, oc, base: dict) -> None:
        name, spec = self.engine.spec.name, self.engine.spec
        ns = oc.next_stream
        units = ns.units(self.config.next_framing)
        req = Request(it.req.rid, ns.seq, ns.header_bytes(), units, self.config.next_framing,
                      answer="binary")
        left = it.deadline - self._loop.time() - self.config.forward_margin_s
        base["flops"] = {name: self.engine.flops_forward}
        fallback = None
        self.stats["forwarded"] += 1
        if left <= 0:
            fallback = "deadline"
        else:
            t0 = time.perf_counter()
            try:
                raw = await self._next.infer(encode_request(req), left)
                down = parse_answer(raw)
                rtt = time.perf_counter() - t0
            except RemoteError as e:
                fallback = e.reason
            except WireError:
                fallback = "bad answer"
        if fallback is None and down["fallback"] == CONCEALED_INPUT:
            # The next tier could not trust what reached it: this tier's exit answers, and
            # the trace keeps the next tier's hop (and the work it did) to say why.
            fallback = "concealed"
            for key in ("compute_s", "queue_s", "batch", "flops"):
                base[key] = {**down[key], **base.get(key, {})}
            base["hops"] = base["hops"] + down["hops"]
        if fallback is not None:
            self.stats["fallbacks"] += 1
            base["flops"][name] = self.engine.flops_fallback  # its exit is the answer now
            base.update(exit_tier=name, exit_point=spec.point, confidence=oc.confidence,
                        logits=oc.logits, fallback=fallback)  # fmt: skip
            _settle(it.fut, grpc.StatusCode.OK, encode_answer(base, it.req.answer == "binary"))
            return
        remote_s = sum(down["compute_s"].values()) + sum(down["queue_s"].values())
        down_hops = down["hops"]
        if down_hops:  # the forwarding hop as measured here: round trip less remote work
            down_hops[0]["tx_time_s"] = max(0.0, rtt - remote_s) + down_hops[0]["tx_time_s"]
        ans = {**down, "rid": it.req.rid,
               "compute_s": {**base["compute_s"], **down["compute_s"]},
               "queue_s": {**base["queue_s"], **down["queue_s"]},
               "batch": {**base["batch"], **down["batch"]},
               "flops": {**base["flops"], **down["flops"]},
               "hops": base["hops"] + down_hops}  # fmt: skip
        _settle(it.fut, grpc.StatusCode.OK, encode_answer(ans, it.req.answer == "binary"))


#: The code a request's future is settled with when its deadline passes before its answer.
_EXPIRED = object()


def _settle(fut: asyncio.Future, code, payload) -> None:
    if not fut.done():
        fut.set_result((code, payload))


def _expire(futs: list[asyncio.Future]) -> None:
    for fut in futs:
        _settle(fut, _EXPIRED, "")
