"""The installs the README promises: the CPU torch (no nvidia-* wheels in the venv make built); the station's own
(``pip install .``) resolves without torch or any of the training stack; the Makefile's probe of the torch wheel
index (scripts/torch_index.py) gives pip the index only when it answers, at once, over a real socket, and leaves it
out with one line when it does not."""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from edge_helpers import REPO

TRAINING_STACK = {"torch", "torchvision", "timm", "onnx", "scikit-learn", "matplotlib", "freia"}


def test_the_station_install_resolves_without_the_training_stack(tmp_path: Path) -> None:
    """What ``pip install .`` would install on a fresh station (pip's own resolver, nothing installed counted)."""
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
                           "--no-build-isolation", "--quiet", "--report", str(report), str(REPO)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    names = {item["metadata"]["name"].lower() for item in json.loads(report.read_text())["install"]}
    assert {"edge-anomaly", "onnxruntime", "opencv-python-headless", "paho-mqtt", "numpy"} <= names
    assert not names & TRAINING_STACK, names & TRAINING_STACK


def probe(index: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "torch_index.py"), index], capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def wheel_index(tmp_path: Path) -> Iterator[str]:
    """A PEP 503 index on a real socket that lists a torch page."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "index.html").write_text("<html><body></body></html>")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(tmp_path), **kwargs)  # type: ignore[arg-type]

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_an_index_that_answers_is_given_to_pip(wheel_index: str) -> None:
    done = probe(wheel_index)
    assert done.returncode == 0 and done.stdout.split() == ["--extra-index-url", wheel_index], done
    assert done.stderr == ""


def test_an_index_that_does_not_answer_is_left_out_with_one_line() -> None:
    with socket.socket() as s:  # a port nothing listens on: refused at once, as an unknown host fails at once
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/whl/cpu"
    done = probe(closed)
    assert done.returncode == 0 and done.stdout == "", done  # make goes on, with the configured indexes
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and closed in lines[0] and "does not answer" in lines[0], lines


def test_an_empty_index_means_the_configured_indexes() -> None:
    done = probe("")
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_the_venv_holds_the_cpu_torch_without_nvidia_wheels() -> None:
    """make installs the CPU build (TORCH_INDEX): a CUDA torch would have pulled nvidia-* wheels of several GB."""
    from importlib.metadata import distributions, version

    nvidia = sorted(d.metadata["Name"] for d in distributions() if d.metadata["Name"].lower().startswith("nvidia"))
    assert not nvidia, f"the CUDA build of torch came with {nvidia}: install from TORCH_INDEX (the CPU index)"
    assert version("torch").split("+")[0] == "2.13.0"


@pytest.mark.slow
def test_a_station_installed_alone_runs_a_bundle(tmp_path: Path, mosquitto: str) -> None:
    """``pip install .`` into a fresh venv (no torch there: the station's runtime only, 378 MB) runs edge-run on a
    bundle end to end: events for the defect stretch of a clip reach the broker. Slow: the install copies ~100 MB
    of wheels (20-45 s on this VM)."""
    from edge_helpers import Collector, check_events, check_payloads, make_toy_bundle, wait_stopped, write_video

    venv = tmp_path / "station-venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    done = subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", str(REPO)], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    missing = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"], capture_output=True, text=True)
    assert missing.returncode != 0 and "No module named 'torch'" in missing.stderr
    bundle = make_toy_bundle(tmp_path / "engines")
    defects = [(20, 35)]
    video = write_video(tmp_path / "line.avi", defects, 50)
    with Collector(mosquitto, ["anomaly/alone/#"]) as col:
        run = subprocess.run([str(venv / "bin" / "edge-run"), "--camera", str(video), "--engine", str(bundle),
                              "--mqtt", mosquitto, "--station", "alone", "--state-dir", str(tmp_path / "state")],
                             capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        wait_stopped(col)
        got = check_payloads(col)
    check_events(got["event"], defects, "cam0")
