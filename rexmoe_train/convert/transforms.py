"""State-dict transforms between formats, all on 1-process (ep=1) state dicts where a bank's local
slot is its candidate index.

- ``from_hf_unrolled``: the inverse of the Qwen2-MoE / Qwen3-MoE export. Every layer of a group
  carries copies of the group's experts; they must agree bit for bit (anything else is not a ReXMoE
  export). With ``stock=True`` (r=1) it also maps a stock transformers checkpoint (hf_import.py).
- ``upcycle``: a vanilla (r=1) state dict -> reuse group size r, with identical outputs at step 0.
"""

from __future__ import annotations

import dataclasses

import torch

from rexmoe_train.config.schema import ExperimentConfig
from rexmoe_train.convert.hf_format import ConvertError, merge_qkv


def from_hf_unrolled(cfg: ExperimentConfig, hf: dict[str, torch.Tensor], *,
                     stock: bool = False) -> dict[str, torch.Tensor]:
    """Our (1-process) state dict from Qwen-MoE tensor names. ``stock``: the folder is a stock
    transformers checkpoint (not an export of ours): errors say so instead of "not a ReXMoE export"."""
    m, plan = cfg.model, cfg.reuse_plan()
    heads, groups = m.num_attention_heads, m.num_query_groups or m.num_attention_heads
    head_dim = m.head_dim

    def take(name: str) -> torch.Tensor:
        if name not in hf:
            why = "the checkpoint is incomplete" if stock else "not a ReXMoE export of this config"
            raise ConvertError(f"import-hf: tensor {name} missing ({why})")
        return hf[name]

    def fc1(prefix: str) -> torch.Tensor:
        return torch.cat([take(f"{prefix}.gate_proj.weight"), take(f"{prefix}.up_proj.weight")], dim=0)

    out = {"embedding.word_embeddings.weight": take("model.embed_tokens.weight"),
           "decoder.final_layernorm.weight": take("model.norm.weight")}
    if m.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = take("lm_head.weight")
    for layer in range(m.num_layers):
        src, dst = f"model.layers.{layer}", f"decoder.layers.{layer}"
        out[f"{dst}.input_layernorm.weight"] = take(f"{src}.input_layernorm.weight")
        out[f"{dst}.self_attention.linear_qkv.weight"] = merge_qkv(
            take(f"{src}.self_attn.q_proj.weight"), take(f"{src}.self_attn.k_proj.weight"),
            take(f"{src}.self_attn.v_proj.weight"), heads, groups, head_dim)
        out[f"{dst}.self_attention.linear_proj.weight"] = take(f"{src}.self_attn.o_proj.weight")
        if m.qk_layernorm:
            out[f"{dst}.self_attention.q_layernorm.weight"] = take(f"{src}.self_attn.q_norm.weight")
            out[f"{dst}.self_attention.k_layernorm.weight"] = take(f"{src}.self_attn.k_norm.weight")
        out[f"{dst}.pre_mlp_layernorm.weight"] = take(f"{src}.post_attention_layernorm.weight")
        if not plan.is_moe_layer(layer + 1):
            out[f"{dst}.mlp.linear_fc1.weight"] = fc1(f"{src}.mlp")
            out[f"{dst}.mlp.linear_fc2.weight"] = take(f"{src}.mlp.down_proj.weight")
            continue
        out[f"{dst}.mlp.router.weight"] = take(f"{src}.mlp.gate.weight")
        if m.moe_shared_expert_intermediate_size:
            if take(f"{src}.mlp.shared_expert_gate.weight").count_nonzero():
                if stock:
                    raise ConvertError(
                        f"import-hf: {src}.mlp.shared_expert_gate.weight is not zero: Qwen2-MoE scales its "
                        "shared expert per token by a learned sigmoid gate, which ReXMoE's ungated shared "
                        "expert cannot express (only an all-zero gate, a constant 0.5, is exact)")
                raise ConvertError(f"import-hf: {src}.mlp.shared_expert_gate is not zero: not a ReXMoE export")
            out[f"{dst}.mlp.shared_experts.linear_fc1.weight"] = fc1(f"{src}.mlp.shared_expert")
            out[f"{dst}.mlp.shared_experts.linear_fc2.weight"] = take(f"{src}.mlp.shared_expert.down_proj.weight") / 2
        group = plan.group_of(plan.moe_index(layer + 1))
        bank = f"expert_banks.banks.{group.index}.local_experts"
        for c in range(group.num_candidates):
            pair = {f"{bank}.{c}.linear_fc1.weight": fc1(f"{src}.mlp.experts.{c}"),
                    f"{bank}.{c}.linear_fc2.weight": take(f"{src}.mlp.experts.{c}.down_proj.weight")}
            for key, value in pair.items():
                if key in out and not torch.equal(out[key], value):
                    raise ConvertError(f"import-hf: layer {layer} expert {c} differs from the other copies "
                                       f"in reuse group {group.index}: not a ReXMoE export with r="
                                       f"{cfg.rexmoe.reuse_group_size}")
                out.setdefault(key, value)
    return out


def upcycle_config(vanilla: ExperimentConfig, r: int, start_step: int) -> ExperimentConfig:
    """The ReXMoE config of an upcycled model: reuse group size r; PSR masks on logits and keeps each
    layer's own experts, so from ``start_step`` until the ramp starts only the vanilla experts can be
    chosen and the model computes exactly what the vanilla one did."""
    if vanilla.rexmoe.reuse_group_size != 1:
        raise ConvertError(f"upcycle: the source has rexmoe.reuse_group_size="
                           f"{vanilla.rexmoe.reuse_group_size}; it must be a vanilla MoE (1)")
    psr = vanilla.rexmoe.psr
    span = max(psr.end_step - psr.start_step, 1)
    new_psr = dataclasses.replace(psr, schedule="linear" if psr.schedule == "none" else psr.schedule,
                                  mask_on="logits", protect_local=True,
                                  start_step=max(psr.start_step, start_step),
                                  end_step=max(psr.start_step, start_step) + span)
    cfg = dataclasses.replace(vanilla, rexmoe=dataclasses.replace(
        vanilla.rexmoe, reuse_group_size=r, psr=new_psr))
    return cfg.validate()


def upcycle(vanilla_cfg: ExperimentConfig, state: dict[str, torch.Tensor],
            target: ExperimentConfig) -> dict[str, torch.Tensor]:
    """Each group's bank = its layers' vanilla experts (each once); router rows for another owner's
    experts start as that owner's router rows ("route as the owner would"), masked until PSR opens."""
    old_plan, new_plan = vanilla_cfg.reuse_plan(), target.reuse_plan()
    n = target.model.num_moe_experts
    out = {k: v for k, v in state.items() if not k.startswith("expert_banks.") and ".router." not in k}
    for group in new_plan.groups:
        for c in range(group.num_candidates):
            owner, expert = group.candidate(c)
            old = f"expert_banks.banks.{old_plan.group_of(owner).index}.local_experts.{expert}"
            for param in ("linear_fc1.weight", "linear_fc2.weight"):
                out[f"expert_banks.banks.{group.index}.local_experts.{c}.{param}"] = state[f"{old}.{param}"]
        for moe_layer in group.moe_layers:
            layer = moe_layer + target.model.first_k_dense_layers
            rows = []
            for owner in group.moe_layers:
                owner_layer = owner + target.model.first_k_dense_layers
                rows.append(state[f"decoder.layers.{owner_layer}.mlp.router.weight"])
            out[f"decoder.layers.{layer}.mlp.router.weight"] = torch.cat(rows, dim=0)
            assert out[f"decoder.layers.{layer}.mlp.router.weight"].shape[0] == group.size * n
    return out
