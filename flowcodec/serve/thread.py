"""Running a tier server on an event loop in a background thread (tests, benchmarks)."""

from __future__ import annotations

import asyncio
import threading

from flowcodec.errors import ConfigError

__all__ = ["ServerThread"]


class ServerThread:
    """Run a :class:`TierServer` (or any object with async ``start() -> port`` and
    ``stop(grace_s)``) on an event loop in a background thread.

    >>> # with ServerThread(TierServer(engine)) as st: client = TierClient(st.address)
    """

    def __init__(self, server) -> None:
        self.server = server
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="flowcodec-server")  # fmt: skip
        self.port: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def tcp_address(self) -> str:
        """The server's TCP port as a client address (``tcp://127.0.0.1:PORT``)."""
        port = getattr(self.server, "tcp_port", None)
        if port is None:
            raise ConfigError("this server has no TCP port (ServeConfig.tcp_port)")
        return f"tcp://127.0.0.1:{port}"

    def start(self) -> ServerThread:
        """Start the loop and the server (once; a second call does nothing)."""
        if self.port is not None:
            return self
        self._thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(30)
        return self

    def call(self, coro, timeout: float | None = 30):
        """Run ``coro`` on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self, grace_s: float = 5.0) -> None:
        if self._loop.is_closed():
            return
        try:
            self.call(self.server.stop(grace_s), timeout=grace_s + 30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop(0.5)
