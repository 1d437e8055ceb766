"""Collaborative generation: speculative decoding is exact (greedy token for token, sampled
in distribution), gating's limits, byte accounting, the wire messages and named errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from flowcodec.errors import ConfigError
from flowcodec.family import build_family
from flowcodec.family.lm import LanguageFamily
from flowcodec.lm.speculative import (
    MSG_TOKENS,
    decode_message,
    encode_message,
    gated_loss,
    generate_device,
    generate_edge,
    generate_gated,
    generate_speculative,
    pass_times,
)


def sharp(chars: str | None = None, seed: int = 0, scale: float = 25.0, ctx: int = 40):
    """A tiny random family whose exits give peaked, different distributions (random
    initial heads are nearly uniform, which would make every member agree)."""
    torch.manual_seed(seed)
    kw = {"chars": chars} if chars else {}
    f = build_family("shakespeare-char", dim=32, heads=2, depths=(1, 1, 1), context=ctx, **kw)
    with torch.no_grad():
        for ex in f.exits:
            ex.head.weight.mul_(scale)
    return f.eval()


@pytest.fixture(scope="module")
def fam() -> LanguageFamily:
    return sharp()


PROMPTS = [[5], [20, 40, 1, 0, 33], list(range(10, 22))]


@pytest.mark.parametrize("gamma", [1, 3, 7])
def test_greedy_speculative_equals_the_large_member_token_for_token(fam, gamma):
    for prompt in PROMPTS:
        ref = generate_edge(fam, prompt, 20)
        spec = generate_speculative(fam, prompt, 20, draft=1, gamma=gamma)
        assert spec.tokens == ref.tokens
        assert len(spec.source) == 20 and spec.source.count("edge") == spec.round_trips
        assert spec.edge_passes == spec.round_trips == len(spec.rounds) <= 20
        assert sum(r.accepted for r in spec.rounds) == spec.source.count("device")
        assert spec.total_up == sum(r.up_bytes for r in spec.rounds)
        assert spec.total_down == sum(r.down_bytes for r in spec.rounds)
        assert spec.min_margin > 0


def test_greedy_speculative_between_other_members(fam):
    prompt = PROMPTS[1]
    assert (generate_speculative(fam, prompt, 20, draft=2, target=3, gamma=3).tokens
            == generate_edge(fam, prompt, 20, member=3).tokens)  # fmt: skip
    assert (generate_speculative(fam, prompt, 20, draft=1, target=2, gamma=3).tokens
            == generate_edge(fam, prompt, 20, member=2).tokens)  # fmt: skip


def test_a_draft_that_agrees_is_accepted_whole():
    f = sharp()
    with torch.no_grad():  # make exit 1 a copy of exit 3 on a trunk whose blocks 2, 3 are no-ops
        for s in f.stages[1:]:
            for b in s.blocks:
                b.proj.weight.zero_(), b.proj.bias.zero_()
                b.mlp[2].weight.zero_(), b.mlp[2].bias.zero_()
        f.exits[0].load_state_dict(f.exits[2].state_dict())
    spec = generate_speculative(f, [3, 4], 21, gamma=4)
    assert spec.tokens == generate_edge(f, [3, 4], 21).tokens
    assert spec.round_trips == 5 and spec.tokens_per_edge_pass == pytest.approx(21 / 5)
    assert all(r.accepted == r.drafted for r in spec.rounds)


def test_byte_accounting_of_each_scheme(fam):
    prompt, n = PROMPTS[2], 16
    dev = generate_device(fam, prompt, n)
    assert dev.total_up == dev.total_down == dev.round_trips == 0
    assert set(dev.source) == {"device"} and dev.edge_passes == 0
    edge = generate_edge(fam, prompt, n)
    assert edge.round_trips == 1 and edge.total_up == 2 + len(prompt)  # kind, count, ids
    assert edge.total_down == 3 * n and set(edge.source) == {"edge"}
    spec = generate_speculative(fam, prompt, n, gamma=4)
    first = spec.rounds[0]
    assert first.up_bytes == (2 + len(prompt)) + (2 + first.drafted)
    assert all(r.up_bytes == 2 + r.drafted and r.down_bytes == 4 for r in spec.rounds[1:])
    assert len(spec.up_bytes) == len(spec.down_bytes) == n


def test_gating_limits(fam):
    prompt, n = PROMPTS[1], 15
    never = generate_gated(fam, prompt, n, threshold=0.0)
    assert never.tokens == generate_device(fam, prompt, n).tokens and never.round_trips == 0
    always = generate_gated(fam, prompt, n, threshold=1.0)
    assert always.tokens == generate_edge(fam, prompt, n).tokens
    assert always.edge_fraction == 1.0 and always.round_trips == n
    # the edge is sent only what it has not seen: the prompt once, then nothing new
    assert always.rounds[0].up_bytes == 2 + len(prompt)
    assert all(r.up_bytes == 2 for r in always.rounds[1:])
    some = generate_gated(fam, prompt, n, threshold=0.9)
    assert 0 <= some.edge_fraction <= 1 and some.round_trips == some.source.count("edge")


def test_gated_loss_limits(fam):
    text = torch.randint(0, 65, (400,), generator=torch.Generator().manual_seed(0))
    lo = gated_loss(fam, text, threshold=0.0)
    hi = gated_loss(fam, text, threshold=1.0)
    assert lo["edge_fraction"] == 0 and lo["loss"] == pytest.approx(lo["draft_loss"])
    assert hi["edge_fraction"] == 1 and hi["loss"] == pytest.approx(hi["target_loss"])


def _target_joint(f: LanguageFamily, prompt: list[int], temperature: float) -> torch.Tensor:
    """The large member's probabilities of the first two sampled tokens, (V, V)."""
    m = f.member(f.num_members)
    v = f.vocab
    with torch.no_grad():
        p1 = torch.softmax(m(torch.tensor([prompt]))[0, -1].double() / temperature, -1)
        seqs = torch.tensor([prompt + [a] for a in range(v)])
        p2 = torch.softmax(m(seqs)[:, -1].double() / temperature, -1)
    return p1.unsqueeze(1) * p2


def _counts(traces, v: int) -> torch.Tensor:
    c = torch.zeros(v * v)
    for t in traces:
        c[t.tokens[0] * v + t.tokens[1]] += 1
    return c


def test_sampled_speculative_is_distributed_as_the_large_member():
    f = sharp(chars="abcd", seed=3, scale=40.0)
    prompt, temp, runs = [0, 2, 1], 0.8, 1500
    want = _target_joint(f, prompt, temp).flatten()
    spec = [generate_speculative(f, prompt, 3, gamma=2, temperature=temp, seed=s)
            for s in range(runs)]  # fmt: skip
    got = _counts(spec, 4)
    assert any(r.accepted < r.drafted for t in spec for r in t.rounds)  # rejections happened
    assert any(t.source[:2] == ["device", "device"] for t in spec)  # and acceptances
    keep = want * runs >= 5  # chi-square needs expected counts of about 5 or more

    def cells(c: torch.Tensor) -> torch.Tensor:  # rare cells pooled into one
        c = c.double()
        return torch.cat([c[keep], c[~keep].sum(0, keepdim=True)]) if (~keep).any() else c[keep]

    exp = cells(want * runs)
    assert chisquare(cells(got).numpy(), exp.numpy()).pvalue > 1e-3
    # the test has power: the draft member's own samples fail it
    draft = _counts([generate_device(f, prompt, 2, member=1, temperature=temp, seed=s)
                     for s in range(runs)], 4)  # fmt: skip
    assert chisquare(cells(draft).numpy(), exp.numpy()).pvalue < 1e-6
    tv = 0.5 * (got / runs - want).abs().sum()
    assert tv < 0.06


def test_same_seed_same_sample(fam):
    a = generate_speculative(fam, PROMPTS[1], 12, temperature=1.0, seed=7)
    b = generate_speculative(fam, PROMPTS[1], 12, temperature=1.0, seed=7)
    assert a.tokens == b.tokens and a.source == b.source


def test_bad_inputs_are_named_config_errors(fam):
    calls = [
        lambda: generate_speculative(fam, [], 5),
        lambda: generate_speculative(fam, [65], 5),
        lambda: generate_speculative(fam, [-1], 5),
        lambda: generate_speculative(fam, torch.zeros(3), 5),
        lambda: generate_speculative(fam, [1], 5, gamma=0),
        lambda: generate_speculative(fam, [1], 5, gamma=1.5),
        lambda: generate_speculative(fam, [1], 5, draft=3, target=3),
        lambda: generate_speculative(fam, [1], 5, draft=0),
        lambda: generate_speculative(fam, [1], 5, target=4),
        lambda: generate_speculative(fam, [1], 0),
        lambda: generate_speculative(fam, [1] * 30, 12),  # over the context of 40
        lambda: generate_speculative(fam, [1], 5, temperature=-1.0),
        lambda: generate_edge(fam, [1], 5, member=4),
        lambda: generate_device(fam, [1], 5, member=0),
        lambda: generate_gated(fam, [1], 5, threshold=1.5),
        lambda: gated_loss(fam, torch.zeros(10, dtype=torch.long)),
    ]
    for i, call in enumerate(calls):
        with pytest.raises(ConfigError):
            call()
            pytest.fail(f"call {i} did not raise")


@settings(max_examples=60, deadline=None)
@given(vals=st.lists(st.integers(0, 64), max_size=300))
def test_messages_round_trip(vals):
    msg = encode_message(MSG_TOKENS, vals, 65)
    assert len(msg) == 1 + (1 if len(vals) < 128 else 2) + len(vals)
    assert decode_message(msg, 65) == (MSG_TOKENS, vals)


def test_malformed_messages_are_refused():
    good = encode_message(MSG_TOKENS, [1, 2, 3], 65)
    for bad in [b"", good[:1], good[:-1], good + b"\0", bytes([MSG_TOKENS, 0x80]),
                bytes([MSG_TOKENS, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F])]:  # fmt: skip
        with pytest.raises(ConfigError):
            decode_message(bad, 65)
    with pytest.raises(ConfigError):
        encode_message(MSG_TOKENS, [256], 65)
    wide = encode_message(MSG_TOKENS, [300, 1], 1000)
    assert len(wide) == 6 and decode_message(wide, 1000) == (MSG_TOKENS, [300, 1])


def test_pass_times_are_measured(fam):
    t = pass_times(fam, 3, positions=(1, 5), cached=8, repeats=3)
    assert set(t) == {1, 5} and all(v > 0 for v in t.values())
    with pytest.raises(ConfigError):
        pass_times(fam, 3, positions=(1, 50), cached=8)


def test_generation_leaves_the_family_modes_as_they_were():
    f = sharp().train()
    f.exits[0].eval()
    before = [m.training for m in f.modules()]
    generate_speculative(f, [1, 2], 6)
    generate_gated(f, [1, 2], 4, threshold=0.9)
    assert [m.training for m in f.modules()] == before
    assert all(p.requires_grad for p in f.parameters())
