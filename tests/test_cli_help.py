"""Every command's --help as an operator reads it: each option's default, worked examples that still parse with the
very parser that prints them, and --version from the installed package's metadata.

Covers edge-run, edge-run label, edge-events, edge-train and each edge-train sub-command. The examples are parsed
with the parser object (shlex, program name dropped, parse_args), so an example naming a renamed or removed option
fails here instead of in front of an operator.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import pytest
from edge_helpers import cli_command, run_cli

from core.cli import DISTRIBUTION, NOT_INSTALLED, package_version
from edge.cli import events_main, events_parser, label_parser, run_main, run_parser
from trainer.cli import _parser as train_parser
from trainer.cli import main as train_main

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINTS: dict[str, Callable[[Optional[Sequence[str]]], int]] = {
    "edge-run": run_main, "edge-events": events_main, "edge-train": train_main}
EXAMPLE_HEADER = re.compile(r"^examples?\b.*:$")


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """A parser's sub-command parsers by name (none for a parser without sub-commands)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def all_parsers() -> dict[str, argparse.ArgumentParser]:
    """Every parser an operator meets, by the command line that reaches it (its prog)."""
    parsers = {"edge-run": run_parser(), "edge-run label": label_parser(), "edge-events": events_parser()}
    top = train_parser()
    parsers["edge-train"] = top
    parsers.update({f"edge-train {name}": sub for name, sub in subcommands(top).items()})
    return parsers


PARSERS = all_parsers()
SUBCOMMANDS = sorted(subcommands(PARSERS["edge-train"]))


def example_lines(epilog: Optional[str]) -> list[str]:
    """The indented command lines under an 'example:' / 'examples (...):' header of an epilog."""
    lines: list[str] = []
    inside = False
    for line in (epilog or "").splitlines():
        if EXAMPLE_HEADER.match(line):
            inside = True
        elif inside and line.startswith("  ") and line.strip():
            lines.append(line.strip())
        else:
            inside = False
    return lines


def parse_example(parser: argparse.ArgumentParser, line: str) -> argparse.Namespace:
    """An example line parsed by ``parser`` as the shell would split it, its program name dropped."""
    words = shlex.split(line, comments=True)
    prog = parser.prog.split()
    assert words[:len(prog)] == prog, f"{line!r} does not start with {parser.prog!r}"
    try:
        return parser.parse_args(words[len(prog):])
    except SystemExit as exc:
        raise AssertionError(f"{parser.prog}: the example {line!r} does not parse (exit {exc.code})") from None


def shown_defaults(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The options whose default --help must show: a real default (not None, not a flag's False)."""
    return [a for a in parser._actions if a.option_strings and a.default is not None
            and a.default is not argparse.SUPPRESS and not isinstance(a.default, bool)]


def help_text(prog: str, capsys: pytest.CaptureFixture[str]) -> str:
    """``<prog> --help`` through the console script's own entry point (in this process): its stdout."""
    words = prog.split()
    with pytest.raises(SystemExit) as exc:
        ENTRY_POINTS[words[0]]([*words[1:], "--help"])
    out = capsys.readouterr().out
    assert exc.value.code in (0, None), f"{prog} --help exited {exc.value.code}"
    return out


def test_every_edge_train_subcommand_is_covered() -> None:
    documented = ["fit", "eval", "rerun", "check-engine", "build-engine", "retrain", "promote", "rollback", "config"]
    assert sorted(documented) == SUBCOMMANDS  # a new sub-command is parametrized above too; this says which exist


@pytest.mark.parametrize("prog", sorted(PARSERS))
def test_help_shows_defaults_and_examples(prog: str, capsys: pytest.CaptureFixture[str]) -> None:
    parser = PARSERS[prog]
    out = help_text(prog, capsys)
    flat = " ".join(out.split())  # the formatter wraps; compare with its line breaks as spaces
    assert f"usage: {prog}" in flat
    assert re.search(r"^examples?\b", out, re.MULTILINE), f"{prog} --help has no example:\n{out}"
    for line in example_lines(parser.epilog):
        assert line in out, f"{prog} --help does not show the example {line!r} as written:\n{out}"
    assert "(default: None)" not in flat and "(default: False)" not in flat, out
    for action in shown_defaults(parser):
        said = action.help and "default" in action.help.lower()
        assert said or f"(default: {action.default})" in flat, f"{prog} {action.option_strings}: no default in:\n{out}"
    options = [a for a in parser._actions if a.option_strings and a.dest not in ("help", "version")]
    if options:  # edge-train and edge-train promote have no option but --help to give a default to
        assert "default" in flat, f"{prog} --help names no default:\n{out}"


@pytest.mark.parametrize("prog", sorted(PARSERS))
def test_every_example_parses_with_its_parser(prog: str) -> None:
    parser = PARSERS[prog]
    lines = example_lines(parser.epilog)
    assert lines, f"{prog}: no example in its epilog"
    for line in lines:
        args = parse_example(parser, line)
        words = shlex.split(line, comments=True)
        if prog.startswith("edge-train "):  # the same line through edge-train itself reaches this sub-command
            top = parse_example(PARSERS["edge-train"], line)
            assert top.command == prog.split()[1], line
        for word in words:  # a shipped file an example names is there
            if word.startswith("config/"):
                assert (REPO / word).is_file(), f"{prog}: example {line!r} names {word}, which does not exist"
        if prog == "edge-train fit" and args.model:
            from trainer.models import check_model_name

            check_model_name(args.model)  # raises on a model name the registry no longer has


def test_a_rotten_example_fails_the_check() -> None:
    """The check can fail: an example with a removed option, or a missing positional, does not parse."""
    epilog = "examples (a note):\n  edge-train eval --data demo-out/data\n  edge-train eval b --dataset d\n\nmore"
    assert example_lines(epilog) == ["edge-train eval --data demo-out/data", "edge-train eval b --dataset d"]
    for line in example_lines(epilog):
        with pytest.raises(AssertionError, match="does not parse"):
            parse_example(PARSERS["edge-train eval"], line)


@pytest.mark.parametrize("prog", sorted(ENTRY_POINTS))
def test_version_is_the_installed_distributions(prog: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        ENTRY_POINTS[prog](["--version"])
    assert exc.value.code in (0, None)
    assert capsys.readouterr().out == f"{prog} {importlib.metadata.version(DISTRIBUTION)}\n"


def test_version_without_package_metadata_says_so() -> None:
    """A distribution whose metadata is absent (a bare checkout) reads as 'unknown (not installed)', no traceback."""
    assert package_version("edge-anomaly-no-such-distribution") == NOT_INSTALLED
    assert package_version() == importlib.metadata.version(DISTRIBUTION) != NOT_INSTALLED


def _console_script(name: str) -> list[str]:
    """The installed console script next to this interpreter (edge-train has no fallback in edge_helpers)."""
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", "trainer.cli"]


def test_console_scripts_print_their_version() -> None:
    expected = importlib.metadata.version(DISTRIBUTION)
    for name in ("edge-run", "edge-events"):
        proc = run_cli(name, ["--version"])
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"{name} {expected}\n", ""), cli_command(name)
    proc = subprocess.run([*_console_script("edge-train"), "--version"], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"edge-train {expected}\n", "")
