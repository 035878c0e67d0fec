"""`rexmoe-preprocess`: jsonl / Parquet / text files -> a megatron-core indexed dataset (.bin/.idx) + .json.

One document per jsonl line (its ``--json-key`` field, ``text`` by default; ``.gz`` and ``.zst``
inputs are read compressed, as Dolma and RedPajama ship them), per row of a Parquet file (its
``--json-key`` column, as FineWeb, DCLM and The Stack ship them; read one row group at a time, in
batches of ``--chunk-lines`` rows, so memory stays bounded by a row group's text column), or per
plain-text file, tokenized with the byte tokenizer, a Hugging Face ``tokenizer.json`` or a Hugging
Face tokenizer folder, ``eod`` appended to each. pyarrow and zstandard are imported only when such a
file is given. Documents keep the input order whatever ``--workers``
is: chunks of lines are tokenized by a process pool and written back in order. The files are
written under temporary names and renamed at the end, so an error (exit 2, one line) or an
interrupt never leaves a partial dataset behind. ``<prefix>.json`` records the tokenizer (name,
vocab size, eod id, sha256 of the tokenizer.json) and the sizes; training checks it.

    rexmoe-preprocess --input docs.jsonl --output-prefix data/docs --tokenizer byte
    rexmoe-preprocess --input a.jsonl b.jsonl.gz --output-prefix data/ab \\
        --tokenizer path/to/tokenizer.json --workers 8
    rexmoe-preprocess --input fineweb/000_00000.parquet dolma/v1_7-0000.json.gz \\
        --output-prefix data/mix --tokenizer path/to/Llama-2-7b-hf
"""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import signal
import sys
import time
import uuid
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .text_tokenizer import (
    BYTE,
    TextTokenizer,
    TokenizerLoadError,
    encode_texts,
    load_tokenizer,
    token_dtype,
    tokenizer_metadata,
)

__all__ = ["PreprocessError", "preprocess", "JSONL_SUFFIXES", "PARQUET_SUFFIXES"]

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSED_SUFFIXES = (".gz", ".zst", ".zstd")
PARQUET_SUFFIXES = (".parquet",)
_READ_BYTES = 1 << 20  # compressed bytes read at a time from a .zst input
SIDECAR_FORMAT = "rexmoe-indexed-v1"


class PreprocessError(Exception):
    """A bad input, field or tokenizer; the message is one line."""


# --------------------------------------------------------------------------------------------------
# Reading inputs
# --------------------------------------------------------------------------------------------------
def is_jsonl(path: str) -> bool:
    name = next((path[: -len(s)] for s in COMPRESSED_SUFFIXES if path.endswith(s)), path)
    return name.endswith(JSONL_SUFFIXES)


def is_parquet(path: str) -> bool:
    return path.endswith(PARQUET_SUFFIXES)


def _is_zstd(path: str) -> bool:
    return path.endswith((".zst", ".zstd"))


def _open_text(path: str):
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    return open(path, "rb")


class _DamagedInput(Exception):
    """A compressed input that cannot be read on; the message says what and where (no file name)."""


def _need(module: str, path: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise PreprocessError(f"{path}: reading it needs the '{package}' package (pip install {package})") from None


def _zstd_lines(path: str) -> Iterator[bytes]:
    """The lines (without ``\\n``) of a zstd-compressed file, one frame after another.

    WHY not ``ZstdDecompressor().stream_reader``: at the end of a truncated file it just stops, and
    the documents of the cut frame would be silently lost. Here the end of the file inside a frame
    is an error that names the byte where the data ends.
    """
    zstandard = _need("zstandard", path)
    dctx = zstandard.ZstdDecompressor()
    frame, fed, consumed, rest = dctx.decompressobj(), False, 0, b""
    with open(path, "rb") as f:
        while True:
            data = f.read(_READ_BYTES)
            start, consumed = consumed, consumed + len(data)
            if not data:
                if fed and not frame.eof:
                    raise _DamagedInput(f"truncated zstd frame (the file ends at byte {consumed} inside a frame)")
                break
            out = []
            try:
                while data:
                    if frame.eof:  # the next frame of a multi-frame file
                        frame, fed = dctx.decompressobj(), False
                    fed = True
                    out.append(frame.decompress(data))
                    data = frame.unused_data if frame.eof else b""
            except zstandard.ZstdError as err:
                raise _DamagedInput(f"damaged zstd data in compressed bytes {start}-{consumed} "
                                    f"({' '.join(str(err).split())})") from None
            lines = (rest + b"".join(out)).split(b"\n")
            rest = lines.pop()
            yield from lines
    if rest:
        yield rest


def _jsonl_lines(path: str) -> Iterator[bytes]:
    if _is_zstd(path):
        yield from _zstd_lines(path)
        return
    try:
        with _open_text(path) as f:
            yield from f
    except (EOFError, zlib.error, gzip.BadGzipFile) as err:  # a truncated or damaged .gz
        raise _DamagedInput(f"damaged or truncated gzip data ({' '.join(str(err).split())})") from None


def _parquet_batches(path: str, column: str, batch_rows: int) -> Iterator[tuple[int, list[str], int]]:
    """``(first_row, texts, utf8_bytes)`` of a Parquet file's ``column``, row group by row group."""
    pa = _need("pyarrow", path)
    pq = _need("pyarrow.parquet", path)
    pc = _need("pyarrow.compute", path)
    try:
        pf = pq.ParquetFile(path, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as err:
        raise PreprocessError(f"{path}: not a readable Parquet file ({' '.join(str(err).split())[:200]})") from None
    names = pf.schema_arrow.names
    if column not in names:
        shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
        raise PreprocessError(f"{path}: no column {column!r} (columns: {shown or 'none'}); "
                              "choose one with --text-column")
    kind = pf.schema_arrow.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        raise PreprocessError(f"{path}: column {column!r} is {kind}, not a string column")
    row = 0
    for group in range(pf.num_row_groups):
        group_start = row
        try:
            for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[group], columns=[column],
                                         use_threads=False):
                texts = batch.column(0)
                if texts.null_count:
                    first_null = texts.is_null().to_pylist().index(True)
                    raise PreprocessError(f"{path}: row group {group}, row {row + first_null}: "
                                          f"column {column!r} is null")
                yield row, texts.to_pylist(), int(pc.sum(pc.binary_length(texts)).as_py() or 0)
                row += len(texts)
        except (pa.ArrowException, OSError) as err:
            reason = " ".join(str(err).split())[:200] or type(err).__name__
            rows = pf.metadata.row_group(group).num_rows
            raise PreprocessError(f"{path}: row group {group} (0-based, of {pf.num_row_groups}; rows "
                                  f"{group_start}-{group_start + rows - 1}) cannot be read: {reason}") from None


def _chunks(inputs: Sequence[str], chunk_lines: int, chunk_bytes: int, column: str = "text") -> Iterator[tuple]:
    """Yields ``(kind, path, first_line_no, items, raw_bytes)`` in input order.

    jsonl: ``items`` are raw lines (bytes) of one file; parquet: ``items`` are the texts (str) of
    rows ``first_line_no``... (0-based) of one file; text: ``items`` are (path, whole file bytes).
    Unreadable files raise :class:`PreprocessError`.
    """
    try:
        yield from _chunks_unchecked(inputs, chunk_lines, chunk_bytes, column)
    except (OSError, EOFError) as err:  # e.g. a damaged .gz, a file vanishing mid-run
        where = getattr(err, "filename", None) or "an input"
        raise PreprocessError(f"cannot read {where}: {err.strerror or err}") from None


def _chunks_unchecked(inputs: Sequence[str], chunk_lines: int, chunk_bytes: int, column: str) -> Iterator[tuple]:
    text_batch: list[tuple[str, bytes]] = []
    text_bytes = 0
    for path in inputs:
        if (is_jsonl(path) or is_parquet(path)) and text_batch:
            yield ("text", None, 0, text_batch, text_bytes)
            text_batch, text_bytes = [], 0
        if is_parquet(path):
            for first_row, texts, size in _parquet_batches(path, column, chunk_lines):
                yield ("parquet", path, first_row, texts, size)
        elif is_jsonl(path):
            lines: list[bytes] = []
            size, first, line_no = 0, 1, 0
            try:
                for line in _jsonl_lines(path):
                    line_no += 1
                    if not lines:
                        first = line_no
                    lines.append(line)
                    size += len(line)
                    if len(lines) >= chunk_lines or size >= chunk_bytes:
                        yield ("jsonl", path, first, lines, size)
                        lines, size = [], 0
            except _DamagedInput as err:
                raise PreprocessError(f"{path}:{line_no + 1}: {err}") from None
            if lines:
                yield ("jsonl", path, first, lines, size)
        else:
            with _open_text(path) as f:
                data = f.read()
            text_batch.append((path, data))
            text_bytes += len(data)
            if len(text_batch) >= chunk_lines or text_bytes >= chunk_bytes:
                yield ("text", None, 0, text_batch, text_bytes)
                text_batch, text_bytes = [], 0
    if text_batch:
        yield ("text", None, 0, text_batch, text_bytes)


# --------------------------------------------------------------------------------------------------
# Tokenizing (in pool workers)
# --------------------------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _init_worker(spec: str, eod_token: Optional[str], key: str, single_thread: bool) -> None:
    # A forked worker inherits the parent's Python signal handlers (a trainer's SIGTERM flag, say):
    # with those, Pool.terminate() could not stop it and the pool's join would wait forever.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.SIG_IGN)
    if single_thread:  # one process per core already: no Rust thread pool inside each worker
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["tokenizer"] = load_tokenizer(spec, eod_token)
    _WORKER["key"] = key


def _decode(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise PreprocessError(f"{where}: not valid UTF-8 ({err.reason} at byte {err.start})") from None


def _texts_of_chunk(kind: str, path: Optional[str], first: int, items: list, key: str) -> list[str]:
    if kind == "parquet":  # checked for strings and nulls as they were read
        return items
    if kind == "text":
        texts = [_decode(raw, where) for where, raw in items]
        for (where, _), text in zip(items, texts):
            if not text.strip():  # would be a document of the end-of-document token alone
                raise PreprocessError(f"{where}: empty text file (no document); remove it from --input")
        return texts
    texts = []
    for offset, raw in enumerate(items):
        where = f"{path}:{first + offset}"
        if not raw.strip():
            continue  # blank line: no document
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            reason = getattr(err, "msg", None) or str(err)
            raise PreprocessError(f"{where}: not a JSON object ({reason})") from None
        if not isinstance(record, dict):
            raise PreprocessError(f"{where}: not a JSON object (got {type(record).__name__})")
        if key not in record:
            fields = ", ".join(sorted(map(str, record))[:10]) or "none"
            raise PreprocessError(f"{where}: no field {key!r} (fields: {fields}); choose one with --json-key")
        value = record[key]
        if not isinstance(value, str):
            raise PreprocessError(f"{where}: field {key!r} is {type(value).__name__}, not a string")
        texts.append(value)
    return texts


def _tokenize_chunk(chunk: tuple) -> tuple[list[np.ndarray], int]:
    kind, path, first, items, raw_bytes = chunk
    tokenizer: TextTokenizer = _WORKER["tokenizer"]
    texts = _texts_of_chunk(kind, path, first, items, _WORKER["key"])
    dtype = token_dtype(tokenizer.vocab_size)
    docs = []
    for ids in encode_texts(tokenizer, texts):
        arr = np.empty(len(ids) + 1, dtype=dtype)
        arr[:-1] = ids
        arr[-1] = tokenizer.eod
        docs.append(arr)
    return docs, raw_bytes


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------
def _ordered_results(pool: Any, chunks: Iterator[tuple], max_pending: int) -> Iterator[tuple]:
    """Results of ``_tokenize_chunk`` in input order, with at most ``max_pending`` chunks in flight.

    WHY not ``pool.imap``: its feeder thread reads the whole input ahead of the writer, so a large
    dump would sit in memory; here reading waits for the oldest chunk to come back.
    """
    pending: deque = deque()
    for chunk in chunks:
        pending.append(pool.apply_async(_tokenize_chunk, (chunk,)))
        if len(pending) >= max_pending:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _check_inputs(inputs: Sequence[str]) -> list[str]:
    if not inputs:
        raise PreprocessError("no --input given")
    out = []
    for path in inputs:
        p = Path(path)
        if not p.exists():
            raise PreprocessError(f"input not found: {path}")
        if not p.is_file():
            raise PreprocessError(f"input is not a file: {path}")
        if not os.access(p, os.R_OK):
            raise PreprocessError(f"input not readable: {path}")
        out.append(str(p))
    return out


def output_paths(prefix: str) -> dict[str, str]:
    return {ext: f"{prefix}.{ext}" for ext in ("bin", "idx", "json")}


def written_here(prefix: str) -> bool:
    """Whether ``prefix`` holds a dataset this tool wrote: ``<prefix>.json`` is our sidecar (it is
    renamed into place last, so it marks a whole dataset; it is what ``--overwrite`` may replace)."""
    try:
        with open(f"{prefix}.json", "rb") as f:
            sidecar = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return False
    return isinstance(sidecar, dict) and sidecar.get("format") == SIDECAR_FORMAT


def check_outputs(inputs: Sequence[str], output_prefix: str, overwrite: bool, tokenizer: str = BYTE) -> None:
    """Before any work: no output is an input (real paths: a symlink to an input is the input), and
    existing outputs are replaced only with ``overwrite`` and only when they are a dataset this tool
    wrote (:func:`written_here`). Raises PreprocessError."""
    sources = {os.path.realpath(p): p for p in [*inputs, *([tokenizer] if os.path.exists(tokenizer) else [])]}
    final = output_paths(output_prefix)
    for path in final.values():
        real = os.path.realpath(path)
        for source_real, source in sources.items():
            if real == source_real:
                raise PreprocessError(f"output {path} is the input {source}: a tool never writes over its own "
                                      "input; choose another --output-prefix")
            if real.startswith(source_real + os.sep):
                raise PreprocessError(f"output {path} lies inside the input {source}: a tool never writes "
                                      "into its own input; choose another --output-prefix")
        if os.path.isdir(real):
            raise PreprocessError(f"output {path} is a directory: choose another --output-prefix")
    existing = [p for p in final.values() if os.path.lexists(p)]
    if not existing:
        return
    if not written_here(output_prefix):
        raise PreprocessError(f"output exists: {existing[0]} was not written by rexmoe-preprocess (no "
                              f"{SIDECAR_FORMAT} sidecar {final['json']}): never replaced, even with "
                              "--overwrite; choose another --output-prefix")
    if not overwrite:
        raise PreprocessError(f"output exists: {existing[0]} (pass --overwrite to replace it)")


def preprocess(
    inputs: Sequence[str],
    output_prefix: str,
    tokenizer: str = BYTE,
    *,
    json_key: str = "text",
    eod_token: Optional[str] = None,
    workers: int = 1,
    chunk_lines: int = 512,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize ``inputs`` into ``output_prefix``.{bin,idx,json}; returns the sidecar's content.

    Raises :class:`PreprocessError` (one-line message) for a bad input, field or tokenizer; nothing
    is left on disk then.
    """
    start = time.perf_counter()
    inputs = _check_inputs(inputs)
    if not json_key:
        raise PreprocessError("--json-key must be a non-empty field name")
    if workers < 1:
        raise PreprocessError(f"--workers must be >= 1, got {workers}")
    if not output_prefix or output_prefix.endswith(os.sep):
        raise PreprocessError(f"--output-prefix must name a file prefix, got {output_prefix!r}")
    final = output_paths(output_prefix)
    check_outputs(inputs, output_prefix, overwrite, tokenizer)
    try:
        tok = load_tokenizer(tokenizer, eod_token)
    except TokenizerLoadError as err:
        raise PreprocessError(str(err)) from None
    meta = tokenizer_metadata(tok)
    dtype = token_dtype(tok.vocab_size)

    out_dir = Path(output_prefix).resolve().parent
    created_dirs = []
    for parent in reversed([out_dir, *out_dir.parents]):
        if not parent.exists():
            created_dirs.append(parent)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp_prefix = f"{output_prefix}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = output_paths(tmp_prefix)

    pool = None
    # decompressed sizes of .gz/.zst inputs and the text bytes of Parquet are unknown: no total then
    total_bytes = (None if any(p.endswith(COMPRESSED_SUFFIXES) or is_parquet(p) for p in inputs)
                   else sum(map(os.path.getsize, inputs)))
    num_docs = num_tokens = 0
    data_file = None
    try:
        from tqdm import tqdm

        chunks = _chunks(inputs, chunk_lines, chunk_bytes=4 << 20, column=json_key)
        single_thread = workers > 1
        if workers > 1:
            ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods()
                                              else "spawn")
            pool = ctx.Pool(workers, initializer=_init_worker,
                            initargs=(tokenizer, eod_token, json_key, single_thread))
            results = _ordered_results(pool, chunks, max_pending=4 * workers)
        else:
            _init_worker(tokenizer, eod_token, json_key, single_thread)
            results = map(_tokenize_chunk, chunks)

        # megatron after the pool is forked (its import is heavy and may start threads)
        from rexmoe_train import compat

        compat.install()
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        builder = IndexedDatasetBuilder(tmp["bin"], dtype=dtype)
        data_file = builder.data_file
        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing",
                   disable=not progress, file=sys.stderr, dynamic_ncols=True)
        with bar:
            for docs, raw_bytes in results:
                for doc in docs:
                    builder.add_document(doc, [doc.size])
                    num_tokens += int(doc.size)
                num_docs += len(docs)
                bar.update(raw_bytes)
                bar.set_postfix(docs=num_docs, tokens=num_tokens, refresh=False)
        if num_docs == 0:
            raise PreprocessError("the inputs hold no documents")
        builder.finalize(tmp["idx"])
        elapsed = time.perf_counter() - start
        meta.update({
            "format": SIDECAR_FORMAT,
            "id": uuid.uuid4().hex,  # changes on every write: keys training's index caches
            "dtype": np.dtype(dtype).name,
            "documents": num_docs,
            "tokens": num_tokens,
            "inputs": [os.path.abspath(p) for p in inputs],
            "json_key": json_key,
            "seconds": round(elapsed, 3),
        })
        with open(tmp["json"], "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)
            f.write("\n")
        for ext in ("bin", "idx", "json"):  # the sidecar last: its presence marks a whole dataset
            os.replace(tmp[ext], final[ext])
    except BaseException:
        if data_file is not None:
            data_file.close()
        for path in tmp.values():
            if os.path.exists(path):
                os.remove(path)
        for d in reversed(created_dirs):  # only directories this call created, only when empty
            try:
                d.rmdir()
            except OSError:
                break
        raise
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return meta
