"""The scale-out options without Ray or torchrun: argument checks, the hint when Ray is
missing, and the batch sharding that DDP training uses."""

from __future__ import annotations

import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from flowcodec.errors import ConfigError
from flowcodec.scale.ddp import Dist
from flowcodec.scale.ray_engine import INSTALL_HINT, RayEngine, engine_from_args


@given(n=st.integers(0, 300), world=st.integers(1, 9))
def test_rank_shards_partition_every_global_batch(n, world):
    x = torch.arange(n)
    parts = [Dist(rank=r, world=world).shard(x, None) for r in range(world)]
    assert all(p[1] is None for p in parts)
    got = torch.cat([p[0] for p in parts]).sort().values
    assert torch.equal(got, x)
    sizes = [len(p[0]) for p in parts]
    assert max(sizes) - min(sizes) <= 1  # as even as the batch allows


def test_without_ray_the_engine_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(RuntimeError, match=r"pip install 'flowcodec\[ray\]'"):
        RayEngine(workers=2).start()
    assert "flowcodec[ray]" in INSTALL_HINT


def test_a_start_in_the_background_raises_its_error_where_the_engine_is_used(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError in the thread
    eng = RayEngine(workers=2, progress=False).start(background=True)
    with pytest.raises(RuntimeError, match=r"pip install 'flowcodec\[ray\]'"):
        eng.map(abs, [(-1,)])
    eng.close()  # nothing was started: closing is a no-op


@pytest.mark.parametrize("workers", [0, -1, 1.5, True])
def test_engine_workers_must_be_a_positive_integer(workers):
    with pytest.raises(ConfigError, match="workers"):
        RayEngine(workers=workers)


def test_address_needs_the_ray_engine():
    from flowcodec.cli import build_parser

    args = build_parser().parse_args(["rd", "--config", "digits", "--address", "auto"])
    with pytest.raises(ConfigError, match="--engine ray"):
        engine_from_args(args)
    args = build_parser().parse_args(["latency", "--engine", "ray", "--workers", "3"])
    eng = engine_from_args(args)
    assert isinstance(eng, RayEngine) and eng.workers == 3 and eng.address is None
    assert engine_from_args(build_parser().parse_args(["rd", "--config", "digits"])) is None


def test_rd_on_ray_refuses_a_family_object(tmp_path, digits_family):
    import json

    from flowcodec.rd import run_rd

    cfg = json.loads(open("experiments/rd_digits.json").read())
    with pytest.raises(ConfigError, match="by its name"):
        run_rd(cfg, tmp_path, family=digits_family, engine=RayEngine(workers=1))


def test_latency_configs_take_cell_seeds_as_a_boolean():
    import json

    from flowcodec.config import validate_latency_config

    cfg = json.loads(open("experiments/latency_digits.json").read())
    assert cfg["cell_seeds"] is True
    validate_latency_config(cfg)
    with pytest.raises(ConfigError, match="cell_seeds"):
        validate_latency_config({**cfg, "cell_seeds": "yes"})
