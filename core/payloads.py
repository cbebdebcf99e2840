"""The JSON Schemas of the MQTT payloads (core/schemas/, shipped with the package) and one-line validation.

The station's payloads are built to these schemas; subscribers (edge-events, the tests) check what they
receive against them, so a contract change shows up as a failing validation, not as a silent mismatch.
"""

from __future__ import annotations

import datetime as _dt
import json
from functools import cache
from importlib import resources
from typing import Any, Optional

import jsonschema

KINDS = ("event", "stats", "status", "health", "label")


@cache
def validator(kind: str) -> jsonschema.Draft202012Validator:
    """The validator of ``kind`` (format checks on: uuid, date-time)."""
    if kind not in KINDS:
        raise ValueError(f"no schema for {kind!r}; known: {', '.join(KINDS)}")
    text = resources.files("core").joinpath("schemas", f"{kind}.schema.json").read_text(encoding="utf-8")
    schema = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())


def payload_problem(kind: str, payload: Any) -> Optional[str]:
    """None when ``payload`` (decoded) satisfies the schema, else what is wrong and where, in one line."""
    errors = sorted(validator(kind).iter_errors(payload), key=lambda e: list(e.absolute_path))
    if not errors:
        return None
    first = errors[0]
    where = "/".join(str(p) for p in first.absolute_path) or "(the payload)"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first.message}{more}"


def iso_utc(ts: float) -> str:
    """ISO-8601 UTC with milliseconds and a 'Z', as every payload carries it."""
    t = _dt.datetime.fromtimestamp(ts, _dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"
