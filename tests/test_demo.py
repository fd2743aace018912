"""The toy demo end to end, reduced: every stage runs through its real CLI and the summary table appears."""

import subprocess
import sys
from pathlib import Path

import pytest

DEMO = Path(__file__).resolve().parents[1] / "src" / "demo.py"


@pytest.mark.slow
def test_reduced_demo_runs_end_to_end(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(DEMO), f"--out_dir={tmp_path / 'runs'}", f"--data_dir={tmp_path / 'data'}",
         "--train_per_class=3", "--val_per_class=1", "--pretrain_epochs=1", "--supcon_epochs=1", "--finetune_epochs=1",
         "--teacher=random", f"--readme_figure={tmp_path / 'figure.png'}"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = (tmp_path / "runs" / "summary.md").read_text()
    for row in ("| sam_distill |", "| supcon |", "| random init |", "stage-1 masks", "GT parts"):
        assert row in summary, summary
    assert "RANDOM-INIT" in summary  # said plainly
    page = tmp_path / "runs" / "islands_sam_distill" / "islands.html"
    assert page.is_file() and f"{page} (" in summary and "10 images)" in summary  # the explorer, named (10 val images)
    from PIL import Image

    with Image.open(tmp_path / "figure.png") as image:
        assert image.format == "PNG" and image.size[0] > 200
    with Image.open(tmp_path / "figure_strip.png") as strip, Image.open(tmp_path / "figure.gif") as gif:
        assert strip.format == "PNG" and gif.format == "GIF" and gif.n_frames == 7  # initial state + 6 iterations


def test_demo_refuses_the_packaged_weights_for_another_encoder_in_one_line(tmp_path):
    """The fast tier's check of the demo's wiring: flags parsed, one error line naming the flags, nothing written."""
    proc = subprocess.run([sys.executable, str(DEMO), "--encoder=resnet18", "--teacher=package", f"--out_dir={tmp_path / 'runs'}",
                           f"--data_dir={tmp_path / 'data'}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "--teacher=package" in last and "--encoder=tf_efficientnet_lite0" in last, proc.stderr[-2000:]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "data").exists()
