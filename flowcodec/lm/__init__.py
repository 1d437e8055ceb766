"""Language models on the device-edge link: the character data set, the trainer of the
``shakespeare-char`` family (:mod:`flowcodec.family.lm`) and collaborative generation
(device only, edge only, exact speculative decoding, uncertainty gating).

See docs/language.md.
"""

from flowcodec.lm.data import CharVocab, find_shakespeare, load_shakespeare, sample_windows
from flowcodec.lm.speculative import (
    GenerationTrace,
    Round,
    gated_loss,
    generate_device,
    generate_edge,
    generate_gated,
    generate_speculative,
    generate_speculative_codec,
    pass_times,
)
from flowcodec.lm.train import LMTrainConfig, LMTrainResult, evaluate_lm, load_lm, save_lm, train_lm

__all__ = [
    "CharVocab",
    "GenerationTrace",
    "LMTrainConfig",
    "LMTrainResult",
    "Round",
    "evaluate_lm",
    "find_shakespeare",
    "gated_loss",
    "generate_device",
    "generate_edge",
    "generate_gated",
    "generate_speculative",
    "generate_speculative_codec",
    "load_lm",
    "load_shakespeare",
    "pass_times",
    "sample_windows",
    "save_lm",
    "train_lm",
]
