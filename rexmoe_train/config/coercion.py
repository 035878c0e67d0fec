"""Plain dicts (the composed Hydra config, a checkpoint's config.yaml) -> the typed dataclasses,
with field-named one-line errors for a value of the wrong type."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

from rexmoe_train.config.fields import INT64_MAX, _fail
from rexmoe_train.core.errors import ConfigError


# --------------------------------------------------------------------------------------------------
# dict -> dataclasses, with type checks that name the field
# --------------------------------------------------------------------------------------------------
def _coerce(path: str, value: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(path, value, options[0])
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            _fail(path, value, f"must be a mapping of {annotation.__name__} fields")
        return from_dict(annotation, value, path)
    if annotation is bool:
        if not isinstance(value, bool):
            _fail(path, value, "must be true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(path, value, "must be an integer")
        if not -INT64_MAX - 1 <= value <= INT64_MAX:  # torch, numpy and megatron count in int64
            _fail(path, value, f"must fit in a 64-bit integer (at most {INT64_MAX})")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(path, value, "must be a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            _fail(path, value, "must be a string")
        return value
    return value


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass ``cls`` from a plain dict; unknown keys and wrong types are ConfigErrors."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{path}.{key}" if path else key
            raise ConfigError(
                f"config error: unknown field {where!r}; allowed: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        kwargs[key] = _coerce(where, value, hints[key])
    return cls(**kwargs)
