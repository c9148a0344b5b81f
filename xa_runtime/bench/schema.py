"""The JSON schema of xa-bench's output (schema.json beside this file) and a small validator
for the part of JSON Schema it uses (type, enum, const, required, properties,
additionalProperties, minProperties, items, minItems, minimum, allOf, anyOf, local $ref),
so checking a result needs no extra package."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).with_name("schema.json")

_TYPES = {
    "object": lambda v: isinstance(v, dict), "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool), "null": lambda v: v is None,
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}


@lru_cache(maxsize=1)
def load_schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def validation_errors(value: Any, schema: dict[str, Any] | None = None) -> list[str]:
    """Every violation as "path: message" (empty when `value` is valid)."""
    root = schema if schema is not None else load_schema()
    errors: list[str] = []
    _check(value, root, root, "$", errors)
    return errors


def _check(v: Any, s: dict[str, Any], root: dict[str, Any], path: str, errors: list[str]) -> None:
    if "$ref" in s:
        node: Any = root
        for part in s["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        _check(v, node, root, path, errors)
    if "type" in s:
        types = s["type"] if isinstance(s["type"], list) else [s["type"]]
        if not any(_TYPES[t](v) for t in types):
            errors.append(f"{path}: {type(v).__name__} is not of type {' or '.join(types)}")
            return
    if "enum" in s and v not in s["enum"]:
        errors.append(f"{path}: {v!r} is not one of {s['enum']}")
    if "const" in s and v != s["const"]:
        errors.append(f"{path}: {v!r} is not {s['const']!r}")
    if "minimum" in s and _TYPES["number"](v) and v < s["minimum"]:
        errors.append(f"{path}: {v} is below {s['minimum']}")
    for sub in s.get("allOf", []):
        _check(v, sub, root, path, errors)
    if "anyOf" in s:
        tries = [[] for _ in s["anyOf"]]
        for sub, errs in zip(s["anyOf"], tries):
            _check(v, sub, root, path, errs)
        if all(tries):
            best = min(tries, key=len)
            errors.append(f"{path}: matches none of anyOf; closest: {'; '.join(best[:3])}")
    if isinstance(v, dict):
        for key in s.get("required", []):
            if key not in v:
                errors.append(f"{path}: missing {key!r}")
        if len(v) < s.get("minProperties", 0):
            errors.append(f"{path}: fewer than {s['minProperties']} entries")
        props = s.get("properties", {})
        extra = s.get("additionalProperties", True)
        for key, item in v.items():
            if key in props:
                _check(item, props[key], root, f"{path}.{key}", errors)
            elif extra is False:
                errors.append(f"{path}: unexpected {key!r}")
            elif isinstance(extra, dict):
                _check(item, extra, root, f"{path}.{key}", errors)
    if isinstance(v, list):
        if len(v) < s.get("minItems", 0):
            errors.append(f"{path}: fewer than {s['minItems']} items")
        if "items" in s:
            for i, item in enumerate(v):
                _check(item, s["items"], root, f"{path}[{i}]", errors)
