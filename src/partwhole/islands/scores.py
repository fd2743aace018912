"""Islands of agreement, scored: how well one image's columns agree where the stage-1 masks say they should.

GLOM's claim is that, at each level, neighbouring columns come to hold nearly the
same vector over a whole part (low levels) or object (high levels): "islands".
This module measures that for one image's columns ``levels`` ``(n, l, d)``
(``n = G*G`` columns, row-major, one per point of the stage-1 grid,
:func:`partwhole.common.point_grid.patch_grid_points`):

* :func:`islands_scores` scores each level against the stage-1 masks ``(n, L, H, W)``;
  :func:`islands_scores_from_labels` against ground-truth label maps;
  :func:`islands_scores_batch` / :func:`average_islands_scores` average over images;
* :func:`islands_scores_per_iteration` / :func:`islands_scores_from_labels_per_iteration`
  score every state of the model's ``iterations`` ``(t+1, n, l, d)`` (GLOM's dynamics:
  agreement should grow as columns iterate; the targets are computed once).

Drawing them is :mod:`partwhole.islands.figures`; animating the iterations, :mod:`partwhole.islands.gif`.

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
No matplotlib, no Lightning.
"""

from __future__ import annotations

import math
import warnings
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch
from scipy.cluster.hierarchy import cut_tree, linkage
from scipy.sparse.csgraph import connected_components
from scipy.spatial.distance import squareform
from torchmetrics.functional.clustering import adjusted_rand_score

from partwhole.common.point_grid import patch_grid_points

ArrayLike = np.ndarray | torch.Tensor
Scores = dict[int, dict[str, float]]
IOU_SEGMENT_THRESHOLD = 0.5
ALIKE_TOLERANCE = 1e-6  # float32 columns computed alike differ by rounding only, far below this


# --------------------------------------------------------------------------- small maths


def as_numpy(x: ArrayLike, dtype=np.float64) -> np.ndarray:
    """A numpy array or a torch tensor (any device, bf16 included) as a numpy array of ``dtype``."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        x = x.float() if x.is_floating_point() else x
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def grid_side(n: int) -> int:
    """``G`` for ``n = G*G`` columns; a ``ValueError`` when ``n`` is not a square."""
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} columns do not form a square grid; expected n = G*G (one column per patch, row-major)")
    return side


def cosine_similarity_matrix(vectors: ArrayLike) -> np.ndarray:
    """``(n, d)`` vectors -> ``(n, n)`` cosine similarities (a zero vector has similarity 0 to all)."""
    x = as_numpy(vectors)
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
    labels = np.asarray(as_numpy(label_map, np.int64))
    pts = np.asarray(as_numpy(points_xy, np.int64))
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
    a, b = (torch.as_tensor(as_numpy(x, np.int64)).reshape(-1) for x in (labels_a, labels_b))
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


def check_levels(levels: ArrayLike) -> np.ndarray:
    """One image's columns ``(n, l, d)`` as float64 numpy; a ``ValueError`` for another shape."""
    x = as_numpy(levels)
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
    """Where each of the ``grid x grid`` columns reads a ``height``-pixel label map: int ``(x, y)`` ``(G*G, 2)``.

    The stage-1 grid (:func:`~partwhole.common.point_grid.patch_grid_points`) of patches ``p = height // grid``,
    rounded down to whole pixels: ``(col*p + p//2, row*p + p//2)``, row-major.
    """
    patch = height // grid
    return np.floor(patch_grid_points(grid * patch, patch)).astype(np.int64)


def _label_targets(label_maps: Sequence[ArrayLike], points_xy: ArrayLike | None, n: int, num_levels: int,
                   level_map: Sequence[int] | None) -> tuple[list[int], Targets]:
    """Per target label map used: "IoU" 1 for points sharing a label (else 0), and the labels as segments."""
    maps = [as_numpy(lm, np.int64) for lm in label_maps]
    if not maps or any(lm.ndim != 2 for lm in maps):
        raise ValueError("label_maps must be a non-empty list of (H, W) integer maps")
    if points_xy is None:
        points_xy = label_points(grid_side(n), maps[0].shape[0])
    points = as_numpy(points_xy, np.int64)
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


def check_iterations(iterations: ArrayLike) -> np.ndarray:
    """One image's states ``(t+1, n, l, d)`` as float64 numpy; a ``ValueError`` for another shape."""
    x = as_numpy(iterations)
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
    x = check_levels(levels)
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
    x = check_iterations(iterations)
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
    x = check_levels(levels)
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
    x = check_iterations(iterations)
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


__all__ = [
    "ALIKE_TOLERANCE", "IOU_SEGMENT_THRESHOLD", "adjusted_rand_index", "as_numpy", "average_islands_scores",
    "average_linkage_clusters", "check_iterations", "check_levels", "connected_segments", "cosine_similarity_matrix",
    "grid_side", "islands_scores", "islands_scores_batch", "islands_scores_from_labels",
    "islands_scores_from_labels_per_iteration", "islands_scores_per_iteration", "label_points", "label_segments",
    "mask_iou_matrix", "mask_segments", "pearson_correlation",
]  # fmt: skip
