"""The floors of the house: core/ imports no torch, paho or TensorRT; the trainer stands on core/, never on the
station's command line or capture; importing a module never changes the process's environment."""

from __future__ import annotations

import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "paho", "tensorrt", "cuda", "pycuda", "trainer", "edge")


def modules_of(package: str) -> list[str]:
    """Every module of ``package`` (a folder of the repository), by dotted name."""
    root = REPO / package
    names = [package]
    for info in pkgutil.walk_packages([str(root)], prefix=f"{package}."):
        names.append(info.name)
    return sorted(names)


def test_core_imports_no_torch_paho_tensorrt_nor_either_side() -> None:
    """A fresh interpreter imports every module of core/; nothing heavy, and neither side, may come along."""
    mods = modules_of("core")
    assert "core.bundle" in mods and "core.configfile" in mods and len(mods) >= 8
    script = (f"import importlib, json, sys\nfor m in {mods!r}:\n    importlib.import_module(m)\n"
              "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    loaded = json.loads(out.stdout)
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY)
    assert not heavy, f"core/ pulled in {heavy}"


def imported_modules(path: Path) -> set[str]:
    """The modules a file imports (``import a.b`` and ``from a.b import c``, at any depth of the file)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


STATION_ONLY = ("edge.cli", "edge.sources", "edge.pipeline", "edge.assembly", "edge.mqtt", "edge.sinks",
                "edge.outbox", "edge.collect")


def station_imports_in_trainer() -> list[str]:
    bad = []
    for path in sorted((REPO / "trainer").rglob("*.py")):
        for mod in imported_modules(path):
            if any(mod == s or mod.startswith(s + ".") for s in STATION_ONLY):
                bad.append(f"{path.relative_to(REPO)} imports {mod}")
    return bad


def test_the_trainer_never_imports_the_station_cli_or_capture() -> None:
    assert station_imports_in_trainer() == []


def test_the_import_scan_sees_a_station_import(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text("def f():\n    from edge.sources import CameraSource\n    import edge.cli\n")
    assert {"edge.sources", "edge.sources.CameraSource", "edge.cli"} <= imported_modules(planted)


def environment_writes_at_import(path: Path) -> list[int]:
    """Lines of module-level statements (outside functions and classes) that write os.environ."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    lines = []
    for stmt in tree.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue
        for node in ast.walk(stmt):
            text = ast.unparse(node) if isinstance(node, (ast.Call, ast.Assign, ast.Subscript)) else ""
            if ("os.environ" in text and any(w in text for w in ("setdefault", "update", "__setitem__", "pop(")))\
                    or "os.putenv" in text or (isinstance(node, ast.Assign) and any(
                        "os.environ[" in ast.unparse(t) for t in node.targets)):
                lines.append(stmt.lineno)
                break
    return lines


@pytest.mark.parametrize("package", ["core", "edge", "trainer"])
def test_no_module_changes_the_environment_at_import(package: str) -> None:
    bad = {str(p.relative_to(REPO)): environment_writes_at_import(p) for p in sorted((REPO / package).rglob("*.py"))}
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_environment_scan_sees_a_write_at_import(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text("import os\nos.environ.setdefault('A', 'b')\nos.environ['C'] = 'd'\n"
                       "def f():\n    os.environ['E'] = 'f'\n")
    assert environment_writes_at_import(planted) == [2, 3]
