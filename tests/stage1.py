"""Stage 1 in-process for the tests: settings as keywords, split between the two dataclasses the library takes."""

from __future__ import annotations

from partwhole.common.per_image_runner import Progress
from partwhole.masks.mask_folder import MaskFolderConfig, run_mask_folder
from partwhole.masks.masker_options import OPTION_NAMES, MaskerOptions


def run_stage1(*, device: str = "cpu", num_processes: int = 1, **settings) -> Progress:
    """:func:`run_mask_folder` of ``settings``: fields of :class:`MaskFolderConfig` and of :class:`MaskerOptions`, side by side."""
    options = {name: settings.pop(name) for name in list(settings) if name in OPTION_NAMES}
    cfg = MaskFolderConfig(masker=MaskerOptions(**options), **settings)
    return run_mask_folder(cfg, device=device, num_processes=num_processes)
