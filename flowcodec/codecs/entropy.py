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

from flowcodec.codecs.entropy_models import (
    TorchEntropyBottleneck,
    TorchGaussianConditional,
    compressai_extension,
    entropy_bottleneck,
    gaussian_conditional,
    have_compressai,
    scale_table,
)
from flowcodec.codecs.rans import (
    BYPASS_LIMIT,
    IndexPlan,
    check_model_tables,
    check_tables,
    decode_planned,
    eb_symbols,
    frozen_tables,
    rans_decode,
    rans_encode,
    to_symbols,
)

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
    "compressai_extension",
    "frozen_tables",
    "IndexPlan",
    "decode_planned",
]

# the names these had when they were private here (experiments and old scripts use them)
_ext, _tables, _IndexPlan, _decode_planned = (compressai_extension, frozen_tables, IndexPlan,
                                              decode_planned)  # fmt: skip
