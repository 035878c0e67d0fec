"""What a resume may change: the checkpoint's ``config.yaml`` against the config of the run loading it.

Every config field has one policy (docs/reliability.md prints this table):

- ``refuse``: the resumed run would silently be another experiment (the function the model computes,
  the data stream, the step's meaning). One line naming the field, both values and the way out.
- ``apply``: the new value is what runs from the first resumed step (the LR schedule is rebuilt from
  the config: megatron's ``override_opt_param_scheduler``; Adam's betas/eps are set again after the
  optimizer state loads). One log line per changed field, and ``config.yaml`` records it.
- ``same``: decided by compatibility.py (shapes, parallel layout: refused or resharded there).
- ``free``: where and how the run is logged and saved; not compared.

Rules are matched by the longest prefix of the dotted field name. tests/reliability checks that every
field of the schema has a rule, so a new field cannot slip through undecided. Torch-free.
"""

from __future__ import annotations

from typing import Any

from rexmoe_train.checkpoint.errors import CheckpointError

WHY_REFUSE = {
    "model": "changes what the model computes",
    "rexmoe": "changes how tokens are routed",
    "data": "changes the data stream the step counter indexes",
    "train.seed": "changes the data order and the PSR masks of every later step",
    "train.global_batch_size": "changes the samples consumed per step (the data position)",
    "train.seq_length": "changes the data windows (the data position)",
}

# (prefix, policy): the longest matching prefix wins
RULES: list[tuple[str, str]] = [
    ("model", "refuse"),
    # implementation and memory choices: the same function, computed another way
    ("model.transformer_impl", "apply"),
    ("model.moe_grouped_gemm", "apply"),
    ("model.moe_ffn_pad_multiple", "apply"),  # checkpoints hold the unpadded experts (expert_padding.py)
    ("model.recompute_granularity", "apply"),
    ("model.recompute_method", "apply"),
    ("model.recompute_num_layers", "apply"),
    ("model.recompute_modules", "apply"),
    ("model.init_method_std", "apply"),  # only used to initialise: the checkpoint's weights replace it
    # shapes: compatibility.model_signature refuses them with its own line
    ("model.num_layers", "same"), ("model.hidden_size", "same"), ("model.num_attention_heads", "same"),
    ("model.num_query_groups", "same"), ("model.ffn_hidden_size", "same"),
    ("model.num_moe_experts", "same"), ("model.moe_ffn_hidden_size", "same"),
    ("model.moe_shared_expert_intermediate_size", "same"), ("model.first_k_dense_layers", "same"),
    ("model.normalization", "same"), ("model.qk_layernorm", "same"), ("model.kv_channels", "same"),
    ("model.untie_embeddings_and_output_weights", "same"), ("model.vocab_size", "same"),
    ("model.make_vocab_size_divisible_by", "same"),  # a padded-vocab change is a load note
    ("rexmoe", "refuse"),
    ("rexmoe.reuse_group_size", "same"), ("rexmoe.allow_partial_last_group", "same"),
    ("rexmoe.kernels", "apply"),
    # loss weights and the bias step: training hyperparameters like the LR
    ("rexmoe.balance.layer_aux_coeff", "apply"), ("rexmoe.balance.group_aux_coeff", "apply"),
    ("rexmoe.balance.z_loss_coeff", "apply"), ("rexmoe.balance.moe_router_bias_update_rate", "apply"),
    ("parallel", "same"),  # resharding (compatibility.py, CheckpointManager.load notes)
    ("train", "apply"),
    ("train.seed", "refuse"), ("train.global_batch_size", "refuse"), ("train.seq_length", "refuse"),
    ("data", "refuse"),
    ("data.cache_dir", "free"),
    ("run", "free"),
    ("checkpoint", "free"),
    ("resilience", "free"),  # timeouts, watchdog budgets, straggler report: how the run is watched
]


def policy(key: str) -> str:
    best, chosen = -1, "apply"
    for prefix, rule in RULES:
        if (key == prefix or key.startswith(prefix + ".")) and len(prefix) > best:
            best, chosen = len(prefix), rule
    return chosen


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


def _why(key: str) -> str:
    best = max((p for p in WHY_REFUSE if key == p or key.startswith(p + ".")), key=len, default=None)
    return WHY_REFUSE.get(best, "cannot change on resume")


# Fields added to the schema after checkpoints existed, whose absence means a value other than today's
# default: every run before rexmoe.psr.mask_draw drew its PSR masks afresh each step.
IMPLIED_WHEN_ABSENT = {"rexmoe.psr.mask_draw": "per_step"}


def compare(saved: dict, current: dict, where: str) -> list[str]:
    """The changes to apply, as log lines; raises CheckpointError (one line) on the first refused one.
    Fields one side lacks (added to the schema later) count as unchanged, except those whose absence
    implies a value (IMPLIED_WHEN_ABSENT)."""
    old, new = _flatten(saved), _flatten(current)
    old = {**{k: v for k, v in IMPLIED_WHEN_ABSENT.items() if k in new}, **old}
    applied = []
    for key in sorted(set(old) & set(new)):
        if old[key] == new[key] or _numerically_equal(old[key], new[key]):
            continue
        rule = policy(key)
        if rule == "refuse":
            raise CheckpointError(
                f"checkpoint error: {where}: {key} was {old[key]!r}, the config says {new[key]!r}: "
                f"{_why(key)}, so a resume cannot change it; resume with {key}={old[key]!r} or start a "
                "new run (another run.dir)")
        if rule == "apply":
            applied.append(f"[resume] {key}: {old[key]!r} -> {new[key]!r} (applied from step "
                           "after the checkpoint's)")
    return applied


def _numerically_equal(a: Any, b: Any) -> bool:
    # YAML round trips write 1e-08 / 0.001 the same way, but ints and floats may differ in type
    return (isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool)
            and not isinstance(b, bool) and float(a) == float(b))
