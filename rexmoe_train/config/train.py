"""The ``train:`` and ``data:`` sections: the optimisation recipe and the tokens it reads."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rexmoe_train.config.fields import (
    FP8_FORMATS,
    FP8_RECIPES,
    INT64_MAX,
    LR_DECAY_STYLES,
    _at_least,
    _fail,
    _finite,
    _one_of,
    _positive,
)


@dataclass
class TrainConfig:
    seed: int = 42
    train_iters: int = 250
    global_batch_size: int = 8
    micro_batch_size: int = 4
    seq_length: int = 256
    lr: float = 3e-3
    min_lr: float = 3e-4
    lr_warmup_iters: Optional[int] = None  # None: min(20, train_iters // 10), resolved_lr_warmup_iters()
    lr_decay_style: str = "cosine"
    lr_decay_iters: Optional[int] = None  # None: train_iters
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    bf16: Optional[bool] = None  # None: the platform default (bf16 on GPU, fp32 on CPU)
    fp8: Optional[str] = None  # None | hybrid | e4m3: TE fp8 GEMMs (GPU + transformer_engine only)
    fp8_recipe: str = "delayed"  # delayed | tensorwise | blockwise (megatron's Fp8Recipe names)
    fp8_amax_history_len: int = 1024  # delayed scaling: amax window (megatron's default is 1)
    log_interval: int = 1
    eval_interval: int = 50
    eval_iters: int = 4  # validation micro-batches per evaluation (per data-parallel rank)

    def resolved_lr_warmup_iters(self, default: bool = False) -> int:
        """``lr_warmup_iters``, or (when None, or asked for the ``default``) a tenth of the run capped
        at 20 steps. WHY derived: a fixed 20 rejected every smoke run of <= 20 steps; from 200 steps
        on the default is the 20 it always was."""
        if self.lr_warmup_iters is not None and not default:
            return self.lr_warmup_iters
        return min(20, self.train_iters // 10)

    def validate(self, path: str = "train") -> None:
        for name in ("train_iters", "global_batch_size", "micro_batch_size", "seq_length",
                     "log_interval", "eval_interval", "eval_iters"):
            _at_least(f"{path}.{name}", getattr(self, name), 1)
        _at_least(f"{path}.seed", self.seed, 0)
        if self.train_iters * self.global_batch_size > INT64_MAX:  # megatron's sample counts are int64
            _fail(f"{path}.train_iters", self.train_iters,
                  f"must be at most {INT64_MAX // self.global_batch_size} (train_iters x global_batch_size "
                  "samples must fit in a 64-bit integer)")
        _positive(f"{path}.lr", self.lr)
        _finite(f"{path}.min_lr", self.min_lr)
        if not 0 <= self.min_lr <= self.lr:
            _fail(f"{path}.min_lr", self.min_lr, f"must be in [0, {path}.lr] = [0, {self.lr}]")
        if self.lr_warmup_iters is not None and not 0 <= self.lr_warmup_iters < self.train_iters:
            _fail(f"{path}.lr_warmup_iters", self.lr_warmup_iters,
                  f"must be in [0, {path}.train_iters) = [0, {self.train_iters}): pass "
                  f"{path}.lr_warmup_iters={max(0, self.train_iters - 1)} or less, or null for the default "
                  f"min(20, {path}.train_iters // 10) = {self.resolved_lr_warmup_iters(default=True)}")
        _one_of(f"{path}.lr_decay_style", self.lr_decay_style, LR_DECAY_STYLES)
        warmup = self.resolved_lr_warmup_iters()
        if self.lr_decay_iters is not None and self.lr_decay_iters <= warmup:
            _fail(f"{path}.lr_decay_iters", self.lr_decay_iters,
                  f"must be > the warm-up, {path}.lr_warmup_iters ({warmup})")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                _fail(f"{path}.{name}", getattr(self, name), "must be in [0, 1)")
        _positive(f"{path}.adam_eps", self.adam_eps)
        _at_least(f"{path}.clip_grad", self.clip_grad, 0.0)
        _one_of(f"{path}.fp8", self.fp8, FP8_FORMATS)
        _one_of(f"{path}.fp8_recipe", self.fp8_recipe, FP8_RECIPES)
        _at_least(f"{path}.fp8_amax_history_len", self.fp8_amax_history_len, 1)
        _at_least(f"{path}.weight_decay", self.weight_decay, 0.0)
        if self.global_batch_size % self.micro_batch_size:
            _fail(f"{path}.global_batch_size", self.global_batch_size,
                  f"must be a multiple of {path}.micro_batch_size ({self.micro_batch_size})")


@dataclass
class DataConfig:
    source: str = "embedded"  # embedded: the Python standard library's sources, byte tokenizer;
    #                           indexed: megatron .bin/.idx datasets made by rexmoe-preprocess
    valid_fraction: float = 0.02  # embedded only
    max_bytes: Optional[int] = None  # cap on the embedded corpus (whole documents)
    # indexed only (rexmoe_train/data/indexed.py):
    blend: Optional[list] = None  # [w1, prefix1, w2, prefix2, ...], or [prefix, ...] (weights by size)
    split: str = "98,2,0"  # train,valid,test shares of each dataset's documents
    tokenizer: str = "byte"  # byte | the tokenizer.json or Hugging Face tokenizer folder the data was preprocessed with
    cache_dir: Optional[str] = None  # megatron's sample-index cache; None: <run.dir>/data_cache

    def blend_spec(self, path: str = "data") -> tuple[list[str], Optional[list[float]]]:
        """``data.blend`` as megatron's (prefixes, weights or None)."""
        blend = [self.blend] if isinstance(self.blend, str) else self.blend
        allowed = "must be a non-empty list [weight1, prefix1, weight2, prefix2, ...] or [prefix, ...]"
        if not isinstance(blend, (list, tuple)) or not blend:
            _fail(f"{path}.blend", self.blend, allowed)
        if all(isinstance(item, str) for item in blend):
            prefixes, weights = list(blend), None
        else:
            if len(blend) % 2:
                _fail(f"{path}.blend", self.blend, allowed + " (odd length)")
            weights, prefixes = list(blend[0::2]), list(blend[1::2])
            if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0 for w in weights):
                _fail(f"{path}.blend", self.blend, allowed + ": weights must be numbers > 0")
            weights = [float(w) for w in weights]
        if not all(isinstance(p, str) and p.strip() for p in prefixes):
            _fail(f"{path}.blend", self.blend, allowed + ": prefixes must be non-empty paths")
        return prefixes, weights

    def split_shares(self, path: str = "data") -> list[float]:
        """``data.split`` as [train, valid, test] shares (unnormalised)."""
        parts = [p.strip() for p in str(self.split).split(",")]
        try:
            shares = [float(p) for p in parts]
        except ValueError:
            shares = []
        if not 1 <= len(shares) <= 3 or any(not 0 <= s < float("inf") for s in shares):
            _fail(f"{path}.split", self.split, 'must be up to 3 comma-separated shares >= 0, e.g. "98,2,0"')
        shares += [0.0] * (3 - len(shares))
        if shares[0] <= 0 or shares[1] <= 0:
            _fail(f"{path}.split", self.split,
                  "the train and valid shares must be > 0 (validation runs from step 0)")
        return shares

    def validate(self, path: str = "data") -> None:
        _one_of(f"{path}.source", self.source, ("embedded", "indexed"))
        if not 0 < self.valid_fraction < 1:
            _fail(f"{path}.valid_fraction", self.valid_fraction, "must be in (0, 1)")
        if self.max_bytes is not None:
            _at_least(f"{path}.max_bytes", self.max_bytes, 1)
        if not self.tokenizer or not self.tokenizer.strip():
            _fail(f"{path}.tokenizer", self.tokenizer,
                  "must be byte or a path to a tokenizer.json or a Hugging Face tokenizer folder")
        if self.cache_dir is not None and not self.cache_dir.strip():
            _fail(f"{path}.cache_dir", self.cache_dir, "must be null or a non-empty path")
        if self.source == "embedded":
            if self.blend is not None:
                _fail(f"{path}.blend", self.blend, f"is read only with {path}.source=indexed")
            if self.tokenizer != "byte":
                _fail(f"{path}.tokenizer", self.tokenizer,
                      f"must be byte with {path}.source=embedded (the embedded corpus is byte-tokenized)")
        else:
            if self.blend is None:
                _fail(f"{path}.blend", None, f"must list the dataset prefixes with {path}.source=indexed "
                                             "(make them with rexmoe-preprocess)")
            self.blend_spec(path)
            self.split_shares(path)
