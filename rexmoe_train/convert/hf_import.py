"""Import a STOCK Hugging Face MoE checkpoint (written by transformers, no ``rexmoe_export.json``) as a
vanilla (r=1) ReXMoE model, to train as is or to upcycle (``rexmoe-convert upcycle``).

Supported: ``Qwen2MoeForCausalLM`` and ``Qwen3MoeForCausalLM`` folders (``config.json`` plus
``model.safetensors`` or sharded ``model-*.safetensors`` with ``model.safetensors.index.json``).
The config is derived from ``config.json`` and everything must be exactly expressible; anything that
is not stops with one line naming the field (or tensor) and its value:

- attention bias (Qwen2-MoE's ``qkv_bias`` defaults to true): our attention has no bias, so the bias
  tensors must be all zero (then dropping them is exact);
- Qwen2-MoE's shared expert is scaled per token by ``sigmoid(shared_expert_gate(x))``; ours is
  ungated, so only an all-zero gate (a constant 0.5, folded into the down projection) is exact;
- dense layers (``mlp_only_layers``, ``decoder_sparse_step``) must be the first k layers;
- sliding-window attention, non-default RoPE, an activation other than SiLU.

An explicit ``head_dim`` other than hidden/heads (Qwen3-MoE releases) becomes ``model.kv_channels``.

OLMoE is not supported: its ``q_norm``/``k_norm`` normalise the whole projected query/key vector
(``hidden_size`` wide, across heads), which megatron's per-head ``qk_layernorm`` cannot express.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from rexmoe_train.config.schema import ConfigError, ExperimentConfig
from rexmoe_train.convert.hf_format import ConvertError

STOCK_ARCHITECTURES = {"Qwen2MoeForCausalLM": "qwen2_moe", "Qwen3MoeForCausalLM": "qwen3_moe"}
WHY_NOT = {
    "OlmoeForCausalLM": "its q_norm/k_norm normalise the whole projected query/key (across heads), "
                        "which megatron's per-head qk_layernorm cannot express",
}
# transformers' defaults for keys a config.json may leave out (the ones that change the function)
_DEFAULTS = {
    "qwen2_moe": {"qkv_bias": True, "shared_expert_intermediate_size": 5632, "rms_norm_eps": 1e-6},
    "qwen3_moe": {"attention_bias": False, "rms_norm_eps": 1e-6},
}
_COMMON_DEFAULTS = {"decoder_sparse_step": 1, "mlp_only_layers": [], "norm_topk_prob": False,
                    "tie_word_embeddings": False, "hidden_act": "silu", "use_sliding_window": False,
                    "rope_theta": 10000.0, "head_dim": None, "layer_types": None, "rope_scaling": None}


def is_stock_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ConvertError(f"{path}: unreadable ({err.__class__.__name__}: {err})") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: not a JSON object")
    return data


def architecture(hf: dict) -> str:
    """``qwen2_moe`` or ``qwen3_moe``; anything else is refused, naming the architecture."""
    archs = hf.get("architectures") or []
    name = archs[0] if len(archs) == 1 else None
    if name is None:
        kinds = {v: k for k, v in STOCK_ARCHITECTURES.items()}
        name = kinds.get(hf.get("model_type"), f"model_type={hf.get('model_type')!r}")
    if name not in STOCK_ARCHITECTURES:
        why = f" ({WHY_NOT[name]})" if name in WHY_NOT else ""
        raise ConvertError(f"import-hf: architecture {name} is not supported{why}; supported stock "
                           f"architectures: {', '.join(STOCK_ARCHITECTURES)}")
    return STOCK_ARCHITECTURES[name]


class _Fields:
    """config.json values with transformers' defaults; a missing required key is a ConvertError."""

    def __init__(self, hf: dict, kind: str):
        self.hf, self.defaults = hf, _COMMON_DEFAULTS | _DEFAULTS[kind]

    ALIASES = {"num_experts": "num_local_experts"}  # transformers 5 writes Qwen3-MoE's under the alias

    def __getitem__(self, key: str) -> Any:
        for name in (key, self.ALIASES.get(key)):
            if name in self.hf and self.hf[name] is not None:
                return self.hf[name]
        if key in self.defaults:
            return self.defaults[key]
        raise ConvertError(f"import-hf: config.json has no {key}")


def _refuse(field: str, value: Any, why: str) -> None:
    raise ConvertError(f"import-hf: config.json {field}={value!r}: {why}")


def _rope_theta(f: _Fields) -> int:
    params = f.hf.get("rope_parameters") or {}
    scaling = f["rope_scaling"] or {}
    for source, name in ((params, "rope_parameters"), (scaling, "rope_scaling")):
        rope_type = source.get("rope_type", source.get("type", "default"))
        if rope_type != "default":
            _refuse(f"{name}.rope_type", rope_type, "only default RoPE is expressible")
        if source.get("partial_rotary_factor", 1.0) != 1.0:
            _refuse(f"{name}.partial_rotary_factor", source["partial_rotary_factor"],
                    "only full-width RoPE is expressible")
    theta = params.get("rope_theta", f["rope_theta"])
    if float(theta) != int(theta):
        _refuse("rope_theta", theta, "model.rotary_base is an integer")
    return int(theta)


def _first_k_dense(f: _Fields, layers: int) -> int:
    step, only = f["decoder_sparse_step"], sorted(f["mlp_only_layers"])
    if step < 1:
        _refuse("decoder_sparse_step", step, "must be >= 1")
    dense = [i for i in range(layers) if i in only or (i + 1) % step]
    if dense != list(range(len(dense))):
        _refuse("mlp_only_layers", only, f"with decoder_sparse_step={step} the dense layers are {dense}; "
                "ReXMoE expresses only the first k layers dense (model.first_k_dense_layers)")
    if len(dense) == layers:
        _refuse("mlp_only_layers", only, f"with decoder_sparse_step={step} no layer is MoE")
    return len(dense)


def experiment_from_hf(hf: dict) -> tuple[ExperimentConfig, int]:
    """(vanilla r=1 ReXMoE config computing what the stock model computes, tokenizer vocab size)."""
    kind = architecture(hf)
    f = _Fields(hf, kind)
    layers, hidden, heads = f["num_hidden_layers"], f["hidden_size"], f["num_attention_heads"]
    if f["hidden_act"] != "silu":
        _refuse("hidden_act", f["hidden_act"], "ReXMoE's MLPs are SwiGLU (silu)")
    if f["use_sliding_window"]:
        _refuse("use_sliding_window", True, "ReXMoE has no sliding-window attention")
    other = sorted({t for t in f["layer_types"] or [] if t != "full_attention"})
    if other:
        _refuse("layer_types", other, "ReXMoE has full attention in every layer")
    if not f["num_experts"]:
        _refuse("num_experts", f["num_experts"], "not an MoE model")

    cfg = ExperimentConfig()
    m = cfg.model
    m.num_layers, m.hidden_size, m.num_attention_heads = layers, hidden, heads
    m.num_query_groups = hf.get("num_key_value_heads") or heads
    m.num_moe_experts, m.moe_router_topk = f["num_experts"], f["num_experts_per_tok"]
    m.moe_ffn_hidden_size, m.ffn_hidden_size = f["moe_intermediate_size"], f["intermediate_size"]
    m.first_k_dense_layers = _first_k_dense(f, layers)
    shared = f["shared_expert_intermediate_size"] if kind == "qwen2_moe" else 0
    m.moe_shared_expert_intermediate_size = shared or None
    m.qk_layernorm = kind == "qwen3_moe"
    if f["head_dim"] is not None and f["head_dim"] * heads != hidden:
        m.kv_channels = f["head_dim"]  # Qwen3-MoE releases: head_dim 128 with hidden/heads 64
    m.norm_epsilon = float(f["rms_norm_eps"])
    m.normalization = "RMSNorm"
    m.rotary_base = _rope_theta(f)
    m.untie_embeddings_and_output_weights = not f["tie_word_embeddings"]
    m.max_position_embeddings = hf.get("max_position_embeddings")
    m.init_method_std = float(hf.get("initializer_range", m.init_method_std))
    m.vocab_size = f["vocab_size"]
    cfg.rexmoe.reuse_group_size = 1
    cfg.rexmoe.gating = "topk_then_softmax" if f["norm_topk_prob"] else "softmax_then_topk"
    try:
        cfg.validate()
    except ConfigError as err:
        raise ConvertError(f"import-hf: the stock config is not a valid ReXMoE model ({err})") from None
    return cfg, m.vocab_size


class SafetensorsFolder(Mapping):
    """The tensors of a folder (``model.safetensors`` or an index of shards), read lazily on access:
    peak memory is the converted model, not a second copy of the checkpoint."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self._open, self._handles = safe_open, {}
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise ConvertError(f"{index}: unreadable index ({err.__class__.__name__})") from None
            self._where = {name: folder / file for name, file in weight_map.items()}
        elif (folder / "model.safetensors").is_file():
            single = folder / "model.safetensors"
            self._where = {name: single for name in self._handle(single).keys()}
        else:
            raise ConvertError(f"{folder}: no model.safetensors or model.safetensors.index.json "
                               "(only safetensors checkpoints can be imported)")

    def _handle(self, path: Path):
        if path not in self._handles:
            try:
                self._handles[path] = self._open(str(path), framework="pt")
            except Exception as err:  # missing / truncated / corrupt: safetensors raises its own errors
                raise ConvertError(f"{path}: cannot read safetensors ({err})") from None
        return self._handles[path]

    def __getitem__(self, name: str) -> torch.Tensor:
        path = self._where[name]
        try:
            return self._handle(path).get_tensor(name)
        except ConvertError:
            raise
        except Exception as err:
            raise ConvertError(f"{path}: cannot read tensor {name} ({err})") from None

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _unfused_experts(cfg: ExperimentConfig, hf: Mapping) -> dict[str, torch.Tensor]:
    """transformers 5 keeps a layer's experts fused in memory (``experts.gate_up_proj`` [E, 2I, H],
    gate rows first; ``experts.down_proj`` [E, H, I]); a folder may hold that form: split it into the
    per-expert names the hub checkpoints (and save_pretrained) use."""
    out = {}
    for layer in range(cfg.model.first_k_dense_layers, cfg.model.num_layers):
        prefix = f"model.layers.{layer}.mlp.experts"
        if f"{prefix}.gate_up_proj" not in hf or f"{prefix}.0.gate_proj.weight" in hf:
            continue
        gate_up, down = hf[f"{prefix}.gate_up_proj"], hf[f"{prefix}.down_proj"]
        for e in range(gate_up.shape[0]):
            gate, up = gate_up[e].chunk(2, dim=0)
            out[f"{prefix}.{e}.gate_proj.weight"], out[f"{prefix}.{e}.up_proj.weight"] = gate, up
            out[f"{prefix}.{e}.down_proj.weight"] = down[e]
    return out


def _check_zero_biases(cfg: ExperimentConfig, hf_cfg: dict, hf: Mapping) -> None:
    kind = architecture(hf_cfg)
    flag = "qkv_bias" if kind == "qwen2_moe" else "attention_bias"
    if not _Fields(hf_cfg, kind)[flag]:
        return
    projections = ("q_proj", "k_proj", "v_proj") + (("o_proj",) if kind == "qwen3_moe" else ())
    for layer in range(cfg.model.num_layers):
        for proj in projections:
            name = f"model.layers.{layer}.self_attn.{proj}.bias"
            if name not in hf:
                raise ConvertError(f"import-hf: tensor {name} missing ({flag}=true; the checkpoint is incomplete)")
            if hf[name].count_nonzero():
                raise ConvertError(f"import-hf: {name} is not zero ({flag}=true): ReXMoE's attention has "
                                   "no bias, so only all-zero biases are exact")


def stock_state(cfg: ExperimentConfig, hf_cfg: dict, hf: Mapping, padded_vocab: int) -> dict[str, torch.Tensor]:
    """Our 1-process state dict from a stock folder's tensors. The embedding (and output layer) rows
    past the tokenizer's vocabulary, megatron's padding, are zero."""
    from rexmoe_train.convert.transforms import from_hf_unrolled

    _check_zero_biases(cfg, hf_cfg, hf)
    view = collections.ChainMap(_unfused_experts(cfg, hf), hf)
    state = from_hf_unrolled(cfg, view, stock=True)
    vocab = cfg.model.vocab_size
    for key in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if key not in state:
            continue
        weight = state[key]
        if weight.shape[0] != vocab:
            raise ConvertError(f"import-hf: {key} has {weight.shape[0]} rows, config.json vocab_size={vocab}")
        state[key] = torch.cat([weight, weight.new_zeros(padded_vocab - vocab, weight.shape[1])])
    return state


def training_overrides(cfg: ExperimentConfig) -> str:
    """The overrides `rexmoe-train` needs to build this model: every model field, r and the gating."""
    import dataclasses

    parts = []
    for field in dataclasses.fields(cfg.model):
        if field.name == "transformer_impl":
            continue
        value = getattr(cfg.model, field.name)
        text = "null" if value is None else str(value).lower() if isinstance(value, bool) else value
        parts.append(f"model.{field.name}={text}")
    parts += [f"rexmoe.reuse_group_size={cfg.rexmoe.reuse_group_size}", f"rexmoe.gating={cfg.rexmoe.gating}"]
    return " ".join(parts)
