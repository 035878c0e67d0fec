"""Byte-level tokenizer for the embedded corpus.

WHY bytes: the default training data must work on every machine with no
download, so the tokenizer cannot depend on a vocabulary file either. Raw UTF-8
bytes need no training, round-trip any text exactly, and give a tiny vocabulary
(257) that keeps the embedding/output layers cheap in smoke runs.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = ["ByteTokenizer"]


class ByteTokenizer:
    """ids 0..255 are raw UTF-8 bytes; id 256 (``eod``) ends a document."""

    _EOD = 256

    @property
    def name(self) -> str:
        """Short identifier recorded in run metadata."""
        return "byte"

    @property
    def eod(self) -> int:
        """End-of-document id, appended after every document."""
        return self._EOD

    @property
    def vocab_size(self) -> int:
        """256 byte values + ``eod``."""
        return self._EOD + 1

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of ``text`` as ints (no ``eod`` appended)."""
        return list(text.encode("utf-8"))

    def encode_bytes(self, b: bytes) -> np.ndarray:
        """Already-encoded bytes as a uint16 token array (no ``eod`` appended).

        WHY uint16: the vocabulary (257) does not fit uint8, and uint16 halves
        the memory of the concatenated corpus compared with int32.
        """
        return np.frombuffer(b, dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text for ``ids``; ``eod`` and out-of-range ids are skipped.

        Accepts lists, numpy arrays and CPU tensors. Invalid UTF-8 (e.g. a
        multi-byte character cut by a window boundary) decodes as U+FFFD
        instead of raising, because model samples are arbitrary byte strings.
        """
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        arr = arr[(arr >= 0) & (arr < 256)]
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"ByteTokenizer(vocab_size={self.vocab_size}, eod={self.eod})"
