"""core.payloads.parse_network_json: every network message is checked with bounded cost before anything else
touches it; and what a log line repeats of a network field is bounded too."""

from __future__ import annotations

import json
import time

import pytest

from core.payloads import MAX_MESSAGE_BYTES, PayloadRefused, parse_network_json, shown


@pytest.mark.parametrize(("payload", "cause"), [
    (b"[" * 2000 + b"]" * 2000, "too deep"),
    (b'{"a":' * 2000 + b"1" + b"}" * 2000, "too deep"),
    (json.dumps({"event_id": "x" * 10_000_000}).encode(), "too large"),
    (b'{"event_id": "\xff\xfe"}', "not UTF-8"),
    (b'{"kind": "scr\x00atch"}', "control character"),
    (b'{"kind": "scratch\\n"}', "control character"),  # an escaped newline is a newline once decoded
    (b'{"kind": "scratch\\u0007"}', "control character"),
    (json.dumps({"k": "y" * 5000}).encode(), "string too long"),
    (json.dumps({"y" * 5000: 1}).encode(), "string too long"),
    (b"{not json", "not JSON"),
])
def test_poison_is_refused_with_its_cause(payload: bytes, cause: str) -> None:
    t0 = time.perf_counter()
    with pytest.raises(PayloadRefused) as err:
        parse_network_json(payload)
    assert err.value.cause == cause
    assert time.perf_counter() - t0 < 1.0  # bounded: no RecursionError, no 10 MB walk


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    text = json.dumps({"note": "[" * 500 + "{" * 500, "list": [[1, 2], {"a": [3]}]})
    assert parse_network_json(text.encode())["list"] == [[1, 2], {"a": [3]}]


def test_a_normal_command_passes() -> None:
    body = {"event_id": "6f1c0000-0000-4000-8000-000000000000", "verdict": "defect", "kind": "scratch"}
    assert parse_network_json(json.dumps(body).encode()) == body
    assert parse_network_json(b' {"tab":\t"a b"}\r\n') == {"tab": "a b"}


def test_the_worst_message_within_the_size_limit_is_cheap() -> None:
    worst = b'"' + b"\\\\" * (MAX_MESSAGE_BYTES // 2 - 2) + b'"'
    t0 = time.perf_counter()
    with pytest.raises(PayloadRefused):
        parse_network_json(worst)
    assert time.perf_counter() - t0 < 1.0


def test_shown_bounds_what_a_log_line_repeats() -> None:
    big = "x" * 10_000_000
    out = shown(big)
    assert len(out) < 120 and out.endswith("… (10000000 bytes)")
    assert shown("anomaly/s/cmd/reload") == "anomaly/s/cmd/reload"
    assert shown("a\nforged line") == "'a\\nforged line'"  # no newline reaches the log
