"""``flowcodec serve``, ``flowcodec device`` and ``flowcodec proxy``.

Two terminals::

    flowcodec serve                       # edge: decodes point-1 features, runs member 3
    flowcodec device --samples 200        # device: member 1 up to point 1, sends the rest

Add a wireless hop between them with ``flowcodec proxy --upstream 127.0.0.1:50051`` and
``flowcodec device --connect 127.0.0.1:50050``. See ``docs/deployment.md``.

Loud failures: every numeric argument is checked before any work starts (a bad one is a
one-line error and exit status 2); ``device`` reports any fallback on stderr with counts
by reason and exits with status 1 when every sample fell back (no server, every packet
lost) unless ``--allow-fallback`` is given; its summary is rounded for people, or JSON
with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from flowcodec.errors import ConfigError
from flowcodec.family.pretrained import family_dataset, image_families
from flowcodec.pipeline import DEFAULT_MAX_CONCEALED

__all__ = ["add_parsers", "build_codec_from_args", "parse_tiers", "check_numbers",
           "device_summary", "format_summary"]  # fmt: skip

#: The proxy's link unless told otherwise (printed by --help and at start-up), and the
#: default MCS in words (tests check it against channels.mcs.MCS_TABLE).
PROXY_MCS, PROXY_SNR_DB = 9, 10.0
PROXY_MCS_WORDS = "QPSK, code rate 0.66"
#: Highest index of the 5G NR MCS table the links use (channels.mcs.MCS_TABLE).
MAX_MCS = 28


def _rules(*names: str) -> list[tuple[str, str, object]]:
    """Checks of numeric arguments by destination: (dest, what it must be, test)."""
    every = {
        "port": ("an integer in 0..65535", lambda v: 0 <= v <= 65535),
        "tcp_port": ("an integer in 0..65535", lambda v: 0 <= v <= 65535),
        "max_batch": ("an integer in 1..4096", lambda v: 1 <= v <= 4096),
        "max_wait_ms": ("in 0..10000 ms", lambda v: 0 <= v <= 10_000),
        "queue": ("an integer in 1..1048576", lambda v: 1 <= v <= 1 << 20),
        "deadline_s": ("positive", lambda v: v > 0),
        "threads": ("at least 1", lambda v: v >= 1),
        "point_in": ("at least 0", lambda v: v >= 0),
        "point": ("at least 0", lambda v: v >= 0),
        "exit_threshold": ("in [0, 1]", lambda v: 0 <= v <= 1),
        "max_concealed": ("a fraction in [0, 1]", lambda v: 0 <= v <= 1),
        "batches_in_flight": ("an integer in 1..16", lambda v: 1 <= v <= 16),
        "max_samples_per_request": ("an integer in 1..1024", lambda v: 1 <= v <= 1024),
        "mcs": (f"an MCS index in 0..{MAX_MCS}", lambda v: 0 <= v <= MAX_MCS),
        "snr_db": ("a finite number of dB", lambda v: True),
        "harq": ("transmissions per packet in 1..16", lambda v: 1 <= v <= 16),
        "loss": ("a loss rate in [0, 1]", lambda v: 0 <= v <= 1),
        "symbol_rate": ("positive", lambda v: v > 0),
        "delay_ms": ("at least 0", lambda v: v >= 0),
        "seed": ("at least 0", lambda v: v >= 0),
        "samples": ("at least 1", lambda v: v >= 1),
        "batch": ("at least 1", lambda v: v >= 1),
        "retries": ("an integer in 0..16", lambda v: 0 <= v <= 16),
    }
    return [(n, *every[n]) for n in names]


def check_numbers(args, names: list[str] | tuple[str, ...]) -> None:
    """Check the numeric arguments ``names`` (argparse destinations) of ``args`` before any
    work starts; one :class:`ConfigError` naming every bad one (``None`` is not checked:
    the option's "not set")."""
    bad = []
    for dest, what, ok in _rules(*names):
        v = getattr(args, dest, None)
        if v is None:
            continue
        if not (isinstance(v, int | float) and math.isfinite(v) and ok(v)):
            bad.append(f"--{dest.replace('_', '-')} {v} (must be {what})")
    if bad:
        raise ConfigError(f"bad value{'s' if len(bad) > 1 else ''}: {'; '.join(bad)}")


_LISTEN = ("port", "max_batch", "max_wait_ms", "queue", "deadline_s")


def build_codec_from_args(family, point: int, name: str, kwargs: str | None,
                          checkpoint: str | None):  # fmt: skip
    """The codec a command line names: a checkpoint (``save_codec``) or a registry name
    with JSON keyword arguments, made by :func:`~flowcodec.sweeps.codec_from_spec` (the one
    way from a spec to a codec) and checked against the features at ``point``."""
    from flowcodec.sweeps import codec_from_spec

    if checkpoint:
        return codec_from_spec({"checkpoint": checkpoint}, family, point,
                               what=f"codec checkpoint {checkpoint}")  # fmt: skip
    try:
        kw = json.loads(kwargs) if kwargs else {}
    except json.JSONDecodeError as e:
        raise ConfigError(f"codec kwargs are not JSON: {e}") from e
    if not isinstance(kw, dict):
        raise ConfigError("codec kwargs must be a JSON object")
    return codec_from_spec({"codec": name, "kwargs": kw}, family, point, what=f"codec {name!r}")


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

    return ServeConfig(host=args.host, port=args.port, tcp_port=getattr(args, "tcp_port", None),
                       max_batch=args.max_batch,
                       max_wait_s=args.max_wait_ms / 1e3, queue_size=args.queue,
                       batches_in_flight=getattr(args, "batches_in_flight", 2),
                       max_samples_per_request=getattr(args, "max_samples_per_request", 64),
                       default_deadline_s=args.deadline_s, tls_cert=_read(args.tls_cert),
                       tls_key=_read(args.tls_key), next_address=getattr(args, "next", None),
                       next_framing=getattr(args, "next_framing", "sample"),
                       next_root_cert=_read(getattr(args, "next_ca", None)),
                       next_server_name=getattr(args, "next_server_name", None))  # fmt: skip


def cmd_serve(args) -> int:
    check_numbers(args, (*_LISTEN, "threads", "point_in", "point", "exit_threshold",
                         "max_concealed", "batches_in_flight", "max_samples_per_request",
                         "tcp_port"))
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
    spec = TierSpec(args.tier, args.point_in, args.point, args.exit_threshold,
                    args.max_concealed)  # fmt: skip
    server = TierServer(TierEngine(fam, spec, codec, next_codec), _serve_config(args))
    freeze_heap()  # the model is loaded: keep full collections off it (a latency tail)

    async def main() -> None:
        port = await server.start()
        tls = " (TLS)" if args.tls_cert else ""
        tcp = f" and tcp://{args.host}:{server.tcp_port}" if server.tcp_port is not None else ""
        nxt = f", forwards to {args.next}" if args.next else ", answers every sample"
        trust = ("trusts every sample" if args.max_concealed is None else
                 f"answers 'concealed input' when over {args.max_concealed:.0%} of a sample's "
                 "packets are concealed")  # fmt: skip
        print(f"flowcodec serve: tier {args.tier!r} (points {args.point_in} -> {args.point}"
              f"{nxt}; {trust}) listening on {args.host}:{port}{tcp}{tls}; Ctrl-C drains and "
              "stops", flush=True)  # fmt: skip
        await server.serve_forever()
        stats = dict(server.stats)
        print(f"flowcodec serve: stopped; {_counts(stats) or 'no requests'}", flush=True)
        fell = {k: stats[k] for k in ("fallbacks", "concealed_input") if stats.get(k)}
        if fell:
            print(f"flowcodec serve: warning: {_counts(fell)} (samples not answered from "
                  "trusted features by this tier)", file=sys.stderr, flush=True)  # fmt: skip

    asyncio.run(main())
    return 0


def _counts(d: dict) -> str:
    """``{"a": 3, "b": 1, "c": 0}`` -> ``"a 3, b 1"`` (largest first, zeros left out)."""
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))
                     if v)  # fmt: skip


def link_description(args) -> str:
    """What link the proxy puts on the packets, in words (its MCS and SNR included)."""
    from channels.mcs import get_mcs

    if args.link == "erasure":
        return f"an erasure link losing {args.loss:.3g} of the packets"
    tx = "transmission" if args.harq == 1 else "transmissions"
    return (f"a {args.link} link at MCS {args.mcs} ({_mcs_words(get_mcs(args.mcs))}), SNR "
            f"{args.snr_db:g} dB, {args.harq} {tx} per packet")  # fmt: skip


def _mcs_words(mcs) -> str:
    mod = {1: "BPSK", 2: "QPSK", 4: "16QAM", 6: "64QAM", 8: "256QAM"}[mcs.modulation_order]
    return f"{mod}, code rate {mcs.code_rate:.2f}"


def _make_link(args):
    from channels import ExactLink, FastLink, IIDPacketErasure

    if args.link == "fast":
        return FastLink(mcs=args.mcs, snr_db=args.snr_db, harq_max_tx=args.harq, seed=args.seed)
    if args.link == "exact":
        return ExactLink(mcs=args.mcs, snr_db=args.snr_db, harq_max_tx=args.harq, seed=args.seed)
    return IIDPacketErasure(args.loss, seed=args.seed)


def cmd_proxy(args) -> int:
    check_numbers(args, (*_LISTEN, "mcs", "snr_db", "harq", "loss", "symbol_rate", "delay_ms",
                         "seed"))  # fmt: skip
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
        print(f"flowcodec proxy: {args.host}:{port} -> {args.upstream} over "
              f"{link_description(args)} ({args.symbol_rate:g} symbol/s, {args.delay_ms:g} ms "
              "delay); Ctrl-C stops", flush=True)  # fmt: skip
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await proxy.stop(2.0)
        st = proxy.stats
        lost = f"{st['units_lost']} of {st['units']} link units lost"
        print(f"flowcodec proxy: stopped; {_counts(st) or 'no requests'} ({lost})", flush=True)

    asyncio.run(main())
    return 0


def cmd_device(args) -> int:
    check_numbers(args, ("point", "exit_threshold", "deadline_s", "samples", "batch", "seed",
                         "threads", "max_concealed", "retries"))  # fmt: skip
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
                    args.server_name, retries=args.retries)  # fmt: skip
    # Only the first hop is the device's; the hops behind the edge are the servers' own
    # (the flow needs one per tier pair; these are never used once the first is remote).
    later = [Hop(build_codec("raw", fam.feature_shape(t.point)), IIDPacketErasure(0.0), 1.0)
             for t in tiers[1:-1]]  # fmt: skip
    flow = Flow(fam, tiers, [hop, *later], max_concealed=args.max_concealed)
    _, test = load_dataset(family_dataset(args.family))
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
    summary = device_summary(traces, correct, elapsed)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(format_summary(summary, args.connect))
    if args.out:
        Path(args.out).write_text(json.dumps(
            {"summary": summary, "traces": [t.__dict__ | {"hops": [h.__dict__ for h in t.hops]}
                                            for t in traces]}, indent=1))  # fmt: skip
    return _report_fallbacks(summary, args)


def device_summary(traces: list, correct: int, seconds: float) -> dict:
    """The ``flowcodec device`` summary of a run's traces, rounded: accuracy (fraction, 4
    decimals), times in ms (3 decimals), bytes (1 decimal), counts as integers."""
    n = len(traces)
    walls = sorted(t.wall_s for t in traces if t.wall_s is not None)
    mix: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for t in traces:
        mix[t.exit_tier] = mix.get(t.exit_tier, 0) + 1
        if t.fallback:
            reasons[t.fallback] = reasons.get(t.fallback, 0) + 1
    bits = [t.hops[0].bits for t in traces if t.hops]

    def ms(v: float | None) -> float | None:
        return None if v is None else round(1e3 * v, 3)

    return {
        "samples": n, "accuracy": round(correct / max(1, n), 4),
        "mean_wall_ms": ms(sum(walls) / len(walls)) if walls else None,
        "p50_wall_ms": ms(walls[len(walls) // 2]) if walls else None,
        "p99_wall_ms": ms(walls[min(len(walls) - 1, int(0.99 * len(walls)))]) if walls
        else None,
        "mean_trace_latency_ms": ms(sum(t.latency_s for t in traces) / max(1, n)),
        "bytes_per_sample": round(sum(bits) / 8 / max(1, len(bits)), 1),
        "units": sum(t.hops[0].packets for t in traces if t.hops),
        "units_lost": sum(t.hops[0].packets_lost for t in traces if t.hops),
        "exit_mix": mix, "fallbacks": reasons, "fell_back": sum(reasons.values()),
        "untrusted": sum(bool(getattr(t, "untrusted", False)) for t in traces),
        "fallback_mflops": round(sum(getattr(t, "fallback_flops", 0) for t in traces) / 1e6, 3),
        "seconds": round(seconds, 2),
    }  # fmt: skip


def format_summary(s: dict, address: str) -> str:
    """A :func:`device_summary` for people: a few aligned lines."""
    def opt(v, unit):
        return "n/a" if v is None else f"{v:.2f} {unit}"

    lines = [f"flowcodec device: {s['samples']} samples against {address} in "
             f"{s['seconds']:.1f} s",
             f"  accuracy        {100 * s['accuracy']:.2f} %",
             f"  answered by     {_counts(s['exit_mix'])}",
             f"  wall time       mean {opt(s['mean_wall_ms'], 'ms')}, p50 "
             f"{opt(s['p50_wall_ms'], 'ms')}, p99 {opt(s['p99_wall_ms'], 'ms')}",
             f"  trace latency   mean {opt(s['mean_trace_latency_ms'], 'ms')}",
             f"  uplink          {s['bytes_per_sample']:.0f} bytes per sample; "
             f"{s['units_lost']} of {s['units']} link units lost",
             f"  fallbacks       {_counts(s['fallbacks']) or 'none'}"]  # fmt: skip
    if s["untrusted"]:
        lines.append(f"  untrusted       {s['untrusted']} (answered from concealed features, "
                     "no exit to fall back on)")  # fmt: skip
    return "\n".join(lines)


def _report_fallbacks(summary: dict, args) -> int:
    """Fallbacks on stderr; the exit status: 1 when every sample fell back (or was answered
    untrusted) unless --allow-fallback, else 0."""
    n, fell, untrusted = summary["samples"], summary["fell_back"], summary["untrusted"]
    if fell:
        print(f"flowcodec device: warning: {fell} of {n} samples fell back "
              f"({_counts(summary['fallbacks'])})", file=sys.stderr)  # fmt: skip
    if untrusted:
        print(f"flowcodec device: warning: {untrusted} of {n} samples answered from concealed "
              "features (no device exit to fall back on)", file=sys.stderr)  # fmt: skip
    if n and fell + untrusted >= n and not args.allow_fallback:
        hint = (f"is a server listening on {args.connect}? " if
                "unreachable" in summary["fallbacks"] else "")  # fmt: skip
        print(f"flowcodec device: error: every sample fell back; {hint}pass --allow-fallback "
              "to accept such a run", file=sys.stderr)  # fmt: skip
        return 1
    return 0


def _fraction_or_none(text: str) -> float | None:
    """``--max-concealed``: a number (checked with the others) or ``none``."""
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1] or 'none', got "
                                         f"{text!r}") from None  # fmt: skip


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
    s.add_argument("--family", default="digits", choices=image_families())
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
    s.add_argument("--tcp-port", type=int, default=None,
                   help="also serve the same calls as framed TCP on this port (0: any free "
                   "port), reached as tcp://HOST:PORT: one sample per call without gRPC's "
                   "per-call cost (default: gRPC only)")
    s.add_argument("--max-samples-per-request", type=int, default=64,
                   help="most samples in one InferBatch call (default 64)")
    s.add_argument("--max-concealed", type=_fraction_or_none, default=DEFAULT_MAX_CONCEALED,
                   help="answer 'concealed input' (the caller falls back on its own exit) "
                   "when more than this fraction of a sample's packets were lost or corrupted "
                   f"(default {DEFAULT_MAX_CONCEALED:g}; 'none': trust every sample)")
    s.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    s.add_argument("--no-progress", action="store_true", help="hide progress bars")
    s.set_defaults(func=cmd_serve)

    x = sub.add_parser(
        "proxy", help="an emulated wireless hop between devices and a server",
        description="Forward requests to --upstream through a channels link: packets the "
        f"link loses are forwarded as lost, and each sample is held for its channel uses / "
        f"symbol rate plus --delay-ms. By default the link is the fast 5G NR link at MCS "
        f"{PROXY_MCS} ({PROXY_MCS_WORDS}) and an SNR of {PROXY_SNR_DB:g} dB (Es/N0), one "
        "transmission per packet; "
        "the start-up line says which link, MCS and SNR are in use.")
    x.add_argument("--upstream", default="127.0.0.1:50051", help="the edge server")
    x.add_argument("--upstream-ca", default=None, help="PEM CA certificate of the upstream")
    x.add_argument("--link", default="fast", choices=["fast", "exact", "erasure"],
                   help="fast (BLER tables), exact (LDPC + QAM per packet) or erasure "
                   "(i.i.d. losses at --loss) (default fast)")
    x.add_argument("--mcs", type=int, default=PROXY_MCS,
                   help=f"5G NR MCS index 0..{MAX_MCS} of the fast/exact link "
                   f"(default {PROXY_MCS}: {PROXY_MCS_WORDS})")
    x.add_argument("--snr-db", type=float, default=PROXY_SNR_DB,
                   help=f"Es/N0 in dB of the fast/exact link (default {PROXY_SNR_DB:g})")
    x.add_argument("--harq", type=int, default=1, help="transmissions per packet (default 1)")
    x.add_argument("--loss", type=float, default=0.05,
                   help="loss rate of the erasure link (default 0.05)")
    x.add_argument("--symbol-rate", type=float, default=1e6, help="symbols/s (default 1e6)")
    x.add_argument("--delay-ms", type=float, default=2.0, help="propagation delay (default 2)")
    x.add_argument("--seed", type=int, default=0)
    _listen(x, 50050)
    x.set_defaults(func=cmd_proxy)

    d = sub.add_parser(
        "device", help="run test samples on this device against a real edge server",
        description="Compute the device's part of the family, send the rest to --connect "
        "(a flowcodec serve or proxy), and print accuracy, latency, bytes and fallbacks. "
        "Samples the server cannot answer in time, or whose packets mostly did not arrive "
        "(--max-concealed), are answered by the device's own exit; fallbacks are reported "
        "on stderr, and a run in which every sample fell back exits with status 1 unless "
        "--allow-fallback.")
    d.add_argument("--connect", default="127.0.0.1:50051",
                   help="server or proxy host:port (gRPC), or tcp://HOST:PORT (a server's "
                   "--tcp-port)")
    d.add_argument("--family", default="digits", choices=image_families())
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
    d.add_argument("--json", action="store_true",
                   help="print the summary as JSON (for machines) instead of text")
    d.add_argument("--max-concealed", type=_fraction_or_none, default=DEFAULT_MAX_CONCEALED,
                   help="answer on the device when the server reports more than this fraction "
                   f"of a sample's packets concealed (default {DEFAULT_MAX_CONCEALED:g}; 'none': "
                   "only the server decides)")
    d.add_argument("--retries", type=int, default=0,
                   help="send a sample again this many times when the server could not trust "
                   "what arrived, before the device answers it (default 0)")
    d.add_argument("--allow-fallback", action="store_true",
                   help="exit 0 even when every sample fell back (default: exit 1)")
    d.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")
    d.set_defaults(func=cmd_device)


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - the flowcodec CLI
    p = argparse.ArgumentParser(prog="flowcodec")
    add_parsers(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"flowcodec {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
