"""Fixtures shared by the tests: a real Mosquitto broker and a toy bundle."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/edge_helpers.py importable everywhere

from edge_helpers import Mosquitto, free_port, make_toy_bundle, mosquitto_binary  # noqa: E402


def _mosquitto_binary() -> str:
    found = mosquitto_binary()
    if not found:
        pytest.fail("mosquitto not found: the edge tests need a real MQTT broker; "
                    "install it with `sudo apt-get install mosquitto`", pytrace=False)
    return found


def _pin_xdist_worker() -> int:
    """Under pytest-xdist (``make test`` runs two workers) each worker, and every process it starts, gets its own
    share of the cores; returns that share's size (0 when not a worker). With torch's and ONNX Runtime's default
    thread counts two workers would run four busy threads on two cores, which makes tight loops many times slower."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if not worker.startswith("gw") or count < 2 or not hasattr(os, "sched_setaffinity"):
        return 0
    cores = sorted(os.sched_getaffinity(0))
    share = cores[int(worker[2:]) % count::count] or cores  # more workers than cores: they share all of them
    os.sched_setaffinity(0, share)
    os.environ["OMP_NUM_THREADS"] = str(len(share))  # the trainers and torchrun ranks the tests start
    return len(share)


_WORKER_CORES = _pin_xdist_worker()

try:  # the trainer's tests need torch; the station's do not (edge-run runs without it)
    import torch
    if _WORKER_CORES:
        torch.set_num_threads(_WORKER_CORES)
    _TORCH_THREADS = torch.get_num_threads()
except ImportError:
    torch = None  # type: ignore[assignment]


@pytest.fixture(scope="module", autouse=True)
def torch_threads_restored() -> Iterator[None]:
    """torch's thread count is process-wide: a module that pins it (1 thread against a loaded machine) must not
    slow the next module's training (GANomaly took 1.6x as long after one had pinned 1 thread)."""
    yield
    if torch is not None:
        torch.set_num_threads(_TORCH_THREADS)


@pytest.fixture(scope="session")
def mosquitto_bin() -> str:
    """Path of the mosquitto binary (fails with an install hint when missing)."""
    return _mosquitto_binary()


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory, mosquitto_bin: str) -> Iterator[str]:
    """A real Mosquitto on a free loopback port; yields its URL (mqtt://127.0.0.1:PORT)."""
    try:
        broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"), free_port(), mosquitto_bin)
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield broker.url
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def toy_engines(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An engines/ root holding model 'toy' with one promoted version (input 32×32, threshold 0.1)."""
    root = tmp_path_factory.mktemp("toy") / "engines"  # named engines/: the default engines_dir
    make_toy_bundle(root)
    return root


@pytest.fixture(scope="session")
def toy_bundle(toy_engines: Path) -> Path:
    """The toy bundle's version folder."""
    model_dir = toy_engines / "toy"
    return model_dir / (model_dir / "current").read_text().strip()


@pytest.fixture
def unused_port() -> int:
    """A loopback port where nothing listens (for the unreachable-broker tests)."""
    return free_port()
