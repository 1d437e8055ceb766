"""Multi-view benchmark: what each of K cooperating devices sees of the same scene.

The default protocol is *partial observation*: device ``k`` of ``K`` sees a square window
covering about ``area`` of the image (half by default) at the image's own resolution, and
shows it to its model at the model's input size (bilinear resize, as a camera with a
narrower field of view would deliver it). The windows are anchored at fixed positions (for
four devices, the four corners; together they cover the whole image); per sample, each
window's height and width are jittered by up to ``jitter`` of the side, which keeps it
anchored at its corner, so four windows always cover every pixel. Each device may add mild
independent Gaussian sensor noise (``noise``, in the units of the normalised input).

Randomness is counter-based: the jitter and noise of sample ``index`` on device ``k`` are
a function of ``(seed, index, k)`` only, so the same seed gives the same views whatever the
batch size or order, and another device always draws differently.

Example
-------
>>> import torch
>>> gen = ViewGenerator(ViewConfig(devices=4, seed=0))
>>> x = torch.rand(2, 3, 32, 32)
>>> v = gen(x, torch.tensor([0, 1]))
>>> tuple(v.shape)
(2, 4, 3, 32, 32)
>>> torch.equal(v, gen(x, torch.tensor([0, 1])))
True
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from flowcodec.errors import ConfigError

__all__ = ["ViewConfig", "ViewGenerator", "ANCHORS", "MAX_DEVICES", "N_ANCHORS", "anchor_id",
           "anchor_ids", "anchor_corner"]

MAX_DEVICES = 4

#: Window anchors per device count, as (row, column) of the window's outer corner in
#: {0, 0.5, 1} (0: top / left edge, 1: bottom / right edge, 0.5: centred).
ANCHORS: dict[int, tuple[tuple[float, float], ...]] = {
    1: ((0.5, 0.5),),
    2: ((0.0, 0.0), (1.0, 1.0)),
    3: ((0.0, 0.0), (0.0, 1.0), (1.0, 0.5)),
    4: ((0.0, 0.0), (0.0, 1.0), (1.0, 0.0), (1.0, 1.0)),
}

#: Anchor ids: a window's anchor on the 3x3 lattice of {0, 0.5, 1}^2, row-major
#: (0: top left, 2: top right, 4: centre, 6: bottom left, 8: bottom right). A camera's
#: anchor is fixed, so it is session metadata: sent once when the session is set up.
N_ANCHORS = 9


def anchor_id(corner: tuple[float, float]) -> int:
    """The id (0..8) of an anchor ``(row, column)`` in {0, 0.5, 1}^2; ConfigError else."""
    try:
        r, c = (float(v) * 2 for v in corner)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"an anchor is (row, column) in {{0, 0.5, 1}}, got {corner!r}") from e
    if r not in (0.0, 1.0, 2.0) or c not in (0.0, 1.0, 2.0):
        raise ConfigError(f"an anchor is (row, column) in {{0, 0.5, 1}}, got {corner!r}")
    return 3 * int(r) + int(c)


def anchor_corner(aid: int) -> tuple[float, float]:
    """The anchor ``(row, column)`` of id ``aid`` (0..8)."""
    if isinstance(aid, bool) or not isinstance(aid, int) or not 0 <= aid < N_ANCHORS:
        raise ConfigError(f"an anchor id is an int in 0..{N_ANCHORS - 1}, got {aid!r}")
    return (aid // 3) / 2, (aid % 3) / 2


def anchor_ids(devices: int) -> tuple[int, ...]:
    """The anchor id of each device slot of the ``devices``-device protocol
    (``anchor_ids(4) == (0, 2, 6, 8)``)."""
    if devices not in ANCHORS:
        raise ConfigError(f"devices must be in 1..{MAX_DEVICES}, got {devices!r}")
    return tuple(anchor_id(a) for a in ANCHORS[devices])


@dataclass(frozen=True)
class ViewConfig:
    """Parameters of the view generator (saved into every result record: :meth:`record`).

    devices : number of devices K (1..4).
    area : share of the image each window covers (0.25..1; 0.5: half).
    jitter : largest relative change of a window's height or width per sample (0..0.2).
    noise : standard deviation of the independent sensor noise, normalised-input units.
    seed : seed of the jitter and the noise.
    """

    devices: int = 4
    area: float = 0.5
    jitter: float = 0.1
    noise: float = 0.02
    seed: int = 0

    def check(self) -> ViewConfig:
        bad = []
        if isinstance(self.devices, bool) or not isinstance(self.devices, int) \
                or not 1 <= self.devices <= MAX_DEVICES:
            bad.append(f"devices must be an int in 1..{MAX_DEVICES}, got {self.devices!r}")
        if not (isinstance(self.area, (int, float)) and 0.25 <= self.area <= 1.0):
            bad.append(f"area must be in [0.25, 1], got {self.area!r}")
        if not (isinstance(self.jitter, (int, float)) and 0.0 <= self.jitter <= 0.2):
            bad.append(f"jitter must be in [0, 0.2], got {self.jitter!r}")
        if not (isinstance(self.noise, (int, float)) and 0.0 <= self.noise <= 0.5):
            bad.append(f"noise must be in [0, 0.5], got {self.noise!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            bad.append(f"seed must be a non-negative int, got {self.seed!r}")
        if self.devices == 4 and isinstance(self.area, (int, float)) and isinstance(
                self.jitter, (int, float)) and math.sqrt(self.area) * (1 - self.jitter) < 0.5:
            bad.append("four windows must cover the image: need sqrt(area) * (1 - jitter) "
                       f">= 0.5, got area={self.area}, jitter={self.jitter}")
        if bad:
            raise ConfigError("view config: " + "; ".join(bad))
        return self

    def record(self) -> dict:
        """The parameters as a plain dict (for result records)."""
        return {"views": "partial-corners", **asdict(self)}


_M1, _M2, _M3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), \
    np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (uint64 arrays, wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M2
        z = (z ^ (z >> np.uint64(27))) * _M3
        return z ^ (z >> np.uint64(31))


def _uniform(seed: int, index: np.ndarray, device: int, stream: int) -> np.ndarray:
    """Uniform numbers in [0, 1) that depend only on (seed, index, device, stream)."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed) * _M1 + index.astype(np.uint64) * _M2 \
            + np.uint64(device * 8 + stream + 1) * _M3
    return (_mix(_mix(z)) >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class ViewGenerator:
    """Callable ``(x, index) -> views``: ``x`` float ``(B, C, H, W)`` (normalised images),
    ``index`` int ``(B,)`` (each sample's id: its position in the data set, or any
    counter); returns float ``(B, K, C, H, W)``, device ``k``'s view at ``[:, k]``.
    :meth:`windows` gives the pixel windows ``(B, K, 4)`` as (top, left, height, width)."""

    def __init__(self, cfg: ViewConfig | None = None) -> None:
        self.cfg = (cfg or ViewConfig()).check()

    @property
    def devices(self) -> int:
        return self.cfg.devices

    def _check(self, x: torch.Tensor, index: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or min(x.shape[-2:]) < 4:
            raise ConfigError(f"views: images must be (B, C, H, W) with H, W >= 4, got "
                              f"{tuple(getattr(x, 'shape', ())) or type(x).__name__}")
        if not isinstance(index, torch.Tensor) or index.shape != (x.shape[0],) \
                or index.dtype.is_floating_point:
            raise ConfigError(f"views: index must be an integer tensor of shape ({x.shape[0]},), "
                              f"got {getattr(index, 'shape', type(index).__name__)}")

    def windows(self, index: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Windows ``(B, K, 4)`` float (top, left, height, width) in pixels, for images of
        ``size = (H, W)``."""
        c = self.cfg
        idx = index.detach().cpu().numpy().astype(np.int64)
        h, w = size
        side = math.sqrt(c.area)
        out = np.zeros((len(idx), c.devices, 4))
        for k, (ay, ax) in enumerate(ANCHORS[c.devices]):
            jh = 1 + c.jitter * (2 * _uniform(c.seed, idx, k, 0) - 1)
            jw = 1 + c.jitter * (2 * _uniform(c.seed, idx, k, 1) - 1)
            wh = np.minimum(h, side * h * jh)
            ww = np.minimum(w, side * w * jw)
            out[:, k] = np.stack([ay * (h - wh), ax * (w - ww), wh, ww], 1)
        return torch.from_numpy(out)

    def __call__(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        self._check(x, index)
        b, ch, h, w = x.shape
        k_n = self.cfg.devices
        win = self.windows(index, (h, w)).to(x.device, torch.float32)  # (B, K, 4)
        v = self._sample(x.float().repeat_interleave(k_n, 0), win.reshape(b * k_n, 4))
        v = v.reshape(b, k_n, ch, h, w)
        if self.cfg.noise > 0:
            v = v + self.cfg.noise * self._noise(index, (ch, h, w), x.device)
        return v

    def view(self, x: torch.Tensor, index: torch.Tensor,
             position: int | torch.Tensor) -> torch.Tensor:
        """One device's view per sample: ``position`` an int (every sample) or an integer
        tensor ``(B,)`` (device ``position[i]`` for sample ``i``). Returns ``(B, C, H, W)``,
        equal to ``self(x, index)[arange(B), position]`` at a quarter of the cost for four
        devices (what single-view training needs)."""
        self._check(x, index)
        b, ch, h, w = x.shape
        pos = torch.as_tensor(position).cpu()
        if pos.dtype.is_floating_point or pos.dtype == torch.bool or pos.ndim > 1 \
                or (pos.ndim == 1 and pos.shape != (b,)):
            raise ConfigError(f"views: position must be an int or an integer tensor of shape "
                              f"({b},), got {position!r}")
        pos = pos.expand(b).long()
        if bool(((pos < 0) | (pos >= self.cfg.devices)).any()):
            raise ConfigError(f"views: positions must lie in 0..{self.cfg.devices - 1}, got "
                              f"{sorted(set(pos.tolist()))}")
        win = self.windows(index, (h, w))[torch.arange(b), pos].to(x.device, torch.float32)
        v = self._sample(x.float(), win)
        if self.cfg.noise > 0:
            v = v + self.cfg.noise * self._noise(index, (ch, h, w), x.device, pos)
        return v

    @staticmethod
    def _sample(src: torch.Tensor, win: torch.Tensor) -> torch.Tensor:
        """Windows ``win`` ``(M, 4)`` of images ``src`` ``(M, C, H, W)``, resized to (H, W)."""
        m, ch, h, w = src.shape
        top, left, wh, ww = win.unbind(-1)
        # affine_grid maps output [-1, 1] to input [-1, 1] (align_corners=False: pixel edges)
        theta = torch.zeros(m, 2, 3, device=src.device)
        theta[:, 0, 0] = ww / w
        theta[:, 0, 2] = (2 * left + ww) / w - 1
        theta[:, 1, 1] = wh / h
        theta[:, 1, 2] = (2 * top + wh) / h - 1
        grid = F.affine_grid(theta, [m, ch, h, w], align_corners=False)
        return F.grid_sample(src, grid, mode="bilinear", padding_mode="border",
                             align_corners=False)

    def _noise(self, index: torch.Tensor, shape, device,
               position: torch.Tensor | None = None) -> torch.Tensor:
        """Standard normal noise ``(B, K, *shape)``, a function of (seed, index, device k);
        with ``position`` ``(B,)``, only that device's noise per sample, ``(B, *shape)``."""
        c = self.cfg
        idx = index.cpu().numpy()
        seeds = np.stack([(_uniform(c.seed, idx, k, 2) * (1 << 62)).astype(np.int64)
                          for k in range(c.devices)], 1)
        g = torch.Generator()
        if position is not None:
            out = torch.empty(len(index), *shape)
            for i, k in enumerate(position.tolist()):
                g.manual_seed(int(seeds[i, k]))
                out[i] = torch.randn(shape, generator=g)
            return out.to(device)
        out = torch.empty(len(index), c.devices, *shape)
        for i in range(len(index)):
            for k in range(c.devices):
                g.manual_seed(int(seeds[i, k]))
                out[i, k] = torch.randn(shape, generator=g)
        return out.to(device)
