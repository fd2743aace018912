"""Image folders ``<root>/<class>/<image>`` (the Imagenette layout): listing and opening images.

:func:`list_image_folder` lists them (classes and files sorted), :func:`load_rgb_image` opens any image
PIL reads as RGB with the one resize shared by stages 1 and 2, and :meth:`ImageRecord.output_path` says
where a stage writes an image's file. The folders beside a split's images are named here once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from partwhole.common.errors import InputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
IGNORED_NAMES = ("failed.txt", ".DS_Store", "Thumbs.db")
# A dataset split's folders: the images <root>/<split>/<class>/<image>, and beside them, per image,
# <split>_masks (stage 1), <split>_masks_embeds (stage 2's teacher; another teacher: a longer suffix)
# and, for the toy set, <split>_gt (its ground truth).
MASKS_SUFFIX = "_masks"
EMBEDS_SUFFIX = "_masks_embeds"
GT_SUFFIX = "_gt"


def checked_square_image(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` as a uint8 ``(size, size, 3)`` array (what :func:`load_rgb_image` gives a stage-1 masker), or a
    ValueError saying what it is."""
    image = np.asarray(image)
    if image.shape != (size, size, 3) or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 ({size}, {size}, 3) RGB image, got {image.dtype} {image.shape}")
    return image


class ImageRecord(NamedTuple):
    """One image of an image folder: its path, class index and class name."""

    path: Path
    label: int
    class_name: str

    def output_path(self, out_root: str | os.PathLike, suffix: str = ".pkl") -> Path:
        """``<out_root>/<class>/<image stem><suffix>``: where stages 1 and 2 write for this image."""
        return Path(out_root) / self.class_name / (self.path.stem + suffix)


def list_classes(root: str | os.PathLike) -> list[str]:
    """Sorted class folder names of ``root``; an error if there are none."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{root}: folder not found (expected <root>/<class>/<image>, e.g. datasets/imagenette2/val)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise InputError(f"{root}: no class folders found (expected <root>/<class>/<image>)")
    return classes


def list_image_folder(root: str | os.PathLike, classes: Iterable[str] | None = None) -> list[ImageRecord]:
    """All images of ``<root>/<class>/<file>``, classes and files in sorted order.

    Files whose names end in an image extension are listed; hidden files and
    our own bookkeeping (``failed.txt``) are skipped.
    """
    root = Path(root)
    class_names = list(classes) if classes is not None else list_classes(root)
    records = []
    for label, name in enumerate(class_names):
        folder = root / name
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS:
                records.append(ImageRecord(path, label, name))
    return records


def load_rgb_image(path: str | os.PathLike, size: tuple[int, int] | None = None) -> Image.Image:
    """Open any image PIL reads as RGB, resized to ``size=(width, height)`` with bicubic.

    This is the one resize shared by stages 1 and 2 (and the toy data), so masks
    line up with the pixels they cut.

    Raises:
        InputError: the file is missing, not an image, or truncated.
    """
    try:
        with Image.open(path) as image:
            image.load()
            image = image.convert("RGB")
    except FileNotFoundError:
        raise InputError(f"{path}: image not found") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: cannot read image ({exc}); fix or remove the file") from None
    if size is not None and image.size != tuple(size):
        image = image.resize(tuple(size), Image.BICUBIC)
    return image
