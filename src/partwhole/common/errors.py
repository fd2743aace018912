"""The project's exceptions for what a user can fix: every stage turns them into one ``error:`` line.

* :class:`InputError`: bad input (a file, folder or setting); the message names it and the fix.
* :class:`SettingError`: a setting (a field of a stage's config dataclass) with a bad value. The library names
  the field; a command line names its flag instead (``partwhole_cli.user_error``), so the library needs no
  command-line vocabulary and the user still reads the flag they typed.
* :class:`OutputWriteError`: a file could not be written (disk full, quota, read-only folder).
* :func:`check_choice`: the error for a setting whose value is not one of its choices.
"""

from __future__ import annotations

import os


class InputError(ValueError):
    """Bad user input (file, folder or setting). The message names it and the fix."""


class SettingError(InputError):
    """``setting`` (a config field's name) has a bad ``value``; ``reason`` says why and what to do.

    ``str()`` reads ``setting=value: reason``; :meth:`for_flag` reads the same with the command line's flag
    (two dashes and the flag's name) in place of ``setting``.
    """

    def __init__(self, setting: str, value, reason: str):
        self.setting, self.value, self.reason = setting, value, reason
        shown = os.fspath(value) if isinstance(value, os.PathLike) else value  # a path reads as its text
        super().__init__(f"{setting}={shown!r}: {reason}")

    def for_flag(self, flag: str | None = None) -> str:
        """The message with the command line's flag (default: the flag of the same name as the setting)."""
        return f"--{flag or self.setting}={self.value}: {self.reason}"


class OutputWriteError(InputError):
    """A file could not be written (disk full, quota, read-only or forbidden folder). Names the folder and the size.

    ``size`` is the number of bytes the file needed, when known.
    """

    def __init__(self, message: str, size: int | None = None):
        super().__init__(message)
        self.size = size


def check_choice(setting: str, value: str, choices) -> None:
    """Raise :class:`SettingError` naming ``setting`` when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise SettingError(setting, value, f"unknown; choose one of {', '.join(sorted(choices))}")
