"""benchmarks/gpu_check.py on a machine without a GPU: it runs, says so, and still prints the CPU rows."""

from __future__ import annotations

import subprocess
import sys

from edge_helpers import REPO


def test_gpu_check_runs_without_a_gpu_and_says_so() -> None:
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--size", "64", "--train", "8", "--batches", "1",
                           "--seconds", "0.05"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "GPU: none: torch.cuda.is_available() is False" in out and "no GPU here" in out
    assert "TensorRT: cannot import tensorrt" in out
    assert "| ONNX Runtime CPU: scores | fp16 graph |" in out and "Traceback" not in proc.stderr
