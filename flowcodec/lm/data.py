"""The character-level language set (tinyshakespeare) and its vocabulary.

The text is found like the image sets: an explicit ``root``, then ``$FLOWCODEC_DATA``,
then the cache (``$FLOWCODEC_CACHE``), each a folder holding ``tinyshakespeare.txt`` or
the file itself. The first 90 % of the characters are for training, the last 10 % for
validation (the usual split). The project never ships the text.

Example
-------
>>> v = CharVocab("abc\\n")
>>> v.encode("cab").tolist(), v.decode([2, 0, 1])
([2, 0, 1], 'cab')
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch

from flowcodec.data import cache_dir
from flowcodec.errors import ConfigError, DataNotFoundError

__all__ = ["CharVocab", "SHAKESPEARE_FILE", "find_shakespeare", "load_shakespeare", "eval_windows",
           "sample_windows", "validation_prompts", "TRAIN_FRACTION"]  # fmt: skip

SHAKESPEARE_FILE = "tinyshakespeare.txt"
#: Share of the characters (from the start) used for training; the rest validates.
TRAIN_FRACTION = 0.9


class CharVocab:
    """Characters <-> ids: id ``i`` is ``chars[i]``.

    :meth:`encode` maps a string to an int64 tensor ``(n,)``; :meth:`decode` maps ids
    (a tensor or any iterable of ints) back. An unknown character or an id out of range is
    a :class:`ConfigError` naming it."""

    def __init__(self, chars: str) -> None:
        if not isinstance(chars, str) or not chars or len(set(chars)) != len(chars):
            raise ConfigError("a vocabulary needs a non-empty string of distinct characters")
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        """The sorted set of characters of ``text``."""
        return cls("".join(sorted(set(text))))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        bad = sorted({c for c in text if c not in self.index})
        if bad:
            raise ConfigError(f"characters not in the vocabulary: {bad!r}")
        return torch.tensor([self.index[c] for c in text], dtype=torch.long)

    def decode(self, ids: torch.Tensor | Iterable[int]) -> str:
        seq = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        bad = [i for i in seq if not isinstance(i, int) or not 0 <= i < len(self.chars)]
        if bad:
            raise ConfigError(f"token ids out of 0..{len(self.chars) - 1}: {bad[:8]!r}")
        return "".join(self.chars[i] for i in seq)


def find_shakespeare(root: str | os.PathLike | None = None) -> Path:
    """The path of ``tinyshakespeare.txt`` (``root``, then ``$FLOWCODEC_DATA``, then the
    cache); a :class:`DataNotFoundError` saying how to get it otherwise."""
    candidates: list[Path] = []
    if root is not None:
        candidates.append(Path(root).expanduser())
    if os.environ.get("FLOWCODEC_DATA"):
        candidates.append(Path(os.environ["FLOWCODEC_DATA"]).expanduser())
    candidates.append(cache_dir())
    for c in candidates:
        for f in (c, c / SHAKESPEARE_FILE):
            if f.is_file():
                return f
    looked = ", ".join(str(c) for c in candidates)
    raise DataNotFoundError(
        f"{SHAKESPEARE_FILE} not found (looked in: {looked}). Set FLOWCODEC_DATA to the "
        f"folder holding it (e.g. export FLOWCODEC_DATA=../shared/data), pass its path "
        f"(--data PATH; in Python: root=PATH), or copy it to {cache_dir()}; it is the "
        "char-rnn tinyshakespeare text (1,115,394 bytes)."
    )


def load_shakespeare(
    root: str | os.PathLike | None = None, vocab: CharVocab | None = None
) -> tuple[torch.Tensor, torch.Tensor, CharVocab]:
    """``(train_ids, val_ids, vocab)``: the first 90 % and last 10 % of the text as int64
    ids. ``vocab`` defaults to the text's sorted characters (65 for tinyshakespeare)."""
    text = find_shakespeare(root).read_text(encoding="utf-8")
    vocab = vocab or CharVocab.from_text(text)
    ids = vocab.encode(text)
    cut = int(TRAIN_FRACTION * len(ids))
    return ids[:cut], ids[cut:], vocab


def sample_windows(ids: torch.Tensor, batch: int, length: int,
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``batch`` random windows: inputs ``(batch, length)`` and the next-character targets
    ``(batch, length)`` (the inputs shifted by one)."""
    if ids.ndim != 1 or len(ids) <= length:
        raise ConfigError(f"need a 1-D id sequence longer than {length}, got {tuple(ids.shape)}")
    start = torch.randint(0, len(ids) - length, (batch,), generator=generator)
    idx = start.unsqueeze(1) + torch.arange(length + 1)
    w = ids[idx]
    return w[:, :-1], w[:, 1:]


def eval_windows(ids: torch.Tensor, context: int, max_windows: int | None = None,
                 what: str = "") -> torch.Tensor:  # fmt: skip
    """Start offsets of the consecutive ``context``-long windows of ``ids`` that have a next
    id to predict (``max_windows``: that many, evenly spaced). ConfigError with fewer than
    ``context + 1`` ids (``what`` says what for)."""
    n = (len(ids) - 1) // context
    if n < 1:
        raise ConfigError(f"need more than {context} ids{what}, got {len(ids)}")
    starts = torch.arange(n) * context
    if max_windows is not None and max_windows < n:
        starts = starts[torch.linspace(0, n - 1, max_windows).round().long()]
    return starts


def validation_prompts(val: torch.Tensor, count: int, length: int) -> list[tuple[int, list]]:
    """``count`` prompts of ``length`` ids evenly spaced over ``val``: ``(offset, ids)``."""
    span = len(val) - length - 1
    if span < 0:
        raise ConfigError(f"the validation text ({len(val)} ids) is shorter than a prompt "
                          f"({length}) plus one")  # fmt: skip
    return [(s, val[s : s + length].tolist())
            for s in (i * span // max(1, count) for i in range(count))]  # fmt: skip
