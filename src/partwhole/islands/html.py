"""The islands explorer: one self-contained HTML page where a researcher clicks a column and sees its island.

``checkpoint.draw_islands_for_checkpoint(..., html=True)`` writes ``<run>/islands.html``. Per image the page shows
the input with its column grid; for the chosen column, at every level, each column's cosine similarity to
it as a heat map (the island is what lights up), at any GLOM iteration (a slider over the states of the
same forward pass that its ``animate`` draws); the chosen point's stage-1 masks (and the toy set's
ground-truth regions) at the three levels; and the image's islands scores (``pair_corr``, ``ari``) from
the same code that writes ``scores.json``.

The page opens from disk with no server and no network: the script, the style and the data are inlined,
the images are base64 PNGs. Per state and level, the page carries whichever of two int8 encodings is
smaller (:func:`similarity_data`): the columns' vectors (each scaled so its largest component is 127; the
browser computes the cosines, which need no scale) when ``n (n + 1) / 2 > n d``, else the cosines
themselves, computed here in float64 from the float vectors, upper triangle with the diagonal, times 127
(the toy and Imagenette configurations: 64 columns of 64-d vectors, 196 of 256-d). Either way the largest
cosine error against the float vectors is measured and the page says it. Masks are shipped as stored:
each distinct mask once, bit-packed, plus the ``(n, levels)`` index (``mask_io.DistinctMasks``).

This module turns arrays into the page's data (:func:`page_image`) and writes the page
(:func:`write_islands_page`) from ``islands_explorer.html`` / ``.js`` beside it; no flags, no model.
"""

from __future__ import annotations

import base64
import io
import json
import os
from importlib import resources
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from partwhole.common.mask_io import DistinctMasks, pack_mask_rows
from partwhole.common.safe_files import atomic_write_bytes, strict_json
from partwhole.islands.scores import cosine_similarity_matrix, label_points

STAGE1_LEVEL_NAMES = ("mask level 0", "mask level 1", "mask level 2")
GROUND_TRUTH_LEVEL_NAMES = ("part", "object", "all objects")  # checkpoint.ground_truth_label_maps, in that order
_DATA_MARK = "/*ISLANDS_DATA*/"
_SCRIPT_MARK = "/*ISLANDS_SCRIPT*/"


def _base64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def quantised_unit_vectors(iterations: np.ndarray | torch.Tensor) -> np.ndarray:
    """``(t+1, n, l, d)`` states -> int8 ``(t+1, l, n, d)``: each vector scaled so its largest component is +-127.

    The order is the page's: state, level, column, dimension. A zero vector stays zero.
    """
    x = torch.as_tensor(iterations).detach().double().cpu().numpy().transpose(0, 2, 1, 3)
    peak = np.abs(x).max(-1, keepdims=True)
    return np.round(127 * x / np.maximum(peak, 1e-30)).astype(np.int8)


def _cosine_matrices(vectors: np.ndarray) -> np.ndarray:
    """``(..., n, d)`` -> ``(..., n, n)``: :func:`islands.cosine_similarity_matrix` of every ``(n, d)``."""
    flat = vectors.reshape(-1, *vectors.shape[-2:]).astype(np.float64)
    return np.stack([cosine_similarity_matrix(v) for v in flat]).reshape(*vectors.shape[:-1], vectors.shape[-2])


def similarity_data(iterations: np.ndarray | torch.Tensor, encoding: str = "auto") -> dict:
    """One image's similarities for the page: ``encoding`` ("vectors", "triangle", or "auto": the smaller), the int8
    data in base64 (layout: state, level, then column and dimension / the triangle), and ``cosine_error``, the largest
    |page cosine - float64 cosine of the float vectors| over every state, level and pair."""
    x = torch.as_tensor(iterations).detach().double().cpu().numpy().transpose(0, 2, 1, 3)  # (t+1, l, n, d)
    n, d = x.shape[-2:]
    if encoding == "auto":
        encoding = "triangle" if n * (n + 1) // 2 <= n * d else "vectors"
    exact = _cosine_matrices(x)
    if encoding == "vectors":
        quantised = quantised_unit_vectors(iterations)
        error = np.abs(_cosine_matrices(quantised) - exact).max()
    elif encoding == "triangle":  # row-major, diagonal included: pair (a, b), a <= b, is entry a n - a (a - 1) / 2 + b - a
        rows, cols = np.triu_indices(n)
        triangle = exact[..., rows, cols]
        quantised = np.round(127 * np.clip(triangle, -1, 1)).astype(np.int8)
        error = np.abs(quantised / 127 - triangle).max()
    else:
        raise ValueError(f"encoding={encoding!r}: expected auto, vectors or triangle")
    return {"encoding": encoding, "similarities": _base64(quantised), "cosine_error": float(error)}


def _mask_set(bits: np.ndarray, index: np.ndarray, height: int, width: int, source: str,
              level_names: Sequence[str]) -> dict:
    return {"source": source, "height": int(height), "width": int(width), "bytes_per_mask": int(bits.shape[1]),
            "bits": _base64(bits.astype(np.uint8)), "index": index.astype(int).tolist(), "level_names": list(level_names)}


def stage1_mask_set(masks: DistinctMasks, source: str) -> dict:
    """The page's view of one image's stage-1 masks: the distinct masks, bit-packed (big-endian), and the index."""
    return _mask_set(masks.bits, masks.index, masks.shape[2], masks.shape[3], source, STAGE1_LEVEL_NAMES)


def ground_truth_mask_set(label_maps: Sequence[np.ndarray], grid: int, source: str) -> dict:
    """Ground-truth label maps ``(H, W)`` (one per level) as masks: point ``k``'s mask at level ``l`` is the region
    holding the label under it (:func:`islands.label_points`, as the scores read them); same layout as stage-1."""
    height, width = label_maps[0].shape
    px, py = label_points(grid, height).T
    rows, index = [], np.zeros((grid * grid, len(label_maps)), np.int64)
    for level, label_map in enumerate(label_maps):
        labels, where = np.unique(label_map[py, px], return_inverse=True)
        index[:, level] = len(rows) + where.reshape(-1)
        rows.extend(label_map[None] == labels[:, None, None])
    bits = pack_mask_rows(np.stack(rows))
    return _mask_set(bits, index, height, width, source, GROUND_TRUTH_LEVEL_NAMES[: len(label_maps)])


def display_png(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> str:
    """The model's input ``(C, H, W)``, normalised with ``mean``/``std``, back to pixels: a PNG data URL."""
    pixels = (image.detach().float().cpu() * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None])
    pixels = (pixels.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    if pixels.shape[-1] != 3:
        pixels = np.repeat(pixels[..., :1], 3, axis=-1)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def page_image(*, name: str, title: str, image_url: str, iterations: np.ndarray | torch.Tensor,
               masks: dict | None, ground_truth: dict | None, masks_note: str, scores: dict, encoding: str = "auto") -> dict:
    """One image's entry of the page.

    Args:
        name, title: a short id and the heading (e.g. ``class/file.png``).
        image_url: :func:`display_png` of what the model saw.
        iterations: ``(t+1, n, l, d)`` the columns' states, initial first (``Agglomerator(return_iterations=True)``).
        masks, ground_truth: :func:`stage1_mask_set` / :func:`ground_truth_mask_set`, or None.
        masks_note: what the mask panel says when ``masks`` is None (why there are none).
        scores: ``{"stage1_masks" | "ground_truth": [per state {level: {"pair_corr", "ari"}}]}``.
        encoding: how the similarities travel (:func:`similarity_data`).
    """
    states, n, levels, dim = torch.as_tensor(iterations).shape
    grid = int(round(n ** 0.5))
    if grid * grid != n:
        raise ValueError(f"{n} columns do not form a square grid")
    return {"name": name, "title": title, "image": image_url, "grid": grid, "levels": levels, "states": states,
            "dim": dim, **similarity_data(iterations, encoding),
            "masks": masks, "ground_truth": ground_truth, "masks_note": masks_note, "scores": scores}


def _package_text(name: str) -> str:
    return resources.files("partwhole.islands").joinpath(name).read_text(encoding="utf-8")


def render_islands_page(images: list[dict], *, heading: str, details: str = "") -> str:
    """The page's HTML: the template with the script and the data (strict JSON, ``<`` escaped) inlined."""
    if not images:
        raise ValueError("no images for the islands page")
    data = json.dumps(strict_json({"heading": heading, "details": details, "images": images}), allow_nan=False,
                      separators=(",", ":")).replace("<", "\\u003c")  # no "</script>" can end the data early
    page = _package_text("islands_explorer.html")
    for mark in (_SCRIPT_MARK, _DATA_MARK):
        if page.count(mark) != 1:
            raise RuntimeError(f"islands_explorer.html must hold {mark} once")
    return page.replace(_SCRIPT_MARK, _package_text("islands_explorer.js")).replace(_DATA_MARK, data)


def write_islands_page(path: str | os.PathLike, images: list[dict], *, heading: str, details: str = "") -> int:
    """Write :func:`render_islands_page` to ``path`` atomically; returns its size in bytes."""
    return atomic_write_bytes(Path(path), render_islands_page(images, heading=heading, details=details).encode("utf-8"))


__all__ = ["display_png", "ground_truth_mask_set", "page_image", "quantised_unit_vectors", "render_islands_page",
           "similarity_data", "stage1_mask_set", "write_islands_page"]
