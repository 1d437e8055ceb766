"""Aligners: a model outside the family can feed a larger member."""

from __future__ import annotations

import pytest
import torch

from flowcodec.errors import ConfigError
from flowcodec.family.aligner import Aligner, align_digits


def test_aligner_maps_shapes_down_and_up():
    down = Aligner((8, 8, 8), (32, 4, 4))
    assert down(torch.randn(2, 8, 8, 8)).shape == (2, 32, 4, 4)
    up = Aligner((8, 2, 2), (4, 8, 8))
    assert up(torch.randn(2, 8, 2, 2)).shape == (2, 4, 8, 8)
    with pytest.raises(ConfigError, match="expects"):
        down(torch.randn(2, 8, 4, 4))


def test_aligned_small_model_feeds_the_large_member(digits_family):
    res = align_digits(digits_family, point=2, epochs=15, progress=False)
    # The large member finishes from the small model's features nearly as well as alone,
    # and better than the small model's own classifier.
    assert res.through_aligner >= 0.95, res
    assert res.through_aligner >= res.small_alone, res
    assert res.large_alone >= res.through_aligner - 0.05, res
