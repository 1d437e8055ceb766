"""Framed calls over plain TCP: the tier server's second port, for one sample per call.

Python gRPC costs each unary call several hundred microseconds of CPU on each side
(measured in docs/deployment.md: more than a small model's whole work per sample). This
transport carries the same calls (``Infer``, ``InferBatch``, ``Stats``, with the same
request envelopes and answers as :mod:`flowcodec.serve.wire`) as length-prefixed frames
on one TCP connection per client, many calls in flight on it at once, answered in any
order. ``flowcodec serve --tcp-port PORT`` (``ServeConfig.tcp_port``) opens it beside the
gRPC port; a client reaches it with an address ``tcp://host:port`` (:func:`connect`,
:func:`connect_async`; a plain ``host:port`` is gRPC). Layout (little-endian)::

    client, once:  preface "FCT1"
    call:          length u32 | call id u32 | method u8 | timeout ms u32 | body
    answer:        length u32 | call id u32 | status u8 | body

``length`` counts the bytes after itself. ``method`` 0 is ``Infer`` (body: one envelope),
1 ``InferBatch`` (body: a batch, :func:`~flowcodec.serve.wire.encode_batch`), 2 ``Stats``
(empty body). ``timeout ms`` 0 means none (the server's ``default_deadline_s`` applies,
as it caps every other). ``status`` 0 is OK (body: the answer); any other is a refusal
whose body is a UTF-8 detail, with the same meaning as the gRPC status of the same call
(:data:`STATUS`): a client raises the same :class:`~flowcodec.serve.client.RemoteError`
reasons whichever transport it used.

Hostile input, as for the gRPC port: a frame's length is checked against
``max_message_bytes`` from its prefix, before the body is read (over it, or under the
fixed part, the connection is closed: the stream cannot be trusted after it); an unknown
method is refused ``UNIMPLEMENTED`` and the stream goes on. Memory is bounded by the
connection count (``max_concurrent_rpcs``), the calls in flight per connection
(:data:`MAX_IN_FLIGHT`; past it the server stops reading that connection, and TCP's own
flow control holds the client back), one frame of buffer per connection, and the answers
a client does not read (the connection stops being read while its writes are paused).
Slow senders: a connection whose preface or partial frame has not completed within
``connection_grace_s`` is closed, and so is one idle (nothing in flight, nothing received)
for ``max_connection_age_s``. TLS: the same ``tls_cert``/``tls_key`` as the gRPC port.

What it does not have that gRPC has: HTTP/2 (no proxies or load balancers that speak it),
keep-alive pings (an idle connection is closed after ``max_connection_age_s`` and the
client reconnects on its next call), and compression. :class:`~flowcodec.serve.proxy.LinkProxy`
listens on gRPC only; its upstream may be either.

Example
-------
>>> # with ServerThread(TierServer(engine, ServeConfig(tcp_port=0))) as st:
>>> #     with connect(st.tcp_address) as client: client.infer(envelope, 1.0)
"""

from __future__ import annotations

import asyncio
import os
import ssl
import struct
import tempfile
import threading
from collections.abc import Callable, Sequence

import grpc

from flowcodec.errors import ConfigError
from flowcodec.serve.client import (
    AsyncTierClient,
    RemoteError,
    TierClient,
    _batch_entries,
    reason_of,
)
from flowcodec.serve.wire import MAX_BATCH_ANSWER_BYTES, encode_batch

__all__ = ["SCHEME", "PREFACE", "INFER", "INFER_BATCH", "STATS", "STATUS", "MAX_IN_FLIGHT",
           "FrameServer", "Call", "AsyncFrameClient", "FrameClient", "connect",
           "connect_async", "split_address"]  # fmt: skip

#: An address ``tcp://host:port`` names this transport; ``host:port`` alone is gRPC.
SCHEME = "tcp://"
PREFACE = b"FCT1"
INFER, INFER_BATCH, STATS = 0, 1, 2
#: The status byte of an answer frame, by the gRPC status it stands for.
STATUS = {grpc.StatusCode.OK: 0, grpc.StatusCode.INVALID_ARGUMENT: 1,
          grpc.StatusCode.RESOURCE_EXHAUSTED: 2, grpc.StatusCode.DEADLINE_EXCEEDED: 3,
          grpc.StatusCode.UNAVAILABLE: 4, grpc.StatusCode.INTERNAL: 5,
          grpc.StatusCode.UNIMPLEMENTED: 6}  # fmt: skip
_CODES = {v: k for k, v in STATUS.items()}
#: Calls in flight on one connection before the server stops reading it.
MAX_IN_FLIGHT = 256
_CALL = struct.Struct("<IIBI")  # length, call id, method, timeout ms
_ANSWER = struct.Struct("<IIB")  # length, call id, status
_LEN = struct.Struct("<I")
_CALL_FIXED = _CALL.size - _LEN.size  # call id + method + timeout
_ANSWER_FIXED = _ANSWER.size - _LEN.size
_SWEEP_S = 1.0


def split_address(address: str) -> tuple[str, int]:
    """``"tcp://host:port"`` (or ``"host:port"``) -> ``(host, port)``; ``[v6]:port`` too.
    :class:`ConfigError` when it is not an address."""
    rest = address[len(SCHEME) :] if address.startswith(SCHEME) else address
    host, sep, port = rest.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"address {address!r}: expected {SCHEME}HOST:PORT")
    return host.strip("[]"), int(port)


def connect(address: str, root_cert: bytes | None = None, server_name: str | None = None):
    """A blocking client for ``address``: :class:`FrameClient` for ``tcp://host:port``,
    else a gRPC :class:`~flowcodec.serve.client.TierClient` (both have ``infer``,
    ``infer_future``/``result``, ``infer_batch``, ``stats`` and ``close``)."""
    if address.startswith(SCHEME):
        return FrameClient(address, root_cert, server_name)
    return TierClient(address, root_cert, server_name)


def connect_async(address: str, root_cert: bytes | None = None,
                  server_name: str | None = None):  # fmt: skip
    """:func:`connect` for asyncio code: :class:`AsyncFrameClient` or
    :class:`~flowcodec.serve.client.AsyncTierClient`."""
    if address.startswith(SCHEME):
        return AsyncFrameClient(address, root_cert, server_name)
    return AsyncTierClient(address, root_cert, server_name)


def _server_ssl(cert: bytes, key: bytes) -> ssl.SSLContext:
    """A server TLS context from PEM bytes (``ssl`` loads a chain from files only: they
    are written to a private temporary folder and removed at once)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with tempfile.TemporaryDirectory(prefix="flowcodec-tls-") as d:
        paths = [os.path.join(d, n) for n in ("cert.pem", "key.pem")]
        for path, data in zip(paths, (cert, key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        try:
            ctx.load_cert_chain(*paths)
        except (ssl.SSLError, ValueError) as e:
            raise ConfigError(f"TLS certificate or key refused: {e}") from e
    return ctx


# --- server --------------------------------------------------------------------------------
class Call:
    """One ``Infer`` call that arrived on a connection: ``body`` (the envelope), its
    ``deadline`` in loop time, and :meth:`reply`, which answers it once (a second reply,
    or one after the connection closed, does nothing)."""

    __slots__ = ("conn", "cid", "body", "deadline")

    def __init__(self, conn: _ServerConnection, cid: int, body: bytes, deadline: float):
        self.conn, self.cid, self.body, self.deadline = conn, cid, body, deadline

    def reply(self, code: grpc.StatusCode, payload: bytes | str) -> None:
        self.conn.reply(self.cid, code, payload)


class FrameServer:
    """Listen for framed calls and hand them to a tier server.

    ``on_infer(calls)`` receives the ``Infer`` calls that one read of a connection
    delivered, in order (:class:`Call`; each is answered through ``call.reply``).
    ``on_call(method, body, deadline)`` is awaited for ``InferBatch`` and ``Stats`` and
    returns ``(code, payload)``. ``deadline_of(timeout_s)`` turns a call's timeout (``None``:
    none given) into its deadline in loop time. Limits are those of ``config``
    (:class:`~flowcodec.serve.server.ServeConfig`), see the module docstring.
    """

    def __init__(self, on_infer: Callable[[list[Call]], None], on_call: Callable,
                 deadline_of: Callable[[float | None], float], config) -> None:  # fmt: skip
        self.on_infer, self.on_call, self.deadline_of = on_infer, on_call, deadline_of
        self.config = config
        self.max_frame = _CALL_FIXED + config.max_message_bytes
        self.conns: set[_ServerConnection] = set()
        self.in_flight = 0
        self.tasks: set[asyncio.Task] = set()
        self.stats: dict[str, int] = {"connections": 0, "refused_connections": 0,
                                      "closed_bad_frame": 0, "closed_slow": 0,
                                      "closed_idle": 0}  # fmt: skip
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task | None = None
        self.port: int | None = None

    async def start(self) -> int:
        cfg = self.config
        self.loop = asyncio.get_running_loop()
        tls = _server_ssl(cfg.tls_cert, cfg.tls_key) if cfg.tls_cert is not None else None
        try:
            self._server = await self.loop.create_server(
                lambda: _ServerConnection(self), cfg.host, cfg.tcp_port, ssl=tls,
                reuse_address=True, backlog=1024)  # fmt: skip
        except OSError as e:
            raise ConfigError(f"cannot listen on {cfg.host}:{cfg.tcp_port}: {e}") from e
        self.port = self._server.sockets[0].getsockname()[1]
        self._sweeper = asyncio.create_task(self._sweep())
        return self.port

    async def stop(self, grace_s: float) -> None:
        """Stop accepting; wait up to ``grace_s`` for the calls in flight, then close."""
        if self._server is not None:
            self._server.close()
        end = self.loop.time() + grace_s
        while self.in_flight and self.loop.time() < end:
            await asyncio.sleep(0.01)
        if self._sweeper is not None:
            self._sweeper.cancel()
        for c in list(self.conns):
            c.close()

    async def _sweep(self) -> None:
        """Close slow senders and idle connections (once a second)."""
        cfg = self.config
        while True:
            await asyncio.sleep(_SWEEP_S)
            now = self.loop.time()
            for c in list(self.conns):
                if c.partial_since is not None and now - c.partial_since > cfg.connection_grace_s:
                    self.stats["closed_slow"] += 1
                    c.close()
                elif not c.calls and now - c.last_seen > cfg.max_connection_age_s:
                    self.stats["closed_idle"] += 1
                    c.close()


class _ServerConnection(asyncio.Protocol):
    def __init__(self, server: FrameServer) -> None:
        self.server = server
        self.buf = bytearray()
        self.preface = False
        self.calls = 0  # in flight
        self.transport: asyncio.Transport | None = None
        self.out: list[bytes] = []
        self.flushing = False
        self.read_paused = False
        self.write_paused = False
        self.partial_since: float | None = None
        self.last_seen = 0.0

    # asyncio callbacks
    def connection_made(self, transport) -> None:
        srv = self.server
        self.transport = transport
        now = srv.loop.time()
        self.partial_since = self.last_seen = now  # the preface is due like a frame
        if len(srv.conns) >= srv.config.max_concurrent_rpcs:
            srv.stats["refused_connections"] += 1
            transport.abort()
            return
        srv.conns.add(self)
        srv.stats["connections"] += 1

    def connection_lost(self, exc) -> None:
        self.server.conns.discard(self)
        self.transport = None
        self.out.clear()

    def pause_writing(self) -> None:
        self.write_paused = True
        self._pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._maybe_resume()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.last_seen = self.server.loop.time()
        self._consume()

    # frames
    def _consume(self) -> None:
        buf, srv = self.buf, self.server
        pos = 0
        if not self.preface:
            if len(buf) < len(PREFACE):
                return
            if buf[: len(PREFACE)] != PREFACE:
                self._bad_frame()
                return
            self.preface = True
            pos = len(PREFACE)
        consumed = pos > 0
        infers: list[Call] = []
        end = len(buf)
        while end - pos >= _LEN.size and self.calls + len(infers) < MAX_IN_FLIGHT:
            (length,) = _LEN.unpack_from(buf, pos)
            if length < _CALL_FIXED or length > srv.max_frame:
                self._bad_frame()
                return
            if end - pos - _LEN.size < length:
                break
            _, cid, method, timeout_ms = _CALL.unpack_from(buf, pos)
            body = bytes(buf[pos + _CALL.size : pos + _LEN.size + length])
            pos += _LEN.size + length
            deadline = srv.deadline_of(timeout_ms / 1e3 if timeout_ms else None)
            if method == INFER:
                infers.append(Call(self, cid, body, deadline))
            else:
                self.calls += 1
                srv.in_flight += 1
                task = asyncio.ensure_future(self._other(cid, method, body, deadline))
                srv.tasks.add(task)
                task.add_done_callback(srv.tasks.discard)
            consumed = True
        del buf[:pos]
        # A slow sender is timed from the first byte of the frame it has not finished (a
        # connection paused with whole frames in its buffer is not sending slowly).
        if not buf or self.calls + len(infers) >= MAX_IN_FLIGHT:
            self.partial_since = None
        elif consumed or self.partial_since is None:
            self.partial_since = srv.loop.time()
        if infers:
            self.calls += len(infers)
            srv.in_flight += len(infers)
            srv.on_infer(infers)
        if self.calls >= MAX_IN_FLIGHT:
            self._pause()

    async def _other(self, cid: int, method: int, body: bytes, deadline: float) -> None:
        if method not in (INFER_BATCH, STATS):
            self.reply(cid, grpc.StatusCode.UNIMPLEMENTED, f"unknown method {method}")
            return
        try:
            code, payload = await self.server.on_call(method, body, deadline)
        except Exception as e:  # a bug must not leave the caller waiting: answer INTERNAL
            code, payload = grpc.StatusCode.INTERNAL, type(e).__name__
        self.reply(cid, code, payload)

    def reply(self, cid: int, code: grpc.StatusCode, payload: bytes | str) -> None:
        """Answer call ``cid`` (written with the others answered in the same loop turn)."""
        self.calls -= 1
        self.server.in_flight -= 1
        if self.transport is None:
            return
        body = payload if isinstance(payload, bytes) else str(payload).encode()[:1000]
        self.out.append(_ANSWER.pack(_ANSWER_FIXED + len(body), cid,
                                     STATUS.get(code, 5)) + body)  # fmt: skip
        if not self.flushing:
            self.flushing = True
            self.server.loop.call_soon(self._flush)
        if self.read_paused:
            self._maybe_resume()

    def _flush(self) -> None:
        self.flushing = False
        if self.transport is not None and self.out:
            self.transport.write(b"".join(self.out))
        self.out.clear()

    def _pause(self) -> None:
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    def _maybe_resume(self) -> None:
        if (self.read_paused and not self.write_paused and self.calls < MAX_IN_FLIGHT // 2
                and self.transport is not None):  # fmt: skip
            self.read_paused = False
            self.transport.resume_reading()
            if self.buf:  # frames read before the pause
                self._consume()

    def _bad_frame(self) -> None:
        self.server.stats["closed_bad_frame"] += 1
        self.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()
            self.transport = None
        self.buf.clear()
        self.server.conns.discard(self)


# --- clients ------------------------------------------------------------------------------
class _ClientConnection(asyncio.Protocol):
    def __init__(self, owner: AsyncFrameClient) -> None:
        self.owner = owner
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.out: list[bytes] = []
        self.flushing = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(PREFACE)

    def connection_lost(self, exc) -> None:
        self.transport = None
        self.owner._lost(self, "connection lost" if exc is None else str(exc))

    def send(self, frame: bytes) -> None:
        self.out.append(frame)
        if not self.flushing:
            self.flushing = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self.flushing = False
        if self.transport is not None and self.out:
            self.transport.write(b"".join(self.out))
        self.out.clear()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        pos, end = 0, len(buf)
        while end - pos >= _LEN.size:
            (length,) = _LEN.unpack_from(buf, pos)
            if length < _ANSWER_FIXED or length > self.owner.max_answer:
                self.transport.abort()  # the stream cannot be trusted after a bad frame
                self.owner._lost(self, f"bad answer frame of {length} bytes")
                return
            if end - pos - _LEN.size < length:
                break
            _, cid, status = _ANSWER.unpack_from(buf, pos)
            body = bytes(buf[pos + _ANSWER.size : pos + _LEN.size + length])
            pos += _LEN.size + length
            self.owner._answered(cid, status, body)
        del buf[:pos]


class AsyncFrameClient:
    """asyncio client of a tier server's TCP port, with the calls of
    :class:`~flowcodec.serve.client.AsyncTierClient` (``infer``, ``infer_batch``,
    ``stats``, ``close``). One connection, opened on the first call and again on the
    next call after it was lost; every call in flight shares it. A call fails with
    :class:`~flowcodec.serve.client.RemoteError`: ``unreachable`` (no connection, or it
    was lost with the call in flight), ``deadline`` (no answer within ``timeout_s``), or
    the server's refusal."""

    def __init__(self, address: str, root_cert: bytes | None = None,
                 server_name: str | None = None,
                 max_message_bytes: int = 4 << 20) -> None:  # fmt: skip
        self.address = address
        self.host, self.port = split_address(address)
        self._tls = None
        if root_cert is not None:
            self._tls = ssl.create_default_context(cadata=root_cert.decode())
        self._server_name = server_name
        self.max_send = max_message_bytes
        self.max_answer = _ANSWER_FIXED + MAX_BATCH_ANSWER_BYTES
        self._conn: _ClientConnection | None = None
        self._connecting: asyncio.Future | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._next_id = 0

    async def _connection(self, timeout_s: float) -> _ClientConnection:
        if self._conn is not None and self._conn.transport is not None:
            return self._conn
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        try:
            return await asyncio.wait_for(asyncio.shield(self._connecting), timeout_s)
        except TimeoutError:
            raise RemoteError("deadline", "no connection within the deadline") from None

    async def _open(self) -> _ClientConnection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(
                lambda: _ClientConnection(self), self.host, self.port, ssl=self._tls,
                server_hostname=(self._server_name or self.host) if self._tls else None)
        except (OSError, ssl.SSLError) as e:
            raise RemoteError("unreachable", str(e)[:200]) from None
        finally:
            self._connecting = None
        self._conn = conn
        return conn

    def _lost(self, conn: _ClientConnection, why: str) -> None:
        if self._conn is conn:
            self._conn = None
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(RemoteError("unreachable", why))

    def _answered(self, cid: int, status: int, body: bytes) -> None:
        fut = self._pending.pop(cid, None)
        if fut is not None and not fut.done():  # an answer after its deadline is dropped
            fut.set_result((status, body))

    def _expire(self, cid: int) -> None:
        fut = self._pending.pop(cid, None)
        if fut is not None and not fut.done():
            fut.set_exception(RemoteError("deadline", "no answer within the deadline"))

    async def _call(self, method: int, body: bytes, timeout_s: float) -> bytes:
        if len(body) > self.max_send:
            raise RemoteError("overloaded", f"message of {len(body)} bytes, over "
                              f"{self.max_send}")  # fmt: skip
        timeout_s = max(1e-3, timeout_s)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        conn = await self._connection(timeout_s)
        if conn.transport is None:  # lost since it was opened: its calls have failed
            raise RemoteError("unreachable", "connection lost")
        self._next_id = cid = (self._next_id + 1) & 0xFFFFFFFF
        fut = loop.create_future()
        self._pending[cid] = fut
        left = deadline - loop.time()
        ms = min(0xFFFFFFFF, max(1, int(left * 1e3)))
        conn.send(_CALL.pack(_CALL_FIXED + len(body), cid, method, ms) + body)
        timer = loop.call_at(deadline, self._expire, cid)
        try:
            status, payload = await fut
        finally:
            timer.cancel()
            self._pending.pop(cid, None)
        if status != 0:
            detail = payload.decode(errors="replace")[:200]
            raise RemoteError(reason_of(_CODES.get(status), detail), detail)
        return payload

    async def infer(self, request: bytes, timeout_s: float) -> bytes:
        return await self._call(INFER, bytes(request), timeout_s)

    async def infer_batch(self, requests: Sequence[bytes],
                          timeout_s: float) -> list:  # fmt: skip
        """:meth:`~flowcodec.serve.client.TierClient.infer_batch` over this transport."""
        raw = await self._call(INFER_BATCH, encode_batch(requests), timeout_s)
        return _batch_entries(raw, len(requests))

    async def stats(self, timeout_s: float = 5.0) -> bytes:
        return await self._call(STATS, b"", timeout_s)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if conn.transport is not None:
            conn.transport.close()
        self._lost(conn, "client closed")


class FrameClient:
    """Blocking client of a tier server's TCP port, with the calls of
    :class:`~flowcodec.serve.client.TierClient` (``infer``, ``infer_future``/``result``,
    ``infer_batch``, ``stats``, ``close``); an :class:`AsyncFrameClient` on an event loop
    in a thread of its own."""

    def __init__(self, address: str, root_cert: bytes | None = None,
                 server_name: str | None = None) -> None:  # fmt: skip
        self.address = address
        self._client = AsyncFrameClient(address, root_cert, server_name)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="flowcodec-tcp-client")  # fmt: skip
        self._thread.start()

    def _submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def infer_future(self, request: bytes, timeout_s: float):
        """Start a call; ``result(future)`` waits for it."""
        return self._submit(self._client.infer(request, timeout_s))

    @staticmethod
    def result(future) -> bytes:
        return future.result()

    def infer(self, request: bytes, timeout_s: float) -> bytes:
        return self.result(self.infer_future(request, timeout_s))

    def infer_batch(self, requests: Sequence[bytes], timeout_s: float) -> list:
        return self._submit(self._client.infer_batch(requests, timeout_s)).result()

    def stats(self, timeout_s: float = 5.0) -> bytes:
        return self._submit(self._client.stats(timeout_s)).result()

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._submit(self._client.close()).result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> FrameClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
