"""Turning a failed check into one line that points at the file, the line and the key.

When several keys are wrong, the first one in file order is reported.  A
misspelt key is reported as unknown (with the keys expected there), not as the
correctly spelt key being missing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, get_args

from pydantic import BaseModel, ValidationError

from egressd.config.yaml_doc import NO_VALUE, ConfigError, KeyPath, _Document, format_key_path

_TYPE_WORDS: Final = {
    "int_type": "expected an integer",
    "string_type": "expected a string",
    "bool_type": "expected true or false",
    "float_type": "expected a number",
    "tuple_type": "expected a list",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "finite_number": "expected a finite number",
    "too_short": "expected at least one entry",
}


_MISSING_HINTS: Final = {
    "home_countries": "the countries data may move freely between, such as [CN]",
    "name": "every route needs a unique name",
    "approval": "every route needs the reference of its consent or authority approval",
    "to": "where the route leads: countries, networks, asns and/or names",
}


def _model_below(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_below(arg)
        if found is not None:
            return found
    return None


def _expected_keys(root: type[BaseModel], parent: KeyPath) -> list[str]:
    model: type[BaseModel] | None = root
    for part in parent:
        if isinstance(part, int) or model is None:
            continue
        info = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        model = None if info is None else _model_below(info.annotation)
    if model is None:
        return []
    return [f.alias or n for n, f in model.model_fields.items()]


def _describe(err: Mapping[str, Any], root: type[BaseModel], path: KeyPath) -> str:
    kind = str(err["type"])
    if kind == "egressd":
        return str(err["msg"])
    if kind == "missing":
        hint = _MISSING_HINTS.get(str(path[-1]) if path else "")
        return "required key is missing" + (f" ({hint})" if hint else "")
    if kind == "extra_forbidden":
        keys = _expected_keys(root, path[:-1])
        return f"unknown key (expected one of: {', '.join(keys)})"
    if kind in _TYPE_WORDS:
        return _TYPE_WORDS[kind]
    ctx = err.get("ctx") or {}
    if kind == "greater_than":
        return f"expected a number greater than {_number(ctx.get('gt'))}"
    if kind == "greater_than_equal":
        return f"expected a number of at least {_number(ctx.get('ge'))}"
    msg = str(err["msg"])
    return "expected " + msg.removeprefix("Input should be ") if msg.startswith("Input") else msg


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def _lookup(data: object, path: KeyPath) -> object:
    for part in path:
        if isinstance(data, dict):
            if part not in data:
                return NO_VALUE
            data = data[part]
        elif isinstance(data, tuple) and isinstance(part, int) and part < len(data):
            data = data[part]
        else:
            return NO_VALUE
    return data


def _first_error(
    exc: ValidationError, doc: _Document, data: dict[str, object], root: type[BaseModel]
) -> ConfigError:
    errors = exc.errors()
    # A misspelt key also shows up as the right key missing: report the typo.
    misspelt = {tuple(e["loc"][:-1]) for e in errors if e["type"] == "extra_forbidden"}
    found: list[tuple[int, int, ConfigError]] = []
    for order, err in enumerate(errors):
        loc = tuple(err["loc"])
        kind = err["type"]
        if kind == "missing" and loc[:-1] in misspelt:
            continue
        on_key = bool(loc) and loc[-1] == "[key]"
        path: KeyPath = tuple(p for p in loc if p != "[key]")
        message = _describe(err, root, path)
        value: object = NO_VALUE
        if kind == "missing":
            line = doc.line_of(path[:-1])
        elif kind == "extra_forbidden" or on_key:
            line = doc.key_lines.get(path, doc.line_of(path))
            if on_key:
                value = path[-1]
        else:
            line = doc.line_of(path)
            value = _lookup(data, path)
        error = ConfigError(doc.name, line, format_key_path(path), message, value)
        found.append((line or 0, order, error))
    return min(found, key=lambda item: item[:2])[2]
