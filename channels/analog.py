"""Analog (complex baseband) channels: AWGN, Rayleigh/Rician block fading, OFDM over 3GPP TDL.

Conventions: symbols are complex with unit average energy, ``snr_db`` is Es/N0 per complex
symbol in dB, so the complex noise ``n ~ CN(0, N0)`` has ``N0 = 10 ** (-snr_db / 10)``.

Every channel is a :class:`torch.nn.Module` whose :meth:`~AnalogChannel.forward` is
differentiable w.r.t. its input (noise and fading are additive / multiplicative), takes an
explicit ``torch.Generator`` (or uses its own, seeded at construction), and can return the
channel realisation as one complex gain per transmitted symbol.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from channels._errors import ChannelError, ChannelTypeError

__all__ = [
    "AnalogChannel",
    "AWGN",
    "BlockFading",
    "RayleighBlockFading",
    "RicianBlockFading",
    "OFDMTDLChannel",
    "ChannelRealization",
]


@dataclass
class ChannelRealization:
    """What one pass through a channel drew.

    Attributes:
        h: ``[..., n]`` complex gain seen by each transmitted symbol (ones for AWGN).
        noise_var: float or tensor broadcastable to ``[..., n]``, complex noise variance N0.
    """

    h: torch.Tensor
    noise_var: torch.Tensor


def _check_device(device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", 0)
    return dev


def _device_str(dev: torch.device) -> str:
    return "cpu" if dev.type == "cpu" else f"{dev.type}:{dev.index or 0}"


def _check_snr(snr_db) -> torch.Tensor | float:
    if snr_db is None:
        raise ChannelError("snr_db is required (set it in the constructor or pass it in the call)")
    if isinstance(snr_db, torch.Tensor):
        if snr_db.is_complex() or not torch.isfinite(snr_db).all():
            raise ChannelError("snr_db must be real and finite")
        return snr_db
    if isinstance(snr_db, bool) or not isinstance(snr_db, numbers.Real):
        raise ChannelTypeError(f"snr_db must be a float or a tensor, got {type(snr_db).__name__}")
    if not math.isfinite(snr_db):
        raise ChannelError(f"snr_db must be finite, got {snr_db!r}")
    return float(snr_db)


def _check_symbols(x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise ChannelTypeError(f"x must be a complex torch.Tensor, got {type(x).__name__}")
    if not x.is_complex():
        raise ChannelTypeError(
            f"x must be a complex tensor (complex baseband symbols), got dtype {x.dtype}; "
            "convert with torch.complex(re, im) or x.to(torch.complex64)")
    if x.dim() < 1:
        raise ChannelError("x must have at least one dimension (the symbol axis)")
    return x


class AnalogChannel(torch.nn.Module):
    """Base class: flat channel ``y = h * x + n`` with a per-symbol gain ``h``.

    Subclasses draw ``h`` in :meth:`sample_gains`. Calls:

    - ``forward(x, snr_db=None, generator=None, return_channel=False)``:
      ``x`` ``[..., n]`` complex -> ``y`` ``[..., n]`` complex (same dtype), and with
      ``return_channel=True`` also a :class:`ChannelRealization`.
    - ``receive(x, snr_db=None, generator=None)``: transmit, then equalise with the
      receiver's channel knowledge; returns ``(x_eq, noise_var_eff)``, both ``[..., n]``
      (complex and real), ready for a soft demapper.
    - ``channel_uses(n)``: complex channel uses spent to carry ``n`` symbols.
    """

    def __init__(self, snr_db: float | None = None, device: str = "cpu", seed: int = 0):
        super().__init__()
        self.snr_db = None if snr_db is None else _check_snr(snr_db)
        self.device = _check_device(device)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ChannelTypeError(f"seed must be an int, got {type(seed).__name__}")
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(seed)

    # -- helpers -------------------------------------------------------------------------
    def _gen(self, generator: torch.Generator | None) -> torch.Generator:
        if generator is None:
            return self._generator
        if not isinstance(generator, torch.Generator):
            raise ChannelTypeError(f"generator must be a torch.Generator, got {type(generator)}")
        return generator

    def _noise_var(self, snr_db, x: torch.Tensor) -> torch.Tensor:
        snr = _check_snr(self.snr_db if snr_db is None else snr_db)
        real_dtype = x.real.dtype
        snr_t = torch.as_tensor(snr, dtype=real_dtype, device=x.device)
        return torch.pow(10.0, -snr_t / 10.0)

    def _noise(self, shape, dtype, device, gen) -> torch.Tensor:
        return torch.randn(shape, dtype=dtype, device=device, generator=gen)

    def sample_gains(self, shape: torch.Size, dtype: torch.dtype, gen: torch.Generator):
        """Per-symbol complex gains of shape ``shape`` (ones for AWGN)."""
        return None

    def channel_uses(self, n_symbols: int) -> int:
        """Complex channel uses needed for ``n_symbols`` data symbols (flat channels: n)."""
        return int(n_symbols)

    # -- public --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, snr_db=None, generator: torch.Generator | None = None,
                return_channel: bool = False):
        x = _check_symbols(x)
        gen = self._gen(generator)
        no = self._noise_var(snr_db, x)
        h = self.sample_gains(x.shape, x.dtype, gen)
        noise = self._noise(x.shape, x.dtype, x.device, gen)
        sig = x if h is None else h * x
        if no.dim() > 0:
            no = no.reshape(no.shape + (1,) * (x.dim() - no.dim())) if no.dim() < x.dim() else no
        y = sig + torch.sqrt(no).to(x.dtype) * noise
        if return_channel:
            hh = torch.ones_like(x) if h is None else h
            return y, ChannelRealization(h=hh, noise_var=no)
        return y

    def receive(self, x: torch.Tensor, snr_db=None, generator: torch.Generator | None = None):
        """Transmit ``x`` and equalise with perfect CSI: ``(y * conj(h) / |h|^2, N0 / |h|^2)``."""
        x = _check_symbols(x)
        if type(self).sample_gains is AnalogChannel.sample_gains:  # AWGN: nothing to undo
            y, real = self.forward(x, snr_db=snr_db, generator=generator, return_channel=True)
            return y, real.noise_var.expand(x.shape)
        y, real = self.forward(x, snr_db=snr_db, generator=generator, return_channel=True)
        g = real.h.abs().square().clamp_min(1e-12)
        x_eq = y * real.h.conj() / g
        return x_eq, (real.noise_var / g).expand(x.shape)

    def post_equalization_snr(self, shape, snr_db=None, generator=None) -> torch.Tensor:
        """Per-symbol post-equalisation SNR (linear), ``[*shape]`` float, from a fresh draw.

        Used by the fast (table-driven) link for an effective-SNR mapping.
        """
        gen = self._gen(generator)
        x = torch.ones(shape, dtype=torch.complex64, device=self.device)
        no = self._noise_var(snr_db, x)
        h = self.sample_gains(x.shape, x.dtype, gen)
        g = torch.ones(shape, device=self.device) if h is None else h.abs().square()
        return (g / no).float()


class AWGN(AnalogChannel):
    """Complex AWGN channel ``y = x + n``, ``n ~ CN(0, N0)``, ``N0 = 10^(-snr_db/10)``.

    Args:
        snr_db: default Es/N0 in dB (a call can override it; per-example tensors broadcast
            against the leading dims of ``x``).
        device: ``"cpu"`` or ``"cuda"`` / ``"cuda:0"``.
        seed: seed of the channel's own generator (used when a call passes none).

    Input: ``x`` ``[..., n]`` complex64/complex128. Output: ``y`` same shape and dtype.

    Example:
        >>> ch = AWGN(snr_db=10.0, seed=1)
        >>> y = ch(torch.ones(4, 8, dtype=torch.complex64))
    """


class BlockFading(AnalogChannel):
    """Rician block fading (Rayleigh for ``k_factor=0``): ``y = h * x + n``.

    ``h`` is constant over ``coherence_length`` consecutive symbols along the last axis and
    independent between blocks and across leading dims:
    ``h = sqrt(K/(K+1)) + sqrt(1/(K+1)) * CN(0, 1)`` (LoS phase 0, ``E|h|^2 = 1``).
    The receiver knows ``h`` (perfect CSI) in :meth:`receive`.

    Args:
        coherence_length: symbols per fading block (>= 1).
        k_factor: Rician K (linear, >= 0).
        snr_db, device, seed: as in :class:`AWGN`.

    Input ``x`` ``[..., n]`` complex; output ``y`` same; realisation ``h`` ``[..., n]``.

    Example:
        >>> ch = BlockFading(coherence_length=64, k_factor=3.0, snr_db=10.0)
        >>> y, real = ch(torch.ones(2, 128, dtype=torch.complex64), return_channel=True)
    """

    def __init__(self, coherence_length: int = 1, k_factor: float = 0.0,
                 snr_db: float | None = None, device: str = "cpu", seed: int = 0):
        super().__init__(snr_db=snr_db, device=device, seed=seed)
        if isinstance(coherence_length, bool) or not isinstance(coherence_length, int) \
                or coherence_length < 1:
            raise ChannelError(f"coherence_length must be an int >= 1, got {coherence_length!r}")
        if not isinstance(k_factor, (int, float)) or not math.isfinite(k_factor) \
                or k_factor < 0:
            raise ChannelError(f"k_factor must be a finite number >= 0, got {k_factor!r}")
        self.coherence_length = coherence_length
        self.k_factor = float(k_factor)

    def sample_gains(self, shape, dtype, gen):
        n = shape[-1]
        nb = -(-n // self.coherence_length)
        diffuse = torch.randn((*shape[:-1], nb), dtype=dtype, device=self.device, generator=gen)
        k = self.k_factor
        h = math.sqrt(k / (k + 1)) + math.sqrt(1 / (k + 1)) * diffuse
        return h.repeat_interleave(self.coherence_length, dim=-1)[..., :n]


class RayleighBlockFading(BlockFading):
    """Rayleigh block fading, :class:`BlockFading` with ``k_factor=0``.

    Example:
        >>> ch = RayleighBlockFading(coherence_length=1, snr_db=5.0)
        >>> y = ch(torch.ones(10, dtype=torch.complex64))
    """

    def __init__(self, coherence_length: int = 1, snr_db: float | None = None,
                 device: str = "cpu", seed: int = 0):
        super().__init__(coherence_length=coherence_length, k_factor=0.0, snr_db=snr_db,
                         device=device, seed=seed)


class RicianBlockFading(BlockFading):
    """Rician block fading with K factor ``k_factor`` (linear), see :class:`BlockFading`.

    Example:
        >>> ch = RicianBlockFading(k_factor=10.0, coherence_length=16, snr_db=5.0)
        >>> y = ch(torch.ones(32, dtype=torch.complex64))
    """

    def __init__(self, k_factor: float, coherence_length: int = 1,
                 snr_db: float | None = None, device: str = "cpu", seed: int = 0):
        super().__init__(coherence_length=coherence_length, k_factor=k_factor, snr_db=snr_db,
                         device=device, seed=seed)


def _seeded_tdl_class():
    from sionna.phy.channel.tr38901 import TDL

    class _SeededTDL(TDL):
        """Sionna's TDL drawing from an explicit torch.Generator instead of the global one."""

        _explicit_gen: torch.Generator | None = None

        @property
        def torch_rng(self):  # noqa: D401 - overrides sionna.phy.Object.torch_rng
            if self._explicit_gen is not None:
                return self._explicit_gen
            return super().torch_rng

    return _SeededTDL


class OFDMTDLChannel(AnalogChannel):
    """OFDM over a 3GPP TDL channel (Sionna's TDL, frequency-domain model), SISO.

    The data symbols of each row of ``x`` ``[..., n]`` fill ``ceil(n / D)`` resource grids
    (``D`` data resource elements per grid, zero padded), pilots sit on
    ``pilot_ofdm_symbols`` (Kronecker pattern), every grid sees an independent TDL draw
    (time variation inside a slot from the Doppler of ``speed``). The receiver uses perfect
    CSI or Sionna's :class:`~sionna.phy.ofdm.LSChannelEstimator` (linear interpolation),
    then one-tap zero-forcing equalisation.

    Args:
        model: TDL profile, ``"A"``, ``"B"``, ``"C"``, ``"D"`` or ``"E"``.
        delay_spread: RMS delay spread [s].
        carrier_frequency: [Hz]. subcarrier_spacing: [Hz]. fft_size: subcarriers.
        num_ofdm_symbols: OFDM symbols per grid (slot).
        speed: UE speed [m/s] (sets the Doppler spread).
        pilot_ofdm_symbols: indices of pilot OFDM symbols.
        channel_estimation: ``"perfect"`` or ``"ls"``.
        snr_db, device, seed: as in :class:`AWGN`.

    Input ``x`` ``[..., n]`` complex64; output ``y`` ``[..., n]`` (received data REs), and
    with ``return_channel=True`` the true frequency response at each data RE ``[..., n]``.
    :meth:`channel_uses` counts whole grids (pilots and padding included).

    Example:
        >>> ch = OFDMTDLChannel(model="C", delay_spread=300e-9, speed=3.0, snr_db=15.0,
        ...                     channel_estimation="ls")
        >>> x_eq, no_eff = ch.receive(torch.ones(2, 500, dtype=torch.complex64))
    """

    def __init__(self, model: str = "A", delay_spread: float = 100e-9,
                 carrier_frequency: float = 3.5e9, subcarrier_spacing: float = 30e3,
                 fft_size: int = 72, num_ofdm_symbols: int = 14, speed: float = 0.0,
                 pilot_ofdm_symbols: tuple[int, ...] = (2, 11),
                 channel_estimation: str = "perfect", snr_db: float | None = None,
                 device: str = "cpu", seed: int = 0):
        super().__init__(snr_db=snr_db, device=device, seed=seed)
        from sionna.phy.channel import GenerateOFDMChannel
        from sionna.phy.ofdm import LSChannelEstimator, ResourceGrid, ResourceGridMapper

        if model not in ("A", "B", "C", "D", "E"):
            raise ChannelError(f"model must be one of A, B, C, D, E, got {model!r}")
        if channel_estimation not in ("perfect", "ls"):
            raise ChannelError(
                f"channel_estimation must be 'perfect' or 'ls', got {channel_estimation!r}")
        for name, val in (("delay_spread", delay_spread), ("speed", speed)):
            if not math.isfinite(val) or val < 0:
                raise ChannelError(f"{name} must be finite and >= 0, got {val!r}")
        self.model = model
        self.channel_estimation = channel_estimation
        dev = _device_str(self.device)
        self._rg = ResourceGrid(num_ofdm_symbols=num_ofdm_symbols, fft_size=fft_size,
                                subcarrier_spacing=subcarrier_spacing,
                                pilot_pattern="kronecker",
                                pilot_ofdm_symbol_indices=list(pilot_ofdm_symbols), device=dev)
        # Sionna draws the Kronecker pilots' QPSK symbols from its own process-wide RNG, which
        # is seeded at random on import: redraw them from ``seed`` so one seed gives one
        # channel (and one LS estimate) in every process.
        pp = self._rg.pilot_pattern
        pgen = torch.Generator().manual_seed(seed)
        bits = torch.randint(0, 2, (2, *pp.pilots.shape), generator=pgen).float()
        qpsk = torch.complex(1.0 - 2.0 * bits[0], 1.0 - 2.0 * bits[1]) / math.sqrt(2.0)
        pp.pilots = qpsk.to(pp.pilots.device)
        self._tdl = _seeded_tdl_class()(model=model, delay_spread=delay_spread,
                                         carrier_frequency=carrier_frequency,
                                         min_speed=speed, max_speed=speed, device=dev)
        self._gen_ofdm = GenerateOFDMChannel(self._tdl, self._rg, device=dev)
        self._rg_mapper = ResourceGridMapper(self._rg, device=dev)
        self._ls = LSChannelEstimator(self._rg, interpolation_type="lin", device=dev)
        types = self._rg.build_type_grid()[0, 0].reshape(-1)
        self.register_buffer("_data_idx", torch.nonzero(types == 0).squeeze(-1), persistent=False)
        self.num_data_per_grid = int(self._data_idx.numel())
        self.grid_size = num_ofdm_symbols * fft_size

    def channel_uses(self, n_symbols: int) -> int:
        return -(-int(n_symbols) // self.num_data_per_grid) * self.grid_size

    def _grids(self, x: torch.Tensor):
        lead, n = x.shape[:-1], x.shape[-1]
        d = self.num_data_per_grid
        g = -(-n // d)
        xf = x.reshape(-1, n)
        xf = torch.nn.functional.pad(xf, (0, g * d - n))
        grid = self._rg_mapper(xf.reshape(-1, 1, 1, d).to(torch.complex64))
        return grid[:, 0, 0], lead, n, g  # [B*g, T, F]

    def _to_data(self, t: torch.Tensor, lead, n, g):
        d = self.num_data_per_grid
        flat = t.reshape(t.shape[0], -1)[:, self._data_idx]  # [B*g, d]
        return flat.reshape(-1, g * d)[:, :n].reshape(*lead, n)

    def _draw(self, x, snr_db, gen):
        grid, lead, n, g = self._grids(x)
        self._tdl._explicit_gen = gen
        try:
            h = self._gen_ofdm(grid.shape[0])[:, 0, 0, 0, 0]  # [B*g, T, F]
        finally:
            self._tdl._explicit_gen = None
        no = self._noise_var(snr_db, x)
        if no.dim() > 0:
            raise ChannelError("OFDMTDLChannel takes a scalar snr_db")
        noise = torch.randn(grid.shape, dtype=grid.dtype, device=grid.device, generator=gen)
        y = h * grid + torch.sqrt(no).to(grid.dtype) * noise
        return y, h, no, (lead, n, g)

    def forward(self, x, snr_db=None, generator=None, return_channel=False):
        x = _check_symbols(x)
        y, h, no, meta = self._draw(x, snr_db, self._gen(generator))
        y_d = self._to_data(y, *meta).to(x.dtype)
        if return_channel:
            return y_d, ChannelRealization(h=self._to_data(h, *meta).to(x.dtype), noise_var=no)
        return y_d

    def receive(self, x, snr_db=None, generator=None):
        x = _check_symbols(x)
        y, h, no, meta = self._draw(x, snr_db, self._gen(generator))
        if self.channel_estimation == "perfect":
            h_hat, err = h, torch.zeros((), device=y.device)
        else:
            h_hat, err = self._ls(y[:, None, None], no)
            h_hat, err = h_hat[:, 0, 0, 0, 0], err[:, 0, 0, 0, 0]
        g = h_hat.abs().square().clamp_min(1e-12)
        x_eq = y * h_hat.conj() / g
        no_eff = (no + err) / g
        return (self._to_data(x_eq, *meta).to(x.dtype),
                self._to_data(no_eff.expand(y.shape), *meta).to(x.real.dtype))

    def post_equalization_snr(self, shape, snr_db=None, generator=None) -> torch.Tensor:
        x = torch.zeros(shape, dtype=torch.complex64, device=self.device)
        _, h, no, meta = self._draw(x, snr_db, self._gen(generator))
        return (self._to_data(h.abs().square(), *meta) / no).float()
