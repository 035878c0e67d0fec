"""The config split by section (rexmoe_train/config/{fields,coercion,rexmoe,model,parallel,train,run}.py;
ExperimentConfig and the cross-field checks in schema.py): each section validates on its own, under
its own path, and schema.py's names are the sections' own classes."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

from rexmoe_train.config import coercion, fields, model, parallel, rexmoe, run, schema, train
from rexmoe_train.core.errors import ConfigError

SECTIONS = {  # module -> (class, the default path its validate() names, a bad field, a needle)
    rexmoe: (rexmoe.ReXMoEConfig, "rexmoe", {"reuse_group_size": 0}, "rexmoe.reuse_group_size=0"),
    model: (model.ModelConfig, "model", {"num_moe_experts": 0}, "model.num_moe_experts=0"),
    parallel: (parallel.ParallelConfig, "parallel", {"moe_token_dispatcher_type": "flex"},
               "parallel.moe_token_dispatcher_type='flex'"),
    train: (train.TrainConfig, "train", {"lr": 0.0}, "train.lr=0.0"),
    run: (run.CheckpointConfig, "checkpoint", {"keep_last_n": 0}, "checkpoint.keep_last_n=0"),
}


def _validate(section, path: str) -> None:
    takes_path = "path" in inspect.signature(type(section).validate).parameters
    section.validate(path) if takes_path else section.validate()


@pytest.mark.parametrize("module", list(SECTIONS), ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_each_section_validates_alone_and_is_what_schema_exports(module):
    cls, path, bad, needle = SECTIONS[module]
    assert getattr(schema, cls.__name__) is cls  # one class, one import path kept for callers
    _validate(cls(), path)
    broken = dataclasses.replace(cls(), **bad)
    with pytest.raises(ConfigError, match="^config error: ") as err:
        _validate(broken, path)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_every_dataclass_of_the_package_is_reachable_from_experiment_config():
    """No section was lost in the split: ExperimentConfig's fields name every section class."""
    reached, todo = set(), [schema.ExperimentConfig]
    while todo:
        cls = todo.pop()
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if dataclasses.is_dataclass(default) and type(default) not in reached:
                reached.add(type(default))
                todo.append(type(default))
    declared = {obj for m in (rexmoe, model, parallel, train, run) for obj in vars(m).values()
                if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == m.__name__}
    assert declared <= reached, declared - reached


def test_fields_checks_name_the_field_and_the_rule():
    with pytest.raises(ConfigError, match=r"^config error: a\.b='x': must be one of p, q$"):
        fields._one_of("a.b", "x", ("p", "q"))
    with pytest.raises(ConfigError, match=r"a\.c=0"):
        fields._positive("a.c", 0)
    assert "linear" in fields.PSR_SCHEDULES and fields.Gating("sigmoid") == "sigmoid"


def test_coercion_builds_nested_dataclasses_and_names_unknown_or_mistyped_fields():
    cfg = coercion.from_dict(schema.ExperimentConfig, {"model": {"num_layers": 8}, "rexmoe": {"psr": {"end_step": 9}}})
    assert cfg.model.num_layers == 8 and cfg.rexmoe.psr.end_step == 9 and cfg.train == train.TrainConfig()
    with pytest.raises(ConfigError, match="unknown field 'model.num_expert'"):
        coercion.from_dict(schema.ExperimentConfig, {"model": {"num_expert": 8}})
    with pytest.raises(ConfigError, match="model.num_layers"):
        coercion.from_dict(schema.ExperimentConfig, {"model": {"num_layers": "four"}})
