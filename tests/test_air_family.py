"""The cloud-tier CIFAR-10 family (flowcodec.family.air): its budgets, its recipe's parts, and
a short training that resumes exactly."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flowcodec.data import ArrayDataset
from flowcodec.errors import ConfigError
from flowcodec.family import build_family, load_family, save_family
from flowcodec.family.air import AirConfig, _shift_crop, _triangle, train_air, whiten_init

SMALL = dict(widths=(8, 16, 24), exit_widths=(8, 16), extra=1)


def _data(n: int, seed: int) -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    return ArrayDataset(images, labels, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def test_device_members_cost_no_more_than_the_cifar10_family():
    air = build_family("cifar10-air").info()
    old = build_family("cifar10").info()
    assert air[0].flops <= old[0].flops and air[1].flops <= old[1].flops
    assert air[2].flops > 2 * air[1].flops  # the cloud member is much larger


def test_split_is_exact_and_bad_widths_are_refused():
    fam = build_family("cifar10-air", **SMALL).eval()
    x = torch.randn(3, 3, 32, 32)
    for point in (1, 2):
        head, tail = fam.split(3, point)
        assert torch.equal(tail(head(x)), fam.member(3)(x))
    assert fam.feature_shape(1) == (8, 15, 15) and fam.feature_shape(2) == (16, 7, 7)
    try:
        build_family("cifar10-air", widths=(8, 16))
    except ConfigError as e:
        assert "3 positive widths" in str(e)
    else:
        raise AssertionError("two widths were accepted")


def test_whitening_init_whitens_patches():
    g = torch.Generator().manual_seed(0)
    mix = torch.tensor([[1.0, 0.8, 0.6], [0.0, 0.5, 0.4], [0.0, 0.0, 0.3]])
    x = torch.einsum("ij,njhw->nihw", mix, torch.randn(64, 3, 16, 16, generator=g))
    fam = build_family("cifar10-air", **SMALL)
    whiten_init(fam, x)
    conv = fam.stages[0][0]
    out = torch.nn.functional.conv2d(x, conv.weight[:12])  # the 12 positive directions
    flat = out.permute(0, 2, 3, 1).reshape(-1, 12).double()
    cov = flat.T @ flat / len(flat)
    assert torch.allclose(cov, torch.eye(12, dtype=torch.float64), atol=0.05)
    assert torch.equal(conv.weight[12:], -conv.weight[:12])


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5000))
def test_triangle_schedule_rises_then_falls(total):
    v = [_triangle(s, total) for s in range(total + 1)]
    top = max(range(len(v)), key=v.__getitem__)
    assert abs(v[0] - 0.2) < 1e-9 and abs(v[-1] - 0.07) < 1e-9 or total == 1
    assert all(a <= b + 1e-12 for a, b in zip(v[:top], v[1 : top + 1]))
    assert all(a >= b - 1e-12 for a, b in zip(v[top:], v[top + 1 :]))
    assert max(v) <= 1.0 + 1e-12


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 3), st.integers(0, 2**31 - 1))
def test_shift_crop_takes_a_window_of_each_padded_image(r, seed):
    x = torch.randn(6, 2, 5 + 2 * r, 5 + 2 * r)
    out = _shift_crop(x, 5, torch.Generator().manual_seed(seed))
    for i in range(len(x)):
        windows = [x[i, :, a : a + 5, b : b + 5] for a in range(2 * r + 1)
                   for b in range(2 * r + 1)]  # fmt: skip
        assert any(torch.equal(out[i], w) for w in windows)


def test_config_refuses_bad_values():
    for bad in (dict(epochs=0), dict(momentum=1.0), dict(micro_batch=0), dict(lr=-1)):
        try:
            AirConfig(**bad)
        except ConfigError:
            continue
        raise AssertionError(f"{bad} was accepted")


def test_training_learns_resumes_exactly_and_saves(tmp_path):
    train, test = _data(192, 0), _data(64, 1)
    y = train.labels  # learnable: brighten the red channel by class
    train.images[:, 0] = (train.images[:, 0].long() // 3 + 17 * y[:, None, None]).clamp(0, 255)
    test.images[:, 0] = (test.images[:, 0].long() // 3 + 17 * test.labels[:, None, None]).clamp(
        0, 255)
    cfg = dict(epochs=4, batch_size=64, micro_batch=32, progress=False, seed=3)

    torch.manual_seed(0)
    full = build_family("cifar10-air", **SMALL)
    res = train_air(full, train, test, AirConfig(**cfg))
    assert res.steps_done == res.total_steps == 12
    assert res.history[-1]["loss"] < res.history[0]["loss"]

    torch.manual_seed(0)
    part = build_family("cifar10-air", **SMALL)
    ck = tmp_path / "run"
    cut = train_air(part, train, test, AirConfig(**{**cfg, "time_budget_s": 1e-9}),
                    checkpoint=ck)  # the budget ends the run after epoch 1
    assert cut.steps_done == cut.total_steps == 3
    torch.manual_seed(0)
    again = build_family("cifar10-air", **SMALL)
    res2 = train_air(again, train, test, AirConfig(**cfg), checkpoint=ck, resume=True)
    assert res2.steps_done == 12 and len(res2.history) == 4
    for a, b in zip(full.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)

    path = save_family(full, tmp_path / "fam", res, half=True)
    loaded = load_family(path.with_suffix(""))
    assert loaded.config["name"] == "cifar10-air"
    assert [m.flops for m in loaded.info()] == [m.flops for m in full.info()]


def test_warm_restart_keeps_the_init_weights_whitening_and_refuses_other_configs(tmp_path):
    from flowcodec.family.pretrained import _load_init

    train = _data(128, 4)
    torch.manual_seed(1)
    first = build_family("cifar10-air", **SMALL)
    train_air(first, train, None, AirConfig(epochs=1, batch_size=64, progress=False))
    save_family(first, tmp_path / "first", None)

    torch.manual_seed(2)  # other fresh weights: the init replaces all of them
    warm = build_family("cifar10-air", **SMALL)
    _load_init(warm, tmp_path / "first", "cifar10-air")
    for a, b in zip(first.state_dict().values(), warm.state_dict().values()):
        assert torch.equal(a, b)
    filters = warm.stages[0][0].weight.clone()
    head = next(p for p in warm.exits[-1].parameters()).clone()
    train_air(warm, train, None, AirConfig(epochs=1, batch_size=64, progress=False),
              warm=True)  # fmt: skip
    assert torch.equal(warm.stages[0][0].weight, filters)  # whitening kept, not recomputed
    assert not torch.equal(next(p for p in warm.exits[-1].parameters()), head)  # it trained

    other = build_family("cifar10-air", widths=(8, 16, 32), exit_widths=(8, 16), extra=1)
    try:
        _load_init(other, tmp_path / "first", "cifar10-air")
    except ConfigError as e:
        assert "configuration" in str(e)
    else:
        raise AssertionError("a family of another configuration was accepted as init")
