"""Every experiment's gin bindings, as a golden record that a restructuring of gin/ must leave unchanged.

For each experiment in gin/ (alone, and with the ``smoke`` and ``stable`` profiles appended as a user would
pass them to ``-P gin=...``), the project's own loader applies the files and this module reads every bound
value from gin: macros (``ALPHA``) and configurable parameters (``kl_adv/KL.reduction``), with ``%MACRO``
and ``@scope/Name()`` references kept as written, so that a change of structure (a macro inlined, a
reference re-pointed) shows too. Configurables are keyed by short name and scope, not module path: moving
a configurable to another module is not a change of configuration.

The record is tests/gin_bindings.json: the full bindings of each experiment, and for each profile only
what it changes (``null``: a binding that disappeared). Regenerate it only when a change of values is
intended, and review its diff:

    PYTHONPATH=$PWD python tests/gin_bindings.py --write     # rewrite the record
    PYTHONPATH=$PWD python tests/gin_bindings.py             # print the differences, exit 1 if any
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import gin

from pipeline.config import GIN_DIR, available_configs, is_experiment, load_config, render_value

GOLDEN = Path(__file__).with_name("gin_bindings.json")
# The profile combinations recorded for every experiment, appended after it as on the command line.
PROFILES = ("smoke", "stable", "smoke,stable")


def _by_short_name(ref: gin.config.ConfigurableReference) -> str:
    """``%MACRO``, or ``@scope/Name()`` with the configurable's short name (not its module path)."""
    scope = "/".join(ref.scopes)
    if ref.configurable.selector == "gin.macro":
        return f"%{scope}"
    name = f"{scope}/{ref.configurable.name}" if scope else ref.configurable.name
    return f"@{name}{'()' if ref.evaluate else ''}"


def render(value: Any) -> str:
    """A bound value as gin source text: references by scope and short name, containers in their order."""
    return render_value(value, _by_short_name)


def current_bindings() -> dict[str, str]:
    """Every binding gin holds now: ``MACRO`` or ``scope/Configurable.param`` -> its value as text."""
    out = {}
    for (scope, selector), params in gin.config._CONFIG.items():
        if selector == "gin.macro":
            out[scope] = render(params["value"])
            continue
        short = selector.rsplit(".", 1)[-1]
        prefix = f"{scope}/" if scope else ""
        for param, value in params.items():
            key = f"{prefix}{short}.{param}"
            if key in out:
                raise ValueError(f"two configurables share the short name of {key}; key them by module")
            out[key] = render(value)
    return dict(sorted(out.items()))


def experiments() -> list[str]:
    """The experiment names a user can pass to ``-P gin=`` (profiles excluded)."""
    return [name for name in available_configs() if is_experiment(GIN_DIR / f"{name}.gin")]


def bindings_of(spec: str) -> dict[str, str]:
    """The bindings ``-P gin=<spec>`` applies, through the project's loader."""
    load_config(spec)
    return current_bindings()


def _delta(base: dict[str, str], full: dict[str, str]) -> dict[str, str | None]:
    changed: dict[str, str | None] = {k: v for k, v in full.items() if base.get(k) != v}
    changed.update({k: None for k in base if k not in full})
    return dict(sorted(changed.items()))


def _apply(base: dict[str, str], delta: dict[str, str | None]) -> dict[str, str]:
    full = dict(base)
    for key, value in delta.items():
        if value is None:
            full.pop(key, None)
        else:
            full[key] = value
    return dict(sorted(full.items()))


def record() -> dict[str, dict[str, dict[str, str | None]]]:
    """The golden record's content now: per experiment, its bindings and each profile's changes to them."""
    out = {}
    for name in experiments():
        base = bindings_of(name)
        entry: dict[str, dict[str, str | None]] = {"bindings": dict(base)}
        for profile in PROFILES:
            entry[profile] = _delta(base, bindings_of(f"{name},{profile}"))
        out[name] = entry
    return out


def expected(golden: dict[str, Any], name: str, profile: str | None) -> dict[str, str]:
    """The full bindings the record says ``name`` (with ``profile`` appended, if any) applies."""
    base = golden[name]["bindings"]
    return dict(base) if profile is None else _apply(base, golden[name][profile])


def diff(want: dict[str, str], got: dict[str, str]) -> list[str]:
    """Readable lines, one per binding that differs: missing, new, or changed (old -> new)."""
    lines = []
    for key in sorted(set(want) | set(got)):
        if key not in got:
            lines.append(f"  - {key} = {want[key]}   (no longer bound)")
        elif key not in want:
            lines.append(f"  + {key} = {got[key]}   (newly bound)")
        elif want[key] != got[key]:
            lines.append(f"  ~ {key}: {want[key]} -> {got[key]}")
    return lines


def load_golden() -> dict[str, Any]:
    """The committed record."""
    return json.loads(GOLDEN.read_text())


def compare() -> list[str]:
    """Every difference between the committed record and the bindings now, as readable lines."""
    golden = load_golden()
    lines = []
    names = experiments()
    if set(names) != set(golden):
        lines.append(f"experiments: recorded {sorted(golden)}, now {names}")
    for name in sorted(set(names) & set(golden)):
        for profile in (None, *PROFILES):
            spec = name if profile is None else f"{name},{profile}"
            found = diff(expected(golden, name, profile), bindings_of(spec))
            if found:
                lines += [f"{spec}:", *found]
    return lines


def main(argv: list[str] | None = None) -> int:
    """``--write`` rewrites the record; without it, print the differences and exit 1 if there are any."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"rewrite {GOLDEN.name} from the gin files")
    args = parser.parse_args(argv)
    if args.write:
        GOLDEN.write_text(json.dumps(record(), indent=1) + "\n")
        print(f"wrote {GOLDEN}")
        return 0
    lines = compare()
    print("\n".join(lines) if lines else "bindings unchanged")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
