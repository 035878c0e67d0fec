"""`rexmoe-plan [OVERRIDES...]`: will this config fit, what will each link carry, how fast will it run?

Simulates one training step of every distinct rank with the project's own training code on fake
tensors (rexmoe_train/plan/, docs/planning.md): peak memory per rank and by category, traffic per
collective kind, a step-time estimate for --gpu, and the verdict. Same Hydra overrides as
rexmoe-train. Bad input: one line naming the field, exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rexmoe_train.exit_codes import ExitCode

PROG = "rexmoe-plan"
GIB = 1024 ** 3
MIB = 1024 ** 2
_UNIT = [GIB, "GiB"]  # the table's unit: MiB when the largest peak is under 1 GiB


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints the usage too: keep bad inputs to one line
        self.exit(ExitCode.USAGE, f"{PROG}: {message} (see {PROG} --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for rexmoe-train (model=rexmoe_2.3b ...)")
    p.add_argument("--world-size", type=int, help="ranks (default: the smallest the layout allows)")
    p.add_argument("--gpu", default="h100-sxm", help="h100-sxm (default), h200, b200 or cpu")
    p.add_argument("--spec", default="te", help="layer spec the target runs: te (default) or local")
    p.add_argument("--hot-factor", type=float, default=None,
                   help="imbalanced case: hottest expert at this multiple of the mean (default 2; 1: none)")
    p.add_argument("--headroom", type=float, default=0.0,
                   help="share of the usable memory that must stay free for 'fits' (e.g. 0.1)")
    p.add_argument("--no-suggest", action="store_true", help="skip the search for a change that fits")
    p.add_argument("--json", metavar="PATH", help="also write the plan as one JSON object here")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier rexmoe-plan --json output")
    return p


def _gib(n) -> str:
    return "-" if n is None else f"{n / _UNIT[0]:.2f}"


def table(result: dict) -> str:
    """The terminal summary of a plan."""
    _UNIT[:] = [GIB, "GiB"] if result["peak_bytes"] >= GIB else [MIB, "MiB"]
    lines = [f"{PROG}: world size {result['world_size']}, gpu {result['gpu']} (usable "
             f"{_gib(result['usable_bytes'])} {_UNIT[1]}), spec {result['spec']}"]
    categories = ["parameters", "gradients", "optimizer_state", "activations", "temporaries", "other"]
    head = f"  {'ranks':<12}{'load':<12}{'psr':<5}{'peak':>9}" + "".join(f"{c[:8]:>10}" for c in categories)
    lines += [f"memory ({_UNIT[1]}, at the peak):", head]
    for row in result["per_rank"]:
        ranks = row["ranks"]
        span = f"{ranks[0]}-{ranks[-1]}" if len(ranks) > 1 else str(ranks[0])
        cats = row["by_category"]
        lines.append(f"  {span:<12}{row['load']:<12}{row['psr_stage']:<5}{_gib(row['peak_bytes']):>9}"
                     + "".join(f"{_gib(cats.get(c, 0)):>10}" for c in categories))
    worst = max(result["per_rank"], key=lambda row: row["peak_bytes"])
    by_module = list(worst.get("activations_by_module", {}).items())
    if by_module:  # where the largest case's activations go, summed over layers
        shown = ", ".join(f"{name} {_gib(size)}" for name, size in by_module[:6])
        rest = sum(size for _, size in by_module[6:])
        lines.append(f"activations at the peak by module ({_UNIT[1]}; {worst['load']} {worst['psr_stage']}): {shown}"
                     + (f", the rest {_gib(rest)}" if rest else ""))
    lines.append(f"traffic per rank per step (sent / received, {_UNIT[1]}; balanced load):")
    for kind, moved in sorted(result["traffic_bytes_per_step"].items()):
        lines.append(f"  {kind:<20}{_gib(moved['sent']):>9} / {_gib(moved['received'])}")
    if result.get("step_time_s") is None:
        lines.append("time: not available")
    else:
        t = result["time"]
        lines.append(f"time (estimate, {result['gpu']}): step {result['step_time_s']:.3f} s, compute "
                     f"{t.get('compute_s', 0):.3f} s, communication {t.get('comm_s', 0):.3f} s, MFU "
                     f"{100 * result['mfu']:.1f} %")
    margin = result["margin_bytes"]
    unit = _UNIT[1]
    lines.append(f"verdict: {result['verdict']} (peak {_gib(result['peak_bytes'])} {unit}, margin "
                 f"{_gib(margin)} {unit} = {100 * result['margin_fraction']:.1f} % of usable"
                 + (f"; {100 * result['headroom_required']:.0f} % headroom required"
                    if result["headroom_required"] else "") + ")")
    suggestion = result.get("suggestion")
    if suggestion:
        for tried in suggestion["tried"]:
            if "skipped" in tried:
                lines.append(f"  tried {tried['change']}: not valid ({tried['skipped']})")
            else:
                lines.append(f"  tried {tried['change']}: peak {_gib(tried['peak_bytes'])} {unit}, "
                             f"{tried['verdict']}")
        if suggestion.get("error"):
            lines.append(f"suggestion: the search stopped: {suggestion['error']}")
        else:
            lines.append(f"suggestion: {suggestion['change']}" if suggestion["change"]
                         else "suggestion: nothing in the grid fits")
    lines.append("assumptions:")
    lines += [f"  {key}: {value}" for key, value in result["assumptions"].items()]
    return "\n".join(lines)


def _check_json_path(path: str, overrides, overwrite: bool) -> None:
    """tools/outputs.py's guard, before any simulation: never an input (a path-valued override, the
    config dir), a checkpoint or a run dir; an existing plan is replaced only with --overwrite."""
    from rexmoe_train.tools import outputs

    inputs = [value for o in overrides if "=" in o and Path(value := o.split("=", 1)[1]).exists()]
    if os.environ.get("REXMOE_CONFIG_DIR"):
        inputs.append(os.environ["REXMOE_CONFIG_DIR"])
    try:
        outputs.check_output_file(path, inputs, PROG, overwrite, flag="--json")
    except outputs.OutputError as err:
        raise ValueError(str(err)) from None


def main(argv=None) -> int:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    args = parser().parse_intermixed_args(argv)  # overrides before, between or after the options
    try:
        if args.json:
            _check_json_path(args.json, args.overrides, args.overwrite)
        if args.world_size is not None and args.world_size < 1:
            raise ValueError(f"--world-size={args.world_size}: must be >= 1")
        if not 0.0 <= args.headroom < 1.0:
            raise ValueError(f"--headroom={args.headroom}: must be in [0, 1)")
    except ValueError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return ExitCode.USAGE
    from rexmoe_train import compat

    compat.install()  # before the first megatron import
    from rexmoe_train.plan.planner import DEFAULT_HOT_FACTOR, PlanOptions
    from rexmoe_train.plan.search import PlanInputError, make_plan
    from rexmoe_train.plan.worker import SimulationError

    options = PlanOptions(world_size=args.world_size, gpu=args.gpu, spec=args.spec,
                          hot_factor=DEFAULT_HOT_FACTOR if args.hot_factor is None else args.hot_factor,
                          suggest=not args.no_suggest, headroom=args.headroom)
    try:
        result = make_plan(args.overrides, options, log=lambda m: print(m, file=sys.stderr, flush=True))
    except PlanInputError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return ExitCode.USAGE
    except SimulationError as err:
        print(f"{PROG}: the config cannot be simulated: {err}", file=sys.stderr)
        return ExitCode.USAGE
    result["overrides"] = list(args.overrides)
    print(table(result), flush=True)
    if args.json:
        from rexmoe_train.tools import outputs

        tmp = f"{args.json}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(outputs.stamp(result, PROG), f, indent=1, default=str)
        os.replace(tmp, args.json)
        print(f"  -> {args.json}", flush=True)
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
