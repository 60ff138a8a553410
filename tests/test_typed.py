"""Typed tables: every key of a TOML table checked against its dataclass field's type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from megabatch.errors import UserError
from megabatch.typed import Count, Fraction, Positive, PositiveFloat, Range, build, derived, keys


@dataclass
class Inner:
    rate: PositiveFloat = 1.0


@dataclass
class Outer:
    arch: Literal["a", "b"]
    name: str = derived("")
    steps: Positive = 1
    seeds: tuple[Count, ...] = ()
    factors: list[Fraction] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)


def test_a_table_becomes_its_dataclass_with_lists_as_tuples_and_ints_as_floats():
    got = build(Outer, {"arch": "b", "steps": 3, "seeds": [0, 2], "factors": [0, 0.5], "inner": {"rate": 2}}, "spec")
    assert got == Outer(arch="b", steps=3, seeds=(0, 2), factors=[0.0, 0.5], inner=Inner(2.0))
    assert isinstance(got.inner.rate, float) and isinstance(got.factors[0], float)
    assert keys(Outer) == ["arch", "steps", "seeds", "factors", "inner"]  # a derived field is no key


@pytest.mark.parametrize("table, message", [
    ({"arch": "c"}, "spec key arch = 'c' is not one of a, b"),
    ({"arch": "a", "steps": 0}, "spec key steps must be >= 1, got 0"),
    ({"arch": "a", "steps": True}, "spec key steps must be int, got True"),
    ({"arch": "a", "steps": 1.5}, "spec key steps must be int, got 1.5"),
    ({"arch": "a", "seeds": [1, -1]}, r"spec key seeds\[1\] must be >= 0, got -1"),
    ({"arch": "a", "seeds": 3}, "spec key seeds must be a list, got 3"),
    ({"arch": "a", "factors": [1.0]}, r"spec key factors\[0\] must be in \[0, 1\), got 1.0"),
    ({"arch": "a", "inner": {"rate": 0}}, "spec key inner.rate must be > 0, got 0"),
    ({"arch": "a", "inner": {"rate": float("nan")}}, "spec key inner.rate must be > 0, got nan"),
    ({"arch": "a", "inner": 3}, r"spec key inner must be a table \[inner\], got 3"),
    ({"arch": "a", "inner": {"rat": 1}}, r"unknown spec key inner.rat; known keys in \[inner\]: rate$"),
    ({"arch": "a", "name": "x"}, "unknown spec key name; known keys: arch, steps, seeds, factors, inner, extra$"),
    ({"steps": 2}, r"spec file needs arch = \.\.\.$"),
])
def test_each_bad_key_is_a_one_line_error_naming_it(table, message):
    with pytest.raises(UserError, match=message) as raised:
        build(Outer, table, "spec", handled=("extra",))
    assert "\n" not in str(raised.value)


def test_a_required_key_of_a_sub_table_is_named_with_its_table():
    @dataclass
    class Needs:
        recipe: str

    with pytest.raises(UserError, match=r"^spec table \[methods.x\] needs recipe = \.\.\.$"):
        build(Needs, {}, "spec", "methods.x.")


def test_ranges_print_as_written_and_reject_nan():
    assert str(Range(0.0, 1.0, high_open=True)) == "in [0, 1)" and str(Range(2, low_open=True)) == "> 2"
    assert Range(0.0, 1.0).holds(1.0) and not Range(0.0, 1.0, high_open=True).holds(1.0)
    assert not Range(0.0).holds(float("nan"))
