"""The one exception type that means "the user asked for something we cannot do".

The CLI prints its message as a single line and exits 2; anything else is a bug and keeps
its traceback.
"""
from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A mistake in the user's input (file, flag, shape); the message says what and how to fix it."""


class NonFiniteError(UserError):
    """NaN or inf appeared while sampling (damaged weights, absurd noise); says where first."""


def positive_int(text: str) -> int:
    """argparse type for counts (rounds, calls): an integer of at least 1, else argparse's one line."""
    import argparse

    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def main_or_exit(main: Callable[[], object]) -> None:
    """Run a script's `main`; a UserError ends it as the CLI does: one "error:" line, exit status 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
