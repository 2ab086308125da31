"""Typed, validated config dataclasses shared by every job.

Each job's config is a frozen dataclass that inherits :class:`Config`. ``validate`` raises
:class:`ConfigError` naming the offending field, ``to_dict``/``from_dict`` round-trip through JSON
(the dict is saved next to every output and into checkpoints), and ``fingerprint`` is the stable
hash used to refuse resuming an output folder that was written with a different config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from typing import Any, Self


class ConfigError(ValueError):
    """A config field has a bad value. The message names the field and what is allowed."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Base class: subclasses are frozen dataclasses and override :meth:`check` to add rules."""

    def __post_init__(self) -> None:
        self._check_types()
        self.check()

    # -- rules -----------------------------------------------------------------------------------
    def check(self) -> None:  # pragma: no cover - overridden
        """Raise ConfigError for values that are the right type but not allowed."""

    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _isinstance(value, hints[f.name]):
                raise ConfigError(
                    f"{type(self).__name__}.{f.name}: expected {_type_name(hints[f.name])}, "
                    f"got {type(value).__name__} {value!r}"
                )

    # -- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; allowed: {sorted(names)}")
        hints = typing.get_type_hints(cls)
        kwargs = {k: _coerce(v, hints[k]) for k, v in data.items()}
        return cls(**kwargs)

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)

    def fingerprint(self, exclude: tuple[str, ...] = ()) -> str:
        """sha256 of the canonical JSON of the fields (minus ``exclude``), first 16 hex digits."""
        d = {k: v for k, v in self.to_dict().items() if k not in exclude}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def require(cond: bool, cls_name: str, field: str, message: str) -> None:
    """``require(x > 0, "MaskConfig", "mlm_prob", "must be in (0, 1)")`` -> ConfigError if false."""
    if not cond:
        raise ConfigError(f"{cls_name}.{field}: {message}")


# -- helpers ---------------------------------------------------------------------------------------
def _plain(v: Any) -> Any:
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _isinstance(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_isinstance(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, tuple):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_isinstance(x, args[0]) for x in value)
        return len(args) == len(value) and all(_isinstance(x, a) for x, a in zip(value, args, strict=True))
    if origin is dict:
        return isinstance(value, dict)
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin is not None:
        return isinstance(value, origin)
    return isinstance(value, tp)


def _coerce(value: Any, tp: Any) -> Any:
    """JSON gives lists where the dataclass wants tuples, ints where it wants floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            c = _coerce(value, a)
            if _isinstance(c, a):
                return c
        return value
    if origin is tuple and isinstance(value, list):
        args = typing.get_args(tp)
        inner = args[0] if len(args) == 2 and args[1] is Ellipsis else Any
        return tuple(_coerce(x, inner) for x in value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
