"""Packet-wise rANS coding with a model's frozen CDF tables, made safe for hostile input.

:func:`rans_encode` / :func:`rans_decode` code any subset of a latent (one packet) with the
frozen tables ``_quantized_cdf``, ``_cdf_length`` and ``_offset`` of an entropy model
(:mod:`flowcodec.codecs.entropy_models`), through CompressAI's C++ coder; the tables are
validated once per version (:func:`check_tables`, :func:`frozen_tables`).
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from torch import nn

from flowcodec.bitstream import BitstreamError
from flowcodec.codecs.entropy_models import compressai_extension
from flowcodec.errors import ConfigError

__all__ = ["BYPASS_LIMIT", "check_tables", "check_model_tables", "frozen_tables", "to_symbols",
           "eb_symbols", "rans_encode", "rans_decode", "IndexPlan", "decode_planned"]


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


def frozen_tables(model: nn.Module) -> tuple[list, list, list]:
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
        return frozen_tables(model)
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
    enc = compressai_extension("ans").RansEncoder()
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


class IndexPlan:
    """Per-symbol CDF indexes checked against the tables once, reusable for many packets
    (a codec decoding a batch uses the same indexes for every sample's packet ``g``)."""

    def __init__(self, tables: _Tables, indexes: torch.Tensor) -> None:
        idx = _index_array(indexes, tables.rows)
        self.shape = tuple(indexes.shape)
        self.n = idx.size
        self.list = idx.tolist()
        self.lo, self.hi = tables.lo[idx], tables.hi[idx]


def decode_planned(t: _Tables, data: bytes, plan: IndexPlan) -> torch.Tensor:
    if not isinstance(data, bytes | bytearray):
        raise BitstreamError(f"packet payload must be bytes, got {type(data).__name__}")
    if len(data) < 8 or len(data) % 4:
        raise BitstreamError(f"rANS payload of {len(data)} bytes: it must be whole 32-bit "
                             "words, at least 8 bytes")  # fmt: skip
    if plan.n == 0:
        return torch.zeros(plan.shape, dtype=torch.int32)
    cdf, lengths, offsets = t
    dec = compressai_extension("ans").RansDecoder()
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
    return decode_planned(t, data, IndexPlan(t, indexes))
