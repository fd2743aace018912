"""The project's exceptions for what a user can fix: every stage turns them into one ``error:`` line.

* :class:`InputError`: bad input (a file, folder or flag); the message names it and the fix.
* :class:`OutputWriteError`: a file could not be written (disk full, quota, read-only folder).
* :func:`check_choice`: the one-line error for a flag value that is not one of its choices.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input (file, folder or flag). The message names it and the fix."""


class OutputWriteError(InputError):
    """A file could not be written (disk full, quota, read-only or forbidden folder). Names the folder and the size.

    ``size`` is the number of bytes the file needed, when known.
    """

    def __init__(self, message: str, size: int | None = None):
        super().__init__(message)
        self.size = size


def check_choice(flag: str, value: str, choices) -> None:
    """Raise :class:`InputError` naming ``--flag`` when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise InputError(f"--{flag}={value!r} is unknown; choose one of {', '.join(sorted(choices))}")
