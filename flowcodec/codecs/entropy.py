"""Entropy models for learned codecs, and packet-wise rANS coding with frozen CDF tables.

Learned codecs use CompressAI's entropy models: the factorized prior
(``EntropyBottleneck``) and the Gaussian conditional of a mean-scale hyperprior
(``GaussianConditional``), with CompressAI's CDF quantiser and rANS coder (its C++
extensions). :func:`entropy_bottleneck` and :func:`gaussian_conditional` build them:

- ``backend="compressai"``: CompressAI's own modules;
- ``backend="torch"`` (and ``"auto"``, the default): :class:`TorchEntropyBottleneck` and
  :class:`TorchGaussianConditional`, twins with the same parameterisation, the same
  state-dict keys, the same likelihoods and the same ``update()`` (tested against
  CompressAI). They train without CompressAI installed (a GPU machine with torch alone),
  and they code through CompressAI's C++ extensions loaded directly, which avoids the
  ~11 s ``import compressai`` (it imports torchvision and every CompressAI model).

A state dict moves freely between the two backends.

:func:`rans_encode` / :func:`rans_decode` code any subset of a latent (one packet) with
the frozen tables ``_quantized_cdf``, ``_cdf_length`` and ``_offset`` of a model, which is
what lets a codec split its latent into independently decodable packets.

Example
-------
>>> import torch
>>> eb = entropy_bottleneck(4, backend="torch")
>>> y_hat, lik = eb(torch.randn(2, 4, 3, 3))
>>> y_hat.shape, lik.shape
(torch.Size([2, 4, 3, 3]), torch.Size([2, 4, 3, 3]))
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flowcodec.bitstream import BitstreamError
from flowcodec.errors import ConfigError

__all__ = [
    "have_compressai",
    "entropy_bottleneck",
    "gaussian_conditional",
    "TorchEntropyBottleneck",
    "TorchGaussianConditional",
    "eb_symbols",
    "to_symbols",
    "check_tables",
    "check_model_tables",
    "BYPASS_LIMIT",
    "rans_encode",
    "rans_decode",
    "scale_table",
]


def have_compressai() -> bool:
    """Whether CompressAI is installed (its rANS coder is needed to code)."""
    import importlib.util

    return importlib.util.find_spec("compressai") is not None


def _ext(name: str):
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
    cxx = _ext("_CXX")
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


# --- coding --------------------------------------------------------------------------------
#
# CompressAI's rANS coder (C++) trusts its inputs: its decoder reads 32-bit words past the
# end of a string that is too short or hostile (bypass-coded symbols can ask for any number
# of 4-bit chunks), its encoder writes into a buffer of one word per symbol and loops
# forever on a symbol 2^28 or more outside the table. Everything that reaches it from here
# is made safe first:
#
# - tables: validated once per table version (:func:`check_tables`): lengths, offsets,
#   CDFs that start at 0, end at 2^16 and strictly increase;
# - encoder: symbols are clamped to the table range widened by ``BYPASS_LIMIT`` on both
#   sides, and dummy symbols (never decoded) are appended when the buffer could overflow;
# - decoder: the string must be whole words, at least the 8-byte final state; it is copied
#   into a zero-padded buffer longer than anything the decoder can read for that many
#   symbols (bound below), and decoded symbols outside the encoder's range are an error.
#
# Read bound (zero padding, N symbols, W words of input): after the first read the state is
# either 0 (only symbol 0 decodes, one word per symbol) or at least 2^31 after every
# renormalisation, so a bypass chunk read fetches a word at most every 7 chunks; a run of
# 15s (the bypass length escape) can draw at most 16 chunks from the state plus 8 per real
# word. Summed: at most 2 + 42 N + 52 W words. The pad below is 1.5 times that.

#: How far outside a table's range an encoded symbol may lie (bypass-coded); the encoder
#: clamps there and the decoder refuses anything beyond.
BYPASS_LIMIT = 1 << 20
_PRECISION = 1 << 16
_MAX_TABLE_ROWS = 1 << 16
_MAX_TABLE_COLS = (1 << 16) + 2


class _Tables(tuple):
    """``(cdf, lengths, offsets)`` as lists for the C++ coder, validated, with numpy copies
    of the per-row range (``lo``/``hi``: smallest and largest symbol the encoder may send)."""

    rows: int
    lo: np.ndarray
    hi: np.ndarray
    offsets_np: np.ndarray
    maxv: np.ndarray


def check_tables(cdf: torch.Tensor, lengths: torch.Tensor, offsets: torch.Tensor) -> None:
    """Raise :class:`ConfigError` unless the CDF tables are safe to hand to the rANS coder.

    ``cdf`` int ``(R, K)``; ``lengths`` and ``offsets`` int ``(R,)``. Each row ``i`` must
    have ``3 <= lengths[i] <= K``, ``cdf[i, 0] == 0``, ``cdf[i, lengths[i] - 1] == 2**16``
    and strictly increasing values in between; offsets must lie within +-2^24.
    """
    for name, t in (("_quantized_cdf", cdf), ("_cdf_length", lengths), ("_offset", offsets)):
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
            raise ConfigError(f"CDF table {name} must be an int tensor")
    if cdf.ndim != 2 or not 0 < cdf.shape[0] <= _MAX_TABLE_ROWS \
            or not 3 <= cdf.shape[1] <= _MAX_TABLE_COLS:  # fmt: skip
        raise ConfigError(f"_quantized_cdf has shape {tuple(cdf.shape)}, expected (R, K) with "
                          f"R in 1..{_MAX_TABLE_ROWS}, K in 3..{_MAX_TABLE_COLS}")  # fmt: skip
    rows, cols = cdf.shape
    lengths, offsets = lengths.reshape(-1), offsets.reshape(-1)
    if lengths.numel() != rows or offsets.numel() != rows:
        raise ConfigError(f"_cdf_length and _offset need {rows} entries (one per CDF row), "
                          f"got {lengths.numel()} and {offsets.numel()}")  # fmt: skip
    c = cdf.detach().cpu().long()
    n = lengths.detach().cpu().long()
    o = offsets.detach().cpu().long()
    if bool(((n < 3) | (n > cols)).any()):
        raise ConfigError(f"_cdf_length values must be in 3..{cols}, got {n.min()}..{n.max()}")
    if bool((o.abs() > 1 << 24).any()):
        raise ConfigError("_offset values must be within +-2^24")
    col = torch.arange(cols)[None, :]
    inside = col < n[:, None]
    if bool((c[:, 0] != 0).any()):
        raise ConfigError("every CDF row must start at 0")
    last = c.gather(1, (n - 1)[:, None])[:, 0]
    if bool((last != _PRECISION).any()):
        raise ConfigError(f"every CDF row must end at {_PRECISION} (at index length - 1)")
    steps = (c[:, 1:] - c[:, :-1]) > 0
    if not bool((steps | ~inside[:, 1:]).all()):
        raise ConfigError("CDF rows must increase strictly up to their length")


def check_model_tables(module: nn.Module) -> None:
    """Validate the CDF tables of every entropy model in ``module`` (:func:`check_tables`)
    and their row counts against the model: one row per channel of an entropy bottleneck,
    one per scale of a Gaussian conditional. Raises :class:`ConfigError`."""
    for name, m in module.named_modules():
        cdf = getattr(m, "_quantized_cdf", None)
        if not isinstance(cdf, torch.Tensor) or cdf.numel() == 0:
            continue
        try:
            check_tables(cdf, m._cdf_length, m._offset)
        except ConfigError as e:
            raise ConfigError(f"{name or 'model'}: {e}") from e
        if isinstance(getattr(m, "quantiles", None), torch.Tensor):
            rows = m.quantiles.shape[0]
        elif isinstance(getattr(m, "scale_table", None), torch.Tensor):
            rows = m.scale_table.numel()
        else:
            continue
        if cdf.shape[0] != rows:
            raise ConfigError(f"{name or 'model'}: {cdf.shape[0]} CDF rows, expected {rows}")


def _checked(cdf: list, lengths: list, offsets: list, rows: int) -> _Tables:
    t = _Tables((cdf, lengths, offsets))
    t.rows = rows
    t.offsets_np = np.asarray(offsets, dtype=np.int64)
    t.maxv = np.asarray(lengths, dtype=np.int64) - 2
    t.lo = t.offsets_np - BYPASS_LIMIT
    t.hi = t.offsets_np + t.maxv + BYPASS_LIMIT - 1
    return t


def _tables(model: nn.Module) -> tuple[list, list, list]:
    """The model's frozen tables as lists for the C++ coder, validated (cached per version)."""
    cdf, lengths, offsets = model._quantized_cdf, model._cdf_length, model._offset
    if cdf.numel() == 0:
        raise ConfigError("entropy model has no CDF tables: call codec.update() first")
    key = tuple((t.data_ptr(), t._version, tuple(t.shape), t.device.type)
                for t in (cdf, lengths, offsets))  # fmt: skip
    cached = model.__dict__.get("_flowcodec_tables")
    if cached is not None and cached[0] == key:
        return cached[1]
    check_tables(cdf, lengths, offsets)
    tables = _checked(cdf.tolist(), lengths.reshape(-1).tolist(), offsets.reshape(-1).tolist(),
                      cdf.shape[0])  # fmt: skip
    model.__dict__["_flowcodec_tables"] = (key, tables)
    return tables


def _as_tables(model: nn.Module, tables: tuple | None) -> _Tables:
    if tables is None:
        return _tables(model)
    if isinstance(tables, _Tables):
        return tables
    cdf, lengths, offsets = tables  # tables built elsewhere: validate them here
    c = torch.tensor(cdf, dtype=torch.int64)
    check_tables(c, torch.tensor(lengths).reshape(-1), torch.tensor(offsets).reshape(-1))
    return _checked(list(cdf), list(lengths), list(offsets), c.shape[0])


def to_symbols(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` as int32, safe for any float input: NaN becomes 0 and magnitudes are
    clamped to 2^30 (a latent from an overflowing input must not wrap around)."""
    lim = float(1 << 30)
    return torch.round(torch.nan_to_num(x.float(), nan=0.0, posinf=lim, neginf=-lim)
                       .clamp(-lim, lim)).int()  # fmt: skip


def eb_symbols(model: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """Integer symbols of a latent ``(B, C, ...)`` for an entropy bottleneck (around medians)."""
    med = model.quantiles[:, 0, 1].detach().reshape(1, -1, *([1] * (y.ndim - 2)))
    return to_symbols(y - med)


def _index_array(indexes: torch.Tensor, rows: int) -> np.ndarray:
    idx = indexes.detach().reshape(-1).cpu().numpy().astype(np.int64, copy=False)
    if idx.size and (idx.min() < 0 or idx.max() >= rows):
        raise ConfigError(f"CDF indexes must be in 0..{rows - 1}, got {idx.min()}..{idx.max()}")
    return idx


def rans_encode(model: nn.Module, symbols: torch.Tensor, indexes: torch.Tensor,
                tables: tuple | None = None) -> bytes:  # fmt: skip
    """rANS-code ``symbols`` (int) with per-symbol CDF ``indexes`` using ``model``'s tables.

    Symbols further than :data:`BYPASS_LIMIT` outside their table's range are clamped
    there (the input was far outside anything the model was trained on), so the coder
    always returns, in time and space linear in the symbol count.
    """
    t = _as_tables(model, tables)
    idx = _index_array(indexes, t.rows)
    sym = symbols.detach().reshape(-1).cpu()
    if sym.is_floating_point():
        sym = to_symbols(sym)
    sym = sym.long().numpy()
    if sym.size != idx.size:
        raise ConfigError(f"{sym.size} symbols but {idx.size} indexes")
    sym = np.clip(sym, t.lo[idx], t.hi[idx])
    # Bits the coder may spend: <= 17 per symbol, plus 4 per bypass chunk (count + value).
    v = sym - t.offsets_np[idx]
    mv = t.maxv[idx]
    raw = np.where(v < 0, -2 * v - 1, np.where(v >= mv, 2 * (v - mv), 0))
    chunks = np.where((v < 0) | (v >= mv), 1 + (np.floor(np.log2(raw + 1)).astype(np.int64)
                                                 // 4 + 1), 0)  # fmt: skip
    cost = 17 * sym.size + 4 * int(chunks.sum())
    # The C++ encoder writes into one 32-bit word per symbol: append dummy symbols (17 bits
    # at most each, never decoded) until the words the stream can need fit.
    extra = max(0, -(-(cost + 128 - 32 * sym.size) // 15))
    sym_l, idx_l = sym.tolist(), idx.tolist()
    if extra:
        sym_l += [int(t.offsets_np[0])] * extra
        idx_l += [0] * extra
    cdf, lengths, offsets = t
    enc = _ext("ans").RansEncoder()
    return enc.encode_with_indexes(sym_l, idx_l, cdf, lengths, offsets)


_PAD = threading.local()


def _padded(data: bytes, n_symbols: int) -> bytearray:
    """``data`` followed by zeros past anything the decoder can read for ``n_symbols``.

    The buffer is reused (one per thread and size class): only the payload is written and
    the previous payload's bytes zeroed, so the padding costs one copy (pybind11's).
    """
    need = len(data) + 8 + 4 * (64 * n_symbols + 80 * (len(data) // 4 + 1))
    size = -(-need // 16384) * 16384
    bufs = _PAD.__dict__.setdefault("bufs", {})
    entry = bufs.get(size)
    if entry is None:
        if len(bufs) >= 8:
            bufs.clear()
        entry = bufs[size] = [bytearray(size), 0]
    buf, dirty = entry
    n = len(data)
    if dirty > n:
        buf[n:dirty] = bytes(dirty - n)
    buf[:n] = data
    entry[1] = n
    return buf


class _IndexPlan:
    """Per-symbol CDF indexes checked against the tables once, reusable for many packets
    (a codec decoding a batch uses the same indexes for every sample's packet ``g``)."""

    def __init__(self, tables: _Tables, indexes: torch.Tensor) -> None:
        idx = _index_array(indexes, tables.rows)
        self.shape = tuple(indexes.shape)
        self.n = idx.size
        self.list = idx.tolist()
        self.lo, self.hi = tables.lo[idx], tables.hi[idx]


def _decode_planned(t: _Tables, data: bytes, plan: _IndexPlan) -> torch.Tensor:
    if not isinstance(data, bytes | bytearray):
        raise BitstreamError(f"packet payload must be bytes, got {type(data).__name__}")
    if len(data) < 8 or len(data) % 4:
        raise BitstreamError(f"rANS payload of {len(data)} bytes: it must be whole 32-bit "
                             "words, at least 8 bytes")  # fmt: skip
    if plan.n == 0:
        return torch.zeros(plan.shape, dtype=torch.int32)
    cdf, lengths, offsets = t
    dec = _ext("ans").RansDecoder()
    vals = np.array(dec.decode_with_indexes(_padded(data, plan.n), plan.list, cdf,
                                            lengths, offsets), dtype=np.int64)  # fmt: skip
    if ((vals < plan.lo) | (vals > plan.hi)).any():
        raise BitstreamError("rANS payload decodes to symbols outside the coder's range")
    return torch.from_numpy(vals.astype(np.int32)).reshape(plan.shape)


def rans_decode(model: nn.Module, data: bytes, indexes: torch.Tensor,
                tables: tuple | None = None) -> torch.Tensor:  # fmt: skip
    """Inverse of :func:`rans_encode`: int32 symbols shaped like ``indexes``.

    ``data`` must be what :func:`rans_encode` writes (whole 32-bit words, at least 8
    bytes); the decoder never reads outside a zero-padded copy of it, so the same bytes
    always give the same symbols, and a decoded symbol outside the range the encoder can
    produce raises :class:`BitstreamError`. A wrong string inside that range cannot be told
    from a right one: the packet CRC is what catches damage.
    """
    t = _as_tables(model, tables)
    if not isinstance(data, bytes | bytearray):
        raise BitstreamError(f"packet payload must be bytes, got {type(data).__name__}")
    return _decode_planned(t, data, _IndexPlan(t, indexes))
