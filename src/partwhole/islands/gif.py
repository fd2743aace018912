"""Islands forming over the iterations, animated: one frame per state of one image's columns, as a looping GIF.

:func:`islands_iteration_frames` draws each state ``(t+1, n, l, d)`` like
:func:`~partwhole.islands.figures.islands_figure`, with colours fixed across frames
(:func:`~partwhole.islands.figures.iteration_colours`), and :func:`save_islands_gif` encodes them.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from partwhole.common.safe_files import atomic_write_bytes
from partwhole.islands.figures import islands_figure_panels, iteration_colours
from partwhole.islands.scores import ArrayLike, check_iterations


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

    Each frame is drawn like :func:`~partwhole.islands.figures.islands_figure` (``figsize * dpi`` pixels), its
    title naming the iteration, with colours from :func:`~partwhole.islands.figures.iteration_colours` (one
    PCA per level over all states), so a colour means the same vector in every
    frame. The figure is laid out once, for the first frame; later frames redraw
    the level panels in place (the image and teacher panels do not change).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    x = check_iterations(iterations)
    colours = iteration_colours(x)
    last = len(x) - 1

    def heading(t: int) -> str:
        name = f"{_state_name(t)} of {last}"
        return f"{title}: {name}" if title else name

    fig, panels = islands_figure_panels(image, x[0], teacher=teacher, title=heading(0), boundary_threshold=boundary_threshold,
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


__all__ = ["islands_iteration_frames", "save_islands_gif"]
