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


_DECODE = """
import sys, torch
from safetensors.torch import save_file
from flowcodec.bitstream import Bitstream
from flowcodec.codecs.zoo import load_codec
torch.set_num_threads(int(sys.argv[3]))  # float sums depend on the thread count
codec = load_codec(sys.argv[1])
streams = [Bitstream.from_bytes(open(p, "rb").read()) for p in sys.argv[4:]]
save_file({"out": codec.decompress(streams).contiguous()}, sys.argv[2])
"""


@pytest.fixture
def decode_in_fresh_process(tmp_path):
    """``decode(checkpoint_path, streams)``: the streams written to files, read back and
    decoded by the checkpoint in a new Python process (same thread count); returns its
    output tensor, to compare with this process's."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    def decode(path, streams) -> torch.Tensor:
        files = []
        for i, s in enumerate(streams):
            f = tmp_path / f"fresh_{i}.bin"
            f.write_bytes(s.to_bytes())
            files.append(str(f))
        out = tmp_path / "fresh_out.safetensors"
        subprocess.run([sys.executable, "-c", _DECODE, str(path), str(out),
                        str(torch.get_num_threads()), *files], check=True, timeout=300)  # fmt: skip
        return load_file(str(out))["out"]

    return decode
