"""Argument checks the recipe scripts share (recipes/*/run.py): Hydra overrides after the options,
and --only against the recipe's variant names. Errors go through the parser: one line, exit 2."""

from __future__ import annotations

import sys


def split_overrides(argv) -> tuple[list[str], list[str]]:
    """argv -> (options, Hydra overrides). An override (key=value) may come anywhere, also right
    after a list option such as --only or --seeds, whose nargs='+' would otherwise take it as a
    value."""
    argv = sys.argv[1:] if argv is None else list(argv)
    overrides = [a for a in argv if not a.startswith("-") and "=" in a]
    return [a for a in argv if a.startswith("-") or "=" not in a], overrides


def check_overrides_and_only(parser, extra: list[str], only, names: list[str]) -> None:
    bad = [o for o in extra if "=" not in o or o.startswith("-")]
    if bad:
        parser.error(f"unknown argument {bad[0]!r}: options are listed by --help; Hydra overrides look "
                     "like key=value")
    for name in only or []:
        if name not in names:
            parser.error(f"--only {name!r}: allowed values are {', '.join(names)}")
