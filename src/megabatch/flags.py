"""Command-line flags that more than one command has: the recipe a command works on
(``--recipe`` and its ``--set`` overrides), and lists of numbers written ``1,8,64``."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

from megabatch.errors import UserError

Number = TypeVar("Number", int, float)


def add_recipe(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """``--recipe NAME_OR_FILE`` and the repeatable ``--set KEY=VALUE``, as
    :func:`megabatch.recipe.load` takes them."""
    parser.add_argument("--recipe", required=required, help="built-in recipe name or a .toml file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe value, e.g. --set batch.global_batch=4096 (repeatable)")


def numbers(text: str, flag: str, kind: Callable[[str], Number], example: str,
            least: Number | None = None) -> list[Number]:
    """``--flag`` written as comma-separated numbers (blank parts skipped), each read with
    ``kind`` and at least ``least``; anything else, or no number at all, is a one-line error
    that shows ``example``."""
    words = "whole numbers" if kind is int else "numbers"
    if least is not None:
        words = f"{words} of at least {least}"
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or (least is not None and min(values) < least):
        raise UserError(f"{flag} {text!r} must be comma-separated {words}, e.g. {example}")
    return values
