"""The JSON Schemas of the MQTT payloads (core/schemas/, shipped with the package) and one-line validation.

The station's payloads are built to these schemas; subscribers (edge-events, the tests) check what they
receive against them, so a contract change shows up as a failing validation, not as a silent mismatch.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from functools import cache
from importlib import resources
from typing import Any, Optional

import jsonschema

KINDS = ("event", "stats", "status", "health", "label", "ack")


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


# -- what arrives from the network: checked with bounded cost before anything else touches it ----------------
# A command is a small flat JSON object; these bounds leave a wide margin and still make the worst message cheap.
MAX_MESSAGE_BYTES = 64 * 1024
MAX_DEPTH = 8
MAX_STRING_CHARS = 1024
SHOWN_CHARS = 80  # what a log line repeats of a field that came from the network

# C0 controls other than tab/newline/return (JSON whitespace), DEL and the C1 block; matched in decoded text,
# where a JSON escape such as "\u0000" has become the character itself.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_STRING_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class PayloadRefused(ValueError):
    """A network message refused before parsing finished; ``cause`` is a short, countable category."""

    def __init__(self, cause: str, detail: str) -> None:
        super().__init__(f"{cause}: {detail}")
        self.cause = cause


def _nesting_depth(text: str, limit: int) -> int:
    """The deepest bracket nesting outside strings, scanning once and stopping past ``limit`` (no recursion,
    so a 2 000-deep ``[[[[`` costs a scan, not a RecursionError in json.loads)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        elif ch in "]}":
            depth -= 1
    return deepest


def parse_network_json(payload: bytes, max_bytes: int = MAX_MESSAGE_BYTES, max_depth: int = MAX_DEPTH,
                       max_string: int = MAX_STRING_CHARS) -> Any:
    """``payload`` decoded, or :class:`PayloadRefused` naming why: too large, not UTF-8, a control character,
    nested too deep, not JSON, a string (or key) too long or holding a control character. Every step is
    bounded by ``max_bytes``; the nesting is checked before ``json.loads`` sees the text."""
    if len(payload) > max_bytes:
        raise PayloadRefused("too large", f"{len(payload)} bytes, at most {max_bytes}")
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadRefused("not UTF-8", f"invalid byte at offset {exc.start}") from None
    bad = _CONTROL_RE.search(text)
    if bad:
        raise PayloadRefused("control character", f"U+{ord(bad.group()):04X} at offset {bad.start()}")
    depth = _nesting_depth(text, max_depth)
    if depth > max_depth:
        raise PayloadRefused("too deep", f"nested more than {max_depth} levels")
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise PayloadRefused("not JSON", str(exc)) from None
    todo = [value]
    while todo:  # iterative: the depth is bounded already, the walk needs no recursion anyway
        item = todo.pop()
        strings: list[Any] = []
        if isinstance(item, dict):
            strings = list(item)
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
        elif isinstance(item, str):
            strings = [item]
        for s in strings:
            if len(s) > max_string:
                raise PayloadRefused("string too long", f"{len(s)} characters, at most {max_string}")
            hit = _STRING_CONTROL_RE.search(s)
            if hit:
                raise PayloadRefused("control character", f"U+{ord(hit.group()):04X} in a string")
    return value


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """What a log line repeats of a network-provided value: a printable string as it is, anything else as its
    repr (no newline can forge a log line), cut to ``limit`` characters with ``… (N bytes)`` when cut, so a
    10 MB field costs a log line, not 10 MB of log."""
    text = value if isinstance(value, str) and value.isprintable() else repr(value)
    if len(text) <= limit:
        return text
    size = len(value.encode("utf-8", "replace")) if isinstance(value, str) else \
        len(value) if isinstance(value, (bytes, bytearray)) else len(text)
    return f"{text[:limit]}… ({size} bytes)"
