"""Training checkpoints: everything needed to continue a run bit-for-bit, loaded without unpickling code.

A checkpoint holds model and optimizer states, the lr scheduler, the data loader's generator, every RNG
state, the epoch and the best-so-far record. It is written atomically (temp file + rename) so a kill during
the write leaves the previous one intact, and read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop can touch, in a form ``weights_only`` loading accepts."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2])},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    np.random.set_state(
        ("MT19937", state["numpy"]["key"].numpy().astype(np.uint32), state["numpy"]["pos"], 0, 0.0)
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(value: Any) -> Any:
    # random.setstate wants nested tuples; a round trip may hand back lists.
    if isinstance(value, (list, tuple)):
        return tuple(_tuplify(v) for v in value)
    return value


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by ``save_checkpoint`` (tensors and plain containers only)."""
    return torch.load(Path(path), map_location=map_location, weights_only=True)


def strip_module_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DataParallel/DDP's ``module.`` (and torch.compile's ``_orig_mod.``) key prefixes.

    The authors' eval script loads such checkpoints with ``strict=False`` and silently keeps random weights
    (METHODS.md 1.5); stripping the prefix lets every load here use ``strict=True``.
    """
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out
