"""Gin config loading: experiment names to files, `;`-separated overrides, and errors before any work.

``load_config("d2r_cag_cifar10,smoke", "ALPHA = 10; EPOCHS = 2")`` applies the files in order (later ones
override), then the overrides, and checks what gin itself lets through: an override of a macro no file
defines (a typo such as ``ALPAH = 10`` would otherwise silently do nothing) and a ``%MACRO`` that is used
but never defined. Gin reports unknown configurables and parameters itself, with file and line.
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import logging
import operator
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gin
import torch

GIN_DIR = Path(__file__).resolve().parents[1] / "gin"


class ConfigError(ValueError):
    """A config problem found before any work started; the message says what and where."""


@dataclass
class LoadedConfig:
    """What was applied: the files in order, the override bindings, and the experiment's name."""

    files: list[Path]
    overrides: list[str]
    experiment: str
    skipped: list[str] = field(default_factory=list)


def available_configs() -> list[str]:
    """Names usable with ``gin=``: every top-level file in gin/ (experiments and profiles)."""
    return sorted(p.stem for p in GIN_DIR.glob("*.gin"))


def resolve_gin_files(spec: str) -> list[Path]:
    """Turn ``'d2r_cag_cifar10,smoke'`` (names in gin/ or paths to .gin files) into paths, in order."""
    names = [s.strip() for s in str(spec).split(",") if s.strip()]
    if not names:
        raise ConfigError(f"no gin config given; available: {', '.join(available_configs())}")
    files = []
    for name in names:
        as_path = Path(name)
        # A run's config artifact (config/operative_config.txt, previewable in the UI) is a gin file too.
        if as_path.suffix in (".gin", ".txt") and as_path.is_file():
            files.append(as_path.resolve())
            continue
        candidate = GIN_DIR / f"{as_path.stem if as_path.suffix == '.gin' else name}.gin"
        if not candidate.is_file():
            close = difflib.get_close_matches(name, available_configs(), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"unknown gin config {name!r}.{hint}\nAvailable configs: {', '.join(available_configs())}"
            )
        files.append(candidate)
    return files


_INCLUDE = re.compile(r"""^\s*include\s+['"]([^'"]+)['"]""", re.MULTILINE)
_SETS_MODEL_NAME = re.compile(r"^\s*MODEL_NAME\s*=", re.MULTILINE)


def is_experiment(path: Path, _seen: frozenset[Path] = frozenset()) -> bool:
    """Whether a gin file defines an experiment (sets ``MODEL_NAME``, itself or through an include).

    Every other top-level file (``smoke``, ``stable``, ...) is a profile: it only adjusts an experiment, so it
    needs one before it on the command line.
    """
    path = path.resolve()
    if path in _seen or not path.is_file():
        return False
    text = path.read_text()
    if _SETS_MODEL_NAME.search(text):
        return True
    for name in _INCLUDE.findall(text):
        for candidate in (Path(name), GIN_DIR / name, path.parent / name):
            if candidate.is_file():
                if is_experiment(candidate, _seen | {path}):
                    return True
                break
    return False


def _check_order(names: list[str], files: list[Path]) -> None:
    """An experiment first, profiles after it: a profile alone or first would run something nobody asked."""
    kinds = [is_experiment(f) for f in files]
    if any(kinds) and kinds[0]:
        return
    profiles = [n for n, k in zip(names, kinds) if not k]
    experiments = [n for n, k in zip(names, kinds) if k]
    example_exp = experiments[0] if experiments else "d2r_cag_cifar10"
    example = ",".join([example_exp, *profiles])
    if not experiments:
        listed = ", ".join(sorted(n for n in available_configs() if is_experiment(GIN_DIR / f"{n}.gin")))
        raise ConfigError(
            f"--gin {','.join(names)} names only profile(s) ({', '.join(profiles)}), no experiment. "
            f"A profile adjusts an experiment, and profiles go last: e.g. --gin {example}.\n"
            f"Experiments: {listed}"
        )
    raise ConfigError(
        f"--gin {','.join(names)} puts profile {profiles[0]} before the experiment "
        f"{example_exp}: profiles go last (later files override earlier ones), e.g. --gin {example}"
    )


_ARITHMETIC = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


def _arithmetic_value(text: str) -> float | None:
    """The value of a purely numeric expression such as ``8/255`` (gin cannot evaluate it), else ``None``."""

    def value(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -value(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
            return _ARITHMETIC[type(node.op)](value(node.left), value(node.right))
        raise ValueError(text)

    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        return None
    if not isinstance(tree, ast.BinOp):
        return None
    try:
        return value(tree)
    except (ValueError, ZeroDivisionError):
        return None


def _check_no_arithmetic(bindings: list[str]) -> None:
    for binding in bindings:
        name, text = (part.strip() for part in binding.split("=", 1))
        result = _arithmetic_value(text)
        if result is not None:
            raise ConfigError(
                f"override {binding!r}: gin has no arithmetic, so {text} cannot be a value; write the number "
                f"itself: '{name} = {result!r}'"
            )


def parse_overrides(overrides: str | list[str] | None) -> list[str]:
    """Split ``'ALPHA = 10; EPOCHS = 2'`` (or newlines) into single gin bindings."""
    if not overrides:
        return []
    parts = overrides if isinstance(overrides, list) else str(overrides).replace("\n", ";").split(";")
    bindings = [p.strip() for p in parts if p.strip()]
    for b in bindings:
        if "=" not in b:
            raise ConfigError(
                f"bad override {b!r}: expected a gin binding such as 'ALPHA = 10' or 'Trainer.epochs = 2'"
            )
    return bindings


def defined_macros() -> set[str]:
    """Names of the macros the applied configs define."""
    return {scope for (scope, selector) in gin.config._CONFIG if selector == "gin.macro"}


def _used_macros(value: Any) -> set[str]:
    """Macro names referenced (``%NAME``) anywhere inside a bound value."""
    if isinstance(value, gin.config.ConfigurableReference):
        if value.selector == "gin.macro":
            return {value.scoped_selector.split("/")[0]}
        return set()
    if isinstance(value, dict):
        return set().union(*(_used_macros(v) for v in value.values())) if value else set()
    if isinstance(value, (list, tuple)):
        return set().union(*(_used_macros(v) for v in value)) if value else set()
    return set()


def macro_target(binding: str) -> str | None:
    """The macro a binding sets (``'ALPHA = 10'`` -> ``'ALPHA'``), or None for a configurable parameter."""
    name = binding.split("=", 1)[0].strip()
    return None if "." in name or "/" in name else name


def _check_override_targets(bindings: list[str], defined: set[str]) -> None:
    for binding in bindings:
        name = macro_target(binding)
        if name is None:
            continue  # configurable parameters: gin checks these itself
        if name not in defined:
            close = difflib.get_close_matches(name, sorted(defined), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(
                f"override {binding!r} sets macro {name!r}, which no applied config defines.{hint}\n"
                f"Macros defined: {', '.join(sorted(defined))}"
            )


def _check_macros_defined() -> None:
    defined = defined_macros()
    for (scope, selector), params in gin.config._CONFIG.items():
        for param, value in params.items():
            missing = _used_macros(value) - defined
            if missing:
                where = f"{scope + '/' if scope else ''}{selector}.{param}"
                raise ConfigError(
                    f"{where} uses undefined macro(s) {', '.join('%' + m for m in sorted(missing))}"
                )


class _SearchPathNoise(logging.Filter):
    """Gin tries each search path for an include and logs every miss at ERROR; the misses are expected."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("Path not found:")


@contextlib.contextmanager
def _quiet_include_search() -> Iterator[None]:
    noise = _SearchPathNoise()
    root = logging.getLogger()
    root.addFilter(noise)
    try:
        yield
    finally:
        root.removeFilter(noise)


def load_config(
    spec: str, overrides: str | list[str] | None = None, *, skip_undefined_macros: bool = False
) -> LoadedConfig:
    """Clear gin, register every component, apply the files then the overrides, and check them.

    An override of a macro that no applied file defines is an error, unless ``skip_undefined_macros``:
    then it is left out and listed in ``LoadedConfig.skipped`` (commands that apply one set of bindings to
    several methods, e.g. a guide backbone that a single-model method does not have).
    """
    import components  # noqa: F401  (registers every configurable with gin)
    import pipeline.tuning.space  # noqa: F401  (registers SearchSpace, which gin/search/*.gin bind)

    files = resolve_gin_files(spec)
    _check_order([s.strip() for s in str(spec).split(",") if s.strip()], files)
    bindings = parse_overrides(overrides)
    _check_no_arithmetic(bindings)
    skipped: list[str] = []
    gin.clear_config()
    if str(GIN_DIR) not in gin.config._LOCATION_PREFIXES:
        gin.add_config_file_search_path(str(GIN_DIR))
    with _quiet_include_search():
        try:
            gin.parse_config_files_and_bindings([str(f) for f in files], None, finalize_config=False)
            defined = defined_macros()
            if skip_undefined_macros:
                skipped = [b for b in bindings if macro_target(b) not in (None, *defined)]
                bindings = [b for b in bindings if b not in skipped]
            _check_override_targets(bindings, defined)
            gin.parse_config_files_and_bindings(None, bindings, finalize_config=False)
        except ConfigError:
            raise
        except (ValueError, SyntaxError, TypeError, KeyError, OSError) as err:
            raise ConfigError(f"{type(err).__name__}: {err}") from err
    _check_macros_defined()
    return LoadedConfig(files=files, overrides=bindings, experiment=files[0].stem, skipped=skipped)


def macro(name: str, default: Any = None) -> Any:
    """The value of a gin macro, or ``default`` when no applied config defines it."""
    return gin.query_parameter(f"%{name}") if name in defined_macros() else default


def render_value(value: Any, reference: Callable[[gin.config.ConfigurableReference], str]) -> str:
    """A bound value as gin source text, each ``@ref``/``%MACRO`` inside it written by ``reference``.

    Containers keep their order (a dict's order can matter: ``WeightedLoss.terms`` sums in it).
    """
    if isinstance(value, gin.config.ConfigurableReference):
        return reference(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {render_value(v, reference)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(render_value(v, reference) for v in value) + "]"
    if isinstance(value, tuple):
        items = ", ".join(render_value(v, reference) for v in value)
        return "(" + items + ("," if len(value) == 1 else "") + ")"
    return repr(value)


def _macro_value_or_ref(ref: gin.config.ConfigurableReference) -> str:
    if ref.selector == "gin.macro":
        return _resolved(gin.config._CONFIG[(ref.scoped_selector.split("/")[0], "gin.macro")]["value"])
    return repr(ref)


def _resolved(value: Any) -> str:
    """``repr`` of a bound value with every ``%MACRO`` replaced by the macro's value (``@refs`` stay)."""
    return render_value(value, _macro_value_or_ref)


def flat_parameters() -> dict[str, str]:
    """Every bound gin parameter as ``'scope/Configurable.param' -> value`` strings (for MLflow params).

    Macro references show their values (``Trainer.epochs`` is ``'2'``, not ``'%EPOCHS'``): a param is
    read where the UI compares runs, and a ``%NAME`` there would hide the difference.
    """
    flat = {}
    for (scope, selector), params in sorted(gin.config._CONFIG.items()):
        if selector == "gin.macro":
            flat[scope] = _resolved(params.get("value"))
            continue
        prefix = f"{scope}/" if scope else ""
        short = selector.rsplit(".", 1)[-1]
        for param, value in params.items():
            flat[f"{prefix}{short}.{param}"] = _resolved(value) if not isinstance(value, str) else value
    return flat


def resolve_device(name: str) -> torch.device:
    """'auto' picks CUDA when present; an explicit 'cuda' without a GPU is an error, not a silent CPU run.

    Here rather than in ``pipeline.train`` so that commands without MLflow (the bench, the learning check)
    can use it.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but torch sees no GPU; use --device cpu or auto")
    return device


def without_flag(argv: Sequence[str], flag: str) -> list[str]:
    """``argv`` less ``flag VALUE`` and ``flag=VALUE``: what a launcher passes on to its processes."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(f"{flag}="):
            out.append(arg)
    return out
