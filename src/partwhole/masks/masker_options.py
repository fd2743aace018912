"""How a stage-1 masker prompts and runs: one small frozen dataclass that every masker takes.

:class:`MaskerOptions` holds the point grid (``img_size``, ``patch_size``), the SAM options
(``precision``, ``points_per_batch``, ``point_labels``, ``attention``, ``compile_encoder``) and the
box sides of the ``boxes`` mask source (``box_sizes``) and the segmentation scales of the ``superpixels``
one (``superpixel_scales``). ``teachers.build_masker``, the SAM 1 and
SAM 2.1 point-grid maskers (``sam_points.py``, ``sam2_points.py``) and the maskers without SAM
(``mask_sources.py``) all take it, so a new option is one field here and one line where it is used.

A masker takes some of the options; :func:`check_unused_options` refuses a value other than the
default for one it does not take, with a :class:`~partwhole.common.errors.SettingError` naming the
field (a command line names its flag instead).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Callable, Iterable, Sequence

from partwhole.common.errors import SettingError, check_choice
from partwhole.common.point_grid import patch_grid_points
from partwhole.common.runtime import PRECISIONS
from partwhole.masks.sam_attention import ATTENTIONS

POINT_LABELS = ("foreground", "reference")
LEVELS = 3  # SAM's multimask output: three nested masks per point
GEOMETRY = ("img_size", "patch_size")  # the options every masker takes
# why a masker does not take an option of one mask source (a SettingError's reason; {masker} names the masker)
SOURCE_ONLY_REASONS = {"box_sizes": "only the boxes mask source takes box sides, not {masker}: drop it",
                       "superpixel_scales": "only the superpixels mask source takes segmentation scales, not {masker}: drop it"}


def parse_levels(setting: str, values: Sequence[str | int], hint: str) -> tuple[int, int, int]:
    """``values`` as three positive, strictly increasing ints (level 0 = sub-part, 2 = whole).

    Raises:
        SettingError: (``setting``) not three positive, increasing ints; ``hint`` says what to give.
    """
    text = ",".join(str(v) for v in values)
    try:
        levels = tuple(int(v) for v in values)
    except ValueError:
        levels = ()
    if len(levels) != LEVELS or levels[0] < 1 or any(b <= a for a, b in zip(levels, levels[1:])):
        raise SettingError(setting, text, f"give three positive, increasing {hint}")
    return levels  # type: ignore[return-value]


def parse_box_sizes(values: Sequence[str | int]) -> tuple[int, int, int]:
    """``box_sizes`` as three positive, increasing sides (:class:`SettingError` otherwise)."""
    return parse_levels("box_sizes", values, "box sides in pixels of the resized image (level 0 = smallest), e.g. 32,96,192; "
                        "partwhole.masks.box_sizes.matched_box_sizes derives them from a mask folder")


def parse_superpixel_scales(values: Sequence[str | int]) -> tuple[int, int, int]:
    """``superpixel_scales`` as three positive, increasing Felzenszwalb scales (:class:`SettingError` otherwise)."""
    return parse_levels("superpixel_scales", values, "Felzenszwalb scales (level 0 = finest), e.g. 50,200,800 "
                        "(larger: larger segments)")


@dataclass(frozen=True)
class MaskerOptions:
    """The options of a stage-1 masker; every field is checked on construction.

    Attributes:
        img_size, patch_size: images are resized to ``img_size`` x ``img_size`` and prompted with one
            point at the centre of every ``patch_size`` patch (``img_size`` a multiple of ``patch_size``).
        precision: ``'fp32'``, ``'bf16'`` or ``'fp16'``: autocast of the model's forward (SAM only).
        points_per_batch: point prompts per mask-decoder call; bounds memory (SAM only).
        point_labels: ``'foreground'`` (label 1 for every point) or ``'reference'`` (label ``k`` for
            point ``k``, as the reference code passed; SAM 1 only).
        attention: SAM 1's image-encoder attention, ``'sdpa'`` or ``'reference'`` (``sam_attention.py``).
        compile_encoder: run SAM 1's image encoder through ``torch.compile``.
        box_sizes: the ``boxes`` source's three square sides in pixels, increasing (stored as ints).
        superpixel_scales: the ``superpixels`` source's three Felzenszwalb scales, increasing; empty: its
            defaults (``mask_sources.DEFAULT_SUPERPIXEL_SCALES``).
    """

    img_size: int = 224
    patch_size: int = 16
    precision: str = "fp32"
    points_per_batch: int = 196
    point_labels: str = "foreground"
    attention: str = "sdpa"
    compile_encoder: bool = False
    box_sizes: tuple[int, ...] = ()
    superpixel_scales: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        patch_grid_points(self.img_size, self.patch_size)  # raises on img_size % patch_size
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("point_labels", self.point_labels, POINT_LABELS)
        check_choice("attention", self.attention, ATTENTIONS)
        if self.points_per_batch < 1:
            raise SettingError("points_per_batch", self.points_per_batch, "must be at least 1")
        if self.box_sizes:
            object.__setattr__(self, "box_sizes", parse_box_sizes(self.box_sizes))
        if self.superpixel_scales:
            object.__setattr__(self, "superpixel_scales", parse_superpixel_scales(self.superpixel_scales))

    @property
    def grid(self) -> int:
        """Points per side of the grid: ``img_size // patch_size``."""
        return self.img_size // self.patch_size


DEFAULT_OPTIONS = MaskerOptions()
OPTION_NAMES = tuple(f.name for f in fields(MaskerOptions))


def check_unused_options(options: MaskerOptions, taken: Iterable[str], reason: Callable[[str], str]) -> None:
    """Raise :class:`SettingError` for the first option outside ``taken`` (and the geometry) that is not its default.

    ``reason(name)`` says why that masker does not take the option ``name`` and what to do.
    """
    taken = set(taken) | set(GEOMETRY)
    for name in OPTION_NAMES:
        value = getattr(options, name)
        if name not in taken and value != getattr(DEFAULT_OPTIONS, name):
            shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
            raise SettingError(name, shown, reason(name))
