"""Stage 2 (masks_to_embeds): fast path == reference PIL path, files, resume, processes, bad input.

Tiny on purpose: 32x32 images, a 2x2 point grid (12 masked images per image),
timm ``test_*`` models and a small real backbone (lcnet_050) with fixed random
weights read from a local checkpoint file; resnet18 and the paper's
maxvit_rmlp_pico_rw_256 run in the slow tests.
"""

from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from partwhole.common.errors import InputError, SettingError
from partwhole.common.image_folders import load_rgb_image
from partwhole.common.mask_io import load_embeddings, read_distinct_masks, save_masks
from partwhole.common.safe_files import safe_pickle_load
from partwhole.embeds import embed_folder as ef
from partwhole.embeds.eval_transform import BatchedEvalTransform
from partwhole.embeds.mask_embedding import (
    MaskedImageEncoder,
    build_encoder,
    distinct_masks,
    embed_image_reference,
    masked_pil_image,
    reference_transform,
    unpack_masks,
)

REPO = Path(__file__).resolve().parents[1]
CLI = REPO / "src" / "hierarchical_masks" / "masks_to_embeds.py"
SIZE = 32  # --img_height = --img_width in these tests
GRID = 2
MODEL = "test_vit"


# --------------------------------------------------------------------------- fixtures


def make_image(seed: int, size=(48, 40)) -> Image.Image:
    """A smooth random RGB image (random 6x6 colours, bicubic upsampled)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    return small.resize(size, Image.BICUBIC)


def make_masks(seed: int, grid: int = GRID, height: int = SIZE, width: int = SIZE) -> np.ndarray:
    """Nested masks ``(grid*grid, 3, H, W)`` around each grid point, like SAM's levels 0 < 1 < 2.

    Level 0 is a small box, level 1 a larger box, level 2 the larger box plus
    random pixels. The first point's level 0 is empty, the last point's level 2 full.
    """
    rng = np.random.default_rng(seed)
    n = grid * grid
    masks = np.zeros((n, 3, height, width), bool)
    for k in range(n):
        cy, cx = (k // grid + 0.5) * height / grid, (k % grid + 0.5) * width / grid
        for level, half in enumerate((2, 6, 10)):
            hy, hx = half + rng.integers(0, 3), half + rng.integers(0, 3)
            masks[k, level, max(0, int(cy - hy)) : int(cy + hy), max(0, int(cx - hx)) : int(cx + hx)] = True
        masks[k, 2] |= rng.random((height, width)) < 0.1
    masks[0, 0] = False
    masks[-1, 2] = True
    return masks


def write_masks(path: Path, masks: np.ndarray, mask_format: str = "v2", **meta) -> None:
    """Save ``masks`` in our format ``v2``/``v1`` or the reference's (a pickled list of ``(3, H, W)`` arrays)."""
    if mask_format == "reference":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps([m for m in masks]))
    else:
        save_masks(path, masks, mask_format=mask_format, **meta)


def make_dataset(root: Path, classes=("cat", "dog"), per_class: int = 2, mask_format: str = "v2"):
    """``root/images/<class>/<img>`` and ``root/masks/<class>/<stem>.pkl``; returns (images, masks, out)."""
    images, masks_root = root / "images", root / "masks"
    seed = 0
    for name in classes:
        (images / name).mkdir(parents=True)
        for i in range(per_class):
            seed += 1
            stem = f"{name}_{i}"
            make_image(seed).save(images / name / f"{stem}.png")
            write_masks(masks_root / name / f"{stem}.pkl", make_masks(seed), mask_format,
                        grid=GRID, img_size=SIZE, patch_size=SIZE // GRID, levels=3)
    return images, masks_root, root / "embeds"


def fixed_weights_file(folder: Path, model_name: str) -> Path:
    """``model_name`` with fixed (seeded) random weights, saved as a local state dict."""
    torch.manual_seed(1234)
    model = timm.create_model(model_name, pretrained=False)  # with its classifier head, like a real file
    path = folder / f"{model_name}_fixed.pth"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def real_checkpoint(tmp_path_factory) -> Path:
    return fixed_weights_file(tmp_path_factory.mktemp("weights"), "lcnet_050")


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def config(images, masks, out, **kw) -> ef.EmbedFolderConfig:
    kw = {"encoder_model_name": MODEL, "pretrained": False, "img_height": SIZE, "img_width": SIZE,
          "batch_size": 5, "progress": False, **kw}
    return ef.EmbedFolderConfig(in_masks_path=masks, in_images_path=images, out_data_path=out, **kw)


def run_stage(cfg) -> str:
    return ef.embed_folder(cfg, ef.check_inputs(cfg))


def outputs(out: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(out)): load_embeddings(p) for p in sorted(out.rglob("*.pkl"))}


# --------------------------------------------------------------------------- the maths


@pytest.mark.parametrize("model_name", ["test_vit", "resnet18"])
@pytest.mark.parametrize("crop", [False, True])
def test_batched_transform_equals_pil_transform(model_name, crop):
    """Pixel level: the batched transform is timm's PIL transform but for rare float32 rounding flips."""
    model = timm.create_model(model_name, pretrained=False, num_classes=0)
    pil_transform = reference_transform(model)
    batched = BatchedEvalTransform.from_timm(pil_transform)
    assert batched is not None
    for height, width in ((SIZE, SIZE), (40, 28), (200, 180)):  # the last one shrinks (antialiased kernel)
        image = np.array(make_image(7, (width, height)))
        masks = make_masks(3, height=height, width=width).reshape(-1, height, width)
        ours = batched(torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(masks), crop=crop)
        ref = torch.stack([pil_transform(masked_pil_image(image, m, crop)) for m in masks])
        assert ours.shape == ref.shape
        steps = (ours - ref).abs() * 255 * torch.tensor(batched.std).view(1, 3, 1, 1)  # in 8-bit units
        assert steps.max() <= 2.001  # a flipped rounding in Pillow's first pass can add up in the second
        assert (steps > 0.01).float().mean() < 2e-3


@pytest.mark.parametrize("mask_format", ["v2", "v1", "reference"])
def test_distinct_masks_unpack_on_the_device_side(tmp_path, mask_format):
    masks = make_masks(9, height=13, width=11)  # sizes that are not multiples of 8
    masks[1] = masks[0]  # a repeated point: stored once
    path = tmp_path / "m.pkl"
    write_masks(path, masks, mask_format, grid=GRID)
    stored = read_distinct_masks(path)
    assert stored.shape == masks.shape and stored.index.shape == (GRID * GRID, 3)
    assert stored.num_distinct == len(np.unique(masks.reshape(-1, 13 * 11), axis=0)) < 12
    assert (stored.index[1] == stored.index[0]).all()
    if mask_format != "reference":
        assert stored.meta["grid"] == GRID
    unpacked = unpack_masks(torch.from_numpy(stored.bits.copy()), 13, 11)
    assert unpacked.dtype == torch.bool
    np.testing.assert_array_equal(unpacked.numpy()[stored.index], masks)
    # every format gives the same distinct masks in the same order (so stage 2 computes the same)
    write_masks(tmp_path / "v2.pkl", masks, "v2")
    again = read_distinct_masks(tmp_path / "v2.pkl")
    np.testing.assert_array_equal(stored.bits, again.bits)
    np.testing.assert_array_equal(stored.index, again.index)


def _encoder(name: str, checkpoint: Path | None):
    if checkpoint is None:
        return build_encoder(name, pretrained=False)
    return build_encoder(name, checkpoint=checkpoint)


@pytest.mark.parametrize("crop", [False, True], ids=["nocrop", "crop"])
@pytest.mark.parametrize("model_name, precision", [
    ("test_vit", "fp32"), ("test_vit", "bf16"), ("test_efficientnet", "fp32"), ("test_efficientnet", "bf16"),
    ("lcnet_050", "fp32"), pytest.param("lcnet_050", "bf16", marks=pytest.mark.slow),  # bf16 depthwise convs are slow on CPU
])
def test_fast_path_matches_reference_path(model_name, precision, crop, real_checkpoint):
    """Every embedding of the fast path has cosine >= 0.99 with the reference per-image PIL path."""
    model = _encoder(model_name, real_checkpoint if model_name == "lcnet_050" else None)
    transform = reference_transform(model)
    images = [make_image(s).resize((SIZE, SIZE), Image.BICUBIC) for s in (1, 2)]
    masks = [make_masks(s) for s in (1, 2)]
    reference = [embed_image_reference(model, transform, im, m, crop=crop) for im, m in zip(images, masks)]

    encoder = MaskedImageEncoder(model, crop=crop, batch_size=5, precision=precision)  # 5: batches span images
    items = [(i, torch.from_numpy(np.array(im)).permute(2, 0, 1), *distinct_masks(torch.from_numpy(m))) for i, (im, m) in enumerate(zip(images, masks))]
    fast = dict(encoder.embed_stream(items))

    for i, ref in enumerate(reference):
        assert fast[i].shape == ref.shape == (GRID * GRID, 3, model(torch.zeros(1, 3, 64, 64)).shape[-1])
        assert fast[i].dtype == np.float32
        assert cosine(fast[i], ref).min() >= 0.99
    # not a vacuous check: different masks give clearly different embeddings
    flat = reference[0].reshape(-1, reference[0].shape[-1])
    assert cosine(flat[1:], flat[:-1]).min() < 0.99


@pytest.mark.slow
@pytest.mark.parametrize("crop", [False, True], ids=["nocrop", "crop"])
@pytest.mark.parametrize("model_name", ["resnet18", "maxvit_rmlp_pico_rw_256"])
def test_fast_path_matches_reference_path_bigger_backbones(model_name, crop, tmp_path):
    """resnet18 and the paper's architecture (fixed random weights): fast path vs reference, bf16 as on a GPU."""
    model = build_encoder(model_name, checkpoint=fixed_weights_file(tmp_path, model_name))
    image, masks = make_image(5).resize((SIZE, SIZE), Image.BICUBIC), make_masks(5)[:2]
    ref = embed_image_reference(model, reference_transform(model), image, masks, crop=crop)
    fast = MaskedImageEncoder(model, crop=crop, batch_size=6, precision="bf16").embed(image, masks)
    assert cosine(fast, ref).min() >= 0.99


# --------------------------------------------------------------------------- the folder run


def test_folder_run_writes_one_array_per_image_and_resumes(tmp_path, capsys):
    images, masks, out = make_dataset(tmp_path)
    cfg = config(images, masks, out)
    run_stage(cfg)
    files = outputs(out)
    assert sorted(files) == ["cat/cat_0.pkl", "cat/cat_1.pkl", "dog/dog_0.pkl", "dog/dog_1.pkl"]
    for arr in files.values():
        assert arr.shape == (GRID * GRID, 3, 64) and arr.dtype == np.float32
    raw = safe_pickle_load(out / "cat" / "cat_0.pkl")
    assert isinstance(raw, np.ndarray) and raw.dtype == np.float32  # reference format: a bare array

    # equal to the reference path, file by file
    model = build_encoder(MODEL, pretrained=False)
    image = load_rgb_image(images / "dog" / "dog_1.png", (SIZE, SIZE))
    ref = embed_image_reference(model, reference_transform(model), image, make_masks(4))
    assert cosine(files["dog/dog_1.pkl"], ref).min() >= 0.99

    # rerun: nothing recomputed, files untouched
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.pkl")}
    capsys.readouterr()
    line = run_stage(cfg)
    assert "0 written, 4 skipped" in line
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.pkl")} == mtimes

    # a half-finished run (one file gone): only that one is recomputed
    (out / "dog" / "dog_0.pkl").unlink()
    assert "1 written, 3 skipped" in run_stage(cfg)
    assert not list(out.rglob("*.tmp"))

    # --overwrite recomputes everything
    for p in mtimes:
        os.utime(p, ns=(1, 1))
    assert "4 written, 0 skipped" in run_stage(config(images, masks, out, overwrite=True))
    assert all(p.stat().st_mtime_ns != 1 for p in mtimes)


def test_float16_output(tmp_path):
    images, masks, out = make_dataset(tmp_path, per_class=1)
    run_stage(config(images, masks, out, embed_dtype="float16"))
    raw = safe_pickle_load(out / "cat" / "cat_0.pkl")
    assert raw.dtype == np.float16 and raw.shape == (GRID * GRID, 3, 64)
    run_stage(config(images, masks, tmp_path / "f32"))
    np.testing.assert_allclose(raw.astype(np.float32), load_embeddings(tmp_path / "f32" / "cat" / "cat_0.pkl"), rtol=2e-3, atol=2e-3)


def test_float16_overflow_is_refused_naming_the_image_and_mask(tmp_path):
    """An encoder whose features exceed float16's range: no file holding inf, a one-line error saying why."""
    images, masks, out = make_dataset(tmp_path, per_class=1)
    torch.manual_seed(0)
    weights = timm.create_model(MODEL, pretrained=False).state_dict()
    weights["norm.weight"] *= 1e6  # the pooled features: finite in float32, far beyond 65504
    weights["norm.bias"] *= 1e6
    torch.save(weights, tmp_path / "loud.pth")
    with pytest.raises(SettingError, match=r"^embed_dtype='float16': .*cat_0\.png: the mask of point \d+, level \d.* beyond float16's 65504.*rerun with float32"):
        run_stage(config(images, masks, out, embed_dtype="float16", encoder_checkpoint=tmp_path / "loud.pth"))
    assert not list(out.rglob("*.pkl"))  # the first image is refused: nothing written
    run_stage(config(images, masks, out, embed_dtype="float32", encoder_checkpoint=tmp_path / "loud.pth"))
    assert np.abs(load_embeddings(out / "cat" / "cat_0.pkl")).max() > 65504  # float32 holds them


def test_every_mask_format_gives_the_same_embeddings(tmp_path):
    """v2, v1 and the reference's pickled lists: bit-identical embeddings (the same distinct masks, the same batches)."""
    runs = {fmt: make_dataset(tmp_path / fmt, per_class=1, mask_format=fmt) for fmt in ("v2", "v1", "reference")}
    assert isinstance(safe_pickle_load(runs["reference"][1] / "cat" / "cat_0.pkl"), list)
    for images, masks, out in runs.values():
        run_stage(config(images, masks, out, crop=True))
    results = {fmt: outputs(out) for fmt, (_, _, out) in runs.items()}
    assert sorted(results["v2"]) == sorted(results["v1"]) == sorted(results["reference"])
    for key, embeds in results["v2"].items():
        np.testing.assert_array_equal(embeds, results["v1"][key])
        np.testing.assert_array_equal(embeds, results["reference"][key])


def test_checkpoint_file_weights_are_used(real_checkpoint):
    saved = torch.load(real_checkpoint, weights_only=True)
    assert any(key.startswith("classifier.") for key in saved)
    model = build_encoder("lcnet_050", checkpoint=real_checkpoint)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[key])
    assert not any(key.startswith("classifier.") for key in model.state_dict())  # the file's head is dropped


def test_random_weights_warn_loudly(caplog):
    with caplog.at_level("WARNING"):
        build_encoder(MODEL, pretrained=False)
    assert "NOT the paper's" in caplog.text


# --------------------------------------------------------------------------- bad input


def test_missing_masks_are_an_error_or_skipped(tmp_path):
    images, masks, out = make_dataset(tmp_path)
    (masks / "cat" / "cat_1.pkl").unlink()
    (masks / "dog" / "dog_0.pkl").unlink()
    with pytest.raises(SettingError, match=r"^in_masks_path=.*: 2 of 4 images have no mask file there .*cat_1\.pkl.*dog_0\.pkl.*skip_missing"):
        ef.check_inputs(config(images, masks, out))
    run_stage(config(images, masks, out, skip_missing=True))
    assert sorted(outputs(out)) == ["cat/cat_0.pkl", "dog/dog_1.pkl"]
    failed = (out / "failed.txt").read_text()
    assert "cat_1.png" in failed and "dog_0.png" in failed
    run_stage(config(images, masks, out, skip_missing=True))  # a rerun lists each failure once
    assert (out / "failed.txt").read_text() == failed


@pytest.mark.parametrize("mask_format", ["v2", "v1"])
def test_mask_size_or_levels_mismatch_names_the_file(tmp_path, mask_format):
    images, masks, out = make_dataset(tmp_path, per_class=1, mask_format=mask_format)
    with pytest.raises(InputError, match=r"cat_0\.pkl: masks are 32x32 .* img_height=48, img_width=32"):
        ef.check_inputs(config(images, masks, out, img_height=48))
    bad = masks / "dog" / "dog_0.pkl"
    save_masks(bad, make_masks(1)[:, :2], mask_format=mask_format, grid=GRID)  # 2 levels
    with pytest.raises(InputError, match=r"dog_0\.pkl: masks have 2 levels, expected 3"):
        run_stage(config(images, masks, out))
    assert (out / "cat" / "cat_0.pkl").is_file()  # written before the bad file: kept
    save_masks(bad, make_masks(1)[:3], mask_format=mask_format, grid=GRID)  # 3 points on a 2x2 grid
    with pytest.raises(InputError, match=r"dog_0\.pkl: 3 masks per level but the file's grid is 2x2"):
        run_stage(config(images, masks, out))
    run_stage(config(images, masks, out, skip_bad_images=True))
    assert "dog_0.png" in (out / "failed.txt").read_text()


def test_class_folders_must_match(tmp_path):
    images, masks, out = make_dataset(tmp_path, per_class=1)
    (masks / "dog").rename(masks / "bird")
    with pytest.raises(InputError, match=r"class folders differ: .*\[cat, dog\] but .*\[bird, cat\]"):
        ef.check_inputs(config(images, masks, out))


def test_unknown_model_name_suggests_close_matches():
    with pytest.raises(InputError, match=r"not a timm model; close matches: .*maxvit_rmlp_pico_rw_256"):
        build_encoder("maxvit_rmlp_pico_rw256", pretrained=False)


def test_checkpoint_that_does_not_fit_is_an_error(tmp_path, real_checkpoint):
    with pytest.raises(InputError, match=r"^encoder_checkpoint=.*lcnet_050_fixed\.pth': weights do not fit"):
        build_encoder("test_resnet", checkpoint=real_checkpoint)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=r"^encoder_checkpoint=.*garbage\.pth': cannot read weights"):
        build_encoder(MODEL, checkpoint=garbage)


# --------------------------------------------------------------------------- the CLI


def run_cli(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(CLI), *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_cli_bad_input_is_one_line_error_naming_the_flag(tmp_path):
    """A library :class:`SettingError` names the field (``in_masks_path``); the command line names its flag."""
    images, masks, out = make_dataset(tmp_path, per_class=1)
    (masks / "dog" / "dog_0.pkl").unlink()
    with pytest.raises(SettingError) as refused:
        ef.check_inputs(config(images, masks, out))
    assert (refused.value.setting, str(refused.value.value)) == ("in_masks_path", str(masks))
    with pytest.raises(SettingError, match="^img_height=0: must be a positive number of pixels"):
        config(images, masks, out, img_height=0)
    result = run_cli(f"--in_masks_path={masks}", f"--in_images_path={images}", f"--out_data_path={out}",
                     "--encoder_model_name=test_vit", "--pretrained=False", f"--img_height={SIZE}", f"--img_width={SIZE}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: --in_masks_path={masks}: 1 of 2 images have no mask file there")
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_cli_two_processes_split_the_images(tmp_path):
    images, masks, out = make_dataset(tmp_path, per_class=3)
    result = run_cli(f"--in_masks_path={masks}", f"--in_images_path={images}", f"--out_data_path={out}",
                     "--encoder_model_name=test_vit", "--pretrained=False", f"--img_height={SIZE}", f"--img_width={SIZE}",
                     "--device=cpu", "--num_processes=2", "--batch_size=7", "--crop", "--noprogress")
    assert result.returncode == 0, result.stderr[-3000:]
    summaries = re.findall(r"masks_to_embeds(?: \[rank 1\])?: (\d+) written", result.stdout)
    assert sorted(summaries) == ["3", "3"], result.stdout
    split = outputs(out)
    assert len(split) == 6
    run_stage(config(images, masks, tmp_path / "single", crop=True))
    single = outputs(tmp_path / "single")
    assert sorted(single) == sorted(split)
    for key in single:
        assert cosine(split[key], single[key]).min() >= 0.999  # bf16: batches and threads differ


@pytest.mark.slow
def test_cli_two_nodes_by_hand_split_the_images(tmp_path):
    """``--num_nodes=2`` with MASTER_ADDR, MASTER_PORT and NODE_RANK per node, as on two machines (here one)."""
    import socket

    images, masks, out = make_dataset(tmp_path, per_class=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = [sys.executable, str(CLI), f"--in_masks_path={masks}", f"--in_images_path={images}", f"--out_data_path={out}",
            "--encoder_model_name=test_vit", "--pretrained=False", f"--img_height={SIZE}", f"--img_width={SIZE}",
            "--device=cpu", "--num_nodes=2", "--noprogress"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    nodes = [subprocess.Popen(args, env={**env, "NODE_RANK": str(rank)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for rank in (0, 1)]
    outputs_of_nodes = [node.communicate(timeout=240) for node in nodes]
    for node, (stdout, stderr) in zip(nodes, outputs_of_nodes):
        assert node.returncode == 0, stderr[-3000:]
    written = [int(n) for stdout, _ in outputs_of_nodes for n in re.findall(r"masks_to_embeds(?: \[rank 1\])?: (\d+) written", stdout)]
    assert sorted(written) == [2, 2], outputs_of_nodes
    assert len(outputs(out)) == 4


@pytest.mark.slow
def test_cli_killed_run_resumes_without_truncated_files(tmp_path):
    images, masks, out = make_dataset(tmp_path, per_class=6)
    args = [str(CLI), f"--in_masks_path={masks}", f"--in_images_path={images}", f"--out_data_path={out}",
            "--encoder_model_name=test_vit", "--pretrained=False", f"--img_height={SIZE}", f"--img_width={SIZE}",
            "--device=cpu", "--batch_size=1", "--noprogress"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 120
        while not list(out.rglob("*.pkl")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        proc.kill()  # SIGKILL: no clean-up runs
        proc.wait()
    done = sorted(out.rglob("*.pkl"))
    assert done, "the run wrote nothing before it was killed"
    for path in done:  # every file there is whole
        assert load_embeddings(path).shape == (GRID * GRID, 3, 64)
    result = run_cli(*args[1:])
    assert result.returncode == 0, result.stderr[-2000:]
    written, skipped = map(int, re.search(r"(\d+) written, (\d+) skipped", result.stdout).groups())
    assert skipped == len(done) and written + skipped == 12
    assert len(outputs(out)) == 12


def test_shared_masks_are_embedded_once_and_scattered_back():
    """Points with the same mask (a whole object, the background) get the same embedding, computed once."""
    import timm

    from partwhole.embeds.mask_embedding import MaskedImageEncoder

    torch.manual_seed(0)
    model = timm.create_model("test_convnext", pretrained=False, num_classes=0).eval()
    encoder = MaskedImageEncoder(model, device="cpu", batch_size=8, precision="fp32")
    image = (torch.rand(3, 32, 32) * 255).to(torch.uint8)
    masks = torch.zeros(4, 3, 32, 32, dtype=torch.bool)
    masks[:, 0, :16] = True  # one mask shared by every point at level 0
    masks[:, 1, 8:24, 8:24] = True  # and at level 1
    masks[:2, 2, :, :16] = True  # two distinct level-2 masks
    masks[2:, 2, :, 16:] = True
    embeds = encoder.embed(image, masks)
    assert encoder.masked_images == 4  # distinct masks, not 12
    assert embeds.shape == (4, 3, model.num_features)
    np.testing.assert_array_equal(embeds[0, 0], embeds[3, 0])
    np.testing.assert_array_equal(embeds[1, 2], embeds[0, 2])
    assert not np.allclose(embeds[0, 2], embeds[2, 2])
    single = encoder.embed(image, masks[2:3])
    np.testing.assert_allclose(single[0], embeds[2], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- CPU allocator

ALLOCATION_PROBE = """
import resource, sys
import numpy as np
from partwhole.common.processes import keep_freed_memory
if {keep}:
    assert keep_freed_memory(), "mallopt refused"
def faults_of_one_allocation():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    np.ones(64 * 2**20 // 8)  # 64 MB from malloc, written, then freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_allocation()
print(min(faults_of_one_allocation() for _ in range(3)))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings")
@pytest.mark.slow
def test_keep_freed_memory_reuses_large_blocks_without_page_faults():
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
    env["NUMPY_MADVISE_HUGEPAGE"] = "0"  # 4 KB pages: the faults count what malloc does

    def faults(keep: bool) -> int:
        code = ALLOCATION_PROBE.format(keep=keep)
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr
        return int(done.stdout.split()[-1])

    default, kept = faults(False), faults(True)
    if default < 100:
        pytest.skip(f"this system maps a 64 MB block with {default} page faults: nothing to save")
    assert kept < default / 10, (default, kept)  # glibc's default: a fresh mmap (and its page faults) per allocation
