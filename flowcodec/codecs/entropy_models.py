"""Entropy models for learned codecs: the factorized prior and the Gaussian conditional.

:func:`entropy_bottleneck` and :func:`gaussian_conditional` build CompressAI's modules
(``backend="compressai"``) or their twins :class:`TorchEntropyBottleneck` and
:class:`TorchGaussianConditional` (``"torch"``, ``"auto"``): the same parameterisation,
state-dict keys, likelihoods and ``update()``, without importing ``compressai``
(:func:`compressai_extension` loads its C++ extensions directly). An example:
:mod:`flowcodec.codecs.entropy`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flowcodec.errors import ConfigError

__all__ = ["have_compressai", "compressai_extension", "entropy_bottleneck",
           "gaussian_conditional", "TorchEntropyBottleneck", "TorchGaussianConditional",
           "scale_table"]


def have_compressai() -> bool:
    """Whether CompressAI is installed (its rANS coder is needed to code)."""
    import importlib.util

    return importlib.util.find_spec("compressai") is not None


def compressai_extension(name: str):
    """CompressAI's C++ extension ``name`` (``ans`` or ``_CXX``), loaded without importing
    the ``compressai`` package (whose import pulls in torchvision and all its models)."""
    import importlib.machinery
    import importlib.util
    import sys
    from pathlib import Path

    full = f"compressai.{name}"
    if full in sys.modules:
        return sys.modules[full]
    spec = importlib.util.find_spec("compressai")
    if spec is None or spec.origin is None:
        raise ConfigError("coding a learned codec needs CompressAI (pip install compressai)")
    folder = Path(spec.origin).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        f = folder / f"{name}{suffix}"
        if f.is_file():
            loader = importlib.machinery.ExtensionFileLoader(full, str(f))
            mspec = importlib.util.spec_from_file_location(full, f, loader=loader)
            mod = importlib.util.module_from_spec(mspec)
            loader.exec_module(mod)
            sys.modules[full] = mod
            return mod
    raise ConfigError(f"CompressAI's extension {name!r} not found in {folder}")


def _pmf_to_cdf(pmf, tail_mass, pmf_length, max_length, precision: int = 16):
    """Quantised CDF tables (int32, one row per distribution) as CompressAI builds them."""
    cxx = compressai_extension("_CXX")
    cdf = torch.zeros((len(pmf_length), max_length + 2), dtype=torch.int32)
    for i, p in enumerate(pmf):
        prob = torch.cat((p[: pmf_length[i]], tail_mass[i]), dim=0)
        q = torch.IntTensor(cxx.pmf_to_quantized_cdf(prob.tolist(), precision))
        cdf[i, : q.size(0)] = q
    return cdf


def scale_table(low: float = 0.11, high: float = 64.0, levels: int = 48) -> list[float]:
    """Log-spaced scales for :class:`GaussianConditional` (small tables keep CDFs small)."""
    return [float(v) for v in np.exp(np.linspace(math.log(low), math.log(high), levels))]


def _backend(backend: str) -> str:
    if backend not in ("auto", "compressai", "torch"):
        raise ConfigError(f"backend must be 'auto', 'compressai' or 'torch', got {backend!r}")
    return "torch" if backend == "auto" else backend


def entropy_bottleneck(channels: int, backend: str = "auto") -> nn.Module:
    """A factorized-prior entropy model over ``channels`` channels (CompressAI's if present)."""
    if _backend(backend) == "compressai":
        from compressai.entropy_models import EntropyBottleneck

        return EntropyBottleneck(channels)
    return TorchEntropyBottleneck(channels)


def gaussian_conditional(backend: str = "auto") -> nn.Module:
    """A Gaussian conditional entropy model with :func:`scale_table` (CompressAI's if present)."""
    if _backend(backend) == "compressai":
        from compressai.entropy_models import GaussianConditional

        return GaussianConditional(scale_table())
    return TorchGaussianConditional(scale_table())


class _Bound(nn.Module):
    """``max(x, bound)`` whose gradient passes where ``x`` is pushed up towards the bound."""

    def __init__(self, bound: float) -> None:
        super().__init__()
        self.register_buffer("bound", torch.tensor([float(bound)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bound.to(x.dtype)
        y = torch.maximum(x, b)
        if not torch.is_grad_enabled() or not x.requires_grad:
            return y
        # straight-through where x >= bound; where x < bound let gradients that would
        # increase x through (as CompressAI's LowerBound does).
        return _LowerBoundFn.apply(x, b)


class _LowerBoundFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bound):
        ctx.save_for_backward(x, bound)
        return torch.maximum(x, bound)

    @staticmethod
    def backward(ctx, grad):
        x, bound = ctx.saved_tensors
        keep = (x >= bound) | (grad < 0)
        return keep * grad, None


class _TableBuffers(nn.Module):
    """The buffers ``update()`` fills: CDF tables, their lengths and symbol offsets."""

    def __init__(self, likelihood_bound: float = 1e-9) -> None:
        super().__init__()
        self.likelihood_lower_bound = _Bound(likelihood_bound)
        self.register_buffer("_offset", torch.IntTensor())
        self.register_buffer("_quantized_cdf", torch.IntTensor())
        self.register_buffer("_cdf_length", torch.IntTensor())

    @staticmethod
    def _noise_or_round(x: torch.Tensor, training: bool, means: torch.Tensor | None):
        if training:
            return x + torch.empty_like(x).uniform_(-0.5, 0.5)
        if means is None:
            return torch.round(x)
        return torch.round(x - means) + means


class TorchEntropyBottleneck(_TableBuffers):
    """Torch-only twin of CompressAI's ``EntropyBottleneck`` (same keys, same likelihoods).

    Input ``x`` float ``(B, C, ...)``; ``forward`` returns ``(x_hat, likelihoods)`` of the
    same shape: uniform noise in training, rounding around the medians in eval mode.
    ``loss()`` is the auxiliary loss that fits ``quantiles`` (needed by ``update()``).
    ``update()`` freezes the CDF tables with CompressAI's quantiser, exactly as
    CompressAI's ``EntropyBottleneck.update()`` does.

    Example
    -------
    >>> eb = TorchEntropyBottleneck(8)
    >>> sorted(eb.state_dict())[:3]
    ['_bias0', '_bias1', '_bias2']
    """

    def __init__(self, channels: int, tail_mass: float = 1e-9, init_scale: float = 10.0,
                 filters: tuple[int, ...] = (3, 3, 3, 3)) -> None:  # fmt: skip
        super().__init__()
        self.channels = int(channels)
        self.filters = tuple(int(f) for f in filters)
        self.tail_mass = float(tail_mass)
        dims = (1, *self.filters, 1)
        scale = init_scale ** (1 / (len(self.filters) + 1))
        for i in range(len(self.filters) + 1):
            init = math.log(math.expm1(1 / scale / dims[i + 1]))
            self.register_parameter(
                f"_matrix{i}", nn.Parameter(torch.full((channels, dims[i + 1], dims[i]), init))
            )
            self.register_parameter(
                f"_bias{i}", nn.Parameter(torch.empty(channels, dims[i + 1], 1).uniform_(-.5, .5))
            )
            if i < len(self.filters):
                self.register_parameter(
                    f"_factor{i}", nn.Parameter(torch.zeros(channels, dims[i + 1], 1))
                )
        q = torch.tensor([-init_scale, 0.0, init_scale])
        self.quantiles = nn.Parameter(q.repeat(channels, 1, 1))
        t = math.log(2 / self.tail_mass - 1)
        self.register_buffer("target", torch.tensor([-t, 0.0, t]))

    def _logits_cumulative(self, inputs: torch.Tensor, stop_gradient: bool) -> torch.Tensor:
        logits = inputs
        for i in range(len(self.filters) + 1):
            m = getattr(self, f"_matrix{i}")
            b = getattr(self, f"_bias{i}")
            if stop_gradient:
                m, b = m.detach(), b.detach()
            logits = torch.matmul(F.softplus(m), logits) + b
            if i < len(self.filters):
                f = getattr(self, f"_factor{i}")
                if stop_gradient:
                    f = f.detach()
                logits = logits + torch.tanh(f) * torch.tanh(logits)
        return logits

    def _likelihood(self, x: torch.Tensor, stop_gradient: bool = False):
        lower = self._logits_cumulative(x - 0.5, stop_gradient)
        upper = self._logits_cumulative(x + 0.5, stop_gradient)
        return torch.sigmoid(upper) - torch.sigmoid(lower), lower, upper

    def _get_medians(self) -> torch.Tensor:
        return self.quantiles[:, :, 1:2]

    def loss(self) -> torch.Tensor:
        logits = self._logits_cumulative(self.quantiles, stop_gradient=True)
        return torch.abs(logits - self.target).sum()

    def forward(self, x: torch.Tensor, training: bool | None = None):
        training = self.training if training is None else training
        perm = [1, 0, *range(2, x.ndim)]
        xt = x.permute(*perm).contiguous()
        shape = xt.shape
        values = xt.reshape(shape[0], 1, -1)
        out = self._noise_or_round(values, training, self._get_medians())
        lik, _, _ = self._likelihood(out)
        lik = self.likelihood_lower_bound(lik)
        out = out.reshape(shape).permute(*perm).contiguous()
        lik = lik.reshape(shape).permute(*perm).contiguous()
        return out, lik

    @torch.no_grad()
    def update(self, force: bool = False) -> bool:
        """Build the CDF tables from the current parameters (once, unless ``force``)."""
        if self._offset.numel() > 0 and not force:
            return False
        q = self.quantiles.detach().cpu()
        medians = q[:, 0, 1]
        minima = torch.clamp(torch.ceil(medians - q[:, 0, 0]).int(), min=0)
        maxima = torch.clamp(torch.ceil(q[:, 0, 2] - medians).int(), min=0)
        pmf_start = medians - minima
        pmf_length = maxima + minima + 1
        max_length = int(pmf_length.max())
        if max_length > 1 << 16:
            raise ConfigError(f"entropy bottleneck range {max_length} too wide: train longer "
                              "(the quantiles are fitted by aux_loss)")  # fmt: skip
        samples = torch.arange(max_length)[None, :] + pmf_start[:, None, None]
        dev = self.quantiles.device
        pmf, lower, upper = self._likelihood(samples.to(dev), stop_gradient=True)
        pmf, lower, upper = pmf.cpu()[:, 0, :], lower.cpu(), upper.cpu()
        tail_mass = torch.sigmoid(lower[:, 0, :1]) + torch.sigmoid(-upper[:, 0, -1:])
        self._quantized_cdf = _pmf_to_cdf(pmf, tail_mass, pmf_length, max_length).to(dev)
        self._offset = (-minima).to(dev)
        self._cdf_length = (pmf_length + 2).to(dev)
        return True


class TorchGaussianConditional(_TableBuffers):
    """Torch-only twin of CompressAI's ``GaussianConditional`` (same keys, same likelihoods).

    ``forward(y, scales, means)`` with float tensors of one shape returns
    ``(y_hat, likelihoods)``.

    Example
    -------
    >>> gc = TorchGaussianConditional(scale_table()).eval()
    >>> y, lik = gc(torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2, 2), torch.zeros(1, 2, 2, 2))
    >>> bool((lik > 0.38).all())
    True
    """

    def __init__(self, scales: list[float], scale_bound: float = 0.11,
                 tail_mass: float = 1e-9) -> None:  # fmt: skip
        super().__init__()
        self.tail_mass = float(tail_mass)
        self.lower_bound_scale = _Bound(scale_bound)
        self.register_buffer("scale_table", torch.tensor(scales, dtype=torch.float32))
        self.register_buffer("scale_bound", torch.tensor([float(scale_bound)]))

    def _likelihood(self, y, scales, means=None):
        v = torch.abs(y - means) if means is not None else torch.abs(y)
        s = self.lower_bound_scale(scales)
        c = -(2**-0.5)
        upper = 0.5 * torch.erfc(c * ((0.5 - v) / s))
        lower = 0.5 * torch.erfc(c * ((-0.5 - v) / s))
        return upper - lower

    def forward(self, y, scales, means=None, training: bool | None = None):
        training = self.training if training is None else training
        out = self._noise_or_round(y, training, means)
        lik = self.likelihood_lower_bound(self._likelihood(out, scales, means))
        return out, lik

    @torch.no_grad()
    def update(self) -> None:
        """Build one CDF table per entry of ``scale_table`` (as CompressAI does)."""
        from scipy.stats import norm

        table = self.scale_table.cpu().float()
        multiplier = -float(norm.ppf(self.tail_mass / 2))
        pmf_center = torch.ceil(table * multiplier).int()
        pmf_length = 2 * pmf_center + 1
        max_length = int(pmf_length.max())
        samples = torch.abs(torch.arange(max_length).int() - pmf_center[:, None]).float()
        s = table.unsqueeze(1)
        c = -(2**-0.5)
        upper = 0.5 * torch.erfc(c * ((0.5 - samples) / s))
        lower = 0.5 * torch.erfc(c * ((-0.5 - samples) / s))
        pmf = upper - lower
        tail_mass = 2 * lower[:, :1]
        dev = self.scale_table.device
        self._quantized_cdf = _pmf_to_cdf(pmf, tail_mass, pmf_length, max_length).to(dev)
        self._offset = (-pmf_center).to(dev)
        self._cdf_length = (pmf_length + 2).to(dev)

    def build_indexes(self, scales: torch.Tensor) -> torch.Tensor:
        s = self.lower_bound_scale(scales)
        idx = torch.full_like(s, len(self.scale_table) - 1, dtype=torch.int32)
        for v in self.scale_table[:-1]:
            idx -= (s <= v).int()
        return idx
