"""import-hf from STOCK transformers Qwen2-MoE / Qwen3-MoE folders (no rexmoe_export.json): the
imported vanilla model and its upcycled r>1 model compute what the stock model computes; whatever is
not exactly expressible is refused with one line. Also the Qwen3-MoE export (model.qk_layernorm)."""

from __future__ import annotations

import json

import pytest
import torch

from rexmoe_train.convert.hf_format import ConvertError
from tests.helpers import tiny_config

transformers = pytest.importorskip("transformers")

VOCAB = 300  # not a multiple of 64: the imported embedding is padded to 320 with zero rows


# multi-process, conversion or end-to-end CLI runs: `pytest -m "not slow"` skips them
pytestmark = pytest.mark.slow


def _stock_config(kind: str, **overrides):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, moe_intermediate_size=32, num_experts=8,
                  num_experts_per_tok=2, max_position_embeddings=128, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    if kind == "qwen2":
        return transformers.Qwen2MoeConfig(**(common | dict(shared_expert_intermediate_size=48, qkv_bias=True,
                                                            mlp_only_layers=[0]) | overrides))
    # head_dim 32 != hidden/heads = 16, as in Qwen3-MoE releases (128 vs 64): model.kv_channels
    return transformers.Qwen3MoeConfig(**(common | dict(num_hidden_layers=4, norm_topk_prob=True, head_dim=32)
                                          | overrides))


def _stock_model(config, seed: int = 0):
    """A stock transformers model with every weight moved off its init (norm weights, routers), except
    what must be zero to be expressible: attention biases and the shared expert's gate."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "shared_expert_gate" in name:
                p.zero_()
            else:
                p.add_(torch.randn(p.shape, generator=g) * (0.1 if "norm" in name else 0.02))
    return model


def _save(model, folder, shards: bool = False):
    model.save_pretrained(str(folder), max_shard_size="150KB" if shards else "5GB")
    return folder


def _convert(capsys, *args) -> tuple[int, str, str]:
    from rexmoe_train.cli.convert import main

    code = main(list(map(str, args)))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _ours(model, x):
    pos = torch.arange(x.shape[1]).unsqueeze(0).expand(x.shape[0], -1)
    chunk = model.chunks[0].eval()
    with torch.no_grad():
        return chunk(x, pos, None)[..., :VOCAB]


@pytest.mark.parametrize("kind,r,shards", [("qwen2", 2, True), ("qwen3", 4, False)])
def test_stock_import_then_upcycle_matches_transformers(tmp_path, megatron_world, capsys, kind, r, shards):
    from rexmoe_train.convert import checkpoint_io

    hf = _stock_model(_stock_config(kind))
    src = _save(hf, tmp_path / "stock", shards)
    assert not (src / "rexmoe_export.json").exists()
    assert (src / "model.safetensors.index.json").exists() == shards
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(x).logits

    code, out, err = _convert(capsys, "import-hf", src, tmp_path / "vanilla")
    assert code == 0, err
    assert "vanilla (r=1)" in out and "model.qk_layernorm=" in out
    cfg, vanilla, meta = checkpoint_io.load_model(tmp_path / "vanilla")
    m = cfg.model
    assert cfg.rexmoe.reuse_group_size == 1 and m.num_moe_experts == 8 and m.norm_epsilon == 1e-6
    assert m.rotary_base == 500000 and m.qk_layernorm == (kind == "qwen3")
    assert m.kv_channels == (32 if kind == "qwen3" else None)
    assert m.first_k_dense_layers == (1 if kind == "qwen2" else 0)
    assert m.moe_shared_expert_intermediate_size == (48 if kind == "qwen2" else None)
    assert cfg.rexmoe.gating == ("softmax_then_topk" if kind == "qwen2" else "topk_then_softmax")
    got = _ours(vanilla, x)
    err_vanilla = (got - want).abs().max().item()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)

    code, out, err = _convert(capsys, "upcycle", tmp_path / "vanilla", tmp_path / "up", "-r", r)
    assert code == 0, err
    cfg_up, up, meta = checkpoint_io.load_model(tmp_path / "up")
    assert cfg_up.rexmoe.reuse_group_size == r and cfg_up.model.qk_layernorm == m.qk_layernorm
    up.psr_state.set_step(meta["step"] + 1)  # where training resumes: only the layers' own experts open
    upcycled = _ours(up, x)
    torch.testing.assert_close(upcycled, got, rtol=0, atol=1e-6)
    torch.testing.assert_close(upcycled, want, rtol=0, atol=1e-4)
    print(f"{kind}: |vanilla - transformers| = {err_vanilla:.2e}, "
          f"|upcycled r={r} - transformers| = {(upcycled - want).abs().max().item():.2e}")


def test_qwen3_export_round_trip(tmp_path, layout):
    """A ReXMoE with model.qk_layernorm (and a head size other than hidden/heads) exports to stock
    Qwen3MoeForCausalLM (same logits), and imports back bitwise."""
    from rexmoe_train.convert.export import export_hf, load_hf_tensors
    from rexmoe_train.convert.transforms import from_hf_unrolled
    from rexmoe_train.model.gpt import build_model

    cfg = tiny_config(r=2, layers=4, gating="topk_then_softmax")
    cfg.model.qk_layernorm, cfg.model.norm_epsilon, cfg.model.first_k_dense_layers = True, 1e-6, 2
    cfg.model.ffn_hidden_size, cfg.model.kv_channels = 96, 32  # head size 32, hidden/heads = 16
    layout(cfg.parallel)
    built = build_model(cfg, 257)
    chunk = built.chunks[0].eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in chunk.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.1 if "layernorm" in name else 0.02))
    assert "decoder.layers.0.self_attention.q_layernorm.weight" in chunk.state_dict()
    out = export_hf(cfg, chunk.state_dict(), built.vocab_size, tmp_path / "hf", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["rms_norm_eps"] == 1e-6 and config["head_dim"] == 32
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert type(hf).__name__ == "Qwen3MoeForCausalLM" and hf.config.num_experts == 16
    x = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(24).unsqueeze(0).expand(2, -1)
    with torch.no_grad():
        theirs, mine = hf(x).logits, chunk(x, pos, None)
    torch.testing.assert_close(theirs, mine, rtol=0, atol=1e-4)
    print(f"qwen3 export: |transformers - ours| = {(theirs - mine).abs().max().item():.2e}")
    back = from_hf_unrolled(cfg, load_hf_tensors(out))
    state = {k: v for k, v in chunk.state_dict().items() if not k.endswith("_extra_state")}
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_qk_layernorm_with_shared_experts_not_exportable():
    from rexmoe_train.convert.hf_format import check_exportable

    cfg = tiny_config()
    cfg.model.qk_layernorm, cfg.model.moe_shared_expert_intermediate_size = True, 32
    with pytest.raises(ConvertError, match="Qwen3-MoE, which has no shared expert"):
        check_exportable(cfg)


@pytest.mark.parametrize("change,message", [
    (dict(architectures=["OlmoeForCausalLM"], model_type="olmoe"),
     "architecture OlmoeForCausalLM is not supported (its q_norm/k_norm normalise the whole"),
    (dict(architectures=["LlamaForCausalLM"], model_type="llama"), "architecture LlamaForCausalLM is not supported"),
    (dict(mlp_only_layers=[1]), "mlp_only_layers=[1]: with decoder_sparse_step=1 the dense layers are [1]"),
    (dict(decoder_sparse_step=2), "the dense layers are [0, 2]"),
    (dict(use_sliding_window=True), "use_sliding_window=True"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}), "rope_type='yarn'"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4 + 0.5}), "rope_theta=10000.5"),
])
def test_unexpressible_configs_refused(change, message):
    from rexmoe_train.convert.hf_import import experiment_from_hf

    config = _stock_config("qwen2", mlp_only_layers=[]).to_dict() | change
    with pytest.raises(ConvertError, match="^import-hf: ") as err:
        experiment_from_hf(config)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_unexpressible_tensors_refused(tmp_path):
    """Nonzero attention bias, a learned shared-expert gate and a missing tensor: one line each."""
    from safetensors.torch import load_file, save_file

    from rexmoe_train.convert.hf_import import SafetensorsFolder, experiment_from_hf, stock_state

    config = _stock_config("qwen2")
    src = _save(_stock_model(config), tmp_path / "stock")
    cfg, _ = experiment_from_hf(config.to_dict())
    tensors = load_file(str(src / "model.safetensors"))

    def refused(edit, message):
        changed = {k: v.clone() for k, v in tensors.items()}
        edit(changed)
        save_file(changed, str(tmp_path / "stock" / "model.safetensors"))
        with pytest.raises(ConvertError, match="^import-hf: ") as err:
            stock_state(cfg, config.to_dict(), SafetensorsFolder(src), 320)
        assert message in str(err.value) and "\n" not in str(err.value)

    refused(lambda t: t["model.layers.1.self_attn.k_proj.bias"].add_(0.5),
            "model.layers.1.self_attn.k_proj.bias is not zero (qkv_bias=true): ReXMoE's attention has no bias")
    refused(lambda t: t["model.layers.2.mlp.shared_expert_gate.weight"].add_(0.1),
            "model.layers.2.mlp.shared_expert_gate.weight is not zero: Qwen2-MoE scales its shared expert "
            "per token by a learned sigmoid gate")
    refused(lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"),
            "tensor model.layers.1.mlp.experts.3.up_proj.weight missing (the checkpoint is incomplete)")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(ConvertError, match="model.safetensors: cannot read safetensors"):
        SafetensorsFolder(src)


def test_fused_expert_tensors_are_split(tmp_path):
    """transformers 5's in-memory fused expert layout, if a folder holds it, maps to the same state."""
    from safetensors.torch import load_file, save_file

    from rexmoe_train.convert.hf_import import SafetensorsFolder, experiment_from_hf, stock_state

    config = _stock_config("qwen3", num_hidden_layers=2)
    src = _save(_stock_model(config), tmp_path / "stock")
    cfg, _ = experiment_from_hf(config.to_dict())
    want = stock_state(cfg, config.to_dict(), SafetensorsFolder(src), 320)
    tensors = load_file(str(src / "model.safetensors"))
    for layer in range(2):
        p = f"model.layers.{layer}.mlp.experts"
        per = [(tensors.pop(f"{p}.{e}.gate_proj.weight"), tensors.pop(f"{p}.{e}.up_proj.weight"),
                tensors.pop(f"{p}.{e}.down_proj.weight")) for e in range(8)]
        tensors[f"{p}.gate_up_proj"] = torch.stack([torch.cat([gate, up]) for gate, up, _ in per])
        tensors[f"{p}.down_proj"] = torch.stack([down for _, _, down in per])
    save_file(tensors, str(src / "model.safetensors"))
    got = stock_state(cfg, config.to_dict(), SafetensorsFolder(src), 320)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_cli_refusal_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "olmoe").mkdir()
    (tmp_path / "olmoe" / "config.json").write_text(json.dumps({"architectures": ["OlmoeForCausalLM"]}))
    code, out, err = _convert(capsys, "import-hf", tmp_path / "olmoe", tmp_path / "o")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "OlmoeForCausalLM is not supported" in lines[0]
    assert not (tmp_path / "o").exists()


def test_model_config_fields_validated():
    from rexmoe_train.config.schema import ConfigError, ModelConfig, experiment_from_dict

    defaults = ModelConfig()
    assert (defaults.qk_layernorm, defaults.norm_epsilon, defaults.kv_channels) == (False, 1e-5, None)
    assert defaults.head_dim == defaults.hidden_size // defaults.num_attention_heads
    ModelConfig(hidden_size=60, num_attention_heads=8, kv_channels=16).validate()  # no divisibility needed
    for bad, message in ((dict(norm_epsilon=0.0), "model.norm_epsilon=0.0"),
                         (dict(kv_channels=0), "model.kv_channels=0"),
                         (dict(qk_layernorm="yes"), "model.qk_layernorm='yes'")):
        with pytest.raises(ConfigError, match=message):
            ModelConfig(**bad).validate()
    cfg = experiment_from_dict({"model": {"qk_layernorm": True, "norm_epsilon": 1e-6, "kv_channels": 64}})
    assert cfg.model.qk_layernorm and cfg.model.head_dim == 64
