"""Embedded default training data: the interpreter's stdlib sources, byte-tokenized.

Self-contained on purpose: imports nothing else from ``rexmoe_train`` and never
megatron, so it can be tested (and used to inspect data) on any CPU machine.
"""

from .corpus import (
    EXCLUDED_DIRS,
    CorpusDocument,
    corpus_fingerprint,
    gather_stdlib_corpus,
    split_documents,
)
from .loader import (
    GlobalBatchSampler,
    TokenWindowDataset,
    build_embedded_datasets,
    micro_batches,
    valid_batches,
)
from .tokenizer import ByteTokenizer

__all__ = [
    "ByteTokenizer",
    "CorpusDocument",
    "EXCLUDED_DIRS",
    "gather_stdlib_corpus",
    "corpus_fingerprint",
    "split_documents",
    "TokenWindowDataset",
    "GlobalBatchSampler",
    "micro_batches",
    "valid_batches",
    "build_embedded_datasets",
]
