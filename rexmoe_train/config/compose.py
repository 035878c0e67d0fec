"""Compose an experiment from the packaged configs and command-line overrides.

The dataclasses of :mod:`.schema` are the one source of defaults: they are registered with Hydra as
the structured base of ``config.yaml``, and every YAML file (``model/*.yaml``, ``train/*.yaml``) holds
only what differs from them. The YAML files live in ``configs/`` at the top of the tree and ship
inside the package as ``rexmoe_train.configs``; they are found through the package, so
``pip install rexmoe-train`` (wheel or sdist, not only an editable checkout) has them;
``$REXMOE_CONFIG_DIR`` points Hydra at another directory with the same layout.

Hydra's compose API is used instead of ``@hydra.main`` so that every composition problem (an
unknown key, a wrong type, an unknown ``model=`` choice, a malformed override) becomes one
:class:`ConfigError` line instead of Hydra's multi-line report.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any, Optional

from rexmoe_train.config.schema import ConfigError, ExperimentConfig, experiment_from_dict

CONFIG_ENV = "REXMOE_CONFIG_DIR"
CONFIG_MODULE = "rexmoe_train.configs"
SCHEMA_NAME = "rexmoe_schema"  # the structured base every config.yaml starts from


@dataclasses.dataclass
class ComposedConfig:
    experiment: ExperimentConfig
    resolved: dict  # the composed config as plain data (what config.yaml records)
    choices: dict[str, str]  # config group -> chosen option, e.g. {"model": "tiny", "train": "tiny_cpu"}
    overrides: list[str]


def _register_schema() -> None:
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=ExperimentConfig)


def _one_line(err: BaseException) -> str:
    """The first line of Hydra's / OmegaConf's message, with the field it names."""
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    for item in chain:
        if isinstance(item, OmegaConfBaseException) and getattr(item, "full_key", None):
            key = item.full_key
            first = str(item).splitlines()[0] if str(item) else type(item).__name__
            if isinstance(item, (ConfigKeyError, ConfigAttributeError)) or first.startswith("Key '"):
                allowed = _allowed_fields(key)
                return f"config error: unknown field {key!r}" + (f"; allowed: {allowed}" if allowed else "")
            return f"config error: {key}: {first}"
    text = " ".join(line.strip() for line in str(chain[0]).splitlines() if line.strip())
    return f"config error: {text}"


def _yaml_line(err: Any) -> str:
    """A YAML error as one line naming the file and line: 'config error: F line 22: found duplicate
    key lr (while constructing a mapping)'."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"{mark.name} line {mark.line + 1}" if mark is not None else "a config file"
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    return f"config error: {where}: {problem}" + (f" ({context})" if context else "")


def _undecodable(config_dir: Optional[str]) -> Optional[str]:
    """The first YAML file of ``config_dir`` that is not UTF-8, as one line with its line number."""
    if config_dir is None:
        return None
    for dirpath, _, files in sorted(os.walk(config_dir)):
        for name in sorted(files):
            if not name.endswith((".yaml", ".yml")):
                continue
            path = os.path.join(dirpath, name)
            try:
                with open(path, "rb") as f:
                    raw = f.read()
                raw.decode("utf-8")
            except OSError:
                continue
            except UnicodeDecodeError as err:
                line = raw[:err.start].count(b"\n") + 1
                return f"config error: {path} line {line}: not UTF-8 text ({err.reason} at byte {err.start})"
    return None


def _missing_option(err: Any) -> Optional[str]:
    """`model=foo` -> 'config error: model='foo': must be one of rexmoe_0.5b, ..., tiny'."""
    missing = getattr(err, "missing_cfg_file", None) or ""
    options = getattr(err, "options", None)
    if "/" in missing and options:
        group, _, name = missing.rpartition("/")
        return f"config error: {group}={name!r}: must be one of {', '.join(sorted(options))}"
    return None


def _settings(data: dict) -> dict:
    """What makes a run: everything but ``run.*`` (where and how it is logged)."""
    return {k: v for k, v in data.items() if k != "run"}


def run_dir_default(model_choice: str, experiment: ExperimentConfig, data: dict, base: dict) -> str:
    """``run.dir`` when nothing sets it: ``runs/<model>-r<r>`` when the run's settings are the model's
    own (``base``: what ``model=<choice>`` alone composes to) and ``runs/<model>-r<r>-<hash>`` when
    overrides change anything else, so that the README's examples (a new PSR schedule, another
    layout) start their own run instead of resuming the quick start's. The hash is of the resolved
    settings, so the same settings always find their directory again however they were spelled."""
    name = f"runs/{model_choice}-r{experiment.rexmoe.reuse_group_size}"
    if _settings(data) == _settings(base):
        return name
    digest = hashlib.sha256(json.dumps(_settings(data), sort_keys=True, default=str).encode()).hexdigest()
    return f"{name}-{digest[:8]}"


def _allowed_fields(key: str) -> Optional[str]:
    """The fields allowed next to ``key`` (e.g. train.lrr -> TrainConfig's), or None."""
    cls: Any = ExperimentConfig
    for part in key.split(".")[:-1]:
        hints = {f.name: f for f in dataclasses.fields(cls)}
        if part not in hints:
            return None
        cls = hints[part].default_factory if hints[part].default_factory is not dataclasses.MISSING else None
        if cls is None or not dataclasses.is_dataclass(cls):
            return None
    return ", ".join(sorted(f.name for f in dataclasses.fields(cls)))


def _compose(overrides: Sequence[str], config_dir: Optional[str]) -> tuple[dict, dict]:
    import yaml
    from hydra import compose, initialize_config_dir, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    _register_schema()
    if config_dir is not None and not os.path.isfile(os.path.join(config_dir, "config.yaml")):
        raise ConfigError(f"config error: {CONFIG_ENV}={config_dir!r}: must be a directory holding "
                          "config.yaml (and model/, train/), like the packaged configs/")
    GlobalHydra.instance().clear()
    init = (initialize_config_dir(config_dir=os.path.abspath(config_dir), version_base=None)
            if config_dir else initialize_config_module(CONFIG_MODULE, version_base=None))
    try:
        with init:
            cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
            choices = {k: v for k, v in OmegaConf.to_container(cfg.hydra.runtime.choices).items()
                       if v is not None and not k.startswith("hydra")}
            with open_dict(cfg):
                del cfg["hydra"]  # Hydra's own node: choices read, the rest is not ours to resolve
            data = OmegaConf.to_container(cfg, resolve=True)
    except MissingConfigException as err:
        raise ConfigError(_missing_option(err) or _one_line(err)) from None
    except UnicodeDecodeError as err:  # before ValueError: name the file, which the codec cannot
        raise ConfigError(_undecodable(config_dir) or _one_line(err)) from None
    except yaml.YAMLError as err:  # a user's YAML (REXMOE_CONFIG_DIR): duplicate key, bad syntax
        raise ConfigError(_yaml_line(err)) from None
    except OSError as err:  # an unreadable file in the config dir
        raise ConfigError(f"config error: cannot read {err.filename or config_dir}: {err.strerror or err}") from None
    except (HydraException, OmegaConfBaseException, ValueError) as err:
        raise ConfigError(_one_line(err)) from None
    finally:
        GlobalHydra.instance().clear()
    return data, choices


def compose_experiment(overrides: Sequence[str] = (), config_dir: Optional[str] = None) -> ComposedConfig:
    """Compose ``config.yaml`` + overrides into a typed ExperimentConfig (call ``.validate()`` for
    the value checks). Every problem is a one-line ConfigError."""
    config_dir = config_dir or os.environ.get(CONFIG_ENV)
    data, choices = _compose(overrides, config_dir)
    experiment = experiment_from_dict(data)
    if experiment.run.dir is None:
        model = choices.get("model", "model")
        # Hydra's own overrides (hydra.searchpath: a model config from elsewhere) apply to the base too
        hydra = [o for o in overrides if o.lstrip("+~").startswith("hydra.")]
        base, _ = _compose([*hydra, f"model={model}"], config_dir)
        experiment.run.dir = data["run"]["dir"] = run_dir_default(model, experiment, data, base)
    return ComposedConfig(experiment, data, choices, list(overrides))
