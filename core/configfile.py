"""Typed YAML configuration with line numbers in every error.

A config schema is a tree of dataclasses. Loading walks the YAML node graph (not the plain dicts),
so an unknown key or a value of the wrong type is reported as ``file:line: key 'a.b' ...``.
Trainer and station configs share this loader; each defines its own dataclasses.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar, Union

import yaml

from core.errors import ConfigError

T = TypeVar("T")

_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def load_config(path: str | Path, schema: type[T]) -> T:
    """Read ``path`` into an instance of the dataclass ``schema``; missing keys keep their defaults."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found; pass an existing file with --config") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc})") from None
    return parse_config(text, schema, source=str(path))


def parse_config(text: str, schema: type[T], source: str = "<config>") -> T:
    """Parse YAML ``text`` into ``schema``; ``source`` names the file in error messages."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{where}: invalid YAML ({problem}); fix the syntax at that line") from None
    if node is None:
        return schema()
    return _build_dataclass(schema, node, source, "")


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _build_dataclass(schema: type[T], node: yaml.Node, source: str, prefix: str) -> T:
    if not isinstance(node, yaml.MappingNode):
        what = f"key '{prefix.rstrip('.')}'" if prefix else "the top level"
        raise ConfigError(f"{source}:{_line(node)}: {what} must be a mapping of keys to values")
    fields = {f.name: f for f in dataclasses.fields(schema)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(schema)
    values: dict[str, Any] = {}
    key_lines: dict[str, int] = {}
    for key_node, value_node in node.value:
        key = key_node.value
        dotted = prefix + str(key)
        if key not in fields or not fields[key].init:
            known = ", ".join(sorted(k for k, f in fields.items() if f.init))
            raise ConfigError(f"{source}:{_line(key_node)}: unknown key '{dotted}' (known keys: {known})")
        if key in values:
            raise ConfigError(f"{source}:{_line(key_node)}: key '{dotted}' appears twice")
        values[key] = _convert(hints[key], value_node, source, dotted)
        key_lines[key] = _line(key_node)
    try:
        instance = schema(**values)
        validate = getattr(instance, "validate", None)
        if callable(validate):
            validate()
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}:{_blamed_line(str(exc), prefix, key_lines, _line(node))}: {exc}") from None
    return instance


def _blamed_line(message: str, prefix: str, key_lines: dict[str, int], section_line: int) -> int:
    """The line of the key a check's ``message`` is about, so the error points at the wrong value and not at the
    section's first key: the key of this section, written in the file, that the message names first (as
    ``prefix.key``, else as a word); the section's line when it names none (a key left at its default)."""
    def first_named(spelling: Callable[[str], str]) -> Optional[int]:
        hits = []
        for key, line in key_lines.items():
            found = re.search(rf"(?<![\w.]){re.escape(spelling(key))}(?!\w)", message)
            if found is not None:
                hits.append((found.start(), line))
        return min(hits)[1] if hits else None

    line = first_named(lambda key: prefix + key)
    if line is None:
        line = first_named(lambda key: key)
    return section_line if line is None else line


def _scalar(node: yaml.Node) -> Any:
    return yaml.SafeLoader("").construct_object(node, deep=True)


def _convert(tp: Any, node: yaml.Node, source: str, dotted: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    where = f"{source}:{_line(node)}: key '{dotted}'"
    if origin is Union:
        options = [a for a in args if a is not type(None)]
        if isinstance(node, yaml.ScalarNode) and _scalar(node) is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where} must not be empty")
        errors = []
        for option in options:
            try:
                return _convert(option, node, source, dotted)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build_dataclass(tp, node, source, dotted + ".")
    if origin in (list, tuple):
        if not isinstance(node, yaml.SequenceNode):
            raise ConfigError(f"{where} must be a list")
        item_type = args[0] if args else Any
        return [_convert(item_type, item, source, f"{dotted}[{i}]") for i, item in enumerate(node.value)]
    if origin is dict:
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError(f"{where} must be a mapping")
        value_type = args[1] if len(args) == 2 else Any
        return {
            str(_scalar(k)): _convert(value_type, v, source, f"{dotted}.{_scalar(k)}") for k, v in node.value
        }
    if tp is Any:
        return yaml.SafeLoader("").construct_object(node, deep=True)
    if not isinstance(node, yaml.ScalarNode):
        raise ConfigError(f"{where} must be {_TYPE_WORDS.get(tp, str(tp))}, got a {node.id}")
    value = _scalar(node)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and node.style is None:
        try:  # YAML 1.1 reads 1e9 and 1.0e9 (no exponent sign) as strings; a user means a number
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return node.value  # e.g. a camera index written as 0: keep the text the user wrote
    if tp in _TYPE_WORDS:
        if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
            return value
        raise ConfigError(f"{where} must be {_TYPE_WORDS[tp]}, got {node.value!r}")
    raise ConfigError(f"{where}: unsupported type {tp}")
