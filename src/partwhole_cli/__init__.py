"""The command lines: thin wiring from absl flags to the library (``partwhole``), as ``scripts/amg.py`` is to
``segment_anything``. Each module is one console script (``pyproject.toml``); the reference's paths
(``src/main.py``, ``src/hierarchical_masks/*.py``) run the same functions.
"""

from __future__ import annotations

import sys
from types import ModuleType
from typing import Callable

from absl import app, flags

from partwhole.common.errors import SettingError


def run_cli(main: Callable, doc: str | None, *flag_modules: ModuleType) -> None:
    """``app.run(main)`` for a console script or a thin entry point, whose ``__main__`` is not the CLI module:
    ``--help`` shows ``doc`` and the flags defined in ``flag_modules`` (absl lists the ``__main__`` module's)."""
    sys.modules["__main__"].__doc__ = doc
    for module in flag_modules:
        for flag in flags.FLAGS.get_key_flags_for_module(module):
            flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(main)


def user_error(exc: Exception, flag_of: dict[str, str] | None = None) -> str:
    """The one-line message a command line prints for a library error: a :class:`SettingError` names the flag
    (``flag_of[setting]``, default the flag of the same name), anything else reads as raised."""
    if isinstance(exc, SettingError):
        return exc.for_flag((flag_of or {}).get(exc.setting))
    return str(exc)
