"""The flags several commands share: --recipe/--set, and comma-separated numbers."""

import argparse

import pytest

from megabatch import flags
from megabatch.errors import UserError


def test_numbers_reads_each_part_with_its_kind_and_skips_blank_parts():
    assert flags.numbers("1, 8,64,", "--x", int, "1,8") == [1, 8, 64]
    values = flags.numbers("0,2.5, 10", "--x", float, "0,5")
    assert values == [0.0, 2.5, 10.0] and all(type(v) is float for v in values)


@pytest.mark.parametrize("text, kind, least, message", [
    ("1,x", int, None, "--x '1,x' must be comma-separated whole numbers, e.g. 1,8"),
    ("1.5", int, None, "--x '1.5' must be comma-separated whole numbers"),
    (" , ", int, None, "--x ' , ' must be comma-separated whole numbers"),
    ("", float, None, "--x '' must be comma-separated numbers, e.g. 1,8"),
    ("4,0", int, 1, "--x '4,0' must be comma-separated whole numbers of at least 1, e.g. 1,8"),
    ("-0.5", float, 0, "--x '-0.5' must be comma-separated numbers of at least 0"),
])
def test_anything_else_is_a_one_line_error_with_an_example(text, kind, least, message):
    with pytest.raises(UserError) as raised:
        flags.numbers(text, "--x", kind, "1,8", least=least)
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_the_least_value_itself_is_allowed():
    assert flags.numbers("1,1", "--x", int, "1", least=1) == [1, 1]


def test_add_recipe_gives_the_recipe_and_its_repeatable_overrides():
    parser = argparse.ArgumentParser()
    flags.add_recipe(parser)
    args = parser.parse_args(["--recipe", "r", "--set", "a.b=1", "--set", "c.d=2"])
    assert (args.recipe, args.set) == ("r", ["a.b=1", "c.d=2"])
    assert parser.parse_args(["--recipe", "r"]).set == []
    with pytest.raises(SystemExit):
        parser.parse_args([])  # required unless said otherwise
    optional = argparse.ArgumentParser()
    flags.add_recipe(optional, required=False)
    assert optional.parse_args([]).recipe is None
