"""Bring your own model: split any PyTorch model at a named module and code what crosses.

:func:`split_model` cuts ``model`` right after the module called ``at`` and returns a
:class:`SplitModel` whose ``tail(head(x))`` equals ``model(x)``. ``nn.Sequential`` models
are sliced; other models are traced with ``torch.fx`` (the named module kept as one
call) and cut in the graph. A cut is refused with a :class:`~flowcodec.errors.SplitError`
naming the reason: no such module, the module is called more than once, the model
cannot be traced, or a value other than the module's output crosses the cut (a skip
connection around it).

Transformers: cuts between the layers of ``nn.TransformerEncoder`` are traced through a
layer-by-layer form of its forward (its own has data-dependent control flow);
``leaf_modules=`` keeps any other untraceable submodule whole. The split reports the
*layout* of what crosses (:data:`~flowcodec.shapes.LAYOUTS`: ``"chw"``, ``"hwc"``,
``"tokens"``, ``"vector"``, ``"other"``), read from the last module with weights before the
cut (a convolution or batch norm: channels first; a linear layer or layer norm: channels
last), and ``split.feature_shape`` carries it (:class:`~flowcodec.shapes.FeatureShape`), so
codecs built on it check it. Channels-last maps (swin's ``(H, W, C)``) are moved
channels-first at the cut by default, an exact permute on each side.

:func:`train_codec` trains any :class:`~flowcodec.codecs.FeatureCodec` at the cut against
the model's own outputs (distillation; cross-entropy when labels are given), and
:meth:`SplitModel.flow` runs the coded model over any link with per-sample traces.

Example
-------
>>> import torch, torchvision
>>> from flowcodec.split import split_model
>>> net = torchvision.models.resnet18(num_classes=10).eval()
>>> sm = split_model(net, "layer2", torch.randn(1, 3, 64, 64))
>>> sm.feature_shape
(128, 8, 8)
>>> x = torch.randn(2, 3, 64, 64)
>>> torch.allclose(sm.tail(sm.head(x)), net(x))
True
"""

from __future__ import annotations

import difflib
import functools
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from flowcodec._moved import moved
from flowcodec.errors import ConfigError, SplitError
from flowcodec.pipeline import Flow, Hop, Tier
from flowcodec.shapes import LAYOUTS as _LAYOUTS
from flowcodec.shapes import FeatureShape as _FeatureShape
from flowcodec.shapes import layout_of as _layout_of

__all__ = ["SplitModel", "split_model", "train_codec", "CodecTrainResult"]

# FeatureShape, LAYOUTS and layout_of live in flowcodec.shapes; the old names warn for a release
__getattr__ = moved(__name__, dict.fromkeys(["FeatureShape", "LAYOUTS", "layout_of"],
                                            "flowcodec.shapes"))


def _encoder_forward(tracer: fx.Tracer, enc: nn.TransformerEncoder, args, kwargs):
    """``nn.TransformerEncoder.forward`` written out layer by layer for tracing.

    Its own forward checks masks and the nested-tensor fast path with data-dependent
    branches; without a mask or padding mask it computes ``norm(layer_n(...layer_1(src)))``,
    which is what is traced here (each layer one call, so cuts between layers work).
    """
    names = ("src", "mask", "src_key_padding_mask", "is_causal")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    extra = [k for k, v in bound.items() if k != "src" and v is not None and v is not False]
    if extra:
        raise SplitError(f"cannot cut inside nn.TransformerEncoder called with {extra}: "
                         "only the mask-free call (encoder(src)) is traced layer by layer; "
                         "keep it whole with leaf_modules=[...] and cut before or after it")
    x = bound["src"]
    for layer in enc.layers:
        x = tracer.call_module(layer, layer.forward, (x,), {})
    if enc.norm is not None:
        x = tracer.call_module(enc.norm, enc.norm.forward, (x,), {})
    return x


class _CutTracer(fx.Tracer):
    """Keeps the module being cut at as one call (and ``leaf_modules``); traces into the
    parents of the cut, ``nn.TransformerEncoder`` layer by layer."""

    def __init__(self, at: str, leaf_names: frozenset = frozenset(),
                 leaf_types: tuple = ()) -> None:  # fmt: skip
        super().__init__()
        self.at = at
        self.leaf_names, self.leaf_types = leaf_names, leaf_types

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname == self.at:
            return True
        if self.at.startswith(qualname + "."):
            return False  # trace into the parents of the cut
        if qualname in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward, args, kwargs):
        if isinstance(m, nn.TransformerEncoder) and not self.is_leaf_module(
                m, self.path_of_module(m)):  # fmt: skip
            return _encoder_forward(self, m, args, kwargs)
        return super().call_module(m, forward, args, kwargs)


@dataclass
class SplitModel:
    """A model cut in two: ``head`` (device) and ``tail`` (receiver).

    ``feature_shape`` is the per-sample shape of what crosses the cut (a
    :class:`FeatureShape`: its ``layout`` is also ``split.layout``), ``input_shape`` that
    of the inputs it was traced with. ``native_layout`` is the layout the model itself
    produces at the cut: ``"hwc"`` with ``layout == "chw"`` means the split moved the
    channel axis first (an exact permute at the end of the head and its inverse at the
    start of the tail).
    """

    head: nn.Module
    tail: nn.Module
    feature_shape: tuple[int, ...]
    input_shape: tuple[int, ...]
    at: str
    native_layout: str = field(default="other")

    @property
    def layout(self) -> str:
        """The :data:`~flowcodec.shapes.LAYOUTS` entry of what crosses the cut."""
        return _layout_of(self.feature_shape) or "other"

    def as_family(self):
        """A two-stage :class:`~flowcodec.family.EarlyExitFamily` (head, tail) whose last
        exit is the identity, so :class:`~flowcodec.pipeline.Flow` can run it. The model's
        modes and ``requires_grad`` flags are as they were before the call."""
        from flowcodec.family.base import EarlyExitFamily

        with _Preserved(self.head, self.tail):
            return EarlyExitFamily([self.head, self.tail], [nn.Identity(), nn.Identity()],
                                   self.input_shape, {"name": f"split@{self.at}"})  # fmt: skip

    def flow(self, codec, link, symbol_rate: float = 1e6, delay_s: float = 0.0,
             device_flops_per_s: float = 20e9, remote_flops_per_s: float = 20e12,
             snr_db: float | None = None):  # fmt: skip
        """A device -> receiver :class:`~flowcodec.pipeline.Flow` with ``codec`` at the cut.

        Building the flow and each ``run`` of it leave the model as it was: ``run`` computes
        in eval mode (batch norm on running statistics, no dropout) and then restores every
        module's mode and every parameter's ``requires_grad`` flag, also when it fails."""
        tiers = [Tier("device", device_flops_per_s, 1), Tier("receiver", remote_flops_per_s, 2)]
        with _Preserved(self.head, self.tail):  # Flow() counts FLOPs in eval mode
            return SplitFlow(self.as_family(), tiers,
                             [Hop(codec, link, symbol_rate, delay_s, snr_db)])  # fmt: skip


class SplitFlow(Flow):
    """The :class:`~flowcodec.pipeline.Flow` of :meth:`SplitModel.flow`: ``run`` computes in
    eval mode, then puts every module of the family (the user's model) back in the mode it
    found it in and every parameter's ``requires_grad`` flag back, also when it fails."""

    @functools.wraps(Flow.run)
    def run(self, x, generator=None):
        with _Preserved(self.family):
            return super().run(x, generator)


def _module_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


def _check_name(model: nn.Module, at: str) -> None:
    names = _module_names(model)
    if at not in names:
        close = difflib.get_close_matches(at, names, n=5)
        hint = f"; did you mean {close}?" if close else f"; modules include {names[:8]}"
        raise SplitError(f"model has no module named {at!r}{hint}")


def _split_sequential(model: nn.Sequential, at: str) -> tuple[nn.Module, nn.Module]:
    names = [n for n, _ in model.named_children()]
    i = names.index(at)
    return model[: i + 1], model[i + 1 :]


def _leaves(model: nn.Module, at: str, leaf_modules) -> tuple[frozenset, tuple]:
    names, types = set(), []
    for item in leaf_modules or ():
        if isinstance(item, type) and issubclass(item, nn.Module):
            types.append(item)
        elif isinstance(item, str):
            _check_name(model, item)
            if at.startswith(item + "."):
                raise SplitError(f"leaf_modules holds {item!r}, which contains the cut {at!r}: "
                                 "a module kept whole cannot be cut inside")  # fmt: skip
            names.add(item)
        else:
            raise SplitError(f"leaf_modules takes module names or nn.Module classes, got "
                             f"{item!r}")  # fmt: skip
    return frozenset(names), tuple(types)


def _split_fx(model: nn.Module, at: str, leaf_modules=None) -> tuple[nn.Module, nn.Module]:
    names, types = _leaves(model, at, leaf_modules)
    try:
        graph = _CutTracer(at, names, types).trace(model)
    except SplitError:
        raise
    except Exception as e:  # fx raises many kinds (TraceError, TypeError, ...)
        raise SplitError(
            f"cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: {e}); "
            "data-dependent control flow prevents a graph cut. If it is inside a submodule "
            "the cut does not need to enter, keep that submodule whole: "
            "split_model(..., leaf_modules=['name.of.module'] or [ModuleClass]); cuts "
            "between the layers of nn.TransformerEncoder work as they are"
        ) from e
    nodes = list(graph.nodes)
    cuts = [n for n in nodes if n.op == "call_module" and n.target == at]
    if not cuts:
        raise SplitError(f"module {at!r} is never called in {type(model).__name__}.forward")
    if len(cuts) > 1:
        raise SplitError(f"module {at!r} is called {len(cuts)} times; a cut needs one call")
    cut = cuts[0]
    pos = {n: i for i, n in enumerate(nodes)}
    before = {n for n in nodes if pos[n] < pos[cut]}
    for n in nodes[pos[cut] + 1 :]:
        for arg in n.all_input_nodes:
            if arg in before and arg.op != "get_attr":
                raise SplitError(
                    f"cannot cut after {at!r}: {arg.name!r}, computed before the cut, is used "
                    f"after it by {n.name!r} (a skip connection or reused input crosses the cut)"
                )
    # Head: everything up to the cut, returning its output.
    hg = fx.Graph()
    env: dict = {}
    for n in nodes[: pos[cut] + 1]:
        env[n] = hg.node_copy(n, lambda a: env[a])
    hg.output(env[cut])
    # Tail: a placeholder for the cut's output, then the rest.
    tg = fx.Graph()
    tenv: dict = {cut: tg.placeholder("features")}

    def lookup(a):
        if a not in tenv:  # a parameter or buffer fetched before the cut: fetch it again
            tenv[a] = tg.node_copy(a, lookup)
        return tenv[a]

    for n in nodes[pos[cut] + 1 :]:
        tenv[n] = tg.node_copy(n, lookup)
    head = fx.GraphModule(model, hg, "Head")
    tail = fx.GraphModule(model, tg, "Tail")
    return head, tail


class _Preserved:
    """Restores the ``training`` flag of every module and the ``requires_grad`` flag of
    every parameter of ``modules`` on exit, so a caller's model is left as it was."""

    def __init__(self, *modules: nn.Module) -> None:
        self.modes = [(m, m.training) for root in modules for m in root.modules()]
        self.grads = [(p, p.requires_grad) for root in modules for p in root.parameters()]

    def __enter__(self) -> _Preserved:
        return self

    def __exit__(self, *exc) -> None:
        for m, mode in self.modes:
            m.training = mode
        for p, flag in self.grads:
            p.requires_grad_(flag)


_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
          nn.modules.instancenorm._InstanceNorm)  # fmt: skip
_LAST = (nn.Linear, nn.LayerNorm, nn.MultiheadAttention, nn.TransformerEncoderLayer,
         nn.TransformerDecoderLayer)  # fmt: skip


def _channel_axis(model: nn.Module, head: nn.Module, x: torch.Tensor, feat: torch.Tensor):
    """``"first"``, ``"last"`` or None: the channel axis of ``feat`` as the last module with
    weights that ran in ``head(x)`` sees it, when that module's output is ``feat``'s shape."""
    seen: list = []

    def hook(m, _inp, out):
        if isinstance(out, tuple) and out:  # attention returns (output, weights)
            out = out[0]
        if isinstance(out, torch.Tensor):
            seen.append((m, tuple(out.shape)))

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if any(True for _ in m.parameters(recurse=False)) or isinstance(m, _LAST)]
    try:
        head(x)
    finally:
        for h in handles:
            h.remove()
    for m, shape in reversed(seen):
        if isinstance(m, _FIRST + _LAST):
            if shape != tuple(feat.shape):
                return None
            return "first" if isinstance(m, _FIRST) else "last"
    return None


def _layout(axis: str | None, shape: tuple[int, ...], at: str) -> str:
    nd = len(shape)
    if nd == 1:
        return "vector"
    if axis is None:
        guess = {2: "tokens", 3: "chw"}.get(nd, "other")
        if nd in (2, 3):
            warnings.warn(f"split at {at!r}: cannot tell the channel axis of features {shape} "
                          f"(no convolution, norm or linear layer ends the head); assuming "
                          f"{_LAYOUTS[guess]}; pass layout= to split_model to say which",
                          stacklevel=3)  # fmt: skip
        return guess
    if nd == 2:
        return "tokens" if axis == "last" else "other"
    if nd == 3:
        return "hwc" if axis == "last" else "chw"
    return "other"


class _Permute(nn.Module):
    def __init__(self, *dims: int) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


def split_model(model: nn.Module, at: str, example_input: torch.Tensor,
                leaf_modules: Iterable | None = None, layout: str | None = None,
                channels_first: bool = True) -> SplitModel:  # fmt: skip
    """Cut ``model`` right after module ``at``; ``example_input`` ``(B, ...)`` fixes shapes.

    ``model`` is not changed: its modules keep their modes and parameters their
    ``requires_grad`` flags (the head and tail share its modules and weights).
    Raises :class:`SplitError` when the cut cannot be made (the message says why),
    including when ``example_input`` has no batch dimension.

    Parameters
    ----------
    leaf_modules : iterable of str or nn.Module classes, optional
        Submodules (by name or class) that torch.fx keeps as one call instead of tracing
        into them: the way past data-dependent control flow inside a submodule the cut
        does not enter. ``nn.TransformerEncoder`` needs nothing: cuts between its layers
        are traced through a layer-by-layer form of its forward.
    layout : str, optional
        The :data:`LAYOUTS` entry of the features at the cut, if the detected one is wrong
        (it is read from the last module with weights before the cut).
    channels_first : bool
        Move channels-last maps ``(H, W, C)`` channels-first at the cut (exact: a permute
        closes the head and its inverse opens the tail), so the ``(C, H, W)`` codecs apply;
        ``split.native_layout`` stays ``"hwc"``. With False the split keeps ``(H, W, C)``,
        which the token codecs take as ``H * W`` tokens.
    """
    if not isinstance(model, nn.Module):
        raise SplitError(f"expected an nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor) or example_input.ndim < 1:
        raise SplitError("example_input must be a batched tensor (B, ...)")
    if example_input.shape[0] == 0:
        raise SplitError("example_input is an empty batch; give at least one sample (B >= 1)")
    if layout is not None and layout not in _LAYOUTS:
        raise SplitError(f"layout must be one of {sorted(_LAYOUTS)}, got {layout!r}")
    _check_name(model, at)
    if isinstance(model, nn.Sequential) and at in dict(model.named_children()) \
            and not leaf_modules:  # fmt: skip
        head, tail = _split_sequential(model, at)
    else:
        head, tail = _split_fx(model, at, leaf_modules)
    b = example_input.shape[0]
    with _Preserved(model), torch.no_grad():
        model.eval()
        try:
            h = head(example_input)
        except Exception as e:  # the model's own error, whatever its kind
            raise SplitError(
                f"the model's layers up to {at!r} fail on example_input "
                f"{tuple(example_input.shape)} ({type(e).__name__}: {e}); example_input must "
                f"be a batch the model accepts, (B, ...)"
            ) from e
        if not isinstance(h, torch.Tensor):
            raise SplitError(f"module {at!r} returns {type(h).__name__}, not one tensor")
        try:  # a batch dimension scales with the batch; an unbatched input does not
            h2 = head(torch.cat([example_input, example_input]))
        except Exception as e:  # the model rejects a doubled first axis: it is not a batch
            h2 = e
        axis = _channel_axis(model, head, example_input, h) if layout is None else None
    if (h.ndim < 1 or h.shape[0] != b or not isinstance(h2, torch.Tensor)
            or tuple(h2.shape) != (2 * b, *h.shape[1:])):  # fmt: skip
        raise SplitError(
            f"example_input {tuple(example_input.shape)} does not look batched: the first "
            f"axis must be the batch (B, ...), e.g. x.unsqueeze(0) for one sample "
            f"(head output {tuple(h.shape)} for it)"
        )
    shape = tuple(h.shape[1:])
    native = layout or _layout(axis, shape, at)
    if native == "hwc" and channels_first:
        head = nn.Sequential(head, _Permute(0, 3, 1, 2))
        tail = nn.Sequential(_Permute(0, 2, 3, 1), tail)
        return SplitModel(head, tail, _FeatureShape((shape[2], shape[0], shape[1]), "chw"),
                          tuple(example_input.shape[1:]), at, native)  # fmt: skip
    return SplitModel(head, tail, _FeatureShape(shape, native), tuple(example_input.shape[1:]),
                      at, native)  # fmt: skip


@dataclass
class CodecTrainResult:
    """Final loss terms of codec training (averages over the last 20 steps)."""

    distortion: float
    bits: float
    steps: int


def _batches(inputs: Iterable):
    """Cycle ``inputs`` for ever; a one-shot iterator (e.g. a generator) is cycled from the
    batches it gave on its first pass. Raises ConfigError when it yields nothing."""
    if isinstance(inputs, torch.Tensor):
        raise ConfigError("inputs must yield batches (an iterable of x or (x, y)), not one "
                          "tensor; wrap it in a list: [x]")  # fmt: skip
    try:
        it = iter(inputs)
    except TypeError:
        raise ConfigError(f"inputs must be an iterable of batches, got "
                          f"{type(inputs).__name__}") from None  # fmt: skip
    one_shot = it is inputs
    seen: list = []
    count = 0
    for batch in it:
        count += 1
        if one_shot:
            seen.append(batch)
        yield batch
    if not count:
        raise ConfigError("inputs yielded no batches; train_codec needs at least one")
    while True:
        yield from (seen if one_shot else inputs)


def _unpack(batch, i: int):
    x, y = (batch if isinstance(batch, (tuple, list)) else (batch, None))[:2]
    if not isinstance(x, torch.Tensor) or x.ndim < 1:
        raise ConfigError(f"batch {i} of inputs: expected a tensor x (B, ...) or (x, y), "
                          f"got {type(x).__name__}")  # fmt: skip
    if x.shape[0] == 0:
        raise ConfigError(f"batch {i} of inputs is empty (B = 0); every batch needs a sample")
    if y is not None and (not isinstance(y, torch.Tensor) or y.shape[:1] != x.shape[:1]):
        raise ConfigError(f"batch {i} of inputs: labels must be a tensor of {x.shape[0]} "
                          f"class indices")  # fmt: skip
    return x, y


def train_codec(
    split: SplitModel,
    codec,
    inputs: Iterable,
    steps: int = 200,
    lam: float = 1e-3,
    beta: float = 0.0,
    lr: float = 1e-3,
    temperature: float = 1.0,
    progress: bool = True,
) -> CodecTrainResult:
    """Train ``codec`` at the cut of ``split`` with head and tail frozen.

    ``inputs`` yields ``x`` or ``(x, y)`` batches and is cycled (a one-shot iterator such
    as a generator is cycled from the batches it gave on its first pass, which are kept).
    Without labels the loss is the KL divergence from the model's own output distribution
    (distillation), with labels the cross-entropy; plus ``beta`` * feature MSE and ``lam``
    * estimated bits per sample (the codec's ``forward`` rate estimate).

    The model behind ``split`` is left as it was: its modules' modes and its parameters'
    ``requires_grad`` flags are restored on return, also when training fails. Empty
    inputs, empty batches and bad settings raise :class:`~flowcodec.errors.ConfigError`.
    """
    from flowcodec.progress import tqdm

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be an integer >= 1, got {steps!r}")
    if not lam >= 0 or not beta >= 0 or not lr > 0 or not temperature > 0:
        raise ConfigError(f"lam and beta must be >= 0, lr and temperature > 0; got lam={lam!r}, "
                          f"beta={beta!r}, lr={lr!r}, temperature={temperature!r}")
    params = [p for p in codec.parameters() if p.requires_grad]
    if not params:
        raise ConfigError(f"codec {getattr(codec, 'name', type(codec).__name__)!r} has no "
                          "trainable parameters, so there is nothing to train: use it as it is "
                          "(codec.fit(features) sets its statistics), or train a learned codec "
                          "('factorized', 'hyperprior', or 'token-prune' for token features)")
    with _Preserved(split.head, split.tail):
        for m in (split.head, split.tail):
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)
        return _train_loop(split, codec, params, _batches(inputs), steps, lam, beta, lr,
                           temperature, tqdm, progress)  # fmt: skip


def _train_loop(split, codec, params, batches, steps, lam, beta, lr, temperature, tqdm,
                progress) -> CodecTrainResult:  # fmt: skip
    opt = torch.optim.Adam(params, lr=lr)
    codec.train()
    hist: list[tuple[float, float]] = []
    bar = tqdm(range(steps), desc="train codec", disable=not progress, leave=False)
    for i in bar:
        x, y = _unpack(next(batches), i)
        with torch.no_grad():
            h = split.head(x)
            ref = split.tail(h)
        out = codec(h)
        logits = split.tail(out.features)
        if y is None:
            t = temperature
            dist = nn.functional.kl_div(
                (logits / t).log_softmax(1), (ref / t).softmax(1), reduction="batchmean"
            )
        else:
            dist = nn.functional.cross_entropy(logits, y)
        if beta:
            dist = dist + beta * nn.functional.mse_loss(out.features, h)
        bits = out.bits.mean()
        loss = dist + lam * bits
        aux = getattr(codec, "aux_loss", None)
        if callable(aux):  # CompressAI entropy models fit their CDF quantiles by this term,
            loss = loss + aux()  # which touches only the quantile parameters
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hist.append((float(dist.detach()), float(bits.detach())))
        bar.set_postfix(dist=f"{hist[-1][0]:.3f}", bits=f"{hist[-1][1]:.0f}")
    codec.eval()
    tail = hist[-20:]
    return CodecTrainResult(sum(d for d, _ in tail) / len(tail),
                            sum(b for _, b in tail) / len(tail), steps)  # fmt: skip
