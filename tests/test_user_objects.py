"""Your objects stay yours (issue 31, item 4): every public function of ``flowcodec.split``
that takes the user's model leaves it as it found it: each module's ``training`` flag,
each parameter's ``requires_grad`` flag, and its weights and buffers.

The model is left in train mode with a mixed state (one batch norm in eval mode, one
frozen convolution), the state a fine-tuning script is in, so a helper that restores
"the model's mode" with one ``model.train(was)`` call is caught too."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import flowcodec.split as split_api


def users_model() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    net.train()
    net.layer1[0].bn1.eval()  # a frozen batch norm inside a model in train mode
    net.conv1.weight.requires_grad_(False)  # a frozen stem
    return net


def state(model: nn.Module):
    return ([(n, m.training) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()])  # fmt: skip


def tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_untouched(model: nn.Module, before, weights, step: str) -> None:
    modes, grads = state(model)
    changed = [n or "<root>" for (n, a), (_, b) in zip(before[0], modes) if a != b]
    assert not changed, f"{step} changed the mode of {len(changed)} modules: {changed[:5]}"
    flags = [n for (n, a), (_, b) in zip(before[1], grads) if a != b]
    assert not flags, f"{step} changed requires_grad of {flags[:5]}"
    now = model.state_dict()
    moved = [k for k, v in weights.items() if not torch.equal(v, now[k])]
    assert not moved, f"{step} changed the weights or buffers {moved[:5]}"


# Every public callable of flowcodec.split that takes the user's model (directly or through
# a SplitModel), and the step below that calls it; a new one must be added here.
WALKED = {"split_model", "train_codec", "SplitModel.as_family", "SplitModel.flow",
          "Flow.run"}  # fmt: skip
NO_MODEL = {"layout_of", "FeatureShape", "CodecTrainResult", "LAYOUTS", "SplitModel"}


def test_the_walk_covers_the_public_api():
    public = set(split_api.__all__) - {"SplitModel"}
    methods = {f"SplitModel.{n}" for n, v in vars(split_api.SplitModel).items()
               if not n.startswith("_") and callable(v)}  # fmt: skip
    unknown = (public | methods) - WALKED - NO_MODEL
    assert not unknown, f"add {sorted(unknown)} to the walk in this file"


def test_the_public_api_leaves_a_model_in_train_mode_as_it_was():
    from channels import FastLink, IIDPacketErasure
    from flowcodec.codecs import build_codec

    model = users_model()
    before, weights = state(model), tensors(model)
    torch.manual_seed(1)
    x = torch.randn(4, 3, 32, 32)

    split = split_api.split_model(model, "layer2", x[:2])
    assert_untouched(model, before, weights, "split_model")

    codec = build_codec("factorized", split.feature_shape, packets=2)
    batches = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    split_api.train_codec(split, codec, batches, steps=2, progress=False)
    assert_untouched(model, before, weights, "train_codec")
    codec.update(force=True)

    split.as_family()
    assert_untouched(model, before, weights, "SplitModel.as_family")

    flow = split.flow(codec, FastLink(mcs=9, snr_db=8.0, seed=0))
    assert_untouched(model, before, weights, "SplitModel.flow")

    result = flow.run(x)
    assert_untouched(model, before, weights, "flow(...).run")
    assert result.predictions.shape == (4,)

    # The flow ran the model in inference mode all the same: what it answers is what the
    # model in eval mode answers when nothing is lost (a lossless codec at the cut).
    clean = split.flow(build_codec("raw", split.feature_shape), IIDPacketErasure(0.0)).run(x)
    assert_untouched(model, before, weights, "flow(...).run (raw codec, no loss)")
    with torch.no_grad():
        model.eval()
        want = model(x).argmax(1)
    assert torch.equal(clean.predictions, want)


def test_a_failing_run_also_leaves_the_model_as_it_was():
    from channels import IIDPacketErasure
    from flowcodec.codecs import build_codec

    model = users_model()
    x = torch.randn(2, 3, 32, 32)
    split = split_api.split_model(model, "layer2", x)
    before, weights = state(model), tensors(model)
    flow = split.flow(build_codec("raw", split.feature_shape), IIDPacketErasure(0.0))

    def boom(*_a, **_k):
        raise RuntimeError("a hop that fails")

    flow._cross = boom  # fails after the flow has set the model to eval mode
    with pytest.raises(RuntimeError, match="a hop that fails"):
        flow.run(x)
    assert_untouched(model, before, weights, "a failing flow(...).run")


def test_flow_run_keeps_its_signature():
    from channels import IIDPacketErasure
    from flowcodec.codecs import build_codec
    from flowcodec.pipeline import Flow

    split = split_api.split_model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), "0",
                                  torch.randn(1, 3, 8, 8))  # fmt: skip
    flow = split.flow(build_codec("raw", split.feature_shape), IIDPacketErasure(0.0))
    assert isinstance(flow, Flow)
    assert inspect.signature(type(flow).run) == inspect.signature(Flow.run)


@pytest.mark.parametrize("trainer", ["train_codec", "train_task_codec"])
def test_codec_trainers_leave_the_family_as_they_found_it(digits, trainer):
    """The codec trainers freeze the family while they run and put back every module's
    mode and every parameter's flag (not one ``family.train(was)`` call)."""
    from flowcodec.codecs import build_codec
    from flowcodec.family import build_family

    torch.manual_seed(0)
    fam = build_family("digits").train()
    fam.exits[0].eval()  # a mixed state, as a fine-tuning script leaves it
    next(fam.stages[1].parameters()).requires_grad_(False)
    before = state(fam)
    train, _ = digits
    if trainer == "train_codec":
        from flowcodec.codecs.train import train_codec

        codec = build_codec("factorized", (16, 8, 8), latent=4, hidden=8)
        train_codec(codec, fam, 3, 1, train, None, epochs=1, batch_size=256, progress=False)
    else:
        from flowcodec.codecs.train_task import TaskTrainConfig, train_task_codec

        codec = build_codec("task", (16, 8, 8), latent=4, stem=[[8, True]], hidden=8, rates=1)
        train_task_codec(codec, fam, 3, 1, train, None,
                         TaskTrainConfig(lams=(0.1,), epochs=1, batch_size=256), progress=False)
    assert state(fam) == before
