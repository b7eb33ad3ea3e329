"""What the bench runs: each method built from its gin config with the command's bindings, and the images.

Every measurement builds its method here, so that the main table, the reference row and the fast-path
comparison all train the same configuration (backbones, batch size, profiles, ``--overrides``).
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from pipeline.config import load_config, parse_overrides

_GIN_SWITCH = {"auto": "'auto'", "on": "True", "off": "False"}


def load_images(
    source: str, n_train: int, n_eval: int, data_dir: str | None, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """uint8 NHWC train and eval images with labels, and what they are ('cifar10' or 'synthetic').

    Training throughput does not depend on the pixels; evaluation does a little (PGD's early stop only
    masks updates, AutoAttack skips images it has already broken), and the fast-path comparison reads
    best on real images, so CIFAR-10 is used when it is found.
    """
    if source in ("auto", "cifar10"):
        from components.data import DataNotFoundError, load_arrays

        try:
            x_train, y_train = load_arrays("cifar10", data_dir, "train")
            x_test, y_test = load_arrays("cifar10", data_dir, "test")
        except DataNotFoundError:
            if source == "cifar10":
                raise
        else:
            rng = np.random.RandomState(seed)
            pick = rng.choice(len(x_train), size=n_train, replace=n_train > len(x_train))
            eval_pick = np.arange(n_eval) % len(x_test)
            return x_train[pick], y_train[pick], x_test[eval_pick], y_test[eval_pick], "cifar10"
    rng = np.random.RandomState(seed)
    x = rng.randint(0, 256, size=(n_train + n_eval, 32, 32, 3), dtype=np.uint8)
    y = rng.randint(0, 10, size=n_train + n_eval).astype(np.int64)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:], "synthetic"


def method_overrides(
    name: str, args: argparse.Namespace, fast_path: bool | None = None
) -> tuple[list[str], list[str]]:
    """Gin bindings for ``name``: backbones, batch size, fast-path switches, then ``--overrides``.

    Macro bindings are kept only where the config defines the macro (single-model methods have no
    GUIDE_BACKBONE): the second list holds the ones left out. ``fast_path`` False forces fp32/contiguous,
    True/None uses the command line's --amp and --channels-last.
    """
    wanted = [
        f"TARGET_BACKBONE = '{args.target}'",
        f"GUIDE_BACKBONE = '{args.guide}'",
        f"BATCH_SIZE = {args.batch_size}",
        *parse_overrides(args.overrides),
    ]
    loaded = load_config(method_spec(name, args), wanted, skip_undefined_macros=True)
    kept, skipped = loaded.overrides, loaded.skipped
    amp, channels_last = ("off", "off") if fast_path is False else (args.amp, args.channels_last)
    kept += [
        f"Trainer.amp = {_GIN_SWITCH[amp]}",
        f"Trainer.channels_last = {_GIN_SWITCH[channels_last]}",
        f"Trainer.compile = {_GIN_SWITCH[args.compile]}",
        f"experiment.cudnn_benchmark = {_GIN_SWITCH[args.cudnn_benchmark]}",
        "Trainer.progress = False",
    ]
    return kept, skipped


def method_spec(name: str, args: argparse.Namespace) -> str:
    """The gin spec of one method: its config, then every ``--profile`` file (e.g. ``stable``)."""
    return ",".join([name, *getattr(args, "profile", [])])


def build_method(name: str, overrides: list[str]) -> Any:
    """Load ``name`` with ``overrides`` and build its experiment (graph, data, trainer), seeded."""
    from components.experiment import experiment

    load_config(name, overrides)
    return experiment()


def build_for_bench(
    name: str, args: argparse.Namespace, fast_path: bool | None = None
) -> tuple[Any, list[str], list[str]]:
    """``name`` built with the command's bindings: the experiment, the bindings applied and the macro
    bindings left out (see :func:`method_overrides`)."""
    overrides, skipped = method_overrides(name, args, fast_path)
    return build_method(method_spec(name, args), overrides), overrides, skipped
