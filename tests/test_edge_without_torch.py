"""The station must install and run without torch: a Jetson or an industrial PC carries no training stack.

The venv here has torch (the trainer needs it), so the run below makes importing it, or anything of the
trainer's, fail inside the edge-run process, then runs a whole station end to end.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from edge_helpers import REPO, Collector, check_events, check_payloads, wait_stopped, write_video

BLOCKED = ("torch", "torchvision", "trainer", "sklearn", "matplotlib", "onnxconverter_common")

LAUNCHER = f"""
import importlib.abc, sys

class NoTrainingStack(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is not installed on a station")
        return None

sys.meta_path.insert(0, NoTrainingStack())
from edge.cli import run_main
code = run_main(sys.argv[1:])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r})
assert not loaded, loaded
sys.exit(code)
"""


def test_edge_run_works_with_the_training_stack_absent(tmp_path: Path, mosquitto: str, toy_bundle: Path) -> None:
    defects = [(20, 35)]
    video = write_video(tmp_path / "line.avi", defects, 50)
    with Collector(mosquitto, ["anomaly/notorch/#"]) as col:
        proc = subprocess.run(
            [sys.executable, "-c", LAUNCHER, "--camera", str(video), "--engine", str(toy_bundle),
             "--mqtt", mosquitto, "--station", "notorch", "--state-dir", str(tmp_path / "state")],
            capture_output=True, text=True, timeout=120, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        wait_stopped(col)
        got = check_payloads(col)
    check_events(got["event"], defects, "cam0")
