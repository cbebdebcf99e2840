"""What every command line of the project shares: one-line usage errors, help that shows defaults and keeps
examples as written, ``--version``, and argument types."""

from __future__ import annotations

import argparse
import textwrap
from importlib.metadata import PackageNotFoundError, version
from typing import Any, NoReturn

DISTRIBUTION = "edge-anomaly"
NOT_INSTALLED = "unknown (not installed)"


def package_version(distribution: str = DISTRIBUTION) -> str:
    """The installed distribution's version, or a plain "unknown (not installed)" when run from a bare checkout."""
    try:
        return version(distribution)
    except PackageNotFoundError:
        return NOT_INSTALLED


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, minus its noise, plus examples that keep their line breaks.

    An option's default is appended as "(default: X)" only when it has one: not for None (the option is unset
    unless given), not for a flag's False, and not when its help already says what the default is. In a
    description or epilog, an indented line (an example command) is kept as written, so it can be copied;
    other lines are wrapped to the terminal as usual.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        default = action.default
        if (default is None or default is argparse.SUPPRESS or isinstance(default, bool)
                or "default" in help_text.lower() or not action.option_strings):
            return action.help
        return f"{help_text} (default: %(default)s)"

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        lines = []
        for line in text.splitlines():
            if not line.strip() or line[:1].isspace():
                lines.append(indent + line if line.strip() else "")
            else:
                lines.append(textwrap.fill(line, width, initial_indent=indent, subsequent_indent=indent,
                                           break_long_words=False, break_on_hyphens=False))
        return "\n".join(lines)


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line too, and help shows defaults and examples (every CLI of the
    project uses it; sub-command parsers are of the same class, so they get both)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def add_version(self) -> None:
        """``--version``: ``<prog> <installed version>``, exit 0."""
        self.add_argument("--version", action="version", version=f"%(prog)s {package_version()}",
                          help="print the program's version and exit")

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value
