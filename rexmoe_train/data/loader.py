"""Token windows, deterministic global batches, and the embedded datasets.

WHY a pure function of (seed, step): the samples a step trains on are derived
from the global sample index ``step * global_batch_size + k`` alone, with no
iterator state. A run resumed at step ``s`` therefore continues at the exact
sample it would have seen, and changing the data-parallel size only changes
which rank gets which sample, never which samples a step uses.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .corpus import CorpusDocument, corpus_fingerprint, gather_stdlib_corpus, split_documents
from .tokenizer import ByteTokenizer

__all__ = [
    "TokenWindowDataset",
    "GlobalBatchSampler",
    "micro_batches",
    "valid_batches",
    "build_embedded_datasets",
]


class TokenWindowDataset:
    """All documents concatenated (each followed by ``eod``) and cut into windows.

    Window ``i`` is ``tokens[i*seq : i*seq + seq + 1]``: consecutive windows share
    one token, because the last input token's label is the next window's first
    token. That is the Megatron GPT layout; it wastes nothing and packs documents
    across window boundaries (``eod`` tells the model where one ends).
    """

    def __init__(self, docs: Sequence[CorpusDocument], tokenizer: ByteTokenizer, seq_length: int) -> None:
        if seq_length < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        self.seq_length = seq_length
        self.num_docs = len(docs)
        # One preallocated array instead of a list of pieces: the full corpus is
        # ~12M tokens, and np.concatenate would briefly double the memory.
        pieces = [tokenizer.encode_bytes(d.text) for d in docs]
        tokens = np.empty(sum(len(p) + 1 for p in pieces), dtype=np.uint16)
        pos = 0
        for p in pieces:
            tokens[pos : pos + len(p)] = p
            tokens[pos + len(p)] = tokenizer.eod
            pos += len(p) + 1
        tokens.setflags(write=False)  # shared by every sample; guard against in-place edits
        self.tokens: np.ndarray = tokens
        self._offsets = np.arange(seq_length + 1, dtype=np.int64)
        if len(self) == 0:
            raise ValueError(
                f"dataset has {self.num_tokens} tokens, fewer than one window of seq_length + 1 = "
                f"{seq_length + 1}; use more data (max_bytes) or a shorter seq_length"
            )

    @property
    def num_tokens(self) -> int:
        """Tokens in the concatenated array, ``eod`` markers included."""
        return int(self.tokens.shape[0])

    def __len__(self) -> int:
        return max(self.num_tokens - 1, 0) // self.seq_length

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """Collated windows ``indices`` as tensors of shape [len(indices), seq_length].

        Gathers all rows with one fancy-indexing op instead of stacking
        per-sample tensors.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"window index out of range [0, {n}): {idx.tolist()}")
        rows = self.tokens[idx[:, None] * self.seq_length + self._offsets]
        rows_t = torch.from_numpy(rows.astype(np.int64))
        bsz = idx.size
        return {
            "tokens": rows_t[:, :-1].contiguous(),
            "labels": rows_t[:, 1:].contiguous(),
            "loss_mask": torch.ones(bsz, self.seq_length, dtype=torch.float32),
            "position_ids": torch.arange(self.seq_length, dtype=torch.long).expand(bsz, -1).contiguous(),
        }

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"window {i} out of range for {n} windows")
        return {k: v[0] for k, v in self.get_batch([i % n]).items()}


@functools.lru_cache(maxsize=8)
def _epoch_permutation(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    """Sample order of one epoch. Cached because consecutive steps reuse it."""
    perm = np.random.default_rng([seed, epoch]).permutation(num_samples)
    perm.setflags(write=False)  # cached object: must not be mutated by callers
    return perm


class GlobalBatchSampler:
    """Maps (step, dp_rank) to dataset indices, Megatron style.

    Global sample ``j = step * global_batch_size + k`` is
    ``permutation(seed, epoch=j // N)[j % N]``. Within a global batch, rank ``r``
    takes positions ``(m * dp_size + r) * micro_batch_size + b`` for micro-batch
    ``m`` -- so ranks interleave per micro-batch and the union over ranks is the
    whole global batch, whatever ``dp_size`` is.

    ``shuffle=False`` reads global sample ``j`` as index ``j % N``: for datasets whose order is
    already a shuffled sample order (megatron's indexed datasets, ``presampled = True``).
    """

    def __init__(
        self,
        num_samples: int,
        *,
        seed: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_size: int,
        shuffle: bool = True,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if global_batch_size < 1 or micro_batch_size < 1 or dp_size < 1:
            raise ValueError(
                f"global_batch_size ({global_batch_size}), micro_batch_size ({micro_batch_size}) "
                f"and dp_size ({dp_size}) must all be >= 1"
            )
        if global_batch_size % (micro_batch_size * dp_size) != 0:
            raise ValueError(
                f"global_batch_size ({global_batch_size}) must be divisible by "
                f"micro_batch_size * dp_size ({micro_batch_size} * {dp_size})"
            )
        self.num_samples = num_samples
        self.seed = seed
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_size = dp_size
        self.shuffle = shuffle

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches each rank runs per step (gradient-accumulation steps)."""
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    def global_batch(self, step: int) -> np.ndarray:
        """Dataset indices of the whole global batch of ``step``, in batch order."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        j = step * self.global_batch_size + np.arange(self.global_batch_size, dtype=np.int64)
        if not self.shuffle:
            return j % self.num_samples
        epochs, positions = np.divmod(j, self.num_samples)
        out = np.empty_like(j)
        # A global batch spans at most a few epochs (usually one).
        for epoch in np.unique(epochs).tolist():
            sel = epochs == epoch
            out[sel] = _epoch_permutation(self.seed, int(epoch), self.num_samples)[positions[sel]]
        return out

    def rank_micro_batches(self, step: int, dp_rank: int) -> list[np.ndarray]:
        """Dataset indices of each micro-batch that ``dp_rank`` runs at ``step``."""
        if not 0 <= dp_rank < self.dp_size:
            raise ValueError(f"dp_rank ({dp_rank}) must be in [0, dp_size={self.dp_size})")
        batch = self.global_batch(step)
        mbs = self.micro_batch_size
        starts = [(m * self.dp_size + dp_rank) * mbs for m in range(self.num_micro_batches)]
        return [batch[s : s + mbs] for s in starts]


def micro_batches(
    dataset: TokenWindowDataset,
    *,
    seed: int,
    global_batch_size: int,
    micro_batch_size: int,
    dp_rank: int,
    dp_size: int,
    step: int,
) -> list[dict[str, torch.Tensor]]:
    """Collated micro-batches (tensors [micro_batch_size, seq]) for one rank and step.

    A pure function of its arguments: see :class:`GlobalBatchSampler`.
    """
    sampler = GlobalBatchSampler(
        len(dataset),
        seed=seed,
        global_batch_size=global_batch_size,
        micro_batch_size=micro_batch_size,
        dp_size=dp_size,
        shuffle=not getattr(dataset, "presampled", False),
    )
    return [dataset.get_batch(idx) for idx in sampler.rank_micro_batches(step, dp_rank)]


def valid_batches(
    dataset: TokenWindowDataset,
    *,
    micro_batch_size: int,
    num_batches: int,
    dp_rank: int,
    dp_size: int,
) -> list[dict[str, torch.Tensor]]:
    """Fixed validation micro-batches for one rank: the first windows, unshuffled.

    WHY fixed: evaluating the same windows every time makes validation losses
    comparable across evals and runs. Rank ``r`` gets windows
    ``(m * dp_size + r) * micro_batch_size + b`` for ``m < num_batches`` (same
    interleaving as training), so all ranks together cover the first
    ``num_batches * micro_batch_size * dp_size`` windows. If the validation set
    has fewer windows, indices wrap around (modulo ``len(dataset)``) rather than
    failing -- small corpora then repeat windows.
    """
    if micro_batch_size < 1 or num_batches < 0 or dp_size < 1:
        raise ValueError(
            f"micro_batch_size ({micro_batch_size}) and dp_size ({dp_size}) must be >= 1, "
            f"num_batches ({num_batches}) >= 0"
        )
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank ({dp_rank}) must be in [0, dp_size={dp_size})")
    n = len(dataset)
    out = []
    for m in range(num_batches):
        start = (m * dp_size + dp_rank) * micro_batch_size
        out.append(dataset.get_batch(np.arange(start, start + micro_batch_size) % n))
    return out


# The seed of the train/validation split (embedded: which documents; indexed: the order of the
# validation samples, whose first windows are scored). Fixed, so that train.seed never changes the
# validation text; 42, the default train.seed, keeps the split every earlier default run used.
VALID_SPLIT_SEED = 42


def build_embedded_datasets(
    seq_length: int,
    seed: int,
    valid_fraction: float = 0.02,
    max_bytes: int | None = None,
) -> tuple[TokenWindowDataset, TokenWindowDataset, dict[str, Any]]:
    """Train/validation datasets over the stdlib corpus, plus JSON-able metadata.

    ``seed`` selects the document split (the trainer passes VALID_SPLIT_SEED; the batch order has
    its own seed in :func:`micro_batches`). ``info`` identifies exactly which data a run saw;
    the trainer is expected to write it into the run directory.
    """
    tokenizer = ByteTokenizer()
    docs = gather_stdlib_corpus(max_bytes=max_bytes)
    train_docs, valid_docs = split_documents(docs, valid_fraction=valid_fraction, seed=seed)
    train = TokenWindowDataset(train_docs, tokenizer, seq_length)
    valid = TokenWindowDataset(valid_docs, tokenizer, seq_length)
    info: dict[str, Any] = {
        "source": "python-stdlib",
        "python_version": sys.version.split()[0],
        "corpus_fingerprint": corpus_fingerprint(docs),
        "corpus_bytes": sum(len(d.text) for d in docs),
        "max_bytes": max_bytes,
        "split_seed": seed,
        "valid_fraction": valid_fraction,
        "seq_length": seq_length,
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
        "train_documents": train.num_docs,
        "valid_documents": valid.num_docs,
        "train_tokens": train.num_tokens,
        "valid_tokens": valid.num_tokens,
        "train_windows": len(train),
        "valid_windows": len(valid),
    }
    return train, valid, info
