"""`rexmoe-plot RUN_DIR [--out DIR]`: PNG plots from a run's metrics.jsonl (rexmoe_train/tools/plot.py
says which). `rexmoe-plot scaling ...`: loss and Δ vs tokens over seeds (docs/scaling.md). A missing
run dir or an empty metrics.jsonl: one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional

from rexmoe_train.exit_codes import ExitCode
from rexmoe_train.tools import plot


def _scaling(argv: list[str]) -> int:
    """`rexmoe-plot scaling (--setting NAME=DIR[,DIR...] ... | --manifest FILE) --out FIG.png`."""
    parser = argparse.ArgumentParser(prog="rexmoe-plot scaling", description=plot.plot_scaling.__doc__.split("\n")[0])
    parser.add_argument("--setting", action="append", metavar="NAME=DIR[,DIR...]", default=[],
                        help="a setting and its run dirs (one per seed); repeat per setting")
    parser.add_argument("--manifest", metavar="FILE", help='JSON {"settings": {NAME: [DIR, ...]}, "baseline": NAME}')
    parser.add_argument("--baseline", metavar="NAME", help="the setting Δ is taken against (default: the "
                        "manifest's, else vanilla if given, else the first)")
    parser.add_argument("--out", metavar="FIG.png", required=True)
    parser.add_argument("--table", action="store_true", help="also print the mean ± sd table")
    parser.error = lambda message: parser.exit(ExitCode.USAGE, f"rexmoe-plot scaling: error: {message}\n")
    args = parser.parse_args(argv)
    try:
        groups, labels, baseline = {}, {}, args.baseline
        if args.manifest:
            import json

            try:
                manifest = json.loads(open(args.manifest).read())
                groups.update({k: list(v) for k, v in manifest["settings"].items()})
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                raise plot.PlotError(f"--manifest {args.manifest}: cannot read its settings "
                                     f"({type(err).__name__})") from None
            labels, baseline = manifest.get("labels", {}), baseline or manifest.get("baseline")
        for item in args.setting:
            name, _, dirs = item.partition("=")
            if not name or not dirs or name in groups:
                raise plot.PlotError(f"--setting {item!r}: must be NAME=DIR[,DIR...], each NAME once")
            groups[name] = [d for d in dirs.split(",") if d]
        if not groups:
            raise plot.PlotError("give --setting NAME=DIR[,DIR...] (repeated) or --manifest FILE")
        baseline = baseline or ("vanilla" if "vanilla" in groups else next(iter(groups)))
        path = plot.plot_scaling(groups, args.out, baseline, labels)
        table = plot.scaling_table(plot.scaling_summary(groups, baseline)) if args.table else None
    except plot.PlotError as err:
        print(f"rexmoe-plot: error: {err}", file=sys.stderr)
        return ExitCode.USAGE
    print(path)
    if table:
        print(table)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    if argv is None:  # the console script itself, not a test calling main(argv) in-process
        from rexmoe_train.resilience.stray_errors import route_stray_errors

        route_stray_errors()  # "Exception ignored in ..." and thread tracebacks: off the terminal
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["scaling"]:
        return _scaling(argv[1:])
    parser = argparse.ArgumentParser(prog="rexmoe-plot", description=plot.__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory holding metrics.jsonl")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="output directory (default: RUN_DIR/plots): new, empty, or one rexmoe-plot wrote "
                             "before (it holds .rexmoe-output.json; its plots are replaced); never the run dir, "
                             "a checkpoint or a directory holding anything else")
    args = parser.parse_args(argv)
    try:
        paths = plot.plot_run(args.run_dir, args.out)
    except plot.PlotError as err:
        print(f"rexmoe-plot: error: {err}", file=sys.stderr)
        return ExitCode.USAGE
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
