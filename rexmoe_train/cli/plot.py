"""`rexmoe-plot RUN_DIR [--out DIR]`: PNG plots from a run's metrics.jsonl (rexmoe_train/tools/plot.py
says which). A missing run dir or an empty metrics.jsonl: one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Optional

from rexmoe_train.exit_codes import ExitCode
from rexmoe_train.tools import plot


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="rexmoe-plot", description=plot.__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory holding metrics.jsonl")
    parser.add_argument("--out", metavar="DIR", default=None, help="output directory (default: RUN_DIR/plots)")
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
