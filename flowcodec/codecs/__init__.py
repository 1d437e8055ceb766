"""Feature codecs: the FeatureCodec API, baselines and learned codecs.

``build_codec(name, feature_shape, **kwargs)`` builds any registered codec; ``CODECS``
lists them. Importing this package does not import CompressAI (only coding with a learned
codec does).
"""

from flowcodec.codecs import exit as _exit  # noqa: F401  (registers exit-top1, exit-topk)
from flowcodec.codecs import image, jscc, learned, quant, raw, task  # noqa: F401  (register codecs)
from flowcodec.codecs import token as _token  # noqa: F401  (registers token-prune)
from flowcodec.codecs import token_map as _token_map  # noqa: F401  (registers token-map)
from flowcodec.codecs import token_merge as _token_merge  # noqa: F401  (registers token-merge)
from flowcodec.codecs.base import (
    CODECS,
    CodecOutput,
    FeatureCodec,
    build_codec,
    channel_groups,
    measured_bits,
    register_codec,
)
from flowcodec.codecs.image import JPEGCodec, WebPCodec
from flowcodec.codecs.jscc import JSCCCodec
from flowcodec.codecs.learned import BinaryCodec, FactorizedCodec, HyperpriorCodec, flip_bits
from flowcodec.codecs.quant import PCACodec, QuantCodec
from flowcodec.codecs.raw import RawCodec
from flowcodec.codecs.task import TaskCodec
from flowcodec.codecs.token import TokenPruneCodec
from flowcodec.codecs.token_map import TokenMapCodec
from flowcodec.codecs.token_merge import TokenMergeCodec
from flowcodec.codecs.train import CodecEval, CodecTrainResult, evaluate_codec, train_codec
from flowcodec.codecs.zoo import list_pretrained, load_codec, load_pretrained_codec, save_codec

__all__ = [
    "CODECS",
    "BinaryCodec",
    "CodecEval",
    "CodecOutput",
    "CodecTrainResult",
    "FactorizedCodec",
    "FeatureCodec",
    "HyperpriorCodec",
    "JPEGCodec",
    "JSCCCodec",
    "PCACodec",
    "QuantCodec",
    "RawCodec",
    "TaskCodec",
    "TokenMapCodec",
    "TokenMergeCodec",
    "TokenPruneCodec",
    "WebPCodec",
    "build_codec",
    "channel_groups",
    "evaluate_codec",
    "flip_bits",
    "list_pretrained",
    "load_codec",
    "load_pretrained_codec",
    "measured_bits",
    "register_codec",
    "save_codec",
    "train_codec",
]
