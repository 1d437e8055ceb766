"""Honest baselines: the device exit's answer as a bitstream, JPEG/WebP encoder options,
and the rd plumbing that scores them (digits family, CPU)."""

from __future__ import annotations

import io
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from flowcodec.bitstream import Bitstream, BitstreamError
from flowcodec.codecs import CODECS, build_codec
from flowcodec.codecs.exit import ExitCodec
from flowcodec.errors import ConfigError


def _exit(channels: int = 4, classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(channels * 2 * 2, classes))


def _resend(codec, stream: Bitstream, payload: bytes) -> list[Bitstream]:
    """A stream with ``payload`` in place of the codec's (a valid CRC: what a hostile
    sender, not the channel, would produce)."""
    return [Bitstream(stream.header, [payload])]


# --- the device's answer -------------------------------------------------------------------


def test_exit_codecs_are_registered():
    assert {"exit-top1", "exit-topk"} <= set(CODECS)
    assert CODECS["exit-top1"].answers and CODECS["exit-topk"].needs_exit


def test_top1_round_trip_is_the_exit_answer_in_one_byte():
    ex = _exit()
    codec = build_codec("exit-top1", (4, 2, 2), exit_branch=ex)
    h = torch.randn(64, 4, 2, 2)
    streams = codec.compress(h)
    assert all(len(s.packets) == 1 and len(s.packets[0]) == 1 for s in streams)
    # rate is measured on the real stream in both framings
    s = streams[0]
    assert s.nbytes == len(s.to_bytes()) and s.compact_nbytes == len(s.to_compact())
    assert s.compact_nbytes - len(s.packets[0]) < 10  # session framing: a few bytes
    back = [Bitstream.from_bytes(t.to_bytes()) for t in streams]
    scores = codec.decompress(back)
    assert scores.shape == (64, 10) and scores.dtype == torch.float32
    assert torch.equal(scores.argmax(1), ex(h).argmax(1))
    compact = [Bitstream.from_compact(t.to_compact(), t.header) for t in streams]
    assert torch.equal(codec.decompress(compact), scores)


@pytest.mark.parametrize("k,bits,nbytes", [(2, 4, 2), (3, 4, 3), (2, 8, 3), (3, 8, 5), (4, 0, 2)])
def test_topk_payload_size_and_confidences(k, bits, nbytes):
    ex = _exit()
    codec = build_codec("exit-topk", (4, 2, 2), exit_branch=ex, k=k, bits=bits)
    assert codec.payload_bytes == nbytes == math.ceil(k * (4 + bits) / 8)
    h = 3 * torch.randn(50, 4, 2, 2)
    streams = codec.compress(h)
    assert {len(s.packets[0]) for s in streams} == {nbytes}
    scores = codec.decompress(streams)
    probs = ex(h).softmax(1)
    conf, idx = probs.topk(k, dim=1)
    assert torch.equal(scores.argmax(1), idx[:, 0])
    # the received classes outrank the others, in the device's order
    assert torch.equal(scores.topk(k, dim=1).indices, idx)
    if bits:
        step = 1 / (2**bits - 1)
        got = scores.gather(1, idx)
        assert (got - conf).abs().max() <= step / 2 + 1e-5


def test_forward_is_the_measured_round_trip():
    codec = build_codec("exit-topk", (4, 2, 2), exit_branch=_exit(), k=2, bits=8)
    h = torch.randn(5, 4, 2, 2)
    out = codec(h)
    streams = codec.compress(h)
    assert torch.equal(out.features, codec.decompress(streams))
    assert out.bits.tolist() == [8.0 * s.nbytes for s in streams]


def test_encoder_flops_count_the_exit():
    from flowcodec.flops import count_flops

    ex = _exit()
    codec = build_codec("exit-top1", (4, 2, 2), exit_branch=ex)
    assert codec.encoder_flops() == count_flops(ex, (4, 2, 2)) > 0


def test_the_user_exit_is_copied_and_left_alone():
    ex = _exit().train()
    codec = build_codec("exit-top1", (4, 2, 2), exit_branch=ex)
    assert ex.training and all(p.requires_grad for p in ex.parameters())
    with torch.no_grad():
        ex[1].weight.zero_()  # changing the family later does not change the codec
    assert codec.exit_branch[1].weight.abs().sum() > 0


def test_lost_packet_is_concealed_with_the_prior():
    ex = _exit()
    codec = build_codec("exit-top1", (4, 2, 2), exit_branch=ex)
    s = codec.compress(torch.randn(2, 4, 2, 2))
    lost = [Bitstream(s[0].header, [None]), s[1]]
    assert torch.allclose(codec.decompress(lost)[0], torch.full((10,), 0.1))
    feats = torch.randn(100, 4, 2, 2)
    codec.fit(feats)
    assert torch.allclose(codec.decompress(lost)[0], ex(feats).softmax(1).mean(0), atol=1e-6)


def test_receiver_only_codec_decodes_but_cannot_encode():
    sender = build_codec("exit-topk", (4, 2, 2), exit_branch=_exit(), k=3, bits=4)
    receiver = build_codec("exit-topk", (4, 2, 2), num_classes=10, k=3, bits=4)
    h = torch.randn(7, 4, 2, 2)
    streams = sender.compress(h)
    assert torch.equal(receiver.decompress(streams), sender.decompress(streams))
    with pytest.raises(ConfigError, match="receiver-only"):
        receiver.compress(h)


@pytest.mark.parametrize("kwargs", [
    {}, {"exit_branch": "not a module"}, {"num_classes": 1}, {"num_classes": 10, "k": 0},
    {"num_classes": 10, "k": 11}, {"num_classes": 10, "bits": 17}, {"num_classes": 10, "k": True},
    {"num_classes": 10.0}, {"exit_branch": _exit(), "num_classes": 12},
])  # fmt: skip
def test_bad_configuration_is_a_config_error(kwargs):
    with pytest.raises(ConfigError):
        ExitCodec((4, 2, 2), **kwargs)


def test_bad_features_are_config_errors():
    codec = build_codec("exit-top1", (4, 2, 2), exit_branch=_exit())
    for h in (torch.randn(2, 4, 2), torch.zeros(2, 4, 2, 2, dtype=torch.int64),
              torch.full((2, 4, 2, 2), float("nan"))):  # fmt: skip
        with pytest.raises(ConfigError):
            codec.compress(h)


def test_hostile_payloads_with_valid_crc_are_bitstream_errors():
    codec = build_codec("exit-topk", (4, 2, 2), num_classes=10, k=2, bits=4)
    good = build_codec("exit-topk", (4, 2, 2), exit_branch=_exit(), k=2, bits=4)
    s = good.compress(torch.randn(1, 4, 2, 2))[0]
    cases = {
        "payload has": [b"\x10", b"\x10\x00\x00"],  # wrong length
        "outside": [bytes([0xC8, 0x10])],  # class 12 of 10
        "twice": [bytes([0x38, 0x34])],  # class 3 twice
        "rank order": [bytes([0x32, 0x58])],  # confidence 2 then 8
    }
    for match, payloads in cases.items():
        for p in payloads:
            with pytest.raises(BitstreamError, match=match):
                codec.decompress(_resend(codec, s, p))
    top1 = build_codec("exit-top1", (4, 2, 2), num_classes=10)
    s1 = build_codec("exit-top1", (4, 2, 2), exit_branch=_exit()).compress(
        torch.randn(1, 4, 2, 2))[0]  # fmt: skip
    with pytest.raises(BitstreamError, match="padding"):
        top1.decompress(_resend(top1, s1, b"\x31"))  # 4 class bits, then non-zero padding
    # a stream of another configuration is refused by its fingerprint
    with pytest.raises(BitstreamError, match="fingerprint|codec"):
        codec.decompress([s1])
    with pytest.raises(BitstreamError):
        codec.decompress(s)  # a single stream, not a sequence
    with pytest.raises(BitstreamError):
        codec.decompress([Bitstream(s.header, [s.packets[0], b"x"])])


@settings(max_examples=60, deadline=None)
@given(classes=st.integers(2, 300), data=st.data())
def test_any_answer_survives_both_framings(classes, data):
    k = data.draw(st.integers(1, min(classes, 6)))
    bits = data.draw(st.integers(0, 16))
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    ex = nn.Linear(3, classes)
    with torch.no_grad():
        scale = data.draw(st.sampled_from([0.1, 3.0]))
        ex.weight.copy_(scale * torch.randn(classes, 3, generator=g))
    codec = build_codec("exit-topk", (3,), exit_branch=ex, k=k, bits=bits)
    h = torch.randn(4, 3, generator=g)
    streams = codec.compress(h)
    assert {len(s.packets[0]) for s in streams} == {math.ceil(k * (codec.class_bits + bits) / 8)}
    full = codec.decompress([Bitstream.from_bytes(s.to_bytes()) for s in streams])
    compact = codec.decompress([Bitstream.from_compact(s.to_compact(), s.header)
                                for s in streams])  # fmt: skip
    assert torch.equal(full, compact)
    assert torch.equal(full.argmax(1), ex(h).argmax(1))
    assert torch.equal(full.topk(k, 1).indices, ex(h).topk(k, 1).indices)


@settings(max_examples=60, deadline=None)
@given(payload=st.binary(min_size=0, max_size=6))
def test_any_payload_decodes_or_is_a_bitstream_error(payload):
    codec = build_codec("exit-topk", (3,), num_classes=10, k=3, bits=4)
    s = build_codec("exit-topk", (3,), exit_branch=nn.Linear(3, 10), k=3, bits=4).compress(
        torch.randn(1, 3))[0]  # fmt: skip
    try:
        out = codec.decompress([Bitstream(s.header, [payload])])
    except BitstreamError:
        return
    assert out.shape == (1, 10) and torch.isfinite(out).all()


# --- JPEG and WebP options -----------------------------------------------------------------


def _sof_sampling(data: bytes) -> list[int]:
    """Sampling factors (H << 4 | V) of each component, from a baseline/progressive SOF."""
    i = 2
    while i < len(data):
        assert data[i] == 0xFF
        marker, length = data[i + 1], int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            n = data[i + 9]
            return [data[i + 10 + 3 * c + 1] for c in range(n)]
        i += 2 + length
    raise AssertionError("no SOF marker")


def _images(n: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    base = torch.linspace(-1, 1, 16).view(1, 1, 1, 16).expand(n, 3, 16, 16)
    return (base + 0.3 * torch.randn(n, 3, 16, 16, generator=g)).clamp(-1, 1)


@pytest.mark.parametrize("sub,factors", [("4:4:4", [0x11, 0x11, 0x11]),
                                         ("4:2:0", [0x22, 0x11, 0x11])])  # fmt: skip
def test_jpeg_subsampling_is_what_the_file_says(sub, factors):
    codec = build_codec("jpeg", (3, 16, 16), quality=50, subsampling=sub)
    x = _images()
    streams = codec.compress(x)
    assert _sof_sampling(streams[0].packets[0]) == factors
    assert codec.decompress(streams).shape == x.shape
    assert codec.config()["subsampling"] == sub


def test_webp_method_reaches_the_encoder(monkeypatch):
    from PIL import Image

    seen = []
    save = Image.Image.save

    def spy(self, fp, format=None, **kw):
        seen.append((format, kw.get("method")))
        return save(self, fp, format=format, **kw)

    monkeypatch.setattr(Image.Image, "save", spy)
    x = _images(2)
    for method in (None, 0, 6):
        codec = build_codec("webp", (3, 16, 16), quality=30, method=method)
        assert codec.decompress(codec.compress(x)).shape == x.shape
    assert [m for _, m in seen] == [4, 4, 0, 0, 6, 6]


def test_defaults_keep_their_fingerprints():
    # the options enter the config only when set: streams of the defaults stay readable
    for name in ("jpeg", "webp"):
        cfg = build_codec(name, (3, 8, 8), quality=50).config()
        assert "method" not in cfg and "subsampling" not in cfg
    a = build_codec("webp", (3, 8, 8), quality=50)
    b = build_codec("webp", (3, 8, 8), quality=50, method=6)
    assert a.fingerprint != b.fingerprint
    with pytest.raises(BitstreamError, match="fingerprint"):
        b.decompress(a.compress(torch.zeros(1, 3, 8, 8)))


@pytest.mark.parametrize("name,kwargs", [
    ("jpeg", {"method": 6}), ("webp", {"subsampling": "4:2:0"}), ("webp", {"method": 7}),
    ("webp", {"method": -1}), ("webp", {"method": True}), ("webp", {"method": 6.0}),
    ("jpeg", {"subsampling": "4:1:1"}), ("jpeg", {"subsampling": 2}), ("jpeg", {"lossless": True}),
])  # fmt: skip
def test_bad_image_options_are_config_errors(name, kwargs):
    with pytest.raises(ConfigError):
        build_codec(name, (3, 8, 8), quality=50, **kwargs)


def test_grey_images_ignore_subsampling():
    codec = build_codec("jpeg", (1, 8, 8), quality=50, mean=(0.5,), std=(0.5,),
                        subsampling="4:4:4")  # fmt: skip
    x = torch.zeros(2, 1, 8, 8)
    assert codec.decompress(codec.compress(x)).shape == x.shape


# --- rd: the baselines beside learned codecs -------------------------------------------------


@pytest.fixture(scope="module")
def digits_fam():
    from flowcodec.family import build_family

    torch.manual_seed(0)
    return build_family("digits").eval()  # untrained weights: fast, enough for contracts


def _rd_cfg():
    return {
        "dataset": "digits", "family": "digits", "member": 3, "point": 1,
        "test_subset": 60, "fit_samples": 100,
        "codecs": [
            {"group": "webp", "codec": "webp", "point": 0, "label": "webp6-q{quality}",
             "kwargs": {"method": 6}, "sweep": {"quality": [30, 90]}},
            {"group": "jpeg", "codec": "jpeg", "point": 0, "label": "jpeg{subsampling}-q50",
             "kwargs": {"quality": 50}, "sweep": {"subsampling": ["4:4:4", "4:2:0"]}},
            {"group": "floor 1", "codec": "exit-top1", "point": 1, "label": "exit1-top1"},
            {"group": "floor 2", "codec": "exit-topk", "point": 2, "label": "exit2-top{k}",
             "kwargs": {"bits": 4}, "sweep": {"k": [1, 3]}},
        ],
        "channels": [{"loss_rate": 0.5, "seed": 0, "codecs": ["exit1-top1"]}],
    }  # fmt: skip


def test_rd_scores_the_device_answer_as_the_device_members_exit(digits_fam, tmp_path):
    from flowcodec.data import load_dataset
    from flowcodec.flops import count_flops
    from flowcodec.rd import run_rd

    rows = run_rd(_rd_cfg(), tmp_path, progress=False, family=digits_fam)
    by = {(r.label, r.condition): r for r in rows}
    _, test = load_dataset("digits")
    test = test.subset(60, seed=0)
    for label, p in (("exit1-top1", 1), ("exit2-top1", 2), ("exit2-top3", 2)):
        r = by[(label, "clean")]
        with torch.no_grad():
            want = sum(int((digits_fam.member(p)(x).argmax(1) == y).sum())
                       for x, y in test.batches(25)) / len(test)  # fmt: skip
        assert r.accuracy == pytest.approx(want), label
        assert r.point == p and r.n == 60
        exit_flops = count_flops(digits_fam.exits[p - 1], digits_fam.feature_shape(p))
        assert r.device_mflops == pytest.approx((digits_fam.head_flops(p) + exit_flops) / 1e6)
    top1 = build_codec("exit-top1", digits_fam.feature_shape(1), exit_branch=digits_fam.exits[0])
    one = top1.compress(torch.zeros(1, *digits_fam.feature_shape(1)))[0]
    assert by[("exit1-top1", "clean")].session_bytes == one.compact_nbytes
    assert by[("exit1-top1", "clean")].bytes_per_image == one.nbytes
    assert by[("exit2-top3", "clean")].payload_bytes == 3  # 3 x (4 class + 4 confidence bits)
    assert by[("exit1-top1", "iid loss 0.5")].accuracy <= 1.0
    assert {"jpeg4:4:4-q50", "jpeg4:2:0-q50", "webp6-q90"} <= {r.label for r in rows}
    assert (tmp_path / "rd.png").stat().st_size > 0


def test_rd_merges_an_earlier_baseline_run_into_the_comparison(digits_fam, tmp_path):
    from flowcodec.rd import run_rd

    base = tmp_path / "base"
    run_rd(_rd_cfg(), base, progress=False, family=digits_fam)
    cfg = {**_rd_cfg(), "codecs": [
        {"group": "learned", "codec": "factorized", "label": "f-{lam}",
         "kwargs": {"latent": 4, "hidden": 8}, "train": {"lam": [0.5], "epochs": 1,
                                                          "batch_size": 256}}]}  # fmt: skip
    cfg.pop("channels")
    rows = run_rd(cfg, tmp_path / "new", progress=False, family=digits_fam,
                  baselines=base / "rd.json")  # fmt: skip
    labels = [r.label for r in rows]
    assert labels.count("uncompressed") == 1 and "webp6-q90" in labels and "f-0.5" in labels
    merged = next(r for r in rows if r.label == "webp6-q90")
    assert merged.source.startswith("baselines:")
    saved = json.loads((tmp_path / "new" / "rd.json").read_text())["rows"]
    assert len(saved) == len(rows)
    with pytest.raises(ConfigError, match="test images"):
        run_rd({**cfg, "test_subset": 30}, tmp_path / "bad", progress=False,
               family=digits_fam, baselines=base / "rd.json")  # fmt: skip
    with pytest.raises(ConfigError, match="member"):
        run_rd({**cfg, "member": 2}, tmp_path / "bad", progress=False,
               family=digits_fam, baselines=base / "rd.json")  # fmt: skip


def test_rd_refuses_an_exit_codec_at_the_input(digits_fam, tmp_path):
    from flowcodec.rd import run_rd

    cfg = {**_rd_cfg(), "codecs": [{"codec": "exit-top1", "point": 0}]}
    cfg.pop("channels")
    with pytest.raises(ConfigError, match="point"):
        run_rd(cfg, tmp_path, progress=False, family=digits_fam)


def test_compare_against_webp_and_the_device_floor():
    from flowcodec.rd import RDRow, cheapest_at_least, compare

    def row(label, codec, point, acc, b, s, source="baseline"):
        return RDRow(label, label, codec, point, "clean", acc, b, s, b, None, None, 0, 0, 10,
                     0, source)  # fmt: skip

    rows = [row("uncompressed", "none", 1, 0.90, 0, 0, "reference"),
            row("webp6-q50", "webp", 0, 0.87, 250, 210),
            row("webp6-q70", "webp", 0, 0.89, 300, 260),
            row("jpeg-q70", "jpeg", 0, 0.89, 280, 240),
            row("exit1", "exit-top1", 1, 0.856, 50, 8),
            row("exit2", "exit-top1", 2, 0.882, 50, 8),
            row("exit2-top3", "exit-topk", 2, 0.882, 52, 10),
            row("task-a", "task", 1, 0.885, 60, 20, "pretrained"),  # any registry name
            row("task-b", "task", 2, 0.87, 40, 12, "pretrained")]  # fmt: skip
    got = {(c.label, c.framing): c for c in compare(rows)}
    a = got[("task-a", "session")]
    assert a.webp_label == "webp6-q70" and a.webp_ratio == pytest.approx(20 / 260)
    assert a.input_label == "jpeg-q70"  # cheapest of any input codec
    assert a.floor_label == "exit1" and a.beats_floor is True and a.floor_bytes == 8
    b = got[("task-b", "self-contained")]
    assert b.floor_label == "exit2" and b.beats_floor is False
    assert b.webp_label == "webp6-q50" and b.floor_bytes == 50
    assert cheapest_at_least(rows, 0.88, codecs=("webp",)).label == "webp6-q70"
    assert cheapest_at_least(rows, 0.95) is None
    with pytest.raises(ValueError):
        cheapest_at_least(rows, 0.5, key="bytes")


def test_the_baseline_config_is_valid():
    from pathlib import Path

    from flowcodec.rd import expand, load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "experiments"
                      / "rd_baselines_cifar10.json")  # fmt: skip
    assert "test_subset" not in cfg  # the full test set
    labels = []
    for entry in cfg["codecs"]:
        assert entry["codec"] in CODECS
        for label, kw in expand(entry):
            labels.append(label)
            if entry["codec"] == "webp":
                assert kw["method"] == 6
            if entry["codec"] == "jpeg":
                assert kw["subsampling"] in ("4:4:4", "4:2:0")
    assert len(labels) == len(set(labels))
    assert {"exit1-top1", "exit2-top1"} <= set(labels)


def test_io_helper_reads_jpeg_markers():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG", subsampling="4:4:4")
    assert _sof_sampling(buf.getvalue()) == [0x11, 0x11, 0x11]


@pytest.mark.parametrize("name,kwargs", [("webp", {"method": 6}),
                                         ("jpeg", {"subsampling": "4:2:0"}),
                                         ("jpeg", {"subsampling": "4:4:4"})])  # fmt: skip
def test_stripped_images_decode_to_the_same_pixels_in_fewer_bytes(name, kwargs):
    x = _images(6)
    full = build_codec(name, (3, 16, 16), quality=40, **kwargs)
    strip = build_codec(name, (3, 16, 16), quality=40, strip=True, **kwargs)
    sf, ss = full.compress(x), strip.compress(x)
    # JPEG: standard instead of optimised Huffman tables, entropy coding is lossless
    assert torch.equal(strip.decompress(ss), full.decompress(sf))
    saved = [a.nbytes - b.nbytes for a, b in zip(sf, ss, strict=True)]
    assert min(saved) >= (27 if name == "webp" else 150)
    assert strip.config()["strip"] is True and strip.fingerprint != full.fingerprint
    back = [Bitstream.from_compact(s.to_compact(), s.header) for s in ss]
    assert torch.equal(strip.decompress(back), strip.decompress(ss))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), quality=st.integers(1, 100),
       name=st.sampled_from(["webp", "jpeg"]))  # fmt: skip
def test_stripped_headers_are_constant_for_any_image(seed, quality, name):
    # compress checks every image's headers against the configuration's: it never raises
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(3, 3, 8, 8, generator=g) * 2 - 1) * torch.rand(3, 1, 1, 1, generator=g)
    codec = build_codec(name, (3, 8, 8), quality=quality, strip=True)
    assert codec.decompress(codec.compress(x)).shape == x.shape


@settings(max_examples=40, deadline=None)
@given(payload=st.binary(min_size=0, max_size=64), name=st.sampled_from(["webp", "jpeg"]))
def test_any_stripped_payload_decodes_or_is_a_bitstream_error(payload, name):
    codec = build_codec(name, (3, 8, 8), quality=50, strip=True)
    s = codec.compress(torch.zeros(1, 3, 8, 8))[0]
    try:
        out = codec.decompress([Bitstream(s.header, [payload])])
    except BitstreamError:
        return
    assert out.shape == (1, 3, 8, 8)


def test_strip_is_refused_with_lossless():
    with pytest.raises(ConfigError):
        build_codec("webp", (3, 8, 8), quality=50, lossless=True, strip=True)
    with pytest.raises(ConfigError):
        build_codec("webp", (3, 8, 8), quality=50, strip=1)
