"""The project's data contracts: image folders, mask files and embedding files.

Every stage reads and writes these files only through this module:

* image folders ``<root>/<class>/<image>`` (Imagenette layout), listed by
  :func:`list_image_folder` and opened by :func:`load_rgb_image`;
* stage-1 masks, one pickle per image: :func:`save_masks` / :func:`load_masks`;
* stage-2 embeddings, one pickle per image: :func:`save_embeddings` /
  :func:`load_embeddings`.

Pickles on disk are untrusted: they are opened only through
:class:`RestrictedUnpickler`, which allows numpy arrays and plain containers and
refuses anything else. Writes are atomic (:func:`atomic_write_bytes`: a temporary
file beside the target, fsync, rename); a full disk or read-only folder is an
:class:`OutputWriteError`, and :func:`remove_stale_temporaries` clears what killed
writers left.

Mask formats (ours, lossless): a pickled ``dict`` with ``format`` (see
:data:`MASK_FORMATS`), the masks' ``shape`` ``(N, 3, H, W)`` and metadata
(``grid``, ``img_size``, ``patch_size``, ``levels``, ``sam_model``, ...).
``partwhole-masks/2`` (v2, written by default) stores each distinct mask of the
image once -- most of a grid's masks repeat, as many points fall inside the same
region -- as ``distinct``: the zlib-compressed bits of ``(M, H*W)``, one mask per
row (:func:`pack_mask_rows`), and ``index``: the zlib-compressed bytes of the
``(N, 3)`` array (dtype ``index_dtype``, ``<u2`` or ``<u4``) saying which distinct
mask each point and level has. ``partwhole-masks/1`` (v1) stores ``packed``: the
zlib-compressed ``np.packbits`` of all ``(N, 3, H, W)`` masks. Both hold only
bytes, numbers and strings, so the restricted unpickler needs no numpy class for
them. The reference format (a pickled list of ``N`` bool arrays ``(3, H, W)``,
about 29.5 MB per 224 px image) is read as well. :func:`load_masks` and
:func:`read_mask_record` give full ``(N, 3, H, W)`` masks from any of them;
:func:`read_distinct_masks` gives the distinct masks and the index.
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
import zlib
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
IGNORED_NAMES = ("failed.txt", ".DS_Store", "Thumbs.db")


class InputError(ValueError):
    """Bad user input (file, folder or flag). The message names it and the fix."""


# --------------------------------------------------------------------------- pickles


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


class OutputWriteError(InputError):
    """A file could not be written (disk full, quota, read-only or forbidden folder). Names the folder and the size.

    ``size`` is the number of bytes the file needed, when known.
    """

    def __init__(self, message: str, size: int | None = None):
        super().__init__(message)
        self.size = size


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


# --------------------------------------------------------------------------- point grid


def patch_grid_points(img_size: int, patch_size: int) -> np.ndarray:
    """Patch-centre points of a square image, ``(G*G, 2)`` float ``(x, y)`` pixels.

    ``G = img_size // patch_size``; row-major: point ``k = row * G + col`` lies
    at ``(col * p + p / 2, row * p + p / 2)`` (SAM takes points as ``x, y``).
    """
    if patch_size <= 0 or img_size <= 0 or img_size % patch_size:
        raise InputError(
            f"img_size={img_size} must be a positive multiple of patch_size={patch_size}; "
            "choose e.g. --img_size=224 --patch_size=16"
        )
    grid = img_size // patch_size
    centres = np.arange(grid, dtype=np.float64) * patch_size + patch_size / 2
    rows, cols = np.meshgrid(centres, centres, indexing="ij")  # (G, G) each
    return np.stack([cols.ravel(), rows.ravel()], axis=1)


# --------------------------------------------------------------------------- masks

MASK_FORMATS = {"v1": "partwhole-masks/1", "v2": "partwhole-masks/2"}
DEFAULT_MASK_FORMAT = "v2"
_INDEX_DTYPES = ("<u2", "<u4")  # v2's index: uint16 up to 65,535 distinct masks, else uint32
_RECORD_KEYS = ("format", "packed", "distinct", "index", "index_dtype")  # not metadata


def distinct_mask_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each distinct row of ``rows`` once, in order of first appearance, and where every row went.

    Args:
        rows: ``(K, B)`` array, one (packed) mask per row.

    Returns:
        ``(distinct (M, B), index (K,) int64)`` with ``distinct[index] == rows``.
        A row is keyed by its bytes (a dict lookup per row), so this costs one
        pass over the data.
    """
    ids: dict[bytes, int] = {}
    index = np.fromiter((ids.setdefault(row.tobytes(), len(ids)) for row in rows), dtype=np.int64, count=len(rows))
    first = np.unique(index, return_index=True)[1]  # the row where each id first appears, ids in order
    return rows[first], index


def pack_mask_rows(masks: np.ndarray) -> np.ndarray:
    """``(..., H, W)`` bool masks -> ``(K, ceil(H*W/8))`` uint8, one mask per row, bits packed big-endian."""
    height, width = masks.shape[-2:]
    return np.packbits(masks.reshape(-1, height * width), axis=1)


def unpack_mask_rows(rows: np.ndarray, height: int, width: int) -> np.ndarray:
    """Inverse of :func:`pack_mask_rows`: bool ``(K, H, W)``."""
    return np.unpackbits(rows, axis=1, count=height * width).reshape(-1, height, width).astype(bool)


class DistinctMasks(NamedTuple):
    """One image's masks as stored: each distinct mask once, and which one every point and level has.

    ``bits`` is uint8 ``(M, ceil(H*W/8))``, mask ``m`` bit-packed in row ``m``
    (:func:`pack_mask_rows`); ``index`` is int64 ``(N, L)``: point ``k`` at level
    ``l`` has distinct mask ``index[k, l]``; ``shape`` is ``(N, L, H, W)``, the
    masks' shape once expanded; ``meta`` the stored metadata.
    """

    bits: np.ndarray
    index: np.ndarray
    shape: tuple[int, int, int, int]
    meta: dict[str, Any]

    @property
    def num_distinct(self) -> int:
        return len(self.bits)

    def distinct(self) -> np.ndarray:
        """The distinct masks, bool ``(M, H, W)``."""
        return unpack_mask_rows(self.bits, *self.shape[2:])

    def expand(self) -> np.ndarray:
        """Every point's masks, bool ``(N, L, H, W)``."""
        return self.distinct()[self.index]


def save_masks(path: str | os.PathLike, masks: np.ndarray, *, mask_format: str = DEFAULT_MASK_FORMAT, **meta: Any) -> int:
    """Save bool masks ``(N, 3, H, W)`` losslessly and atomically; return the file's size in bytes.

    ``mask_format``: ``v2`` (the default) stores each distinct mask of the image
    once plus the ``(N, 3)`` index of which one every point and level has; ``v1``
    stores all ``N * 3`` masks. Both are bit-packed and zlib-compressed, and every
    reader takes both. ``meta`` (plain values: ints, strings, tuples) is stored
    beside the masks, e.g. ``grid=14, img_size=224, patch_size=16, sam_model='vit_h'``.
    """
    if mask_format not in MASK_FORMATS:
        raise ValueError(f"mask_format={mask_format!r}: use one of {', '.join(MASK_FORMATS)}")
    clash = sorted(set(meta) & set(_RECORD_KEYS))
    if clash:
        raise ValueError(f"metadata may not be named {', '.join(clash)}: those keys hold the masks")
    masks = np.asarray(masks)
    if masks.ndim != 4:
        raise ValueError(f"masks must be (N, levels, H, W), got shape {masks.shape}")
    masks = masks.astype(bool, copy=False)
    record = {
        "format": MASK_FORMATS[mask_format],
        "shape": tuple(int(s) for s in masks.shape),
        "levels": int(masks.shape[1]),
        "height": int(masks.shape[2]),
        "width": int(masks.shape[3]),
    }
    if mask_format == "v1":
        record["packed"] = zlib.compress(np.packbits(masks, axis=None).tobytes(), 6)
    else:
        distinct, index = distinct_mask_rows(pack_mask_rows(masks))
        index_dtype = _INDEX_DTYPES[0] if len(distinct) <= np.iinfo(np.uint16).max else _INDEX_DTYPES[1]
        record.update(
            distinct=zlib.compress(distinct.tobytes(), 6),
            index_dtype=index_dtype,  # the index as bytes: the restricted unpickler needs no numpy class for it
            index=zlib.compress(index.astype(index_dtype).tobytes(), 6),
        )
    record.update(meta)
    return atomic_write_bytes(path, pickle.dumps(record, protocol=4))


def _corrupt(path: str | os.PathLike, what: str) -> InputError:
    return InputError(f"{path}: corrupt mask data ({what}); delete it and rerun stage 1")


def _decompress(obj: dict, key: str, path: str | os.PathLike) -> bytes:
    try:
        return zlib.decompress(obj[key])
    except (zlib.error, TypeError, KeyError) as exc:
        raise _corrupt(path, f"{key}: {type(exc).__name__}: {exc}") from None


def _record_shape(obj: dict, path: str | os.PathLike) -> tuple[int, int, int, int]:
    try:
        shape = tuple(int(s) for s in obj["shape"])
    except (KeyError, TypeError, ValueError) as exc:
        raise _corrupt(path, f"shape: {type(exc).__name__}: {exc}") from None
    if len(shape) != 4 or min(shape) < 0:
        raise _corrupt(path, f"shape {shape} is not (N, levels, H, W)")
    return shape


def _metadata(obj: dict) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in _RECORD_KEYS}


def _v1_bits(obj: dict, path: str | os.PathLike) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """v1's decompressed ``np.packbits(masks, axis=None)`` bytes and the masks' shape."""
    shape = _record_shape(obj, path)
    bits = np.frombuffer(_decompress(obj, "packed", path), dtype=np.uint8)
    if bits.size != (int(np.prod(shape)) + 7) // 8:
        raise _corrupt(path, f"{bits.size} bytes for shape {shape}")
    return bits, shape


def _v2_distinct(obj: dict, path: str | os.PathLike) -> DistinctMasks:
    """v2's distinct masks and index, checked: the index has shape ``(N, L)`` and points at stored masks."""
    shape = _record_shape(obj, path)
    n, levels, height, width = shape
    row_bytes = (height * width + 7) // 8
    bits = np.frombuffer(_decompress(obj, "distinct", path), dtype=np.uint8)
    if row_bytes == 0 or bits.size % row_bytes:
        raise _corrupt(path, f"{bits.size} bytes of distinct masks is not a whole number of {height}x{width} masks")
    bits = bits.reshape(-1, row_bytes)
    index_dtype = obj.get("index_dtype")
    if not isinstance(index_dtype, str) or index_dtype not in _INDEX_DTYPES:
        raise _corrupt(path, f"index dtype {index_dtype!r}, expected one of {', '.join(_INDEX_DTYPES)}")
    index = np.frombuffer(_decompress(obj, "index", path), dtype=index_dtype)
    if index.size != n * levels:
        raise _corrupt(path, f"index of {index.size} entries for {n} points x {levels} levels")
    index = index.astype(np.int64).reshape(n, levels)
    if index.size and index.max() >= len(bits):
        raise _corrupt(path, f"index points at mask {int(index.max())} of {len(bits)} distinct masks")
    return DistinctMasks(bits, index, shape, _metadata(obj))


def _masks_from_reference(obj: Any, path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """Masks and shape-derived metadata of a reference-format object (a list of ``(L, H, W)`` arrays)."""
    if isinstance(obj, (list, tuple)) and obj and all(isinstance(m, np.ndarray) for m in obj):
        try:
            masks = np.stack([np.asarray(m, dtype=bool) for m in obj])
        except ValueError as exc:
            raise InputError(f"{path}: reference-format masks have mixed shapes ({exc})") from None
    elif isinstance(obj, np.ndarray):
        masks = obj.astype(bool)
    else:
        expected = " or ".join(repr(f) for f in MASK_FORMATS.values())
        raise InputError(f"{path}: not a mask file (expected {expected} or a list of (3, H, W) bool arrays)")
    if masks.ndim != 4:
        raise InputError(f"{path}: masks must be (N, levels, H, W), got shape {masks.shape}")
    n, levels, height, width = masks.shape
    grid = int(round(np.sqrt(n)))
    meta = {"shape": masks.shape, "levels": levels, "height": height, "width": width, "format_read": "reference"}
    if grid * grid == n:
        meta["grid"] = grid
    return masks, meta


def _our_format(obj: Any) -> str | None:
    """``v1`` / ``v2`` for our records, None for anything else (the reference format, or not masks)."""
    tag = obj.get("format") if isinstance(obj, dict) else None
    if isinstance(tag, str):  # a file's value may be any plain object, even an array
        for name, known in MASK_FORMATS.items():
            if tag == known:
                return name
    return None


def read_distinct_masks(path: str | os.PathLike) -> DistinctMasks:
    """One image's masks as :class:`DistinctMasks`: each distinct mask once, bit-packed, plus the index.

    v2 files hold exactly this; v1 and reference files are de-duplicated here
    (:func:`distinct_mask_rows`, the function stage 1 writes v2 with), so every
    format gives the same distinct masks in the same order. Stage 2 embeds
    ``bits`` directly and unpacks them on its device.

    Raises:
        InputError: not a mask file, or corrupt (the message names the file).
    """
    obj = safe_pickle_load(path)
    kind = _our_format(obj)
    if kind == "v2":
        return _v2_distinct(obj, path)
    if kind == "v1":
        bits, shape = _v1_bits(obj, path)
        n, levels, height, width = shape
        if (height * width) % 8 == 0:  # whole bytes per mask: v1's packing is already one mask per row
            rows = bits.reshape(n * levels, height * width // 8)
        else:
            rows = pack_mask_rows(np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape))
        meta = _metadata(obj)
    else:
        masks, meta = _masks_from_reference(obj, path)
        shape, rows = tuple(masks.shape), pack_mask_rows(masks)
    distinct, index = distinct_mask_rows(rows)
    return DistinctMasks(distinct, index.reshape(shape[:2]), shape, meta)


def read_mask_record(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """Return ``(masks, meta)``: bool ``(N, L, H, W)`` masks and the stored metadata, from any format.

    Reference-format files (a list of ``(L, H, W)`` bool arrays) give metadata
    derived from the array shape only.

    Raises:
        InputError: not a mask file, or corrupt (the message names the file).
    """
    obj = safe_pickle_load(path)
    kind = _our_format(obj)
    if kind == "v2":
        stored = _v2_distinct(obj, path)
        return stored.expand(), stored.meta
    if kind == "v1":
        bits, shape = _v1_bits(obj, path)
        return np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape).astype(bool), _metadata(obj)
    return _masks_from_reference(obj, path)


def load_masks(path: str | os.PathLike) -> np.ndarray:
    """Load masks in any format (v2, v1, the reference's) as bool ``(N, 3, H, W)``."""
    return read_mask_record(path)[0]


# --------------------------------------------------------------------------- embeddings


def save_embeddings(path: str | os.PathLike, embeds: np.ndarray) -> int:
    """Save one image's embeddings ``(N, 3, D)`` (reference format: a pickled numpy array); return the file's size."""
    embeds = np.asarray(embeds)
    if embeds.ndim != 3 or embeds.dtype not in (np.float16, np.float32):
        raise ValueError(f"embeddings must be float16/float32 (N, levels, D), got {embeds.dtype} {embeds.shape}")
    return atomic_write_bytes(path, pickle.dumps(np.ascontiguousarray(embeds), protocol=4))


def load_embeddings(path: str | os.PathLike, dtype=np.float32) -> np.ndarray:
    """Load one image's embeddings ``(N, 3, D)`` as ``dtype`` (None: the file's); NaN/inf and bad shapes are errors."""
    obj = safe_pickle_load(path)
    if not isinstance(obj, np.ndarray) or obj.dtype.kind != "f" or obj.ndim != 3:
        desc = f"{obj.dtype} array {obj.shape}" if isinstance(obj, np.ndarray) else type(obj).__name__
        raise InputError(f"{path}: expected a float (num_patches, levels, D) array, got {desc}; rerun stage 2 for it")
    if not np.isfinite(obj).all():
        raise InputError(f"{path}: embedding holds NaN or inf values; rerun stage 2 for it")
    return obj if dtype is None else obj.astype(dtype, copy=False)


# --------------------------------------------------------------------------- image folders


class ImageRecord(NamedTuple):
    """One image of an image folder: its path, class index and class name."""

    path: Path
    label: int
    class_name: str

    def output_path(self, out_root: str | os.PathLike, suffix: str = ".pkl") -> Path:
        """``<out_root>/<class>/<image stem><suffix>``: where stages 1 and 2 write for this image."""
        return Path(out_root) / self.class_name / (self.path.stem + suffix)


def list_classes(root: str | os.PathLike) -> list[str]:
    """Sorted class folder names of ``root``; an error if there are none."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: folder not found (expected <root>/<class>/<image>, e.g. datasets/imagenette2/val)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InputError(f"{root}: no class folders found (expected <root>/<class>/<image>)")
    return classes


def list_image_folder(root: str | os.PathLike, classes: Iterable[str] | None = None) -> list[ImageRecord]:
    """All images of ``<root>/<class>/<file>``, classes and files in sorted order.

    Files whose names end in an image extension are listed; hidden files and
    our own bookkeeping (``failed.txt``) are skipped.
    """
    root = Path(root)
    class_names = list(classes) if classes is not None else list_classes(root)
    records = []
    for label, name in enumerate(class_names):
        folder = root / name
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS:
                records.append(ImageRecord(path, label, name))
    return records


def load_rgb_image(path: str | os.PathLike, size: tuple[int, int] | None = None) -> Image.Image:
    """Open any image PIL reads as RGB, resized to ``size=(width, height)`` with bicubic.

    This is the one resize shared by stages 1 and 2 (and the toy data), so masks
    line up with the pixels they cut.

    Raises:
        InputError: the file is missing, not an image, or truncated.
    """
    try:
        with Image.open(path) as image:
            image.load()
            image = image.convert("RGB")
    except FileNotFoundError:
        raise InputError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: cannot read image ({exc}); fix or remove the file (or pass --skip_bad_images)") from None
    if size is not None and image.size != tuple(size):
        image = image.resize(tuple(size), Image.BICUBIC)
    return image
