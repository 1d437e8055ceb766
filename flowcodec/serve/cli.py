"""``flowcodec serve``, ``flowcodec device`` and ``flowcodec proxy``.

Two terminals::

    flowcodec serve                       # edge: decodes point-1 features, runs member 3
    flowcodec device --samples 200        # device: member 1 up to point 1, sends the rest

Add a wireless hop between them with ``flowcodec proxy --upstream 127.0.0.1:50051`` and
``flowcodec device --connect 127.0.0.1:50050``. See ``docs/deployment.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from flowcodec.errors import ConfigError

__all__ = ["add_parsers", "build_codec_from_args", "parse_tiers"]


def build_codec_from_args(family, point: int, name: str, kwargs: str | None,
                          checkpoint: str | None):  # fmt: skip
    """The codec a command line names: a checkpoint (``save_codec``) or a registry name
    with JSON keyword arguments; checked against the features at ``point``."""
    from flowcodec.codecs import build_codec, load_codec

    if checkpoint:
        codec = load_codec(checkpoint)
    else:
        try:
            kw = json.loads(kwargs) if kwargs else {}
        except json.JSONDecodeError as e:
            raise ConfigError(f"codec kwargs are not JSON: {e}") from e
        if not isinstance(kw, dict):
            raise ConfigError("codec kwargs must be a JSON object")
        codec = build_codec(name, family.feature_shape(point), **kw)
    if tuple(codec.feature_shape) != family.feature_shape(point):
        raise ConfigError(f"codec takes {codec.feature_shape}, point {point} has "
                          f"{family.feature_shape(point)}")  # fmt: skip
    return codec.eval()


def parse_tiers(text: str) -> list[tuple[str, int, float | None]]:
    """``"edge:2:0.9,cloud:3"`` -> ``[("edge", 2, 0.9), ("cloud", 3, None)]``."""
    out = []
    for part in text.split(","):
        bits = part.strip().split(":")
        if len(bits) not in (2, 3) or not bits[0]:
            raise ConfigError(f"tier {part!r}: expected NAME:POINT or NAME:POINT:THRESHOLD")
        try:
            thr = float(bits[2]) if len(bits) == 3 else None
            out.append((bits[0], int(bits[1]), thr))
        except ValueError as e:
            raise ConfigError(f"tier {part!r}: {e}") from e
    return out


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def _serve_config(args):
    from flowcodec.serve.server import ServeConfig

    return ServeConfig(host=args.host, port=args.port, max_batch=args.max_batch,
                       max_wait_s=args.max_wait_ms / 1e3, queue_size=args.queue,
                       batches_in_flight=getattr(args, "batches_in_flight", 2),
                       max_samples_per_request=getattr(args, "max_samples_per_request", 64),
                       default_deadline_s=args.deadline_s, tls_cert=_read(args.tls_cert),
                       tls_key=_read(args.tls_key), next_address=getattr(args, "next", None),
                       next_framing=getattr(args, "next_framing", "sample"),
                       next_root_cert=_read(getattr(args, "next_ca", None)),
                       next_server_name=getattr(args, "next_server_name", None))  # fmt: skip


def cmd_serve(args) -> int:
    import asyncio

    import torch

    from flowcodec.family import load_pretrained
    from flowcodec.serve.engine import TierEngine, TierSpec
    from flowcodec.serve.server import TierServer, freeze_heap

    torch.set_num_threads(max(1, args.threads))
    fam = load_pretrained(args.family, progress=not args.no_progress)
    codec = build_codec_from_args(fam, args.point_in, args.codec, args.codec_kwargs,
                                  args.codec_checkpoint)  # fmt: skip
    next_codec = None
    if args.next:
        next_codec = build_codec_from_args(fam, args.point, args.next_codec,
                                           args.next_codec_kwargs, args.next_codec_checkpoint)
    spec = TierSpec(args.tier, args.point_in, args.point, args.exit_threshold)
    server = TierServer(TierEngine(fam, spec, codec, next_codec), _serve_config(args))
    freeze_heap()  # the model is loaded: keep full collections off it (a latency tail)

    async def main() -> None:
        port = await server.start()
        tls = " (TLS)" if args.tls_cert else ""
        nxt = f", forwards to {args.next}" if args.next else ", answers every sample"
        print(f"flowcodec serve: tier {args.tier!r} (points {args.point_in} -> {args.point}"
              f"{nxt}) listening on {args.host}:{port}{tls}; Ctrl-C drains and stops",
              flush=True)  # fmt: skip
        await server.serve_forever()
        print(f"flowcodec serve: stopped; {dict(server.stats)}", flush=True)

    asyncio.run(main())
    return 0


def _make_link(args):
    from channels import ExactLink, FastLink, IIDPacketErasure

    if args.link == "fast":
        return FastLink(mcs=args.mcs, snr_db=args.snr_db, harq_max_tx=args.harq, seed=args.seed)
    if args.link == "exact":
        return ExactLink(mcs=args.mcs, snr_db=args.snr_db, harq_max_tx=args.harq, seed=args.seed)
    return IIDPacketErasure(args.loss, seed=args.seed)


def cmd_proxy(args) -> int:
    import asyncio
    import signal

    from flowcodec.serve.proxy import LinkProxy
    from flowcodec.serve.server import freeze_heap

    proxy = LinkProxy(args.upstream, _make_link(args), args.symbol_rate, args.delay_ms / 1e3,
                      config=_serve_config(args),
                      upstream_root_cert=_read(args.upstream_ca))  # fmt: skip
    freeze_heap()

    async def main() -> None:
        port = await proxy.start()
        print(f"flowcodec proxy: {args.host}:{port} -> {args.upstream} over a {args.link} link "
              f"({args.symbol_rate:g} symbol/s, {args.delay_ms:g} ms); Ctrl-C stops", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await proxy.stop(2.0)
        print(f"flowcodec proxy: stopped; {proxy.stats}", flush=True)

    asyncio.run(main())
    return 0


def cmd_device(args) -> int:
    import torch

    from channels import IIDPacketErasure
    from flowcodec.codecs import build_codec
    from flowcodec.data import load_dataset
    from flowcodec.family import load_pretrained
    from flowcodec.pipeline import DEFAULT_TIERS, Flow, Hop, Tier
    from flowcodec.progress import tqdm
    from flowcodec.serve.remote import RemoteHop

    torch.set_num_threads(max(1, args.threads))
    fam = load_pretrained(args.family, progress=not args.no_progress)
    codec = build_codec_from_args(fam, args.point, args.codec, args.codec_kwargs,
                                  args.codec_checkpoint)  # fmt: skip
    tiers = [Tier("device", DEFAULT_TIERS["device"], args.point, args.exit_threshold)]
    tiers += [Tier(n, DEFAULT_TIERS.get(n, DEFAULT_TIERS["edge"]), p, thr)
              for n, p, thr in parse_tiers(args.remote)]  # fmt: skip
    hop = RemoteHop(codec, args.connect, args.deadline_s, args.framing, _read(args.ca),
                    args.server_name)  # fmt: skip
    # Only the first hop is the device's; the hops behind the edge are the servers' own
    # (the flow needs one per tier pair; these are never used once the first is remote).
    later = [Hop(build_codec("raw", fam.feature_shape(t.point)), IIDPacketErasure(0.0), 1.0)
             for t in tiers[1:-1]]  # fmt: skip
    flow = Flow(fam, tiers, [hop, *later])
    _, test = load_dataset(args.family)
    data = test.subset(min(args.samples, len(test)), seed=args.seed)
    x, y = data.normalize(data.images), data.labels
    traces, correct = [], 0
    t0 = time.perf_counter()
    for s in tqdm(range(0, len(x), args.batch), desc="device", disable=args.no_progress):
        res = flow.run(x[s : s + args.batch])
        correct += int((res.predictions == y[s : s + args.batch]).sum())
        traces += res.traces
    elapsed = time.perf_counter() - t0
    hop.close()
    walls = sorted(t.wall_s for t in traces if t.wall_s is not None)
    mix: dict[str, int] = {}
    for t in traces:
        mix[t.exit_tier] = mix.get(t.exit_tier, 0) + 1
    reasons: dict[str, int] = {}
    for t in traces:
        if t.fallback:
            reasons[t.fallback] = reasons.get(t.fallback, 0) + 1
    bits = [t.hops[0].bits for t in traces if t.hops]
    lost = sum(t.hops[0].packets_lost for t in traces if t.hops)
    summary = {
        "samples": len(traces), "accuracy": correct / max(1, len(traces)),
        "mean_wall_ms": 1e3 * sum(walls) / max(1, len(walls)),
        "p50_wall_ms": 1e3 * walls[len(walls) // 2] if walls else None,
        "p99_wall_ms": 1e3 * walls[min(len(walls) - 1, int(0.99 * len(walls)))] if walls
        else None,
        "mean_trace_latency_ms": 1e3 * sum(t.latency_s for t in traces) / max(1, len(traces)),
        "bytes_per_sample": sum(bits) / 8 / max(1, len(bits)), "units_lost": lost,
        "exit_mix": mix, "fallbacks": reasons, "seconds": elapsed,
    }  # fmt: skip
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(
            {"summary": summary, "traces": [t.__dict__ | {"hops": [h.__dict__ for h in t.hops]}
                                            for t in traces]}, indent=1))  # fmt: skip
    return 0


def _listen(p, port: int) -> None:
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=port, help=f"port (default {port}; 0: any free)")
    p.add_argument("--tls-cert", default=None, help="PEM certificate: serve over TLS")
    p.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    p.add_argument("--max-batch", type=int, default=16, help="largest batch (default 16)")
    p.add_argument("--max-wait-ms", type=float, default=2.0,
                   help="how long a batch waits for more samples after its first (default 2)")
    p.add_argument("--queue", type=int, default=256,
                   help="queued samples before new ones are refused (default 256)")
    p.add_argument("--deadline-s", type=float, default=5.0,
                   help="longest a sample may take here when its caller sets none (default 5)")


def _codec_args(p, prefix: str = "", default: str = "raw") -> None:
    dest = prefix.replace("-", "_")
    p.add_argument(f"--{prefix}codec", default=default,
                   help=f"codec registry name (default {default})")
    p.add_argument(f"--{prefix}codec-kwargs", default='{"dtype": "float16"}',
                   help="JSON keyword arguments of the codec (default float16 values)")
    p.add_argument(f"--{prefix}codec-checkpoint", default=None, dest=f"{dest}codec_checkpoint",
                   help="a saved codec (save_codec) instead of --codec")


def add_parsers(sub) -> None:
    """Add ``serve``, ``proxy`` and ``device`` to the ``flowcodec`` command."""
    fmt = argparse.RawDescriptionHelpFormatter
    s = sub.add_parser(
        "serve", formatter_class=fmt,
        help="run one tier (edge or cloud) as a server that devices send features to",
        description="Serve one tier of a family over gRPC: decode each sample's packets "
        "(concealing lost ones), run the tier's stages, answer through its exit or forward "
        "the re-encoded features to the next tier (--next). Batches samples across "
        "clients; refuses new samples when its queue is full; drains on Ctrl-C or SIGTERM. "
        "Listens on 127.0.0.1 unless --host says otherwise.",
        epilog="example (edge, answers everything with member 3):\n"
        "    flowcodec serve --tier edge --point-in 1 --point 3\n"
        "edge in front of a cloud:\n"
        "    flowcodec serve --tier cloud --point-in 2 --point 3 --port 50052\n"
        "    flowcodec serve --tier edge --point-in 1 --point 2 --exit-threshold 0.9 "
        "--next 127.0.0.1:50052")  # fmt: skip
    s.add_argument("--family", default="digits", choices=["digits", "cifar10"])
    s.add_argument("--tier", default="edge", help="tier name (default edge)")
    s.add_argument("--point-in", type=int, default=1,
                   help="split point the incoming features come from (default 1)")
    s.add_argument("--point", type=int, default=3, help="split point computed up to (default 3)")
    s.add_argument("--exit-threshold", type=float, default=None,
                   help="answer here when the exit is this confident (with --next)")
    _codec_args(s)
    s.add_argument("--next", default=None, help="host:port of the next tier's server")
    s.add_argument("--next-framing", default="sample", choices=["sample", "session"])
    s.add_argument("--next-ca", default=None, help="PEM CA certificate of the next tier (TLS)")
    s.add_argument("--next-server-name", default=None, help="TLS name of the next tier")
    _codec_args(s, "next-")
    _listen(s, 50051)
    s.add_argument("--batches-in-flight", type=int, default=2,
                   help="batches formed ahead of the worker: 1 forms the next only when the "
                   "last is answered (default 2)")
    s.add_argument("--max-samples-per-request", type=int, default=64,
                   help="most samples in one InferBatch call (default 64)")
    s.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    s.add_argument("--no-progress", action="store_true", help="hide progress bars")
    s.set_defaults(func=cmd_serve)

    x = sub.add_parser(
        "proxy", help="an emulated wireless hop between devices and a server",
        description="Forward requests to --upstream through a channels link: packets the "
        "link loses are forwarded as lost, and each sample is held for its channel uses / "
        "symbol rate plus --delay-ms.")
    x.add_argument("--upstream", default="127.0.0.1:50051", help="the edge server")
    x.add_argument("--upstream-ca", default=None, help="PEM CA certificate of the upstream")
    x.add_argument("--link", default="fast", choices=["fast", "exact", "erasure"])
    x.add_argument("--mcs", type=int, default=9, help="5G NR MCS index (fast/exact)")
    x.add_argument("--snr-db", type=float, default=10.0, help="Es/N0 in dB (fast/exact)")
    x.add_argument("--harq", type=int, default=1, help="transmissions per packet (default 1)")
    x.add_argument("--loss", type=float, default=0.05, help="loss rate (erasure link)")
    x.add_argument("--symbol-rate", type=float, default=1e6, help="symbols/s (default 1e6)")
    x.add_argument("--delay-ms", type=float, default=2.0, help="propagation delay (default 2)")
    x.add_argument("--seed", type=int, default=0)
    _listen(x, 50050)
    x.set_defaults(func=cmd_proxy)

    d = sub.add_parser(
        "device", help="run test samples on this device against a real edge server",
        description="Compute the device's part of the family, send the rest to --connect "
        "(a flowcodec serve or proxy), and print accuracy, latency, bytes and fallbacks. "
        "Samples the server cannot answer in time are answered by the device's own exit.")
    d.add_argument("--connect", default="127.0.0.1:50051", help="server or proxy host:port")
    d.add_argument("--family", default="digits", choices=["digits", "cifar10"])
    d.add_argument("--point", type=int, default=1, help="device split point (default 1)")
    d.add_argument("--exit-threshold", type=float, default=None,
                   help="answer on the device when its exit is this confident")
    d.add_argument("--remote", default="edge:3",
                   help="the server tiers, NAME:POINT[:THRESHOLD],... (default edge:3)")
    _codec_args(d)
    d.add_argument("--framing", default="sample", choices=["sample", "session"])
    d.add_argument("--deadline-s", type=float, default=1.0, help="per sample (default 1)")
    d.add_argument("--samples", type=int, default=100, help="test samples (default 100)")
    d.add_argument("--batch", type=int, default=1, help="samples per flow run (default 1)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--ca", default=None, help="PEM CA certificate of the server (TLS)")
    d.add_argument("--server-name", default=None, help="TLS name to check the server against")
    d.add_argument("--out", default=None, help="write the summary and traces as JSON here")
    d.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")
    d.set_defaults(func=cmd_device)


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - the flowcodec CLI
    p = argparse.ArgumentParser(prog="flowcodec")
    add_parsers(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
