"""Datasets: the embedded digits split and the CIFAR-10 loader."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowcodec.data import crop_flip, find_cifar10, load_dataset, load_digits
from flowcodec.errors import ConfigError, DataNotFoundError


def test_digits_split_is_fixed_and_stratified(digits):
    train, test = digits
    assert len(train) == 1437 and len(test) == 360
    assert train.input_shape == (1, 8, 8)
    assert torch.bincount(test.labels).min() >= 35
    again = load_digits()[1]
    assert torch.equal(again.images, test.images)


def test_batches_are_normalised_and_complete(digits):
    train, _ = digits
    seen = 0
    for x, y in train.batches(100):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        seen += len(y)
    assert seen == len(train)
    x = train.normalize(train.images)
    assert abs(float(x.mean())) < 1e-3 and abs(float(x.std()) - 1) < 1e-2


def test_cifar_missing_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.delenv("FLOWCODEC_DATA", raising=False)
    monkeypatch.setenv("FLOWCODEC_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DataNotFoundError) as e:
        find_cifar10(tmp_path / "nowhere")
    assert "FLOWCODEC_DATA" in str(e.value) and "download" in str(e.value)


def test_unknown_dataset_is_config_error():
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_dataset("imagenet")


def test_tarball_is_extracted_once(tmp_path, monkeypatch):
    import tarfile

    src = tmp_path / "src"
    for split in ("train", "test"):
        (src / split / "cat").mkdir(parents=True)
        (src / split / "cat" / "0.jpg").write_bytes(b"not really a jpeg")
    data = tmp_path / "data"
    data.mkdir()
    with tarfile.open(data / "cifar10-jpg.tar.gz", "w:gz") as tf:
        tf.add(src / "train", arcname="train")
        tf.add(src / "test", arcname="test")
    monkeypatch.setenv("FLOWCODEC_DATA", str(data))
    monkeypatch.setenv("FLOWCODEC_CACHE", str(tmp_path / "cache"))
    first = find_cifar10()
    marker = first / "train" / "cat" / "0.jpg"
    stamp = marker.stat().st_mtime_ns
    assert find_cifar10() == first and marker.stat().st_mtime_ns == stamp


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_crop_flip_is_a_shifted_or_mirrored_window(seed):
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    g = torch.Generator().manual_seed(seed)
    y = crop_flip(x, g, pad=2)
    assert y.shape == x.shape
    g2 = torch.Generator().manual_seed(seed)
    assert torch.equal(y, crop_flip(x, g2, pad=2))  # same seed, same crops
    # The centre 4x4 of every output comes from the input (possibly mirrored).
    for b in range(2):
        centre = y[b, :, 2:6, 2:6]
        windows = [x[b, :, i : i + 4, j : j + 4] for i in range(5) for j in range(5)]
        windows += [w.flip(-1) for w in windows]
        assert any(torch.equal(centre, w) for w in windows)


@pytest.mark.data
def test_cifar10_loads_fifty_thousand_and_ten_thousand(cifar10):
    train, test = cifar10
    assert len(train) == 50000 and len(test) == 10000
    assert train.images.dtype == torch.uint8 and train.input_shape == (3, 32, 32)
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert train.classes[0] == "airplane" and train.augment and not test.augment
