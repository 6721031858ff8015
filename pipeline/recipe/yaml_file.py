"""Reading a YAML file the way a user expects: one line naming the file (and line) when it is not
text, not YAML, or repeats a key.

PyYAML accepts a repeated key and keeps the last value, so `tokens` written twice in a stage would
silently train on the second; here a repeated key is an error that names both lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import RecipeError


class DuplicateKeyError(RecipeError):
    """`FILE:LINE: duplicate key 'tokens' (first at line K)`."""

    def __init__(self, file: str, line: int, key: Any, first: int):
        super().__init__(file, [f"line {line}: duplicate key {key!r} (first at line {first})"])
        self.args = (f"{file}:{line}: duplicate key {key!r} (first at line {first})",)


class _UniqueKeyLoader(yaml.SafeLoader):
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
