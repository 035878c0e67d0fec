"""model.transformer_impl and train.fp8*: the GPU-path options, validated (and rejected) on CPU."""

from __future__ import annotations

import pytest

from rexmoe_train import platform
from rexmoe_train.config.schema import ConfigError, ExperimentConfig, experiment_from_dict

NO_TE = not platform.has_transformer_engine()


def _error(overrides: dict) -> str:
    with pytest.raises(ConfigError) as exc:
        experiment_from_dict(overrides).validate()
    message = str(exc.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("overrides, field, fragment", [
    ({"model": {"transformer_impl": "te"}}, "model.transformer_impl", "transformer_engine"),
    ({"train": {"fp8": "e5m2"}}, "train.fp8", "hybrid"),
    ({"train": {"fp8_recipe": "mxfp8"}}, "train.fp8_recipe", "blockwise"),
    ({"train": {"fp8_amax_history_len": 0}}, "train.fp8_amax_history_len", ">= 1"),
])
def test_bad_values(overrides, field, fragment):
    message = _error(overrides)
    assert field in message and fragment in message


@pytest.mark.skipif(not NO_TE, reason="Transformer Engine on a GPU is present")
def test_cpu_rejects_te_and_fp8_in_one_line_when_training_starts():
    """validate() is pure (a laptop can dry-run a GPU config); check_machine() is what refuses."""
    for overrides in ({"train": {"fp8": "hybrid"}}, {"model": {"transformer_impl": "transformer_engine"}}):
        cfg = experiment_from_dict(overrides).validate()
        with pytest.raises(ConfigError) as exc:
            cfg.check_machine()
        assert "needs Transformer Engine on a GPU" in str(exc.value) and "\n" not in str(exc.value)


def test_fp8_with_the_local_impl_is_refused_by_validate():
    message = _error({"train": {"fp8": "hybrid"}, "model": {"transformer_impl": "local"}})
    assert message.startswith("config error: train.fp8='hybrid'") and "transformer_impl" in message
    cfg = ExperimentConfig().validate()
    assert cfg.model.transformer_impl == "auto" and cfg.model.resolved_transformer_impl() == "local"
    if not platform.HAS_CUDA:  # the platform answers both GPU questions with False on CPU
        assert platform.has_transformer_engine() is False and platform.has_triton_gpu() is False


def test_every_packaged_model_composes_to_auto_and_no_fp8():
    from importlib.resources import files

    from rexmoe_train.config.compose import compose_experiment

    models = sorted(p.name[:-5] for p in files("rexmoe_train.configs").joinpath("model").iterdir()
                    if p.name.endswith(".yaml"))
    assert "tiny" in models and "rexmoe_2.3b_se" in models
    for model in models:
        for train in ("tiny_cpu", "paper"):
            cfg = compose_experiment([f"model={model}", f"train={train}"]).experiment
            assert cfg.model.transformer_impl == "auto", model
            assert cfg.train.fp8 is None and cfg.train.fp8_recipe == "delayed", (model, train)


@pytest.mark.skipif(not NO_TE, reason="Transformer Engine on a GPU is present")
def test_transformer_config_on_cpu_is_the_local_path():
    from rexmoe_train.model.experts import ExpertBank, TEExpertBank, bank_class
    from rexmoe_train.model.gpt import transformer_config, uses_transformer_engine

    cfg = ExperimentConfig().validate()
    assert not uses_transformer_engine(cfg)
    tc = transformer_config(cfg)
    # auto is the SequentialMLP loop on CPU; megatron's flag follows the bank (it only gates validation)
    assert cfg.model.resolved_moe_grouped_gemm() is False
    assert tc.moe_grouped_gemm is False and tc.fp8 is None
    cfg.model.moe_grouped_gemm = True
    assert transformer_config(cfg).moe_grouped_gemm is True
    from megatron.core.transformer.moe.experts import SequentialMLP, TEGroupedMLP

    from rexmoe_train.model.experts import GroupedExpertBank

    assert bank_class(SequentialMLP, False) is ExpertBank
    assert bank_class(SequentialMLP, True).func is GroupedExpertBank
    assert TEExpertBank is not None and bank_class(TEGroupedMLP) is TEExpertBank


@pytest.mark.gpu
def test_te_layer_specs_on_gpu():
    if NO_TE:
        pytest.skip("transformer_engine not importable")
    from megatron.core.transformer.moe.experts import TEGroupedMLP

    from rexmoe_train.model.gpt import fp8_fields, layer_templates, transformer_config

    cfg = experiment_from_dict({"model": {"transformer_impl": "transformer_engine"},
                                "train": {"fp8": "hybrid"}}).validate()
    assert transformer_config(cfg).moe_grouped_gemm is True
    assert fp8_fields(cfg)["fp8"] == "hybrid"

    spec = layer_templates(cfg)[1]
    assert spec.submodules.mlp.submodules.experts.module is TEGroupedMLP
