"""flowcodec: task-oriented feature communication between device, edge and cloud.

Import the parts you need (``flowcodec.bitstream``, ``flowcodec.family``,
``flowcodec.codecs``, ``flowcodec.pipeline``); importing the top level stays cheap and
does not pull in compressai or sionna.
"""

from flowcodec.bitstream import Bitstream, BitstreamError, Header, TensorSpec
from flowcodec.errors import CheckpointError, ConfigError, DataNotFoundError, SplitError

__version__ = "0.1.0"

__all__ = [
    "Bitstream",
    "BitstreamError",
    "CheckpointError",
    "ConfigError",
    "DataNotFoundError",
    "Header",
    "SplitError",
    "TensorSpec",
    "__version__",
]
