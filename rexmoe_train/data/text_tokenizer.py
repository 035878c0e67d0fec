"""Tokenizers for real data: the byte tokenizer or any Hugging Face ``tokenizer.json``.

Used by ``rexmoe-preprocess`` (to turn text into token ids) and by training from indexed data (to
know the vocabulary size and the end-of-document id, and to check them against what preprocessing
recorded). Like the rest of ``rexmoe_train.data`` it never imports megatron; the megatron-core
wrapper lives in :mod:`rexmoe_train.data.indexed`.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Optional, Union

import numpy as np

from .tokenizer import ByteTokenizer

__all__ = ["BYTE", "EOD_CANDIDATES", "HFTokenizer", "TokenizerLoadError", "TextTokenizer",
           "load_tokenizer", "token_dtype", "tokenizer_metadata"]

BYTE = "byte"

# Tried in order when no end-of-document token is named: the usual names of "end of text".
EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<eod>",
                  "<|end|>")


class TokenizerLoadError(ValueError):
    """The tokenizer cannot be used; the message is one line."""


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer read from a ``tokenizer.json`` file.

    Documents are encoded without the tokenizer's special-token template (no BOS/EOS added by a
    post-processor): preprocessing appends ``eod`` itself, once per document.
    """

    def __init__(self, path: str, eod_token: Optional[str] = None) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as err:  # a base dependency; only a broken install gets here
            raise TokenizerLoadError(f"the 'tokenizers' library is not installed: {err}") from None
        self.path = os.path.abspath(path)
        if not os.path.isfile(self.path):
            raise TokenizerLoadError(f"tokenizer file not found: {path}")
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
            self._tok = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as err:  # noqa: BLE001 - json, utf-8 and Rust errors alike
            reason = " ".join(str(err).split())[:200] or type(err).__name__
            raise TokenizerLoadError(f"cannot read tokenizer file {path}: {reason}") from None
        self.sha256 = hashlib.sha256(raw).hexdigest()
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True),
                               (max(vocab.values()) + 1) if vocab else 0)
        if eod_token is None:
            eod_token = next((t for t in EOD_CANDIDATES if self._tok.token_to_id(t) is not None), None)
            if eod_token is None:
                raise TokenizerLoadError(
                    f"tokenizer file {path} has none of the end-of-document tokens "
                    f"{', '.join(EOD_CANDIDATES)}; name one with --eod-token")
        eod = self._tok.token_to_id(eod_token)
        if eod is None:
            raise TokenizerLoadError(f"tokenizer file {path} has no token {eod_token!r} (--eod-token)")
        self.eod_token = eod_token
        self._eod = int(eod)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def kind(self) -> str:
        return "huggingface"

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Any) -> str:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1).tolist()
        return self._tok.decode(arr, skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, eod={self.eod})"


TextTokenizer = Union[ByteTokenizer, HFTokenizer]


def load_tokenizer(spec: str, eod_token: Optional[str] = None) -> TextTokenizer:
    """``"byte"`` -> :class:`ByteTokenizer`; anything else is a path to a ``tokenizer.json``."""
    if spec == BYTE:
        if eod_token is not None:
            raise TokenizerLoadError("--eod-token applies to a tokenizer.json only (the byte "
                                     "tokenizer's end-of-document id is 256)")
        return ByteTokenizer()
    return HFTokenizer(spec, eod_token)


def encode_texts(tokenizer: TextTokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text (no ``eod``)."""
    if isinstance(tokenizer, HFTokenizer):
        return tokenizer.encode_batch(texts)
    return [tokenizer.encode(t) for t in texts]


def tokenizer_metadata(tokenizer: TextTokenizer) -> dict[str, Any]:
    """What a dataset's ``.json`` sidecar records about its tokenizer (and training checks)."""
    if isinstance(tokenizer, HFTokenizer):
        return {"tokenizer": tokenizer.kind, "tokenizer_name": tokenizer.name,
                "tokenizer_path": tokenizer.path, "tokenizer_sha256": tokenizer.sha256,
                "vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod,
                "eod_token": tokenizer.eod_token}
    return {"tokenizer": BYTE, "tokenizer_name": tokenizer.name, "tokenizer_path": None,
            "tokenizer_sha256": None, "vocab_size": tokenizer.vocab_size, "eod": tokenizer.eod,
            "eod_token": None}


def token_dtype(vocab_size: int) -> type:
    """The .bin token dtype for a vocabulary (megatron's rule: uint16 below 65500 ids)."""
    return np.uint16 if vocab_size < 65500 else np.int32
