"""The JSON schema of xa-bench's output (schema.json beside this file) and its check, by the
`jsonschema` library (Draft 2020-12, local $refs resolved against the schema's root)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).with_name("schema.json")


@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def validation_errors(value: Any, schema: dict[str, Any] | None = None) -> list[str]:
    """Every violation as "path: message" (empty when `value` is valid); `path` is a JSONPath
    such as `$.runs[0].seconds`. A failed anyOf names its closest branch's own errors."""
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(schema if schema is not None else load_schema())
    return [_line(e) for e in sorted(validator.iter_errors(value), key=lambda e: list(map(str, e.absolute_path)))]


def _line(error: Any) -> str:
    if not error.context:
        return f"{error.json_path}: {error.message}"
    # anyOf / oneOf: jsonschema's message quotes the whole value; name the closest branch's error instead
    from jsonschema.exceptions import best_match

    closest = best_match(error.context)
    return f"{error.json_path}: matches none of {error.validator}; closest: {closest.json_path}: {closest.message}"
