"""Stage 1 (partwhole.masks.mask_folder and its CLI, patched_masks.py): point grid, masks vs SamPredictor / SAM2ImagePredictor, file format, resume, DDP, bad input.

Everything runs the real segment_anything and sam2 code on CPU with random-weight
test models: ``vit_tiny`` (a 256 px SAM built from segment_anything's own modules)
and ``sam2.1_hiera_test`` (sam2's Hiera-T config made small, 256 px). Tests of
what both teachers must do take the ``model_type`` parameter (:data:`TEACHERS`).
"""

import os
import pickle
import re
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything import SamPredictor
from stage1 import run_stage1

from partwhole.common.errors import InputError, SettingError
from partwhole.common.image_folders import list_image_folder
from partwhole.common.mask_io import (
    load_masks,
    read_distinct_masks,
    read_mask_record,
    save_masks,
)
from partwhole.common.point_grid import patch_grid_points
from partwhole.common.safe_files import safe_pickle_load
from partwhole.masks.masker_options import MaskerOptions
from partwhole.masks.sam2_points import Sam2PointGridMasker
from partwhole.masks.sam_points import PointGridMasker
from partwhole.masks.teachers import build_teacher, load_teacher_checkpoint
from partwhole_cli import masks as masks_cli
from partwhole_cli import user_error

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "src" / "hierarchical_masks" / "patched_masks.py"
# one OpenMP thread: on a shared 2-core machine two threads stall each other badly
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


pytestmark = pytest.mark.usefixtures("one_torch_thread")
TEACHERS = ["vit_tiny", "sam2.1_hiera_test"]  # SAM 1 and SAM 2.1, small random-weight models of each
MASKERS = {"vit_tiny": PointGridMasker, "sam2.1_hiera_test": Sam2PointGridMasker}
# each teacher and each file format at least once (the format does not depend on the teacher)
TEACHER_FORMATS = [("vit_tiny", "v2"), ("vit_tiny", "v1"), ("sam2.1_hiera_test", "v2")]


@pytest.fixture(scope="module")
def tiny_sam():
    return build_teacher("vit_tiny")


@pytest.fixture(scope="module")
def tiny_sam2():
    return build_teacher("sam2.1_hiera_test")


# SAM2ImagePredictor scripts its transforms with torch.jit.script, which torch now warns about
predictor_warning = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


def sam2_predictor(model):
    """sam2's own ``SAM2ImagePredictor`` (default settings) for ``model`` (sam2 imported here, as stage 1 does).

    The predictor assumes a 1024 px model: it hard-codes its three feature
    sizes (256, 128, 64); the small test model's follow from its image size.
    """
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    predictor = SAM2ImagePredictor(model)
    predictor._bb_feat_sizes = [(model.image_size // stride,) * 2 for stride in (4, 8, 16)]
    return predictor


def synthetic_image(seed: int, size=(240, 180)) -> np.ndarray:
    """A uint8 RGB image with a few flat rectangles and an ellipse (something for SAM to cut)."""
    rng = np.random.default_rng(seed)
    width, height = size
    image = np.full((height, width, 3), rng.integers(0, 60, 3), np.uint8)
    for _ in range(3):
        y, x = rng.integers(0, height - 40), rng.integers(0, width - 40)
        image[y : y + rng.integers(20, 80), x : x + rng.integers(20, 100)] = rng.integers(0, 256, 3)
    yy, xx = np.mgrid[:height, :width]
    image[((yy - height / 2) / 30) ** 2 + ((xx - width / 3) / 45) ** 2 < 1] = rng.integers(0, 256, 3)
    return image


def make_image_folder(root: Path, per_class: int = 2, classes=("cat", "dog")) -> Path:
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(synthetic_image(10 * label + i)).save(root / name / f"img{i}.png")
    return root


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU over the last two axes; two empty masks count as 1."""
    inter = (a & b).sum((-2, -1))
    union = (a | b).sum((-2, -1))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def run_stage(in_dir, out_dir, **kwargs):
    args = dict(sam_model_type="vit_tiny", sam_checkpoint=None, device="cpu", batch_size=2, show_progress=False)
    return run_stage1(in_data_path=str(in_dir), out_data_path=str(out_dir), **{**args, **kwargs})


def run_cli(*args, timeout=120):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, env=ENV, cwd=REPO, timeout=timeout)


def snapshot(folder: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- points and masks


def test_patch_grid_points_row_major_patch_centres():
    points = patch_grid_points(224, 16)
    assert points.shape == (196, 2)
    grid = 14
    for k in (0, 1, 13, 14, 100, 195):
        row, col = divmod(k, grid)
        assert tuple(points[k]) == (col * 16 + 8, row * 16 + 8)  # (x, y)
    with pytest.raises(ValueError, match="multiple of patch_size"):
        patch_grid_points(225, 16)


def assert_masks_match_predictor_one_point_at_a_time(masks, images, predictor, point_labels="foreground", every=1):
    """``masks`` (b, k, 3, H, W) equal the predictor's, one single-point prompt at a time (IoU >= 0.99 each).

    ``every``: check every point (1) or every n-th one (a big model on a CPU).
    """
    points = patch_grid_points(images[0].shape[0], images[0].shape[0] // int(np.sqrt(masks.shape[1])))
    for image, ours in zip(images, masks):
        predictor.set_image(image)
        for k in range(0, len(points), every):
            label = 1 if point_labels == "foreground" else k
            theirs, _, _ = predictor.predict(points[k : k + 1], np.array([label]), multimask_output=True)
            iou = mask_iou(ours[k], theirs.astype(bool))
            assert iou.min() >= 0.99, (k, iou)
    # the masks are not degenerate: they differ between images, points and levels
    assert len(masks) == 1 or (masks[0] != masks[-1]).any()
    assert (masks[0, 0] != masks[0, -1]).any() and (masks[0, :, 0] != masks[0, :, 2]).any()


@pytest.mark.parametrize("point_labels", ["foreground", "reference"])
def test_batched_masks_match_sam_predictor_one_point_at_a_time(tiny_sam, point_labels):
    images = [synthetic_image(1, (224, 224)), synthetic_image(2, (224, 224))]
    masker = PointGridMasker(tiny_sam, MaskerOptions(img_size=224, patch_size=16, point_labels=point_labels, points_per_batch=64))
    masks = masker(images).numpy()
    assert masks.shape == (2, 196, 3, 224, 224) and masks.dtype == bool
    assert_masks_match_predictor_one_point_at_a_time(masks, images, SamPredictor(tiny_sam), point_labels)


@predictor_warning
@pytest.mark.slow
def test_sam2_batched_masks_match_sam2_image_predictor_one_point_at_a_time(tiny_sam2):
    images = [synthetic_image(1, (224, 224)), synthetic_image(2, (224, 224))]
    masks = Sam2PointGridMasker(tiny_sam2, MaskerOptions(img_size=224, patch_size=16, points_per_batch=64))(images).numpy()
    assert masks.shape == (2, 196, 3, 224, 224) and masks.dtype == bool
    assert_masks_match_predictor_one_point_at_a_time(masks, images, sam2_predictor(tiny_sam2))


@pytest.mark.slow
@predictor_warning
def test_sam2_1_hiera_tiny_masks_match_sam2_image_predictor_one_point_at_a_time():
    """The real SAM 2.1 Hiera-T (1024 px, random weights), one image, every 7th point (40-90 s on a shared 2-core CPU)."""
    model = build_teacher("sam2.1_hiera_tiny")
    images = [synthetic_image(4, (224, 224))]
    masks = Sam2PointGridMasker(model, MaskerOptions(img_size=224, patch_size=16, points_per_batch=98))(images).numpy()
    assert_masks_match_predictor_one_point_at_a_time(masks, images, sam2_predictor(model), every=7)  # 1024 px: sizes unchanged


def test_precisions_run_and_bf16_mostly_agrees(tiny_sam):
    image = [synthetic_image(3, (64, 64))]
    fp32 = PointGridMasker(tiny_sam, MaskerOptions(img_size=64, patch_size=16))(image).numpy()
    bf16 = PointGridMasker(tiny_sam, MaskerOptions(img_size=64, patch_size=16, precision="bf16"))(image).numpy()
    assert bf16.shape == fp32.shape == (1, 16, 3, 64, 64)
    assert mask_iou(fp32, bf16).mean() >= 0.9  # random weights sit near the threshold; real SAM agrees far better


# --------------------------------------------------------------------------- file format


@pytest.mark.parametrize("model_type,mask_format", TEACHER_FORMATS)
def test_format_round_trip_meta_and_reference_format(tmp_path, tiny_sam, tiny_sam2, model_type, mask_format):
    out = tmp_path / "masks"
    run_stage(make_image_folder(tmp_path / "val", per_class=1), out, img_size=64, patch_size=16, sam_model_type=model_type,
              mask_format=mask_format)
    assert safe_pickle_load(out / "cat" / "img0.pkl")["format"] == f"partwhole-masks/{mask_format[1]}"
    masks, meta = read_mask_record(out / "cat" / "img0.pkl")
    assert masks.shape == (16, 3, 64, 64) and masks.dtype == bool
    for key, value in dict(grid=4, img_size=64, patch_size=16, levels=3, sam_model=model_type, point_labels="foreground",
                            mask_source="sam").items():
        assert meta[key] == value
    # the same masks as the library computes on the same resized image
    image = np.asarray(Image.open(tmp_path / "val" / "cat" / "img0.png").convert("RGB").resize((64, 64), Image.BICUBIC))
    model = tiny_sam if model_type == "vit_tiny" else tiny_sam2
    np.testing.assert_array_equal(masks, MASKERS[model_type](model, MaskerOptions(img_size=64, patch_size=16))([image])[0].numpy())
    np.testing.assert_array_equal(read_distinct_masks(out / "cat" / "img0.pkl").expand(), masks)

    # the reference format: a pickled list of N bool arrays (3, H, W)
    reference = tmp_path / "reference.pkl"
    reference.write_bytes(pickle.dumps([m for m in masks], protocol=pickle.HIGHEST_PROTOCOL))
    loaded = load_masks(reference)
    assert loaded.dtype == bool and loaded.shape == (16, 3, 64, 64)
    np.testing.assert_array_equal(loaded, masks)


def blob_masks(grid=14, size=224, seed=0) -> np.ndarray:
    """Nested blobby masks around every grid point, like real SAM part/object/whole masks."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    masks = np.zeros((grid * grid, 3, size, size), bool)
    for k, (x, y) in enumerate(patch_grid_points(size, size // grid)):
        angle = np.arctan2(yy - y, xx - x)
        radius = np.hypot(yy - y, xx - x)
        wobble = 1 + 0.2 * np.sin(3 * angle + rng.uniform(0, 6)) + 0.1 * np.cos(5 * angle + rng.uniform(0, 6))
        for level, base in enumerate(sorted(rng.uniform(8, 120, 3))):
            masks[k, level] = radius < base * wobble
    return masks


@pytest.mark.parametrize("mask_format", ["v2", "v1"])
def test_blob_masks_fit_in_0_3_mb_and_round_trip(tmp_path, mask_format):
    masks = blob_masks()
    path = tmp_path / "blob.pkl"
    save_masks(path, masks, mask_format=mask_format, grid=14, img_size=224, patch_size=16, levels=3, sam_model="synthetic")
    assert path.stat().st_size <= 300_000, path.stat().st_size
    np.testing.assert_array_equal(load_masks(path), masks)


def region_masks(grid=14, size=224, seed=0) -> np.ndarray:
    """Masks that repeat, like SAM's on a photo: each point's level-``l`` mask is the region under it.

    Three nested partitions of the image into wobbly Voronoi cells (4 wholes, split
    into objects, split into parts); many points fall in the same cell, so most of
    the ``grid**2 * 3`` masks repeat.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    wy = yy + 6 * np.sin(xx / 9 + rng.uniform(0, 6))  # wobbly cell borders
    wx = xx + 6 * np.sin(yy / 7 + rng.uniform(0, 6))
    labels, regions = np.zeros((size, size), np.int64), []
    for cells in (4, 12, 40):  # wholes, objects, parts: each level splits the one above
        seeds = rng.uniform(0, size, (cells, 2))
        nearest = np.argmin((wy[..., None] - seeds[:, 0]) ** 2 + (wx[..., None] - seeds[:, 1]) ** 2, axis=-1)
        labels = labels * cells + nearest
        regions.insert(0, labels)  # level 0 is the finest
    points = patch_grid_points(size, size // grid).astype(int)
    return np.stack([r[None] == r[points[:, 1], points[:, 0]][:, None, None] for r in regions], axis=1)


@pytest.mark.slow
def test_v2_stores_each_distinct_mask_once_and_is_4x_smaller(tmp_path):
    masks = region_masks()
    sizes = {fmt: save_masks(tmp_path / f"{fmt}.pkl", masks, mask_format=fmt, grid=14) for fmt in ("v1", "v2")}
    assert sizes["v1"] >= 4 * sizes["v2"], sizes
    stored = read_distinct_masks(tmp_path / "v2.pkl")
    assert stored.num_distinct == len(np.unique(masks.reshape(len(masks) * 3, -1), axis=0)) < 588 / 4
    assert stored.index.shape == (196, 3) and stored.index[0, 0] == 0  # in order of first appearance
    for fmt in ("v1", "v2"):
        np.testing.assert_array_equal(load_masks(tmp_path / f"{fmt}.pkl"), masks)


@pytest.mark.parametrize("damage, message", [
    ("index_out_of_range", "index points at mask 34 of 34 distinct masks"),
    ("index_wrong_shape", "index of 47 entries for 16 points x 3 levels"),
    ("index_dtype", "index dtype 'object'"),
    ("index_dtype_array", "index dtype array("),
    ("index_not_zlib", "index: error"),
    ("distinct_truncated", "not a whole number of 32x32 masks"),
])
def test_corrupt_v2_file_is_one_line_error_naming_it(tmp_path, damage, message):
    masks = region_masks(grid=4, size=32)
    path = tmp_path / "img0.pkl"
    save_masks(path, masks, grid=4)
    record = pickle.loads(path.read_bytes())
    index = np.frombuffer(zlib.decompress(record["index"]), record["index_dtype"])
    assert index.max() == 33  # 34 distinct masks
    if damage == "index_out_of_range":
        record["index"] = zlib.compress(np.where(index == 33, 34, index).astype(record["index_dtype"]).tobytes())
    elif damage == "index_wrong_shape":
        record["index"] = zlib.compress(index[:-1].tobytes())
    elif damage == "index_dtype":
        record["index_dtype"] = "object"
    elif damage == "index_dtype_array":
        record["index_dtype"] = np.array(["<u2", "<u4"])
    elif damage == "index_not_zlib":
        record["index"] = index.tobytes()
    elif damage == "distinct_truncated":
        record["distinct"] = zlib.compress(zlib.decompress(record["distinct"])[:-3])
    path.write_bytes(pickle.dumps(record))
    for reader in (load_masks, read_distinct_masks):
        with pytest.raises(InputError) as caught:
            reader(path)
        text = str(caught.value)
        assert "\n" not in text and text.startswith(f"{path}: corrupt mask data") and message in text, text
        assert text.endswith("delete it and rerun stage 1")


# --------------------------------------------------------------------------- resume, overwrite, DDP


@pytest.mark.parametrize("model_type,mask_format", TEACHER_FORMATS)
def test_resume_skips_finished_files_and_overwrite_rewrites(tmp_path, model_type, mask_format):
    images, out = make_image_folder(tmp_path / "val"), tmp_path / "masks"
    first = run_stage(images, out, img_size=64, sam_model_type=model_type, mask_format=mask_format)
    assert (first.written, first.skipped) == (4, 0)
    before = snapshot(out)

    again = run_stage(images, out, img_size=64, sam_model_type=model_type, mask_format=mask_format)
    assert (again.written, again.skipped) == (0, 4)
    assert snapshot(out) == before

    lost = out / "dog" / "img1.pkl"
    lost.unlink()  # as if the run had been killed before writing it
    resumed = run_stage(images, out, img_size=64, sam_model_type=model_type, mask_format=mask_format)
    assert (resumed.written, resumed.skipped) == (1, 3)
    after = snapshot(out)
    assert {p: b for p, (_, b) in after.items()} == {p: b for p, (_, b) in before.items()}  # seeded weights: same bytes
    assert {p: v for p, v in after.items() if p != lost} == {p: v for p, v in before.items() if p != lost}

    rewritten = run_stage(images, out, img_size=64, overwrite=True, sam_model_type=model_type, mask_format=mask_format)
    assert (rewritten.written, rewritten.skipped) == (4, 0)
    assert all(p.stat().st_mtime_ns != before[p][0] for p in before)


@pytest.mark.parametrize("model_type,mask_format", TEACHER_FORMATS)
def test_killed_run_leaves_complete_files_and_resumes(tmp_path, monkeypatch, model_type, mask_format):
    images, out = make_image_folder(tmp_path / "val"), tmp_path / "masks"
    calls = {"n": 0}
    masker_class = MASKERS[model_type]
    real = masker_class.predict_model_inputs

    def dies_on_second_batch(self, inputs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(self, inputs)

    monkeypatch.setattr(masker_class, "predict_model_inputs", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        run_stage(images, out, img_size=64, batch_size=2, sam_model_type=model_type, mask_format=mask_format)
    written = sorted(out.rglob("*.pkl"))
    assert len(written) == 2 and not list(out.rglob("*.tmp"))
    for path in written:
        assert load_masks(path).shape == (16, 3, 64, 64)
        assert safe_pickle_load(path)["format"] == f"partwhole-masks/{mask_format[1]}"
    monkeypatch.undo()

    resumed = run_stage(images, out, img_size=64, sam_model_type=model_type, mask_format=mask_format)
    assert (resumed.written, resumed.skipped) == (2, 2)


@pytest.mark.slow
def test_two_cpu_processes_split_the_images(tmp_path):
    images, out = make_image_folder(tmp_path / "val", per_class=3), tmp_path / "masks"
    result = run_cli(
        "--device=cpu", "--num_processes=2", "--sam_model_type=vit_tiny", "--img_size=64", "--batch_size=2",
        f"--in_data_path={images}", f"--out_data_path={out}", timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summaries = [line for line in result.stdout.splitlines() if line.startswith("patched_masks")]
    assert sorted(summaries, key=len)[0].startswith("patched_masks: 3 written"), summaries
    assert any(line.startswith("patched_masks [rank 1]: 3 written") for line in summaries), summaries
    assert len(list(out.rglob("*.pkl"))) == 6  # 3 + 3 written, 6 distinct files: disjoint and complete


# --------------------------------------------------------------------------- bad input


@pytest.mark.slow
def test_reference_command_parses_and_fails_cleanly_without_gpu(tmp_path):
    """The reference command verbatim; on this CPU-only test machine it must stop at --device, in one line."""
    result = run_cli(
        "--device=cuda:1", "--split=val", "--in_data_path=datasets/imagenette2/val", "--out_data_path=datasets/imagenette2/val_masks",
        "--sam_checkpoint=sam_vit_h_4b8939.pth", "--sam_model_type=vit_h", "--img_size", "224", "--patch_size=16",
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: --device=cuda:1")
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_corrupt_image_is_named_or_skipped_into_failed_txt(tmp_path):
    images, out = make_image_folder(tmp_path / "val"), tmp_path / "masks"
    bad = images / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (out / "cat").mkdir(parents=True)
    keep = out / "cat" / "old.pkl"
    keep.write_bytes(b"already here")

    result = run_cli("--device=cpu", "--sam_model_type=vit_tiny", "--img_size=64", f"--in_data_path={images}", f"--out_data_path={out}")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "broken.jpg" in last and "skip_bad_images" in last
    assert "Traceback" not in result.stderr
    assert keep.read_bytes() == b"already here"

    progress = run_stage(images, out, img_size=64, skip_bad_images=True)
    assert (progress.failed, len(list(out.rglob("img*.pkl")))) == (1, 4)
    failed = (out / "failed.txt").read_text().splitlines()
    assert len(failed) == 1 and failed[0].startswith(str(bad))


def test_grayscale_cmyk_rgba_images_are_converted(tmp_path):
    folder = tmp_path / "val" / "mixed"
    folder.mkdir(parents=True)
    rgb = Image.fromarray(synthetic_image(5))
    rgb.convert("L").save(folder / "gray.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    rgb.convert("RGBA").save(folder / "rgba.png")
    progress = run_stage(tmp_path / "val", tmp_path / "masks", img_size=64)
    assert (progress.written, progress.failed) == (3, 0)
    assert all(load_masks(p).shape == (16, 3, 64, 64) for p in (tmp_path / "masks" / "mixed").glob("*.pkl"))


def test_tiny_checkpoint_loads_and_mismatches_are_explained(tmp_path, tiny_sam):
    good = tmp_path / "tiny.pth"
    torch.save(tiny_sam.state_dict(), good)
    loaded = build_teacher("vit_tiny", good)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), tiny_sam.state_dict().values()))

    looks_like_vit_b = dict(tiny_sam.state_dict(), **{"image_encoder.pos_embed": torch.zeros(1, 64, 64, 768)})
    wrong = tmp_path / "wrong.pth"
    torch.save(looks_like_vit_b, wrong)
    with pytest.raises(InputError, match=r"^sam_checkpoint=.*wrong.pth': does not fit sam_model_type vit_tiny.*sam_model_type to vit_b"):
        load_teacher_checkpoint(build_teacher("vit_tiny"), wrong, "vit_tiny")

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a readable SAM checkpoint"):
        build_teacher("vit_tiny", garbage)


def test_sam2_checkpoint_loads_and_mismatches_are_explained(tmp_path, tiny_sam, tiny_sam2):
    released = tmp_path / "sam2_test.pt"  # the released files hold {"model": state_dict}
    torch.save({"model": tiny_sam2.state_dict()}, released)
    loaded = build_teacher("sam2.1_hiera_test", released, seed=1)  # another seed: the weights come from the file
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), tiny_sam2.state_dict().values()))

    sam1 = tmp_path / "tiny.pth"
    torch.save(tiny_sam.state_dict(), sam1)
    with pytest.raises(InputError, match=r"does not fit sam_model_type sam2.1_hiera_test.*sam_model_type to vit_tiny$"):
        load_teacher_checkpoint(tiny_sam2, sam1, "sam2.1_hiera_test")
    with pytest.raises(InputError, match=r"does not fit sam_model_type vit_tiny.*sam_model_type to sam2.1_hiera_test$"):
        load_teacher_checkpoint(build_teacher("vit_tiny"), released, "vit_tiny")

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="not a readable SAM 2.1 checkpoint"):
        build_teacher("sam2.1_hiera_test", garbage)


@pytest.mark.parametrize(
    "case, message",
    [
        ("img_size", "^img_size=100: must be a positive multiple of patch_size=16"),
        ("missing_checkpoint", "^sam_checkpoint=.*missing.pth': file not found; download it from https://"),
        ("missing_sam2_checkpoint", "^sam_checkpoint=.*missing.pt': file not found; download it from https://.*/sam2.1_hiera_large.pt$"),
        ("sam2_reference_labels", "^point_labels='reference': reproduces the reference's SAM 1 prompts; SAM 2.1 takes foreground"),
        ("mismatched_checkpoint", "^error: --sam_checkpoint=.*tiny.pth: does not fit sam_model_type vit_b"),  # the CLI's line
        ("no_class_folders", "no class folders found"),
        ("unwritable_output", "out_data_path=.*cannot write there"),
        ("mask_format", "^mask_format='v3': unknown; choose one of v1, v2"),
    ],
)
@pytest.mark.slow
def test_bad_input_is_one_line_error_and_touches_nothing(tmp_path, tiny_sam, case, message):
    images, out = make_image_folder(tmp_path / "val"), tmp_path / "masks"
    (out / "cat").mkdir(parents=True)
    (out / "cat" / "img0.pkl").write_bytes(b"finished earlier")
    kwargs = dict(sam_model_type="vit_tiny", sam_checkpoint=None, img_size=64, in_data_path=images, out_data_path=out)
    if case == "img_size":
        kwargs["img_size"] = 100
    elif case == "missing_checkpoint":
        kwargs.update(sam_model_type="vit_h", sam_checkpoint=tmp_path / "missing.pth")
    elif case == "missing_sam2_checkpoint":
        kwargs.update(sam_model_type="sam2.1_hiera_large", sam_checkpoint=tmp_path / "missing.pt")
    elif case == "sam2_reference_labels":
        kwargs.update(sam_model_type="sam2.1_hiera_test", point_labels="reference")
    elif case == "mismatched_checkpoint":
        torch.save(tiny_sam.state_dict(), tmp_path / "tiny.pth")
        kwargs.update(sam_model_type="vit_b", sam_checkpoint=tmp_path / "tiny.pth")
    elif case == "no_class_folders":
        flat = tmp_path / "flat"
        flat.mkdir()
        Image.fromarray(synthetic_image(0)).save(flat / "a.png")
        kwargs["in_data_path"] = flat
    elif case == "mask_format":
        kwargs["mask_format"] = "v3"
    elif case == "unwritable_output":
        blocker = tmp_path / "a_file"
        blocker.write_text("x")
        kwargs["out_data_path"] = blocker / "masks"
    before = snapshot(out)

    if case == "mismatched_checkpoint":  # the CLI edge is checked once; the rest in-process (fast)
        args = [f"--{k}={v}" for k, v in kwargs.items()] + ["--device=cpu"]
        result = run_cli(*args)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("error: ") and "looks like a vit_tiny checkpoint" in last
        assert re.search(message, last)
    else:
        with pytest.raises(ValueError, match=message):  # InputError is a ValueError
            run_stage1(device="cpu", show_progress=False, **{k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()})
    assert snapshot(out) == before
    assert not list(out.rglob("*.tmp"))


@pytest.mark.slow
def test_a_library_setting_error_reaches_the_user_as_its_flag(tmp_path):
    """The library names the field (``compile_encoder``); the command line names the flag (``--compile``)."""
    images, out = make_image_folder(tmp_path / "val", per_class=1), tmp_path / "masks"
    with pytest.raises(SettingError) as refused:
        run_stage1(in_data_path=images, out_data_path=out, sam_model_type="sam2.1_hiera_test", compile_encoder=True)
    assert (refused.value.setting, refused.value.value) == ("compile_encoder", True)
    assert str(refused.value).startswith("compile_encoder=True: torch.compile is not supported for SAM 2.1 yet")
    assert user_error(refused.value, masks_cli.FLAG_OF).startswith("--compile=True: torch.compile is not supported")
    result = run_cli("--device=cpu", "--sam_model_type=sam2.1_hiera_test", "--compile", f"--in_data_path={images}",
                     f"--out_data_path={out}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: --compile=True: torch.compile is not supported for SAM 2.1 yet; drop it"
    assert not out.exists()


@pytest.mark.parametrize("model_type", TEACHERS)
@pytest.mark.slow
def test_model_type_alias_and_default_tiny_random_weights(tmp_path, model_type):
    images, out = make_image_folder(tmp_path / "val", per_class=1), tmp_path / "masks"
    fmt = "v1" if model_type == "vit_tiny" else "v2"  # the flag, both ways
    result = run_cli("--device=cpu", f"--model_type={model_type}", "--img_size=32", "--patch_size=16", f"--mask_format={fmt}",
                     f"--in_data_path={images}", f"--out_data_path={out}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "patched_masks: 2 written, 0 skipped (already done), 0 failed" in result.stdout
    meta = read_mask_record(out / "dog" / "img0.pkl")[1]
    assert (meta["sam_model"], meta["grid"], meta["sam_checkpoint"]) == (model_type, 2, None)
    assert safe_pickle_load(out / "dog" / "img0.pkl")["format"] == f"partwhole-masks/{fmt[1]}"
    assert list_image_folder(images)  # the images were left alone


@pytest.mark.slow
def test_sam2_model_without_checkpoint_flag_looks_for_its_released_file(tmp_path):
    images, out = make_image_folder(tmp_path / "val", per_class=1), tmp_path / "masks"
    result = run_cli("--device=cpu", "--sam_model_type=sam2.1_hiera_small", f"--in_data_path={images}", f"--out_data_path={out}")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --sam_checkpoint=sam2.1_hiera_small.pt: file not found; "
        "download it from https://dl.fbaipublicfiles.com/segment_anything_2/092824/sam2.1_hiera_small.pt"
    )
    assert not list(out.rglob("*.pkl"))


@pytest.mark.slow
def test_sam2_1_hiera_tiny_random_weights_writes_masks_for_a_folder(tmp_path):
    """The acceptance run: --sam_model_type=sam2.1_hiera_tiny with random weights, through the CLI."""
    images, out = make_image_folder(tmp_path / "val", per_class=1), tmp_path / "masks"
    result = run_cli("--device=cpu", "--sam_model_type=sam2.1_hiera_tiny", "--sam_checkpoint=none", "--img_size=64",
                     f"--in_data_path={images}", f"--out_data_path={out}", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    masks, meta = read_mask_record(out / "cat" / "img0.pkl")
    assert masks.shape == (16, 3, 64, 64) and (meta["sam_model"], meta["sam_checkpoint"]) == ("sam2.1_hiera_tiny", None)
    assert len(list(out.rglob("*.pkl"))) == 2
