"""Benchmark of stage 1: our batched SAM masks against the reference way of calling SAM.

Both paths get the same images, the same model (one instance) and the same
device, in the same run, and both write their files:

* reference way (as distill-part-whole's patched_masks.py): ``Sam.__call__`` on
  batches of 5 images, fp32, segment_anything's own attention, one prompt per
  point with label ``k`` for point ``k``, ``multimask_output=True``, masks
  post-processed at 1024 px, one pickle per image holding a list of ``N`` bool
  arrays ``(3, H, W)``;
* ours: ``patched_masks.write_patched_masks`` (batched encoder, shared-image
  decoder, folded resize, read-ahead / write-behind, compressed files), once
  per ``--ours`` variant ``PRECISION:ATTENTION[:compile]``, e.g. ``fp32:reference``,
  ``bf16:sdpa``, ``bf16:sdpa:compile`` (the image encoder under torch.compile;
  its warm-up, compile included, is timed apart and reported).

Prints images/s of each, their ratio, bytes per image, and how well the masks
agree (IoU per mask; ours uses the same point labels as the reference way, so
fp32 masks should agree to rounding and bf16 shows its own error).

With a SAM 2.1 model (``--model_type sam2.1_hiera_*``) the baseline is the way
sam2's README calls it: ``SAM2ImagePredictor.set_image`` per image, then one
``predict`` with all grid points as a batch of single-point prompts (foreground
labels), ``multimask_output=True``, files in the reference format; ours runs
``fp32:sdpa`` / ``bf16:sdpa`` (SAM 2.1 has no other attention and no compile here).

    python bench/masks_throughput.py --model_type vit_tiny --num_images 8               # CPU smoke
    python bench/masks_throughput.py --model_type vit_b --num_images 4 --warmup 0 \
        --ours fp32:reference --ours fp32:sdpa --ours bf16:sdpa                          # CPU
    python bench/masks_throughput.py --device cuda --model_type vit_h --ours fp32:sdpa \
        --ours bf16:reference --ours bf16:sdpa --ours bf16:sdpa:compile                  # GPU
    python bench/masks_throughput.py --model_type sam2.1_hiera_tiny --num_images 4 --warmup 1   # SAM 2.1, CPU
"""

from __future__ import annotations

import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from absl import app, flags
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide
from suite_table import save_rows

from partwhole.common.image_folders import list_image_folder, load_rgb_image
from partwhole.common.mask_io import load_masks
from partwhole.common.point_grid import patch_grid_points
from partwhole.common.runtime import PRECISIONS
from partwhole.masks.mask_folder import MaskFolderConfig, write_patched_masks
from partwhole.masks.masker_options import MaskerOptions
from partwhole.masks.sam2_points import Sam2PointGridMasker
from partwhole.masks.sam_attention import ATTENTIONS, set_attention
from partwhole.masks.sam_points import PointGridMasker
from partwhole.masks.teachers import MODEL_TYPES, build_teacher, is_sam2_model

flags.DEFINE_string("device", None, "torch device (default: cuda if visible, else cpu)")
flags.DEFINE_enum("model_type", "vit_tiny", MODEL_TYPES, "SAM model (SAM 1 or SAM 2.1)")
flags.DEFINE_string("checkpoint", None, "SAM state dict (default: random weights, which time the same)")
flags.DEFINE_multi_string(
    "ours", ["fp32:sdpa"], "our path's variants, each timed: PRECISION:ATTENTION[:compile] (precision fp32|bf16|fp16, attention sdpa|reference)"
)
flags.DEFINE_string("compile_backend", "inductor", "torch.compile backend of ':compile' variants (eager: a quick dry run of the traced path)")
flags.DEFINE_string("summary_json", None, "append the figures as JSON lines here (bench/suite_table.py prints them)")
flags.DEFINE_enum(
    "point_labels", "reference", ["foreground", "reference"], "SAM 1: our path's labels (reference: masks comparable); SAM 2.1: foreground"
)
flags.DEFINE_integer("num_images", 10, "images per path")
flags.DEFINE_integer("warmup", 1, "untimed images per path before timing")
flags.DEFINE_integer("batch_size", 8, "our path: images per encoder forward")
flags.DEFINE_integer("points_per_batch", 196, "our path: prompts per decoder call")
flags.DEFINE_integer("reference_batch", 5, "reference way: images per Sam.__call__ (the reference used 5)")
flags.DEFINE_integer("img_size", 224, "image side")
flags.DEFINE_integer("patch_size", 16, "patch side (one point per patch)")
flags.DEFINE_string("images", None, "an image folder <root>/<class>/<image> (default: synthetic images)")
flags.DEFINE_integer("threads", 0, "torch CPU threads (0: torch's default)")
flags.DEFINE_boolean(
    "model_only", False, "also time each variant's model alone (ready inputs, masks to host memory; no image reading or files)"
)
FLAGS = flags.FLAGS


def synthetic_folder(root: Path, count: int) -> Path:
    """``count`` 320x240 PNGs with flat shapes in ``root/synthetic/``."""
    rng = np.random.default_rng(0)
    (root / "synthetic").mkdir(parents=True)
    yy, xx = np.mgrid[:240, :320]
    for i in range(count):
        image = np.full((240, 320, 3), rng.integers(0, 80, 3), np.uint8)
        for _ in range(4):
            cy, cx, ry, rx = rng.integers(20, 220), rng.integers(20, 300), rng.integers(15, 90), rng.integers(15, 120)
            image[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1] = rng.integers(0, 256, 3)
        Image.fromarray(image).save(root / "synthetic" / f"img{i:04d}.png")
    return root


def reference_way(records, sam, out_root: Path, img_size: int, patch_size: int, batch: int) -> None:
    """What distill-part-whole's patched_masks.py does per batch of images (its file format included)."""
    resize = ResizeLongestSide(sam.image_encoder.img_size)
    points = torch.as_tensor(patch_grid_points(img_size, patch_size), device=sam.device)[:, None, :]  # (k, 1, 2)
    labels = torch.arange(len(points), device=sam.device)[:, None]  # label k for point k, as the reference
    for start in range(0, len(records), batch):
        chunk = records[start : start + batch]
        batched_input = []
        for record in chunk:
            image = np.asarray(load_rgb_image(record.path, (img_size, img_size)))
            batched_input.append(
                {
                    "image": torch.as_tensor(resize.apply_image(image), device=sam.device).permute(2, 0, 1).contiguous(),
                    "point_coords": resize.apply_coords_torch(points, image.shape[:2]),
                    "point_labels": labels,
                    "original_size": image.shape[:2],
                }
            )
        with torch.no_grad():
            outputs = sam(batched_input, multimask_output=True)
        for record, item in zip(chunk, outputs):
            path = record.output_path(out_root)
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as handle:
                pickle.dump([mask.cpu().numpy() for mask in item["masks"]], handle, protocol=pickle.HIGHEST_PROTOCOL)
        del outputs
        if sam.device.type == "cuda":
            torch.cuda.empty_cache()


def sam2_predictor_way(records, model, out_root: Path, img_size: int, patch_size: int) -> None:
    """SAM 2.1 as its README calls it: set_image, then all points at once as single-point prompts (reference file format)."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    predictor = SAM2ImagePredictor(model)
    # the predictor hard-codes the feature sizes of a 1024 px model; the test model's follow from its image size
    predictor._bb_feat_sizes = [(model.image_size // stride,) * 2 for stride in (4, 8, 16)]
    points = patch_grid_points(img_size, patch_size)[:, None, :]  # (k, 1, 2)
    labels = np.ones(points.shape[:2], dtype=np.int64)
    for record in records:
        predictor.set_image(np.asarray(load_rgb_image(record.path, (img_size, img_size))))
        masks, _, _ = predictor.predict(points, labels, multimask_output=True)  # (k, 3, H, W)
        path = record.output_path(out_root)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            pickle.dump([mask.astype(bool) for mask in masks], handle, protocol=pickle.HIGHEST_PROTOCOL)


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    inter = (a & b).sum((-2, -1))
    union = (a | b).sum((-2, -1))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def parse_variant(spec: str) -> tuple[str, str, bool]:
    """``'bf16:sdpa:compile'`` -> ``('bf16', 'sdpa', True)``; a bad spec exits with the expected form."""
    parts = spec.split(":")
    ok = len(parts) in (2, 3) and parts[0] in PRECISIONS and parts[1] in ATTENTIONS and parts[2:] in ([], ["compile"])
    if not ok:
        raise SystemExit(f"error: --ours={spec!r}: expected PRECISION:ATTENTION[:compile], e.g. bf16:sdpa:compile")
    return parts[0], parts[1], len(parts) == 3


def main(argv):
    del argv
    if FLAGS.threads:
        torch.set_num_threads(FLAGS.threads)
    variants = [parse_variant(spec) for spec in FLAGS.ours]
    device = torch.device(FLAGS.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sam2 = is_sam2_model(FLAGS.model_type)
    if sam2 and any(attention != "sdpa" or compiled for _, attention, compiled in variants):
        raise SystemExit("error: SAM 2.1 runs --ours=fp32:sdpa|bf16:sdpa|fp16:sdpa only (its own attention, no compile here)")
    point_labels = "foreground" if sam2 else FLAGS.point_labels
    sam = build_teacher(FLAGS.model_type, FLAGS.checkpoint).to(device)  # one instance; each SAM 1 path sets its attention
    meta = dict(grid=FLAGS.img_size // FLAGS.patch_size, img_size=FLAGS.img_size, patch_size=FLAGS.patch_size, sam_model=FLAGS.model_type)
    n = FLAGS.num_images
    with tempfile.TemporaryDirectory(prefix="masks_bench_") as tmp:
        tmp = Path(tmp)
        count = n + FLAGS.warmup
        folder = Path(FLAGS.images) if FLAGS.images else synthetic_folder(tmp / "images", count)
        records = list_image_folder(folder)[:count]
        if len(records) < count:
            raise SystemExit(f"error: --images={folder} has {len(records)} images, need {count}")
        warm, timed_records = records[: FLAGS.warmup], records[FLAGS.warmup :]

        def reference(recs, out):
            if sam2:
                sam2_predictor_way(recs, sam, out, FLAGS.img_size, FLAGS.patch_size)
                return
            set_attention(sam, "reference")
            reference_way(recs, sam, out, FLAGS.img_size, FLAGS.patch_size, FLAGS.reference_batch)

        def bytes_per_image(out):
            return sum(r.output_path(out).stat().st_size for r in timed_records) / n

        if warm:
            reference(warm, tmp / "warm_ref")
        t_ref = timed(lambda: reference(timed_records, tmp / "ref"))
        ref_bytes = bytes_per_image(tmp / "ref")
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        print(f"device: {device} ({name}); torch {torch.__version__}; model {FLAGS.model_type}; {n} images {FLAGS.img_size} px, "
              f"patch {FLAGS.patch_size}")
        baseline = (
            "SAM2ImagePredictor (set_image, one predict of all points, fp32)" if sam2
            else f"reference way (Sam.__call__, batch {FLAGS.reference_batch}, fp32)"
        )
        print(f"{baseline}: {n / t_ref:.3f} images/s, {ref_bytes / 1e6:.2f} MB/image", flush=True)
        reference_masks = []
        for spec, (precision, attention, compiled) in zip(FLAGS.ours, variants):
            label = f"{precision}, {attention} attention" + (f", compiled ({FLAGS.compile_backend})" if compiled else "")
            tag = f"{precision}_{attention}" + ("_compile" if compiled else "")
            if sam2:
                options = MaskerOptions(img_size=FLAGS.img_size, patch_size=FLAGS.patch_size, precision=precision,
                                        points_per_batch=FLAGS.points_per_batch)
                masker = Sam2PointGridMasker(sam, options)
            else:
                set_attention(sam, attention)
                options = MaskerOptions(img_size=FLAGS.img_size, patch_size=FLAGS.patch_size, point_labels=point_labels,
                                        precision=precision, points_per_batch=FLAGS.points_per_batch, compile_encoder=compiled)
                masker = PointGridMasker(sam, options, compile_options={"backend": FLAGS.compile_backend})

            def ours(recs, out):
                cfg = MaskFolderConfig(in_data_path=folder, out_data_path=out, batch_size=FLAGS.batch_size, show_progress=False)
                write_patched_masks(recs, masker, cfg, meta=meta)

            # a compiled encoder traces the shape of its first batch: warm it with a full one
            warm_recs = timed_records[: FLAGS.batch_size] if compiled else warm
            t_warm = timed(lambda: ours(warm_recs, tmp / f"warm_{tag}")) if warm_recs else 0.0
            out = tmp / f"ours_{tag}"
            t_ours = timed(lambda: ours(timed_records, out))
            our_bytes = bytes_per_image(out)
            warm_note = f"; warm-up (compile) {t_warm:.1f} s" if compiled else ""
            if FLAGS.model_only:  # what the GPU computes, apart from reading images and compressing files
                inputs = [masker.model_input(np.asarray(load_rgb_image(r.path, (FLAGS.img_size,) * 2))) for r in timed_records]
                batches = [np.stack(inputs[i : i + FLAGS.batch_size]) for i in range(0, n, FLAGS.batch_size)]
                t_model = timed(lambda: [masker.predict_model_inputs(b).cpu() for b in batches])
                warm_note += f"; model alone {n / t_model:.3g} img/s"
            print(
                f"ours (batch {FLAGS.batch_size}, {label}, {point_labels} labels): {n / t_ours:.3f} images/s, "
                f"{our_bytes / 1e6:.3f} MB/image; speed-up {t_ref / t_ours:.2f}x, files {ref_bytes / our_bytes:.0f}x smaller{warm_note}"
            )
            note = f"{our_bytes / 1e6:.2f} MB/image (ref {ref_bytes / 1e6:.1f}){warm_note}"
            if sam2 or point_labels == "reference":  # same prompts: the masks must agree
                if not reference_masks:  # read once, compared with every variant
                    reference_masks.extend(load_masks(r.output_path(tmp / "ref")) for r in timed_records)
                ious = np.concatenate([mask_iou(ref, load_masks(r.output_path(out))).ravel() for ref, r in zip(reference_masks, timed_records)])
                print(
                    f"  masks vs the baseline: IoU min {ious.min():.4f}, mean {ious.mean():.4f}; "
                    f"{(ious >= 0.97).mean() * 100:.2f}% of masks >= 0.97, {(ious >= 0.99).mean() * 100:.2f}% >= 0.99"
                )
                note = f"IoU vs ref masks mean {ious.mean():.4f}, min {ious.min():.4f}, {(ious >= 0.97).mean():.2%} >= 0.97; " + note
            # saved at once: a later variant that times out must not take this figure with it
            save_rows(FLAGS.summary_json, [dict(key=spec, name=f"stage 1 {FLAGS.model_type} masks, ours {label}", value=n / t_ours,
                                                unit="img/s", baseline=baseline, baseline_value=n / t_ref, note=note)])
            sys.stdout.flush()


if __name__ == "__main__":
    app.run(main)
