"""Clients of a tier server (or of a link proxy, which speaks the same protocol).

The transport is gRPC (``grpcio``) with unary methods whose requests and answers are
plain bytes (:mod:`flowcodec.serve.wire`): no protobuf schema, no generated code.
``/flowcodec.Tier/Infer`` carries one sample; ``/flowcodec.Tier/InferBatch`` carries
several (a device or gateway with several frames or cameras sends them in one call, and
pays the per-call cost of gRPC once). :class:`TierClient` is blocking (with futures, for
many single-sample calls in flight at once); :class:`AsyncTierClient` is for asyncio code
(servers that forward, the proxy, the load generator).

A failed call raises :class:`RemoteError` whose ``reason`` is one of ``"unreachable"``,
``"deadline"``, ``"overloaded"``, ``"rejected"``, ``"draining"`` or ``"error"``. A batch
call that fails as a whole raises the same; otherwise ``infer_batch`` returns one entry
per sample, in order: the parsed answer (a dict, see :func:`~flowcodec.serve.wire.parse_answer`)
or a :class:`RemoteError` for that sample alone (``"rejected"``, ``"deadline"``,
``"error"``, or ``"bad answer"`` when its answer does not parse), as
``asyncio.gather(..., return_exceptions=True)`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from flowcodec.serve.wire import (
    MAX_BATCH_ANSWER_BYTES,
    SampleError,
    WireError,
    encode_batch,
    parse_answer,
    parse_batch_answer,
)

__all__ = ["RemoteError", "TierClient", "AsyncTierClient", "channel_options", "reason_of",
           "INFER", "INFER_BATCH", "STATS"]  # fmt: skip

INFER = "/flowcodec.Tier/Infer"
INFER_BATCH = "/flowcodec.Tier/InferBatch"
STATS = "/flowcodec.Tier/Stats"


class RemoteError(RuntimeError):
    """A call to a tier failed; ``reason`` says how (see the module docstring)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


_REASONS = {
    grpc.StatusCode.UNAVAILABLE: "unreachable",
    grpc.StatusCode.DEADLINE_EXCEEDED: "deadline",
    grpc.StatusCode.RESOURCE_EXHAUSTED: "overloaded",
    grpc.StatusCode.INVALID_ARGUMENT: "rejected",
    grpc.StatusCode.CANCELLED: "deadline",
}


def reason_of(code: grpc.StatusCode | None, detail: str = "") -> str:
    """The :class:`RemoteError` reason of a gRPC status (the server uses it for the
    per-sample errors of a batch call, so both kinds of call say the same)."""
    if code == grpc.StatusCode.UNAVAILABLE and "draining" in detail:
        return "draining"
    return _REASONS.get(code, "error")


def _remote_error(e: grpc.RpcError) -> RemoteError:
    code = e.code() if callable(getattr(e, "code", None)) else None
    detail = (e.details() if callable(getattr(e, "details", None)) else "") or ""
    return RemoteError(reason_of(code, detail), detail[:200])


def _batch_entries(raw: bytes, count: int) -> list[dict | RemoteError]:
    """A batch answer's entries: parsed answers, or a :class:`RemoteError` per sample.
    A malformed frame, or one with another count than was sent, is a :class:`WireError`
    (the whole answer is unusable); a single answer that does not parse is that sample's
    ``"bad answer"``."""
    out: list[dict | RemoteError] = []
    for entry in parse_batch_answer(raw, count):
        if isinstance(entry, SampleError):
            out.append(RemoteError(entry.reason, entry.detail))
            continue
        try:
            out.append(parse_answer(entry))
        except WireError as e:
            out.append(RemoteError("bad answer", str(e)[:200]))
    return out


def channel_options(max_message_bytes: int = 4 << 20) -> list[tuple[str, int]]:
    """gRPC channel options: bounded messages (answers up to a batch answer's cap; a
    single answer is checked against its own, smaller cap when parsed) and fast
    reconnection (a restarted server is used again within about 0.1-0.5 s instead of
    gRPC's default back-off of up to two minutes)."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", MAX_BATCH_ANSWER_BYTES),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 500),
        ("grpc.enable_retries", 0),
    ]


def _credentials(root_cert: bytes | None):
    return grpc.ssl_channel_credentials(root_certificates=root_cert) if root_cert else None


def _dial(api, address: str, root_cert: bytes | None, server_name: str | None):
    """A channel to ``address`` from ``api`` (``grpc`` or ``grpc.aio``): TLS with
    ``root_cert`` when given, its certificate checked against ``server_name`` when given."""
    opts = channel_options()
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    creds = _credentials(root_cert)
    return (api.secure_channel(address, creds, options=opts) if creds
            else api.insecure_channel(address, options=opts))  # fmt: skip


class TierClient:
    """Blocking client: ``infer(request_bytes, timeout_s) -> answer_bytes``.

    ``root_cert`` (PEM bytes) switches on TLS; ``server_name`` overrides the name the
    certificate is checked against (for a self-signed ``localhost`` certificate reached
    by address).
    """

    def __init__(self, address: str, root_cert: bytes | None = None,
                 server_name: str | None = None) -> None:  # fmt: skip
        self.address = address
        self._channel = _dial(grpc, address, root_cert, server_name)
        self._infer = self._channel.unary_unary(INFER)
        self._infer_batch = self._channel.unary_unary(INFER_BATCH)
        self._stats = self._channel.unary_unary(STATS)

    def infer_future(self, request: bytes, timeout_s: float):
        """Start a call; ``result(future)`` waits for it."""
        return self._infer.future(request, timeout=max(1e-3, timeout_s))

    @staticmethod
    def result(future) -> bytes:
        try:
            return future.result()
        except grpc.RpcError as e:
            raise _remote_error(e) from None

    def infer(self, request: bytes, timeout_s: float) -> bytes:
        return self.result(self.infer_future(request, timeout_s))

    def infer_batch(self, requests: Sequence[bytes],
                    timeout_s: float) -> list[dict | RemoteError]:  # fmt: skip
        """Send several request envelopes in one call (``timeout_s`` covers the whole
        call); one entry per request, in order: its parsed answer or its
        :class:`RemoteError` (see the module docstring). Raises :class:`RemoteError` when
        the call fails as a whole (unreachable, deadline, overloaded, a batch the server
        refuses) and :class:`~flowcodec.serve.wire.WireError` when the batch cannot be
        framed or its answer is malformed."""
        body = encode_batch(requests)
        try:
            raw = self._infer_batch(body, timeout=max(1e-3, timeout_s))
        except grpc.RpcError as e:
            raise _remote_error(e) from None
        return _batch_entries(raw, len(requests))

    def stats(self, timeout_s: float = 5.0) -> bytes:
        try:
            return self._stats(b"", timeout=timeout_s)
        except grpc.RpcError as e:
            raise _remote_error(e) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> TierClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncTierClient:
    """asyncio client with the same calls as :class:`TierClient` (awaitable)."""

    def __init__(self, address: str, root_cert: bytes | None = None,
                 server_name: str | None = None) -> None:  # fmt: skip
        self.address = address
        self._channel = _dial(grpc.aio, address, root_cert, server_name)
        self._infer = self._channel.unary_unary(INFER)
        self._infer_batch = self._channel.unary_unary(INFER_BATCH)
        self._stats = self._channel.unary_unary(STATS)

    async def infer(self, request: bytes, timeout_s: float) -> bytes:
        try:
            return await self._infer(request, timeout=max(1e-3, timeout_s))
        except grpc.RpcError as e:
            raise _remote_error(e) from None

    async def infer_batch(self, requests: Sequence[bytes],
                          timeout_s: float) -> list[dict | RemoteError]:  # fmt: skip
        """:meth:`TierClient.infer_batch`, awaitable."""
        body = encode_batch(requests)
        try:
            raw = await self._infer_batch(body, timeout=max(1e-3, timeout_s))
        except grpc.RpcError as e:
            raise _remote_error(e) from None
        return _batch_entries(raw, len(requests))

    async def stats(self, timeout_s: float = 5.0) -> bytes:
        try:
            return await self._stats(b"", timeout=timeout_s)
        except grpc.RpcError as e:
            raise _remote_error(e) from None

    async def close(self) -> None:
        await self._channel.close()
