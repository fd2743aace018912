"""Islands of agreement, drawn: one image's columns as a grid of cells coloured by a PCA of their vectors.

For one image's columns ``levels`` ``(n, l, d)`` (``n = G*G``, row-major, as in :mod:`partwhole.islands.scores`):

* :func:`islands_figure` draws the image and, per level, the ``G x G`` grid
  coloured by a PCA of that level's (unit-length) column vectors to RGB, so
  columns with similar vectors share a colour, with thin lines between
  neighbouring cells whose cosine similarity is below ``boundary_threshold``.
  With ``teacher`` (the SAM-mask embeddings ``(n, 3, D)``) a second row draws
  the targets the same way. :func:`save_islands_figure` writes a PNG atomically.
* For the iterations ``(t+1, n, l, d)``: :func:`iteration_colours` fits one PCA per level on the
  vectors of all states together, so a colour means the same vector in every state;
  :func:`islands_strip_figure` draws one row per level and one column per state (a static figure
  for papers). The animated GIF of the same states is :mod:`partwhole.islands.gif`.

Figures are matplotlib ``Figure`` objects, not registered with pyplot: headless, nothing to close.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

from partwhole.common.safe_files import atomic_write_bytes
from partwhole.islands.scores import (
    ArrayLike,
    as_numpy,
    check_iterations,
    check_levels,
    cosine_similarity_matrix,
    grid_side,
)


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
        x = _unit_rows(as_numpy(vectors))
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
        proj = (_unit_rows(as_numpy(vectors)) - self.mean) @ self.axes
        return np.clip(0.5 + 0.5 * proj, 0.0, 1.0)


def pca_rgb(vectors: ArrayLike) -> np.ndarray:
    """``(n, d)`` vectors -> ``(n, 3)`` colours in [0, 1]: :class:`PcaColours` fitted on these vectors.

    Identical vectors give uniform grey.
    """
    return PcaColours.fit(vectors)(vectors)


def iteration_colours(iterations: ArrayLike) -> list[PcaColours]:
    """One :class:`PcaColours` per level, fitted on that level's vectors of all states ``(t+1, n, l, d)`` together."""
    x = check_iterations(iterations)
    return [PcaColours.fit(x[:, :, i].reshape(-1, x.shape[-1])) for i in range(x.shape[2])]


def _display_image(image: ArrayLike) -> np.ndarray:
    """(3, H, W) or (H, W, 3), normalised, [0, 1] or [0, 255] -> float (H, W, 3) in [0, 1]."""
    is_uint8 = (isinstance(image, np.ndarray) and image.dtype == np.uint8) or (
        isinstance(image, torch.Tensor) and image.dtype == torch.uint8
    )
    x = as_numpy(image)
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


class LevelPanel:
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
                colours: PcaColours | None = None) -> LevelPanel:
    panel = LevelPanel(ax, gray, grid, title, boundary_threshold, colours)
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
    return islands_figure_panels(image, levels, teacher=teacher, title=title, boundary_threshold=boundary_threshold,
                                 panel_inches=panel_inches, level_colours=level_colours)[0]


def islands_figure_panels(image: ArrayLike, levels: ArrayLike, *, teacher: ArrayLike | None, title: str | None,
                          boundary_threshold: float | None, panel_inches: float,
                          level_colours: Sequence[PcaColours] | None) -> tuple[Figure, list[LevelPanel]]:
    """:func:`islands_figure` and the panels of the learned levels (to show other states in them)."""
    x = check_levels(levels)
    n, num_levels, _ = x.shape
    grid = grid_side(n)
    t = None if teacher is None else check_levels(teacher)
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
    x = check_iterations(iterations)
    states, n, num_levels, _ = x.shape
    grid = grid_side(n)
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
    "PcaColours", "islands_figure", "islands_figure_panels", "islands_strip_figure", "iteration_colours", "pca_rgb",
    "save_islands_figure",
]  # fmt: skip
