"""TOML files that are either built in (a name, shipped in a package folder) or a path:
recipes (``megabatch/recipes``) and study specs (``megabatch/specs``) load the same way."""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from megabatch.errors import UserError


def builtin_names(folder: str) -> list[str]:
    """Names of the ``.toml`` files shipped in ``megabatch/<folder>``."""
    return sorted(p.name[:-5] for p in (resources.files("megabatch") / folder).iterdir()
                  if p.name.endswith(".toml"))


def parse(text: str, origin: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{origin} is not valid TOML: {e}") from None


def read(name_or_path: str, folder: str, what: str, hint: str = "") -> dict[str, Any]:
    """The tables of a built-in ``name`` from ``megabatch/<folder>``, or of a file (a name
    ending in .toml or holding a /); ``what`` ("recipe", "study spec") names it in errors."""
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise UserError(f"{what} file {path} does not exist")
        return parse(path.read_text(), str(path))
    if name_or_path in builtin_names(folder):
        text = (resources.files("megabatch") / folder / f"{name_or_path}.toml").read_text()
        return parse(text, f"built-in {what} {name_or_path}")
    raise UserError(f"unknown {what} {name_or_path!r}: choose one of {', '.join(builtin_names(folder))}"
                    f"{hint} or give a .toml file")


def value(v: Any) -> str:
    """A TOML value: booleans, numbers, strings and lists of them."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return "[" + ", ".join(value(x) for x in v) + "]"
