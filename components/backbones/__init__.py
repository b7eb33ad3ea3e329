"""Classifier backbones (WRN, ResNet-18 variants, PreActResNet-18, a small CPU CNN) behind one registry.

Importing this package registers every architecture; build them by name with :func:`build_backbone`.
"""

# The architecture modules are imported for their side effect of registering themselves.
from . import preact_resnet, resnet, small_cnn, strategy_net, wideresnet  # noqa: F401
from .flops import count_forward_flops
from .registry import (
    BACKBONES,
    INPUT_SIZES,
    Normalize,
    NormalizedNet,
    available_backbones,
    build_backbone,
    default_input_size,
    register,
)

__all__ = [
    "BACKBONES",
    "INPUT_SIZES",
    "Normalize",
    "NormalizedNet",
    "available_backbones",
    "build_backbone",
    "count_forward_flops",
    "default_input_size",
    "register",
]
