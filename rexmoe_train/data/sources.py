"""`build_datasets`: the trainer's one entry to data, dispatching on ``data.source``.

``embedded`` -> the stdlib corpus (:func:`rexmoe_train.data.build_embedded_datasets`);
``indexed`` -> megatron-core indexed datasets (:mod:`rexmoe_train.data.indexed`, imported only
then: it needs megatron). Both return ``(train, valid, info)`` that
:func:`rexmoe_train.data.micro_batches` and :func:`rexmoe_train.data.valid_batches` accept, with
``info["vocab_size"]`` the tokenizer's vocabulary.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Optional

from rexmoe_train.config.schema import DataConfig

from .loader import VALID_SPLIT_SEED, build_embedded_datasets

__all__ = ["build_datasets"]


def build_datasets(
    cfg: DataConfig,
    seq_length: int,
    seed: int,
    *,
    train_samples: Optional[int] = None,
    valid_samples: Optional[int] = None,
    run_dir: Optional[str] = None,
) -> tuple[Any, Any, dict[str, Any]]:
    """Train/validation datasets and JSON-able metadata for ``cfg`` (a :class:`DataConfig`).

    ``seed`` (train.seed) shuffles the training samples only: which windows validation scores
    depends on the data and its split alone (VALID_SPLIT_SEED), so runs that differ in seed are
    compared on the same text.

    ``train_samples`` (train_iters * global_batch_size) and ``valid_samples`` (what the evaluations
    read) size the indexed datasets; the embedded corpus ignores them. The indexed index cache goes
    to ``cfg.cache_dir``, else ``<run_dir>/data_cache``, else a temporary directory. Bad files are a
    one-line :class:`~rexmoe_train.config.schema.ConfigError` raised before anything is built.
    """
    cfg.validate()
    if cfg.source == "embedded":
        # the document split is fixed (VALID_SPLIT_SEED), not train.seed: the seed orders the training
        # windows only, so runs with different seeds score the same validation text
        return build_embedded_datasets(seq_length, VALID_SPLIT_SEED, cfg.valid_fraction, cfg.max_bytes)
    from .indexed import build_indexed_datasets  # megatron: only for this source

    if train_samples is None or valid_samples is None:
        raise ValueError("data.source=indexed needs train_samples and valid_samples")
    if cfg.cache_dir:
        cache_dir = os.path.expanduser(cfg.cache_dir)
    elif run_dir:
        cache_dir = os.path.join(run_dir, "data_cache")
    else:
        cache_dir = os.path.join(tempfile.gettempdir(), "rexmoe_data_cache")
    return build_indexed_datasets(cfg, seq_length, seed, train_samples=train_samples,
                                  valid_samples=valid_samples, cache_dir=cache_dir)
