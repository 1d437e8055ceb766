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


def test_train_aligner_gives_the_frozen_models_back_as_they_were(digits_family, digits):
    """The family passed in keeps its modes and requires_grad flags (it used to be left
    frozen, which broke a later test that fine-tunes a copy of it)."""
    from flowcodec.family.aligner import train_aligner

    train, test = digits
    small_head, _ = digits_family.split(1, 1)
    large_head, large_tail = digits_family.split(3, 1)
    flags = [p.requires_grad for p in digits_family.parameters()]
    digits_family.stages[0].train()  # a mixed state, as a user might leave it
    modes = [m.training for m in digits_family.modules()]
    with torch.no_grad():
        shape = tuple(small_head(train.images[:1]).shape[1:])
    train_aligner(Aligner(shape, shape), small_head, large_head, large_tail,
                  train.take(torch.arange(64)), test.take(torch.arange(32)), epochs=1,
                  progress=False)
    assert [p.requires_grad for p in digits_family.parameters()] == flags
    assert [m.training for m in digits_family.modules()] == modes
    digits_family.eval()
