"""Islands of agreement: draw them, and score how well they match the stage-1 masks.

GLOM's claim is that, at each level, neighbouring columns come to hold nearly the
same vector over a whole part (low levels) or object (high levels): "islands".
This module makes that visible and measurable for one image's columns
``levels`` ``(n, l, d)`` (``n = G*G`` columns, row-major, one per patch point of
the stage-1 grid):

* :func:`islands_figure` draws the image and, per level, the ``G x G`` grid
  coloured by a PCA of that level's (unit-length) column vectors to RGB, so
  columns with similar vectors share a colour, with thin lines between
  neighbouring cells whose cosine similarity is below ``boundary_threshold``.
  With ``teacher`` (the SAM-mask embeddings ``(n, 3, D)``) a second row draws
  the targets the same way. :func:`save_islands_figure` writes a PNG atomically.
* :func:`islands_scores` scores each level against the stage-1 masks ``(n, L, H, W)``;
  :func:`islands_scores_from_labels` against ground-truth label maps;
  :func:`islands_scores_batch` / :func:`average_islands_scores` average over images.

Score definitions (docs/islands.md quotes them). For model level ``i``, compare
with mask level ``m = min(i, L - 1)`` (or ``level_map[i]``); over all pairs
``j < k`` of the ``n`` columns:

* ``pair_corr``: Pearson correlation between the cosine similarity of the two
  columns' level-``i`` vectors and the IoU of their level-``m`` masks
  (IoU of two empty masks counts as 0). 1 when similarity tracks mask overlap
  perfectly, about 0 for unrelated columns; NaN when either side is constant
  (e.g. every point has the same mask).
* ``ari``: adjusted Rand index between two partitions of the points:
  the mask segments (connected components of the graph joining points whose
  level-``m`` masks have IoU > 0.5: points that see "the same region") and a
  clustering of the columns (average-linkage agglomerative clustering on cosine
  similarity, cut at as many clusters as there are mask segments). 1 for
  identical partitions, about 0 for chance, can be negative. Two trivial
  identical partitions (one cluster, or all singletons) score 1.

With label maps instead of masks, the region under a point is the set of pixels
holding the point's label, so the "IoU" of two points is 1 when they share a
label and 0 otherwise, and the segments are the labels themselves.

Everything is deterministic (exact SVD, no random initialisation; ties go to the
lowest index). Inputs may be numpy arrays or torch tensors on any device; the
maths runs on CPU in float64 except the mask IoU, which runs in torch.
No flags, no Lightning.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from hierarchical_masks.mask_io import atomic_write_bytes

ArrayLike = np.ndarray | torch.Tensor
Scores = dict[int, dict[str, float]]
IOU_SEGMENT_THRESHOLD = 0.5


# --------------------------------------------------------------------------- small maths


def _numpy(x: ArrayLike, dtype=np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        x = x.float() if x.is_floating_point() else x
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def _grid_side(n: int) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} columns do not form a square grid; expected n = G*G (one column per patch, row-major)")
    return side


def cosine_similarity_matrix(vectors: ArrayLike) -> np.ndarray:
    """``(n, d)`` vectors -> ``(n, n)`` cosine similarities (a zero vector has similarity 0 to all)."""
    x = _numpy(vectors)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x @ x.T


def mask_iou_matrix(masks: ArrayLike) -> np.ndarray:
    """Bool ``(n, H, W)`` masks -> ``(n, n)`` IoU; two empty masks have IoU 0."""
    m = torch.as_tensor(masks).reshape(len(masks), -1).float()  # counts stay exact in float32 up to 2**24 pixels
    inter = m @ m.T
    area = m.sum(1)
    union = area[:, None] + area[None, :] - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))
    return iou.cpu().double().numpy()


def _first_appearance(labels: np.ndarray) -> np.ndarray:
    """Renumber labels 0, 1, ... in order of first appearance."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


def connected_segments(adjacency: np.ndarray) -> np.ndarray:
    """Connected components of a symmetric bool ``(n, n)`` graph, as labels ``(n,)`` (first point first)."""
    n = len(adjacency)
    parent = np.arange(n)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(adjacency, 1))):
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return _first_appearance(np.array([find(i) for i in range(n)]))


def mask_segments(masks: ArrayLike, iou_threshold: float = IOU_SEGMENT_THRESHOLD, iou: np.ndarray | None = None) -> np.ndarray:
    """Group points whose masks ``(n, H, W)`` show the same region: components of IoU > ``iou_threshold``."""
    iou = mask_iou_matrix(masks) if iou is None else iou
    return connected_segments(iou > iou_threshold)


def label_segments(label_map: ArrayLike, points_xy: ArrayLike) -> np.ndarray:
    """Segment of each point ``(x, y)``: the label under it, renumbered by first appearance."""
    labels = np.asarray(_numpy(label_map, np.int64))
    pts = np.asarray(_numpy(points_xy, np.int64))
    return _first_appearance(labels[pts[:, 1], pts[:, 0]])


def average_linkage_clusters(vectors: ArrayLike, num_clusters: int) -> np.ndarray:
    """Agglomerative clustering of ``(n, d)`` vectors on cosine similarity, average linkage, cut at ``num_clusters``.

    Deterministic: the most similar pair of clusters is merged first; ties go to
    the lowest index. Returns labels ``(n,)`` numbered by first appearance.
    """
    sim = cosine_similarity_matrix(vectors)
    n = len(sim)
    num_clusters = int(min(max(num_clusters, 1), n))
    np.fill_diagonal(sim, -np.inf)
    size = np.ones(n)
    owner = np.arange(n)
    for _ in range(n - num_clusters):
        i, j = np.unravel_index(int(np.argmax(sim)), sim.shape)
        i, j = min(i, j), max(i, j)
        # Lance-Williams update for average linkage: size-weighted mean of the two rows.
        merged = (size[i] * sim[i] + size[j] * sim[j]) / (size[i] + size[j])
        sim[i, :] = merged
        sim[:, i] = merged
        sim[i, i] = -np.inf
        sim[j, :] = -np.inf
        sim[:, j] = -np.inf
        size[i] += size[j]
        owner[owner == j] = i
    return _first_appearance(owner)


def adjusted_rand_index(labels_a: ArrayLike, labels_b: ArrayLike) -> float:
    """Adjusted Rand index of two partitions ``(n,)`` (Hubert & Arabie); 1 for identical trivial partitions."""
    a = np.unique(_numpy(labels_a, np.int64), return_inverse=True)[1].reshape(-1)
    b = np.unique(_numpy(labels_b, np.int64), return_inverse=True)[1].reshape(-1)
    n = len(a)
    if n != len(b):
        raise ValueError(f"partitions of different lengths: {n} and {len(b)}")
    if n < 2:
        return 1.0
    table = np.zeros((a.max() + 1, b.max() + 1), np.float64)
    np.add.at(table, (a, b), 1)

    def pairs(x: np.ndarray) -> float:
        return float((x * (x - 1) / 2).sum())

    both, in_a, in_b = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = in_a * in_b / pairs(np.array([n], np.float64))
    maximum = (in_a + in_b) / 2
    if maximum == expected:  # both partitions trivial and identical
        return 1.0
    return (both - expected) / (maximum - expected)


def pearson_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of two equal-length vectors; NaN when either is constant."""
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((x * x).sum()) * float((y * y).sum()))
    return float((x * y).sum() / denom) if denom > 1e-12 else float("nan")


# --------------------------------------------------------------------------- scores


def _level_vectors(levels: ArrayLike) -> np.ndarray:
    x = _numpy(levels)
    if x.ndim != 3:
        raise ValueError(f"levels must be one image's columns (n, l, d), got shape {x.shape}")
    return x


def _resolve_level_map(num_levels: int, num_targets: int, level_map: Sequence[int] | None) -> list[int]:
    if level_map is None:
        return [min(i, num_targets - 1) for i in range(num_levels)]
    level_map = [int(m) for m in level_map]
    if len(level_map) != num_levels or not all(0 <= m < num_targets for m in level_map):
        raise ValueError(f"level_map={level_map} must give, for each of the {num_levels} levels, a target level in 0..{num_targets - 1}")
    return level_map


def _score_level(vectors: np.ndarray, overlap: np.ndarray, segments: np.ndarray) -> dict[str, float]:
    upper = np.triu_indices(len(vectors), 1)
    similarity = cosine_similarity_matrix(vectors)
    clusters = average_linkage_clusters(vectors, int(segments.max()) + 1)
    return {
        "pair_corr": pearson_correlation(similarity[upper], overlap[upper]),
        "ari": adjusted_rand_index(clusters, segments),
    }


def islands_scores(
    levels: ArrayLike,
    masks: ArrayLike,
    *,
    level_map: Sequence[int] | None = None,
    iou_threshold: float = IOU_SEGMENT_THRESHOLD,
) -> Scores:
    """Score one image's islands against its stage-1 masks.

    Args:
        levels: ``(n, l, d)`` column vectors of one image (n = G*G, row-major).
        masks: bool ``(n, L, H, W)`` stage-1 masks of the same ``n`` points.
        level_map: target mask level for each model level; default ``min(i, L-1)``.
        iou_threshold: masks with IoU above it show "the same region" (segments).

    Returns:
        ``{level: {'pair_corr': float, 'ari': float}}`` for each model level
        (definitions in the module docstring).
    """
    x = _level_vectors(levels)
    m = torch.as_tensor(masks).bool() if isinstance(masks, torch.Tensor) else torch.from_numpy(np.asarray(masks, bool))
    if m.ndim != 4 or m.shape[0] != x.shape[0]:
        raise ValueError(f"masks must be (n, L, H, W) with n = {x.shape[0]} like levels {tuple(x.shape)}, got {tuple(m.shape)}")
    mapping = _resolve_level_map(x.shape[1], m.shape[1], level_map)
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    scores: Scores = {}
    for i, target in enumerate(mapping):
        if target not in cache:
            iou = mask_iou_matrix(m[:, target])
            cache[target] = (iou, mask_segments(None, iou_threshold, iou=iou))
        iou, segments = cache[target]
        scores[i] = _score_level(x[:, i], iou, segments)
    return scores


def islands_scores_from_labels(
    levels: ArrayLike,
    label_maps: Sequence[ArrayLike],
    points_xy: ArrayLike | None = None,
    *,
    level_map: Sequence[int] | None = None,
) -> Scores:
    """Score one image's islands against ground-truth label maps, e.g. ``[parts, objects, objects > 0]``.

    Args:
        levels: ``(n, l, d)`` column vectors of one image.
        label_maps: ``(H, W)`` integer maps, one per target level (level ``i`` uses
            ``label_maps[min(i, len - 1)]`` unless ``level_map`` says otherwise).
        points_xy: ``(n, 2)`` pixel ``(x, y)`` of each column's point; default the
            stage-1 grid ``(col*p + p//2, row*p + p//2)`` with ``p = H // G``.

    Returns:
        ``{level: {'pair_corr', 'ari'}}``; the "IoU" of two points is 1 when they
        share a label, else 0, and the segments are the labels.
    """
    x = _level_vectors(levels)
    maps = [_numpy(lm, np.int64) for lm in label_maps]
    if not maps or any(lm.ndim != 2 for lm in maps):
        raise ValueError("label_maps must be a non-empty list of (H, W) integer maps")
    if points_xy is None:
        grid = _grid_side(x.shape[0])
        patch = maps[0].shape[0] // grid
        rows, cols = np.divmod(np.arange(grid * grid), grid)
        points_xy = np.stack([cols * patch + patch // 2, rows * patch + patch // 2], axis=1)
    points = _numpy(points_xy, np.int64)
    if points.shape != (x.shape[0], 2):
        raise ValueError(f"points_xy must be (n, 2) with n = {x.shape[0]}, got {points.shape}")
    mapping = _resolve_level_map(x.shape[1], len(maps), level_map)
    scores: Scores = {}
    for i, target in enumerate(mapping):
        segments = label_segments(maps[target], points)
        same = (segments[:, None] == segments[None, :]).astype(np.float64)
        scores[i] = _score_level(x[:, i], same, segments)
    return scores


def average_islands_scores(per_image: Iterable[Mapping[int, Mapping[str, float]]]) -> Scores:
    """Mean of per-image scores, level by level, ignoring NaN (NaN if a level has no finite value)."""
    collected: dict[int, dict[str, list[float]]] = {}
    for scores in per_image:
        for level, values in scores.items():
            for name, value in values.items():
                collected.setdefault(int(level), {}).setdefault(name, []).append(float(value))
    out: Scores = {}
    for level, values in sorted(collected.items()):
        out[level] = {}
        for name, vals in values.items():
            finite = [v for v in vals if math.isfinite(v)]
            out[level][name] = float(np.mean(finite)) if finite else float("nan")
    return out


def islands_scores_batch(levels: ArrayLike, masks: ArrayLike | Sequence[ArrayLike], **kwargs) -> Scores:
    """:func:`islands_scores` for a batch ``levels (b, n, l, d)``, ``masks (b, n, L, H, W)``, averaged over images."""
    if len(levels) != len(masks):
        raise ValueError(f"{len(levels)} images of levels but {len(masks)} of masks")
    return average_islands_scores(islands_scores(lv, mk, **kwargs) for lv, mk in zip(levels, masks))


# --------------------------------------------------------------------------- figures


def pca_rgb(vectors: ArrayLike) -> np.ndarray:
    """``(n, d)`` vectors -> ``(n, 3)`` colours in [0, 1]: top-3 principal components of the unit vectors.

    The three components share one scale (the largest absolute projection), so
    a weak component stays faint; identical vectors give uniform grey. Signs are
    fixed (largest-magnitude entry positive) so equal inputs give equal colours.
    """
    x = _numpy(vectors)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    x = x - x.mean(0, keepdims=True)
    u, s, _ = np.linalg.svd(x, full_matrices=False)
    proj = np.zeros((len(x), 3))
    k = min(3, len(s))
    proj[:, :k] = u[:, :k] * s[:k]
    biggest = np.abs(proj).argmax(0)
    proj *= np.where(proj[biggest, np.arange(3)] < 0, -1.0, 1.0)
    scale = np.abs(proj).max()
    if scale < 1e-6:
        return np.full((len(x), 3), 0.5)
    return 0.5 + 0.5 * proj / scale


def _display_image(image: ArrayLike) -> np.ndarray:
    """(3, H, W) or (H, W, 3), normalised, [0, 1] or [0, 255] -> float (H, W, 3) in [0, 1]."""
    is_uint8 = (isinstance(image, np.ndarray) and image.dtype == np.uint8) or (
        isinstance(image, torch.Tensor) and image.dtype == torch.uint8
    )
    x = _numpy(image)
    if x.ndim != 3 or 3 not in (x.shape[0], x.shape[-1]):
        raise ValueError(f"image must be (3, H, W) or (H, W, 3), got shape {x.shape}")
    if x.shape[0] == 3 and x.shape[-1] != 3:
        x = x.transpose(1, 2, 0)
    if is_uint8:
        return x / 255.0
    lo, hi = float(x.min()), float(x.max())
    if lo >= 0.0 and hi <= 1.0:
        return x
    return (x - lo) / max(hi - lo, 1e-12)  # normalised input: stretch to [0, 1]


def _draw_level(ax, vectors: np.ndarray, gray: np.ndarray, grid: int, title: str, boundary_threshold: float | None) -> None:
    colours = pca_rgb(vectors).reshape(grid, grid, 3)
    sim = cosine_similarity_matrix(vectors)
    mean_cos = float(sim[np.triu_indices(len(sim), 1)].mean()) if len(sim) > 1 else 1.0
    ax.imshow(gray, cmap="gray", vmin=0, vmax=1, extent=(0, grid, grid, 0), interpolation="bilinear")
    ax.imshow(colours, extent=(0, grid, grid, 0), alpha=0.8, interpolation="nearest")
    if boundary_threshold is not None:
        segments = []
        for k in range(grid * grid):
            row, col = divmod(k, grid)
            if col + 1 < grid and sim[k, k + 1] < boundary_threshold:
                segments.append([(col + 1, row), (col + 1, row + 1)])
            if row + 1 < grid and sim[k, k + grid] < boundary_threshold:
                segments.append([(col, row + 1), (col + 1, row + 1)])
        if segments:
            ax.add_collection(LineCollection(segments, colors="black", linewidths=1.0))
    ax.set_xlim(0, grid)
    ax.set_ylim(grid, 0)
    ax.set_title(f"{title}\nmean cos {mean_cos:.2f}", fontsize=8)
    ax.set_axis_off()


def islands_figure(
    image: ArrayLike,
    levels: ArrayLike,
    *,
    teacher: ArrayLike | None = None,
    title: str | None = None,
    boundary_threshold: float | None = 0.9,
    panel_inches: float = 2.0,
) -> Figure:
    """Draw one image's islands: the image, then per level the ``G x G`` grid coloured by PCA.

    Args:
        image: ``(3, H, W)`` (or ``(H, W, 3)``) tensor/array, normalised or not
            (uint8 is divided by 255, values outside [0, 1] are min-max stretched).
        levels: ``(n, l, d)`` columns of this image, n = G*G row-major.
        teacher: optional ``(n, L, D)`` SAM-mask embeddings, drawn as a second row.
        title: figure title.
        boundary_threshold: draw a line between neighbouring cells whose cosine
            similarity is below it; ``None`` draws none.
        panel_inches: side of each panel; the figure is
            ``(1 + max(l, L)) * panel_inches`` wide and ``rows * panel_inches`` high.

    Returns:
        A matplotlib ``Figure`` (not registered with pyplot: works headless, needs no ``close``).
    """
    x = _level_vectors(levels)
    n, num_levels, _ = x.shape
    grid = _grid_side(n)
    t = None if teacher is None else _level_vectors(teacher)
    if t is not None and t.shape[0] != n:
        raise ValueError(f"teacher has {t.shape[0]} columns but levels have {n}")
    rgb = _display_image(image)
    gray = rgb @ np.array([0.299, 0.587, 0.114])
    rows = 1 if t is None else 2
    cols = 1 + max(num_levels, 0 if t is None else t.shape[1])
    fig = Figure(figsize=(cols * panel_inches, rows * panel_inches), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    axes[0, 0].imshow(rgb, interpolation="nearest")
    axes[0, 0].set_title("image", fontsize=8)
    for i in range(num_levels):
        _draw_level(axes[0, 1 + i], x[:, i], gray, grid, f"level {i}", boundary_threshold)
    if t is not None:
        axes[1, 0].text(0.5, 0.5, "teacher\n(SAM-mask\nembeddings)", ha="center", va="center", fontsize=9, transform=axes[1, 0].transAxes)
        for i in range(t.shape[1]):
            _draw_level(axes[1, 1 + i], t[:, i], gray, grid, f"teacher level {i}", boundary_threshold)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def save_islands_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG (``figsize * dpi`` pixels) atomically; returns the path."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


__all__ = [
    "adjusted_rand_index", "average_islands_scores", "average_linkage_clusters", "connected_segments",
    "cosine_similarity_matrix", "islands_figure", "islands_scores", "islands_scores_batch",
    "islands_scores_from_labels", "label_segments", "mask_iou_matrix", "mask_segments", "pca_rgb",
    "pearson_correlation", "save_islands_figure",
]  # fmt: skip
