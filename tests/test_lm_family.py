"""The language family: causal masking, exact splits with and without the KV cache, the
character vocabulary, named errors, the trainer's resume and float16 saving."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowcodec.errors import CheckpointError, ConfigError, DataNotFoundError
from flowcodec.family import FAMILIES, build_family
from flowcodec.family.lm import SHAKESPEARE_CHARS, KVCache, LanguageFamily
from flowcodec.lm.data import CharVocab, find_shakespeare, load_shakespeare, sample_windows
from flowcodec.lm.train import LMTrainConfig, evaluate_lm, load_lm, save_lm, train_lm

CTX = 24


def tiny(seed: int = 0, **kw) -> LanguageFamily:
    torch.manual_seed(seed)
    args = dict(dim=32, heads=2, depths=(1, 1, 1), context=CTX)
    return build_family("shakespeare-char", **{**args, **kw}).eval()


@pytest.fixture(scope="module")
def fam() -> LanguageFamily:
    return tiny()


def ids(n: int, seed: int = 0, vocab: int = 65, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))


def test_registered_with_a_drafting_exit_under_a_third_of_the_large_member():
    assert "shakespeare-char" in FAMILIES
    f = build_family("shakespeare-char")
    info = f.info()
    assert [m.index for m in info] == [1, 2, 3]
    assert info[0].params < info[1].params < info[2].params
    assert info[0].flops * 3 <= info[2].flops  # the target's drafting-exit rule
    assert f.vocab == 65 and f.chars == SHAKESPEARE_CHARS
    assert f.feature_shape(2) == (128, 192) and f.feature_shape(2).layout == "tokens"
    assert f.feature_shape(0) == (128,)
    assert 0 < f.head_flops(1) < info[0].flops


@settings(max_examples=15, deadline=None)
@given(t=st.integers(0, CTX - 2), seed=st.integers(0, 10_000))
def test_future_tokens_do_not_change_earlier_logits(fam, t, seed):
    x = ids(CTX, seed)
    y = x.clone()
    y[:, t + 1 :] = (y[:, t + 1 :] + 1 + seed % 60) % 65  # change every later token
    with torch.no_grad():
        for a, b in zip(fam(x), fam(y), strict=True):
            torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
            assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])  # the test can see changes


def test_head_and_tail_equal_the_member_exactly(fam):
    x = ids(CTX)
    with torch.no_grad():
        for k in range(1, 4):
            want = fam.member(k)(x)
            torch.testing.assert_close(fam(x)[k - 1], want, rtol=0, atol=0)
            for p in range(0, k + 1):
                head, tail = fam.split(k, p)
                assert torch.equal(tail(head(x)), want), (k, p)


def test_split_with_caches_fed_in_pieces(fam):
    x = ids(20, seed=3)
    pieces = [(0, 7), (7, 8), (8, 12), (12, 13), (13, 20)]
    with torch.no_grad():
        full = fam.member(3)(x)
        for p in range(4):
            head, tail = fam.split(3, p)
            dev, edge, ref = KVCache(), KVCache(), KVCache()
            got, mem = [], []
            for a, b in pieces:
                got.append(tail(head(x[:, a:b], dev), edge))
                mem.append(fam.member(3)(x[:, a:b], ref))
            got = torch.cat(got, 1)
            assert torch.equal(got, torch.cat(mem, 1))  # same pieces: bit-exact
            torch.testing.assert_close(got, full, rtol=0, atol=1e-5)  # vs whole sequence
            assert len(edge) == (20 if p < 3 else 0) and len(dev) == (20 if p else 0)


def test_incremental_decoding_matches_the_full_sequence(fam):
    x = ids(CTX, seed=5, batch=1)
    cache = KVCache()
    with torch.no_grad():
        steps = torch.cat([fam.member(2)(x[:, i : i + 1], cache) for i in range(CTX)], 1)
        torch.testing.assert_close(steps, fam.member(2)(x), rtol=0, atol=1e-5)


def test_truncated_cache_forgets_rejected_positions(fam):
    x, y = ids(16, seed=1, batch=1), ids(16, seed=2, batch=1)
    with torch.no_grad():
        cache = KVCache()
        fam.member(3)(x[:, :10], cache)
        cache.truncate(6)
        out = fam.member(3)(y[:, 6:12], cache)
        want = fam.member(3)(torch.cat([x[:, :6], y[:, 6:12]], 1))[:, 6:]
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError):
        cache.truncate(-1)


def test_bad_inputs_raise_config_errors(fam):
    m = fam.member(3)
    bad = [
        torch.full((1, 4), 65),  # id == vocab
        torch.tensor([[-1, 2]]),  # negative id
        torch.zeros(1, 4),  # float "ids"
        torch.zeros(1, 0, dtype=torch.long),  # empty
        torch.zeros(4, dtype=torch.long),  # no batch axis
        torch.zeros(1, CTX + 1, dtype=torch.long),  # over the context
    ]
    for x in bad:
        with pytest.raises(ConfigError):
            m(x)
    cache = KVCache()
    m(torch.zeros(1, CTX - 1, dtype=torch.long), cache)
    with pytest.raises(ConfigError, match="context"):
        m(torch.zeros(1, 2, dtype=torch.long), cache)
    for member, point in [(4, 1), (0, 0), (2, 3), (3, -1), (1.0, 0)]:
        with pytest.raises(ConfigError):
            fam.split(member, point)
    head, tail = fam.split(3, 1)
    with pytest.raises(ConfigError, match="hidden states"):
        tail(torch.zeros(1, 3, 31))
    for kw in [dict(depths=()), dict(depths=(0, 1)), dict(dim=30, heads=4), dict(chars="aab"),
               dict(vocab=65, chars="ab"), dict(chars=None), dict(dropout=1.5)]:  # fmt: skip
        with pytest.raises(ConfigError):
            build_family("shakespeare-char", **kw)


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet=SHAKESPEARE_CHARS, max_size=200))
def test_char_vocab_round_trip(text):
    v = CharVocab(SHAKESPEARE_CHARS)
    ids_ = v.encode(text)
    assert ids_.dtype == torch.int64 and len(ids_) == len(text)
    assert v.decode(ids_) == text


def test_char_vocab_errors():
    v = CharVocab("abc")
    with pytest.raises(ConfigError, match="not in the vocabulary"):
        v.encode("abz")
    with pytest.raises(ConfigError, match="out of"):
        v.decode([0, 3])
    with pytest.raises(ConfigError):
        CharVocab("aa")
    with pytest.raises(ConfigError):
        CharVocab("")


def test_missing_data_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("FLOWCODEC_DATA", raising=False)
    monkeypatch.setenv("FLOWCODEC_CACHE", str(tmp_path))
    with pytest.raises(DataNotFoundError, match="FLOWCODEC_DATA"):
        find_shakespeare(tmp_path / "nowhere")


def test_shakespeare_split():
    try:
        train, val, vocab = load_shakespeare()
    except DataNotFoundError:
        pytest.skip("tinyshakespeare.txt not found (set FLOWCODEC_DATA)")
    assert len(vocab) == 65 and vocab.chars == SHAKESPEARE_CHARS
    assert len(train) == int(0.9 * (len(train) + len(val)))
    assert vocab.decode(val[:1]) and train.dtype == torch.int64


def _text(n: int = 3000) -> torch.Tensor:
    """A learnable toy text over 'abcd': a repeating pattern with some noise."""
    g = torch.Generator().manual_seed(0)
    base = torch.tensor([0, 1, 2, 3, 2, 1]).repeat(n // 6 + 1)[:n]
    noise = torch.rand(n, generator=g) < 0.1
    return torch.where(noise, torch.randint(0, 4, (n,), generator=g), base)


def _cfg(**kw) -> LMTrainConfig:
    base = dict(steps=6, batch_size=8, context=16, lr=3e-3, warmup=2, eval_every=3,
                eval_windows=4, checkpoint_every=3, progress=False)  # fmt: skip
    return LMTrainConfig(**{**base, **kw})


def test_training_learns_and_resumes_to_the_same_weights(tmp_path, monkeypatch):
    text = _text()
    a = tiny(chars="abcd", context=16)
    res = train_lm(a, text[:2500], text[2500:], _cfg(steps=24, eval_every=12, lr=1e-2))
    assert res.steps == 24 and len(res.val_loss) == 3
    assert res.val_loss[-1] < 1.2  # uniform over 4 symbols would be 1.386
    assert res.history[-1]["step"] == 24 and res.val_bits[-1] == pytest.approx(
        res.val_loss[-1] / 0.6931471805599453
    )

    straight = tiny(1, chars="abcd", context=16)
    train_lm(straight, text[:2500], text[2500:], _cfg())
    calls = []

    def crash_after_three(*args):  # the process dies while drawing the 4th batch
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return sample_windows(*args)

    monkeypatch.setattr("flowcodec.lm.train.sample_windows", crash_after_three)
    with pytest.raises(KeyboardInterrupt):
        train_lm(tiny(1, chars="abcd", context=16), text[:2500], text[2500:], _cfg(),
                 checkpoint=tmp_path / "run")  # fmt: skip
    monkeypatch.undo()
    again = tiny(1, chars="abcd", context=16)  # a fresh process would build it like this
    train_lm(again, text[:2500], text[2500:], _cfg(), checkpoint=tmp_path / "run", resume=True)
    for (k, v), w in zip(straight.state_dict().items(), again.state_dict().values(), strict=True):
        torch.testing.assert_close(v, w, rtol=0, atol=0, msg=k)


def test_training_state_is_checked(tmp_path):
    text = _text()
    f = tiny(chars="abcd", context=16)
    train_lm(f, text[:2500], text[2500:], _cfg(steps=3), checkpoint=tmp_path / "run")
    other = tiny(chars="abcd", context=16, dim=16)
    other.config = {**other.config, "dim": 16}
    with pytest.raises(CheckpointError):
        train_lm(other, text[:2500], text[2500:], _cfg(), checkpoint=tmp_path / "run",
                 resume=True)  # fmt: skip
    w = tmp_path / "run-state.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="SHA-256"):
        train_lm(f, text[:2500], text[2500:], _cfg(), checkpoint=tmp_path / "run", resume=True)
    for bad in [dict(steps=0), dict(lr=-1.0), dict(exit_weights=(1.0,)), dict(context=999),
                dict(seconds=0)]:  # fmt: skip
        with pytest.raises(ConfigError):
            train_lm(f, text, text, _cfg(**bad))


def test_saved_as_float16_with_measured_losses(tmp_path):
    f = tiny(chars="abcd", context=16)
    text = _text(800)
    path = save_lm(f, tmp_path / "lm", text)
    rec = json.loads((tmp_path / "lm.json").read_text())
    assert rec["extra"]["stored_as"] == "float16" and len(rec["extra"]["val_loss_nats"]) == 3
    from safetensors.torch import load_file

    assert all(t.dtype == torch.float16 for t in load_file(path).values() if t.is_floating_point())
    g = load_lm(tmp_path / "lm")
    assert g.chars == "abcd" and g.context == 16
    measured = [round(v, 4) for v in evaluate_lm(g, text)]
    assert measured == rec["extra"]["val_loss_nats"]
