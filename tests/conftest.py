"""Shared test set-up: two CPU threads, and the CIFAR-10 copy beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

if "FLOWCODEC_DATA" not in os.environ and SHARED_DATA.is_dir():
    os.environ["FLOWCODEC_DATA"] = str(SHARED_DATA)

torch.set_num_threads(2)


def _cifar_available() -> bool:
    from flowcodec.data import find_cifar10
    from flowcodec.errors import DataNotFoundError

    try:
        find_cifar10()
    except DataNotFoundError:
        return False
    return True


@pytest.fixture(scope="session")
def cifar10():
    """(train, test) CIFAR-10, or skip when no copy can be found."""
    if not _cifar_available():
        pytest.skip("CIFAR-10 not found (set FLOWCODEC_DATA)")
    from flowcodec.data import load_cifar10

    return load_cifar10()


@pytest.fixture(scope="session")
def digits():
    from flowcodec.data import load_digits

    return load_digits()


@pytest.fixture(scope="session")
def digits_family():
    """The trained digits family (trained once and cached by load_pretrained)."""
    from flowcodec.family import load_pretrained

    return load_pretrained("digits", progress=False)
