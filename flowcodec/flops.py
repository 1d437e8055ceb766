"""FLOPs of a module's forward pass, the unit every device-cost figure is reported in.

Ground floor: imports torch and nothing of flowcodec. Counted by ``torch.utils.flop_counter``
(2 FLOPs per multiply-accumulate of convolutions and matrix products), on one sample, in eval
mode, and the module's mode is restored afterwards.

Example
-------
>>> from torch import nn
>>> count_flops(nn.Linear(4, 3), (4,))
24
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["count_flops"]


def count_flops(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass on one sample (2 per multiply-accumulate of convolutions
    and matrix products, as counted by ``torch.utils.flop_counter``)."""
    # imported here: it pulls in torch's compiler stack (seconds), which start-up must not pay
    from torch.utils.flop_counter import FlopCounterMode

    p = next(iter(module.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            module(torch.zeros((1, *input_shape), device=device))
    finally:
        module.train(was_training)
    return int(fc.get_total_flops())
