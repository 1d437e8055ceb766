"""Collaborative generation between a small member on the device and a large one at the edge.

Four schemes, each returning a :class:`GenerationTrace` (the tokens, which party produced
each, the bytes of every message each way, round trips, passes, and the wall-clock of each
party's passes measured on this machine):

- :func:`generate_device`: the device's member alone (no link).
- :func:`generate_edge`: the prompt goes up once, the edge's member generates and streams
  every token down in its own message (one round trip).
- :func:`generate_speculative`: exact speculative decoding. Per round the device drafts
  ``gamma`` tokens with its exit and sends them up; the edge runs the large member once over
  them (with its KV cache) and returns the number accepted and one token of its own (a
  correction, or a bonus token when every draft was accepted). Greedy (``temperature=0``)
  output is the large member's greedy output token for token; sampled output is distributed
  as the large member's (accept draft ``d`` with probability ``min(1, p(d)/q(d))``, else
  sample the normalised residual ``max(p - q, 0)``). The edge needs the draft distribution
  ``q``: it takes it from the draft exit on its own copy of the shared trunk (the large
  member computes those hidden states anyway), so only token ids go up.
- :func:`generate_speculative_codec`: the same with the draft's hidden states at a split
  point sent through a :class:`~flowcodec.lm.codec.HiddenStateCodec`, so the edge runs only
  the large member's remaining blocks (not exact: the edge decides on decoded states).
- :func:`generate_gated`: the device generates and asks the edge for a token only when its
  exit's top probability is below ``threshold`` (not exact; :func:`gated_loss` measures its
  quality against the large member's).

Messages are real bytes (:func:`encode_message`): one kind byte, a LEB128 count, then the
token ids (one byte each for vocabularies up to 256 symbols, else two); a verification reply
is the accepted count and one token. Rate is what these messages measure, headers included.

Exactness and rounding: the verification pass processes several positions at once while
:func:`generate_edge` processes one at a time, so their float32 logits can differ in the last
bits; a greedy decision can flip only where the top two logits are that close. Each trace
records the smallest top-two gap the edge decided on (``min_margin``); running the family in
float64 (``family.double()``) makes such a flip practically impossible.

Batch size is one sequence (what crosses the link is per sample).

Example
-------
>>> import torch
>>> from flowcodec.family import build_family
>>> fam = build_family("shakespeare-char", dim=32, heads=2, depths=(1, 1, 1), context=32).eval()
>>> prompt = [1, 2, 3]
>>> ref = generate_edge(fam, prompt, 12, member=3)
>>> spec = generate_speculative(fam, prompt, 12, draft=1, target=3, gamma=4)
>>> spec.tokens == ref.tokens
True
"""

from __future__ import annotations

import functools
import math
import time

import torch
import torch.nn.functional as F

from flowcodec.bitstream import Bitstream, BitstreamError, Header
from flowcodec.errors import ConfigError
from flowcodec.family.lm import KVCache, LanguageFamily
from flowcodec.lm.data import eval_windows
from flowcodec.lm.messages import (
    MSG_DRAFTS,
    MSG_REPLY,
    MSG_TOKENS,
    GenerationTrace,
    Round,
    decode_message,  # fmt: skip
    encode_message,
)

__all__ = ["GenerationTrace", "Round", "encode_message", "decode_message", "generate_device",
           "generate_edge", "generate_speculative", "generate_speculative_codec", "generate_gated",
           "gated_loss", "pass_times",
           "MSG_TOKENS", "MSG_REPLY", "MSG_DRAFTS"]  # fmt: skip

def _check(family: LanguageFamily, prompt, n: int, members: dict[str, int]) -> list[int]:
    if not isinstance(family, LanguageFamily):
        raise ConfigError(f"generation needs a LanguageFamily, got {type(family).__name__}")
    for name, k in members.items():
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= family.num_members:
            raise ConfigError(f"{name} must be a member in 1..{family.num_members}, got {k!r}")
    if isinstance(prompt, torch.Tensor):
        if prompt.ndim != 1 or prompt.dtype not in (torch.int64, torch.int32):
            raise ConfigError(f"prompt must be 1-D int ids, got {prompt.dtype} "
                              f"{tuple(prompt.shape)}")  # fmt: skip
        prompt = prompt.tolist()
    prompt = list(prompt)
    if not prompt:
        raise ConfigError("the prompt is empty: give at least one token")
    if any(not isinstance(t, int) or not 0 <= t < family.vocab for t in prompt):
        raise ConfigError(f"prompt ids must be ints in 0..{family.vocab - 1}")
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"the number of new tokens must be an int >= 1, got {n!r}")
    if len(prompt) + n - 1 > family.context:
        over = len(prompt) + n - 1 - family.context
        raise ConfigError(f"prompt ({len(prompt)}) + new tokens ({n}) exceed the context of "
                          f"{family.context} tokens by {over}")  # fmt: skip
    return prompt


def _check_sampling(temperature: float) -> None:
    if not isinstance(temperature, int | float) or not temperature >= 0 or math.isinf(temperature):
        raise ConfigError(f"temperature must be a finite number >= 0, got {temperature!r}")


def _probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """float64 probabilities (one-hot on the argmax at temperature 0)."""
    if temperature == 0:
        return F.one_hot(logits.argmax(-1), logits.shape[-1]).double()
    return torch.softmax(logits.double() / temperature, -1)


def _pick(probs: torch.Tensor, gen: torch.Generator) -> int:
    return int(torch.multinomial(probs, 1, generator=gen))


def _margin(logits: torch.Tensor) -> float:
    top = logits.double().topk(2).values
    return float(top[0] - top[1])


def _edge_read(ups: list[bytes], vocab: int, edge_text: list[int]) -> list[int]:
    """The edge reads a round's messages: a prompt or streamed tokens extend ``edge_text``
    (in place); returns the drafts to verify."""
    got: list[int] = []
    for msg in ups:
        kind, vals = decode_message(msg, vocab)
        if kind == MSG_TOKENS:
            edge_text += vals
        else:
            got = vals
    return got


def _edge_reply(rows, draft_exit, states, got: list[int], temperature: float,
                gen: torch.Generator, trace, edge_text: list[int], edge_cache,
                reply_vocab: int) -> tuple[bytes, int]:  # fmt: skip
    """The edge's side of a round after its pass: :func:`_verify` the drafts, extend
    ``edge_text`` (in place) with the accepted ones and the edge's token, keep in the cache
    all but that token, and encode the reply. Returns ``(reply message, cached length)``."""
    trace.edge_passes += 1
    accepted, token = _verify(rows, draft_exit, states, got, temperature, gen, trace)
    edge_text += got[:accepted] + [token]
    edge_len = len(edge_text) - 1  # all but the new token is cached
    edge_cache.truncate(edge_len)
    return encode_message(MSG_REPLY, [accepted, token], reply_vocab), edge_len


def _device_accept(down: bytes, reply_vocab: int, dev_cache, cached: int,
                   committed: list[int], drafts: list[int], rnd, trace) -> int:  # fmt: skip
    """The device's side of a round: decode the edge's reply, keep the accepted drafts in its
    cache (at most ``cached`` positions, what every drafting layer holds), extend
    ``committed`` (in place) and commit the round to the trace. Returns the positions the
    device's cache keeps."""
    _, (acc, tok) = decode_message(down, reply_vocab)
    dev_len = min(cached, len(committed) + acc)
    dev_cache.truncate(dev_len)
    committed += drafts[:acc] + [tok]
    rnd.accepted = acc
    trace.round_trips += 1
    trace._commit(drafts[:acc] + [tok], ["device"] * acc + ["edge"], rnd)
    return dev_len


def _verify(rows: torch.Tensor, draft_exit, states: torch.Tensor, got: list[int],
            temperature: float, gen: torch.Generator, trace) -> tuple[int, int]:
    """The edge's decision on the drafts ``got``: ``(accepted, token)``.

    ``rows``: the large member's logits at the drafts' positions and one more;
    ``draft_exit(states)``: the draft exit's logits (computed only when sampling). Greedy:
    drafts are kept while they equal the argmax, and the argmax follows (the trace keeps the
    smallest top-two gap decided on). Sampled: draft ``d`` is kept with probability
    ``min(1, p(d) / q(d))``; on a rejection the token is drawn from the normalised residual
    ``max(p - q, 0)``, after ``len(got)`` kept drafts from ``p`` itself."""
    p = _probs(rows, temperature)
    accepted, token = len(got), None
    if temperature:
        q = _probs(draft_exit(states)[0, -(len(got) + 1) :].cpu(), temperature)
        for i, d in enumerate(got):
            u = float(torch.rand((), generator=gen, dtype=torch.float64))
            if u * q[i, d] >= p[i, d]:  # reject: u >= p(d) / q(d)
                resid = (p[i] - q[i]).clamp_min(0)
                token = _pick(resid / resid.sum() if resid.sum() > 0 else p[i], gen)
                accepted = i
                break
        if token is None:
            token = _pick(p[len(got)], gen)
    else:
        for i, d in enumerate(got):
            if int(p[i].argmax()) != d:
                accepted = i
                break
        token = int(p[accepted].argmax())
        trace.min_margin = min([trace.min_margin] + [_margin(r) for r in rows[: accepted + 1]])
    return accepted, token


def _ids(seq: list[int], device) -> torch.Tensor:
    return torch.tensor([seq], dtype=torch.long, device=device)


def _device(family) -> torch.device:
    return next(family.parameters()).device


def _keeps_modes(fn):
    """Run ``fn`` with the family in eval mode and no autograd, then give every module its
    own mode back (a caller's family in training mode stays so)."""

    @functools.wraps(fn)
    def run(family, *args, **kwargs):
        modes = [(m, m.training) for m in family.modules()] if hasattr(family, "modules") else []
        try:
            with torch.no_grad():
                return fn(family.eval() if modes else family, *args, **kwargs)
        finally:
            for m, t in modes:
                m.training = t

    return run


@_keeps_modes
def generate_device(family: LanguageFamily, prompt, n: int, member: int = 1,
                    temperature: float = 0.0, seed: int = 0) -> GenerationTrace:  # fmt: skip
    """The device's member generates ``n`` tokens alone (no bytes, no round trips)."""
    prompt = _check(family, prompt, n, {"member": member})
    _check_sampling(temperature)
    return _local(family, prompt, n, member, temperature, seed, "device")


def _local(family, prompt, n, member, temperature, seed, who) -> GenerationTrace:
    m, cache, dev = family.member(member).eval(), KVCache(), _device(family)
    gen = torch.Generator().manual_seed(seed)
    trace = GenerationTrace(who, prompt)
    pending = prompt
    for _ in range(n):
        t0 = time.perf_counter()
        logits = m(_ids(pending, dev), cache)[0, -1].cpu()
        tok = _pick(_probs(logits, temperature), gen)
        rnd = Round(device_seconds=time.perf_counter() - t0)
        if who == "edge":
            rnd.edge_seconds, rnd.device_seconds = rnd.device_seconds, 0.0
            if temperature == 0:
                trace.min_margin = min(trace.min_margin, _margin(logits))
        setattr(trace, f"{who}_passes", getattr(trace, f"{who}_passes") + 1)
        trace._commit([tok], [who], rnd)
        pending = [tok]
    return trace


@_keeps_modes
def generate_edge(family: LanguageFamily, prompt, n: int, member: int | None = None,
                  temperature: float = 0.0, seed: int = 0) -> GenerationTrace:  # fmt: skip
    """The prompt goes up in one message; the edge's member (default: the largest)
    generates ``n`` tokens and streams each down in its own message (one round trip)."""
    member = family.num_members if member is None else member
    prompt = _check(family, prompt, n, {"member": member})
    _check_sampling(temperature)
    up = encode_message(MSG_TOKENS, prompt, family.vocab)
    _, received = decode_message(up, family.vocab)
    trace = _local(family, received, n, member, temperature, seed, "edge")
    trace.prompt = prompt
    for i, rnd in enumerate(trace.rounds):
        rnd.down_bytes = len(encode_message(MSG_TOKENS, [trace.tokens[i]], family.vocab))
        trace.down_bytes[i] = rnd.down_bytes
    trace.rounds[0].up_bytes = trace.up_bytes[0] = len(up)
    trace.round_trips = 1
    return trace


@_keeps_modes
def generate_speculative(family: LanguageFamily, prompt, n: int, draft: int = 1,
                         target: int | None = None, gamma: int = 4, temperature: float = 0.0,
                         seed: int = 0) -> GenerationTrace:  # fmt: skip
    """Exact speculative decoding: the device drafts ``gamma`` tokens per round with member
    ``draft``; the edge verifies them with member ``target`` (default: the largest) in one
    pass. Output: the target's greedy tokens (``temperature=0``) or a sample from the
    target's distribution at ``temperature``. ``seed`` fixes both parties' generators."""
    target = family.num_members if target is None else target
    prompt = _check(family, prompt, n, {"draft": draft, "target": target})
    _check_sampling(temperature)
    if not isinstance(gamma, int) or isinstance(gamma, bool) or gamma < 1:
        raise ConfigError(f"gamma (drafted tokens per round) must be an int >= 1, got {gamma!r}")
    if draft >= target:
        raise ConfigError(f"the draft member ({draft}) must be smaller than the target ({target})")
    dev, vocab = _device(family), family.vocab
    reply_vocab = max(vocab, gamma + 1)
    drafter = family.member(draft).eval()
    # the edge runs the target as head (trunk up to the draft exit) + tail, so it reads the
    # draft exit's distribution q off its own hidden states at no extra trunk cost
    head, tail = (m.eval() for m in family.split(target, draft))
    draft_exit = family.exits[draft - 1]
    dev_gen = torch.Generator().manual_seed(seed)
    edge_gen = torch.Generator().manual_seed(seed + 0x9E3779B9)
    dev_cache, edge_cache = KVCache(), KVCache()
    committed, dev_len = list(prompt), 0  # the device's text and cached positions
    edge_text, edge_len = [], 0  # the edge's copy, built only from messages
    trace = GenerationTrace("speculative", prompt)
    while len(trace.tokens) < n:
        g = min(gamma, n - len(trace.tokens) - 1)
        rnd = Round(drafted=g)
        # device: draft g tokens with its exit
        t0 = time.perf_counter()
        drafts: list[int] = []
        if g:
            logits = drafter(_ids(committed[dev_len:], dev), dev_cache)[0, -1].cpu()
            dev_len = len(committed)
            trace.device_passes += 1
            for i in range(g):
                q = _probs(logits, temperature)
                drafts.append(_pick(q, dev_gen) if temperature else int(q.argmax()))
                if i < g - 1:
                    logits = drafter(_ids(drafts[-1:], dev), dev_cache)[0, -1].cpu()
                    trace.device_passes += 1
        rnd.device_seconds = time.perf_counter() - t0
        ups = [encode_message(MSG_TOKENS, prompt, vocab)] if not trace.rounds else []
        ups.append(encode_message(MSG_DRAFTS, drafts, vocab))
        # edge: one pass of the target over what it has not cached plus the drafts
        t0 = time.perf_counter()
        got = _edge_read(ups, vocab, edge_text)
        h = head(_ids(edge_text[edge_len:] + got, dev), edge_cache)
        rows = tail(h, edge_cache)[0, -(len(got) + 1) :].cpu()
        down, edge_len = _edge_reply(rows, draft_exit, h, got, temperature, edge_gen, trace,
                                     edge_text, edge_cache, reply_vocab)  # fmt: skip
        rnd.edge_seconds = time.perf_counter() - t0
        # device: keep the accepted drafts, add the edge's token
        rnd.up_bytes, rnd.down_bytes = sum(map(len, ups)), len(down)
        dev_len = _device_accept(down, reply_vocab, dev_cache, len(dev_cache), committed,
                                 drafts, rnd, trace)  # fmt: skip
    return trace


def _cached_everywhere(cache: KVCache, layers: int) -> int:
    """Positions cached by every one of layers ``0..layers-1`` (0 if one is empty)."""
    return min((cache.length(i) for i in range(layers)), default=0)


@_keeps_modes
def generate_speculative_codec(family: LanguageFamily, prompt, n: int, codec, draft: int = 1,
                               target: int | None = None, gamma: int = 4,
                               rate: int | None = None, temperature: float = 0.0,
                               seed: int = 0) -> GenerationTrace:  # fmt: skip
    """Speculative decoding with the draft's hidden states sent through ``codec`` (a
    :class:`~flowcodec.lm.codec.HiddenStateCodec` for split point ``p = codec.point``), so
    the edge never runs the shared blocks ``1..p``.

    Per round the device drafts ``gamma`` tokens with member ``draft`` (``p <= draft``: the
    device computes the states at ``p`` anyway, plus one pass of stages ``1..p`` over the
    last draft) and sends the ids (as :func:`generate_speculative` does) and the states at
    ``p`` of every position the edge has not cached (the prompt in the first round, then
    the edge's last token and the drafts), compressed at rate point ``rate`` in the
    session framing (``Bitstream.to_compact``; the codec's header goes once, in the first
    round). The edge decodes them (ids and positions as side information), runs only
    stages ``p+1..target`` and exit ``target`` over them with its KV cache, and verifies
    as :func:`generate_speculative` does (sampled: ``q`` from the draft exit on its decoded
    states). The output is the target's greedy output on *decoded* states, so it is not
    exactly the target's: compare it with :func:`generate_edge`. ``Round.codec_bytes`` is
    the codec's share of ``up_bytes``."""
    from flowcodec.lm.codec import HiddenStateCodec

    target = family.num_members if target is None else target
    prompt = _check(family, prompt, n, {"draft": draft, "target": target})
    _check_sampling(temperature)
    if not isinstance(gamma, int) or isinstance(gamma, bool) or gamma < 1:
        raise ConfigError(f"gamma (drafted tokens per round) must be an int >= 1, got {gamma!r}")
    if draft >= target:
        raise ConfigError(f"the draft member ({draft}) must be smaller than the target ({target})")
    if not isinstance(codec, HiddenStateCodec):
        raise ConfigError(f"codec must be a HiddenStateCodec, got {type(codec).__name__}")
    point = codec.point
    if not 1 <= point <= draft:
        raise ConfigError(f"the codec's split point ({point}) must be the draft member's exit "
                          f"({draft}) or earlier, so the device computes those states anyway")
    if tuple(codec.feature_shape) != (family.context, family.dim) or (
            codec.condition and codec.vocab != family.vocab):  # fmt: skip
        raise ConfigError(f"codec for states {codec.feature_shape} (vocab {codec.vocab}) does "
                          f"not fit this family ({family.context}, {family.dim}), vocab "
                          f"{family.vocab}")  # fmt: skip
    rate = codec._rate(rate)
    codec_was = codec.training
    codec.eval()
    try:
        return _speculative_codec(family, prompt, n, codec, draft, target, gamma, rate,
                                  temperature, seed)
    finally:
        codec.train(codec_was)


def _speculative_codec(family, prompt, n, codec, draft, target, gamma, rate, temperature,
                       seed) -> GenerationTrace:  # fmt: skip
    dev, vocab, point = _device(family), family.vocab, codec.point
    reply_vocab = max(vocab, gamma + 1)
    d_head, d_rest = (m.eval() for m in family.split(draft, point))  # device: 1..p, p+1..draft
    tail = family.split(target, point)[1].eval()  # edge: stages p+1..target, exit target
    draft_exit = family.exits[draft - 1]
    draft_layers = family.blocks_upto(draft)
    dev_gen = torch.Generator().manual_seed(seed)
    edge_gen = torch.Generator().manual_seed(seed + 0x9E3779B9)
    dev_cache, edge_cache = KVCache(), KVCache()
    committed, dev_len = list(prompt), 0  # the device's text and the positions all its layers hold
    edge_has = 0  # positions the edge has cached (the device knows: all but the edge's token)
    edge_text, edge_len = [], 0  # the edge's copy, built only from messages
    header = codec.header(rate)
    session: Header | None = None  # the header as the edge received it
    seq = 0
    trace = GenerationTrace("speculative-codec", prompt)
    while len(trace.tokens) < n:
        g = min(gamma, n - len(trace.tokens) - 1)
        rnd = Round(drafted=g)
        # device: states at p of its pending tokens and drafts, drafting with its exit
        t0 = time.perf_counter()
        first = dev_len
        h = d_head(_ids(committed[dev_len:], dev), dev_cache)
        states = [h]
        drafts: list[int] = []
        if g:
            logits = d_rest(h, dev_cache)[0, -1].cpu()
            trace.device_passes += 1
            for i in range(g):
                q = _probs(logits, temperature)
                drafts.append(_pick(q, dev_gen) if temperature else int(q.argmax()))
                h = d_head(_ids(drafts[-1:], dev), dev_cache)  # the edge needs its state too
                states.append(h)
                if i < g - 1:
                    logits = d_rest(h, dev_cache)[0, -1].cpu()
                    trace.device_passes += 1
        send = torch.cat(states, 1)[:, edge_has - first :]
        sent_ids = (committed + drafts)[edge_has:]
        stream = codec.compress(send, rate=rate, ids=_ids(sent_ids, dev), start=edge_has,
                                seq=seq)[0]  # fmt: skip
        seq += 1
        rnd.device_seconds = time.perf_counter() - t0
        ups = [encode_message(MSG_TOKENS, prompt, vocab)] if not trace.rounds else []
        ups.append(encode_message(MSG_DRAFTS, drafts, vocab))
        codec_msgs = [header.to_bytes(1)] if not trace.rounds else []
        codec_msgs.append(stream.to_compact())
        # edge: decode the states, run only the remaining blocks, verify
        t0 = time.perf_counter()
        got = _edge_read(ups, vocab, edge_text)
        if session is None:
            session, _, _ = Header.parse(codec_msgs[0])
        recv = Bitstream.from_compact(codec_msgs[-1], session)
        if recv.lost:
            raise BitstreamError("a hidden-state sample failed its CRC")
        new = edge_text[edge_len:] + got
        h_hat = codec.decompress([recv], ids=_ids(new, codec._device()), start=edge_len)
        h_hat = h_hat.to(dev, next(family.parameters()).dtype)
        x, mid = h_hat, h_hat if draft == point else None
        for j, stage in enumerate(tail.stages):
            x = stage(x, edge_cache)
            if j == draft - point - 1:
                mid = x  # the states after stage `draft`: the draft exit's input
        rows = tail.exit(x)[0, -(len(got) + 1) :].cpu()
        down, edge_len = _edge_reply(rows, draft_exit, mid, got, temperature, edge_gen, trace,
                                     edge_text, edge_cache, reply_vocab)  # fmt: skip
        rnd.edge_seconds = time.perf_counter() - t0
        # device: keep the accepted drafts, add the edge's token; every layer of the drafter
        # keeps only positions all of them hold (the last draft went through stages 1..p only)
        rnd.codec_bytes = sum(map(len, codec_msgs))
        rnd.up_bytes = sum(map(len, ups)) + rnd.codec_bytes
        rnd.down_bytes = len(down)
        dev_len = _device_accept(down, reply_vocab, dev_cache,
                                 _cached_everywhere(dev_cache, draft_layers), committed, drafts,
                                 rnd, trace)  # fmt: skip
        edge_has = len(committed) - 1
    return trace


@_keeps_modes
def generate_gated(family: LanguageFamily, prompt, n: int, draft: int = 1,
                   target: int | None = None, threshold: float = 0.5,
                   temperature: float = 0.0, seed: int = 0) -> GenerationTrace:  # fmt: skip
    """The device generates with member ``draft``; when its top probability (at temperature
    1) is below ``threshold`` it sends the tokens the edge has not seen and the edge's
    member ``target`` chooses the next token (one round trip each). Not exact."""
    target = family.num_members if target is None else target
    prompt = _check(family, prompt, n, {"draft": draft, "target": target})
    _check_sampling(temperature)
    if not isinstance(threshold, int | float) or not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"threshold must be a probability in [0, 1], got {threshold!r}")
    dev, vocab = _device(family), family.vocab
    drafter, big = family.member(draft).eval(), family.member(target).eval()
    dev_gen, edge_gen = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)
    dev_cache, edge_cache = KVCache(), KVCache()
    committed, dev_len, sent = list(prompt), 0, 0  # sent: tokens the edge has
    edge_text, edge_len = [], 0  # the edge's copy, built only from messages
    trace = GenerationTrace("gated", prompt)
    while len(trace.tokens) < n:
        t0 = time.perf_counter()
        logits = drafter(_ids(committed[dev_len:], dev), dev_cache)[0, -1].cpu()
        dev_len = len(committed)
        trace.device_passes += 1
        rnd = Round(device_seconds=time.perf_counter() - t0)
        if float(torch.softmax(logits.double(), -1).max()) >= threshold:
            tok = int(logits.argmax())
            if temperature:
                tok = _pick(_probs(logits, temperature), dev_gen)
            trace._commit([tok], ["device"], rnd)
        else:
            up = encode_message(MSG_TOKENS, committed[sent:], vocab)
            t0 = time.perf_counter()
            _, got = decode_message(up, vocab)
            edge_text += got
            out = big(_ids(edge_text[edge_len:], dev), edge_cache)[0, -1].cpu()
            edge_len = len(edge_text)
            trace.edge_passes += 1
            if temperature:
                tok = _pick(_probs(out, temperature), edge_gen)
            else:
                tok = int(out.argmax())
                trace.min_margin = min(trace.min_margin, _margin(out))
            edge_text.append(tok)
            down = encode_message(MSG_TOKENS, [tok], vocab)
            rnd.edge_seconds = time.perf_counter() - t0
            rnd.up_bytes, rnd.down_bytes = len(up), len(down)
            sent = len(committed) + 1  # the edge knows its own token
            trace.round_trips += 1
            trace._commit([tok], ["edge"], rnd)
        committed.append(trace.tokens[-1])
    return trace


@torch.no_grad()
def gated_loss(family: LanguageFamily, ids: torch.Tensor, draft: int = 1,
               target: int | None = None, threshold: float = 0.5,
               context: int | None = None, max_windows: int | None = None) -> dict:  # fmt: skip
    """Teacher-forced quality of uncertainty gating on ``ids`` (e.g. the validation text):
    at each position the draft member's prediction is used when its top probability is at
    least ``threshold``, else the target's. Returns ``{"loss", "draft_loss", "target_loss",
    "edge_fraction"}`` (nats per character; windows as in ``evaluate_lm``)."""
    target = family.num_members if target is None else target
    _check(family, [0], 1, {"draft": draft, "target": target})
    if not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"threshold must be a probability in [0, 1], got {threshold!r}")
    context = context or family.context
    starts = eval_windows(ids, context, max_windows)
    was = family.training
    family.eval()
    dev = _device(family)
    tot = torch.zeros(3, dtype=torch.float64)
    asked = count = 0
    try:
        for i in range(0, len(starts), 32):
            w = ids[starts[i : i + 32].unsqueeze(1) + torch.arange(context + 1)].to(dev)
            outs = family(w[:, :-1])
            lq = torch.log_softmax(outs[draft - 1].double(), -1)
            lp = torch.log_softmax(outs[target - 1].double(), -1)
            y = w[:, 1:].unsqueeze(-1)
            nq, np_ = -lq.gather(-1, y)[..., 0], -lp.gather(-1, y)[..., 0]
            ask = lq.exp().amax(-1) < threshold
            tot += torch.stack([torch.where(ask, np_, nq).sum(), nq.sum(), np_.sum()]).cpu()
            asked += int(ask.sum())
            count += y.numel()
    finally:
        family.train(was)
    loss, dl, tl = (float(t / count) for t in tot)
    return {"loss": loss, "draft_loss": dl, "target_loss": tl, "edge_fraction": asked / count}


@_keeps_modes
def pass_times(family: LanguageFamily, member: int, positions: tuple[int, ...] = (1, 5),
               cached: int = 64, repeats: int = 21, seed: int = 0) -> dict[int, float]:  # fmt: skip
    """Measured wall-clock seconds (median of ``repeats``) of one pass of ``member`` over
    ``n`` new positions after ``cached`` positions in its KV cache, for each ``n`` in
    ``positions`` (1: one generated token; ``gamma + 1``: one verification pass)."""
    _check(family, [0] * cached, max(positions), {"member": member})
    if repeats < 1 or min(positions) < 1:
        raise ConfigError("repeats and positions must be >= 1")
    m, dev = family.member(member).eval(), _device(family)
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, family.vocab, (1, cached + max(positions)), generator=g).to(dev)
    cache = KVCache()
    m(text[:, :cached], cache)
    out = {}
    for n in positions:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            m(text[:, cached : cached + n], cache)
            times.append(time.perf_counter() - t0)
            cache.truncate(cached)
        out[n] = sorted(times)[len(times) // 2]
    return out
