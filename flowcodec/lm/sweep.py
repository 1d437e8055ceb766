"""``flowcodec lm sweep``: collaborative generation over gamma, thresholds and link settings.

Every scheme of :data:`SCHEMES` (device only, edge only, exact speculative decoding for each
``gamma``, uncertainty gating for each threshold) generates from the same validation prompts
(evenly spaced over the validation text, as ``experiments/lm_speculative_check.py`` takes
them), once per prompt: what is generated does not depend on the link. Each trace is then
replayed on every link setting (:mod:`flowcodec.lm.timeline`: rate each way, round-trip
delay, packet loss through the ``channels`` links) to give the session's time. The compute in
that time is the wall clock each party's passes took in the trace, measured on this machine
(with ``repeats`` > 1, the median over that many identical generations, round by round; the
schemes take turns on each prompt, so a load that drifts affects them alike).

Per (scheme, parameter, link) row: tokens per second, bytes up / down per token (the
messages, and what the link carried with retransmissions), round trips, edge and device
passes per token; quality as agreement with the edge-only greedy output (identical tokens,
identical prefix, identical outputs) and the teacher-forced validation loss
(:func:`~flowcodec.lm.speculative.gated_loss` on ``loss_windows`` windows: member ``draft``'s
for device only, member ``target``'s for edge only and speculative decoding, the gated mix
for gating).

The docs' cost model (docs/language.md) is evaluated beside the measurement: with ``T_d``
the draft member's time per drafted token, ``T_v(g)`` the target's verification pass over
``g + 1`` positions, ``T_e`` its pass for one token (means over the generations' rounds
after each prompt's first, so measured in the same runs and conditions; the isolated medians
of :func:`~flowcodec.lm.speculative.pass_times` are re-measured and reported beside them),
``a`` the measured chance that an examined draft is accepted and ``tau = (1 - a^(g+1)) /
(1 - a)``, ``n`` tokens take ``R + n T_e`` edge only and ``(n / tau) (g T_d + T_v(g) + R)``
speculatively (plus the messages' transmission times; the prompt's first pass is left out
of both); :func:`predicted_crossover` solves for the round-trip delay ``R`` where they are
equal, :func:`crossover` finds it in the measured rows.

A new scheme is one entry: ``SCHEMES["name"] = Scheme(run, "gammas")`` with ``run(family,
prompt, n, value, cfg) -> GenerationTrace``.

Example
-------
>>> import torch
>>> from flowcodec.family import build_family
>>> fam = build_family("shakespeare-char", dim=32, heads=2, depths=(1, 1, 1), context=16)
>>> val = torch.randint(0, 65, (400,))
>>> cfg = LMSweepConfig(prompts=2, prompt_len=4, new=6, gammas=[2], thresholds=[0.5],
...                     rtts_ms=[0, 50], loss_windows=2)
>>> res = run_lm_sweep(fam, val, cfg, progress=False)
>>> sorted({r["label"] for r in res["records"]})
['device', 'edge', 'gated t=0.5', 'speculative g=2']
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from flowcodec._moved import moved
from flowcodec.errors import ConfigError
from flowcodec.lm import speculative as sp
from flowcodec.lm.data import validation_prompts  # noqa: F401  (public here too)
from flowcodec.lm.sweep_files import FIELDS, write_sweep
from flowcodec.lm.timeline import Duplex, LinkSetting, session_timeline
from flowcodec.progress import tqdm

__all__ = ["Scheme", "SCHEMES", "LMSweepConfig", "run_lm_sweep", "validation_prompts",
           "expected_tokens_per_round", "predict_speculative", "predict_edge",
           "predicted_crossover", "crossover", "cost_model_inputs", "FIELDS"]  # fmt: skip

# the command (its options, its run and its summary) lives in flowcodec.lm.sweep_cli
__getattr__ = moved(__name__, dict.fromkeys(["add_arguments", "command", "summary_lines"],
                                            "flowcodec.lm.sweep_cli"))


@dataclass(frozen=True)
class Scheme:
    """How the sweep runs a scheme: ``run(family, prompt, n, value, cfg) -> GenerationTrace``,
    once for every value in the config's list named ``param`` (``"gammas"`` or
    ``"thresholds"``; None: once, with ``value`` None)."""

    run: Callable
    param: str | None = None


def _device(f, p, n, v, c):
    return sp.generate_device(f, p, n, member=c.draft, **c.sampling)


def _edge(f, p, n, v, c):
    return sp.generate_edge(f, p, n, member=c.target, **c.sampling)


def _speculative(f, p, n, gamma, c):
    return sp.generate_speculative(f, p, n, draft=c.draft, target=c.target, gamma=gamma,
                                   **c.sampling)  # fmt: skip


def _gated(f, p, n, threshold, c):
    return sp.generate_gated(f, p, n, draft=c.draft, target=c.target, threshold=threshold,
                             **c.sampling)  # fmt: skip


def _speculative_codec(f, p, n, gamma, c):
    return sp.generate_speculative_codec(f, p, n, c.codec, draft=c.draft, target=c.target,
                                         gamma=gamma, rate=c.codec_rate, **c.sampling)  # fmt: skip


#: The schemes by name. Edge only always runs: it is the reference of quality and speed.
SCHEMES: dict[str, Scheme] = {
    "device": Scheme(_device),
    "edge": Scheme(_edge),
    "speculative": Scheme(_speculative, "gammas"),
    "gated": Scheme(_gated, "thresholds"),
    "speculative-codec": Scheme(_speculative_codec, "gammas"),  # needs cfg.codec
}

#: The symbol each swept list gets in a row's label, and the row's column for it.
_PARAMS = {"gammas": ("g", "gamma"), "thresholds": ("t", "threshold")}



@dataclass
class LMSweepConfig:
    """What :func:`run_lm_sweep` measures.

    ``prompts`` validation prompts of ``prompt_len`` tokens, ``new`` tokens each; the
    ``schemes`` (names in :data:`SCHEMES`; edge only is always added) with ``gammas`` and
    ``thresholds``; every link of ``up_kbps`` x ``losses`` x ``rtts_ms`` (``down_kbps``:
    the downlink rate, None: as the uplink; ``mcs`` and ``snr_db``: FastLink losses instead of
    ``losses``; ``link_seed``: the links' seed); members ``draft`` and ``target`` (None: the
    largest); ``temperature`` (0: greedy) and ``seed``; ``repeats`` generations per prompt
    whose per-round wall clocks are reduced to their median; ``loss_windows`` validation
    windows of the teacher-forced loss. ``codec``: the
    :class:`~flowcodec.lm.codec.HiddenStateCodec` of ``speculative-codec`` (at rate point
    ``codec_rate``, None: the codec's default)."""

    prompts: int = 20
    prompt_len: int = 64
    new: int = 64
    schemes: list[str] = field(default_factory=lambda: ["device", "edge", "speculative",
                                                        "gated"])  # fmt: skip
    gammas: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    thresholds: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7])
    rtts_ms: list[float] = field(default_factory=lambda: [0, 5, 10, 20, 50, 100])
    up_kbps: list[float] = field(default_factory=lambda: [1000.0])
    down_kbps: float | None = None
    losses: list[float] = field(default_factory=lambda: [0.0])
    mcs: int | None = None
    snr_db: float | None = None
    link_seed: int = 0
    draft: int = 1
    target: int | None = None
    temperature: float = 0.0
    seed: int = 0
    repeats: int = 1
    loss_windows: int = 64
    codec: object = None
    codec_rate: int | None = None

    @property
    def sampling(self) -> dict:
        return {"temperature": self.temperature, "seed": self.seed}

    def units(self) -> list[tuple[str, object]]:
        """``(scheme, value)`` for every generation unit, edge only first."""
        names = ["edge"] + [s for s in self.schemes if s != "edge"]
        out = []
        for name in names:
            param = SCHEMES[name].param
            out += [(name, v) for v in (getattr(self, param) if param else [None])]
        return out

    def links(self) -> list[LinkSetting]:
        """Every link setting, RTT varying fastest."""
        return [LinkSetting(rtt_ms=r, up_kbps=k, down_kbps=self.down_kbps, loss=p, mcs=self.mcs,
                            snr_db=self.snr_db, seed=self.link_seed)
                for k in self.up_kbps for p in self.losses for r in self.rtts_ms]  # fmt: skip

    def check(self, family) -> None:
        """Every problem with this config for ``family`` at once, as one ConfigError."""
        bad = []

        def ints(name, lo):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                bad.append(f"{name} must be an int >= {lo}, got {v!r}")

        for name, lo in (("prompts", 1), ("prompt_len", 1), ("new", 1), ("repeats", 1),
                         ("loss_windows", 1), ("draft", 1), ("seed", 0)):  # fmt: skip
            ints(name, lo)
        unknown = [s for s in self.schemes if s not in SCHEMES]
        if unknown:
            bad.append(f"unknown schemes {unknown}; known: {sorted(SCHEMES)}")
        if "speculative-codec" in self.schemes and self.codec is None:
            bad.append("speculative-codec needs a hidden-state codec (--codec PATH)")
        used = {SCHEMES[s].param for s in self.schemes if s in SCHEMES}
        if "gammas" in used and (not self.gammas or any(
                isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in self.gammas)):
            bad.append(f"gammas must be ints >= 1, got {self.gammas!r}")
        if "thresholds" in used and (not self.thresholds or any(
                not isinstance(t, int | float) or not 0 <= t <= 1 for t in self.thresholds)):
            bad.append(f"thresholds must be probabilities in [0, 1], got {self.thresholds!r}")
        if not self.rtts_ms or not self.up_kbps or not self.losses:
            bad.append("rtts_ms, up_kbps and losses each need at least one value")
        else:
            try:
                self.links()
            except ConfigError as e:
                bad.append(str(e))
        top = family.num_members
        target = top if self.target is None else self.target
        if not isinstance(target, int) or not 1 <= target <= top:
            bad.append(f"target must be a member in 1..{top}, got {self.target!r}")
        elif isinstance(self.draft, int) and not 1 <= self.draft < target:
            bad.append(f"draft must be a member smaller than the target ({target}), "
                       f"got {self.draft!r}")  # fmt: skip
        if isinstance(self.prompt_len, int) and isinstance(self.new, int) \
                and self.prompt_len + self.new - 1 > family.context:  # fmt: skip
            bad.append(f"prompt_len + new - 1 = {self.prompt_len + self.new - 1} exceeds the "
                       f"family's context of {family.context} tokens")  # fmt: skip
        if "gammas" in used and isinstance(self.new, int) and self.new < 2:
            bad.append("speculative schemes need new >= 2 (a round drafts at most new - 1)")
        if "gammas" in used and not bad and max(self.gammas) + 2 > family.context:
            bad.append(f"gamma + 2 must fit the context of {family.context} tokens")
        if not isinstance(self.temperature, int | float) or not self.temperature >= 0:
            bad.append(f"temperature must be >= 0, got {self.temperature!r}")
        if bad:
            raise ConfigError("bad lm sweep config: " + "; ".join(bad))

    def record(self) -> dict:
        """The config as JSON values (the codec by its type's name)."""
        d = asdict(replace(self, codec=None))
        d["codec"] = None if self.codec is None else type(self.codec).__name__
        return d


# --- the cost model ------------------------------------------------------------------------------
def expected_tokens_per_round(accept: float, gamma: int) -> float:
    """``tau = (1 - a^(gamma+1)) / (1 - a)``: tokens a round yields when each draft is
    accepted with probability ``a`` (``gamma + 1`` at ``a = 1``)."""
    if accept >= 1:
        return float(gamma + 1)
    return (1 - accept ** (gamma + 1)) / (1 - accept)


def predict_speculative(n: int, tau: float, gamma: int, t_draft: float, t_verify: float,
                        rtt_s: float, tx_round: float = 0.0,
                        tx_prompt: float = 0.0) -> float:  # fmt: skip
    """Tokens per second of speculative decoding by the cost model: ``n / tau`` rounds of
    ``gamma * t_draft + t_verify + rtt_s + tx_round`` (``tx_round``: the transmission of a
    round's messages), after the prompt's transmission ``tx_prompt``."""
    return n / (tx_prompt + n / tau * (gamma * t_draft + t_verify + rtt_s + tx_round))


def predict_edge(n: int, t_edge: float, rtt_s: float, tx_prompt: float = 0.0,
                 tx_token: float = 0.0) -> float:  # fmt: skip
    """Tokens per second of edge-only generation by the cost model: one round trip, the
    prompt's and the last token's transmission, and ``n`` passes of ``t_edge``."""
    return n / (rtt_s + tx_prompt + tx_token + n * t_edge)


def predicted_crossover(n: int, tau: float, gamma: int, t_draft: float, t_verify: float,
                        t_edge: float, tx_round: float = 0.0,
                        tx_token: float = 0.0) -> float | None:  # fmt: skip
    """The round-trip delay [s] at which :func:`predict_speculative` equals
    :func:`predict_edge` for ``n`` tokens (the prompt's transmission is common to both):
    ``(n t_edge + tx_token - k c) / (k - 1)`` with ``k = n / tau`` rounds of ``c = gamma
    t_draft + t_verify + tx_round``. Negative: edge only is faster at every delay; None when
    one round suffices (``k <= 1``: speculative decoding pays no more round trips). As ``n``
    grows it tends to the docs' ``tau t_edge - gamma t_draft - t_verify``."""
    k = n / tau
    if k <= 1:
        return None
    return (n * t_edge + tx_token - k * (gamma * t_draft + t_verify + tx_round)) / (k - 1)


def crossover(xs: list[float], a: list[float], b: list[float]) -> float | None:
    """The first ``x`` at which ``a - b`` changes sign (linear interpolation between grid
    points; ``xs[0]`` if they are equal there); None if it keeps one sign over ``xs``."""
    d = [p - q for p, q in zip(a, b, strict=True)]
    if d and d[0] == 0:
        return float(xs[0])
    for i in range(1, len(d)):
        if (d[i - 1] > 0) != (d[i] > 0) and d[i - 1] != d[i]:
            return xs[i - 1] + (xs[i] - xs[i - 1]) * d[i - 1] / (d[i - 1] - d[i])
    return None


# --- the sweep -----------------------------------------------------------------------------------
def _label(name: str, value) -> str:
    param = SCHEMES[name].param
    return name if param is None else f"{name} {_PARAMS[param][0]}={value:g}"


def _median_rounds(runs: list) -> object:
    """The first trace, each round's wall clocks replaced by their median over ``runs``
    (identical generations: the same tokens and rounds; otherwise the first is kept)."""
    first = runs[0]
    if len(runs) == 1 or any(r.tokens != first.tokens or len(r.rounds) != len(first.rounds)
                             for r in runs):  # fmt: skip
        return first
    first.rounds = [replace(rnd, device_seconds=statistics.median(r.rounds[i].device_seconds
                                                                  for r in runs),
                            edge_seconds=statistics.median(r.rounds[i].edge_seconds
                                                           for r in runs))
                    for i, rnd in enumerate(first.rounds)]  # fmt: skip
    return first


def _agreement(tokens: list[int], ref: list[int]) -> tuple[float, int]:
    same = [a == b for a, b in zip(tokens, ref)]
    prefix = next((i for i, s in enumerate(same) if not s), len(same))
    return sum(same) / max(1, len(ref)), prefix


def _message_bytes(vocab: int, prompt_len: int, gamma: int) -> dict[str, int]:
    enc = sp.encode_message
    return {"prompt": len(enc(sp.MSG_TOKENS, [0] * prompt_len, vocab)),
            "token": len(enc(sp.MSG_TOKENS, [0], vocab)),
            "drafts": len(enc(sp.MSG_DRAFTS, [0] * gamma, vocab)),
            "reply": len(enc(sp.MSG_REPLY, [0, 0], max(vocab, gamma + 1)))}  # fmt: skip


def run_lm_sweep(family, val: torch.Tensor, cfg: LMSweepConfig, out: str | Path | None = None,
                 progress: bool = True, vocab=None) -> dict:  # fmt: skip
    """Run the sweep of ``cfg`` on ``family`` with prompts from the validation ids ``val``.

    Returns ``{"config", "pass_seconds", "crossovers", "records", "samples", ...}``
    (``records``: one row per scheme, parameter and link, columns :data:`FIELDS`). With
    ``out``: writes ``sweep.csv``, ``sweep.json``, ``samples.txt`` (``vocab``, a
    :class:`~flowcodec.lm.data.CharVocab`, decodes them; else ids) and the plots
    ``tokens_per_s.png``, ``bytes_per_token.png``, ``quality.png``."""
    cfg.check(family)
    target = family.num_members if cfg.target is None else cfg.target
    prompts = validation_prompts(val, cfg.prompts, cfg.prompt_len)
    units = cfg.units()
    t0 = time.perf_counter()
    traces: dict[tuple, list] = {u: [] for u in units}
    bar = tqdm(total=len(units) * len(prompts) * cfg.repeats, desc="generate",
               disable=not progress)  # fmt: skip
    for i, (_, prompt) in enumerate(prompts):
        bar.set_postfix_str(f"prompt {i + 1}/{len(prompts)}")
        runs: dict[tuple, list] = {u: [] for u in units}
        # every unit in turn, repeats interleaved: a machine whose load drifts (another
        # job) weighs on every scheme alike
        for _ in range(cfg.repeats):
            for name, value in units:
                runs[(name, value)].append(SCHEMES[name].run(family, prompt, cfg.new, value, cfg))
                bar.update()
        for u in units:
            traces[u].append(_median_rounds(runs[u]))
    bar.close()
    gen_seconds = time.perf_counter() - t0
    # quality: teacher-forced loss (threshold 0 never asks: member draft's and target's loss)
    base = sp.gated_loss(family, val, draft=cfg.draft, target=target, threshold=0.0,
                         max_windows=cfg.loss_windows)  # fmt: skip
    gated = {t: sp.gated_loss(family, val, draft=cfg.draft, target=target, threshold=t,
                              max_windows=cfg.loss_windows)
             for name, t in units if SCHEMES[name].param == "thresholds"}  # fmt: skip
    # the cost model's inputs: from the generations' rounds, and (for reference) isolated
    # pass times re-measured with pass_times (medians) with a cache of a typical length
    model = cost_model_inputs(traces)
    gammas = sorted(model["gammas"])
    positions = tuple(sorted({1} | {g + 1 for g in gammas}))
    cached = max(1, min(cfg.prompt_len + cfg.new // 2, family.context - max(positions)))
    t_draft = sp.pass_times(family, cfg.draft, (1,), cached=cached)[1]
    t_target = sp.pass_times(family, target, positions, cached=cached)
    isolated = {"t_edge": t_target[1], "gammas": {g: {
        **m, "t_draft": t_draft, "t_verify": t_target[g + 1]} for g, m in model["gammas"].items()}}
    ref = traces[("edge", None)]
    records = []
    for link in cfg.links():
        for name, value in units:
            records.append(_row(cfg, family.vocab, link, name, value, traces[(name, value)],
                                ref, base, gated, model))  # fmt: skip
    crossovers = _crossovers(cfg, records, model, isolated, family.vocab)
    decode = vocab.decode if vocab is not None else (lambda ids: " ".join(map(str, ids)))
    samples = {"prompt_offset": prompts[0][0], "prompt": decode(prompts[0][1]),
               "outputs": {_label(n, v): decode(traces[(n, v)][0].tokens) for n, v in units}}
    result = {"config": cfg.record(), "threads": torch.get_num_threads(),
              "generation_seconds": round(gen_seconds, 2),
              "prompt_offsets": [s for s, _ in prompts],
              "model": model,
              "pass_seconds": {"cached": cached, f"member_{cfg.draft}": {1: t_draft},
                               f"member_{target}": t_target},
              "teacher_forced": {"draft_loss": base["draft_loss"],
                                 "target_loss": base["target_loss"],
                                 "gated": {str(t): g for t, g in gated.items()}},
              "crossovers": crossovers, "records": records, "samples": samples}  # fmt: skip
    if out is not None:
        write_sweep(result, Path(out))
    return result


def _acceptance(rounds: list) -> float:
    """The chance that a draft the edge examines is accepted: drafts are examined in order
    up to the first rejection, so ``accepted / (accepted + rounds with a rejection)`` (the
    drafts after a rejection were never examined; counting them would bias it down)."""
    accepted = sum(r.accepted for r in rounds)
    rejected = sum(r.accepted < r.drafted for r in rounds)
    return accepted / max(1, accepted + rejected)


def cost_model_inputs(traces: dict) -> dict:
    """The cost model's inputs from the generations: ``t_edge``, the mean edge wall clock
    of an edge-only round after the first (one token, KV cache); per gamma ``t_draft`` (the
    mean device wall clock per drafted token), ``t_verify`` (the mean edge wall clock of a
    verification round) over the rounds that drafted ``gamma`` after the first (the first
    also reads the prompt), ``acceptance`` and ``tau``, and the measured
    ``tokens_per_round``. Means, not medians: a session's time is their sum, the occasional
    slow pass of a loaded machine included."""
    def steady(rounds, keep):
        later = [r for t in rounds for r in t.rounds[1:] if keep(r)]
        return later or [r for t in rounds for r in t.rounds if keep(r)]

    edge = steady(traces[("edge", None)], lambda r: True)
    out = {"source": "means over the generations' rounds (the first round of each prompt, "
                     "which reads the prompt, left out)",
           "t_edge": statistics.fmean(r.edge_seconds for r in edge), "gammas": {}}  # fmt: skip
    for (name, g), runs in traces.items():
        if name != "speculative":
            continue
        rounds = steady(runs, lambda r, g=g: r.drafted == g) or steady(runs, lambda r: r.drafted)
        a = _acceptance([r for t in runs for r in t.rounds])
        out["gammas"][g] = {
            "t_draft": statistics.fmean(r.device_seconds / r.drafted for r in rounds),
            "t_verify": statistics.fmean(r.edge_seconds for r in rounds),
            "acceptance": a, "tau": expected_tokens_per_round(a, g),
            "tokens_per_round": sum(len(t.tokens) for t in runs)
            / sum(len(t.rounds) for t in runs)}  # fmt: skip
    return out


def _row(cfg, vocab, link, name, value, traces, ref, base, gated, model) -> dict:
    """One record: ``traces`` (one per prompt) replayed on ``link``."""
    param = SCHEMES[name].param
    n_tok = sum(len(t.tokens) for t in traces)
    lines = [session_timeline(t, Duplex(link, stream=i)) for i, t in enumerate(traces)]
    secs = sum(tl.seconds for tl in lines)
    agree = [_agreement(t.tokens, r.tokens) for t, r in zip(traces, ref, strict=True)]
    up, down = sum(t.total_up for t in traces), sum(t.total_down for t in traces)
    row = {"label": _label(name, value), "scheme": name,
           "gamma": value if param == "gammas" else "",
           "threshold": value if param == "thresholds" else "",
           "rtt_ms": link.rtt_ms, "up_kbps": link.up_kbps, "down_kbps": link.down,
           "loss": link.loss, "mcs": "" if link.mcs is None else link.mcs,
           "snr_db": "" if link.snr_db is None else link.snr_db,
           "tokens_per_s": n_tok / secs if secs > 0 else math.inf,
           "predicted_tokens_per_s": "",
           "ms_per_token": 1e3 * secs / n_tok,
           "bytes_up_per_token": up / n_tok, "bytes_down_per_token": down / n_tok,
           "bytes_per_token": (up + down) / n_tok,
           "bytes_sent_per_token": sum(tl.up_bytes + tl.down_bytes for tl in lines) / n_tok,
           "codec_bytes_per_token": sum(getattr(r, "codec_bytes", 0) for t in traces
                                        for r in t.rounds) / n_tok,
           "retransmissions_per_token": sum(tl.retransmissions for tl in lines) / n_tok,
           "round_trips_per_token": sum(t.round_trips for t in traces) / n_tok,
           "edge_passes_per_token": sum(t.edge_passes for t in traces) / n_tok,
           "device_passes_per_token": sum(t.device_passes for t in traces) / n_tok,
           "edge_token_fraction": sum(t.source.count("edge") for t in traces) / n_tok,
           "acceptance": "", "tokens_per_round": n_tok / sum(len(t.rounds) for t in traces),
           "agreement": sum(a for a, _ in agree) / len(agree),
           "identical_prefix": sum(p for _, p in agree) / len(agree),
           "identical_outputs": sum(t.tokens == r.tokens for t, r in zip(traces, ref))
           / len(traces),
           "val_loss_nats": "", "val_edge_fraction": "",
           "device_ms_per_token": 1e3 * sum(tl.device_seconds for tl in lines) / n_tok,
           "edge_ms_per_token": 1e3 * sum(tl.edge_seconds for tl in lines) / n_tok,
           "min_margin": min(t.min_margin for t in traces),
           "prompts": len(traces), "tokens": n_tok}  # fmt: skip
    if name == "device":
        row.update(val_loss_nats=base["draft_loss"], val_edge_fraction=0.0)
    elif name in ("edge", "speculative"):
        row.update(val_loss_nats=base["target_loss"], val_edge_fraction=1.0)
    elif name == "gated":
        row.update(val_loss_nats=gated[value]["loss"],
                   val_edge_fraction=gated[value]["edge_fraction"])  # fmt: skip
    lossless = link.loss == 0 and link.mcs is None
    n = cfg.new
    msg = _message_bytes(vocab, cfg.prompt_len, value if name == "speculative" else 1)
    tx_up, tx_down = (lambda b: 8 * b / (link.up_kbps * 1e3)), (lambda b: 8 * b / (link.down * 1e3))
    if param == "gammas":
        row["acceptance"] = _acceptance([r for t in traces for r in t.rounds])
    if name == "speculative":
        m = model["gammas"][value]
        if lossless:
            row["predicted_tokens_per_s"] = predict_speculative(
                n, m["tau"], value, m["t_draft"], m["t_verify"], link.rtt_ms / 1e3,
                tx_up(msg["drafts"]) + tx_down(msg["reply"]), tx_up(msg["prompt"]))
    elif name == "edge" and lossless:
        row["predicted_tokens_per_s"] = predict_edge(n, model["t_edge"], link.rtt_ms / 1e3,
                                                     tx_up(msg["prompt"]), tx_down(msg["token"]))
    return row


def _crossovers(cfg, records, model, isolated, vocab) -> list[dict]:
    """Per link family (rate, loss) and gamma: the RTT at which speculative decoding stops
    beating edge only, measured (from the rows) and predicted by the cost model with the
    pass times of the generations' rounds (``predicted_rtt_ms``; ``..._long_run``: the
    docs' formula, n large) and with the isolated pass times (``..._pass_times``)."""
    out = []
    families = sorted({(r["up_kbps"], r["down_kbps"], r["loss"]) for r in records})
    for up, down, loss in families:
        rows = [r for r in records if (r["up_kbps"], r["down_kbps"], r["loss"]) == (up, down, loss)]
        edge = sorted((r["rtt_ms"], r["tokens_per_s"]) for r in rows if r["scheme"] == "edge")
        xs = [x for x, _ in edge]
        for g in sorted(model["gammas"]):
            spec = sorted((r["rtt_ms"], r["tokens_per_s"]) for r in rows
                          if r["scheme"] == "speculative" and r["gamma"] == g)  # fmt: skip
            msg = _message_bytes(vocab, cfg.prompt_len, g)
            tx_round = 8 * msg["drafts"] / (up * 1e3) + 8 * msg["reply"] / (down * 1e3)
            pred = {}
            for key, inputs in (("", model), ("_pass_times", isolated)):
                m, t_e = inputs["gammas"][g], inputs["t_edge"]
                r = predicted_crossover(cfg.new, m["tau"], g, m["t_draft"], m["t_verify"], t_e,
                                        tx_round, 8 * msg["token"] / (down * 1e3))  # fmt: skip
                pred[key] = None if r is None else 1e3 * r
            m = model["gammas"][g]
            out.append({"gamma": g, "up_kbps": up, "down_kbps": down, "loss": loss,
                        "acceptance": m["acceptance"], "tau_model": m["tau"],
                        "tokens_per_round_measured": m["tokens_per_round"],
                        "predicted_rtt_ms": pred[""],
                        "predicted_rtt_ms_long_run": 1e3 * (m["tau"] * model["t_edge"]
                                                            - g * m["t_draft"] - m["t_verify"]),
                        "predicted_rtt_ms_pass_times": pred["_pass_times"],
                        "measured_rtt_ms": crossover(xs, [s for _, s in spec],
                                                     [e for _, e in edge]),
                        "faster_at_first_rtt": spec[0][1] > edge[0][1],
                        "rtts_ms": xs})  # fmt: skip
    return out
