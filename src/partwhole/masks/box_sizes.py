"""Box sides for stage 1's ``boxes`` mask source that match another folder's masks in size.

The command line ``partwhole-box-sizes`` (``partwhole_cli/box_sizes.py``) prints them, e.g. 13,30,48
(and the areas it matched), for stage 1's box sides.

For each level, the mean area of the folder's masks (over every point of every image) is
matched by the side of the square whose mean *clipped* area, over the same point grid, is
closest: a box near an edge loses what lies outside the image, exactly as the boxes of
``mask_sources.BoxMasker`` do, so the boxes written with these sides have, on average, the
masks' area per level (a plain ``round(sqrt(mean area))`` would come out too small). Sides go
up to twice the image side, which covers the image from every point; where two levels would get
the same side (masks of equal mean area, e.g. ``full_image`` ones), the larger level gets one
pixel more, as ``box_sizes`` must increase.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from partwhole.common.errors import InputError, SettingError
from partwhole.common.mask_io import read_distinct_masks
from partwhole.common.point_grid import patch_grid_points
from partwhole.masks.mask_sources import LEVELS, box_spans


def mean_mask_areas(masks_path: str | Path) -> tuple[np.ndarray, int, int]:
    """Mean mask area in pixels per level ``(L,)`` over every point of every file, the image side and the patch side.

    Raises:
        SettingError: (``masks_path``) no mask files, or not a square patch grid.
        InputError: files of different sizes or grids (naming the file).
    """
    files = sorted(p for p in Path(masks_path).glob("*/*.pkl") if not p.name.startswith("."))
    if not files:
        raise SettingError("masks_path", masks_path, "no mask files <class>/<image>.pkl there")
    totals, count, shape = np.zeros(LEVELS), 0, None
    for path in files:
        stored = read_distinct_masks(path)
        if shape is None:
            shape = stored.shape
        if stored.shape != shape or shape[1] != LEVELS:
            raise InputError(f"{path}: masks {stored.shape}, not {shape[0]} points x {LEVELS} levels of {shape[2]} x {shape[3]} "
                             f"as the folder's first file")
        areas = np.unpackbits(stored.bits, axis=1).sum(1)  # pixels of each distinct mask (packing pads with zeros)
        totals += areas[stored.index].sum(0)
        count += shape[0]
    points, _, height, width = shape
    grid = math.isqrt(points)
    if height != width or grid * grid != points or height % grid:
        raise SettingError("masks_path", masks_path, f"{points} points on {height} x {width} masks is not a square patch grid")
    return totals / count, height, height // grid


def mean_clipped_areas(img_size: int, patch_size: int) -> np.ndarray:
    """``areas[s]``: the mean area of a clipped box of side ``s`` over the point grid, for ``s`` in ``0..2*img_size``."""
    centres = patch_grid_points(img_size, patch_size)[:, 0]  # rows and columns use the same centres
    grid = np.unique(centres)
    widths = []
    for side in range(2 * img_size + 1):
        start, end = box_spans(grid, side, img_size)
        widths.append((end - start).mean())
    return np.array(widths) ** 2  # the grid is a product of rows and columns, so the mean area is the mean width squared


def matched_box_sizes(masks_path: str | Path) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
    """Box sides per level whose mean clipped area is closest to the folder's mean mask area.

    Returns:
        ``(sides, mask_areas, box_areas)``: the sides (strictly increasing), the masks' mean areas and the boxes'.
    """
    areas, img_size, patch_size = mean_mask_areas(masks_path)
    clipped = mean_clipped_areas(img_size, patch_size)
    sides: list[int] = []
    for area in areas:
        side = int(np.argmin(np.abs(clipped[1:] - area))) + 1  # the smallest side of the closest area
        sides.append(max(side, sides[-1] + 1) if sides else side)
    return tuple(sides), areas, clipped[[min(s, 2 * img_size) for s in sides]]

