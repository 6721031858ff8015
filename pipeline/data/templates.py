"""Templates: semi-structured records (product records, tables with attributes) rendered to text.

A source with `template:` renders each record with Jinja2 in its sandboxed environment, under
StrictUndefined: a field the template uses but the record lacks is an error, not an empty string,
so such a record is skipped and counted like a malformed line (or stops the prepare under
`on_error: fail`) instead of training on half a document. `format: key_value | json` are
shorthands that render every field without writing a template.

A null is an absent field (`price is defined` is false for it): columnar formats (parquet, saved
HF datasets) store a field missing from some records as null, so treating both alike makes a
template behave the same on a jsonl file and on the parquet file made from it.

Jinja2 is used rather than a home-made engine: nested fields (`{{ item.title }}`), filters
(`{{ tags | join(", ") }}`) and conditionals (`{% if price %}`) are what users already know, and
its sandbox keeps a recipe's template from reaching Python internals.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pipeline.recipe.spec import Source


class RenderError(Exception):
    """A record the template cannot render; the message is the reason counted per file."""


def _value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)


def key_value(record: dict) -> str:
    """`key: value` lines for every field that has a value; nested values as compact JSON."""
    return "\n".join(f"{k}: {_value(v)}" for k, v in record.items() if v is not None and v != "")


def compact_json(record: dict) -> str:
    return json.dumps(without_nulls(record), ensure_ascii=False, separators=(",", ":"), default=str)


def without_nulls(value: Any) -> Any:
    """`value` with every null field of every (nested) record removed."""
    if isinstance(value, dict):
        return {k: without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_nulls(v) for v in value]
    return value


def renderer(source: Source) -> Callable[[dict], str] | None:
    """record -> text for a templated source (raises RenderError); None for a plain `text_field`."""
    if source.template is not None:
        from jinja2 import StrictUndefined
        from jinja2.sandbox import SandboxedEnvironment

        env = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=False)
        template = env.from_string(source.template)  # syntax was checked with the recipe

        def render(record: dict) -> str:
            try:
                return template.render(without_nulls(record))
            except Exception as e:  # undefined field, type error in a filter, sandbox violation
                raise RenderError(f"template failed ({type(e).__name__}: {str(e)[:120]})") from None

        return render
    if source.format == "key_value":
        return key_value
    if source.format == "json":
        return compact_json
    return None

