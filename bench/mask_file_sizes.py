"""Mask files on disk: bytes per image and read/write time of format v1 against v2, and stage 2 from each.

Structured masks with the repeats real SAM masks have (many grid points fall inside the same
region, so they get the same mask), from two sources:

* ``photo``: colour-region masks of scikit-image's sample photos, resized to 224 px as stage 1
  does. Level ``l`` of point ``k`` is the Felzenszwalb segment under the point at scale
  ``--scales[l]`` (small segments: parts; large: wholes). Not SAM, but shaped like real regions
  of real photos, which we cannot run a real SAM checkpoint on here.
* ``toy``: the toy dataset's oracle masks (its ground-truth parts, objects and background).

For every image: distinct masks of the ``N * 3``, the bytes of ``save_masks`` in v1 and in v2,
and the time to write (``save_masks``), to read full masks (``load_masks``, training and the
islands) and to read distinct masks (``read_distinct_masks``, stage 2). With ``--stage2`` it
also runs stage 2 (``embed_folder``, a small timm model with random weights, on CPU) on the
photos' v1 files and on their v2 files, checks that the embeddings are identical, and times both.

    python bench/mask_file_sizes.py                  # sizes and read/write times (about 20 s)
    python bench/mask_file_sizes.py --stage2         # plus stage 2 from v1 and from v2 files
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from partwhole.common.mask_io import (
    MASK_FORMATS,
    load_embeddings,
    load_masks,
    read_distinct_masks,
    save_masks,
)
from partwhole.common.point_grid import patch_grid_points

PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "coins", "rocket")  # skimage.data's photos of real scenes


def region_masks(labels_per_level: list[np.ndarray], patch_size: int) -> np.ndarray:
    """Bool ``(G*G, L, H, W)``: for every patch-centre point, the region of each level's label map under it."""
    points = np.floor(patch_grid_points(labels_per_level[0].shape[0], patch_size)).astype(int)
    x, y = points[:, 0], points[:, 1]
    return np.stack([labels[None] == labels[y, x][:, None, None] for labels in labels_per_level], axis=1)


def photo_masks(name: str, img_size: int, patch_size: int, scales: list[float]) -> tuple[Image.Image, np.ndarray]:
    """A scikit-image sample photo at ``img_size`` px (stage 1's resize) and its colour-region masks."""
    import skimage.data
    from skimage.segmentation import felzenszwalb

    image = Image.fromarray(getattr(skimage.data, name)()).convert("RGB").resize((img_size, img_size), Image.BICUBIC)
    pixels = np.asarray(image)
    levels = [felzenszwalb(pixels, scale=scale, sigma=0.8, min_size=20) for scale in scales]
    return image, region_masks(levels, patch_size)


def toy_masks(count: int, img_size: int, patch_size: int) -> list[np.ndarray]:
    """Oracle masks of ``count`` toy scenes (the toy dataset's stage-1 masks)."""
    from partwhole.toy.dataset import CLASS_NAMES, oracle_masks, render_scene

    rng = np.random.default_rng(0)
    return [oracle_masks(render_scene(i % len(CLASS_NAMES), img_size, rng, 0.5), patch_size) for i in range(count)]


def measure(name: str, masks: np.ndarray, folder: Path, repeats: int) -> dict:
    """Sizes and best-of-``repeats`` times of one image's masks in both formats (files left in ``folder/<format>``)."""
    row = {"image": name, "masks": masks.shape[0] * masks.shape[1]}
    for fmt in MASK_FORMATS:
        path = folder / fmt / "images" / f"{name}.pkl"
        timings = {"write": [], "load_masks": [], "read_distinct": []}
        for _ in range(repeats):
            start = time.perf_counter()
            row[f"{fmt}_bytes"] = save_masks(path, masks, mask_format=fmt, grid=int(round(np.sqrt(len(masks)))))
            timings["write"].append(time.perf_counter() - start)
            start = time.perf_counter()
            assert np.array_equal(load_masks(path), masks)
            timings["load_masks"].append(time.perf_counter() - start)
            start = time.perf_counter()
            stored = read_distinct_masks(path)
            timings["read_distinct"].append(time.perf_counter() - start)
        row["distinct"] = stored.num_distinct
        row.update({f"{fmt}_{key}_ms": 1000 * min(values) for key, values in timings.items()})
    return row


def print_table(rows: list[dict]) -> None:
    print("| image | distinct masks | v1 kB | v2 kB | v1 / v2 | write v1 / v2 ms | load_masks v1 / v2 ms | read_distinct_masks v1 / v2 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['image']} | {r['distinct']} of {r['masks']} | {r['v1_bytes'] / 1e3:.1f} | {r['v2_bytes'] / 1e3:.1f} | "
              f"{r['v1_bytes'] / r['v2_bytes']:.1f}x | {r['v1_write_ms']:.0f} / {r['v2_write_ms']:.0f} | "
              f"{r['v1_load_masks_ms']:.0f} / {r['v2_load_masks_ms']:.0f} | "
              f"{r['v1_read_distinct_ms']:.0f} / {r['v2_read_distinct_ms']:.0f} |")


def summary(label: str, rows: list[dict]) -> str:
    v1, v2 = (np.array([r[f"{fmt}_bytes"] for r in rows]) / 1e3 for fmt in MASK_FORMATS)
    distinct = [r["distinct"] for r in rows]
    return (f"{label}: {len(rows)} images, {min(distinct)}-{max(distinct)} distinct of {rows[0]['masks']} masks; "
            f"v1 {v1.min():.0f}-{v1.max():.0f} kB (mean {v1.mean():.0f}), v2 {v2.min():.1f}-{v2.max():.1f} kB (mean {v2.mean():.1f}); "
            f"v1 / v2 {min(v1 / v2):.1f}-{max(v1 / v2):.1f}x")


def run_stage2(folder: Path, images: dict[str, Image.Image], img_size: int, model: str) -> None:
    """Stage 2 on the photos from their v1 files and from their v2 files: identical embeddings? how long?"""
    from partwhole.embeds.embed_folder import (
        EmbedFolderConfig,
        check_inputs,
        embed_folder,
    )

    image_root = folder / "photos"
    for name, image in images.items():
        (image_root / "images").mkdir(parents=True, exist_ok=True)
        image.save(image_root / "images" / f"{name}.png")
    results, seconds = {}, {fmt: [] for fmt in MASK_FORMATS}
    for _ in range(2):  # alternate the formats, keep the best time of each (a shared machine is noisy)
        for fmt in MASK_FORMATS:
            cfg = EmbedFolderConfig(in_masks_path=folder / fmt, in_images_path=image_root, out_data_path=folder / f"embeds_{fmt}",
                                    encoder_model_name=model, pretrained=False, img_height=img_size, img_width=img_size,
                                    precision="fp32", overwrite=True, progress=False)
            start = time.perf_counter()
            embed_folder(cfg, check_inputs(cfg))
            seconds[fmt].append(time.perf_counter() - start)
            results[fmt] = {name: load_embeddings(folder / f"embeds_{fmt}" / "images" / f"{name}.pkl") for name in images}
    for fmt in MASK_FORMATS:
        print(f"stage 2 from {fmt} files: {len(images)} images in {min(seconds[fmt]):.2f} s (best of 2; {model}, random weights, CPU)")
    same = all(np.array_equal(results["v1"][n], results["v2"][n]) for n in images)
    print(f"stage 2 embeddings identical from v1 and v2 files: {same}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--img_size", type=int, default=224)
    parser.add_argument("--patch_size", type=int, default=16)
    parser.add_argument("--scales", type=float, nargs=3, default=[100, 400, 1600], help="Felzenszwalb scale of levels 0, 1, 2")
    parser.add_argument("--toy_images", type=int, default=6, help="toy scenes to measure (0: none)")
    parser.add_argument("--repeats", type=int, default=3, help="timings: best of this many")
    parser.add_argument("--stage2", action="store_true", help="also run stage 2 from the v1 and the v2 files")
    parser.add_argument("--stage2_model", default="test_vit", help="timm model for --stage2")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        images, rows = {}, []
        for name in PHOTOS:
            images[name], masks = photo_masks(name, args.img_size, args.patch_size, args.scales)
            rows.append(measure(name, masks, folder, args.repeats))
        toy_rows = [measure(f"toy_{i}", m, folder / "toy", args.repeats)
                    for i, m in enumerate(toy_masks(args.toy_images, args.img_size, args.patch_size))]
        print_table(rows + toy_rows)
        print(summary(f"photos (Felzenszwalb scales {args.scales})", rows))
        if toy_rows:
            print(summary("toy oracle masks", toy_rows))
        if args.stage2:
            run_stage2(folder, images, args.img_size, args.stage2_model)


if __name__ == "__main__":
    main()
