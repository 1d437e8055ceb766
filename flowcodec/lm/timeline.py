"""Session timelines of collaborative generation over a device-edge link.

A :class:`~flowcodec.lm.speculative.GenerationTrace` records what each party computed (the
measured wall clock of its passes, per round) and the bytes of every message each way. What
those messages cost in time depends on the link, not on the generation, so a trace is
generated once and replayed here on any number of links:

- :class:`LinkSetting` names a duplex link: uplink and downlink rates (kbit/s), the
  round-trip propagation delay, and packet loss, either i.i.d. (``channels.IIDPacketErasure``)
  or drawn from the BLER tables of ``channels.FastLink`` at an MCS and SNR;
- :class:`Duplex` is one realisation of it (one link per direction, seeded): every message is
  one packet through the direction's ``channels`` link; a lost packet is sent again after a
  retransmission timeout of one round trip (the sender hears no acknowledgement), so each
  lost attempt costs its transmission time plus the RTT;
- :func:`session_timeline` replays a trace on a :class:`Duplex` and returns when the last
  token reached the device (:class:`Timeline`).

Timing rules (one-way delay = RTT / 2 each way):

- a message occupies its direction for its transmission time, ``channel uses / symbol rate``
  as in :class:`flowcodec.pipeline.Hop` (an erasure link carries one bit per channel use at
  the rate; a ``FastLink`` its MCS's spectral efficiency, so its channel uses, CRC and rate
  matching included, set the time), and messages in one direction queue behind each other;
- a round that needs the device (it computed, or sent something up) starts when the device
  has everything it waits for: its passes, then the uplink message, then the edge's passes
  (when it is free), then the downlink reply, which the device waits for;
- a round that needs nothing from the device (edge-only streaming: no device work, nothing
  up) starts at the edge as soon as the edge is free, so the edge computes token ``i + 1``
  while token ``i`` is on its way down; the device takes the tokens in order.

Example
-------
>>> from flowcodec.lm.speculative import GenerationTrace, Round
>>> tr = GenerationTrace("speculative", [1, 2])
>>> tr._commit([7, 8], ["device", "edge"],
...            Round(up_bytes=5, down_bytes=4, device_seconds=0.002, edge_seconds=0.003))
>>> link = Duplex(LinkSetting(rtt_ms=10, up_kbps=8, down_kbps=8))
>>> round(session_timeline(tr, link).seconds, 6)  # ms: 2 + 5 (up) + 5 + 3 + 4 (down) + 5
0.024
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flowcodec.errors import ConfigError

__all__ = ["LinkSetting", "Duplex", "Timeline", "session_timeline", "MAX_ATTEMPTS"]

#: Transmissions of one message before the link is declared unusable (a ConfigError).
MAX_ATTEMPTS = 64


@dataclass(frozen=True)
class LinkSetting:
    """A duplex device-edge link.

    ``rtt_ms``: round-trip propagation delay [ms] (half of it each way); ``up_kbps`` /
    ``down_kbps``: information rates [kbit/s] of the uplink and the downlink (``down_kbps``
    None: as the uplink); ``loss``: probability that a message (one packet) is lost, i.i.d.
    in each direction (``channels.IIDPacketErasure``); ``mcs`` / ``snr_db``: instead of
    ``loss``, losses drawn by ``channels.FastLink`` at that MCS and Es/N0 (its BLER tables;
    the rate is then the information rate at that MCS, so the symbol rate is ``kbps * 1000 /
    spectral efficiency`` and a packet's coding overhead costs time); ``seed``: the seed of
    the links' generators."""

    rtt_ms: float = 0.0
    up_kbps: float = 1000.0
    down_kbps: float | None = None
    loss: float = 0.0
    mcs: int | None = None
    snr_db: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        bad = []
        for name in ("rtt_ms", "up_kbps", "down_kbps", "loss", "snr_db"):
            v = getattr(self, name)
            if v is None and name in ("down_kbps", "snr_db"):
                continue
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                bad.append(f"{name} must be a finite number, got {v!r}")
        if not bad:
            if self.rtt_ms < 0:
                bad.append(f"rtt_ms must be >= 0, got {self.rtt_ms!r}")
            for name in ("up_kbps", "down_kbps"):
                v = getattr(self, name)
                if v is not None and v <= 0:
                    bad.append(f"{name} must be > 0, got {v!r}")
            if not 0 <= self.loss < 1:
                bad.append(f"loss must be in [0, 1), got {self.loss!r}")
        if self.mcs is not None:
            if isinstance(self.mcs, bool) or not isinstance(self.mcs, int):
                bad.append(f"mcs must be an MCS index (int), got {self.mcs!r}")
            if self.snr_db is None:
                bad.append("a FastLink (mcs set) needs snr_db")
            if self.loss:
                bad.append("give either loss (i.i.d. erasures) or mcs and snr_db (FastLink), "
                           "not both")  # fmt: skip
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            bad.append(f"seed must be an int, got {self.seed!r}")
        if bad:
            raise ConfigError("bad link setting: " + "; ".join(bad))

    @property
    def down(self) -> float:
        """The downlink rate [kbit/s]."""
        return self.up_kbps if self.down_kbps is None else self.down_kbps

    def label(self) -> str:
        """A short name: rate(s), loss or MCS/SNR, RTT."""
        rate = f"{self.up_kbps:g}" + (f"/{self.down:g}" if self.down != self.up_kbps else "")
        lossy = (f", MCS {self.mcs} at {self.snr_db:g} dB" if self.mcs is not None
                 else f", loss {self.loss:g}" if self.loss else "")  # fmt: skip
        return f"{rate} kbit/s{lossy}, RTT {self.rtt_ms:g} ms"


class Duplex:
    """One realisation of a :class:`LinkSetting`: an uplink and a downlink ``channels`` link,
    each with its own generator (``seed`` and ``seed + 1``, offset by ``stream``, e.g. the
    prompt's index, so every scheme meets the same losses on the same prompt).

    ``send(way, nbytes)`` -> ``(seconds, attempts)``: the transmission times of the message's
    attempts until one arrives, and their number (``way``: ``"up"`` or ``"down"``)."""

    def __init__(self, setting: LinkSetting, stream: int = 0) -> None:
        from channels import FastLink, IIDPacketErasure
        from flowcodec.pipeline import packet_bits_per_symbol

        self.setting = setting
        self.rtt_s = setting.rtt_ms / 1e3
        seed = 2 * (setting.seed * 1_000_003 + int(stream))
        self._links, self._rates = {}, {}
        for i, (way, kbps) in enumerate((("up", setting.up_kbps), ("down", setting.down))):
            if setting.mcs is None:
                link = IIDPacketErasure(setting.loss, seed=seed + i)
            else:
                link = FastLink(mcs=setting.mcs, snr_db=setting.snr_db, seed=seed + i)
            self._links[way] = link
            # symbols per second that carry kbps of information (as flowcodec.pipeline.Hop)
            self._rates[way] = kbps * 1e3 / packet_bits_per_symbol(link)

    def send(self, way: str, nbytes: int) -> tuple[list[float], int]:
        """The transmission time of every attempt of an ``nbytes`` message until one is
        delivered (the last one), and the number of attempts."""
        link, rate = self._links[way], self._rates[way]
        times = []
        for _ in range(MAX_ATTEMPTS):
            got, report = link.transmit([bytes(nbytes)])
            uses = getattr(report, "per_packet_channel_uses", None)
            times.append((uses[0] if uses is not None else 8 * nbytes) / rate)
            if got[0] is not None:
                return times, len(times)
        raise ConfigError(f"the {way}link lost a {nbytes}-byte message {MAX_ATTEMPTS} times "
                          f"in a row ({self.setting.label()}): no session can run on it")


@dataclass
class Timeline:
    """A trace replayed on a link: ``seconds`` until the last token is at the device;
    ``device_seconds`` / ``edge_seconds``: the parties' measured compute in it;
    ``up_attempts`` / ``down_attempts``: transmissions (retransmissions included) and
    ``up_bytes`` / ``down_bytes`` the bytes they carried; ``messages``: messages sent."""

    seconds: float = 0.0
    device_seconds: float = 0.0
    edge_seconds: float = 0.0
    messages: int = 0
    up_attempts: int = 0
    down_attempts: int = 0
    up_bytes: int = 0
    down_bytes: int = 0

    @property
    def retransmissions(self) -> int:
        return self.up_attempts + self.down_attempts - self.messages


def session_timeline(trace, link: Duplex) -> Timeline:
    """Replay ``trace`` (a :class:`~flowcodec.lm.speculative.GenerationTrace`) on ``link``
    with the rules in the module's docstring; the compute of each round is the wall clock
    its trace recorded."""
    half = link.rtt_s / 2
    out = Timeline()
    free = {"up": 0.0, "down": 0.0}  # when each direction is next idle

    def deliver(way: str, nbytes: int, ready: float) -> float:
        times, attempts = link.send(way, nbytes)
        start = max(ready, free[way])
        # each lost attempt: its transmission, then a timeout of one round trip
        free[way] = start + sum(times) + (attempts - 1) * link.rtt_s
        out.messages += 1
        setattr(out, f"{way}_attempts", getattr(out, f"{way}_attempts") + attempts)
        setattr(out, f"{way}_bytes", getattr(out, f"{way}_bytes") + attempts * nbytes)
        return free[way] + half

    t_dev = t_edge = 0.0
    for rnd in trace.rounds:
        out.device_seconds += rnd.device_seconds
        out.edge_seconds += rnd.edge_seconds
        streamed = not rnd.up_bytes and not rnd.device_seconds and (
            rnd.edge_seconds or rnd.down_bytes)  # fmt: skip
        if streamed:
            ready = t_edge
        else:
            t_dev += rnd.device_seconds
            if not (rnd.up_bytes or rnd.edge_seconds or rnd.down_bytes):
                continue  # a step on the device alone
            ready = deliver("up", rnd.up_bytes, t_dev) if rnd.up_bytes else t_dev
        t_edge = max(ready, t_edge) + rnd.edge_seconds
        arrival = deliver("down", rnd.down_bytes, t_edge) if rnd.down_bytes else t_edge
        if streamed or rnd.down_bytes:  # the device waits for what the edge sends
            t_dev = max(t_dev, arrival)
    out.seconds = t_dev
    return out
