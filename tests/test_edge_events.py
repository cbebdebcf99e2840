"""The event state machine on synthetic score sequences (pure: no camera, no broker)."""

from __future__ import annotations

import itertools

import pytest

from core.events import EventDetector, EventRule, Transition, event_payload


def run(rule: EventRule, scores: list[float], fps: float = 10.0, finish: bool = True) -> list[Transition]:
    ids = (f"id{i}" for i in itertools.count())
    det = EventDetector(rule, new_id=lambda: next(ids))
    out: list[Transition] = []
    for i, s in enumerate(scores):
        out += det.feed(i, i / fps, s)
    if finish:
        out += det.finish()
    return out


def kinds(ts: list[Transition]) -> list[tuple[str, int]]:
    return [(t.type, t.frame) for t in ts]


RULE = EventRule(threshold=1.0, k=3, n=5, close_after=3, hysteresis=0.8, update_interval_s=100.0, cooldown_s=0.0)


def test_k_of_n_opens_on_the_kth_hit_within_the_window() -> None:
    # hits at 0, 3, 6: never three of them in a window of 5 → no event
    assert run(RULE, [1, 0, 0, 1, 0, 0, 1, 0, 0, 0]) == []
    # hits at 2, 3, 5: the window 1..5 holds three → opens at frame 5
    ts = run(RULE, [0, 0, 1, 1, 0, 1, 0, 0, 0, 0])
    assert kinds(ts)[0] == ("start", 5)


def test_single_spikes_never_open() -> None:
    assert run(RULE, [5.0 if i % 4 == 0 else 0.0 for i in range(40)]) == []


def test_hysteresis_keeps_the_event_open_between_threshold_and_threshold_times_hysteresis() -> None:
    # 0.9 is below the threshold but above 1.0 × 0.8: the event must not close
    scores = [1, 1, 1] + [0.9] * 20 + [0.1] * 3
    ts = run(RULE, scores)
    assert kinds(ts) == [("start", 2), ("end", 25)]


def test_hysteresis_band_is_measured_from_the_good_part_baseline() -> None:
    # Good parts score about 20 against a threshold of 24: "threshold × 0.9" (21.6) would sit among good
    # scores and the event would never close. From the baseline: 20 + 0.9 × 4 = 23.6.
    rule = EventRule(threshold=24.0, k=3, n=5, close_after=3, hysteresis=0.9, update_interval_s=100.0,
                     cooldown_s=0.0, baseline=20.0)
    assert rule.close_level == pytest.approx(23.6)
    good = [21.5, 22.0, 21.0]  # above 21.6, below 23.6
    assert kinds(run(rule, [25, 25, 25] + good)) == [("start", 2), ("end", 5)]
    assert kinds(run(rule, [25, 25, 25] + [23.8] * 5 + good)) == [("start", 2), ("end", 10)]
    # a threshold override below the baseline: the band is then measured from zero-width (threshold itself)
    low = EventRule(threshold=10.0, hysteresis=0.5, baseline=20.0)
    assert low.close_level == pytest.approx(10.0)


def test_closes_after_m_consecutive_low_frames_and_counts_reset_on_a_high_frame() -> None:
    scores = [1, 1, 1, 0, 0, 1, 0, 0, 0, 0]
    ts = run(RULE, scores)
    assert kinds(ts) == [("start", 2), ("end", 8)]  # the high frame at 5 reset the count


def test_peak_and_scores_carried_in_transitions() -> None:
    ts = run(RULE, [1.5, 1.2, 1.1, 3.0, 0, 0, 0])
    start, end = ts
    assert start.peak_score == 1.5 and start.peak_frame == 0 and start.score == 1.1
    assert end.peak_score == 3.0 and end.peak_frame == 3 and end.score == 0
    assert start.event_id == end.event_id


def test_updates_at_most_every_interval_in_frame_time() -> None:
    rule = EventRule(threshold=1.0, k=1, n=1, close_after=1, hysteresis=1.0, update_interval_s=1.0, cooldown_s=0)
    ts = run(rule, [2.0] * 35 + [0.0], fps=10.0)  # open 3.5 s
    assert kinds(ts) == [("start", 0), ("update", 10), ("update", 20), ("update", 30), ("end", 35)]
    assert len({t.event_id for t in ts}) == 1


def test_cooldown_blocks_a_new_event_in_frame_time() -> None:
    rule = EventRule(threshold=1.0, k=1, n=1, close_after=1, hysteresis=1.0, update_interval_s=100, cooldown_s=1.0)
    scores = [2, 0] + [2] * 20 + [0]
    ts = run(rule, scores, fps=10.0)
    # end at frame 1 (t=0.1 s): nothing opens before t=1.1 s, i.e. frame 11
    assert kinds(ts) == [("start", 0), ("end", 1), ("start", 11), ("end", 22)]
    assert ts[0].event_id != ts[2].event_id


def test_finish_closes_an_open_event_at_the_last_frame() -> None:
    ts = run(RULE, [1, 1, 1, 1, 1])
    assert kinds(ts) == [("start", 2), ("end", 4)]
    assert run(RULE, [0, 0, 0]) == []


def test_rule_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        EventRule(threshold=1.0, k=6, n=5)
    with pytest.raises(ValueError):
        EventRule(threshold=1.0, hysteresis=1.5)


def test_payload_has_exactly_the_contract_fields() -> None:
    from edge_helpers import validate

    t = Transition("start", "1b4e28ba-2fa1-41d2-883f-0016d3cca427", 7, 1_700_000_000.5, 0.5, 0.7, 6)
    p = event_payload(t, seq=3, station="s1", camera="cam0", ts_iso="2023-11-14T22:13:20.500Z", threshold=0.4,
                      model="toy", model_version="v1", backend="onnxruntime")
    assert set(p) == {"schema", "event_id", "type", "station", "camera", "seq", "ts", "frame", "score",
                      "peak_score", "threshold", "model", "model_version", "backend"}
    validate("event", p)
