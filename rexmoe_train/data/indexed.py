"""Training data from megatron-core indexed datasets (``rexmoe-preprocess`` output).

``data.source=indexed`` reads ``data.blend`` (prefixes of .bin/.idx/.json triples, optionally
weighted) through megatron-core's ``GPTDataset`` and ``BlendedMegatronDatasetBuilder``: documents
are split into train/valid/test by ``data.split``, packed into ``seq_length + 1`` token samples
(``eod`` between documents), shuffled with ``train.seed``, and blended by weight. The built index
arrays are cached (``data.cache_dir``, default ``<run.dir>/data_cache``) under a key that changes
whenever a dataset is rewritten.

WHY sequential reading: megatron's index is already a shuffled, weight-interleaved sample order,
so global sample ``j = step * global_batch_size + k`` is simply sample ``j`` (see
:class:`IndexedSamples`, ``presampled``). The data for step ``t`` is then a pure function of the
config and ``t``: a resumed run continues at the exact sample, as with the embedded corpus.
(As in Megatron-LM, changing ``train_iters`` or ``global_batch_size`` changes the index.)

Everything that can be checked before training is: missing files, a sidecar whose tokenizer
(kind, vocab size, eod, tokenizer.json hash) differs from ``data.tokenizer``, a damaged ``.idx``,
a truncated ``.bin``, a split that leaves a dataset without train or validation documents. Each
is one :class:`ConfigError` line.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from rexmoe_train.compat import require_installed

require_installed()  # megatron-facing: entry points install the CPU layer first

from megatron.core.datasets.blended_megatron_dataset_builder import (  # noqa: E402
    BlendedMegatronDatasetBuilder,
)
from megatron.core.datasets.blended_megatron_dataset_config import (  # noqa: E402
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig  # noqa: E402
from megatron.core.datasets.indexed_dataset import IndexedDataset  # noqa: E402
from megatron.core.tokenizers import MegatronTokenizerBase  # noqa: E402

from rexmoe_train.config.schema import ConfigError, DataConfig  # noqa: E402

from .loader import VALID_SPLIT_SEED  # noqa: E402
from .text_tokenizer import BYTE, HFTokenizer, TextTokenizer, TokenizerLoadError, load_tokenizer, tokenizer_metadata  # noqa: E402  # noqa: E402

__all__ = ["RexTokenizer", "IndexedSamples", "build_indexed_datasets", "check_prefix"]

_SPLIT_NAMES = ("train", "valid", "test")


class RexTokenizer(MegatronTokenizerBase):
    """megatron-core's tokenizer interface over the byte or a Hugging Face tokenizer.

    The datasets only need ``eod`` and ``vocab_size``; ``unique_identifiers`` goes into megatron's
    cache keys, so it names the tokenizer by content (kind, sha256 of the tokenizer.json).
    """

    def __init__(self, tokenizer: TextTokenizer) -> None:
        meta = tokenizer_metadata(tokenizer)
        super().__init__(meta["tokenizer_path"] or BYTE, {})
        self.text_tokenizer = tokenizer
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("tokenizer", meta["tokenizer"]),
             ("tokenizer_sha256", meta["tokenizer_sha256"]), ("vocab_size", meta["vocab_size"]),
             ("eod", meta["eod"])])

    def tokenize(self, text: str) -> np.ndarray:
        return np.asarray(self.text_tokenizer.encode(text), dtype=np.int64)

    def detokenize(self, ids: Any) -> str:
        return self.text_tokenizer.decode(ids)

    @property
    def vocab(self) -> dict:
        if isinstance(self.text_tokenizer, HFTokenizer):
            return self.text_tokenizer._tok.get_vocab(with_added_tokens=True)
        return {bytes([i]).decode("latin-1"): i for i in range(256)}

    @property
    def vocab_size(self) -> int:
        return self.text_tokenizer.vocab_size

    @property
    def eod(self) -> int:
        return self.text_tokenizer.eod

    def apply_chat_template(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError("pretraining tokenizer: no chat template")


class IndexedSamples:
    """A megatron GPT/blended dataset seen through the interface of ``TokenWindowDataset``.

    ``__getitem__`` returns ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` ([seq_length]
    each; no attention mask: the model uses causal attention), ``get_batch`` stacks them.
    ``presampled`` tells :func:`rexmoe_train.data.micro_batches` to read samples in order.
    """

    presampled = True
    _KEYS = ("tokens", "labels", "loss_mask", "position_ids")

    def __init__(self, dataset: Any, seq_length: int) -> None:
        self.dataset = dataset
        self.seq_length = seq_length
        self._len = len(dataset)
        if self._len == 0:
            raise ValueError("empty indexed dataset")

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = self._len
        if not -n <= i < n:
            raise IndexError(f"sample {i} out of range for {n} samples")
        item = self.dataset[int(i) % n]
        return {k: item[k] for k in self._KEYS}

    def dataset_ids(self, indices: Sequence[int]) -> np.ndarray:
        """Which blend entry each sample comes from (all 0 for a single dataset)."""
        idx = np.asarray(indices, dtype=np.int64) % self._len
        ids = getattr(self.dataset, "dataset_index", None)
        return np.zeros(idx.shape, dtype=np.int64) if ids is None else np.asarray(ids)[idx].astype(np.int64)

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        items = [self[int(i)] for i in np.asarray(indices, dtype=np.int64).reshape(-1)]
        return {k: torch.stack([it[k] for it in items]).contiguous() for k in self._KEYS}


# --------------------------------------------------------------------------------------------------
# Checks before anything is built
# --------------------------------------------------------------------------------------------------
def _blend_error(prefix: str, problem: str) -> ConfigError:
    return ConfigError(f"config error: data.blend: {prefix}: {problem}")


def _read_sidecar(prefix: str) -> dict:
    path = f"{prefix}.json"
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise _blend_error(prefix, f"cannot read {path} ({' '.join(str(err).split())[:120]})") from None
    if not isinstance(meta, dict) or not all(k in meta for k in ("tokenizer", "vocab_size", "eod")):
        raise _blend_error(prefix, f"{path} lacks tokenizer/vocab_size/eod (write it with rexmoe-preprocess)")
    return meta


def check_prefix(prefix: str, tokenizer: TextTokenizer) -> dict[str, Any]:
    """Validate one dataset (files, sidecar vs tokenizer, index, .bin size); returns its summary."""
    for ext in ("bin", "idx", "json"):
        if not os.path.isfile(f"{prefix}.{ext}"):
            raise _blend_error(prefix, f"{prefix}.{ext} not found (make it with rexmoe-preprocess)")
    meta = _read_sidecar(prefix)
    want = tokenizer_metadata(tokenizer)
    for key, label in (("tokenizer", "tokenizer kind"), ("vocab_size", "vocab size"), ("eod", "eod id")):
        if meta[key] != want[key]:
            raise _blend_error(prefix, f"made with {label} {meta[key]!r} ({prefix}.json) but "
                                       f"data.tokenizer={tokenizer_name(tokenizer)!r} has {want[key]!r}")
    if meta.get("tokenizer_sha256") and want["tokenizer_sha256"] and \
            meta["tokenizer_sha256"] != want["tokenizer_sha256"]:
        raise _blend_error(prefix, f"made with a different tokenizer.json ({meta.get('tokenizer_path')}) "
                                   f"than data.tokenizer={tokenizer_name(tokenizer)!r} (sha256 differs)")
    try:
        index = IndexedDataset(prefix, mmap=True)
    except Exception as err:  # noqa: BLE001 - megatron asserts on a bad header/version
        reason = " ".join(str(err).split())[:120] or type(err).__name__
        raise _blend_error(prefix, f"{prefix}.idx is damaged ({reason})") from None
    # copies: the index's arrays view an mmap that closes with it
    lengths = np.array(index.index.sequence_lengths, dtype=np.int64)
    dtype = np.dtype(index.index.dtype)
    last_pointer = int(index.index.sequence_pointers[-1]) if len(lengths) else 0
    del index
    if len(lengths) == 0:
        raise _blend_error(prefix, "holds no documents")
    expected = last_pointer + int(lengths[-1]) * dtype.itemsize
    actual = os.path.getsize(f"{prefix}.bin")
    if actual != expected:
        what = "truncated" if actual < expected else "longer than its index"
        raise _blend_error(prefix, f"{prefix}.bin is {what}: {actual} bytes, {prefix}.idx expects {expected}")
    if np.iinfo(dtype).max < tokenizer.vocab_size - 1:
        raise _blend_error(prefix, f"token dtype {dtype.name} cannot hold vocab size {tokenizer.vocab_size}")
    documents = int(len(lengths))
    return {"prefix": prefix, "documents": documents, "tokens": int(lengths.sum()), "lengths": lengths,
            "id": meta.get("id") or f"{os.path.getsize(prefix + '.idx')}-{os.stat(prefix + '.bin').st_mtime_ns}"}


def _check_split(prefix: str, split: str, lengths: np.ndarray, as_configured: str) -> None:
    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    n = len(lengths)
    for i, name in enumerate(_SPLIT_NAMES[:2]):
        bookends = matrix[i]
        beg, end = (0, 0) if bookends is None else (int(round(bookends[0] * n)), int(round(bookends[1] * n)))
        if end <= beg or int(lengths[beg:end].sum()) == 0:
            raise ConfigError(
                f"config error: data.split={as_configured!r}: the {name} split of {prefix} gets no documents "
                f"(it has {n}); use more documents or a larger {name} share")


def tokenizer_name(tokenizer: TextTokenizer) -> str:
    return tokenizer.path if isinstance(tokenizer, HFTokenizer) else BYTE


def _load_tokenizer(cfg: DataConfig, first_prefix: str) -> TextTokenizer:
    eod_token = None
    if cfg.tokenizer != BYTE and os.path.isfile(f"{first_prefix}.json"):
        # the end-of-document token preprocessing used (it may have been named with --eod-token)
        eod_token = _read_sidecar(first_prefix).get("eod_token")
    try:
        return load_tokenizer(cfg.tokenizer, eod_token)
    except TokenizerLoadError as err:
        raise ConfigError(f"config error: data.tokenizer={cfg.tokenizer!r}: {err}") from None


def _cache_key(summaries: list[dict], seq_length: int, seed: int) -> str:
    h = hashlib.sha256()
    for s in summaries:
        h.update(f"{os.path.abspath(s['prefix'])}\0{s['id']}\0".encode())
    h.update(f"{seq_length}\0{seed}".encode())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------
def build_indexed_datasets(
    cfg: DataConfig,
    seq_length: int,
    seed: int,
    *,
    train_samples: int,
    valid_samples: int,
    cache_dir: str,
) -> tuple[IndexedSamples, IndexedSamples, dict[str, Any]]:
    """Train/validation samples from ``cfg.blend`` plus JSON-able metadata (``vocab_size`` etc.).

    ``train_samples`` / ``valid_samples``: at least this many samples are indexed (more epochs of
    the data are drawn when it is smaller). All checks run before megatron builds or writes
    anything; a failure is a one-line :class:`ConfigError`.
    """
    cfg.validate()
    if train_samples < 1 or valid_samples < 1:
        raise ValueError(f"train_samples ({train_samples}) and valid_samples ({valid_samples}) must be >= 1")
    prefixes, weights = cfg.blend_spec()
    prefixes = [os.path.abspath(os.path.expanduser(p)) for p in prefixes]
    tokenizer = _load_tokenizer(cfg, prefixes[0])
    summaries = [check_prefix(p, tokenizer) for p in prefixes]
    split = ",".join(f"{share:.10f}" for share in cfg.split_shares())  # megatron's split syntax
    for s in summaries:
        _check_split(s["prefix"], split, s["lengths"], cfg.split)

    def build(random_seed: int, sizes: list[int]) -> list:
        config = GPTDatasetConfig(
            random_seed=random_seed,
            sequence_length=seq_length,
            blend=(prefixes, weights),
            split=split,
            tokenizer=RexTokenizer(tokenizer),
            path_to_cache=os.path.join(cache_dir, _cache_key(summaries, seq_length, random_seed)),
            mmap_bin_files=True,
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            create_attention_mask=False,
        )
        return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()

    path_to_cache = os.path.join(cache_dir, _cache_key(summaries, seq_length, seed))
    built = build(seed, [train_samples, valid_samples, 0])
    train = IndexedSamples(built[0], seq_length)
    # megatron shuffles every split with one random_seed; validation scores its first windows, so
    # they are drawn with the fixed VALID_SPLIT_SEED: train.seed must not change the validation text
    # (the split of documents itself is by position, seed-free)
    if seed != VALID_SPLIT_SEED:
        built = build(VALID_SPLIT_SEED, [1, valid_samples, 0])
    valid = IndexedSamples(built[1], seq_length)
    total = sum(weights) if weights else None
    info: dict[str, Any] = {
        "source": "indexed",
        "blend": [{"prefix": s["prefix"], "weight": (w / total if total else None),
                   "documents": s["documents"], "tokens": s["tokens"], "id": s["id"]}
                  for s, w in zip(summaries, weights or [None] * len(summaries))],
        "split": cfg.split,
        "split_seed": VALID_SPLIT_SEED,
        "shuffle_seed": seed,
        "seq_length": seq_length,
        "tokenizer": tokenizer_name(tokenizer),
        **{k: v for k, v in tokenizer_metadata(tokenizer).items() if k in ("tokenizer_sha256", "eod")},
        "vocab_size": tokenizer.vocab_size,
        "train_samples": len(train),
        "valid_samples": len(valid),
        "cache_dir": path_to_cache,
    }
    return train, valid, info
