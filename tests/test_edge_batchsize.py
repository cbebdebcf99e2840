"""The station runs at the batch size that is fastest for its backend, measured at start."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from edge_helpers import run_cli, write_video

from core.bundle import load_bundle
from edge.backends.onnxruntime import OrtBackend
from edge.batchsize import candidate_sizes, fastest_batch
from edge.cli import build_from_args, run_parser


class CostPerCall:
    """A backend whose call costs ``fixed`` s plus ``per_frame(n)`` s a frame: the shapes batch sizes take on
    CPUs (per-frame cost growing with the batch) and GPUs (a large fixed launch cost)."""

    name = "timed"

    def __init__(self, fixed: float, per_frame: dict[int, float], max_batch: int = 8) -> None:
        self.fixed, self.per_frame, self.max_batch = fixed, per_frame, max_batch

    def infer(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        n = len(frames)
        time.sleep(self.fixed + n * self.per_frame[n])
        return {"score": np.zeros(n, np.float32)}

    def close(self) -> None:
        pass


def test_candidate_sizes() -> None:
    assert candidate_sizes(1) == [1]
    assert candidate_sizes(8) == [1, 2, 4, 8]
    assert candidate_sizes(6) == [1, 2, 4, 6]


def test_per_frame_cost_growing_with_the_batch_picks_a_small_batch() -> None:
    cpu_like = CostPerCall(0.0, {1: 0.004, 2: 0.0041, 4: 0.006, 8: 0.009})
    assert fastest_batch(cpu_like, (8, 8), 8, seconds_each=0.05) in (1, 2)


def test_a_large_fixed_cost_picks_the_largest_batch() -> None:
    gpu_like = CostPerCall(0.01, {1: 0.0005, 2: 0.0005, 4: 0.0005, 8: 0.0005})
    assert fastest_batch(gpu_like, (8, 8), 8, seconds_each=0.05) == 8


def test_a_real_onnxruntime_backend_gets_a_size_within_its_bound(toy_bundle: Path) -> None:
    backend = OrtBackend(load_bundle(toy_bundle), max_batch=4)
    assert fastest_batch(backend, (32, 32), 4, seconds_each=0.05) in (1, 2, 4)


def test_edge_run_says_which_batch_size_it_chose(tmp_path: Path, mosquitto: str, toy_bundle: Path) -> None:
    video = write_video(tmp_path / "v.avi", [], 20)
    proc = run_cli("edge-run", ["--camera", video, "--engine", toy_bundle, "--mqtt", mosquitto,
                                "--state-dir", tmp_path / "state"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "fastest on onnxruntime here (frames/s by batch size: 1: " in proc.stderr


class SlowerThanTheCamera:
    """The station's real backend, made slower than the reader (a real model on a small CPU is), recording the
    size of every batch it is handed."""

    def __init__(self, backend: Any, seconds_per_call: float) -> None:
        self.backend, self.seconds_per_call = backend, seconds_per_call
        self.name, self.max_batch = backend.name, backend.max_batch
        self.sizes: list[int] = []

    def infer(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        self.sizes.append(len(frames))
        time.sleep(self.seconds_per_call)
        return self.backend.infer(frames)

    def close(self) -> None:
        self.backend.close()


@pytest.mark.parametrize("batch", [8, 16])
def test_a_video_file_is_scored_in_full_batches_of_the_chosen_size(tmp_path: Path, mosquitto: str,
                                                                   toy_bundle: Path, batch: int) -> None:
    # One camera with the default queue_size (4) ran every batch of 8 at 4 frames: the batch never formed.
    video = write_video(tmp_path / "v.avi", [], 5 * batch)
    config = tmp_path / "station.yaml"
    config.write_text(f"station: full-batches\nstate_dir: {tmp_path / 'state'}\n"
                      f"engine: {{auto_batch: false, max_batch: {batch}}}\n")
    station = build_from_args(run_parser().parse_args(
        ["--config", str(config), "--camera", str(video), "--engine", str(toy_bundle), "--mqtt", mosquitto]))
    slow = SlowerThanTheCamera(station.backend, 0.05)
    station.backend = slow
    [publisher] = station.sinks
    publisher.start()
    try:
        result = station.run()
    finally:
        publisher.stop()
        station.outbox.close()
    assert result.frames == 5 * batch
    assert slow.sizes[1:-1] and set(slow.sizes[1:-1]) == {batch}, slow.sizes  # the first may go out early


@pytest.mark.parametrize(("cameras", "expected"), [(1, 8), (2, 4), (4, 4)])
def test_live_cameras_queue_one_batch_between_them_and_no_more(tmp_path: Path, mosquitto: str, toy_bundle: Path,
                                                               cameras: int, expected: int) -> None:
    # A lagging station's deeper queue holds only older frames: a live camera's share is the batch split among
    # the cameras, never below its queue_size (4).
    video = write_video(tmp_path / "v.avi", [], 10)
    cams = "".join(f"  - {{id: cam{i}, source: '{video}', live: true, max_fps: 30}}\n" for i in range(cameras))
    config = tmp_path / "station.yaml"
    config.write_text(f"station: live-share\nstate_dir: {tmp_path / 'state'}\n"
                      f"engine: {{auto_batch: false, max_batch: 8}}\ncameras:\n{cams}")
    station = build_from_args(run_parser().parse_args(
        ["--config", str(config), "--engine", str(toy_bundle), "--mqtt", mosquitto]))
    try:
        assert [c.source.queue.maxsize for c in station.cameras.values()] == [expected] * cameras
        station.use_batch(16)  # a swapped-in bundle or the size auto_batch chose
        assert [c.source.queue.maxsize for c in station.cameras.values()] == [max(4, 16 // cameras)] * cameras
        # one holder of the size: the batcher and the stats read it; the backend keeps its own capacity
        assert station.batch.size == station.batcher.max_batch == 16
        assert station.stats.as_dict("2026-01-01T00:00:00Z", 0, 0, False, 0)["batch_size"]["max"] == 16
    finally:
        station.outbox.close()
