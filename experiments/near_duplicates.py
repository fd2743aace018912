"""Is any image of a test split (nearly) repeated in a training pool?

A check for leaks from test into pretraining, e.g. the toy study's extra unlabelled images
(``--unlabelled_per_class``, generator seed 1) against its test split (seed 0). For every test image it
finds the nearest image of each pool by RMS pixel difference (images as RGB in [0, 1], resized to the
test images' size) and prints the distribution of those distances. A pool that is no closer to the test
images than the study's own training images are (a baseline that cannot leak test images by
construction) adds no test image::

    python experiments/near_duplicates.py --test_dir=datasets/toy/val \\
        --pools=datasets/toy/train,datasets/unlabelled/toy/train

Test images with a neighbour under ``--threshold`` are listed (none, for a pool without leaks).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from absl import app, flags

from partwhole.common.errors import InputError  # noqa: E402
from partwhole.common.image_folders import list_image_folder, load_rgb_image  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("test_dir", "datasets/toy/val", "The test split, an image folder <root>/<class>/<image>.")
flags.DEFINE_list("pools", ["datasets/toy/train", "datasets/unlabelled/toy/train"], "Image folders to search for the test images.")
flags.DEFINE_float("threshold", 0.01, "RMS pixel difference (images in [0, 1]) under which a pair counts as a near-duplicate.")


def load_folder(root: str | Path, size: tuple[int, int] | None = None) -> tuple[torch.Tensor, list[Path]]:
    """All images of ``root`` flattened to ``(N, H * W * 3)`` in [0, 1], resized to ``size=(width, height)`` (default: the
    first image's size), and their paths. An error naming the folder if it holds no image."""
    records = list_image_folder(root)
    if not records:
        raise InputError(f"{root}: no images")
    size = size or load_rgb_image(records[0].path).size
    pixels = [np.asarray(load_rgb_image(record.path, size), dtype=np.float32) / 255 for record in records]
    return torch.from_numpy(np.stack(pixels)).flatten(1), [record.path for record in records]


def nearest_distances(test: torch.Tensor, pool: torch.Tensor, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``test``: the RMS difference to its nearest row of ``pool``, and that row's index."""
    values, indices = [], []
    for start in range(0, len(test), chunk):
        distances = torch.cdist(test[start:start + chunk].double(), pool.double()) / test.shape[1] ** 0.5
        value, index = distances.min(1)
        values.append(value.float())
        indices.append(index)
    return torch.cat(values), torch.cat(indices)


def report(test_dir: str | Path, pools: Sequence[str | Path], threshold: float) -> list[tuple[Path, Path, float]]:
    """Print each pool's nearest-neighbour distances to the test images; return the near-duplicate pairs."""
    test, test_paths = load_folder(test_dir)
    size = load_rgb_image(test_paths[0]).size
    pairs = []
    for root in pools:
        pool, pool_paths = load_folder(root, size)
        value, index = nearest_distances(test, pool)
        close = (value < threshold).nonzero().flatten().tolist()
        print(f"{root}: {len(pool)} images; each of the {len(test)} test images' nearest, RMS pixel difference: "
              f"min {value.min():.4f}, 5th percentile {value.quantile(0.05):.4f}, median {value.median():.4f}; "
              f"under {threshold}: {len(close)}")
        for i in close:
            pairs.append((test_paths[i], pool_paths[index[i]], float(value[i])))
            print(f"  {test_paths[i]} ~ {pool_paths[index[i]]} ({value[i]:.4f})")
    return pairs


def main(argv):
    del argv
    try:
        report(FLAGS.test_dir, FLAGS.pools, FLAGS.threshold)
    except InputError as err:  # a missing or empty folder: one line, no traceback
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    app.run(main)
