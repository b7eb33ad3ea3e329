"""Analytic forward-FLOP count of a model, for the compute-cost benchmark (e.g. the LBGAT guide's 3-4x)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def count_forward_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward pass, counted as 2 x multiply-accumulates of every conv and linear layer.

    ``input_shape`` is (C, H, W) for a single image or (B, C, H, W) for a batch of B. Only ``nn.Conv2d``
    (any kernel, stride, dilation or groups) and ``nn.Linear`` are counted: they dominate the cost of the
    networks here, and leaving out BN, activations, pooling and biases keeps the number comparable with the
    usual "MACs x 2" figures quoted in papers. The model is run once on zeros in eval mode (so BN statistics
    are not touched) and its train/eval mode is restored afterwards.
    """
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        shape = (1, *shape)
    if len(shape) != 4:
        raise ValueError(f"input_shape must be (C, H, W) or (B, C, H, W), got {tuple(input_shape)}.")

    total = 0

    def conv_hook(module: nn.Conv2d, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        # Each output element is a dot product over (in_channels / groups) x kh x kw inputs.
        macs_per_output = (module.in_channels // module.groups) * kh * kw
        total += 2 * output.numel() * macs_per_output

    def linear_hook(module: nn.Linear, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        nonlocal total
        total += 2 * output.numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))

    first = next(model.parameters(), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None else torch.float32
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(shape, device=device, dtype=dtype))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return total
