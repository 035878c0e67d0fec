"""`rexmoe-eval CHECKPOINT`: validation loss, perplexity and router statistics of a checkpoint
(rexmoe_train/tools/evaluate.py does the work). Bad input: one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rexmoe_train.tools import evaluate as evaluate_module

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
    p.add_argument("--out", help="write the JSON here (default: print the summary only)")
    return p


def main(argv=None) -> int:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed.checkpoint's own
    args = parser().parse_args(argv)
    try:
        # cheap checks first: no torch / megatron import for these
        evaluate_module.positive("--batches", args.batches)
        evaluate_module.positive("--micro-batch-size", args.micro_batch_size)
        if not Path(args.checkpoint).exists():
            raise evaluate_module.EvalError(f"{args.checkpoint}: no such checkpoint directory")
        if args.out and not Path(args.out).resolve().parent.is_dir():
            raise evaluate_module.EvalError(f"--out {args.out}: no such directory")
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
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(evaluate_module.summary(result), flush=True)
    if args.out:
        print(f"  -> {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
