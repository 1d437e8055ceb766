"""The queueing floor of p99/p50 under Poisson load (experiments/queue_floor.py)."""

from __future__ import annotations

import numpy as np

from experiments.queue_floor import response_times


def test_light_load_answers_in_one_service_time_and_queueing_grows_the_tail():
    light = response_times(0.001, 1, 0.0, 5000, 0)
    assert np.percentile(light, 99) < 1.01  # almost nobody waits
    r25 = response_times(0.25, 1, 0.0, 100_000, 0)
    r50 = response_times(0.5, 1, 0.0, 100_000, 0)
    assert r25.min() >= 1.0 - 1e-9  # nobody is answered faster than the service time
    ratio = [np.percentile(r, 99) / np.percentile(r, 50) for r in (r25, r50)]
    assert 2.3 < ratio[0] < 3.0 < ratio[1]  # M/D/1: about 2.6 at a quarter, 4.4 at half load
    # batching whatever waits shortens the tail at the same offered load
    batched = response_times(0.5, 16, 0.5, 100_000, 0)
    assert np.percentile(batched, 99) < np.percentile(r50, 99)


def test_a_batch_serves_at_most_its_size_and_everyone_is_answered_once():
    r = response_times(3.0, 4, 0.5, 2000, 1)  # overloaded: batches always full
    assert r.shape == (2000,) and np.isfinite(r).all() and (r > 0).all()
