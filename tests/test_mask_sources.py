"""Stage-1 mask sources without SAM (``mask_source`` boxes, full_image or superpixels) on real photos, and the box-size
helper."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skimage_data
from stage1 import run_stage1

from partwhole.common.errors import InputError, SettingError
from partwhole.common.mask_io import load_embeddings, read_mask_record, save_masks
from partwhole.common.point_grid import patch_grid_points
from partwhole.embeds import embed_folder as ef
from partwhole.masks.box_sizes import matched_box_sizes, mean_clipped_areas
from partwhole.masks.mask_sources import (
    DEFAULT_SUPERPIXEL_SCALES,
    BoxMasker,
    SuperpixelMasker,
)
from partwhole.masks.masker_options import MaskerOptions

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
SIZE, PATCH = 64, 16  # a 4 x 4 point grid
PHOTOS = {"people": ("astronaut",), "things": ("coffee", "chelsea")}  # scikit-image's sample photos, of different shapes

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("photos")
    for class_name, names in PHOTOS.items():
        (root / class_name).mkdir()
        for name in names:
            Image.fromarray(getattr(skimage_data, name)()).save(root / class_name / f"{name}.png")
    return root


def write_masks(images: Path, out: Path, mask_source: str, **kwargs):
    return run_stage1(in_data_path=str(images), out_data_path=str(out), mask_source=mask_source, img_size=SIZE,
                      patch_size=PATCH, device="cpu", show_progress=False, **kwargs)


def assert_nested_around_their_points(masks: np.ndarray) -> None:
    assert masks.shape == (16, 3, SIZE, SIZE) and masks.dtype == bool
    assert (masks[:, 0] <= masks[:, 1]).all() and (masks[:, 1] <= masks[:, 2]).all()  # level 0 ⊆ 1 ⊆ 2
    for k, (x, y) in enumerate(patch_grid_points(SIZE, PATCH)):
        assert masks[k, :, int(y), int(x)].all(), f"point {k} outside one of its masks"


@pytest.mark.parametrize("mask_source, kwargs", [("boxes", {"box_sizes": ["8", "24", "56"]}), ("full_image", {}),
                                                 ("superpixels", {"superpixel_scales": ["10", "40", "160"]})])
def test_masks_without_sam_are_nested_around_their_points_and_stage_2_reads_them(tmp_path, photos, mask_source, kwargs):
    out = tmp_path / "masks"
    progress = write_masks(photos, out, mask_source, **kwargs)
    files = sorted(out.rglob("*.pkl"))
    assert len(files) == 3 and progress.written == 3
    for path in files:
        masks, meta = read_mask_record(path)
        assert_nested_around_their_points(masks)
        assert (meta["mask_source"], meta["grid"], meta["img_size"], meta["patch_size"]) == (mask_source, 4, SIZE, PATCH)
        assert "sam_model" not in meta
    if mask_source == "full_image":
        assert masks.all()
    elif mask_source == "superpixels":
        assert meta["superpixel_scales"] == (10, 40, 160) and "box_sizes" not in meta
        areas = masks.sum(axis=(2, 3)).mean(axis=0)  # mean area per level: finer scales, smaller segments
        assert areas[0] < areas[1] < areas[2] < SIZE * SIZE
    else:
        assert meta["box_sizes"] == (8, 24, 56)
        assert masks[5, 0].sum() == 8 * 8 and masks[0, 2].sum() == 36 * 36  # inside the image / clipped at the corner
        assert not masks[0, 1, 20:, :].any() and masks[15, 2].sum() < masks[5, 2].sum()

    embeds = tmp_path / "embeds"
    config = ef.EmbedFolderConfig(in_masks_path=out, in_images_path=photos, out_data_path=embeds, encoder_model_name="test_vit",
                                  pretrained=False, img_height=SIZE, img_width=SIZE, batch_size=16, progress=False)
    ef.embed_folder(config, ef.check_inputs(config))
    cat = load_embeddings(embeds / "things" / "chelsea.pkl")
    assert cat.shape[:2] == (16, 3) and np.isfinite(cat).all()
    if mask_source == "full_image":  # one masked image: the whole photo
        assert np.allclose(cat, cat[0, 0], atol=1e-5)
    elif mask_source == "superpixels":  # different segments see different pixels
        assert not np.allclose(cat[:, 0], cat[0, 0], atol=1e-3)
    else:  # boxes of different sizes and places see different pixels
        assert not np.allclose(cat[:, 0], cat[0, 0], atol=1e-3)
        assert not np.allclose(cat[5, 0], cat[5, 2], atol=1e-3)


def test_superpixels_follow_the_photo_not_the_grid(photos):
    """The segments are the photo's: a point on the cat and a point on the background get different segments whose
    pixels differ in colour more across than within them, a uniform image is one segment at every level, and the
    levels nest even where the scales' segmentations disagree."""
    chelsea = np.asarray(Image.open(photos / "things" / "chelsea.png").convert("RGB").resize((224, 224), Image.BICUBIC))
    masker = SuperpixelMasker(MaskerOptions(224, 16))
    assert masker.scales == DEFAULT_SUPERPIXEL_SCALES
    masks = masker([chelsea])[0].numpy()
    assert masks.shape == (196, 3, 224, 224)
    assert (masks[:, 0] <= masks[:, 1]).all() and (masks[:, 1] <= masks[:, 2]).all()
    for k, (x, y) in enumerate(patch_grid_points(224, 16)):
        assert masks[k, :, int(y), int(x)].all()
    fine = masks[:, 0]
    assert len({m.tobytes() for m in fine}) > 20  # many distinct sub-parts, not one box per point
    pixels = chelsea.reshape(-1, 3).astype(float)
    spread_within = np.mean([pixels[m.ravel()].std(axis=0).mean() for m in fine])
    assert spread_within < 0.6 * pixels.std(axis=0).mean()  # a segment is more uniform in colour than the photo

    flat = np.full((SIZE, SIZE, 3), 120, dtype=np.uint8)
    assert SuperpixelMasker(MaskerOptions(SIZE, PATCH))([flat]).all()  # nothing to cut: the whole image at every level
    with pytest.raises(SettingError, match=r"^superpixel_scales='40,10,160': give three positive, increasing"):
        MaskerOptions(SIZE, PATCH, superpixel_scales=(40, 10, 160))


@pytest.mark.slow
def test_cli_writes_boxes_and_refuses_sam_options_and_bad_sizes(tmp_path, photos):
    script = REPO / "src" / "hierarchical_masks" / "patched_masks.py"
    cli = lambda *args: subprocess.run([sys.executable, str(script), "--device=cpu", f"--img_size={SIZE}", f"--patch_size={PATCH}",  # noqa: E731
                                        f"--in_data_path={photos}", f"--out_data_path={tmp_path / 'out'}", *args],
                                       capture_output=True, text=True, env=ENV, cwd=REPO, timeout=120)
    done = cli("--mask_source=boxes", "--box_sizes=8,24,56")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "patched_masks: 3 written" in done.stdout
    again = cli("--mask_source=boxes", "--box_sizes=8,24,56")  # resumed: nothing left to do
    assert "0 written, 3 skipped" in again.stdout
    for args, message in [(["--mask_source=boxes", "--box_sizes=24,8,56"], "error: --box_sizes=24,8,56: give three positive, increasing"),
                          (["--mask_source=boxes"], "error: --box_sizes=: give three"),
                          (["--mask_source=boxes", "--box_sizes=8,x,56"], "error: --box_sizes=8,x,56: give three"),
                          (["--mask_source=full_image", "--sam_checkpoint=sam_vit_h_4b8939.pth"],
                           "error: --sam_checkpoint=sam_vit_h_4b8939.pth: a SAM option, and full_image masks need no SAM"),
                          (["--mask_source=full_image", "--attention=reference"],
                           "error: --attention=reference: a SAM option, and full_image masks need no SAM"),
                          (["--box_sizes=8,24,56"], "error: --box_sizes=8,24,56: only the boxes mask source takes box sides, not SAM 1"),
                          (["--mask_source=boxes", "--box_sizes=8,24,56", "--superpixel_scales=10,40,160"],
                           "error: --superpixel_scales=10,40,160: only the superpixels mask source takes segmentation scales, not boxes"),
                          (["--mask_source=superpixels", "--superpixel_scales=10,40"], "error: --superpixel_scales=10,40: give three")]:
        refused = cli(*args, "--overwrite")
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert refused.stderr.strip().splitlines()[-1].startswith(message), refused.stderr[-500:]


def test_box_sizes_recover_known_boxes_and_cover_the_image_for_full_image_masks(tmp_path, photos):
    write_masks(photos, tmp_path / "boxes", "boxes", box_sizes=[8, 24, 56])
    sides, mask_areas, box_areas = matched_box_sizes(tmp_path / "boxes")
    assert sides == (8, 24, 56)
    np.testing.assert_allclose(box_areas, mask_areas)

    write_masks(photos, tmp_path / "full", "full_image")
    sides, mask_areas, _ = matched_box_sizes(tmp_path / "full")
    np.testing.assert_allclose(mask_areas, SIZE * SIZE)
    assert sides[0] < sides[1] < sides[2]  # equal areas: one pixel apart, as box_sizes must increase
    assert BoxMasker(MaskerOptions(SIZE, PATCH, box_sizes=sides)).masks[:, 0].all()  # the whole image from every point
    smaller = MaskerOptions(SIZE, PATCH, box_sizes=(sides[0] - 1, sides[1], sides[2]))
    assert not BoxMasker(smaller).masks[:, 0].all()  # the smallest side that does

    clipped = mean_clipped_areas(SIZE, PATCH)
    assert clipped[16] == 16 * 16 and clipped[18] == 17.5 ** 2  # 18 px boxes lose a pixel column and row at the edges
    assert np.all(np.diff(clipped) >= 0)
    with pytest.raises(InputError, match=r"^masks_path=.*no mask files"):
        matched_box_sizes(tmp_path / "nothing")


def test_box_sizes_cli_prints_the_flag_and_names_a_bad_folder(tmp_path):
    """``partwhole-box-sizes`` (as ``python -m``): the ``--box_sizes`` line for a folder of masks, one error line for an
    empty one."""
    masks = tmp_path / "masks" / "c0"
    masks.mkdir(parents=True)
    full = np.ones((16, 3, 32, 32), dtype=bool)  # every level the whole image: the largest boxes
    save_masks(masks / "img0.pkl", full, img_size=32, patch_size=8, grid=4)
    command = [sys.executable, "-m", "partwhole_cli.box_sizes"]
    done = subprocess.run([*command, f"--masks_path={tmp_path / 'masks'}"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("--box_sizes=") and len(line.split("=")[1].split(",")) == 3
    empty = tmp_path / "empty"
    empty.mkdir()
    refused = subprocess.run([*command, f"--masks_path={empty}"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and refused.stderr.strip().splitlines()[-1].startswith(f"error: --masks_path={empty}: no mask files")
