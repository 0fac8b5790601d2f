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
        raise ConfigError(msg if path and msg.startswith(path + ".") else f"{where}: {msg}") from None


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


def field_help(cls: type) -> dict[str, str]:
    """Help string of every field, nested fields with dotted names (for `orchestrate describe`)."""
    out: dict[str, str] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _strip_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            out.update({f"{f.name}.{k}": v for k, v in field_help(tp).items()})
        else:
            out[f.name] = f.metadata.get("help", "")
    return out


def check(cond: bool, field: str, value: Any, expected: str) -> None:
    """Raise ConfigError('field=value: expected') unless cond."""
    if not cond:
        raise ConfigError(f"{field}={value!r}: {expected}")


def check_choice(field: str, value: Any, tp: Any) -> None:
    choices = get_args(tp)
    check(value in choices, field, value, f"must be one of {', '.join(map(repr, choices))}")
