"""The README's quick start runs as written: `make demo`'s script, then the by-hand block, in a copy of the checkout.

Slow (the demo fits a model and streams a clip: about 1.5 minutes on 2 cores), so it runs with `make test-slow`.
The by-hand block is taken from README.md itself; only the broker's port is swapped for a free one and the
venv is this one, so a README edit that breaks the block fails here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from edge_helpers import REPO, free_port, mosquitto_binary

pytestmark = pytest.mark.slow


def by_hand_block(readme: str) -> str:
    """The bash block that follows "Then do the same steps by hand" in the quick start."""
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    after = quick.split("Then do the same steps by hand", 1)[1]
    match = re.search(r"```bash\n(.*?)```", after, re.S)
    assert match, "README's quick start has no by-hand bash block"
    return match.group(1)


def test_the_by_hand_block_is_found() -> None:
    block = by_hand_block((REPO / "README.md").read_text(encoding="utf-8"))
    assert "edge-run" in block and "edge-events" in block and "1884" in block


def test_readme_quick_start_runs_as_written(tmp_path: Path) -> None:
    mosquitto = mosquitto_binary()
    assert mosquitto, "mosquitto is needed (apt-get install mosquitto)"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    clone = tmp_path / "clone"
    for name in tracked.splitlines():
        src = REPO / name
        if src.is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, clone / name)
    venv = Path(sys.executable).parent.parent
    (clone / ".venv").symlink_to(venv)
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    demo = subprocess.run([sys.executable, "scripts/demo.py"], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=600)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "events opened on good parts: 0" in demo.stdout, demo.stdout[-3000:]

    port = free_port()
    block = by_hand_block((clone / "README.md").read_text(encoding="utf-8"))
    block = block.replace("1884", str(port)).replace("/usr/sbin/mosquitto", mosquitto)
    script = "set -e\n" + block.replace("kill %2 %1", "sleep 1; kill %2 %1; wait") + "\n"
    proc = subprocess.run(["bash", "-c", script], cwd=clone, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    events = [line for line in proc.stdout.splitlines() if line.startswith("{") and '"event_id"' in line]
    kinds = [re.search(r'"type":\s*"(\w+)"', line).group(1) for line in events]  # type: ignore[union-attr]
    assert kinds.count("start") == 2 and kinds.count("end") == 2, proc.stdout[-3000:]
