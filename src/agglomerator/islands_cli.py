"""``--mode islands``: draw a checkpoint's islands of agreement and score them, without training.

For each chosen image: a PNG (input, learned levels, and the teacher's SAM-mask
embeddings when stage 2 wrote them) in ``<run>/islands/``; per level, the islands
scores (``agglomerator.islands``) against the stage-1 masks
(``<root>/<split>_masks``) and, for the toy set, its ground-truth parts and
objects (``<root>/<split>_gt``), averaged over the images into
``<run>/islands/scores.json``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from agglomerator.data import EMBEDDINGS_SUFFIX, FOLDER_DATASETS, MASKS_SUFFIX, DataConfig, build_transform
from agglomerator.islands import (average_islands_scores, islands_figure, islands_scores, islands_scores_from_labels,
                                  save_islands_figure)
from hierarchical_masks.mask_io import (InputError, ImageRecord, atomic_write_bytes, list_image_folder, load_embeddings,
                                        load_masks, load_rgb_image)

log = logging.getLogger(__name__)
GT_SUFFIX = "_gt"


def spread(records: list[ImageRecord], count: int) -> list[ImageRecord]:
    """``count`` records evenly spread over the (class-sorted) list, so several classes show."""
    if count >= len(records):
        return records
    picks = np.linspace(0, len(records) - 1, count).round().astype(int)
    return [records[i] for i in picks]


def ground_truth_label_maps(path: Path) -> list[np.ndarray] | None:
    """Toy ground truth as per-level label maps: parts, this object, all objects."""
    if not path.is_file():
        return None
    from agglomerator.toy_dataset import load_toy_ground_truth

    gt = load_toy_ground_truth(path)
    return [gt["parts"], gt["objects"], (gt["objects"] > 0).astype(np.int32)]


def format_scores(name: str, scores: dict) -> str:
    """One line: ``name: L0 pair_corr=... ari=..., L1 ...``."""
    return f"{name}: " + ", ".join(
        f"L{level} pair_corr={s['pair_corr']:.3f} ari={s['ari']:.3f}" for level, s in sorted(scores.items()))


@torch.no_grad()
def draw_islands_for_checkpoint(module, *, dataset: str, data_dir: str, split: str = "val", count: int = 8,
                                images: list[str] | None = None, output_dir: str = "", exp_name: str = "islands",
                                embeds_suffix: str = EMBEDDINGS_SUFFIX) -> dict:
    """Draw and score the islands of ``module`` (an ``AgglomeratorLitModule``); returns the averaged scores."""
    from agglomerator.engine import make_run_dir

    module.eval()
    model = module.model
    config = DataConfig(dataset=dataset, data_dir=data_dir, image_size=model.config.image_size,
                        n_channels=model.config.n_channels, objective="classify")
    transform = build_transform(config, train=False)
    root = config.root
    if images:
        records = [ImageRecord(Path(p), -1, "given") for p in images]
    elif dataset in FOLDER_DATASETS:
        records = spread(list_image_folder(root / split), count)
    else:
        raise InputError(f"--mode islands on {dataset}: pass image files with --islands_images (no image folder to pick from)")
    run_dir = make_run_dir(output_dir, exp_name, "islands")
    out_dir = run_dir / "islands"
    against_masks, against_gt = [], []
    for record in records:
        image = transform(load_rgb_image(record.path))
        out = model(image[None].to(module.device))
        levels = out.levels[0].float().cpu()
        teacher = None
        embeds_path = record.output_path(root / f"{split}{embeds_suffix}")
        if not images and embeds_path.is_file():
            teacher = torch.from_numpy(load_embeddings(embeds_path))
        fig = islands_figure(image, levels, teacher=teacher, title=f"{record.class_name}/{record.path.name}")
        save_islands_figure(fig, out_dir / f"{record.class_name}_{record.path.stem}.png")
        if images:
            continue
        masks_path = record.output_path(root / f"{split}{MASKS_SUFFIX}")
        if masks_path.is_file():
            masks = load_masks(masks_path)
            if masks.shape[0] == levels.shape[0]:
                against_masks.append(islands_scores(levels, masks))
            else:
                log.warning("%s: %d mask points but %d columns: not scored", masks_path, masks.shape[0], levels.shape[0])
        label_maps = ground_truth_label_maps(record.output_path(root / f"{split}{GT_SUFFIX}", suffix=".npz"))
        if label_maps is not None:
            against_gt.append(islands_scores_from_labels(levels, label_maps))
    result = {"images": len(records), "figures": str(out_dir)}
    if against_masks:
        result["stage1_masks"] = average_islands_scores(against_masks)
        print(format_scores(f"islands vs stage-1 masks ({len(against_masks)} images)", result["stage1_masks"]))
    if against_gt:
        result["ground_truth"] = average_islands_scores(against_gt)
        print(format_scores(f"islands vs ground-truth parts/objects ({len(against_gt)} images)", result["ground_truth"]))
    atomic_write_bytes(out_dir / "scores.json", json.dumps(result, indent=2, default=float).encode())
    print(f"islands: {len(records)} figures in {out_dir}")
    return result
