"""Bad command-line input, told apart from failures while a command runs.

A flag value that does not validate (a ValueError while building the config from
the flags, at the edge) becomes `UsageError`, which `kvrouter` reports as a usage
error (exit status 2, with the usage line). A ValueError raised later, while a
server or a benchmark runs, is a bug or a runtime failure and is reported as one,
never as bad usage.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class UsageError(Exception):
    """A flag value that cannot be used; the message names the flag."""


@contextlib.contextmanager
def flag_errors() -> Iterator[None]:
    """Turns a ValueError raised in the block (building configs from flags) into UsageError."""
    try:
        yield
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
