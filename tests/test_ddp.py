"""Stage 3 on several processes (DDP over gloo on CPU): what two processes give is what one gives.

Every test runs ``src/main.py`` as a user would, with ``--num_processes=2`` (or two "nodes" on this
machine), on a tiny image folder whose val split carries stage-1 masks (so the islands scores run too).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fakes import TINY_FLAGS, make_image_folder

from partwhole.common.mask_io import save_masks

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "src" / "main.py"
TRAIN_IMAGES = 12  # 6 per class


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp_data")
    base = make_image_folder(root, per_class=TRAIN_IMAGES // 2, num_patches=16)
    rng = np.random.default_rng(0)
    for name in ("a_cls", "b_cls"):
        for i in range(TRAIN_IMAGES // 2):
            save_masks(base / "val_masks" / name / f"img{i}.pkl", part_whole_masks(rng))
    for path in (base / "val" / "b_cls" / "img5.JPEG", base / "val_masks_embeds" / "b_cls" / "img5.pkl",
                 base / "val_masks" / "b_cls" / "img5.pkl"):
        path.unlink()  # 11 val images: two processes' shards differ by one (no image may count twice)
    return root


def part_whole_masks(rng) -> np.ndarray:
    """Masks of 4x4 points on a 32-px image: a random quadrant split (level 0), left or right half, whole image."""
    masks = np.zeros((16, 3, 32, 32), bool)
    cut = rng.integers(8, 24, size=2)
    for point in range(16):
        y, x = (point // 4) * 8 + 4, (point % 4) * 8 + 4
        rows = slice(0, cut[0]) if y < cut[0] else slice(cut[0], 32)
        cols = slice(0, cut[1]) if x < cut[1] else slice(cut[1], 32)
        masks[point, 0, rows, cols] = True
        masks[point, 1, :, cols] = True
        masks[point, 2] = True
    return masks


def flags(data_dir, out: Path, *extra) -> list[str]:
    # 4x4 columns (the islands' clustering needs more columns than segments; 2x2 would skip it)
    return [*TINY_FLAGS, "--patch_size=2", f"--data_dir={data_dir}", f"--output_dir={out}", "--logger=csv", *extra]


def run_main(args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(MAIN), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def final_lines(proc: subprocess.CompletedProcess, start: str) -> list[str]:
    return [line for line in proc.stdout.splitlines() if line.startswith(start)]


def assert_same_metrics(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        if key.endswith("accuracy"):
            assert got[key] == value, key  # whole images: exactly
        else:
            assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def processes_of(run: Path) -> list[int]:
    """Live processes whose command line names ``run`` (the launcher and the processes it started)."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(run).encode() in (proc / "cmdline").read_bytes():
                    state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state != "Z":
                        found.append(int(proc.name))
            except OSError:
                pass
    return found


def wait_for(path: Path, proc: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while not path.is_file():
        assert proc.poll() is None, f"ended early ({proc.returncode}): " + proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"no {path} after {seconds} s"
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- what DDP needs of the module


@pytest.mark.parametrize("objective, finetune_backbone", [("sam_distill", False), ("supcon", False),
                                                         ("classify", False), ("classify", True)])
def test_every_parameter_an_objective_trains_gets_a_gradient(objective, finetune_backbone):
    """DDP (without find_unused_parameters) fails at the second step when a trainable parameter got no gradient:
    the heads of the other objectives must be frozen, the model keeping them (and the reference's names)."""
    from partwhole.agglomerator.lit_module import AgglomeratorLitModule

    model = dict(image_size=32, conv_image_size=8, patch_size=4, patch_dim=32, levels=3, n_classes=2,
                 levels_encoder=True, levels_encoder_dim=32, contrastive_head=True, contr_dim=8)
    module = AgglomeratorLitModule(model=model, objective=objective, finetune_backbone=finetune_backbone,
                                   scheduler="constant")
    images = torch.rand(4, 2, 3, 32, 32) if objective == "supcon" else torch.rand(4, 3, 32, 32)
    batch = {"image": images, "label": torch.tensor([0, 1, 0, 1]), "embeds": torch.randn(4, 4, 3, 32)}
    if objective == "sam_distill":
        module.objective.fit_targets(torch.randn(8, 4, 3, 32).numpy())
    module.train()
    module.shared_step(batch, "train")["loss"].backward()
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert trainable and {name for name, p in module.named_parameters() if p.grad is not None} == trainable
    names = {name for name, _ in module.model.named_parameters()}
    for head in ("contrastive_head.", "classification_head_from_last_level.", "levels_encoder."):  # kept, by name
        assert any(name.startswith(head) for name in names), head
    assert sum(p.numel() for p in module.configure_optimizers().param_groups[0]["params"]) == sum(
        p.numel() for name, p in module.named_parameters()
        if finetune_backbone or objective != "classify" or name.startswith("model.classification_head")
        or name.startswith("model.contrastive_head"))  # what earlier versions optimised: their checkpoints resume


# --------------------------------------------------------------------------- two processes, one run


@pytest.mark.slow
def test_sam_distill_on_two_processes_writes_once_what_one_process_tests(data_dir, tmp_path):
    run = tmp_path / "pre"
    proc = ok(run_main(flags(data_dir, run, "--num_processes=2", "--max_epochs=2")))
    lines = final_lines(proc, "train (sam_distill)")
    assert len(lines) == 1 and "2 epochs, 4 steps" in lines[0], proc.stdout[-2000:]  # 6 images a process, batch 4
    got = results(run)
    assert got["processes"] == 2 and got["steps"] == 4
    assert {"test/islands_ari_L1", "test/distill_r2", "test/image_mean_r2", "test/loss"} <= set(got["test"])
    assert len(list((run / "logs").glob("version_*/metrics.csv"))) == 1
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "last.ckpt"

    alone = tmp_path / "test"
    ok(run_main(flags(data_dir, alone, "--mode=test", f"--load_checkpoint_dir={got['best']}")))
    assert_same_metrics(got["test"], results(alone)["test"])
    split = tmp_path / "test2"
    tested = ok(run_main(flags(data_dir, split, "--mode=test", "--num_processes=2", f"--load_checkpoint_dir={got['best']}")))
    assert len(final_lines(tested, "test (sam_distill)")) == 1 and results(split)["processes"] == 2
    assert_same_metrics(results(split)["test"], results(alone)["test"])


@pytest.mark.slow
def test_supcon_and_fine_tuning_train_on_two_processes(data_dir, tmp_path):
    supcon = ok(run_main(flags(data_dir, tmp_path / "supcon", "--num_processes=2", "--max_epochs=2",
                               "--pretrain_objective=supcon")))
    assert len(final_lines(supcon, "train (supcon)")) == 1, supcon.stdout[-2000:]
    backbone = results(tmp_path / "supcon")["last"]
    for name, extra in (("frozen", []), ("whole", ["--finetune_backbone"])):
        run = tmp_path / name
        fine = ok(run_main(flags(data_dir, run, "--num_processes=2", "--max_epochs=2", "--supervise", "--resume_training",
                                 f"--load_checkpoint_dir={backbone}", *extra)))
        assert len(final_lines(fine, "train (classify)")) == 1, fine.stdout[-2000:]
        got = results(run)
        alone = tmp_path / f"{name}_test"
        ok(run_main(flags(data_dir, alone, "--mode=test", f"--load_checkpoint_dir={got['best']}")))
        assert_same_metrics(got["test"], results(alone)["test"])


@pytest.mark.slow
def test_two_processes_at_half_the_batch_take_the_steps_of_one(data_dir, tmp_path):
    one = tmp_path / "one"
    two = tmp_path / "two"
    ok(run_main(flags(data_dir, one, "--max_epochs=3", "--batch_size=4")))
    ok(run_main(flags(data_dir, two, "--max_epochs=3", "--batch_size=2", "--num_processes=2")))
    assert results(one)["steps"] == results(two)["steps"] == 3 * TRAIN_IMAGES // 4
    losses = [torch.load(r / "checkpoints" / "last.ckpt", weights_only=True) for r in (one, two)]
    assert [c["global_step"] for c in losses] == [9, 9]
    # Not equal: other shuffles, and BatchNorm statistics per process. Measured here: 1.0192 against 1.0202, where
    # one process's seeds 42, 43, 44 give 1.0192, 1.0197, 1.0207 (README, "Several GPUs or nodes").
    val = [results(r)["test"]["test/loss"] for r in (one, two)]
    assert abs(val[0] - val[1]) < 0.005, val


@pytest.mark.slow
def test_a_checkpoint_resumes_on_another_number_of_processes(data_dir, tmp_path):
    for first, then in ((2, 1), (1, 2)):
        run = tmp_path / f"from{first}"
        ok(run_main(flags(data_dir, run, f"--num_processes={first}", "--batch_size=2", "--max_epochs=1")))
        last = run / "checkpoints" / "last.ckpt"
        step = torch.load(last, weights_only=True)["global_step"]
        assert step == TRAIN_IMAGES // (2 * first)
        resumed = ok(run_main(flags(data_dir, run, f"--num_processes={then}", "--batch_size=2", "--max_epochs=2",
                                    "--resume_training", f"--load_checkpoint_dir={last}")))
        assert f"(epoch 0, step {step})" in resumed.stdout
        checkpoint = torch.load(last, weights_only=True)
        assert checkpoint["epoch"] == 1 and checkpoint["global_step"] == step + TRAIN_IMAGES // (2 * then)


@pytest.mark.slow
def test_two_nodes_by_hand(data_dir, tmp_path):
    """``--num_nodes=2`` with MASTER_ADDR, MASTER_PORT and NODE_RANK, as on two machines (here one)."""
    run = tmp_path / "nodes"
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    args = [sys.executable, str(MAIN), *flags(data_dir, run, "--num_nodes=2", "--max_epochs=2")]
    node1 = subprocess.Popen(args, env={**os.environ, **env, "NODE_RANK": "1"}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    node0 = ok(run_main(args[2:], env={**env, "NODE_RANK": "0"}))
    out1, err1 = node1.communicate(timeout=120)
    assert node1.returncode == 0, err1[-3000:]
    assert len(final_lines(node0, "train (sam_distill)")) == 1 and not final_lines(
        subprocess.CompletedProcess([], 0, out1, err1), "train (")
    assert results(run)["processes"] == 2 and results(run)["steps"] == 4


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
@pytest.mark.slow
def test_a_stop_signal_to_the_launching_process_saves_and_stops_every_process(data_dir, tmp_path, signum):
    run = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, str(MAIN), *flags(data_dir, run, "--num_processes=2", "--max_epochs=1000")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(run / "checkpoints" / "last.ckpt", proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err[-3000:]
    stops = [line for line in err.splitlines() if line.startswith(f"train: stopped by {signal.Signals(signum).name}")]
    assert len(stops) == 1 and "saved" in stops[0] and "resume with:" in stops[0], err[-3000:]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] >= 2
    time.sleep(1)
    assert processes_of(run) == []


@pytest.mark.slow
def test_a_killed_process_ends_the_run_with_one_line(data_dir, tmp_path):
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(MAIN), *flags(data_dir, run, "--num_processes=2", "--max_epochs=1000")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(run / "checkpoints" / "last.ckpt", proc)
    helpers = [pid for pid in processes_of(run) if pid != proc.pid]
    assert len(helpers) == 1
    killed = time.monotonic()
    os.kill(helpers[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert time.monotonic() - killed < 60 and proc.returncode not in (0, None)
    assert "error: another process of this run died or stopped answering" in err, err[-3000:]
    assert "resume from its last checkpoint" in err
    time.sleep(1)
    assert processes_of(run) == []


@pytest.mark.parametrize("processes", [1, 2])
@pytest.mark.slow
def test_a_diverging_run_ends_with_the_divergence_line(data_dir, tmp_path, processes):
    """One optimizer step per epoch: NaN weights reach validation's islands scores before the check; they must not
    crash them (scipy: 'The condensed distance matrix must contain only finite values')."""
    run = tmp_path / "diverged"
    proc = run_main(flags(data_dir, run, f"--num_processes={processes}", f"--batch_size={TRAIN_IMAGES // processes}",
                          "--learning_rate=1e5", "--max_epochs=4"))
    assert proc.returncode == 3, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: training diverged: "), proc.stderr[-3000:]
    for checkpoint in (run / "checkpoints").glob("*.ckpt") if (run / "checkpoints").is_dir() else []:
        state = torch.load(checkpoint, weights_only=True)["state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), checkpoint


@pytest.mark.slow
def test_bad_process_counts_are_one_line_errors(data_dir, tmp_path):
    proc = run_main(flags(data_dir, tmp_path / "bad", "--num_processes=0"))
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == "error: --num_processes=0: give 1 or more"
    nodes = run_main([*TINY_FLAGS, f"--data_dir={data_dir}", "--num_nodes=2"])
    assert nodes.returncode == 1 and nodes.stderr.strip().splitlines()[-1].startswith(
        "error: --num_nodes=2 needs --output_dir"), nodes.stderr[-2000:]
