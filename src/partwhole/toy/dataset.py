"""A toy dataset that needs no download: composite objects whose class is the arrangement of their parts.

Ten classes (``00_tower`` ... ``09_table``), each a fixed arrangement of three or
four simple coloured parts (disc, square, bar, triangle) in an object frame.
Every image draws one object of its class at a random position, scale, aspect
and mirror, with random part colours, on a textured two-region background
(a "wall" above a random horizon, a "floor" below); about half the images
also hold a small one-part distractor object (where there is room). Colours
and textures are random, so only the arrangement tells the class.

Written in the Imagenette folder layout, so every stage reads it unchanged::

    <out_dir>/{split}/<class>/<stem>.png          the image (image_size x image_size RGB)
    <out_dir>/{split}_gt/<class>/<stem>.npz       ground truth: parts, objects, background, label
    <out_dir>/{split}_masks/<class>/<stem>.pkl    oracle masks in the stage-1 format (mask_io.save_masks)
    <out_dir>/toy_dataset.json                    the generator's parameters

The oracle masks stand in for SAM when no checkpoint is at hand: for every patch
point (stage-1 grid, :func:`patch_grid_points`) three nested masks,
level 0 ⊆ level 1 ⊆ level 2:

* point on an object: level 0 the part under the point, level 1 its object,
  level 2 all objects of the image;
* point on the background: level 0 the background region under the point (wall
  or floor, objects cut out), levels 1 and 2 the whole background.

Generation is deterministic: each image has its own random generator seeded by
``(seed, split, class, index)``, PNG and npz files are written without
timestamps, so the same seed gives byte-identical files, in any order and after
any resume. Finished images (all three files present) are skipped unless
``overwrite``. Nothing here reads flags; the CLI is ``src/make_toy_dataset.py``.
"""

from __future__ import annotations

import colorsys
import io
import json
import logging
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from partwhole.common.errors import InputError, SettingError
from partwhole.common.image_folders import GT_SUFFIX, MASKS_SUFFIX
from partwhole.common.mask_io import save_masks
from partwhole.common.point_grid import patch_grid_points
from partwhole.common.safe_files import atomic_write_bytes

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
SPLITS = ("train", "val")
LEVELS = 3
TOY_IMAGE_SIZE = 64  # the toy set's image side (config_TOY.cfg's image_size) ...
TOY_PATCH_SIZE = 8  # ... and its stage-1 patch: an 8 x 8 point grid


class Part(NamedTuple):
    """One part in the object frame: unit square, x right, y down; ``(cx, cy)`` centre, ``(w, h)`` size."""

    kind: str  # disc | rect | triangle_up | triangle_right
    cx: float
    cy: float
    w: float
    h: float


# Each class is an arrangement; parts are painted in order (a later part covers an earlier one).
# "rect" covers squares and bars; a "disc" with w != h is an ellipse.
TOY_CLASSES: dict[str, tuple[Part, ...]] = {
    "00_tower": (
        Part("rect", 0.50, 0.18, 0.36, 0.34),
        Part("rect", 0.50, 0.50, 0.36, 0.30),
        Part("rect", 0.50, 0.82, 0.36, 0.34),
    ),
    "01_snowman": (
        Part("disc", 0.50, 0.79, 0.42, 0.42),
        Part("disc", 0.50, 0.45, 0.32, 0.32),
        Part("disc", 0.50, 0.17, 0.26, 0.26),
    ),
    "02_tree": (
        Part("rect", 0.50, 0.86, 0.18, 0.28),
        Part("triangle_up", 0.50, 0.56, 0.76, 0.36),
        Part("triangle_up", 0.50, 0.24, 0.54, 0.32),
    ),
    "03_house": (
        Part("rect", 0.76, 0.22, 0.16, 0.30),
        Part("rect", 0.50, 0.70, 0.62, 0.50),
        Part("triangle_up", 0.50, 0.30, 0.84, 0.32),
    ),
    "04_car": (
        Part("rect", 0.42, 0.36, 0.44, 0.24),
        Part("rect", 0.50, 0.60, 0.92, 0.28),
        Part("disc", 0.24, 0.80, 0.26, 0.26),
        Part("disc", 0.76, 0.80, 0.26, 0.26),
    ),
    "05_dumbbell": (
        Part("rect", 0.50, 0.50, 0.50, 0.16),
        Part("disc", 0.17, 0.50, 0.34, 0.34),
        Part("disc", 0.83, 0.50, 0.34, 0.34),
    ),
    "06_plus": (
        Part("rect", 0.50, 0.50, 0.92, 0.22),
        Part("rect", 0.50, 0.50, 0.22, 0.92),
        Part("disc", 0.50, 0.50, 0.36, 0.36),
    ),
    "07_flower": (
        Part("rect", 0.50, 0.72, 0.14, 0.56),
        Part("disc", 0.30, 0.70, 0.30, 0.16),
        Part("disc", 0.70, 0.62, 0.30, 0.16),
        Part("disc", 0.50, 0.25, 0.46, 0.46),
    ),
    "08_arrow": (
        Part("rect", 0.44, 0.50, 0.62, 0.18),
        Part("triangle_right", 0.84, 0.50, 0.32, 0.50),
        Part("rect", 0.12, 0.50, 0.22, 0.34),
    ),
    "09_table": (
        Part("rect", 0.20, 0.62, 0.14, 0.54),
        Part("rect", 0.80, 0.62, 0.14, 0.54),
        Part("rect", 0.50, 0.30, 0.94, 0.16),
    ),
}
CLASS_NAMES: tuple[str, ...] = tuple(sorted(TOY_CLASSES))
DISTRACTOR_KINDS = ("disc", "rect", "triangle_up", "triangle_right")


@dataclass(frozen=True)
class ToyScene:
    """One rendered image with its ground truth (all ``(H, W)``).

    ``parts``: 0 background, 1..P part ids (in paint order, distractor last);
    ``objects``: 0 background, 1 the class object, 2 the distractor (if any);
    ``background``: 0 on objects, 1 wall (above the horizon), 2 floor.
    """

    image: np.ndarray  # uint8 (H, W, 3)
    parts: np.ndarray  # int32 (H, W)
    objects: np.ndarray  # int32 (H, W)
    background: np.ndarray  # int32 (H, W)
    label: int


@dataclass
class ToySummary:
    """What :func:`generate_toy_dataset` did."""

    out_dir: str
    written: int
    skipped: int
    seconds: float
    classes: int
    images_per_split: dict

    def __str__(self) -> str:
        total = self.written + self.skipped
        rate = self.written / self.seconds if self.seconds > 0 else float("inf")
        splits = ", ".join(f"{k} {v}" for k, v in self.images_per_split.items())
        return (
            f"toy dataset {self.out_dir}: {total} images ({splits}; {self.classes} classes), "
            f"{self.written} written, {self.skipped} already there, {self.seconds:.1f} s ({rate:.0f} images/s)"
        )


# --------------------------------------------------------------------------- geometry


def _part_mask(part: Part, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Pixels (centres ``xs, ys`` in px, broadcast) inside ``part`` (given in px)."""
    dx, dy = xs - part.cx, ys - part.cy
    hw, hh = part.w / 2, part.h / 2
    if part.kind == "disc":
        return (dx / hw) ** 2 + (dy / hh) ** 2 <= 1.0
    if part.kind == "rect":
        return (np.abs(dx) <= hw) & (np.abs(dy) <= hh)
    if part.kind == "triangle_up":  # apex at the top, base at the bottom
        t = (dy + hh) / part.h  # 0 at the apex, 1 at the base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= hw * t)
    if part.kind == "triangle_right":  # apex at the right, base on the left
        t = (hw - dx) / part.w
        return (t >= 0) & (t <= 1) & (np.abs(dy) <= hh * t)
    raise ValueError(f"unknown part kind {part.kind!r}")


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _distinct_hues(rng: np.random.Generator, count: int, min_gap: float = 0.12) -> list[float]:
    hues: list[float] = []
    while len(hues) < count:
        h = float(rng.random())
        if all(min(abs(h - o), 1 - abs(h - o)) >= min_gap for o in hues) or len(hues) * min_gap >= 0.9:
            hues.append(h)
    return hues


def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [-1, 1]: a random ``cells x cells`` grid, bilinearly upsampled to ``size``."""
    coarse = rng.uniform(-1, 1, (cells + 1, cells + 1))
    t = (np.arange(size) + 0.5) / size * cells
    i = np.minimum(t.astype(int), cells - 1)
    f = t - i
    rows = coarse[i] * (1 - f)[:, None] + coarse[i + 1] * f[:, None]  # (size, cells+1)
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


# --------------------------------------------------------------------------- one scene


def render_scene(class_index: int, image_size: int, rng: np.random.Generator, distractor_prob: float = 0.5) -> ToyScene:
    """Draw one image of class ``CLASS_NAMES[class_index]`` and its ground truth."""
    size = image_size
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5

    # Background: wall above a random horizon, floor below, each with its own colour and texture.
    horizon = rng.uniform(0.35, 0.75) * size
    background = np.where(ys < horizon, 1, 2).astype(np.int32)
    wall_v, floor_v = rng.uniform(0.3, 0.9, 2)
    if abs(wall_v - floor_v) < 0.2:  # keep the two regions apart in brightness
        floor_v = wall_v - 0.25 if wall_v > 0.55 else wall_v + 0.25
    wall = _hsv(rng.random(), rng.uniform(0.1, 0.45), wall_v)
    floor = _hsv(rng.random(), rng.uniform(0.1, 0.45), floor_v)
    angle, freq, phase = rng.uniform(0, np.pi), rng.uniform(0.25, 0.7), rng.uniform(0, 2 * np.pi)
    stripes = np.sin(freq * (xs * np.cos(angle) + ys * np.sin(angle)) + phase)
    noise = _value_noise(rng, size, int(rng.integers(3, 7)))
    image = np.where((background == 1)[..., None], wall * (1 + 0.12 * stripes[..., None]), floor * (1 + 0.15 * noise[..., None]))

    parts = np.zeros((size, size), np.int32)
    objects = np.zeros((size, size), np.int32)

    # The class object: random scale, aspect, mirror, position; small per-part jitter.
    layout = TOY_CLASSES[CLASS_NAMES[class_index]]
    extent = rng.uniform(0.55, 0.85) * size
    sw, sh = extent * rng.uniform(0.85, 1.15, 2)
    sw, sh = min(sw, size - 2.0), min(sh, size - 2.0)
    ox, oy = rng.uniform(1.0, size - 1.0 - sw), rng.uniform(1.0, size - 1.0 - sh)
    mirror = rng.random() < 0.5
    hues = _distinct_hues(rng, len(layout) + 1)
    shade = 0.08 * (xs - size / 2) / size - 0.08 * (ys - size / 2) / size  # light from the top right
    for pid, part in enumerate(layout, start=1):
        cx = (1 - part.cx) if mirror else part.cx
        kind = part.kind
        jitter = rng.uniform(-0.02, 0.02, 2)
        scale = rng.uniform(0.92, 1.08, 2)
        placed = Part(kind, ox + (cx + jitter[0]) * sw, oy + (part.cy + jitter[1]) * sh, part.w * scale[0] * sw, part.h * scale[1] * sh)
        if mirror and kind == "triangle_right":  # mirrored arrow head points left
            inside = _part_mask(placed._replace(cx=-placed.cx), -xs, ys)
        else:
            inside = _part_mask(placed, xs, ys)
        colour = _hsv(hues[pid - 1], rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0))
        image = np.where(inside[..., None], colour * (1 + shade[..., None]), image)
        parts[inside] = pid
        objects[inside] = 1

    # Optional one-part distractor, kept clear of the object (so level 2 differs from level 1).
    if rng.random() < distractor_prob:
        kind = DISTRACTOR_KINDS[int(rng.integers(len(DISTRACTOR_KINDS)))]
        d = rng.uniform(0.16, 0.26) * size
        grown = objects > 0
        for _ in range(2):  # one pixel of clearance all round
            grown = grown | np.roll(grown, 1, 0) | np.roll(grown, -1, 0) | np.roll(grown, 1, 1) | np.roll(grown, -1, 1)
        for _ in range(20):
            cx, cy = rng.uniform(d / 2 + 1, size - d / 2 - 1, 2)
            inside = _part_mask(Part(kind, cx, cy, d, d), xs, ys)
            if inside.sum() >= 4 and not (inside & grown).any():
                colour = _hsv(hues[-1], rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0))
                image = np.where(inside[..., None], colour * (1 + shade[..., None]), image)
                parts[inside] = int(parts.max()) + 1
                objects[inside] = 2
                break

    image = image + rng.normal(0.0, 0.02, image.shape)
    image = np.clip(np.round(image * 255), 0, 255).astype(np.uint8)
    background[objects > 0] = 0
    return ToyScene(image=image, parts=parts, objects=objects, background=background, label=class_index)


def oracle_masks(scene: ToyScene, patch_size: int) -> np.ndarray:
    """Stage-1-format masks from the ground truth: bool ``(G*G, 3, H, W)``, nested level 0 ⊆ 1 ⊆ 2.

    Level 0: the part under the point, or its background region (wall/floor);
    level 1: its object, or the whole background; level 2: all objects, or the whole background.
    """
    points = np.floor(patch_grid_points(scene.parts.shape[0], patch_size)).astype(int)  # pixel holding each centre
    px, py = points[:, 0], points[:, 1]
    on_object = scene.objects > 0
    n_parts, n_objects = int(scene.parts.max()), int(scene.objects.max())
    regions = (
        np.where(on_object, scene.parts, n_parts + scene.background),  # parts, then wall/floor
        np.where(on_object, scene.objects, n_objects + 1),  # objects, then all background
        np.where(on_object, 1, 2),  # all objects / all background
    )
    # (k, 1, H, W) == (k, 1, 1, 1) per level -> (k, 3, H, W)
    return np.stack([r[None] == r[py, px][:, None, None] for r in regions], axis=1)


# --------------------------------------------------------------------------- files


def _png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG", compress_level=6)  # PIL adds no timestamp
    return buf.getvalue()


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An ``np.load``-able ``.npz`` with fixed zip timestamps (``np.savez`` stamps the current time)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3
            info.external_attr = 0o644 << 16
            with archive.open(info, "w") as handle:
                np.lib.format.write_array(handle, np.asarray(array, order="C"), allow_pickle=False)
    return buf.getvalue()


def load_toy_ground_truth(path: str | Path) -> dict[str, np.ndarray]:
    """Read one ``{split}_gt/<class>/<stem>.npz``: ``parts``, ``objects``, ``background`` (H, W) int32, ``label``."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except FileNotFoundError:
        raise InputError(f"{path}: ground-truth file not found; run src/make_toy_dataset.py") from None


def image_stem(class_name: str, index: int) -> str:
    """File stem of image ``index`` of a class, e.g. ``tower_0007``."""
    return f"{class_name.split('_', 1)[-1]}_{index:04d}"


def _check_params(out_dir: Path, params: dict, overwrite: bool) -> None:
    record = out_dir / "toy_dataset.json"
    if record.exists() and not overwrite:
        try:
            old = json.loads(record.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{record}: unreadable ({exc}); delete it or set overwrite") from None
        keys = ("version", "seed", "image_size", "patch_size", "distractor_prob")
        diff = {k: (old.get(k), params[k]) for k in keys if old.get(k) != params[k]}
        if diff:
            raise SettingError("out_dir", out_dir, f"holds a toy dataset made with other settings {diff} (old, new); "
                               "set overwrite or pick another out_dir")
    atomic_write_bytes(record, (json.dumps(params, indent=1, sort_keys=True) + "\n").encode())


def generate_toy_dataset(
    out_dir: str | Path,
    *,
    seed: int = 0,
    image_size: int = TOY_IMAGE_SIZE,
    patch_size: int = TOY_PATCH_SIZE,
    train_per_class: int = 200,
    val_per_class: int = 50,
    distractor_prob: float = 0.5,
    overwrite: bool = False,
    progress: bool = True,
) -> ToySummary:
    """Write the toy dataset under ``out_dir`` (layout in the module docstring) and return a summary.

    Images already complete (image, ground truth and masks present) are skipped
    unless ``overwrite``. The image is written last, so the image folder lists
    only complete images even after a kill.

    Raises:
        InputError: bad sizes, or ``out_dir`` holds a toy dataset made with other settings.
    """
    if image_size < 16 or patch_size < 1 or image_size % patch_size:
        raise InputError(f"image_size={image_size}, patch_size={patch_size}: image_size must be >= 16 and a multiple of patch_size")
    if train_per_class < 0 or val_per_class < 0:
        raise InputError(f"train_per_class={train_per_class}, val_per_class={val_per_class}: counts must be >= 0")
    if not 0.0 <= distractor_prob <= 1.0:
        raise InputError(f"distractor_prob={distractor_prob} must lie in [0, 1]")
    out_dir = Path(out_dir)
    params = dict(
        version=GENERATOR_VERSION, seed=seed, image_size=image_size, patch_size=patch_size,
        train_per_class=train_per_class, val_per_class=val_per_class, distractor_prob=distractor_prob,
        classes=list(CLASS_NAMES),
    )  # fmt: skip
    _check_params(out_dir, params, overwrite)
    counts = {"train": train_per_class, "val": val_per_class}
    jobs = [(s, c, i) for s in SPLITS for c in range(len(CLASS_NAMES)) for i in range(counts[s])]
    grid = image_size // patch_size
    start, written, skipped = time.perf_counter(), 0, 0
    for split, class_index, index in tqdm(jobs, desc="toy dataset", unit="img", disable=not progress):
        name = CLASS_NAMES[class_index]
        stem = image_stem(name, index)
        png = out_dir / split / name / f"{stem}.png"
        gt = out_dir / f"{split}{GT_SUFFIX}" / name / f"{stem}.npz"
        masks = out_dir / f"{split}{MASKS_SUFFIX}" / name / f"{stem}.pkl"
        if not overwrite and png.exists() and gt.exists() and masks.exists():
            skipped += 1
            continue
        rng = np.random.default_rng([seed, SPLITS.index(split), class_index, index])
        scene = render_scene(class_index, image_size, rng, distractor_prob)
        atomic_write_bytes(gt, _npz_bytes({
            "parts": scene.parts, "objects": scene.objects, "background": scene.background,
            "label": np.array(scene.label, np.int64),
        }))  # fmt: skip
        save_masks(masks, oracle_masks(scene, patch_size), grid=grid, img_size=image_size,
                   patch_size=patch_size, levels=LEVELS, sam_model="oracle")  # fmt: skip
        atomic_write_bytes(png, _png_bytes(scene.image))
        written += 1
    summary = ToySummary(
        out_dir=str(out_dir), written=written, skipped=skipped, seconds=time.perf_counter() - start,
        classes=len(CLASS_NAMES), images_per_split={s: counts[s] * len(CLASS_NAMES) for s in SPLITS},
    )  # fmt: skip
    log.info("%s", summary)
    return summary


__all__ = [
    "CLASS_NAMES", "TOY_CLASSES", "TOY_IMAGE_SIZE", "TOY_PATCH_SIZE", "Part", "ToyScene", "ToySummary", "generate_toy_dataset", "image_stem",
    "load_toy_ground_truth", "oracle_masks", "patch_grid_points", "render_scene",
]  # fmt: skip
