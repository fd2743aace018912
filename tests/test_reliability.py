"""Untrusted files and killed runs: nothing runs code, nothing is lost (stage 3 and the shared file formats)."""

import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import TINY_FLAGS, make_image_folder

from partwhole.common.errors import InputError
from partwhole.common.mask_io import (
    load_embeddings,
    load_masks,
    read_distinct_masks,
    save_embeddings,
)

MAIN = Path(__file__).resolve().parents[1] / "src" / "main.py"


class Plant:
    """A pickle whose loading would run ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant(path: Path, marker: Path, inside: str | None = None) -> None:
    """Write the payload as the whole pickle, or ``inside`` a mask record of that format (``v1``/``v2``)."""
    payload = Plant(marker)
    if inside == "v1":
        payload = {"format": "partwhole-masks/1", "shape": (4, 3, 8, 8), "packed": payload}
    elif inside == "v2":
        payload = {"format": "partwhole-masks/2", "shape": (4, 3, 8, 8), "distinct": b"", "index_dtype": "<u2", "index": payload}
    path.write_bytes(pickle.dumps(payload))


@pytest.mark.parametrize("loader, inside", [
    (load_masks, None), (load_masks, "v1"), (load_masks, "v2"), (read_distinct_masks, "v2"), (load_embeddings, None),
])
def test_malicious_pickle_is_refused_by_every_reader(tmp_path, loader, inside):
    marker, bad = tmp_path / "pwned", tmp_path / "bad.pkl"
    plant(bad, marker, inside)
    with pytest.raises(InputError, match="bad.pkl"):
        loader(bad)
    assert not marker.exists()


@pytest.mark.slow
def test_training_refuses_a_malicious_embedding(tmp_path):
    base = make_image_folder(tmp_path, per_class=2)
    marker = tmp_path / "pwned"
    plant(base / "train_masks_embeds" / "b_cls" / "img1.pkl", marker)  # not the first file: hit during training
    proc = subprocess.run([sys.executable, str(MAIN), *TINY_FLAGS, f"--data_dir={tmp_path}", "--max_epochs=1",
                           f"--output_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "img1.pkl" in last and "untrusted" in last
    assert not marker.exists()


@pytest.mark.slow
def test_malicious_checkpoint_is_refused(tmp_path):
    marker, bad = tmp_path / "pwned", tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Plant(marker)}, bad)
    proc = subprocess.run([sys.executable, str(MAIN), *TINY_FLAGS, "--mode=test", f"--load_checkpoint_dir={bad}",
                           f"--output_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "weights_only" in proc.stderr.strip().splitlines()[-1]
    assert not marker.exists()


def test_nan_embedding_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "nan.pkl"
    embeds = np.zeros((4, 3, 8), dtype=np.float32)
    embeds[1, 2, 3] = np.nan
    save_embeddings(path, embeds)
    with pytest.raises(InputError, match="nan.pkl.*NaN"):
        load_embeddings(path)


@pytest.mark.slow
def test_training_killed_mid_run_resumes_from_last_checkpoint(tmp_path):
    """SIGKILL a training run after its first checkpoint; the rerun continues at the same step and epoch."""
    make_image_folder(tmp_path, per_class=4)
    run_dir = tmp_path / "run"
    args = [sys.executable, str(MAIN), *TINY_FLAGS, f"--data_dir={tmp_path}", f"--output_dir={run_dir}", "--max_epochs=200"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while time.time() < deadline and not (last.is_file() and torch.load(last, weights_only=True)["epoch"] >= 1):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    checkpoint = torch.load(last, weights_only=True)  # not truncated: loads
    step, epoch = checkpoint["global_step"], checkpoint["epoch"]
    assert step >= 4 and epoch >= 1
    # A kill during a save may leave a temporary file beside last.ckpt (never a truncated last.ckpt);
    # the next run of the folder removes it.
    resumed = subprocess.run([*args[:-1], f"--max_epochs={epoch + 2}", "--resume_training", f"--load_checkpoint_dir={last}"],
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"(epoch {epoch}, step {step})" in resumed.stdout
    assert not list(run_dir.rglob("*.tmp"))
    after = torch.load(last, weights_only=True)
    assert after["global_step"] == 2 * (epoch + 2)  # 2 steps per epoch over epoch + 2 epochs: none lost
    import csv

    logged = [int(row["step"]) for row in csv.DictReader(open(run_dir / "logs" / "version_1" / "metrics.csv")) if row["step"]]
    assert logged and min(logged) >= step  # the resumed run logged no step before the checkpoint: none redone


@pytest.mark.slow
def test_stage2_refuses_a_malicious_mask_file(tmp_path):
    """A planted pickle among the stage-1 masks: stage 2 stops with an error naming it, and no code runs."""
    from PIL import Image

    from partwhole.common.mask_io import save_masks

    images, masks_root, marker = tmp_path / "images", tmp_path / "masks", tmp_path / "pwned"
    for i in range(2):
        path = images / "cls" / f"im{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(path)
    save_masks(masks_root / "cls" / "im0.pkl", np.ones((4, 3, 32, 32), bool), grid=2, img_size=32, patch_size=16)
    (masks_root / "cls").mkdir(parents=True, exist_ok=True)
    plant(masks_root / "cls" / "im1.pkl", marker)
    script = Path(__file__).resolve().parents[1] / "src" / "hierarchical_masks" / "masks_to_embeds.py"
    proc = subprocess.run([sys.executable, str(script), "--device=cpu", f"--in_masks_path={masks_root}",
                           f"--in_images_path={images}", f"--out_data_path={tmp_path / 'embeds'}",
                           "--encoder_model_name=test_convnext", "--pretrained=False", "--img_height=32",
                           "--img_width=32", "--progress=False"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "im1.pkl" in last and "Traceback" not in proc.stderr
    assert not marker.exists()


def test_a_best_checkpoint_replaced_during_a_kill_falls_back_to_last(tmp_path):
    """Killed between the two checkpoint saves of an epoch's end, last.ckpt names a best file that is gone: the test
    after a resumed run uses last.ckpt instead of failing on the missing file."""
    from types import SimpleNamespace

    from partwhole.agglomerator.engine import checkpoint_paths

    last = tmp_path / "last.ckpt"
    last.write_bytes(b"")
    best = tmp_path / "best-005.ckpt"
    trainer = SimpleNamespace(checkpoint_callbacks=[SimpleNamespace(monitor=None, best_model_path=str(last)),
                                                    SimpleNamespace(monitor="val/loss", best_model_path=str(best))])
    assert checkpoint_paths(trainer) == (str(last), str(last))
    best.write_bytes(b"")
    assert checkpoint_paths(trainer) == (str(best), str(last))
