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

Islands over the iterations (GLOM's dynamics: agreement should grow as columns
iterate), from the model's ``iterations`` ``(t+1, n, l, d)`` of one image, the
initial state first:

* :func:`islands_scores_per_iteration` / :func:`islands_scores_from_labels_per_iteration`
  score every state (the targets are computed once);
* :func:`iteration_colours` fits one PCA per level on the vectors of all states
  together, so a colour means the same vector in every frame;
* :func:`islands_iteration_frames` draws each state like :func:`islands_figure`
  and :func:`save_islands_gif` writes them as an animated GIF;
  :func:`islands_strip_figure` draws one row per level and one column per state
  (a static figure for papers).

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

Columns that all hold the same vector (every cosine similarity within
``ALIKE_TOLERANCE`` of 1, e.g. the initial state of the iterations) form one
island: ``pair_corr`` is NaN and the clustering is a single cluster (``ari`` 0
against non-trivial segments), rather than whatever rounding noise would split.

With label maps instead of masks, the region under a point is the set of pixels
holding the point's label, so the "IoU" of two points is 1 when they share a
label and 0 otherwise, and the segments are the labels themselves.

Everything is deterministic (exact SVD, no random initialisation). The clustering, the components
and the ARI are scipy's and torchmetrics' (``tests/test_islands.py`` checks them against the
hand-written versions they replaced, on the same inputs). Inputs may be numpy arrays or torch tensors on any device; the
maths runs on CPU in float64 except the mask IoU, which runs in torch.
No flags, no Lightning.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from PIL import Image
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.sparse.csgraph import connected_components
from scipy.spatial.distance import squareform
from torchmetrics.functional.clustering import adjusted_rand_score

from partwhole.common.safe_files import atomic_write_bytes

ArrayLike = np.ndarray | torch.Tensor
Scores = dict[int, dict[str, float]]
IOU_SEGMENT_THRESHOLD = 0.5
ALIKE_TOLERANCE = 1e-6  # float32 columns computed alike differ by rounding only, far below this


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
    _, labels = connected_components(np.asarray(adjacency, bool), directed=False)
    return _first_appearance(labels)


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

    scipy's ``linkage(method="average")`` on the cosine distances ``1 - similarity`` (a zero vector is at
    distance 1 from all, as :func:`cosine_similarity_matrix` has it), cut where exactly ``num_clusters``
    clusters remain. Deterministic. Returns labels ``(n,)`` numbered by first appearance.
    """
    distance = 1.0 - cosine_similarity_matrix(vectors)
    n = len(distance)
    num_clusters = int(min(max(num_clusters, 1), n))
    if num_clusters == n:
        return np.arange(n)
    np.fill_diagonal(distance, 0.0)
    condensed = squareform(np.clip((distance + distance.T) / 2, 0.0, None), checks=False)
    return _first_appearance(cut_tree(linkage(condensed, method="average"), n_clusters=num_clusters).reshape(-1))


def adjusted_rand_index(labels_a: ArrayLike, labels_b: ArrayLike) -> float:
    """Adjusted Rand index of two partitions ``(n,)`` (Hubert & Arabie, torchmetrics'); 1 for identical trivial partitions."""
    a, b = (torch.as_tensor(_numpy(x, np.int64)).reshape(-1) for x in (labels_a, labels_b))
    if len(a) != len(b):
        raise ValueError(f"partitions of different lengths: {len(a)} and {len(b)}")
    if len(a) < 2:
        return 1.0
    with warnings.catch_warnings():  # torchmetrics builds a sparse contingency table and torch warns about its checks
        warnings.simplefilter("ignore", UserWarning)
        return float(adjusted_rand_score(a, b))


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
    if np.all(similarity[upper] > 1.0 - ALIKE_TOLERANCE):  # one island; ties would let rounding noise cluster
        return {"pair_corr": float("nan"), "ari": adjusted_rand_index(np.zeros(len(vectors), np.int64), segments)}
    clusters = average_linkage_clusters(vectors, int(segments.max()) + 1)
    return {
        "pair_corr": pearson_correlation(similarity[upper], overlap[upper]),
        "ari": adjusted_rand_index(clusters, segments),
    }


Targets = dict[int, tuple[np.ndarray, np.ndarray]]  # target level -> (pairwise overlap (n, n), segments (n,))


def _mask_targets(masks: ArrayLike, n: int, num_levels: int, level_map: Sequence[int] | None,
                  iou_threshold: float) -> tuple[list[int], Targets]:
    """Per target mask level used: the IoU matrix and the mask segments (computed once)."""
    m = torch.as_tensor(masks).bool() if isinstance(masks, torch.Tensor) else torch.from_numpy(np.asarray(masks, bool))
    if m.ndim != 4 or m.shape[0] != n:
        raise ValueError(f"masks must be (n, L, H, W) with n = {n} columns like the levels, got {tuple(m.shape)}")
    mapping = _resolve_level_map(num_levels, m.shape[1], level_map)
    targets: Targets = {}
    for target in sorted(set(mapping)):
        iou = mask_iou_matrix(m[:, target])
        targets[target] = (iou, mask_segments(None, iou_threshold, iou=iou))
    return mapping, targets


def label_points(grid: int, height: int) -> np.ndarray:
    """Where each of the ``grid x grid`` columns reads a ``height``-pixel label map: int ``(x, y)`` ``(G*G, 2)``,
    ``(col*p + p//2, row*p + p//2)`` with ``p = height // grid``, row-major (the stage-1 grid's centres)."""
    patch = height // grid
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    return np.stack([cols * patch + patch // 2, rows * patch + patch // 2], axis=1)


def _label_targets(label_maps: Sequence[ArrayLike], points_xy: ArrayLike | None, n: int, num_levels: int,
                   level_map: Sequence[int] | None) -> tuple[list[int], Targets]:
    """Per target label map used: "IoU" 1 for points sharing a label (else 0), and the labels as segments."""
    maps = [_numpy(lm, np.int64) for lm in label_maps]
    if not maps or any(lm.ndim != 2 for lm in maps):
        raise ValueError("label_maps must be a non-empty list of (H, W) integer maps")
    if points_xy is None:
        points_xy = label_points(_grid_side(n), maps[0].shape[0])
    points = _numpy(points_xy, np.int64)
    if points.shape != (n, 2):
        raise ValueError(f"points_xy must be (n, 2) with n = {n}, got {points.shape}")
    mapping = _resolve_level_map(num_levels, len(maps), level_map)
    targets: Targets = {}
    for target in sorted(set(mapping)):
        segments = label_segments(maps[target], points)
        targets[target] = ((segments[:, None] == segments[None, :]).astype(np.float64), segments)
    return mapping, targets


def _score_levels(x: np.ndarray, mapping: list[int], targets: Targets) -> Scores:
    return {i: _score_level(x[:, i], *targets[target]) for i, target in enumerate(mapping)}


def _iteration_vectors(iterations: ArrayLike) -> np.ndarray:
    x = _numpy(iterations)
    if x.ndim != 4:
        raise ValueError(f"iterations must be one image's states (t+1, n, l, d), got shape {x.shape}")
    return x


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
    mapping, targets = _mask_targets(masks, x.shape[0], x.shape[1], level_map, iou_threshold)
    return _score_levels(x, mapping, targets)


def islands_scores_per_iteration(
    iterations: ArrayLike,
    masks: ArrayLike,
    *,
    level_map: Sequence[int] | None = None,
    iou_threshold: float = IOU_SEGMENT_THRESHOLD,
) -> list[Scores]:
    """:func:`islands_scores` of every state ``iterations`` ``(t+1, n, l, d)``: a list, index = iteration.

    The initial state (index 0) has every column alike, so its ``pair_corr`` is NaN.
    """
    x = _iteration_vectors(iterations)
    mapping, targets = _mask_targets(masks, x.shape[1], x.shape[2], level_map, iou_threshold)
    return [_score_levels(state, mapping, targets) for state in x]


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
    mapping, targets = _label_targets(label_maps, points_xy, x.shape[0], x.shape[1], level_map)
    return _score_levels(x, mapping, targets)


def islands_scores_from_labels_per_iteration(
    iterations: ArrayLike,
    label_maps: Sequence[ArrayLike],
    points_xy: ArrayLike | None = None,
    *,
    level_map: Sequence[int] | None = None,
) -> list[Scores]:
    """:func:`islands_scores_from_labels` of every state ``iterations`` ``(t+1, n, l, d)``."""
    x = _iteration_vectors(iterations)
    mapping, targets = _label_targets(label_maps, points_xy, x.shape[1], x.shape[2], level_map)
    return [_score_levels(state, mapping, targets) for state in x]


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


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass(frozen=True, eq=False)
class PcaColours:
    """A map from ``(n, d)`` vectors to RGB: the top-3 principal components of unit vectors, fitted once.

    :meth:`fit` takes the mean and the principal axes of the (unit-length) fit
    vectors; the three components share one scale (the largest absolute
    projection of the fit vectors), so a weak component stays faint. Signs are
    fixed (each component's largest-magnitude projection positive) so equal
    inputs give equal colours. Applied to other vectors of the same space
    (another iteration of the same level), the same vector gets the same colour;
    projections beyond the fitted range are clipped to [0, 1].
    """

    mean: np.ndarray  # (d,)
    axes: np.ndarray  # (d, 3), already divided by the scale and sign-fixed; zeros if the fit vectors were all alike

    @classmethod
    def fit(cls, vectors: ArrayLike) -> "PcaColours":
        x = _unit_rows(_numpy(vectors))
        mean = x.mean(0)
        _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
        axes = np.zeros((x.shape[1], 3))
        k = min(3, len(s))
        axes[:, :k] = vt[:k].T
        proj = (x - mean) @ axes
        biggest = np.abs(proj).argmax(0)
        axes *= np.where(proj[biggest, np.arange(3)] < 0, -1.0, 1.0)
        scale = float(np.abs(proj).max()) if proj.size else 0.0
        return cls(mean, axes / scale if scale >= 1e-6 else np.zeros_like(axes))  # all alike: uniform grey

    def __call__(self, vectors: ArrayLike) -> np.ndarray:
        """``(n, d)`` -> ``(n, 3)`` colours in [0, 1]."""
        proj = (_unit_rows(_numpy(vectors)) - self.mean) @ self.axes
        return np.clip(0.5 + 0.5 * proj, 0.0, 1.0)


def pca_rgb(vectors: ArrayLike) -> np.ndarray:
    """``(n, d)`` vectors -> ``(n, 3)`` colours in [0, 1]: :class:`PcaColours` fitted on these vectors.

    Identical vectors give uniform grey.
    """
    return PcaColours.fit(vectors)(vectors)


def iteration_colours(iterations: ArrayLike) -> list[PcaColours]:
    """One :class:`PcaColours` per level, fitted on that level's vectors of all states ``(t+1, n, l, d)`` together."""
    x = _iteration_vectors(iterations)
    return [PcaColours.fit(x[:, :, i].reshape(-1, x.shape[-1])) for i in range(x.shape[2])]


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


class _LevelPanel:
    """One level's panel: its ``G x G`` grid coloured by PCA over a grey copy of the image, thin lines between
    neighbouring cells less similar than ``boundary_threshold``, and the mean pairwise cosine in the title.

    It keeps its artists, so :meth:`show` can draw another state of the level into the same axes: an
    animation lays the figure out once and redraws only what changes (a new layout per frame costs more
    than the drawing, and could move the panels between frames).
    """

    def __init__(self, ax, gray: np.ndarray, grid: int, title: str, boundary_threshold: float | None,
                 colours: PcaColours | None = None):
        self.ax, self.grid, self.title = ax, grid, title
        self.boundary_threshold, self.colours = boundary_threshold, colours
        ax.imshow(gray, cmap="gray", vmin=0, vmax=1, extent=(0, grid, grid, 0), interpolation="bilinear")
        self.cells = ax.imshow(np.full((grid, grid, 3), 0.5), extent=(0, grid, grid, 0), alpha=0.8, interpolation="nearest")
        self.boundaries = None
        if boundary_threshold is not None:
            self.boundaries = ax.add_collection(LineCollection([], colors="black", linewidths=1.0), autolim=False)
        ax.set_xlim(0, grid)
        ax.set_ylim(grid, 0)
        ax.set_axis_off()

    def show(self, vectors: np.ndarray) -> None:
        """Draw the level's column vectors ``(n, d)`` (colours fitted on them unless given at construction)."""
        grid = self.grid
        self.cells.set_data((self.colours or PcaColours.fit(vectors))(vectors).reshape(grid, grid, 3))
        sim = cosine_similarity_matrix(vectors)
        mean_cos = float(sim[np.triu_indices(len(sim), 1)].mean()) if len(sim) > 1 else 1.0
        if self.boundaries is not None:
            segments = []
            for k in range(grid * grid):
                row, col = divmod(k, grid)
                if col + 1 < grid and sim[k, k + 1] < self.boundary_threshold:
                    segments.append([(col + 1, row), (col + 1, row + 1)])
                if row + 1 < grid and sim[k, k + grid] < self.boundary_threshold:
                    segments.append([(col, row + 1), (col + 1, row + 1)])
            self.boundaries.set_segments(segments)
        self.ax.set_title(f"{self.title}\nmean cos {mean_cos:.2f}" if self.title else f"mean cos {mean_cos:.2f}", fontsize=8)


def _draw_level(ax, vectors: np.ndarray, gray: np.ndarray, grid: int, title: str, boundary_threshold: float | None,
                colours: PcaColours | None = None) -> _LevelPanel:
    panel = _LevelPanel(ax, gray, grid, title, boundary_threshold, colours)
    panel.show(vectors)
    return panel


def islands_figure(
    image: ArrayLike,
    levels: ArrayLike,
    *,
    teacher: ArrayLike | None = None,
    title: str | None = None,
    boundary_threshold: float | None = 0.9,
    panel_inches: float = 2.0,
    level_colours: Sequence[PcaColours] | None = None,
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
        level_colours: one :class:`PcaColours` per level (e.g. :func:`iteration_colours`);
            default a PCA of each level of this image.

    Returns:
        A matplotlib ``Figure`` (not registered with pyplot: works headless, needs no ``close``).
    """
    return _islands_figure_panels(image, levels, teacher=teacher, title=title, boundary_threshold=boundary_threshold,
                                  panel_inches=panel_inches, level_colours=level_colours)[0]


def _islands_figure_panels(image: ArrayLike, levels: ArrayLike, *, teacher: ArrayLike | None, title: str | None,
                           boundary_threshold: float | None, panel_inches: float,
                           level_colours: Sequence[PcaColours] | None) -> tuple[Figure, list[_LevelPanel]]:
    """:func:`islands_figure` and the panels of the learned levels (to show other states in them)."""
    x = _level_vectors(levels)
    n, num_levels, _ = x.shape
    grid = _grid_side(n)
    t = None if teacher is None else _level_vectors(teacher)
    if t is not None and t.shape[0] != n:
        raise ValueError(f"teacher has {t.shape[0]} columns but levels have {n}")
    if level_colours is not None and len(level_colours) != num_levels:
        raise ValueError(f"level_colours has {len(level_colours)} entries for {num_levels} levels")
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
    panels = [_draw_level(axes[0, 1 + i], x[:, i], gray, grid, f"level {i}", boundary_threshold,
                          None if level_colours is None else level_colours[i]) for i in range(num_levels)]
    if t is not None:
        axes[1, 0].text(0.5, 0.5, "teacher\n(SAM-mask\nembeddings)", ha="center", va="center", fontsize=9, transform=axes[1, 0].transAxes)
        for i in range(t.shape[1]):
            _draw_level(axes[1, 1 + i], t[:, i], gray, grid, f"teacher level {i}", boundary_threshold)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig, panels


def _png_bytes(fig: Figure, dpi: int) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def save_islands_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG (``figsize * dpi`` pixels) atomically; returns the path."""
    atomic_write_bytes(path, _png_bytes(fig, dpi))
    return Path(path)


def _state_name(t: int) -> str:
    return "initial" if t == 0 else f"iteration {t}"


def islands_iteration_frames(
    image: ArrayLike,
    iterations: ArrayLike,
    *,
    teacher: ArrayLike | None = None,
    title: str | None = None,
    boundary_threshold: float | None = 0.9,
    panel_inches: float = 2.0,
    dpi: int = 100,
) -> Iterator[Image.Image]:
    """One RGB frame per state of ``iterations`` ``(t+1, n, l, d)``, initial state first, for :func:`save_islands_gif`.

    Each frame is drawn like :func:`islands_figure` (``figsize * dpi`` pixels), its
    title naming the iteration, with colours from :func:`iteration_colours` (one
    PCA per level over all states), so a colour means the same vector in every
    frame. The figure is laid out once, for the first frame; later frames redraw
    the level panels in place (the image and teacher panels do not change).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    x = _iteration_vectors(iterations)
    colours = iteration_colours(x)
    last = len(x) - 1

    def heading(t: int) -> str:
        name = f"{_state_name(t)} of {last}"
        return f"{title}: {name}" if title else name

    fig, panels = _islands_figure_panels(image, x[0], teacher=teacher, title=heading(0), boundary_threshold=boundary_threshold,
                                         panel_inches=panel_inches, level_colours=colours)
    fig.set_dpi(dpi)
    canvas = FigureCanvasAgg(fig)
    for t, state in enumerate(x):
        if t:
            for i, panel in enumerate(panels):
                panel.show(state[:, i])
            fig.suptitle(heading(t), fontsize=10)
        canvas.draw()
        if t == 0:
            fig.set_layout_engine("none")  # keep the first frame's layout: no jitter, no layout cost per frame
        yield Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")


def save_islands_gif(frames: Iterable[Image.Image], path: str | os.PathLike, *, frame_ms: int = 700,
                     last_frame_ms: int = 2000) -> Path:
    """Write frames (PIL images of one size, e.g. :func:`islands_iteration_frames`) as a looping GIF, atomically.

    Every frame is shown ``frame_ms``, the last one ``last_frame_ms`` so the final
    islands can be read. Each frame gets its own 256-colour palette, without
    dithering (flat cells stay flat). Returns the path.
    """
    quantised = [frame.convert("RGB").quantize(256, dither=Image.Dither.NONE) for frame in frames]
    if not quantised:
        raise ValueError(f"{path}: no frames to write")
    sizes = {frame.size for frame in quantised}
    if len(sizes) > 1:
        raise ValueError(f"{path}: frames differ in size {sorted(sizes)}; draw them with the same figure size")
    durations = [frame_ms] * (len(quantised) - 1) + [last_frame_ms]
    buf = io.BytesIO()
    quantised[0].save(buf, format="GIF", save_all=True, append_images=quantised[1:], duration=durations, loop=0,
                      disposal=1, optimize=False)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def islands_strip_figure(
    image: ArrayLike,
    iterations: ArrayLike,
    *,
    title: str | None = None,
    boundary_threshold: float | None = 0.9,
    panel_inches: float = 1.5,
) -> Figure:
    """Islands forming, as one static figure: one row per level, one column per state (initial first).

    The first column shows the image (top row). Colours are fixed per level over
    the row (:func:`iteration_colours`); each panel gives its mean pairwise
    cosine similarity. The figure is ``(1 + t+1) * panel_inches`` wide and
    ``l * panel_inches`` high.
    """
    x = _iteration_vectors(iterations)
    states, n, num_levels, _ = x.shape
    grid = _grid_side(n)
    colours = iteration_colours(x)
    rgb = _display_image(image)
    gray = rgb @ np.array([0.299, 0.587, 0.114])
    fig = Figure(figsize=((1 + states) * panel_inches, num_levels * panel_inches), layout="constrained")
    axes = fig.subplots(num_levels, 1 + states, squeeze=False)
    for ax in axes[:, 0]:
        ax.set_axis_off()
    axes[0, 0].imshow(rgb, interpolation="nearest")
    axes[0, 0].set_title("image", fontsize=8)
    for i in range(num_levels):
        for t in range(states):
            header = ("initial" if t == 0 else f"t = {t}") if i == 0 else ""
            _draw_level(axes[i, 1 + t], x[t, :, i], gray, grid, header, boundary_threshold, colours[i])
        first = axes[i, 1]  # the row's label as the first panel's y label (an axis kept on, without ticks or frame)
        first.set_axis_on()
        first.set_xticks([])
        first.set_yticks([])
        for spine in first.spines.values():
            spine.set_visible(False)
        first.set_ylabel(f"level {i}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


__all__ = [
    "PcaColours", "adjusted_rand_index", "average_islands_scores", "average_linkage_clusters", "connected_segments",
    "cosine_similarity_matrix", "islands_figure", "islands_iteration_frames", "islands_scores", "islands_scores_batch",
    "islands_scores_from_labels", "islands_scores_from_labels_per_iteration", "islands_scores_per_iteration",
    "islands_strip_figure", "iteration_colours", "label_points", "label_segments", "mask_iou_matrix", "mask_segments", "pca_rgb",
    "pearson_correlation", "save_islands_figure", "save_islands_gif",
]  # fmt: skip
