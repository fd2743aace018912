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

Mask format (ours, lossless): a pickled ``dict`` with ``format`` set to
:data:`MASK_FORMAT`, the bit-packed and zlib-compressed ``(N, 3, H, W)`` bool
array, and its metadata (``grid``, ``img_size``, ``patch_size``, ``levels``,
``sam_model``, ...). The reference format (a pickled list of ``N`` bool arrays
``(3, H, W)``, about 29.5 MB per 224 px image) is read as well.
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

MASK_FORMAT = "partwhole-masks/1"
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


def save_masks(path: str | os.PathLike, masks: np.ndarray, **meta: Any) -> int:
    """Save bool masks ``(N, 3, H, W)`` losslessly and atomically; return the file's size in bytes.

    ``meta`` (plain values: ints, strings, tuples) is stored beside the masks,
    e.g. ``grid=14, img_size=224, patch_size=16, sam_model='vit_h'``.
    """
    masks = np.asarray(masks)
    if masks.ndim != 4:
        raise ValueError(f"masks must be (N, levels, H, W), got shape {masks.shape}")
    masks = masks.astype(bool, copy=False)
    record = {
        "format": MASK_FORMAT,
        "shape": tuple(int(s) for s in masks.shape),
        "levels": int(masks.shape[1]),
        "height": int(masks.shape[2]),
        "width": int(masks.shape[3]),
        "packed": zlib.compress(np.packbits(masks, axis=None).tobytes(), 6),
        **meta,
    }
    return atomic_write_bytes(path, pickle.dumps(record, protocol=4))


def _packed_from_record(obj: dict, path: str | os.PathLike) -> tuple[np.ndarray, tuple[int, ...], dict[str, Any]]:
    """Our format's ``(bits, shape, meta)``: decompressed ``np.packbits(masks, axis=None)`` bytes."""
    shape = tuple(int(s) for s in obj["shape"])
    try:
        bits = np.frombuffer(zlib.decompress(obj["packed"]), dtype=np.uint8)
    except (zlib.error, TypeError) as exc:
        raise InputError(f"{path}: corrupt mask data ({exc}); delete it and rerun stage 1") from None
    if bits.size != (int(np.prod(shape)) + 7) // 8:
        raise InputError(f"{path}: corrupt mask data ({bits.size} bytes for shape {shape}); delete it and rerun stage 1")
    meta = {k: v for k, v in obj.items() if k not in ("packed", "format")}
    return bits, shape, meta


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
        raise InputError(f"{path}: not a mask file (expected {MASK_FORMAT!r} or a list of (3, H, W) bool arrays)")
    if masks.ndim != 4:
        raise InputError(f"{path}: masks must be (N, levels, H, W), got shape {masks.shape}")
    n, levels, height, width = masks.shape
    grid = int(round(np.sqrt(n)))
    meta = {"shape": masks.shape, "levels": levels, "height": height, "width": width, "format_read": "reference"}
    if grid * grid == n:
        meta["grid"] = grid
    return masks, meta


def _is_our_format(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == MASK_FORMAT


def read_mask_record(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """Return ``(masks, meta)``: bool ``(N, L, H, W)`` masks and the stored metadata.

    Reference-format files (a list of ``(L, H, W)`` bool arrays) give metadata
    derived from the array shape only.
    """
    obj = safe_pickle_load(path)
    if _is_our_format(obj):
        bits, shape, meta = _packed_from_record(obj, path)
        return np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape).astype(bool), meta
    return _masks_from_reference(obj, path)


def read_packed_masks(path: str | os.PathLike) -> tuple[np.ndarray, tuple[int, ...], dict[str, Any]]:
    """Return ``(bits, shape, meta)``: the masks bit-packed as ``np.packbits(masks, axis=None)``.

    For consumers that unpack elsewhere (stage 2 unpacks on its GPU): our
    format is only decompressed, 8x less data to move than bool masks.
    ``np.unpackbits(bits, count=prod(shape)).reshape(shape)`` gives the masks.
    """
    obj = safe_pickle_load(path)
    if _is_our_format(obj):
        return _packed_from_record(obj, path)
    masks, meta = _masks_from_reference(obj, path)
    return np.packbits(masks, axis=None), tuple(masks.shape), meta


def load_masks(path: str | os.PathLike) -> np.ndarray:
    """Load masks in either format as bool ``(N, 3, H, W)``."""
    return read_mask_record(path)[0]


# --------------------------------------------------------------------------- embeddings


def save_embeddings(path: str | os.PathLike, embeds: np.ndarray) -> int:
    """Save one image's embeddings ``(N, 3, D)`` (reference format: a pickled numpy array); return the file's size."""
    embeds = np.asarray(embeds)
    if embeds.ndim != 3 or embeds.dtype not in (np.float16, np.float32):
        raise ValueError(f"embeddings must be float16/float32 (N, levels, D), got {embeds.dtype} {embeds.shape}")
    return atomic_write_bytes(path, pickle.dumps(np.ascontiguousarray(embeds), protocol=4))


def load_embeddings(path: str | os.PathLike) -> np.ndarray:
    """Load one image's embeddings as float32 ``(N, 3, D)``; NaN/inf and bad shapes are errors."""
    obj = safe_pickle_load(path)
    if not isinstance(obj, np.ndarray) or obj.dtype.kind != "f" or obj.ndim != 3:
        desc = f"{obj.dtype} array {obj.shape}" if isinstance(obj, np.ndarray) else type(obj).__name__
        raise InputError(f"{path}: expected a float (num_patches, levels, D) array, got {desc}; rerun stage 2 for it")
    if not np.isfinite(obj).all():
        raise InputError(f"{path}: embedding holds NaN or inf values; rerun stage 2 for it")
    return obj.astype(np.float32, copy=False)


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
