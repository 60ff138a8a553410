"""Typed tables: a dataclass filled from a TOML table, each key checked against its type.

Recipes (:mod:`megabatch.recipe`) and study specs (:mod:`megabatch.study.spec`) are
dataclasses whose annotations carry what a value may be: its Python type, its choices
(``Literal``) and its range (``Annotated[int, AtLeast(1)]``). :func:`build` reads a
table into one, and an unknown key, a missing required key, a value of the wrong type,
outside its choices or its range is a one-line :class:`~megabatch.errors.UserError`
that names the key. Fields the loader fills itself (a recipe's name) are
:func:`derived` and are not keys of the file.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from megabatch.errors import UserError


@dataclass(frozen=True)
class Range:
    """The valid interval of a numeric key, written in its type:
    ``Annotated[float, Range(0, 1, high_open=True)]`` is [0, 1)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def holds(self, value: float) -> bool:  # False for NaN
        return ((self.low is None or (value > self.low if self.low_open else value >= self.low))
                and (self.high is None or (value < self.high if self.high_open else value <= self.high)))

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


def AtLeast(low: float) -> Range:  # noqa: N802 (reads as a type)
    return Range(low)


def Above(low: float) -> Range:  # noqa: N802
    return Range(low, low_open=True)


Count = Annotated[int, AtLeast(0)]
Positive = Annotated[int, AtLeast(1)]
NonNegative = Annotated[float, AtLeast(0.0)]
PositiveFloat = Annotated[float, Above(0.0)]
Fraction = Annotated[float, Range(0.0, 1.0, high_open=True)]


def derived(default: Any) -> Any:
    """A field its loader fills (a name, a value computed from other files): not a key."""
    return dataclasses.field(default=default, metadata={"derived": True})


def keys(cls: type) -> list[str]:
    """The keys a table of ``cls`` may hold."""
    return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("derived")]


def build(cls: type, table: dict[str, Any], what: str, prefix: str = "", handled: tuple[str, ...] = ()) -> Any:
    """``cls`` from ``table``, every key checked; a key that is itself a dataclass is read
    from its own sub-table. ``what`` ("recipe", "study spec") and ``prefix`` (the
    table's path, "optimizer.") name the key in errors; ``handled`` are further keys
    the caller reads itself (listed as known, not passed here)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    names = keys(cls)
    values = {}
    for key, value in table.items():
        path = f"{prefix}{key}"
        if key not in names:
            where = f" in [{prefix[:-1]}]" if prefix else ""
            raise UserError(f"unknown {what} key {path}; known keys{where}: {', '.join(names + list(handled))}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            if not isinstance(value, dict):
                raise UserError(f"{what} key {path} must be a table [{path}], got {value!r}")
            values[key] = build(kind, value, what, f"{path}.")
        else:
            values[key] = coerce(value, kind, path, what)
    required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING and f.name not in values]
    if required:
        table_name = f"table [{prefix[:-1]}]" if prefix else "file"
        raise UserError(f"{what} {table_name} needs {required[0]} = ...")
    return cls(**values)


def coerce(value: Any, kind: Any, key: str, what: str) -> Any:
    """``value`` checked against the annotation ``kind`` (its choices and range too);
    ints are accepted as floats, TOML's lists as tuples."""
    origin = typing.get_origin(kind)
    if origin is Annotated:
        base, *rules = typing.get_args(kind)
        value = coerce(value, base, key, what)
        for rule in rules:
            if isinstance(rule, Range) and not rule.holds(value):
                raise UserError(f"{what} key {key} must be {rule}, got {value!r}")
        return value
    if origin is Literal:
        allowed = typing.get_args(kind)
        if value not in allowed:
            raise UserError(f"{what} key {key} = {value!r} is not one of {', '.join(allowed)}")
        return value
    if origin in (list, tuple):
        item = typing.get_args(kind)[0]  # list[item] or tuple[item, ...]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{what} key {key} must be a list, got {value!r}")
        return origin(coerce(v, item, f"{key}[{i}]", what) for i, v in enumerate(value))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, bool) or not isinstance(value, kind):
        raise UserError(f"{what} key {key} must be {kind.__name__}, got {value!r}")
    return value
