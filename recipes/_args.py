"""Argument checks the recipe scripts share (recipes/*/run.py): Hydra overrides after the options,
and --only against the recipe's variant names. Errors go through the parser: one line, exit 2."""

from __future__ import annotations


def check_overrides_and_only(parser, extra: list[str], only, names: list[str]) -> None:
    bad = [o for o in extra if "=" not in o or o.startswith("-")]
    if bad:
        parser.error(f"unknown argument {bad[0]!r}: options are listed by --help; Hydra overrides look "
                     "like key=value")
    for name in only or []:
        if name not in names:
            parser.error(f"--only {name!r}: allowed values are {', '.join(names)}")
