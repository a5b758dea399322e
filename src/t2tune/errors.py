"""What a user is told: errors they can fix (the CLI prints them as one line and exits with
code 2, no traceback) and one-line notices on stderr (:func:`say`)."""

import sys
from typing import Any


def say(message: str) -> None:
    """One line on stderr, prefixed ``t2tune:``, as every notice, warning and error reads."""
    print(f"t2tune: {message}", file=sys.stderr)


class UserError(Exception):
    """Bad input, config or environment; the message names the file and line, or the setting."""


class ConfigError(UserError, ValueError):
    """A configuration key or value is wrong."""


class DataError(UserError):
    """A data file or row is unusable."""


def short(value: Any, width: int = 60) -> str:
    """A bounded repr for error messages (a YAML alias bomb must not become a 10 MB message).

    >>> short("x" * 100, width=20)
    "'xxxxxxx...xxxxxxxx'"
    """
    import reprlib

    shortener = reprlib.Repr()
    shortener.maxlevel, shortener.maxlist, shortener.maxdict, shortener.maxstring = 2, 4, 4, width
    text = shortener.repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."
