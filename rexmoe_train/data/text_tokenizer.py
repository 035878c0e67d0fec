"""Tokenizers for real data: the byte tokenizer, a Hugging Face ``tokenizer.json``, or a Hugging Face
tokenizer folder (what ``AutoTokenizer.from_pretrained`` reads, e.g. a Llama-2 folder).

A folder with a ``tokenizer.json`` is read with ``tokenizers`` alone, its end-of-document token taken
from ``tokenizer_config.json`` / ``special_tokens_map.json`` (``eos_token``). A folder with only a
sentencepiece ``tokenizer.model`` is converted by transformers' ``AutoTokenizer`` (needs transformers
and sentencepiece, imported only then) into the same fast tokenizer.

Used by ``rexmoe-preprocess`` (to turn text into token ids) and by training from indexed data (to
know the vocabulary size and the end-of-document id, and to check them against what preprocessing
recorded). Like the rest of ``rexmoe_train.data`` it never imports megatron; the megatron-core
wrapper lives in :mod:`rexmoe_train.data.indexed`.
"""

from __future__ import annotations

import hashlib
import json
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


def _reason(err: BaseException) -> str:
    return " ".join(str(err).split())[:200] or type(err).__name__


def _read_tokenizer_json(path: str, label: str) -> tuple[Any, bytes]:
    from tokenizers import Tokenizer

    try:
        with open(path, "rb") as f:
            raw = f.read()
        return Tokenizer.from_str(raw.decode("utf-8")), raw
    except Exception as err:  # noqa: BLE001 - json, utf-8 and Rust errors alike
        raise TokenizerLoadError(f"cannot read {label} {path}: {_reason(err)}") from None


def _folder_eos_token(folder: str) -> Optional[str]:
    """``eos_token`` of a Hugging Face folder's tokenizer_config.json or special_tokens_map.json."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, ValueError) as err:
            raise TokenizerLoadError(f"cannot read {path}: {_reason(err)}") from None
        eos = config.get("eos_token") if isinstance(config, dict) else None
        if isinstance(eos, dict):  # saved as an AddedToken: {"content": "</s>", ...}
            eos = eos.get("content")
        if isinstance(eos, str) and eos:
            return eos
    return None


def _read_sentencepiece_folder(folder: str, label: str) -> Any:
    """The fast (``tokenizers``) form of a folder holding only a sentencepiece ``tokenizer.model``."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise TokenizerLoadError(
            f"tokenizer folder {label} has a sentencepiece tokenizer.model but no tokenizer.json: reading it "
            "needs transformers and sentencepiece (pip install transformers sentencepiece)") from None
    try:
        hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - transformers raises many kinds (missing sentencepiece too)
        raise TokenizerLoadError(f"cannot read tokenizer folder {label} with transformers' AutoTokenizer: "
                                 f"{_reason(err)}") from None
    if not getattr(hf, "is_fast", False):
        raise TokenizerLoadError(f"tokenizer folder {label}: transformers gave a slow tokenizer "
                                 f"({type(hf).__name__}); save the folder with a tokenizer.json")
    return hf.backend_tokenizer


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer read from a ``tokenizer.json`` file or a tokenizer folder.

    Documents are encoded without the tokenizer's special-token template (no BOS/EOS added by a
    post-processor): preprocessing appends ``eod`` itself, once per document. ``sha256`` is that of
    the ``tokenizer.json`` (a folder and its own tokenizer.json are the same tokenizer), or of the
    sentencepiece ``tokenizer.model`` of a folder without one.
    """

    def __init__(self, path: str, eod_token: Optional[str] = None) -> None:
        try:
            import tokenizers  # noqa: F401
        except ImportError as err:  # a base dependency; only a broken install gets here
            raise TokenizerLoadError(f"the 'tokenizers' library is not installed: {err}") from None
        self.path = os.path.abspath(path)
        folder_eos = None
        if os.path.isdir(self.path):
            tok_json = os.path.join(self.path, "tokenizer.json")
            spm_model = os.path.join(self.path, "tokenizer.model")
            if os.path.isfile(tok_json):
                self._tok, raw = _read_tokenizer_json(tok_json, "tokenizer file")
                self._json_path = tok_json
            elif os.path.isfile(spm_model):
                self._tok = _read_sentencepiece_folder(self.path, path)
                self._json_path = None
                with open(spm_model, "rb") as f:
                    raw = f.read()
            else:
                raise TokenizerLoadError(f"tokenizer folder {path} has neither tokenizer.json nor a "
                                         "sentencepiece tokenizer.model")
            folder_eos = _folder_eos_token(self.path)
            what = "tokenizer folder"
        elif os.path.isfile(self.path):
            self._tok, raw = _read_tokenizer_json(self.path, "tokenizer file")
            self._json_path = self.path
            what = "tokenizer file"
        else:
            raise TokenizerLoadError(f"tokenizer file not found: {path} (byte, a tokenizer.json or a Hugging "
                                     "Face tokenizer folder)")
        self.sha256 = hashlib.sha256(raw).hexdigest()
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True),
                               (max(vocab.values()) + 1) if vocab else 0)
        if eod_token is None and folder_eos is not None and self._tok.token_to_id(folder_eos) is not None:
            eod_token = folder_eos  # the folder's own eos_token
        if eod_token is None:
            eod_token = next((t for t in EOD_CANDIDATES if self._tok.token_to_id(t) is not None), None)
            if eod_token is None:
                raise TokenizerLoadError(
                    f"{what} {path} has none of the end-of-document tokens "
                    f"{', '.join(EOD_CANDIDATES)}; name one with --eod-token")
        eod = self._tok.token_to_id(eod_token)
        if eod is None:
            raise TokenizerLoadError(f"{what} {path} has no token {eod_token!r} (--eod-token)")
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

    def json_text(self) -> str:
        """The tokenizer.json text: the file as written, or the converted sentencepiece model's."""
        if self._json_path is not None:
            with open(self._json_path, encoding="utf-8") as f:
                return f.read()
        return self._tok.to_str()

    def decode(self, ids: Any) -> str:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1).tolist()
        return self._tok.decode(arr, skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, eod={self.eod})"


TextTokenizer = Union[ByteTokenizer, HFTokenizer]


def load_tokenizer(spec: str, eod_token: Optional[str] = None) -> TextTokenizer:
    """``"byte"`` -> :class:`ByteTokenizer`; anything else is a path to a ``tokenizer.json`` or to a
    Hugging Face tokenizer folder."""
    if spec == BYTE:
        if eod_token is not None:
            raise TokenizerLoadError("--eod-token applies to a Hugging Face tokenizer only (the byte "
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
