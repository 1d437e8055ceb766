"""The hidden-state codec of the language family (issue 29): real bytes that decode to what
the eval-mode forward gives, the same bytes in a fresh process, named errors on bad input and
on damaged or hostile streams, checkpoints, the codec-speculative scheme (its plumbing and
its byte accounting) and training that lowers the loss."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowcodec.bitstream import Bitstream, BitstreamError
from flowcodec.errors import CheckpointError, ConfigError
from flowcodec.family import build_family
from flowcodec.family.lm import KVCache
from flowcodec.lm.codec import HiddenStateCodec, load_hidden_codec, save_hidden_codec
from flowcodec.lm.codec_train import (
    HiddenCodecTrainConfig,
    evaluate_hidden_codec,
    train_hidden_codec,
)
from flowcodec.lm.speculative import generate_edge, generate_speculative_codec

CTX = 16


def tiny(seed: int = 0, scale: float = 25.0):
    """A tiny random family whose exits give peaked, different distributions."""
    torch.manual_seed(seed)
    f = build_family("shakespeare-char", dim=32, heads=2, depths=(1, 1, 1), context=CTX)
    with torch.no_grad():
        for ex in f.exits:
            ex.head.weight.mul_(scale)
    return f.eval()


def make_codec(fam, condition: bool = True, seed: int = 0, rates: int = 3) -> HiddenStateCodec:
    torch.manual_seed(seed)
    c = HiddenStateCodec(fam.feature_shape(1), point=1, latent=6, hidden=24, rates=rates,
                         vocab=fam.vocab, condition=condition).init_from(fam).eval()  # fmt: skip
    with torch.no_grad():
        c.gain.add_(2.5)  # an untrained analysis sends near-zero latents: make them count
    c.update(force=True)
    return c


@pytest.fixture(scope="module")
def fam():
    return tiny()


@pytest.fixture(scope="module")
def codec(fam):
    return make_codec(fam)


def batch(fam, b: int = 3, n: int = 11, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, fam.vocab, (b, n), generator=g)
    return ids, fam.features(ids, 1).detach()


# --- round trips and bytes ------------------------------------------------------------------------
@pytest.mark.parametrize("condition", [True, False])
def test_decompress_returns_the_eval_forward_states(fam, condition):
    c = make_codec(fam, condition)
    ids, h = batch(fam)
    assert int(c.symbols(h, c.rates - 1, ids).abs().sum()) > 0
    for r in range(c.rates):
        for start in (0, 3):
            streams = c.compress(h, rate=r, ids=ids, start=start)
            out = c.decompress(streams, ids=ids if condition else None, start=start)
            assert out.dtype == torch.float32 and tuple(out.shape) == tuple(h.shape)
            assert torch.equal(out, c(h, rate=r, ids=ids, start=start).features)
            assert [c.rate_of(s) for s in streams] == [r] * len(h)


def test_bytes_are_what_crosses_the_link(fam, codec):
    ids, h = batch(fam, b=2, n=9)
    streams = codec.compress(h, rate=2, ids=ids, seq=7)
    for i, s in enumerate(streams):
        assert len(s.packets) == 1 and s.seq == 7 + i
        assert s.nbytes == len(s.to_bytes())
        assert s.packets[0][0] == 9  # varint token count, then the range-coded payload
        assert Bitstream.from_bytes(s.to_bytes()) == s
        assert Bitstream.from_compact(s.to_compact(), s.header) == s
        assert s.compact_nbytes == len(s.to_compact()) < s.nbytes
    # one sample alone gives the same bytes as in a batch (one bitstream per sample)
    alone = codec.compress(h[1:], rate=2, ids=ids[1:], seq=8)[0]
    assert alone.to_bytes() == streams[1].to_bytes()


def test_higher_rate_points_spend_more_bytes_on_states_they_quantise_finer(fam):
    c = make_codec(fam, rates=2)
    with torch.no_grad():
        c.gain[0].fill_(-3.0)
        c.gain[1].fill_(2.0)
    ids, h = batch(fam, b=2, n=16)
    low, high = (sum(s.nbytes for s in c.compress(h, rate=r, ids=ids)) for r in (0, 1))
    assert low < high


FRESH = textwrap.dedent("""
    import hashlib, sys, torch
    from safetensors.torch import load_file
    from flowcodec.bitstream import Bitstream
    from flowcodec.lm.codec import load_hidden_codec
    torch.set_num_threads(1)
    d = sys.argv[1]
    codec = load_hidden_codec(d + "/codec")
    t = load_file(d + "/inputs.safetensors")
    streams = codec.compress(t["h"], rate=1, ids=t["ids"], start=2)
    print("".join(s.to_bytes().hex() for s in streams))
    theirs = [Bitstream.from_bytes(bytes.fromhex(x)) for x in sys.argv[2].split(",")]
    out = codec.decompress(theirs, ids=t["ids"], start=2)
    print(hashlib.sha256(out.numpy().tobytes()).hexdigest())
""")


def test_same_bytes_and_states_in_a_fresh_process(fam, codec, tmp_path):
    from safetensors.torch import save_file

    ids, h = batch(fam, b=2, n=12)
    save_hidden_codec(codec, tmp_path / "codec")
    save_file({"h": h.contiguous(), "ids": ids.contiguous()}, str(tmp_path / "inputs.safetensors"))
    streams = codec.compress(h, rate=1, ids=ids, start=2)
    mine = "".join(s.to_bytes().hex() for s in streams)
    out = codec.decompress(streams, ids=ids, start=2)
    arg = ",".join(s.to_bytes().hex() for s in streams)
    run = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path), arg], capture_output=True,
                         text=True, timeout=120, env={**__import__("os").environ,
                                                      "OMP_NUM_THREADS": "1"})  # fmt: skip
    assert run.returncode == 0, run.stderr
    theirs, digest = run.stdout.split()
    assert theirs == mine
    assert digest == hashlib.sha256(out.numpy().tobytes()).hexdigest()


# --- named errors ---------------------------------------------------------------------------------
def test_bad_inputs_are_config_errors_naming_the_fault(fam, codec):
    ids, h = batch(fam, b=2, n=8)
    bad = [
        (lambda: codec.compress(h[0], ids=ids[0]), "shape"),
        (lambda: codec.compress(h[..., :16], ids=ids), "shape"),
        (lambda: codec.compress(torch.zeros(0, 8, 32), ids=ids[:0]), "shape"),
        (lambda: codec.compress(h.long(), ids=ids), "floating point"),
        (lambda: codec.compress(torch.full_like(h, float("nan")), ids=ids), "NaN"),
        (lambda: codec.compress(h, ids=ids, start=9), "context"),
        (lambda: codec.compress(h, ids=ids, start=-1), "start"),
        (lambda: codec.compress(h), "ids"),
        (lambda: codec.compress(h, ids=ids[:, :5]), "ids"),
        (lambda: codec.compress(h, ids=ids.float()), "ids"),
        (lambda: codec.compress(h, ids=ids + 1000), "ids must lie"),
        (lambda: codec.compress(h, rate=3, ids=ids), "rate"),
        (lambda: codec.compress(h, rate=-1, ids=ids), "rate"),
        (lambda: codec.compress(h, rate=True, ids=ids), "rate"),
        (lambda: codec(h, rate=1.0, ids=ids), "rate"),
        (lambda: HiddenStateCodec((16, 32), latent=0), "latent"),
        (lambda: HiddenStateCodec((16, 32), rates=200), "rates"),
        (lambda: HiddenStateCodec((16, 32, 2)), "context, D"),
        (lambda: HiddenStateCodec((16, 48)).init_from(fam), "positions"),
        (lambda: codec.fit(h), "fit takes"),
    ]
    for call, words in bad:
        with pytest.raises(ConfigError, match=words):
            call()
    fresh = HiddenStateCodec((CTX, 32), latent=4, hidden=8, rates=2).eval()
    with pytest.raises(ConfigError, match="update"):
        fresh.compress(h, ids=ids)


def test_damaged_and_hostile_streams_are_bitstream_errors_or_concealed(fam, codec):
    ids, h = batch(fam, b=1, n=10)
    s = codec.compress(h, rate=1, ids=ids)[0]
    raw = s.to_bytes()
    with pytest.raises(BitstreamError):
        Bitstream.from_bytes(raw[:-3])  # truncated
    # a flipped payload byte fails the packet CRC: the packet is lost and concealed
    hit = bytearray(raw)
    hit[len(raw) - 5] ^= 0x5A  # the payload's last byte (a CRC-32 follows it)
    lost = Bitstream.from_bytes(bytes(hit))
    assert lost.packets == [None]
    out = codec.decompress([lost], ids=ids)
    assert tuple(out.shape) == (1, 10, 32) and bool(torch.isfinite(out).all())
    ref = codec.decompress([s], ids=ids)
    assert not torch.equal(out, ref)
    head = s.header
    payload = s.packets[0]
    other = make_codec(fam, rates=2)
    hostile = [  # (streams, give the ids?, words of the error)
        ([Bitstream(head, [b""])], True, "truncated"),
        ([Bitstream(head, [b"\x00" + payload[1:]])], True, "declares 0 tokens"),
        ([Bitstream(head, [bytes([CTX + 1]) + payload[1:]])], True, "declares 17 tokens"),
        ([Bitstream(head, [b"\x8a\x00" + payload[1:]])], True, "over-long"),
        ([Bitstream(head, [payload + b"\x01" * 200])], True, "longer than"),
        ([Bitstream(head, [payload + b"\x00"])], True, "zero byte"),
        ([Bitstream(head, [payload, payload])], True, "packets"),
        ([Bitstream(other.header(1), [payload])], True, "fingerprint"),
        ([Bitstream(codec.make_header(meta=b"\x01"), [payload])], True, "meta"),
        ([Bitstream(codec.make_header(meta=b"\x83"), [payload])], True, "meta"),
        ([s, codec.compress(h[:, :7], rate=1, ids=ids[:, :7])[0]], False, "token count"),
        ([Bitstream(head, [None])], False, "lost"),  # nothing says how many tokens
        (s, True, "sequence"),
        ([], True, "no streams"),
    ]
    for streams, with_ids, words in hostile:
        with pytest.raises(BitstreamError, match=words):
            codec.decompress(streams, ids=ids if with_ids else None)
    with pytest.raises(ConfigError, match="ids"):
        codec.decompress([s])  # condition=True: the ids are needed


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(data=st.binary(min_size=0, max_size=80))
def test_any_payload_decodes_or_is_a_bitstream_error(data):
    codec = _HYPO["codec"]
    ids = _HYPO["ids"]
    s = Bitstream(codec.header(1), [bytes([ids.shape[1]]) + data])
    try:
        out = codec.decompress([s], ids=ids)
    except BitstreamError:
        return
    assert tuple(out.shape) == (1, ids.shape[1], 32) and bool(torch.isfinite(out).all())


_HYPO = {"codec": make_codec(tiny()), "ids": torch.randint(0, 65, (1, 5))}


# --- checkpoints ---------------------------------------------------------------------------------
def test_save_and_load_keep_the_bytes(fam, codec, tmp_path):
    ids, h = batch(fam, b=2, n=6)
    save_hidden_codec(codec, tmp_path / "c")
    back = load_hidden_codec(tmp_path / "c")
    assert isinstance(back, HiddenStateCodec) and not back.training
    assert back.config() == codec.config()
    for r in range(codec.rates):
        assert [x.to_bytes() for x in back.compress(h, rate=r, ids=ids)] == \
            [x.to_bytes() for x in codec.compress(h, rate=r, ids=ids)]  # fmt: skip
    w = tmp_path / "c.safetensors"
    blob = bytearray(w.read_bytes())
    blob[-5] ^= 1
    w.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_hidden_codec(tmp_path / "c")
    from flowcodec.codecs import build_codec
    from flowcodec.codecs.zoo import save_codec

    save_codec(build_codec("raw", (4,)), tmp_path / "raw", {})
    with pytest.raises(CheckpointError, match="not an lm-hidden"):
        load_hidden_codec(tmp_path / "raw")


# --- the codec-speculative scheme -----------------------------------------------------------------
class Oracle(HiddenStateCodec):
    """Decodes every stream as usual, then hands the edge the exact stage-1 states of the
    tokens it names (computed from the ids with its own cache): with a lossless codec the
    scheme must give the large member's greedy output, which checks the positions, ids and
    caches the scheme passes."""

    def bind(self, family):
        self.__dict__["fam"] = family  # not a submodule of the codec
        self.cache = KVCache()
        return self

    def decompress(self, streams, ids=None, start=0, n_tokens=None):
        super().decompress(streams, ids=ids, start=start, n_tokens=n_tokens)
        self.cache.truncate(start)
        assert len(self.cache) == start
        return self.fam.features(ids, 1, self.cache)


@pytest.mark.parametrize("draft, gamma", [(1, 1), (1, 4), (2, 3)])
def test_with_a_lossless_codec_the_scheme_is_the_large_members_greedy_output(fam, draft, gamma):
    torch.manual_seed(0)
    oracle = Oracle(fam.feature_shape(1), point=1, latent=6, hidden=24, rates=2,
                    vocab=fam.vocab).init_from(fam).eval()  # fmt: skip
    oracle.update(force=True)
    for prompt in ([5], [20, 40, 1, 0, 33]):
        ref = generate_edge(fam, prompt, 10)
        tr = generate_speculative_codec(fam, prompt, 10, oracle.bind(fam), draft=draft,
                                        gamma=gamma)  # fmt: skip
        assert tr.tokens == ref.tokens


def test_codec_speculative_trace_adds_up(fam, codec):
    prompt = [3, 14, 15, 9, 2, 6]
    tr = generate_speculative_codec(fam, prompt, 9, codec, gamma=3, rate=1)
    assert tr.scheme == "speculative-codec" and len(tr.tokens) == 9
    assert all(0 <= t < fam.vocab for t in tr.tokens)
    assert tr.total_up == sum(r.up_bytes for r in tr.rounds)
    assert tr.total_down == sum(r.down_bytes for r in tr.rounds) == 4 * len(tr.rounds)
    assert tr.round_trips == tr.edge_passes == len(tr.rounds)
    hdr = len(codec.header(1).to_bytes(1))
    for i, r in enumerate(tr.rounds):
        ids_bytes = 2 + r.drafted + ((2 + len(prompt)) if i == 0 else 0)
        assert r.up_bytes == ids_bytes + r.codec_bytes
        assert r.codec_bytes > (hdr if i == 0 else 0) + 6  # header once, then compact samples
    again = generate_speculative_codec(fam, prompt, 9, codec, gamma=3, rate=1)
    assert again.tokens == tr.tokens and again.up_bytes == tr.up_bytes
    sampled = generate_speculative_codec(fam, prompt, 9, codec, gamma=2, temperature=1.0, seed=3)
    assert len(sampled.tokens) == 9


def test_codec_speculative_refuses_a_point_past_the_draft_and_bad_arguments(fam):
    c2 = HiddenStateCodec(fam.feature_shape(2), point=2, latent=4, hidden=8, rates=1,
                          vocab=fam.vocab).eval()  # fmt: skip
    c2.update(force=True)
    with pytest.raises(ConfigError, match="draft member's exit"):
        generate_speculative_codec(fam, [1, 2], 4, c2, draft=1)
    with pytest.raises(ConfigError, match="HiddenStateCodec"):
        generate_speculative_codec(fam, [1, 2], 4, object())
    c = make_codec(fam)
    with pytest.raises(ConfigError, match="rate"):
        generate_speculative_codec(fam, [1, 2], 4, c, rate=5)
    big = build_family("shakespeare-char", dim=32, heads=2, depths=(1, 1, 1), context=24)
    with pytest.raises(ConfigError, match="does not fit"):
        generate_speculative_codec(big.eval(), [1, 2], 4, c)


# --- training and evaluation ----------------------------------------------------------------------
def test_a_short_training_run_lowers_the_distillation_loss(fam):
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, fam.vocab, (3000,), generator=g)
    cfg = HiddenCodecTrainConfig(lams=(0.01, 0.001), latent=6, hidden=24, steps=40,
                                 batch_size=8, warmup=2, eval_every=40, progress=False)  # fmt: skip
    torch.manual_seed(0)
    codec = HiddenStateCodec(fam.feature_shape(1), point=1, latent=6, hidden=24, rates=2,
                             vocab=fam.vocab).init_from(fam)  # fmt: skip
    head, tail = fam.split(3, 1)
    w = text[torch.arange(4).unsqueeze(1) * 20 + torch.arange(CTX)]

    def kd() -> float:
        with torch.no_grad():
            h = head(w)
            t = torch.log_softmax(tail(h), -1)
            s = torch.log_softmax(tail(codec.eval()(h, rate=1, ids=w).features), -1)
            return float(F.kl_div(s, t, log_target=True, reduction="batchmean"))

    before = kd()
    flags = [p.requires_grad for p in fam.parameters()]
    out, res = train_hidden_codec(fam, 1, None, text, text[:400], cfg, codec=codec)
    assert out is codec and res.steps == 40 and not codec.training
    assert [p.requires_grad for p in fam.parameters()] == flags and not fam.training
    after = kd()
    assert after < 0.7 * before, (before, after)
    assert res.history and "eval" in res.history[-1]


def test_evaluation_reports_real_bytes_and_the_text_baseline(fam, codec):
    g = torch.Generator().manual_seed(2)
    val = torch.randint(0, fam.vocab, (200,), generator=g)
    res = evaluate_hidden_codec(fam, codec, val, max_windows=5, flops=False)
    assert res["windows"] == 5 and res["tokens"] == 5 * CTX
    assert [r["rate"] for r in res["rows"]] == list(range(codec.rates))
    for r in res["rows"]:
        assert r["bits_per_token"] > r["session_bits_per_token"] > r["payload_bits_per_token"] > 0
        assert 0 <= r["top1_agreement"] <= 1
    assert res["text_bits_per_char"] == 8 and res["flops_per_token"] is None
    assert res["loss_without_codec"] > 0 and res["rows"][0]["loss"] > 0


def test_the_lm_command_line_has_the_codec_commands():
    from flowcodec.lm.cli import build_parser

    a = build_parser().parse_args(["codec", "train", "--point", "1", "--out", "x"])
    assert a.codec_cmd == "train" and a.point == 1 and a.threads is None
    e = build_parser().parse_args(["codec", "eval", "--codec", "c", "--windows", "4"])
    assert e.codec_cmd == "eval" and e.windows == 4


def test_moved_training_names_warn_from_the_old_module():
    import warnings

    import flowcodec.lm.codec as old
    from flowcodec.lm import codec_train

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert old.train_hidden_codec is codec_train.train_hidden_codec
    assert any(issubclass(x.category, DeprecationWarning) for x in w)
