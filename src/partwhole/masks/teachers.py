"""Stage 1's teachers: one registry of every ``sam_model_type``.

Each :class:`Teacher` says how to build the model (random weights, CPU, eval
mode), where its released checkpoint is, how to recognise a file of it (its
:func:`checkpoint_signature`), and its family: SAM 1 (``segment_anything``,
:class:`sam_points.PointGridMasker`) or SAM 2.1 (``sam2``,
:class:`sam2_points.Sam2PointGridMasker`). A family says which masker wraps
the model and which :class:`~partwhole.masks.masker_options.MaskerOptions` it takes
(``point_labels``, ``attention``, ``compile_encoder``: SAM 1 only).

Everything stage 1 needs to know about a teacher is read from here:
:func:`build_teacher` (checkpoint read with ``weights_only=True``, one-line
errors for a missing file, a file of another model, or garbage),
:func:`build_masker`, :func:`check_options`, :func:`default_checkpoint` and the
README's teacher table (:func:`markdown_table`, checked by a test). Adding a
teacher is one :data:`TEACHERS` entry; ``docs/architecture.md`` shows one.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from segment_anything import sam_model_registry

from partwhole.common.errors import SettingError, check_choice
from partwhole.masks.masker_options import (
    DEFAULT_OPTIONS,
    SOURCE_ONLY_REASONS,
    MaskerOptions,
    check_unused_options,
)
from partwhole.masks.sam2_points import (
    TEST_MODEL_OVERRIDES,
    Sam2PointGridMasker,
    build_sam2_model,
)
from partwhole.masks.sam_attention import set_attention
from partwhole.masks.sam_points import GridMasker, PointGridMasker, build_sam_vit_tiny

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Family:
    """What the teachers of one package share."""

    name: str  # as messages and the README say it
    masker: Callable[[torch.nn.Module, MaskerOptions], GridMasker]  # (model on its device, options)
    options: tuple[str, ...]  # the MaskerOptions fields beyond the grid that it takes
    checkpoint_kind: str  # what checkpoint-error messages call its files
    published: str  # what its released checkpoints are, for error messages


@dataclass(frozen=True)
class Teacher:
    """One ``sam_model_type``."""

    name: str
    family: Family
    build: Callable[[], torch.nn.Module]  # the model with random weights (drawn from the caller's seed), on the CPU
    url: str | None  # the released checkpoint; None for the small test models (random unless a file is given)
    signature: tuple | None  # checkpoint_signature() of its state dict; None: not told apart from another (an alias)
    summary: str  # the README table's "model" column (teachers with one summary share a row)
    default: bool = False  # the default teacher

    @property
    def checkpoint_name(self) -> str | None:
        return self.url.rsplit("/", 1)[1] if self.url else None


SAM1 = Family("SAM 1", PointGridMasker, ("precision", "points_per_batch", "point_labels", "attention", "compile_encoder"), "SAM",
              ".pth file")
SAM2_1 = Family("SAM 2.1", Sam2PointGridMasker, ("precision", "points_per_batch"), "SAM 2.1", ".pt file")

# why a family does not take an option (the SettingError's reason when the option is not its default)
UNUSED_OPTION_REASONS = {
    "point_labels": "reproduces the reference's SAM 1 prompts; {family} takes foreground",
    "attention": "is for SAM 1's image encoder; {family} always uses its own (SDPA): drop it",
    "compile_encoder": "torch.compile is not supported for {family} yet; drop it",
}

_SAM1_BASE = "https://dl.fbaipublicfiles.com/segment_anything"
_SAM2_BASE = "https://dl.fbaipublicfiles.com/segment_anything_2/092824"
_SAM1_SUMMARY = "SAM 1 (`segment_anything`), the paper's teacher"
_SAM2_SUMMARY = "SAM 2.1 (`sam2`, Hiera image encoders), 39-224 M parameters"
_TEST_SUMMARY = "tiny random-weight models of each, for tests and smoke runs"


def _sam1(name: str, url: str | None, width: int, *, build: Callable[[], torch.nn.Module] | None = None,
          summary: str = _SAM1_SUMMARY, default: bool = False) -> Teacher:
    """A SAM 1 teacher; ``build`` defaults to segment_anything's registry entry of ``name``."""
    build = build or partial(sam_model_registry[name], checkpoint=None)
    return Teacher(name, SAM1, build, url, ("vit", width), summary, default)


def _sam2(name: str, config: str, width: int, blocks: int, test: bool = False) -> Teacher:
    build = partial(build_sam2_model, f"configs/sam2.1/{config}", TEST_MODEL_OVERRIDES if test else ())
    return Teacher(name, SAM2_1, build, None if test else f"{_SAM2_BASE}/{name}.pt", ("hiera", width, blocks),
                   _TEST_SUMMARY if test else _SAM2_SUMMARY)


_TEACHERS = [
    _sam1("vit_h", f"{_SAM1_BASE}/sam_vit_h_4b8939.pth", 1280, default=True),
    _sam1("vit_l", f"{_SAM1_BASE}/sam_vit_l_0b3195.pth", 1024),
    _sam1("vit_b", f"{_SAM1_BASE}/sam_vit_b_01ec64.pth", 768),
    _sam2("sam2.1_hiera_tiny", "sam2.1_hiera_t.yaml", 96, 12),
    _sam2("sam2.1_hiera_small", "sam2.1_hiera_s.yaml", 96, 16),
    _sam2("sam2.1_hiera_base_plus", "sam2.1_hiera_b+.yaml", 112, 24),
    _sam2("sam2.1_hiera_large", "sam2.1_hiera_l.yaml", 144, 48),
    # the test models: each family's structure, small (sam_points.build_sam_vit_tiny, sam2_points.TEST_MODEL_OVERRIDES)
    _sam1("vit_tiny", None, 64, build=build_sam_vit_tiny, summary=_TEST_SUMMARY),
    _sam2("sam2.1_hiera_test", "sam2.1_hiera_t.yaml", 32, 5, test=True),
    # segment_anything's own alias of vit_h
    Teacher("default", SAM1, partial(sam_model_registry["default"], checkpoint=None), f"{_SAM1_BASE}/sam_vit_h_4b8939.pth", None,
            "segment_anything's alias of vit_h"),
]
TEACHERS: dict[str, Teacher] = {t.name: t for t in _TEACHERS}
MODEL_TYPES = list(TEACHERS)
DEFAULT_MODEL_TYPE = next(t.name for t in _TEACHERS if t.default)
TEST_MODEL_TYPES = tuple(t.name for t in _TEACHERS if t.url is None)  # random weights unless a checkpoint is given


def get_teacher(name: str) -> Teacher:
    check_choice("sam_model_type", name, TEACHERS)
    return TEACHERS[name]


def is_sam2_model(name: str) -> bool:
    """Whether ``name`` (a ``sam_model_type``) is a SAM 2.1 model (else a SAM 1 one)."""
    return get_teacher(name).family is SAM2_1


def default_checkpoint(name: str) -> str:
    """The released checkpoint's file name for ``name`` (looked for in the working directory)."""
    teacher = get_teacher(name)
    return teacher.checkpoint_name or TEACHERS[DEFAULT_MODEL_TYPE].checkpoint_name


def check_options(name: str, options: MaskerOptions) -> None:
    """Raise :class:`SettingError` for an unknown teacher or an option of ``options`` it does not take (not its default)."""
    family = get_teacher(name).family
    reasons = {**UNUSED_OPTION_REASONS, **SOURCE_ONLY_REASONS}
    check_unused_options(options, family.options, lambda option: reasons[option].format(family=family.name, masker=family.name))


# --------------------------------------------------------------------------- checkpoints


def checkpoint_signature(state_dict: dict) -> tuple | None:
    """What tells the released models apart in a state dict: SAM 1's encoder width, SAM 2.1's trunk width and depth."""
    pos = state_dict.get("image_encoder.pos_embed")
    if isinstance(pos, torch.Tensor):
        return ("vit", int(pos.shape[-1]))
    patch = state_dict.get("image_encoder.trunk.patch_embed.proj.weight")
    if isinstance(patch, torch.Tensor):
        blocks = {key.split(".")[3] for key in state_dict if key.startswith("image_encoder.trunk.blocks.")}
        return ("hiera", int(patch.shape[0]), len(blocks))
    return None


def guess_model_type(state_dict: dict) -> str | None:
    """The ``sam_model_type`` a state dict (or a released ``{'model': state_dict}`` file) fits, when it can be told."""
    state_dict = state_dict.get("model", state_dict)
    signature = checkpoint_signature(state_dict) if isinstance(state_dict, dict) else None
    return next((t.name for t in _TEACHERS if signature is not None and t.signature == signature), None)


def require_checkpoint_file(checkpoint: str | os.PathLike, name: str) -> Path:
    """``checkpoint`` as a path; a missing file is an error that says where to download it."""
    path = Path(checkpoint)
    if not path.is_file():
        url = get_teacher(name).url
        fix = f"download it from {url}" if url else "pass an existing file"
        raise SettingError("sam_checkpoint", checkpoint, f"file not found; {fix}")
    return path


def load_teacher_checkpoint(model: torch.nn.Module, checkpoint: str | os.PathLike, name: str) -> None:
    """Load ``checkpoint`` (read with ``weights_only=True``) into ``model``, a ``name`` teacher.

    A bare state dict or, as SAM 2.1 releases them, ``{'model': state_dict}``.

    Raises:
        SettingError: (``sam_checkpoint``) the file is missing, not a state dict, or one of another model
            (the message names the ``sam_model_type`` the file fits, when that can be told).
    """
    teacher = get_teacher(name)
    path = require_checkpoint_file(checkpoint, name)
    kind = teacher.family.checkpoint_kind
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types (with pages of text) for a bad file; all mean the same here
        raise SettingError("sam_checkpoint", checkpoint, f"not a readable {kind} checkpoint ({type(exc).__name__} in "
                           f"torch.load); pass the {teacher.family.published} published for {name}") from None
    state_dict = state.get("model", state) if isinstance(state, dict) else state
    if not isinstance(state_dict, dict):
        raise SettingError("sam_checkpoint", checkpoint, f"holds a {type(state_dict).__name__}, not a {kind} state dict")
    try:
        model.load_state_dict(state_dict)
    except RuntimeError:
        guess = guess_model_type(state_dict)
        hint = f"it looks like a {guess} checkpoint: set sam_model_type to {guess}" if guess else "pass the checkpoint of that model type"
        raise SettingError("sam_checkpoint", checkpoint, f"does not fit sam_model_type {name}; {hint}") from None


# --------------------------------------------------------------------------- models


def build_teacher(name: str, checkpoint: str | os.PathLike | None = None, *, seed: int = 0, attention: str = "sdpa") -> torch.nn.Module:
    """The ``name`` teacher in eval mode, on the CPU.

    ``checkpoint=None`` gives random weights (a warning says so), drawn from ``seed`` so that every
    run and every rank gets the same model: masks from random weights are only good for tests and
    timing. A checkpoint file's existence is checked before the (slow) build. ``attention`` (SAM 1):
    ``'sdpa'`` runs the image encoder's attention through ``F.scaled_dot_product_attention`` (same
    maths, fused kernels), ``'reference'`` keeps segment_anything's own (``sam_attention.py``).
    """
    teacher = get_teacher(name)
    check_options(name, MaskerOptions(attention=attention))
    if checkpoint is not None:
        require_checkpoint_file(checkpoint, name)  # before the build: a typo costs no time
    else:
        log.warning("%s %s has random weights (no sam_checkpoint): masks are only good for tests and timing", teacher.family.name, name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = teacher.build()
    if checkpoint is not None:
        load_teacher_checkpoint(model, checkpoint, name)
    if "attention" in teacher.family.options:
        set_attention(model, attention)
    return model.eval()


def build_masker(name: str, checkpoint: str | os.PathLike | None, device: torch.device | str,
                 options: MaskerOptions = DEFAULT_OPTIONS) -> GridMasker:
    """The ``name`` teacher on ``device`` (random weights when ``checkpoint`` is None), wrapped in its family's
    point-grid masker with ``options`` (an option the family does not take must keep its default)."""
    check_options(name, options)
    model = build_teacher(name, checkpoint, attention=options.attention).to(device)
    return get_teacher(name).family.masker(model, options)


def markdown_table(name_heading: str) -> str:
    """The README's teacher table, its first column headed ``name_heading`` (the README: the command line's flag;
    ``tests/test_teachers.py`` checks that the README holds it)."""
    rows: dict[str, list[Teacher]] = {}
    for teacher in _TEACHERS:
        if teacher.signature is not None:  # aliases are not listed
            rows.setdefault(teacher.summary, []).append(teacher)
    lines = [f"| {name_heading} | model | checkpoint (download) |", "| --- | --- | --- |"]
    for summary, teachers in rows.items():
        names = ", ".join(f"`{t.name}`" + (" (default)" if t.default else "") for t in teachers)
        urls = [t.url for t in teachers if t.url]
        files = ", ".join([f"`{urls[0]}`", *(f"`{u.rsplit('/', 1)[1]}`" for u in urls[1:])]) if urls else "none"
        lines.append(f"| {names} | {summary} | {files} |")
    return "\n".join(lines)
