"""Typed YAML: load nested dataclasses from parsed YAML, collecting every problem by key path.

The dataclasses' type hints are the schema. `spec()` adds what hints cannot say: the YAML key
(for names that are Python keywords, like `from` and `global`), bounds and a help text. The
loader converts and checks every field, reports unknown keys with a "did you mean", and never
stops at the first problem; `dataclass_schema()` turns the same dataclasses into JSON Schema.
Nothing here knows about recipes: pipeline/recipe/spec.py declares them, pipeline/recipe/load.py adds the cross-field checks.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import operator
import types
import typing
from dataclasses import MISSING, field
from typing import Any, Literal, Union

# --------------------------------------------------------------------------------------------
# Field helper: a dataclass field with the YAML key, bounds and help text in its metadata.


# A numeric bound: its keyword in spec(), the test, how a problem (and the reference) says it, and
# its JSON Schema keyword.
BOUNDS = {"gt": (operator.gt, ">", "exclusiveMinimum"), "ge": (operator.ge, ">=", "minimum"),
          "lt": (operator.lt, "<", "exclusiveMaximum"), "le": (operator.le, "<=", "maximum")}


def spec(default: Any = MISSING, *, factory: Any = MISSING, key: str | None = None, help: str = "",
         **bounds: float) -> Any:
    """A field with its YAML key (default: the field's name), its help text and numeric bounds
    (any of gt, ge, lt, le; see BOUNDS)."""
    if unknown := set(bounds) - set(BOUNDS):
        raise TypeError(f"spec() takes the bounds {', '.join(BOUNDS)}, not {', '.join(sorted(unknown))}")
    meta = {"key": key, "help": help, **{b: bounds.get(b) for b in BOUNDS}}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def passthrough(help: str = "") -> Any:
    """A field that takes every key of its mapping that no other field declares, as written (a block
    that hands what it does not type to a library, such as `deepspeed:`); no key is then unknown."""
    return field(default_factory=dict, metadata={"key": None, "help": help, "passthrough": True})


def passthrough_field(cls: type) -> dataclasses.Field | None:
    return next((f for f in dataclasses.fields(cls) if f.metadata.get("passthrough")), None)


def yaml_key(f: dataclasses.Field) -> str:
    return f.metadata.get("key") or f.name


# --------------------------------------------------------------------------------------------
# Loading: walk the type hints, convert, and collect problems with their key paths.


class Problems(list):
    def add(self, path: str, message: str) -> None:
        self.append(f"{path}: {message}")


BAD = object()  # marks a value that failed to convert (its problem is already recorded)


class _Invalid(Exception):
    """A value that does not convert to its type; the message is the problem at its key path."""


def _convert(tp: Any, value: Any, path: str, problems: Problems) -> Any:
    """`value` as type `tp`, or BAD (its problem recorded at `path`)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(args[0], value, path, problems) if len(args) == 1 else value
    if dataclasses.is_dataclass(tp):
        return load_dataclass(tp, value, path, problems)
    if origin is list:
        if not isinstance(value, list):
            problems.add(path, f"must be a list, got {type(value).__name__}")
            return BAD
        (item,) = typing.get_args(tp)
        out = [_convert(item, v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
        # keep positions (key paths of later checks stay right); a failed item becomes None
        return [None if v is BAD else v for v in out]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            problems.add(path, f"must be a mapping, got {type(value).__name__}")
            return BAD
        return value
    try:
        if origin is Literal:
            return _to_choice(typing.get_args(tp), value)
        if tp in _SCALARS:
            return _SCALARS[tp](value)
    except _Invalid as e:
        problems.add(path, str(e))
        return BAD
    raise TypeError(f"recipe type {tp} not handled")  # a bug in this module, not a user error


def _to_choice(choices: tuple, value: Any) -> Any:
    if value not in choices:
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise _Invalid(f"must be one of {', '.join(map(repr, choices))}, got {value!r}{extra}")
    return value


def _to_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"must be true or false, got {value!r}")
    return value


def _to_int(value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):  # YAML 1.1 reads 2e6 as a string
        try:
            as_float = float(value.replace("_", ""))
            if as_float.is_integer():
                return int(as_float)
        except ValueError:
            pass
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Invalid(f"must be an integer, got {value!r}")
    return value


def _to_float(value: Any) -> float:
    if isinstance(value, str):
        try:
            return float(value.replace("_", ""))
        except ValueError:
            pass
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _Invalid(f"must be a number, got {value!r}")
    return float(value)


def _to_str(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"must be a string, got {value!r}")
    return value


def _to_date(value: Any) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        raise _Invalid(f"must be a date (YYYY-MM-DD), got {value!r}") from None


_SCALARS = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str, dt.date: _to_date}


def _check_bounds(f: dataclasses.Field, value: Any, path: str, problems: Problems) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return True
    m = f.metadata
    for bound, (ok, word, _) in BOUNDS.items():
        if m.get(bound) is not None and not ok(value, m[bound]):
            problems.add(path, f"must be {word} {m[bound]:g}, got {value!r}")
            return False
    return True


def config_fields(cls: type) -> list[dataclasses.Field]:
    """The fields that are YAML keys (fields with metadata `internal` are filled in by code; a
    `passthrough` field holds the keys no field declares)."""
    return [f for f in dataclasses.fields(cls) if not f.metadata.get("internal") and not f.metadata.get("passthrough")]


def load_dataclass(cls: type, value: Any, path: str, problems: Problems) -> Any:
    if not isinstance(value, dict):
        problems.add(path or "recipe", f"must be a mapping, got {type(value).__name__}")
        return BAD
    hints = typing.get_type_hints(cls)
    known = {yaml_key(f): f for f in config_fields(cls)}
    prefix = f"{path}." if path else ""
    rest = {key: v for key, v in value.items() if key not in known}
    kwargs, ok = {}, True
    if (other := passthrough_field(cls)) is not None:
        kwargs[other.name] = rest
    else:
        _unknown_keys(rest, known, prefix, problems)
    for key, f in known.items():
        fpath = f"{prefix}{key}"
        if key not in value:
            if f.default is MISSING and f.default_factory is MISSING:
                problems.add(fpath, "required")
                ok = False
            continue
        converted = _convert(hints[f.name], value[key], fpath, problems)
        if converted is BAD or not _check_bounds(f, converted, fpath, problems):
            ok = False
            continue
        kwargs[f.name] = converted
    return cls(**kwargs) if ok else _partial(cls, kwargs)


def _unknown_keys(keys: Any, known: dict, prefix: str, problems: Problems) -> None:
    for key in keys:
        hint = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        problems.add(f"{prefix}{key}", f"unknown key{extra}")


def _partial(cls: type, kwargs: dict) -> Any:
    """An instance with the fields that loaded; failed fields take their default, or None.

    Only the cross-field checks see it (so that one type error does not hide the other
    problems); a recipe with any problem is never returned to a caller.
    """
    obj = object.__new__(cls)
    for f in dataclasses.fields(cls):
        if f.name in kwargs:
            value = kwargs[f.name]
        elif f.default is not MISSING:
            value = f.default
        elif f.default_factory is not MISSING:
            value = f.default_factory()
        else:
            value = None
        setattr(obj, f.name, value)
    return obj


# --------------------------------------------------------------------------------------------
# JSON Schema, generated from the same dataclasses.


def _schema_of(tp: Any) -> dict:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = _schema_of(args[0]) if len(args) == 1 else {"anyOf": [_schema_of(a) for a in args]}
        return {"anyOf": [inner, {"type": "null"}]}
    if dataclasses.is_dataclass(tp):
        return dataclass_schema(tp)
    if origin is list:
        return {"type": "array", "items": _schema_of(typing.get_args(tp)[0])}
    if origin is dict or tp is dict:
        return {"type": "object"}
    if origin is Literal:
        return {"enum": list(typing.get_args(tp))}
    if tp is dt.date:
        return {"type": "string", "format": "date"}
    return {"type": {int: "integer", float: "number", str: "string", bool: "boolean"}.get(tp, "string")}


def dataclass_schema(cls: type) -> dict:
    hints = typing.get_type_hints(cls)
    props, required = {}, []
    for f in config_fields(cls):
        key = yaml_key(f)
        prop = _schema_of(hints[f.name])
        prop["description"] = f.metadata.get("help", "")
        for bound, (_, _, word) in BOUNDS.items():
            if f.metadata.get(bound) is not None:
                prop[word] = f.metadata[bound]
        if f.default is not MISSING and isinstance(f.default, (int, float, str, bool)):
            prop["default"] = f.default
        if f.default is MISSING and f.default_factory is MISSING:
            required.append(key)
        props[key] = prop
    other = passthrough_field(cls)  # any other key, described by its help
    rest = False if other is None else {"description": other.metadata.get("help", "")}
    return {"type": "object", "properties": props, "required": required, "additionalProperties": rest}
