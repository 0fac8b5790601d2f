"""Config dataclasses: plain data, strict when built from dicts, round-trip through `to_dict`.

Every method's config derives from `MethodConfig`. Nested configs (e.g. `LoraGaConfig.lora`) are
themselves dataclasses; `from_dict` builds them recursively and rejects unknown keys with the dotted
path of the offending key, so that a typo in a sweep file never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, ClassVar, get_args, get_origin


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the dotted key path."""


def _strip_optional(tp: Any) -> Any:
    args = [a for a in get_args(tp) if a is not type(None)]
    if get_origin(tp) in (typing.Union, getattr(__import__("types"), "UnionType", None)) and len(args) == 1:
        return args[0]
    return tp


def from_dict(cls: type, data: Any, path: str = ""):
    """Build dataclass `cls` from a mapping, recursing into nested dataclass fields."""
    where = path or cls.__name__
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of {cls.__name__} fields, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{path}." if path else ""
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key for {cls.__name__} (valid keys: {', '.join(sorted(fields))})"
        )
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        tp = _strip_optional(hints[key])
        sub = f"{path}.{key}" if path else key
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            value = from_dict(tp, value, sub)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{path}.{e}" if path else str(e)) from None
    except (TypeError, ValueError) as e:
        msg = str(e)
        raise ConfigError(msg if path and msg.startswith((path + ".", path + ":")) else f"{where}: {msg}") from None


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """Base of every method's config. `method` is the registry name (class-level, not a field)."""

    method: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: str = ""):
        return from_dict(cls, data, path)

    @classmethod
    def field_help(cls) -> dict[str, str]:
        return field_help(cls)


def leaf_fields(cls: type, prefix: str = ""):
    """(dotted name, field) of every non-config field, nested config fields walked into (also
    one whose own default is None, as MT-Bench's judge)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _strip_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            yield from leaf_fields(tp, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


def field_help(cls: type) -> dict[str, str]:
    """Help string of every field, nested fields with dotted names (for `orchestrate describe`)."""
    return {name: f.metadata.get("help", "") for name, f in leaf_fields(cls)}


def field_defaults(cls: type) -> dict[str, Any]:
    """Declared default of every field, nested fields with dotted names; a nested config whose own
    default is None (MT-Bench's judge) lists what its fields default to once it is given."""
    return {name: f.default_factory() if f.default_factory is not dataclasses.MISSING
            else None if f.default is dataclasses.MISSING else f.default for name, f in leaf_fields(cls)}


# Each field declares, beside its `help`, the name it is logged under (`param`, default: the field's
# own name, whatever config it is nested in, so that LoRA's rank is `rank` in LoRA, LoRA-GA and the
# hybrid) and its short name in trial names (`short`, default: the field's name).


def flat_params(config: Any) -> dict[str, Any]:
    """A config's leaves under their declared names (`param`). A name that two different leaves
    claim keeps its dotted path for the later one; a None leaf whose name is already taken
    is left out (the hybrid's inner target_modules when its own is set)."""
    out: dict[str, Any] = {}

    def walk(obj: Any, path: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                walk(value, f"{path}{f.name}.")
                continue
            name = f.metadata.get("param", f.name)
            if name in out and value is None:
                continue
            out[name if name not in out or out[name] in (None, value) else f"{path}{f.name}"] = value

    walk(config, "")
    return out


def short_name(cls: type, path: str) -> str:
    """The short name (trial names) of the field at dotted `path` in config class `cls`; the last
    component of the path where no field declares one (or the path leaves the class)."""
    tp: Any = cls
    field = None
    for part in path.split("."):
        fields = {f.name: f for f in dataclasses.fields(tp)} if dataclasses.is_dataclass(tp) else {}
        if part not in fields:
            return path.split(".")[-1]
        field = fields[part]
        tp = _strip_optional(typing.get_type_hints(tp)[part])
    return field.metadata.get("short", field.name)


def check(cond: bool, field: str, value: Any, expected: str) -> None:
    """Raise ConfigError('field=value: expected') unless cond."""
    if not cond:
        raise ConfigError(f"{field}={value!r}: {expected}")


def check_choice(field: str, value: Any, tp: Any) -> None:
    choices = get_args(tp)
    check(value in choices, field, value, f"must be one of {', '.join(map(repr, choices))}")
