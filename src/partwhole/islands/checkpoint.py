"""A trained checkpoint's islands of agreement: draw them and score them on chosen images, without training.

:func:`pick_images` chooses the images (given files, or ``count`` spread over a split's image folder);
:func:`draw_islands_for_checkpoint` writes, for each image, into a run folder:

* ``islands/<class>_<stem>.png``: the input, the learned levels, and the teacher's SAM-mask
  embeddings when stage 2 wrote them (:func:`~partwhole.islands.figures.islands_figure`);
* the islands scores (:mod:`partwhole.islands.scores`) per level against the stage-1 masks
  (``<root>/<split>_masks``) and, for the toy set, its ground-truth parts and objects
  (``<root>/<split>_gt``), averaged over the images into ``islands/scores.json``, for the final
  levels and, under ``per_iteration``, for every state of the iterations (index 0: the initial state);
* with ``animate``, in ``islands/iterations/``: ``<class>_<stem>.gif``, one frame per state drawn like
  the PNG with colours fixed across frames (:mod:`partwhole.islands.gif`), and ``<class>_<stem>_strip.png``,
  one row per level and one column per state;
* with ``html``, ``islands.html``: the islands explorer (:mod:`partwhole.islands.html`), one
  self-contained page over every chosen image, from the same forward pass, masks and scores.

It returns the scores and the summary lines a command line shows. Plain arguments; errors about a
setting are :class:`~partwhole.common.errors.SettingError` naming the argument.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from partwhole.agglomerator.data import (
    FOLDER_DATASETS,
    DataConfig,
    build_transform,
    normalization,
)
from partwhole.common.errors import SettingError
from partwhole.common.image_folders import (
    EMBEDS_SUFFIX,
    GT_SUFFIX,
    MASKS_SUFFIX,
    ImageRecord,
    list_image_folder,
    load_rgb_image,
)
from partwhole.common.mask_io import DistinctMasks, load_embeddings, read_distinct_masks
from partwhole.common.safe_files import atomic_write_json
from partwhole.islands import html as islands_html
from partwhole.islands.figures import (
    islands_figure,
    islands_strip_figure,
    save_islands_figure,
)
from partwhole.islands.gif import islands_iteration_frames, save_islands_gif
from partwhole.islands.scores import (
    average_islands_scores,
    islands_scores_from_labels_per_iteration,
    islands_scores_per_iteration,
)

log = logging.getLogger(__name__)

GIVEN_IMAGES_NOTE = ("No stage-1 masks: an image given as a file (masks are read only for the images of a split, "
                     "from <root>/<split>_masks).")


def spread(records: list[ImageRecord], count: int) -> list[ImageRecord]:
    """``count`` records evenly spread over the (class-sorted) list, so several classes show."""
    if count >= len(records):
        return records
    picks = np.linspace(0, len(records) - 1, count).round().astype(int)
    return [records[i] for i in picks]


def pick_images(*, dataset: str, data_dir: str, split: str = "val", count: int = 8, images: list[str] | None = None,
                html: bool = False) -> list[ImageRecord]:
    """The images to draw: the files ``images`` (class ``given``), else ``count`` spread over ``<root>/<split>``.

    Raises:
        SettingError: ``images`` is empty for a dataset without an image folder; ``count`` picks none for a page.
    """
    if images:
        return [ImageRecord(Path(p), -1, "given") for p in images]
    if dataset not in FOLDER_DATASETS:
        raise SettingError("images", "", f"{dataset} has no image folder to pick images from: give image files")
    folder = DataConfig(dataset=dataset, data_dir=data_dir).root / split
    records = spread(list_image_folder(folder), count)
    if html and not records:
        raise SettingError("count", count, f"no images to show on the islands page ({folder})")
    return records


def ground_truth_label_maps(path: Path) -> list[np.ndarray] | None:
    """Toy ground truth as per-level label maps: parts, this object, all objects."""
    if not path.is_file():
        return None
    from partwhole.toy.dataset import load_toy_ground_truth

    gt = load_toy_ground_truth(path)
    return [gt["parts"], gt["objects"], (gt["objects"] > 0).astype(np.int32)]


def format_scores(name: str, scores: dict) -> str:
    """One line: ``name: L0 pair_corr=... ari=..., L1 ...``."""
    return f"{name}: " + ", ".join(
        f"L{level} pair_corr={s['pair_corr']:.3f} ari={s['ari']:.3f}" for level, s in sorted(scores.items()))


def format_iteration_scores(name: str, per_iteration: list[dict], score: str = "ari") -> str:
    """One line: ``name (ari L0/L1/...): t0 a/b/c, t1 ...``; does agreement grow over the iterations?"""
    levels = sorted(per_iteration[0])
    states = ", ".join(f"t{t} " + "/".join(f"{scores[level][score]:.2f}" for level in levels)
                       for t, scores in enumerate(per_iteration))
    return f"{name} ({score} " + "/".join(f"L{level}" for level in levels) + f"): {states}"


def average_per_iteration(per_image: list[list[dict]]) -> list[dict]:
    """Per-image lists of per-state scores -> one list: each state's scores averaged over the images."""
    return [average_islands_scores(image[t] for image in per_image) for t in range(len(per_image[0]))]


class ImageTargets(NamedTuple):
    """What one image's islands are scored against, and how they scored (per state, index 0 the initial)."""

    masks: DistinctMasks | None  # the stage-1 masks, when their file exists and has one point per column
    label_maps: list[np.ndarray] | None  # the toy set's ground truth, when present
    scores: dict[str, list[dict]]  # "stage1_masks" / "ground_truth" -> per-state scores
    note: str  # why there are no stage-1 masks (empty when there are)


def score_image(record: ImageRecord, root: Path, split: str, iterations: torch.Tensor) -> ImageTargets:
    """Score one split image's states ``(t+1, n, l, d)`` against its stage-1 masks and ground truth, where present."""
    masks, label_maps, scores, note = None, None, {}, ""
    masks_path = record.output_path(root / f"{split}{MASKS_SUFFIX}")
    if not masks_path.is_file():
        note = f"No stage-1 mask file for this image ({masks_path} does not exist)."
    else:
        stored = read_distinct_masks(masks_path)
        if stored.shape[0] == iterations.shape[1]:
            masks = stored
            scores["stage1_masks"] = islands_scores_per_iteration(iterations, stored.expand())
        else:
            note = f"{masks_path}: {stored.shape[0]} mask points but {iterations.shape[1]} columns: not shown, not scored."
            log.warning("%s", note)
    label_maps = ground_truth_label_maps(record.output_path(root / f"{split}{GT_SUFFIX}", suffix=".npz"))
    if label_maps is not None:
        scores["ground_truth"] = islands_scores_from_labels_per_iteration(iterations, label_maps)
    return ImageTargets(masks, label_maps, scores, note)


def explorer_image(record: ImageRecord, image: torch.Tensor, iterations: torch.Tensor, targets: ImageTargets,
                   config: DataConfig, split: str) -> dict:
    """One image's entry of the islands explorer (``islands_html.page_image``)."""
    grid = math.isqrt(iterations.shape[1])
    masks = None if targets.masks is None else islands_html.stage1_mask_set(
        targets.masks, f"{split}{MASKS_SUFFIX}/{record.class_name}/{record.path.stem}.pkl")
    truth = None if targets.label_maps is None else islands_html.ground_truth_mask_set(
        targets.label_maps, grid, f"toy ground truth, {split}{GT_SUFFIX}")
    return islands_html.page_image(
        name=f"{record.class_name}_{record.path.stem}", title=f"{record.class_name}/{record.path.name}",
        image_url=islands_html.display_png(image, *normalization(config)), iterations=iterations, masks=masks,
        ground_truth=truth, masks_note=targets.note, scores=targets.scores)


def summarise_scores(per_image_scores: dict[str, list]) -> tuple[dict, list[str]]:
    """The scores of scores.json (per source, the final state's and every state's scores averaged over the
    images) and their summary lines."""
    result, per_iteration, lines = {}, {}, []
    for key, label in (("stage1_masks", "stage-1 masks"), ("ground_truth", "ground-truth parts/objects")):
        per_image = per_image_scores[key]
        if not per_image:
            continue
        per_iteration[key] = average_per_iteration(per_image)
        result[key] = per_iteration[key][-1]
        lines.append(format_scores(f"islands vs {label} ({len(per_image)} images)", result[key]))
        lines.append(format_iteration_scores(f"  over the iterations, vs {label}", per_iteration[key]))
    if per_iteration:
        result["per_iteration"] = per_iteration
    return result, lines


@dataclass
class CheckpointIslands:
    """What :func:`draw_islands_for_checkpoint` wrote: ``scores`` (``scores.json``'s content, plus ``html``,
    the page's path, when written) and ``summary``, the lines a command line shows."""

    scores: dict
    summary: list[str] = field(default_factory=list)


@dataclass
class _Drawn:
    """The running totals of the images drawn so far."""

    per_image_scores: dict[str, list] = field(default_factory=lambda: {"stage1_masks": [], "ground_truth": []})
    page_images: list[dict] = field(default_factory=list)
    animation_seconds: float = 0.0
    states: int = 0


def _draw_image(module, record: ImageRecord, *, transform, config: DataConfig, split: str, given: bool,
                embeds_suffix: str, out_dir: Path, animate: bool, html: bool, drawn: _Drawn) -> None:
    """One image: its figure (and animation), its scores, its page entry, added to ``drawn``."""
    image = transform(load_rgb_image(record.path))
    out = module.model(image[None].to(module.device), return_iterations=True)
    levels = out.levels[0].float().cpu()
    iterations = out.iterations[0].float().cpu()  # (t+1, n, l, d)
    drawn.states = len(iterations)
    teacher = None
    embeds_path = record.output_path(config.root / f"{split}{embeds_suffix}")
    if not given and embeds_path.is_file():
        teacher = torch.from_numpy(load_embeddings(embeds_path))
    name, title = f"{record.class_name}_{record.path.stem}", f"{record.class_name}/{record.path.name}"
    save_islands_figure(islands_figure(image, levels, teacher=teacher, title=title), out_dir / f"{name}.png")
    if animate:
        start = time.perf_counter()
        save_islands_gif(islands_iteration_frames(image, iterations, teacher=teacher, title=title),
                         out_dir / "iterations" / f"{name}.gif")
        save_islands_figure(islands_strip_figure(image, iterations, title=title), out_dir / "iterations" / f"{name}_strip.png")
        drawn.animation_seconds += time.perf_counter() - start
    targets = (ImageTargets(None, None, {}, GIVEN_IMAGES_NOTE) if given
               else score_image(record, config.root, split, iterations))
    for key, scores in targets.scores.items():
        drawn.per_image_scores[key].append(scores)
    if html:
        drawn.page_images.append(explorer_image(record, image, iterations, targets, config, split))
    log.debug("islands of %s drawn", record.path)


@torch.no_grad()
def draw_islands_for_checkpoint(module, records: list[ImageRecord], run_dir: Path, *, dataset: str, data_dir: str,
                                split: str = "val", given: bool = False, embeds_suffix: str = EMBEDS_SUFFIX,
                                animate: bool = False, html: bool = False, checkpoint: str = "") -> CheckpointIslands:
    """Draw and score the islands of ``module`` (an ``AgglomeratorLitModule``) on ``records`` into ``run_dir``.

    ``records`` come from :func:`pick_images`; ``given``: they are files given by the user (no teacher
    embeddings, masks or ground truth are looked up for them). With ``animate``, also writes each image's
    iterations as a GIF and a strip PNG; with ``html``, the islands explorer page (module docstring);
    ``checkpoint`` only names the model on that page.
    """
    module.eval()
    model = module.model
    config = DataConfig(dataset=dataset, data_dir=data_dir, image_size=model.config.image_size,
                        n_channels=model.config.n_channels, objective="classify")
    transform = build_transform(config, train=False)
    out_dir = run_dir / "islands"
    drawn = _Drawn()
    for record in records:
        _draw_image(module, record, transform=transform, config=config, split=split, given=given,
                    embeds_suffix=embeds_suffix, out_dir=out_dir, animate=animate, html=html, drawn=drawn)
    result = {"images": len(records), "figures": str(out_dir), "iterations": model.config.num_iters}
    if animate:
        result["animations"] = str(out_dir / "iterations")
    scores, score_lines = summarise_scores(drawn.per_image_scores)
    result.update(scores)
    atomic_write_json(out_dir / "scores.json", result)
    summary = [f"islands: {len(records)} figures in {out_dir}"]
    if animate:
        summary.append(f"islands: {len(records)} GIFs and strips ({drawn.states} states each) in {out_dir / 'iterations'}, "
                       f"{drawn.animation_seconds / max(1, len(records)):.1f} s per image")
    if html:
        page = run_dir / "islands.html"
        source = "given images" if given else f"{dataset} {split}"
        size = islands_html.write_islands_page(
            page, drawn.page_images, heading=f"{checkpoint or 'checkpoint'}: {len(drawn.page_images)} images of "
            f"{source}, {model.config.num_iters} iterations, {model.config.levels} levels")
        result["html"] = str(page)
        summary.append(f"islands: explorer page {page} ({size / 1e6:.2f} MB, {len(drawn.page_images)} images)")
    return CheckpointIslands(result, score_lines + summary)
