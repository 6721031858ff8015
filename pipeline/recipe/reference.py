"""The recipe reference in Markdown, generated from the recipe dataclasses (recipe/spec.py).

Invariant: the key tables of docs/recipe.md, between BEGIN and END below, are exactly
`reference_markdown()`: one table per mapping of the recipe (the top level, `model`,
`stages[]`, `stages[].sources[]`, ...), in the order a recipe is written, with each key's type,
bounds, default and its `help=` text. `strata schema --markdown --out docs/recipe.md` rewrites
them; tests/test_docs.py fails while the page is stale. The walk is the JSON Schema's
(typed_yaml.dataclass_schema): the same dataclasses, the same YAML keys, so the page, the schema
and the loader cannot disagree.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import types
import typing
from dataclasses import MISSING
from typing import Any, Literal, Union

from pipeline.errors import StrataError
from pipeline.recipe.spec import Recipe
from pipeline.recipe.typed_yaml import BOUNDS, config_fields, passthrough_field, yaml_key

BEGIN = "<!-- BEGIN recipe keys: generated from pipeline/recipe/spec.py by `strata schema --markdown --out docs/recipe.md` -->"
END = "<!-- END recipe keys -->"


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass a field holds (directly, optionally or as list items), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        found = _dataclass_in(arg)
        if found is not None:
            return found
    return None


def _type_text(tp: Any, sections: dict[type, str]) -> str:
    """The type as a recipe writer reads it: `integer`, `list of string`, `` `a` \\| `b` ``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_text(a, sections) for a in args)
    if dataclasses.is_dataclass(tp):
        return f"mapping (`{sections[tp]}`)"
    if origin is list:
        item = typing.get_args(tp)[0]
        if dataclasses.is_dataclass(item):
            return f"list of mappings (`{sections[item]}`)"
        return "list of " + _type_text(item, sections)
    if origin is dict or tp is dict:
        return "mapping"
    if origin is Literal:
        return " \\| ".join(f"`{c}`" for c in typing.get_args(tp))
    names = {int: "integer", float: "number", str: "string", bool: "true / false", dt.date: "date (YYYY-MM-DD)"}
    return names.get(tp, "any")


def _yaml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _default_text(f: dataclasses.Field) -> str:
    if f.default is MISSING and f.default_factory is MISSING:
        return "**required**"
    value = f.default if f.default is not MISSING else f.default_factory()
    if value is None:
        return "none"
    if dataclasses.is_dataclass(value):
        return "see its keys"
    if isinstance(value, list):
        return "`[" + ", ".join(_yaml_value(v) for v in value) + "]`"
    if isinstance(value, dict):
        return "`{}`"
    return f"`{_yaml_value(value)}`"


def _markdown_cell(text: str) -> str:
    """`text` safe in a table cell: `|` escaped; outside code spans `*` (globs are not emphasis)
    and `<` (`data/<name>` is not an HTML tag)."""
    pieces = text.replace("|", "\\|").split("`")
    return "`".join(p if i % 2 else p.replace("*", "\\*").replace("<", "&lt;") for i, p in enumerate(pieces))


def _row(f: dataclasses.Field, tp: Any, sections: dict[type, str]) -> str:
    kind = _type_text(tp, sections)
    bounds = [f"{word} {_yaml_value(f.metadata[b])}" for b, (_, word, _) in BOUNDS.items() if f.metadata.get(b) is not None]
    if bounds:
        kind += ", " + ", ".join(bounds)
    meaning = _markdown_cell(" ".join(f.metadata.get("help", "").split()))
    return f"| `{yaml_key(f)}` | {kind} | {_default_text(f)} | {meaning} |"


def _sections(cls: type, path: str, out: dict[type, str]) -> None:
    """Each dataclass's key path, the first place it appears, in the order a recipe is written."""
    out[cls] = path
    hints = typing.get_type_hints(cls)
    for f in config_fields(cls):
        inner = _dataclass_in(hints[f.name])
        if inner is not None and inner not in out:
            many = typing.get_origin(hints[f.name]) is list or any(
                typing.get_origin(a) is list for a in typing.get_args(hints[f.name]))
            _sections(inner, f"{path}.{yaml_key(f)}{'[]' if many else ''}".lstrip("."), out)


def reference_markdown() -> str:
    """The key tables of the recipe reference, one per mapping of the recipe."""
    sections: dict[type, str] = {}
    _sections(Recipe, "", sections)
    parts = []
    for cls, path in sections.items():
        hints = typing.get_type_hints(cls)
        title = f"### `{path}`" if path else "### Top level"
        rows = [_row(f, hints[f.name], sections) for f in config_fields(cls)]
        if (other := passthrough_field(cls)) is not None:
            rows.append(f"| any other key | any | | {_markdown_cell(' '.join(other.metadata['help'].split()))} |")
        parts.append("\n".join([title, "", "| key | type | default | meaning |", "|---|---|---|---|", *rows]))
    return "\n\n".join(parts) + "\n"


def with_reference(text: str, file: str) -> str:
    """`text` (a Markdown page) with the part between BEGIN and END replaced by the reference."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise StrataError(f"{file}: no generated section to replace; the page must hold the lines "
                          f"{BEGIN!r} and {END!r}")
    return text[:start] + BEGIN + "\n\n" + reference_markdown() + "\n" + text[end:]
