"""`rexmoe-eval CHECKPOINT`: validation loss, perplexity and router statistics of a checkpoint
(rexmoe_train/tools/evaluate.py does the work). Bad input: one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rexmoe_train.tools import evaluate as evaluate_module
from rexmoe_train.tools import outputs

PROG = evaluate_module.PROG


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse prints the usage too: keep bad inputs to one line
        self.exit(2, f"{PROG}: {message} (see {PROG} --help)\n")


def parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog=PROG, description=evaluate_module.__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="checkpoint directory (or one iter_* directory)")
    p.add_argument("--data-source", choices=("embedded", "indexed"), help="default: the checkpoint's")
    p.add_argument("--blend", nargs="+", metavar="W_OR_PREFIX",
                   help="indexed datasets: PREFIX ... or W1 PREFIX1 W2 PREFIX2 ... (default: the checkpoint's)")
    p.add_argument("--tokenizer", help="byte, a tokenizer.json or a Hugging Face tokenizer folder "
                                       "(default: the checkpoint's data.tokenizer)")
    p.add_argument("--batches", type=int, help="validation micro-batches (default: what the trainer evaluates)")
    p.add_argument("--micro-batch-size", type=int, help="windows per batch (default: train.micro_batch_size)")
    p.add_argument("--psr-step", choices=("checkpoint", "full"), default="checkpoint",
                   help="PSR mask of the checkpoint's step (default) or all r*N candidates")
    p.add_argument("--out", help="write the JSON here (default: print the summary only); checked before the "
                                 "evaluation: never an existing directory, an input or a file inside a checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out when it is an earlier rexmoe-eval result (a file with "
                        '"written_by": "rexmoe-eval"); any other file is never replaced')
    return p


def main(argv=None) -> int:
    if argv is None:  # the console script itself, not a test calling main(argv) in-process
        from rexmoe_train.resilience.stray_errors import route_stray_errors

        route_stray_errors()  # "Exception ignored in ..." and thread tracebacks: off the terminal
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed.checkpoint's own
    args = parser().parse_args(argv)
    try:
        # cheap checks first: no torch / megatron import for these
        evaluate_module.positive("--batches", args.batches)
        evaluate_module.positive("--micro-batch-size", args.micro_batch_size)
        if not Path(args.checkpoint).exists():
            raise evaluate_module.EvalError(f"{args.checkpoint}: no such checkpoint directory")
        if args.out:
            _check_out(args)
        from rexmoe_train import compat
        from rexmoe_train.config.schema import ConfigError
        from rexmoe_train.convert.hf_format import ConvertError

        compat.install()  # before the first megatron import
        try:
            result = evaluate_module.evaluate(args)
        except (ConvertError, ConfigError) as err:
            raise evaluate_module.EvalError(str(err)) from None
    except evaluate_module.EvalError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    print(evaluate_module.summary(result), flush=True)  # first: a failed write below loses nothing shown
    if args.out:
        try:
            _write_json(Path(args.out), outputs.stamp(result, PROG))
        except OSError as err:
            print(f"{PROG}: --out {args.out}: {err.strerror or err}", file=sys.stderr)
            return 2
        print(f"  -> {args.out}", flush=True)
    return 0


def _check_out(args) -> None:
    """Every --out problem, before the evaluation runs (it takes minutes on a large model)."""
    inputs = [args.checkpoint]
    if args.tokenizer and args.tokenizer != "byte":
        inputs.append(args.tokenizer)
    for value in args.blend or ():
        inputs += [f"{value}.{ext}" for ext in ("bin", "idx", "json")]  # a weight names no file: harmless
    try:
        outputs.check_output_file(args.out, inputs, PROG, args.overwrite, flag="--out")
    except outputs.OutputError as err:
        raise evaluate_module.EvalError(str(err)) from None


def _write_json(path: Path, data: dict) -> None:
    """Written aside and renamed: an interrupted write never leaves half a file at --out."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
