"""Stage-1 mask sources that need no SAM: the controls of "do the part-whole masks matter?".

The mask sources ``boxes``, ``full_image`` and ``superpixels`` (``MaskFolderConfig.mask_source``, see ``mask_folder.py``)
write files of the same format as SAM's (``(N, 3, H, W)`` bool, three nested masks per patch-centre
point, the point grid of ``point_grid.patch_grid_points``), so stages 2 and 3 run on them unchanged:

* ``full_image``: every level of every point is the whole image. Stage 2 then embeds the whole
  image three times per point, and ``sam_distill`` becomes image-level feature distillation.
* ``boxes``: three nested squares centred on each point (sides ``MaskerOptions.box_sizes``, level 0
  the smallest), clipped to the image: masks of chosen sizes that know nothing of the image's
  parts. ``box_sizes.py`` derives sides whose clipped areas match another folder's masks.
* ``superpixels``: a classical segmentation of the image itself (scikit-image's Felzenszwalb graph
  segmentation at three scales, ``MaskerOptions.superpixel_scales``) and, per point and level, the
  segment under the point, cut to the coarser levels' segments so that the levels nest. Real
  segments of real photos with no model and no download; no notion of parts or objects beyond colour
  and texture edges.

A masker here has the interface :class:`mask_folder.MaskStage` uses of the SAM maskers
(``img_size``, ``device``, ``model_input``, ``predict_model_inputs``) and takes the same
:class:`~partwhole.masks.masker_options.MaskerOptions`; it runs on the CPU in milliseconds per image (superpixels: about 0.4 s per 224 px image, measured beside another job).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from partwhole.common.errors import check_choice
from partwhole.common.image_folders import checked_square_image
from partwhole.common.point_grid import patch_grid_points
from partwhole.masks.masker_options import (  # noqa: F401 (re-exported)
    LEVELS,
    SOURCE_ONLY_REASONS,
    MaskerOptions,
    check_unused_options,
    parse_box_sizes,
)

MASK_SOURCES = ("sam", "boxes", "full_image", "superpixels")  # sam: the SAM 1 / SAM 2.1 maskers of teachers.py
SOURCE_OPTIONS = {"boxes": ("box_sizes",), "full_image": (), "superpixels": ("superpixel_scales",)}  # each source's options
# Felzenszwalb scales of the superpixels' levels 0-2 for 224 px images: on scikit-image's sample photos the segment
# under a pixel covers on average about 1-2 %, 4-17 % and 10-90 % of the image (levels 0, 1, 2).
DEFAULT_SUPERPIXEL_SCALES = (50, 200, 800)
SUPERPIXEL_SIGMA = 0.8  # Gaussian smoothing before segmenting (scikit-image's default)


def box_spans(centres: np.ndarray, side: int, img_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel spans ``[start, end)`` of boxes of ``side`` centred on ``centres`` (pixel coordinates), clipped to the image.

    A box starts ``side // 2`` pixels before the pixel holding the centre and is ``side`` long, so it always holds
    that pixel, and a longer side gives a span that contains the shorter one (nested levels).
    """
    start = np.floor(centres).astype(np.int64) - side // 2
    return np.clip(start, 0, img_size), np.clip(start + side, 0, img_size)


class PromptFreeMasker:
    """What the maskers without a model share: the point grid, the image check, the call.

    A subclass implements :meth:`masks_of_image` (``(k, 3, H, W)`` bool for one image).
    """

    device = torch.device("cpu")

    def __init__(self, options: MaskerOptions):
        self.img_size = options.img_size
        self.points = patch_grid_points(options.img_size, options.patch_size)  # (k, 2) x, y

    @property
    def num_points(self) -> int:
        return len(self.points)

    def model_input(self, image: np.ndarray) -> np.ndarray:
        return checked_square_image(image, self.img_size)

    def masks_of_image(self, image: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict_model_inputs(self, inputs: np.ndarray) -> torch.Tensor:
        """Masks ``(b, k, 3, H, W)`` bool for ``(b, H, W, 3)`` uint8 images (what :meth:`model_input` returns)."""
        return torch.from_numpy(np.stack([self.masks_of_image(image) for image in inputs]))

    def __call__(self, images: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
        return self.predict_model_inputs(np.stack([self.model_input(image) for image in images]))


class FullImageMasker(PromptFreeMasker):
    """Every level of every point: the whole image."""

    def masks_of_image(self, image: np.ndarray) -> np.ndarray:
        return np.ones((self.num_points, LEVELS, self.img_size, self.img_size), dtype=bool)


class BoxMasker(PromptFreeMasker):
    """Three nested squares of sides ``options.box_sizes`` centred on each point, clipped to the image (see :func:`box_spans`)."""

    def __init__(self, options: MaskerOptions):
        super().__init__(options)
        img_size = self.img_size
        self.box_sizes = parse_box_sizes(options.box_sizes)  # () is refused here
        k = self.num_points
        masks = np.zeros((k, LEVELS, img_size, img_size), dtype=bool)
        for level, side in enumerate(self.box_sizes):
            (x0, x1), (y0, y1) = box_spans(self.points[:, 0], side, img_size), box_spans(self.points[:, 1], side, img_size)
            for i in range(k):
                masks[i, level, y0[i]:y1[i], x0[i]:x1[i]] = True
        self.masks = masks  # the same for every image

    def masks_of_image(self, image: np.ndarray) -> np.ndarray:
        return self.masks


def superpixel_scales(options: MaskerOptions) -> tuple[int, int, int]:
    """The superpixels' three scales: ``options.superpixel_scales``, or the defaults if it is empty."""
    return options.superpixel_scales or DEFAULT_SUPERPIXEL_SCALES  # MaskerOptions has checked and parsed them


class SuperpixelMasker(PromptFreeMasker):
    """Per point, the Felzenszwalb segment under it at three scales, nested by intersection.

    Level 2 is the coarsest segment holding the point, level 1 the middle one cut to level 2, level 0 the
    finest cut to level 1: each level holds the point and lies inside the next. Segments smaller than half
    their level's scale (in pixels) are merged into a neighbour (Felzenszwalb's ``min_size``).
    """

    def __init__(self, options: MaskerOptions):
        super().__init__(options)
        self.scales = superpixel_scales(options)
        self.pixels = np.floor(self.points).astype(np.int64)  # (k, 2) x, y: the pixel holding each point

    def segmentations(self, image: np.ndarray) -> list[np.ndarray]:
        """The three ``(H, W)`` int label maps of ``image``, finest first."""
        # imported here: stage 1 with SAM never needs it
        from skimage.segmentation import felzenszwalb

        return [felzenszwalb(image, scale=scale, sigma=SUPERPIXEL_SIGMA, min_size=max(1, scale // 2)) for scale in self.scales]

    def masks_of_image(self, image: np.ndarray) -> np.ndarray:
        x, y = self.pixels[:, 0], self.pixels[:, 1]
        masks = np.empty((self.num_points, LEVELS, self.img_size, self.img_size), dtype=bool)
        inside = np.ones((self.num_points, self.img_size, self.img_size), dtype=bool)
        for level, labels in reversed(list(enumerate(self.segmentations(image)))):  # coarse to fine
            inside &= labels[None] == labels[y, x][:, None, None]
            masks[:, level] = inside
        return masks


def build_prompt_free_masker(mask_source: str, options: MaskerOptions) -> PromptFreeMasker:
    """The masker of ``mask_source`` (``boxes``, ``full_image`` or ``superpixels``; ``sam`` is ``teachers.build_masker``).

    Raises:
        SettingError: another ``mask_source``, or an option of ``options`` that the source does not take.
    """
    check_choice("mask_source", mask_source, SOURCE_OPTIONS)
    check_source_options(mask_source, options)
    return {"boxes": BoxMasker, "full_image": FullImageMasker, "superpixels": SuperpixelMasker}[mask_source](options)


def check_source_options(mask_source: str, options: MaskerOptions) -> None:
    """Refuse (:class:`SettingError`) an option other than the default that ``mask_source`` (no SAM) does not take."""
    check_unused_options(options, SOURCE_OPTIONS[mask_source], lambda name: SOURCE_ONLY_REASONS.get(name, (
        "a SAM option, and {masker} masks need no SAM: drop it")).format(masker=mask_source))
