"""Forward-FLOP count of a model, for the compute-cost benchmark (e.g. the LBGAT guide's 3-4x)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from components.modes import model_mode


def count_forward_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward pass, counted as 2 x multiply-accumulates of every conv and matrix product.

    ``input_shape`` is (C, H, W) for a single image or (B, C, H, W) for a batch of B. Counted by
    ``torch.utils.flop_counter.FlopCounterMode``, which counts convolutions (any kernel, stride, dilation
    or groups) and matrix products (``nn.Linear``) and leaves out BN, activations, pooling and biases: they
    are a small part of the cost of the networks here, and leaving them out keeps the number comparable with
    the usual "MACs x 2" figures quoted in papers (the totals equal the former hand count of conv and linear
    layers, see tests/test_backbones.py). The model is run once on zeros in eval mode (so BN statistics are
    not touched) and its modes are restored afterwards.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4:
        raise ValueError(f"input_shape must be (C, H, W) or (B, C, H, W), got {tuple(input_shape)}.")
    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None else torch.float32
    counter = FlopCounterMode(display=False)
    with model_mode(model, train=False), torch.no_grad(), counter:
        model(torch.zeros(shape, device=device, dtype=dtype))
    return int(counter.get_total_flops())
