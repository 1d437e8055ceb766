"""Saved and shipped codec checkpoints (flowcodec/codecs/zoo.py): flipped bits, a missing hash
and configs asking for huge or odd models are CheckpointErrors; every checkpoint records its
SHA-256."""

from __future__ import annotations

import json
import time

import pytest
from helpers import STREAM_CODECS as CODECS
from helpers import ready_small as ready

from flowcodec.codecs.zoo import load_codec, save_codec
from flowcodec.errors import CheckpointError
from flowcodec.family.checkpoint import record_sha256


# --- damaged checkpoints (issue 14, hole 3) -------------------------------------------------
def _saved(tmp_path, name="hyperprior"):
    return save_codec(ready(name), tmp_path / name, CODECS[name], half=False)


def _flip_tensor_bit(path, key, bit=30, rehash=False):
    from safetensors.torch import load_file, save_file

    state = load_file(str(path))
    t = state[key].clone().view(-1)
    t[0] ^= 1 << bit
    state[key] = t.view(state[key].shape)
    save_file(state, str(path))
    if rehash:
        record_sha256(path.with_suffix(""))


@pytest.mark.parametrize("key", ["gaussian_conditional._cdf_length",
                                 "gaussian_conditional._quantized_cdf",
                                 "gaussian_conditional._offset",
                                 "entropy_bottleneck._cdf_length",
                                 "entropy_bottleneck._quantized_cdf"])  # fmt: skip
@pytest.mark.parametrize("rehash", [False, True])
def test_flipped_table_bits_are_a_checkpoint_error(tmp_path, key, rehash):
    """Without a new hash the SHA-256 catches the flip; with one (a deliberate edit), the
    table validation does, before any C++ code sees the tables."""
    path = _saved(tmp_path)
    _flip_tensor_bit(path, key, rehash=rehash)
    why = "CDF|_offset|_cdf_length" if rehash else "SHA-256"
    with pytest.raises(CheckpointError, match=why):
        load_codec(path)


def test_zoo_stored_hyperprior_with_a_flipped_table_bit_is_refused(tmp_path):
    # stored as the zoo stores codecs (float16 transforms); the shipped hyperprior left the
    # zoo to keep it under 30 MB
    save_codec(ready("hyperprior"), tmp_path / "h", CODECS["hyperprior"])
    load_codec(tmp_path / "h")
    _flip_tensor_bit(tmp_path / "h.safetensors", "gaussian_conditional._cdf_length", bit=20)
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_codec(tmp_path / "h")


def test_flipped_weight_bits_and_missing_hash_are_checkpoint_errors(tmp_path):
    path = _saved(tmp_path, "factorized")
    raw = bytearray(path.read_bytes())
    for pos in (len(raw) - 1, len(raw) // 2, 9):
        bad = bytearray(raw)
        bad[pos] ^= 0x01
        path.write_bytes(bytes(bad))
        with pytest.raises(CheckpointError):
            load_codec(path)
    path.write_bytes(bytes(raw))
    load_codec(path)
    meta = path.with_suffix(".json")
    cfg = json.loads(meta.read_text())
    del cfg["sha256"]
    meta.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_codec(path)


@pytest.mark.parametrize("change", [
    {"feature_shape": [16, 2**20, 2**20]},
    {"feature_shape": [2**40, 8, 8]},
    {"kwargs": {"latent": 10**9, "hidden": 16, "packets": 2}},
    {"kwargs": {"latent": 8, "hidden": 2**31, "packets": 2}},
    {"kwargs": {"latent": 8, "hidden": 16, "packets": 2, "hyper": 10**8}},
    {"feature_shape": "abc"},
    {"kwargs": []},
])  # fmt: skip
def test_config_asking_for_huge_or_odd_models_is_a_checkpoint_error(tmp_path, change):
    path = _saved(tmp_path)
    meta = path.with_suffix(".json")
    cfg = json.loads(meta.read_text())
    cfg["config"].update(change)
    meta.write_text(json.dumps(cfg))
    t = time.perf_counter()
    with pytest.raises(CheckpointError):
        load_codec(path)
    assert time.perf_counter() - t < 30


def test_save_codec_records_the_hash_and_shipped_checkpoints_carry_one():
    from flowcodec.codecs.zoo import CODEC_ZOO

    for meta in CODEC_ZOO.glob("*.json"):
        rec = json.loads(meta.read_text())
        if "weights_of" in rec:  # a variant pins the checkpoint it shares tensors with
            assert len(rec.get("weights_of_sha256", "")) == 64, meta.name
            assert ("sha256" in rec) == meta.with_suffix(".safetensors").is_file(), meta.name
        if "sha256" in rec or "weights_of" not in rec:
            assert len(rec.get("sha256", "")) == 64, meta.name
