"""Make the installed ``tensorrt-stubs`` usable by mypy (run by the Makefile after installing them).

The package (10.13.0.35.1) puts its stubs in ``tensorrt/`` and ``tensorrt_bindings/`` without a ``py.typed``
marker, so mypy skips them ("installed, but missing library stubs or py.typed marker") and every TensorRT
name silently becomes ``Any``; and five generated signatures are not valid Python (a parameter named ``in``,
a parameter without a default after defaulted ones), which stops mypy once it does read them. This adds the
markers and repairs those lines in place. Idempotent; changes nothing when the stubs are not installed.
"""

from __future__ import annotations

import re
import sys
import sysconfig
from pathlib import Path

PACKAGES = ("tensorrt", "tensorrt_bindings")


def patch(site: Path) -> list[str]:
    """Patch the stubs under ``site``; returns what was changed (empty when nothing needed it)."""
    changed: list[str] = []
    stub = site / "tensorrt_bindings" / "tensorrt.pyi"
    if not stub.is_file():
        return changed
    text = stub.read_text(encoding="utf-8")
    fixed = re.sub(r"\bin: (list\[\w+\])", r"in_: \1", text)  # 'in' is a keyword
    fixed = fixed.replace("power: Weights = None, channel_axis: int)",
                          "power: Weights = None, channel_axis: int = ...)")  # no default after defaults
    if fixed != text:
        stub.write_text(fixed, encoding="utf-8")
        changed.append(f"{stub}: repaired {len(re.findall(r'in_: list', fixed)) + 1} signature(s)")
    for name in PACKAGES:
        marker = site / name / "py.typed"
        if marker.parent.is_dir() and not marker.exists():
            marker.touch()
            changed.append(f"{marker}: added")
    return changed


def main() -> int:
    site = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(sysconfig.get_paths()["purelib"])
    for line in patch(site):
        print(f"patch_tensorrt_stubs: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
