"""Small generated inputs for tests: Imagenette-layout folders with stage-2 embeddings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from partwhole.common.mask_io import save_embeddings

TINY_FLAGS = [
    "--dataset=IMAGENETTE", "--image_size=32", "--conv_image_size=8", "--patch_size=4", "--patch_dim=32",
    "--levels=3", "--batch_size=4", "--num_workers=0", "--n_classes=2", "--learning_rate=1e-3", "--precision=32",
]


def make_image_folder(root: Path, *, classes=("a_cls", "b_cls"), per_class=4, size=40, num_patches=4, levels=3,
                      dim=32, splits=("train", "val"), seed=0) -> Path:
    """``root/imagenette2/{split}/<class>/imgN.JPEG`` plus ``{split}_masks_embeds/<class>/imgN.pkl``.

    Images of class ``b`` are brighter, so a classifier can learn something.
    """
    rng = np.random.default_rng(seed)
    base = Path(root) / "imagenette2"
    for split in splits:
        for label, name in enumerate(classes):
            for i in range(per_class):
                pixels = (rng.random((size, size, 3)) * 120 + 120 * label).astype("uint8")
                path = base / split / name / f"img{i}.JPEG"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(path)
                embeds = rng.standard_normal((num_patches, levels, dim)).astype("float32")
                save_embeddings(base / f"{split}_masks_embeds" / name / f"img{i}.pkl", embeds)
    return base
