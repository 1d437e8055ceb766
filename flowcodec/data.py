"""Datasets: the embedded default (scikit-learn's 8x8 digits) and CIFAR-10.

Both load into an :class:`ArrayDataset`: every image decoded once into one tensor, so
an epoch is a sequence of tensor slices (and, for CIFAR-10, batched crop-and-flip
augmentation) rather than 50,000 JPEG decodes. The decoded CIFAR-10 arrays are cached
on disk (``$FLOWCODEC_CACHE`` or ``~/.cache/flowcodec``) the first time they are read.

Example
-------
>>> from flowcodec.data import load_dataset
>>> train, test = load_dataset("digits")
>>> x, y = next(train.batches(32))
>>> tuple(x.shape), x.dtype, y.dtype
((32, 1, 8, 8), torch.float32, torch.int64)
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flowcodec.errors import ConfigError, DataNotFoundError

__all__ = [
    "ArrayDataset",
    "DATASETS",
    "load_dataset",
    "load_digits",
    "load_cifar10",
    "find_cifar10",
    "cache_dir",
]

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_TARBALL = "cifar10-jpg.tar.gz"


def cache_dir() -> Path:
    """Where decoded datasets and cached models go (``$FLOWCODEC_CACHE`` or ~/.cache)."""
    root = os.environ.get("FLOWCODEC_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "flowcodec"


@dataclass
class ArrayDataset(torch.utils.data.Dataset):
    """Images and labels held as two tensors.

    Parameters
    ----------
    images : torch.Tensor
        ``uint8`` of shape ``(N, C, H, W)`` (pixel values) or ``float32`` in [0, 1].
    labels : torch.Tensor
        ``int64`` of shape ``(N,)``.
    mean, std : tuple of float
        Per-channel normalisation applied to images scaled to [0, 1].
    augment : bool
        Random 4-pixel-padded crops and horizontal flips in :meth:`batches` when
        ``train=True`` (natural images only; the digits set leaves it off).
    classes : list of str
    """

    images: torch.Tensor
    labels: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False
    classes: list[str] = field(default_factory=list)
    name: str = ""

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ConfigError(f"images must be (N, C, H, W), got {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise ConfigError("labels must be (N,) with N matching images")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else int(self.labels.max()) + 1

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 or [0, 1] float images -> normalised float32 (same device)."""
        x = images.float()
        if images.dtype == torch.uint8:
            x = x / 255.0
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.normalize(self.images[i : i + 1])[0], self.labels[i]

    def take(self, idx: torch.Tensor) -> ArrayDataset:
        """The samples at ``idx`` (same normalisation, augmentation and classes)."""
        return ArrayDataset(
            self.images[idx], self.labels[idx], self.mean, self.std, self.augment,
            self.classes, self.name,
        )  # fmt: skip

    def subset(self, n: int, seed: int = 0) -> ArrayDataset:
        """A random subset of ``n`` samples (fixed by ``seed``)."""
        g = torch.Generator().manual_seed(seed)
        return self.take(torch.randperm(len(self), generator=g)[:n])

    def sample(self, n: int | None, seed: int = 0) -> ArrayDataset:
        """``n`` samples for an evaluation or a fit: all of them when ``n`` is None or not
        smaller than the set, else a seeded random subset. Never the first ``n``: a data set
        stored class by class (CIFAR-10's ImageFolder test split is) would give one class."""
        if n is None or n >= len(self):
            return self
        return self.subset(int(n), seed)

    def batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = False,
        train: bool = False,
        generator: torch.Generator | None = None,
        device: str | torch.device = "cpu",
        drop_last: bool = False,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield normalised ``(x, y)`` batches on ``device``.

        With ``train=True`` and ``augment`` set, each batch gets random crops and flips
        drawn from ``generator``.
        """
        if batch_size <= 0:
            raise ConfigError("batch_size must be positive")
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        images = self.images
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            if drop_last and len(idx) < batch_size:
                break
            xb = images[idx].to(device, non_blocking=True)
            if train and self.augment:
                xb = crop_flip(xb, generator)
            yield self.normalize(xb), self.labels[idx].to(device, non_blocking=True)


def crop_flip(x: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4):
    """Random ``pad``-padded crops and horizontal flips of a batch ``(B, C, H, W)``."""
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x.float(), (pad, pad, pad, pad), mode="reflect").to(x.dtype)
    oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(x.device)
    flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
    rows = oy[:, None] + torch.arange(h, device=x.device)[None]
    cols = ox[:, None] + torch.arange(w, device=x.device)[None]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    bi = torch.arange(b, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


# --- digits ------------------------------------------------------------------------------
def load_digits(test_fraction: float = 0.2, seed: int = 0) -> tuple[ArrayDataset, ArrayDataset]:
    """scikit-learn's bundled 1,797 8x8 digits, split (stratified, fixed seed) into
    1,437 train and 360 test images of shape ``(1, 8, 8)``, values in [0, 1]."""
    from sklearn.datasets import load_digits as _sk_digits
    from sklearn.model_selection import train_test_split

    d = _sk_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    mean, std = (float(xtr.mean()),), (float(xtr.std()),)
    classes = [str(i) for i in range(10)]

    def make(xa, ya):
        return ArrayDataset(torch.from_numpy(xa), torch.from_numpy(ya), mean, std, False,
                            classes, "digits")  # fmt: skip

    return make(xtr, ytr), make(xte, yte)


# --- CIFAR-10 ----------------------------------------------------------------------------
def _is_imagefolder(p: Path) -> bool:
    return (p / "train").is_dir() and (p / "test").is_dir()


def find_cifar10(root: str | os.PathLike | None = None) -> Path:
    """Locate an ImageFolder copy of CIFAR-10 (``train/`` and ``test/`` folders).

    Looks at ``root``, then ``$FLOWCODEC_DATA``, then the cache. A candidate may be the
    folder itself, a folder holding ``cifar10/`` or ``cifar10-jpg.tar.gz``, or the
    tarball; a tarball is extracted once into the cache.
    """
    candidates: list[Path] = []
    if root is not None:
        candidates.append(Path(root).expanduser())
    if os.environ.get("FLOWCODEC_DATA"):
        candidates.append(Path(os.environ["FLOWCODEC_DATA"]).expanduser())
    extracted = cache_dir() / "cifar10"
    candidates.append(extracted)
    # An extracted copy anywhere wins over a tarball, so a tarball is extracted only once.
    for c in candidates:
        for folder in (c, c / "cifar10", c / "cifar10-jpg"):
            if _is_imagefolder(folder):
                return folder
    for c in candidates:
        tarball = c if c.is_file() else c / CIFAR10_TARBALL
        if tarball.is_file() and tarball.name.endswith((".tar.gz", ".tgz", ".tar")):
            return _extract(tarball, extracted)
    looked = ", ".join(str(c) for c in candidates)
    raise DataNotFoundError(
        f"CIFAR-10 not found (looked in: {looked}). Get it in one of these ways:\n"
        "  * set FLOWCODEC_DATA to a folder with train/<class>/*.jpg and test/<class>/*.jpg, "
        "or to a folder holding cifar10-jpg.tar.gz, e.g. export FLOWCODEC_DATA=/path/to/data "
        "(flowcodec train-family also takes --data PATH; in Python: root=PATH);\n"
        f"  * extract a copy yourself: mkdir -p {extracted} && tar xzf cifar10-jpg.tar.gz "
        f"-C {extracted};\n"
        "  * with internet access, in Python: load_cifar10(download=True) fetches the "
        "original set through torchvision into the cache."
    )


def _extract(tarball: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tarball) as tf:
        tf.extractall(dest, filter="data")
    for folder in (dest, *sorted(p for p in dest.iterdir() if p.is_dir())):
        if _is_imagefolder(folder):
            return folder
    raise DataNotFoundError(f"{tarball} did not contain train/ and test/ folders")


def _decode_split(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from PIL import Image

    from flowcodec.progress import tqdm

    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if not classes:
        raise DataNotFoundError(f"{folder} has no class folders")
    files, labels = [], []
    for ci, c in enumerate(classes):
        fs = sorted((folder / c).glob("*.jp*g")) + sorted((folder / c).glob("*.png"))
        files += fs
        labels += [ci] * len(fs)

    def read(p: Path) -> np.ndarray:
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)

    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as ex:
        arrays = list(
            tqdm(ex.map(read, files, chunksize=256), total=len(files),
                 desc=f"decoding {folder.name}", leave=False)
        )  # fmt: skip
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise DataNotFoundError(f"{folder}: images have differing shapes {sorted(shapes)[:3]}")
    x = np.stack(arrays).transpose(0, 3, 1, 2).copy()
    return x, np.asarray(labels, dtype=np.int64), classes


def _cached_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]
    path = cache_dir() / "decoded" / f"cifar10-{split}-{key}.npz"
    if path.is_file():
        z = np.load(path, allow_pickle=False)
        return z["x"], z["y"], [str(c) for c in z["classes"]]
    x, y, classes = _decode_split(folder / split)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, x=x, y=y, classes=np.array(classes))
    tmp.replace(path)
    return x, y, classes


def load_cifar10(
    root: str | os.PathLike | None = None, download: bool = False
) -> tuple[ArrayDataset, ArrayDataset]:
    """CIFAR-10 as uint8 ``(N, 3, 32, 32)`` tensors: 50,000 train and 10,000 test images.

    ``root`` (or ``$FLOWCODEC_DATA``) points at an ImageFolder copy or its tarball; with
    ``download=True`` and no local copy, torchvision fetches the original set.
    """
    try:
        folder = find_cifar10(root)
    except DataNotFoundError:
        if not download:
            raise
        return _download_cifar10()
    parts = {}
    for split in ("train", "test"):
        x, y, classes = _cached_split(folder, split)
        parts[split] = ArrayDataset(torch.from_numpy(x), torch.from_numpy(y), CIFAR10_MEAN,
                                    CIFAR10_STD, split == "train", classes, "cifar10")  # fmt: skip
    return parts["train"], parts["test"]


def _download_cifar10() -> tuple[ArrayDataset, ArrayDataset]:
    from torchvision.datasets import CIFAR10

    out = []
    for train in (True, False):
        ds = CIFAR10(str(cache_dir() / "torchvision"), train=train, download=True)
        x = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
        y = torch.as_tensor(ds.targets, dtype=torch.int64)
        out.append(ArrayDataset(x, y, CIFAR10_MEAN, CIFAR10_STD, train, list(ds.classes),
                                "cifar10"))  # fmt: skip
    return out[0], out[1]


DATASETS = {"digits": load_digits, "cifar10": load_cifar10}


def load_dataset(name: str, **kwargs) -> tuple[ArrayDataset, ArrayDataset]:
    """Load a dataset by registry name (``digits`` or ``cifar10``) as ``(train, test)``."""
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name](**kwargs)
