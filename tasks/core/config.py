"""The config of record: every option of every job is declared once, here-shaped.

Each job's config is a frozen dataclass deriving from :class:`Config`; each option is one field declared
with :func:`option` -- its type (the annotation), default, bounds and help text are written nowhere else.
Everything a user touches derives from that declaration:

* the command line: :func:`add_options` builds the argparse options (``--max-seq-len``, choices from a
  ``Literal``, booleans as ``--x/--no-x``, comma lists, old flag names as aliases) and
  :meth:`Config.from_args` reads them back;
* the Prefect flow's typed parameters (the UI's run form, ``prefect.yaml``): :func:`signature`;
* validation: types, bounds and choices in ``__post_init__``, then :meth:`Config.check` for rules between
  fields; a :class:`ConfigError` names ``Class.field`` and what is allowed;
* ``to_dict`` / ``from_dict`` (the ``config.json`` saved beside every output) and :meth:`Config.fingerprint`
  over canonical JSON (ints given for floats are stored as floats, lists as tuples, so ``lr=1`` and
  ``lr=1.0`` are the same config).

No heavy imports here: ``distilflow COMMAND --help`` imports only config modules.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import inspect
import json
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, Self

from distilflow.tasks.core.errors import ConfigError

__all__ = ["CommandSpec", "Config", "ConfigError", "add_options", "docstring_args", "flag_of", "option", "require",
           "signature"]

_MISSING = dataclasses.MISSING


def option(default: Any = _MISSING, help: str = "", *, flag: str | None = None,
           aliases: Sequence[str] = (), false_flags: Sequence[str] = (), ge: float | None = None,
           gt: float | None = None, le: float | None = None, lt: float | None = None, metavar: str | None = None,
           sep: str | None = None, nargs: str | None = None, cli: bool = True, positional: bool = False,
           affects_output: bool = True, factory: Callable[[], Any] | None = None, const: Any = None,
           repeat: bool = False, omit_default: bool = False) -> Any:
    """One option: ``lr: float = option(1e-4, "peak learning rate", gt=0)``.

    ``flag``: the command-line name (default ``--field-name``); ``aliases``: older names that still work;
    ``false_flags``: extra flags that set a bool to False (``--uncased``). ``ge/gt/le/lt``: bounds checked
    on construction. ``sep=","``: a list given as one comma-separated argument; ``nargs="+"``: as several
    arguments. ``cli=False``: not on the command line (derived or record-only fields).
    ``affects_output=False``: a run-time knob (workers, logging, resume) that never changes the results.
    ``const``: the value of a flag given without one (``--deploy`` alone = ``--deploy prefect.yaml``).
    ``repeat=True``: a list given by repeating the flag (``--bias-template A --bias-template B``); given
    once it replaces the default, not given the default stays.
    ``omit_default=True``: an option added after outputs were made with its class; left out of
    :meth:`Config.to_dict` (saved configs, fingerprints) while it has its default, so those outputs stay valid.
    """
    meta = {"help": help, "flag": flag, "aliases": tuple(aliases), "false_flags": tuple(false_flags),
            "ge": ge, "gt": gt, "le": le, "lt": lt, "metavar": metavar, "sep": sep, "nargs": nargs,
            "cli": cli, "positional": positional, "affects_output": affects_output, "const": const,
            "repeat": repeat, "omit_default": omit_default}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def require(cond: bool, cls_name: str, field: str, message: str) -> None:
    """``require(x > 0, "MaskConfig", "mlm_prob", "must be in (0, 1)")`` -> ConfigError if false."""
    if not cond:
        raise ConfigError(f"{cls_name}.{field}: {message}")


@dataclasses.dataclass(frozen=True)
class Config:
    """Base class: subclasses are frozen dataclasses and override :meth:`check` to add rules."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = _canonical(_one_or_many(getattr(self, f.name), hints[f.name], f.metadata.get("sep")),
                               hints[f.name])
            object.__setattr__(self, f.name, value)
            if not _isinstance(value, hints[f.name]):
                raise ConfigError(f"{type(self).__name__}.{f.name}: expected {_type_name(hints[f.name])}, "
                                  f"got {type(value).__name__} {value!r}")
            _check_bounds(type(self).__name__, f, value)
        self.check()

    def check(self) -> None:
        """Raise ConfigError for values that are the right type but not allowed together."""

    # -- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if not (f.metadata.get("omit_default") and getattr(self, f.name) == f.default)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; allowed: {sorted(names)}")
        return cls(**data)

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)

    def fingerprint(self, exclude: tuple[str, ...] = ()) -> str:
        """sha256 of the canonical JSON of the fields (minus ``exclude``), first 16 hex digits."""
        d = {k: v for k, v in self.to_dict().items() if k not in exclude}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def run_only_fields(cls) -> tuple[str, ...]:
        """Fields declared ``affects_output=False`` (left out of output fingerprints)."""
        return tuple(f.name for f in dataclasses.fields(cls) if not f.metadata.get("affects_output", True))

    # -- command line -----------------------------------------------------------------------------
    @classmethod
    def from_args(cls, args: argparse.Namespace, **fixed: Any) -> Self:
        """The config from parsed arguments of :func:`add_options` (plus ``fixed`` fields)."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
                  if f.metadata.get("cli", True) and hasattr(args, f.name)}
        return cls(**{**values, **fixed})


# -- command line ------------------------------------------------------------------------------------
def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_options(parser: argparse.ArgumentParser, cls: type[Config], defaults: dict[str, Any] | None = None,
                skip: Sequence[str] = ()) -> None:
    """Add one argparse option per CLI field of ``cls`` (``defaults`` overrides a field's default)."""
    hints = _hints(cls)
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", True) or f.name in skip:
            continue
        tp = hints[f.name]
        default = defaults.get(f.name, _default_of(f))
        required = default is _MISSING
        kw: dict[str, Any] = {"help": _help(meta.get("help", ""), default, tp, meta)}
        if meta.get("metavar"):
            kw["metavar"] = meta["metavar"]
        base, optional = _strip_optional(tp)
        if base is bool:
            names = [flag_of(f), *meta["aliases"]]
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=False if required else default, **kw)
            for false_flag in meta["false_flags"]:
                parser.add_argument(false_flag, dest=f.name, action="store_false",
                                    help=f"same as --no-{flag_of(f).removeprefix('--')}")
            continue
        if _is_sequence(base):
            inner = typing.get_args(base)[0]
            if meta.get("sep"):
                kw["type"] = _split_type(meta["sep"], _scalar(inner))
            elif meta.get("repeat"):
                kw["action"], kw["type"] = "append", _scalar(inner)
            else:
                kw["nargs"] = meta.get("nargs") or "+"
                kw["type"] = _scalar(inner)
        elif typing.get_origin(base) is typing.Literal:
            kw["choices"] = list(typing.get_args(base))
        else:
            kw["type"] = _scalar(base)
        if meta.get("const") is not None and not _is_sequence(base):  # the flag alone means ``const``
            kw["nargs"], kw["const"] = "?", meta["const"]
        if meta.get("positional"):
            parser.add_argument(f.name, **kw)
            continue
        if required:
            kw["required"] = True
        elif meta.get("repeat"):  # argparse would append to the default; not given = the field's default
            kw["default"] = argparse.SUPPRESS
        else:
            kw["default"] = default
        parser.add_argument(flag_of(f), *meta["aliases"], dest=f.name, **kw)


def _help(text: str, default: Any, tp: Any, meta: Any) -> str:
    if default is _MISSING or default in ("", (), None) or isinstance(default, bool):
        return text or " "
    shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
    return f"{text} (default: {shown})".replace("%", "%%")


def _split_type(sep: str, convert: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    def parse(text: str) -> tuple[Any, ...]:
        return tuple(convert(x.strip()) for x in text.split(sep) if x.strip())

    parse.__name__ = f"{getattr(convert, '__name__', 'value')} list"
    return parse


def _scalar(tp: Any) -> Callable[[str], Any]:
    if typing.get_origin(tp) is typing.Literal:
        return str
    return tp if tp in (int, float, str) else str


# -- flow parameters ---------------------------------------------------------------------------------
def signature(cls: type[Config], skip: Sequence[str] = (),
              defaults: dict[str, Any] | None = None) -> inspect.Signature:
    """The fields of ``cls`` as a keyword signature with JSON-friendly annotations (tuples as lists):
    what Prefect turns into the flow's parameter schema (the UI's run form)."""
    hints = _hints(cls)
    defaults = defaults or {}
    params = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = defaults.get(f.name, _default_of(f))
        params.append(inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY,
            default=inspect.Parameter.empty if default is _MISSING else _plain(default),
            annotation=_json_type(hints[f.name])))
    return inspect.Signature(params)


def docstring_args(cls: type[Config], skip: Sequence[str] = ()) -> str:
    """A Google-style ``Args:`` section from the help texts (Prefect shows it beside each parameter)."""
    lines = ["Args:"]
    for f in dataclasses.fields(cls):
        if f.name not in skip:
            lines.append(f"    {f.name}: {f.metadata.get('help') or f.name}")
    return "\n".join(lines)


def _json_type(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = tuple(_json_type(a) for a in typing.get_args(tp))
        return typing.Union[args]  # noqa: UP007 - built from a tuple
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return list[_json_type(args[0])]  # type: ignore[misc]
        return list[Any]
    return tp


# -- helpers -----------------------------------------------------------------------------------------
_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not _MISSING:
        return f.default
    if f.default_factory is not _MISSING:
        return f.default_factory()
    return _MISSING


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
        if _one_or_many_type(tp):  # ``str | tuple[str, ...]``: the command line gives the list form
            return next(a for a in args if _is_sequence(a)), False
    return tp, False


def _one_or_many_type(tp: Any) -> bool:
    """``str | tuple[str, ...]``: a list field that flow callers and event triggers may also give as one
    string (a deployment trigger's ``"{{ event.payload.path }}"``)."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else ()
    return len(args) == 2 and str in args and any(_is_sequence(a) and typing.get_args(a)[0] is str for a in args)


def _one_or_many(value: Any, tp: Any, sep: str | None) -> Any:
    """One string for a ``str | tuple[str, ...]`` field -> a tuple (split on the option's ``sep``), so
    ``"a,b"`` and ``["a", "b"]`` are the same config."""
    if not isinstance(value, str) or not _one_or_many_type(tp):
        return value
    return tuple(x.strip() for x in value.split(sep) if x.strip()) if sep else (value,)


def _is_sequence(tp: Any) -> bool:
    return typing.get_origin(tp) in (tuple, list) and len(typing.get_args(tp)) >= 1 and (
        typing.get_origin(tp) is list or typing.get_args(tp)[-1] is Ellipsis)


def _check_bounds(cls_name: str, f: dataclasses.Field, value: Any) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    m = f.metadata
    for key, ok, word in (("ge", lambda b: value >= b, ">="), ("gt", lambda b: value > b, ">"),
                          ("le", lambda b: value <= b, "<="), ("lt", lambda b: value < b, "<")):
        bound = m.get(key)
        if bound is not None and not ok(bound):
            raise ConfigError(f"{cls_name}.{f.name}: must be {word} {bound}, got {value!r}")


def _plain(v: Any) -> Any:
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _canonical(value: Any, tp: Any) -> Any:
    """JSON and Python callers give lists where the config has tuples and ints where it has floats; store
    one form so equal configs compare and fingerprint equal."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            c = _canonical(value, a)
            if _isinstance(c, a):
                return c
        return value
    if origin is tuple and isinstance(value, list | tuple):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_canonical(x, args[0]) for x in value)
        if len(args) == len(value):
            return tuple(_canonical(x, a) for x, a in zip(value, args, strict=True))
        return tuple(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


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


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


# -- commands ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CommandSpec:
    """A ``distilflow`` sub-command: its config of record and the function that runs it.

    ``run`` is ``"module:function"`` (imported only when the command runs, so ``--help`` stays fast);
    it is called with the validated config and returns the exit code. ``defaults`` changes a field's
    default for this command (``distill``'s learning rate), ``fixed`` sets fields that are not options
    of this command (``mode="distill"``), ``skip`` hides fields that do not apply to it.
    """

    config: type[Config]
    run: str
    description: str = ""
    defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    fixed: dict[str, Any] = dataclasses.field(default_factory=dict)
    skip: tuple[str, ...] = ()

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        add_options(parser, self.config, self.defaults, skip=(*self.skip, *self.fixed))

    def config_from(self, args: argparse.Namespace) -> Config:
        return self.config.from_args(args, **self.fixed)

    def runner(self) -> Callable[[Config], int]:
        import importlib

        module, _, name = self.run.partition(":")
        return getattr(importlib.import_module(module), name)
