"""How a tier server listens, batches and bounds its resources (:class:`ServeConfig`), the
gRPC options and port that follow from it, and :func:`freeze_heap` for serving processes."""

from __future__ import annotations

import gc
from dataclasses import dataclass

import grpc

from flowcodec.errors import ConfigError
from flowcodec.serve.wire import MAX_BATCH_ANSWER_BYTES, MAX_BATCH_SAMPLES

__all__ = ["ServeConfig", "server_options", "bind", "freeze_heap"]


def freeze_heap() -> int:
    """For a serving process, once it has loaded its model: collect, then move every
    object allocated so far out of the garbage collector's reach (:func:`gc.freeze`);
    returns how many. Python's full collections, which run now and then under load,
    would otherwise walk the hundreds of thousands of objects that torch and the model
    hold, one stall of tens to hundreds of milliseconds each: a latency tail. Only the
    process's owner should call this (the ``flowcodec serve``/``proxy``/``device``
    commands and the benchmarks do); a library call never does."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


@dataclass
class ServeConfig:
    """How a tier server listens, batches and bounds its resources.

    ``host`` is 127.0.0.1 unless set (``0.0.0.0`` exposes the server to the network);
    ``port`` 0 picks a free port. ``tls_cert``/``tls_key`` (PEM bytes) switch on TLS.
    ``next_address`` is the next tier's server (or a proxy in front of it); ``next_root_cert``
    its CA for TLS, ``next_server_name`` the name its certificate is checked against.
    ``max_samples_per_request`` caps an ``InferBatch`` call's samples (a call over it is
    refused whole); a call with more valid samples than ``queue_size`` can never be
    queued and is always refused ``RESOURCE_EXHAUSTED``. ``tcp_port`` (``None``: off; 0:
    a free port) opens the framed TCP transport beside gRPC, on the same host, with the
    same TLS and limits (:mod:`flowcodec.serve.tcp`); ``next_address`` may name either.
    """

    host: str = "127.0.0.1"
    port: int = 0
    tcp_port: int | None = None
    max_batch: int = 16
    max_wait_s: float = 0.002
    batches_in_flight: int = 2
    queue_size: int = 256
    default_deadline_s: float = 5.0
    forward_margin_s: float = 0.005
    max_message_bytes: int = 1 << 20
    max_concurrent_rpcs: int = 1024
    max_samples_per_request: int = 64
    max_connection_age_s: float = 300.0
    connection_grace_s: float = 10.0
    tls_cert: bytes | None = None
    tls_key: bytes | None = None
    next_address: str | None = None
    next_framing: str = "sample"
    next_root_cert: bytes | None = None
    next_server_name: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch <= 4096:
            raise ConfigError("max_batch must be in 1..4096")
        if not 0 <= self.max_wait_s <= 10:
            raise ConfigError("max_wait_s must be in [0, 10] seconds")
        if not 1 <= self.batches_in_flight <= 16:
            raise ConfigError("batches_in_flight must be in 1..16")
        if not 1 <= self.queue_size <= 1 << 20:
            raise ConfigError("queue_size must be in 1..2^20")
        if not self.default_deadline_s > 0 or self.forward_margin_s < 0:
            raise ConfigError("default_deadline_s must be positive, forward_margin_s >= 0")
        if not 64 <= self.max_message_bytes <= 1 << 30:
            raise ConfigError("max_message_bytes must be in 64..2^30")
        if not 1 <= self.max_samples_per_request <= MAX_BATCH_SAMPLES:
            raise ConfigError(f"max_samples_per_request must be in 1..{MAX_BATCH_SAMPLES}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("TLS needs both tls_cert and tls_key")
        if self.next_framing not in ("sample", "session"):
            raise ConfigError("next_framing must be 'sample' or 'session'")
        if self.tcp_port is not None and not 0 <= self.tcp_port <= 65535:
            raise ConfigError("tcp_port must be in 0..65535 (or None: no TCP port)")


def server_options(cfg: ServeConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", cfg.max_message_bytes),
        ("grpc.max_send_message_length", MAX_BATCH_ANSWER_BYTES),
        ("grpc.max_connection_age_ms", int(1000 * cfg.max_connection_age_s)),
        ("grpc.max_connection_age_grace_ms", int(1000 * cfg.connection_grace_s)),
        ("grpc.max_concurrent_streams", 256),
        ("grpc.so_reuseport", 0),
    ]


def bind(server: grpc.aio.Server, cfg: ServeConfig) -> int:
    """Add ``cfg``'s listening port to ``server`` (TLS when ``cfg.tls_cert`` is set); the
    port bound, or :class:`ConfigError` when nothing could listen there."""
    addr = f"{cfg.host}:{cfg.port}"
    if cfg.tls_cert is not None:
        creds = grpc.ssl_server_credentials([(cfg.tls_key, cfg.tls_cert)])
        port = server.add_secure_port(addr, creds)
    else:
        port = server.add_insecure_port(addr)
    if not port:
        raise ConfigError(f"cannot listen on {addr}")
    return port
