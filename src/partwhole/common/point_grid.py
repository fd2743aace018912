"""The point grid: one prompt at the centre of every patch. Stage 1 prompts SAM with it, the mask files
record it (``grid``), and stage 3's columns are its patches, in the same row-major order."""

from __future__ import annotations

import numpy as np

from partwhole.common.errors import SettingError


def patch_grid_points(img_size: int, patch_size: int) -> np.ndarray:
    """Patch-centre points of a square image, ``(G*G, 2)`` float ``(x, y)`` pixels.

    ``G = img_size // patch_size``; row-major: point ``k = row * G + col`` lies
    at ``(col * p + p / 2, row * p + p / 2)`` (SAM takes points as ``x, y``).

    Raises:
        SettingError: (``img_size``) not a positive multiple of ``patch_size``.
    """
    if patch_size <= 0 or img_size <= 0 or img_size % patch_size:
        raise SettingError("img_size", img_size, f"must be a positive multiple of patch_size={patch_size}; "
                           "choose e.g. 224 with patch_size 16")
    grid = img_size // patch_size
    centres = np.arange(grid, dtype=np.float64) * patch_size + patch_size / 2
    rows, cols = np.meshgrid(centres, centres, indexing="ij")  # (G, G) each
    return np.stack([cols.ravel(), rows.ravel()], axis=1)
