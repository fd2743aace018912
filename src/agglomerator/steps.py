"""Running the project's own CLIs as steps of a longer job (the demo, the toy study).

Each step is one of the project's scripts run as a subprocess, exactly as a user
would run it; a training step whose ``results.json`` exists is reused and an
unfinished one resumes from its ``last.ckpt``, so a killed demo or study, rerun,
picks up where it stopped.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_step(step: str, args: list[str], quiet: bool = False) -> subprocess.CompletedProcess:
    """Run ``python <args>`` in the repository; print its last lines (no progress bars) and its time.

    Exits with a one-line error naming the step if it fails.
    """
    print(f"\n=== {step}: {' '.join(args)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail = [line for line in proc.stdout.splitlines() if line.strip() and "%|" not in line][-4:]
    if not quiet or proc.returncode != 0:
        print("\n".join(tail), flush=True)
    print(f"--- {step}: {time.perf_counter() - start:.0f} s", flush=True)
    if proc.returncode != 0:
        sys.exit(f"error: step '{step}' failed (exit {proc.returncode}); see the output above")
    return proc


def train_once(step: str, folder: Path, args: list[str], overwrite: bool = False, quiet: bool = False,
               done: Path | None = None) -> bool:
    """Run a ``src/main.py`` training step into ``folder`` unless an earlier run finished it.

    Finished means ``done`` exists (default ``folder/results.json``). An unfinished earlier attempt
    that saved ``checkpoints/last.ckpt`` is resumed from it (same epoch, step and optimizer state);
    one that saved nothing is started again. ``overwrite`` starts from scratch. Returns True if it ran.
    """
    done = done or folder / "results.json"
    if done.is_file() and not overwrite:
        print(f"\n=== {step}: done in an earlier run ({done}); --overwrite redoes it", flush=True)
        return False
    last = folder / "checkpoints" / "last.ckpt"
    if overwrite or not last.is_file():
        if folder.exists():
            shutil.rmtree(folder)
        resume = []
    else:
        print(f"\n=== {step}: resuming the unfinished run from {last}", flush=True)
        resume = ["--resume_training", f"--load_checkpoint_dir={last}"]  # last flags win: over a fine-tune's pretrained weights
    run_step(step, ["src/main.py", *args, f"--output_dir={folder}", *resume], quiet=quiet)
    return True
