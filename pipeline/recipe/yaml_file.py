"""Reading a YAML file the way a user expects: one line naming the file (and line) when it is not
text, not YAML, or repeats a key.

PyYAML accepts a repeated key and keeps the last value, so `tokens` written twice in a stage would
silently train on the second; here a repeated key is an error that names both lines.

Scalars follow YAML 1.2's core schema, not PyYAML's YAML 1.1: only `true`/`false` (any case
spelling the spec allows) are booleans, so `on: replay` is the key "on" and a source named `no` is
the string "no"; `010` is ten, `0o17` octal, `0x1f` hex; `1e-3` is a number; dates stay strings
(the recipe's typed fields parse them). Underscores (`1_000_000`) are strings in YAML 1.2, and
the recipe's integer and number fields accept them (pipeline/recipe/typed_yaml.py).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import RecipeError


class DuplicateKeyError(RecipeError):
    """`FILE:LINE: duplicate key 'tokens' (first at line K)`."""

    def __init__(self, file: str, line: int, key: Any, first: int):
        super().__init__(file, [f"line {line}: duplicate key {key!r} (first at line {first})"])
        self.args = (f"{file}:{line}: duplicate key {key!r} (first at line {first})",)


class _CoreSchemaLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core-schema scalar resolution (null, bool, int, float) and `<<` merges."""

    yaml_implicit_resolvers: dict = {}

    def construct_yaml_bool(self, node: yaml.ScalarNode) -> bool:
        return self.construct_scalar(node).lower() == "true"

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        text = self.construct_scalar(node)
        sign, digits = (-1, text[1:]) if text[0] == "-" else (1, text.lstrip("+"))
        base = {"0o": 8, "0x": 16}.get(digits[:2], 10)
        return sign * int(digits[2:] if base != 10 else digits, base)

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        text = self.construct_scalar(node).lower()
        if text.endswith(".inf"):
            return -math.inf if text[0] == "-" else math.inf
        return math.nan if text == ".nan" else float(text)


_CORE_SCALARS = [  # (tag, regular expression, first characters): the YAML 1.2.2 spec, section 10.3.2
    ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", list("tTfF")),
    ("int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", list("-+0123456789")),
    ("float", r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
     list("-+.0123456789")),
    ("merge", r"^(?:<<)$", ["<"]),
]
for _tag, _pattern, _first in _CORE_SCALARS:
    _CoreSchemaLoader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(_pattern), _first)
for _tag in ("bool", "int", "float"):
    _CoreSchemaLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", getattr(_CoreSchemaLoader, f"construct_yaml_{_tag}"))


class _UniqueKeyLoader(_CoreSchemaLoader):
    file = "<yaml>"

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` merges are not repeats
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                if key in seen:
                    raise DuplicateKeyError(self.file, line, key, seen[key])
            except TypeError:
                continue  # an unhashable key: construct_mapping reports it
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """The parsed YAML of `path`; RecipeError (one line naming the file) for any problem of the file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(str(path), ["file not found"])
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(str(path), [f"not a text file (byte {e.start} is not UTF-8); a recipe is YAML text"]) from None
    except OSError as e:
        raise RecipeError(str(path), [f"cannot read ({e.strerror or e})"]) from None
    if "\x00" in text:
        raise RecipeError(str(path), ["not a text file (it holds NUL bytes); a recipe is YAML text"])
    loader = type("Loader", (_UniqueKeyLoader,), {"file": str(path)})
    try:
        return yaml.load(text, Loader=loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise RecipeError(str(path), [f"{where}not valid YAML ({getattr(e, 'problem', e)})"]) from None
