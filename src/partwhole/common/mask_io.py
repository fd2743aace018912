"""The file formats of stages 1 and 2: the mask files and the embedding files, one pickle per image.

* stage-1 masks: :func:`save_masks` / :func:`load_masks` (and :func:`read_distinct_masks`,
  :func:`read_mask_record`);
* stage-2 embeddings: :func:`save_embeddings` / :func:`load_embeddings`.

Every stage reads and writes these files only through this module. They are written atomically and
read through the restricted unpickler (:mod:`partwhole.common.safe_files`); image folders are
:mod:`partwhole.common.image_folders`, the point grid :mod:`partwhole.common.point_grid`.

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

import os
import pickle
import zlib
from typing import Any, NamedTuple

import numpy as np

from partwhole.common.errors import InputError
from partwhole.common.safe_files import atomic_write_bytes, safe_pickle_load

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
