"""Name -> constructor registry for classifier backbones, plus the gin entry point that builds them.

Training code never imports a concrete architecture: it calls :func:`build_backbone` (usually through a gin
scope such as ``target/build_backbone`` or ``guide/build_backbone``), so swapping WRN-34-10 for a tiny CPU
model is a one-line config change. Architecture modules add themselves with :func:`register`.
"""

from __future__ import annotations

import difflib
from collections import OrderedDict
from collections.abc import Callable, Sequence

import gin
import torch
from torch import nn

BackboneFactory = Callable[..., nn.Module]

#: Registered constructors. Every factory accepts ``num_classes`` and ``in_channels`` keywords.
BACKBONES: dict[str, BackboneFactory] = {}

#: The input side length (pixels) each registered backbone is designed for (32 for CIFAR, 64 for Tiny).
INPUT_SIZES: dict[str, int] = {}


def register(name: str, *, input_size: int = 32) -> Callable[[BackboneFactory], BackboneFactory]:
    """Decorator that adds a backbone factory to :data:`BACKBONES` under ``name``.

    ``input_size`` records the image side length the architecture is laid out for (its pooling and linear
    sizes depend on it), so callers and tests can feed it a matching input.
    """

    def decorator(factory: BackboneFactory) -> BackboneFactory:
        # A silent overwrite would make a config build a different network than the one it names.
        if name in BACKBONES:
            raise ValueError(f"Backbone {name!r} is already registered (by {BACKBONES[name]!r}).")
        BACKBONES[name] = factory
        INPUT_SIZES[name] = input_size
        return factory

    return decorator


def available_backbones() -> list[str]:
    """Sorted names accepted by :func:`build_backbone`."""
    return sorted(BACKBONES)


def default_input_size(name: str) -> int:
    """Image side length (pixels) that the registered backbone ``name`` expects."""
    _check_name(name)
    return INPUT_SIZES[name]


def _check_name(name: str) -> None:
    if name not in BACKBONES:
        close = difflib.get_close_matches(name, BACKBONES.keys(), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"Unknown backbone {name!r}.{hint} Available backbones: {', '.join(available_backbones())}."
        )


class Normalize(nn.Module):
    """Per-channel ``(x - mean) / std`` as the first layer of a model.

    Keeping normalisation inside the model means attacks and epsilon balls always live in [0, 1] pixel
    space, whatever statistics the network was trained with.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean and std must have the same length, got {len(mean)} and {len(std)}.")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}.")
        # Persistent buffers: they follow .to(device) and are saved with the checkpoint, so a reloaded
        # model normalises exactly as it did in training.
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a batch ``x`` of shape (B, C, H, W) with values in [0, 1]."""
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class NormalizedNet(nn.Sequential):
    """A backbone preceded by :class:`Normalize`; exposes them as ``.normalize`` and ``.net``.

    The wrapped net's own state_dict is ``model.net.state_dict()``, so checkpoints of the bare architecture
    (e.g. the authors' released weights) can still be loaded into ``.net`` with ``strict=True``.
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__(OrderedDict([("normalize", Normalize(mean, std)), ("net", net)]))


@gin.configurable
def build_backbone(
    name: str = gin.REQUIRED,
    num_classes: int = gin.REQUIRED,
    in_channels: int = 3,
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    **kwargs: object,
) -> nn.Module:
    """Build the registered backbone ``name`` for ``num_classes`` classes and ``in_channels`` input planes.

    Inputs are always expected in [0, 1]. ``normalize=(mean, std)`` puts per-channel normalisation inside
    the returned model (a :class:`NormalizedNet`); ``None`` returns the bare network, as in the D2R, LBGAT,
    TRADES and FGSM-PGI/PGK code, which all train on un-normalised inputs. Extra keyword arguments go to the
    backbone's factory (e.g. ``depth``/``widen_factor`` for ``wideresnet``). Raises ``ValueError`` for an
    unknown name.
    """
    _check_name(name)
    net = BACKBONES[name](num_classes=num_classes, in_channels=in_channels, **kwargs)
    if normalize is None:
        return net
    if len(normalize) != 2:
        raise ValueError(f"normalize must be (mean, std), got {normalize!r}.")
    mean, std = normalize
    if len(mean) not in (1, in_channels):
        raise ValueError(f"normalize mean/std need 1 or {in_channels} entries, got {len(mean)}.")
    return NormalizedNet(net, mean, std)
