"""`rexmoe-preprocess`: tokenize jsonl / Parquet / text files into a megatron-core indexed dataset
(rexmoe_train/data/preprocess.py does the work). Bad input: one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Optional

from rexmoe_train.data.preprocess import PreprocessError, output_paths, preprocess, written_here
from rexmoe_train.data.text_tokenizer import BYTE
from rexmoe_train.exit_codes import ExitCode
from rexmoe_train.tools import outputs

PROG = "rexmoe-preprocess"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(ExitCode.USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rexmoe-preprocess",
                description="Tokenize jsonl / Parquet / text files into a megatron-core indexed dataset "
                            "(<prefix>.bin, <prefix>.idx) plus <prefix>.json (tokenizer, sizes).")
    p.add_argument("--input", "-i", nargs="+", required=True, metavar="FILE",
                   help="jsonl files (.jsonl/.json/.ndjson, optionally .gz or .zst): one document per line; "
                        ".parquet files: one document per row; any other file: one document per file")
    p.add_argument("--output-prefix", "-o", required=True, metavar="PREFIX",
                   help="writes PREFIX.bin, PREFIX.idx and PREFIX.json")
    p.add_argument("--tokenizer", "-t", default=BYTE, metavar="byte|TOKENIZER_JSON|FOLDER",
                   help="'byte' (UTF-8 bytes, eod 256), a Hugging Face tokenizer.json, or a Hugging Face "
                        "tokenizer folder (what AutoTokenizer.from_pretrained reads) (default: byte)")
    p.add_argument("--json-key", "--text-column", dest="json_key", default="text",
                   help="the jsonl field / Parquet column holding the text (default: text)")
    p.add_argument("--eod-token", default=None,
                   help="end-of-document token of a Hugging Face tokenizer (default: a folder's eos_token, "
                        "else the first of <|endoftext|>, <|end_of_text|>, </s>, <eos>, ... it defines)")
    p.add_argument("--workers", "-j", type=int, default=min(8, os.cpu_count() or 1),
                   help="tokenizer processes (default: min(8, CPUs))")
    p.add_argument("--chunk-lines", type=int, default=512,
                   help="jsonl lines / Parquet rows per work item (default: 512)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing PREFIX.bin/.idx/.json that rexmoe-preprocess wrote (PREFIX.json is its "
                        "sidecar); other files, and the inputs, are never replaced")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def check_outputs(args) -> None:
    """Before any work: no output is, or lies inside, an input, the tokenizer or a checkpoint; an
    existing output is replaced only when it is a dataset this tool wrote (its sidecar)."""
    inputs = [*args.input, *([args.tokenizer] if args.tokenizer != BYTE else [])]
    for path in output_paths(args.output_prefix).values():
        try:
            outputs.check_output_file(path, inputs, PROG, args.overwrite, flag="output",
                                      owned=lambda _: written_here(args.output_prefix), create_parents=True)
        except outputs.OutputError as err:
            raise PreprocessError(str(err)) from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    if argv is None:  # the console script itself, not a test calling main(argv) in-process
        from rexmoe_train.resilience.stray_errors import route_stray_errors

        route_stray_errors()  # "Exception ignored in ..." and thread tracebacks: off the terminal
    args = build_parser().parse_args(argv)
    prog = PROG
    if args.chunk_lines < 1:
        print(f"{prog}: error: --chunk-lines must be >= 1, got {args.chunk_lines}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        check_outputs(args)
        meta = preprocess(args.input, args.output_prefix, args.tokenizer, json_key=args.json_key,
                          eod_token=args.eod_token, workers=args.workers, chunk_lines=args.chunk_lines,
                          overwrite=args.overwrite, progress=args.progress)
    except PreprocessError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return ExitCode.USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing written", file=sys.stderr)
        return 130
    print(f"[preprocess] {meta['documents']} documents, {meta['tokens']} tokens "
          f"({meta['tokenizer_name']}, vocab {meta['vocab_size']}, eod {meta['eod']}) in "
          f"{meta['seconds']:.1f} s -> {args.output_prefix}.bin/.idx/.json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
