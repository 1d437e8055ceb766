"""Real tiers: tier servers, the device side, and an emulated wireless hop.

- :class:`TierServer` (``flowcodec serve``): one tier (edge or cloud) as an asyncio gRPC
  server with dynamic batching, bounded queues, deadlines and graceful drain;
- :class:`RemoteHop`: put it in a :class:`~flowcodec.pipeline.Flow` in place of a
  :class:`~flowcodec.pipeline.Hop` to run the same configuration against real servers,
  with the same per-sample traces and a fallback to the device's exit;
- :class:`LinkProxy` (``flowcodec proxy``): a ``channels`` link applied to the real
  packets between device and edge;
- :func:`connect` / :func:`connect_async`: a client for an address, gRPC (``host:port``)
  or the server's framed TCP port (``tcp://host:port``, :mod:`flowcodec.serve.tcp`: the
  same calls without gRPC's per-call cost).

Needs ``grpcio`` (``pip install 'flowcodec[serve]'``). See ``docs/deployment.md``.
"""

import importlib

_WHERE = {
    "AsyncTierClient": "client", "RemoteError": "client", "TierClient": "client",
    "Outcome": "engine", "TierEngine": "engine", "TierSpec": "engine",
    "LinkProxy": "proxy", "RemoteHop": "remote",
    "ServeConfig": "server", "ServerThread": "server", "TierServer": "server",
    "LinkReport": "wire", "Request": "wire", "SampleError": "wire", "WireError": "wire",
    "AsyncFrameClient": "tcp", "FrameClient": "tcp", "connect": "tcp", "connect_async": "tcp",
}  # fmt: skip


def __getattr__(name: str):
    # Lazy: `flowcodec --help` and `import flowcodec.serve.cli` work without grpcio.
    if name in _WHERE:
        return getattr(importlib.import_module(f"flowcodec.serve.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'flowcodec.serve' has no attribute {name!r}")


__all__ = [
    "AsyncFrameClient",
    "AsyncTierClient",
    "FrameClient",
    "LinkProxy",
    "LinkReport",
    "Outcome",
    "RemoteError",
    "RemoteHop",
    "Request",
    "SampleError",
    "ServeConfig",
    "ServerThread",
    "TierClient",
    "TierEngine",
    "TierServer",
    "TierSpec",
    "WireError",
    "connect",
    "connect_async",
]
