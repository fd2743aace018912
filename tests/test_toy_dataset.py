"""The toy dataset generator: deterministic bytes, stage-1-format oracle masks, ground truth, folder layout."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from partwhole.common.errors import InputError
from partwhole.common.image_folders import (
    list_classes,
    list_image_folder,
    load_rgb_image,
)
from partwhole.common.mask_io import load_masks, read_mask_record
from partwhole.toy.dataset import (
    CLASS_NAMES,
    generate_toy_dataset,
    load_toy_ground_truth,
    oracle_masks,
    patch_grid_points,
    render_scene,
)

SRC = Path(__file__).resolve().parents[1] / "src"


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    summary = generate_toy_dataset(root, seed=3, train_per_class=2, val_per_class=1, progress=False)
    return root, summary


def test_layout_lists_ten_classes(tiny):
    root, summary = tiny
    assert summary.written == 30 and summary.skipped == 0
    assert list_classes(root / "train") == list(CLASS_NAMES) and len(CLASS_NAMES) == 10
    train, val = list_image_folder(root / "train"), list_image_folder(root / "val")
    assert len(train) == 20 and len(val) == 10
    assert sorted({r.label for r in train}) == list(range(10))
    for split in ("train", "val"):
        for record in list_image_folder(root / split):
            assert record.output_path(root / f"{split}_masks").is_file()
            assert record.output_path(root / f"{split}_gt", ".npz").is_file()
    assert load_rgb_image(train[0].path).size == (64, 64)
    assert json.loads((root / "toy_dataset.json").read_text())["seed"] == 3


def test_same_seed_same_bytes_and_resume(tiny, tmp_path):
    root, _ = tiny
    again = generate_toy_dataset(tmp_path / "a", seed=3, train_per_class=2, val_per_class=1, progress=False)
    assert again.written == 30
    assert _tree_bytes(tmp_path / "a") == _tree_bytes(root)
    other = generate_toy_dataset(tmp_path / "b", seed=4, train_per_class=2, val_per_class=1, progress=False)
    assert other.written == 30
    a, b = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert sum(a[k] != b[k] for k in a if k.endswith(".png")) == 30
    # Resume: a missing file is regenerated identically, the rest are skipped.
    victim = next((tmp_path / "a" / "val_masks").rglob("*.pkl"))
    victim.unlink()
    resumed = generate_toy_dataset(tmp_path / "a", seed=3, train_per_class=2, val_per_class=1, progress=False)
    assert (resumed.written, resumed.skipped) == (1, 29)
    assert _tree_bytes(tmp_path / "a") == _tree_bytes(root)
    with pytest.raises(InputError, match="other settings"):
        generate_toy_dataset(tmp_path / "a", seed=5, train_per_class=2, val_per_class=1, progress=False)
    redone = generate_toy_dataset(tmp_path / "a", seed=4, train_per_class=2, val_per_class=1, overwrite=True, progress=False)
    assert redone.written == 30 and _tree_bytes(tmp_path / "a") == _tree_bytes(tmp_path / "b")


def test_oracle_masks_stage1_format_nested_cover_points(tiny):
    root, _ = tiny
    points = patch_grid_points(64, 8).astype(int)
    assert points.shape == (64, 2) and tuple(points[9]) == (12, 12)  # row 1, col 1
    for path in sorted((root / "train_masks").rglob("*.pkl")):
        masks = load_masks(path)
        assert masks.shape == (64, 3, 64, 64) and masks.dtype == bool
        assert not (masks[:, 0] & ~masks[:, 1]).any() and not (masks[:, 1] & ~masks[:, 2]).any()
        assert masks[np.arange(64), :, points[:, 1], points[:, 0]].all()  # every level holds its point
        meta = read_mask_record(path)[1]
        assert (meta["grid"], meta["img_size"], meta["patch_size"], meta["levels"], meta["sam_model"]) == (8, 64, 8, 3, "oracle")


def test_ground_truth_matches_masks(tiny):
    root, _ = tiny
    points = patch_grid_points(64, 8).astype(int)
    seen_part = seen_background = False
    for record in list_image_folder(root / "train"):
        gt = load_toy_ground_truth(record.output_path(root / "train_gt", ".npz"))
        masks = load_masks(record.output_path(root / "train_masks"))
        parts, objects = gt["parts"], gt["objects"]
        assert int(gt["label"]) == record.label and parts.shape == objects.shape == (64, 64)
        assert ((parts > 0) == (objects > 0)).all() and ((gt["background"] == 0) == (objects > 0)).all()
        assert len(np.unique(parts[objects == 1])) >= 3  # a composite object
        for k, (x, y) in enumerate(points):
            if parts[y, x] > 0:
                seen_part = True
                np.testing.assert_array_equal(masks[k, 0], parts == parts[y, x])
                np.testing.assert_array_equal(masks[k, 1], objects == objects[y, x])
                np.testing.assert_array_equal(masks[k, 2], objects > 0)
            else:
                seen_background = True
                np.testing.assert_array_equal(masks[k, 0], gt["background"] == gt["background"][y, x])
                np.testing.assert_array_equal(masks[k, 1], objects == 0)
                np.testing.assert_array_equal(masks[k, 2], objects == 0)
    assert seen_part and seen_background


def test_96_pixels_and_mirrored_scenes():
    rng = np.random.default_rng(0)
    for class_index in range(10):
        scene = render_scene(class_index, 96, rng, distractor_prob=1.0)
        assert scene.image.shape == (96, 96, 3) and scene.image.dtype == np.uint8
        masks = oracle_masks(scene, 16)
        assert masks.shape == (36, 3, 96, 96)
        assert not (masks[:, 0] & ~masks[:, 1]).any() and not (masks[:, 1] & ~masks[:, 2]).any()


def test_bad_sizes_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="multiple of patch_size"):
        generate_toy_dataset(tmp_path, image_size=64, patch_size=7, train_per_class=1, val_per_class=0, progress=False)


def test_cli(tmp_path):
    cmd = [sys.executable, str(SRC / "make_toy_dataset.py"), f"--out_dir={tmp_path}", "--train_per_class=1",
           "--val_per_class=0", "--image_size=96", "--patch_size=16"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "10 written" in done.stderr
    assert load_masks(next((tmp_path / "train_masks").rglob("*.pkl"))).shape == (36, 3, 96, 96)
    bad = subprocess.run(cmd[:2] + [f"--out_dir={tmp_path}", "--patch_size=10"], capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "error:" in bad.stderr
