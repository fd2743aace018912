"""Safe file handling for every stage: atomic writes, strict JSON, stale temporaries, disk-error
messages, and the restricted unpickler for untrusted pickles.

* :func:`atomic_write_bytes` writes through a temporary file beside the target, fsyncs, then renames:
  a kill, a crash or a full disk never leaves a truncated file under a real name.
  :func:`atomic_write_json` does the same for strict JSON (non-finite numbers as ``null``).
* A full disk, quota or read-only folder is an :class:`~partwhole.common.errors.OutputWriteError`
  whose message (:func:`describe_write_error`) names the folder and the space needed.
* :func:`remove_stale_temporaries` clears what killed writers left (only our own temporary names).
* Pickles on disk are untrusted: :func:`safe_pickle_load` opens them with
  :class:`RestrictedUnpickler`, which builds numpy arrays and plain containers and refuses anything else.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import pickle
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from partwhole.common.errors import InputError, OutputWriteError

_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy._core.numeric", "_frombuffer"),
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("builtins", "dict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "bytearray"),
    ("builtins", "complex"),
    ("builtins", "slice"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # bytes written by protocol 0-2 pickles
}
_ALLOWED_NUMPY_DTYPE_MODULES = ("numpy.dtypes",)  # numpy>=1.25 pickles dtype classes by name


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that builds only numpy arrays, dtypes and plain containers."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS or (
            module in _ALLOWED_NUMPY_DTYPE_MODULES and name.endswith("DType")
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays and plain containers are allowed")


def safe_pickle_load(path: str | os.PathLike) -> Any:
    """Load a pickle from disk with :class:`RestrictedUnpickler`.

    Raises:
        InputError: the file is missing, truncated, or holds anything but numpy
            arrays and plain containers (the message names the file).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return RestrictedUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        raise InputError(f"{path}: untrusted or corrupt pickle ({exc}); delete it and rerun the stage that writes it") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, ImportError) as exc:
        raise InputError(f"{path}: corrupt pickle ({type(exc).__name__}: {exc}); delete it and rerun the stage that writes it") from None


# --------------------------------------------------------------------------- writing


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()  # read once at import: os.umask can only be read by setting it


# Temporary files: ``.<name>.partwhole-<host>-<pid>-<8 random>.tmp`` beside ``<name>``. The host and
# pid say whose a file is, so a later run removes only files whose writer is gone (see
# remove_stale_temporaries); the ``partwhole-`` tag keeps the pattern from matching anyone else's files.
_TMP_TAG = "partwhole"
_TMP_NAME = re.compile(r"^\.(?P<name>.+)\." + _TMP_TAG + r"-(?P<host>[A-Za-z0-9-]+)-(?P<pid>[0-9]+)-[A-Za-z0-9_]{8}\.tmp$")
_HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0])[:32] or "host"
STALE_FOREIGN_SECONDS = 3600  # a temporary file of another machine's process is stale once this old
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def free_bytes(folder: str | os.PathLike) -> int | None:
    """Bytes this user may still write in ``folder`` (its nearest existing parent), or None if unknown."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        stat = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return stat.f_bavail * stat.f_frsize


def format_bytes(n: int) -> str:
    """``12.3 kB``, ``4.5 MB``, ``6.7 GB``: sizes in error messages."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e3:.1f} kB"


def describe_write_error(exc: OSError, path: str | os.PathLike, size: int | None = None) -> str:
    """One line for a failed write of ``path``: the file, its folder, the reason and (if known) the space."""
    path = Path(path)
    reason = exc.strerror or type(exc).__name__
    line = f"cannot write {path.name} in {path.parent} ({reason})"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        free = free_bytes(path.parent)
        needed = f"needs {format_bytes(size)}" if size is not None else ""
        free_text = f"{format_bytes(free)} free" if free is not None else ""
        if needed or free_text:
            line += f": {', '.join(t for t in (needed, free_text) if t)}"
        line += "; free some space (or raise the quota) and rerun"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        line += "; choose a writable folder"
    return line


def atomic_write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> int:
    """Write ``data`` to ``path`` through a temporary file in the same folder, fsync, then ``os.replace``.

    A reader, a full disk or a killed writer never leaves a truncated ``path``: the previous file
    stays whole until the new one is complete on disk. The folder is fsynced too, so the rename
    survives a crash.

    Raises:
        OutputWriteError: the folder cannot be written (disk full, quota, read-only, permissions);
            the message names the folder, the file and the space it needs. No temporary file is left.

    Returns:
        the number of bytes written.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_TMP_TAG}-{_HOST}-{os.getpid()}-", suffix=".tmp", dir=path.parent)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual open() permissions
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        tmp = None
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:  # described after the unlink: free space is right
            raise OutputWriteError(describe_write_error(exc, path, len(data)), size=len(data)) from exc
        raise
    _fsync_folder(path.parent)
    return len(data)


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, inf) as ``None`` and numpy scalars and arrays as Python
    numbers and lists, so that it serialises as strict JSON (``jq``, JavaScript and ``json.load`` with
    ``parse_constant`` refuse ``NaN``)."""
    if isinstance(obj, dict):
        return {str(k): strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return strict_json(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", None) == 0:  # a 0-d tensor
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> int:
    """Write ``obj`` as strict JSON (:func:`strict_json`: non-finite numbers become ``null``), atomically."""
    import json

    return atomic_write_bytes(path, (json.dumps(strict_json(obj), indent=indent, allow_nan=False) + "\n").encode())


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on folders; the file itself is already on disk
        pass
    finally:
        os.close(fd)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def is_stale_temporary(path: str | os.PathLike, now: float | None = None) -> bool:
    """Whether ``path`` is a temporary file of :func:`atomic_write_bytes` whose writer is gone.

    Ours (this machine): its process has ended. Another machine's (a shared filesystem): older than
    :data:`STALE_FOREIGN_SECONDS`. Anything not named like our temporary files: False.
    """
    path = Path(path)
    match = _TMP_NAME.match(path.name)
    if match is None:
        return False
    if match["host"] == _HOST:
        return int(match["pid"]) != os.getpid() and not _process_alive(int(match["pid"]))
    try:
        age = (now if now is not None else time.time()) - path.stat().st_mtime
    except FileNotFoundError:
        return False
    return age > STALE_FOREIGN_SECONDS


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the leftover temporary files of killed writers under ``folder`` (recursively); return them.

    Only files named like :func:`atomic_write_bytes`'s temporaries whose writer is gone
    (:func:`is_stale_temporary`); nothing else is touched, and a missing folder is fine.
    """
    removed = []
    stack = [Path(folder)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
            elif entry.name.endswith(".tmp") and entry.is_file(follow_symlinks=False) and is_stale_temporary(entry.path):
                try:
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
                except FileNotFoundError:
                    pass
    return removed
