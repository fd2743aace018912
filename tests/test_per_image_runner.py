"""The per-image driver of stages 1 and 2 (``per_image_runner.run_per_image``), alone, with a stage of text files.

Resume, ``failed.txt``, stop signals, full disks, background saves and progress are the driver's; the
stages' own tests (test_patched_masks.py, test_masks_to_embeds.py, test_disk_and_signals.py) run them
through SAM and timm.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from partwhole.common.errors import InputError, OutputWriteError
from partwhole.common.image_folders import ImageRecord
from partwhole.common.per_image_runner import (
    Interrupted,
    PerImageStage,
    ReadFailure,
    WorkerContext,
    batched,
    run_per_image,
)
from partwhole.common.safe_files import format_bytes


class TextStage(PerImageStage):
    """Upper-cases text "images", two per compute call; a file holding ``bad`` cannot be read.

    ``on_compute(n)`` runs before the ``n``-th compute call, ``on_save(record)`` before each save.
    """

    name = "upper"

    def __init__(self, out_root: Path, *, skip_bad_images: bool = False, save_threads: int = 0, saves_in_flight: int = 1,
                 on_compute=None, on_save=None):
        self.out_root, self.skip_bad_images = out_root, skip_bad_images
        self.save_threads, self.saves_in_flight = save_threads, saves_in_flight
        self.on_compute, self.on_save = on_compute, on_save
        self.computed: list[list[str]] = []  # image names, one list per compute call
        self.loaded: list[str] = []
        self.saved: list[str] = []
        self.save_threads_seen: set[str] = set()
        self.compute_started = self.reader_closed = False

    def load(self, records):
        try:
            for record in records:
                self.loaded.append(record.path.name)
                text = record.path.read_text()
                yield ReadFailure(record, f"{record.path}: cannot read image") if text == "bad" else (record, text)
        finally:
            self.reader_closed = True

    def compute(self, items):
        self.compute_started = True  # a real stage builds its model here
        for batch in batched(items, 2):
            if self.on_compute:
                self.on_compute(len(self.computed) + 1)
            self.computed.append([record.path.name for record, _ in batch])
            for record, text in batch:
                yield record, text.upper()

    def save(self, record, text):
        if self.on_save:
            self.on_save(record)
        path = record.output_path(self.out_root)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        self.saved.append(record.path.name)
        self.save_threads_seen.add(threading.current_thread().name)
        return len(text.encode())


def make_records(folder: Path, texts: list[str]) -> list[ImageRecord]:
    records = []
    for i, text in enumerate(texts):
        path = folder / "cls" / f"im{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        records.append(ImageRecord(path, 0, "cls"))
    return records


def outputs(out: Path) -> dict[str, str]:
    return {p.stem: p.read_text() for p in sorted(out.rglob("*.pkl"))}


def run(stage: TextStage, records, **kw):
    return run_per_image(stage, records, show_progress=False, **kw)


# --------------------------------------------------------------------------- resume and progress


def test_every_image_is_written_and_a_rerun_skips_finished_files(tmp_path, capsys):
    records, out = make_records(tmp_path / "images", ["a", "bb", "ccc", "d", "e"]), tmp_path / "out"
    first = run(TextStage(out), records)
    assert (first.written, first.skipped, first.failed, first.bytes_written) == (5, 0, 0, 8)
    assert outputs(out) == {"im0": "A", "im1": "BB", "im2": "CCC", "im3": "D", "im4": "E"}
    assert first.summary.startswith("upper: 5 written, 0 skipped (already done), 0 failed in ")
    assert capsys.readouterr().out == first.summary + "\n"

    (out / "cls" / "im2.pkl").unlink()
    stage = TextStage(out)
    again = run(stage, records)
    assert (again.written, again.skipped) == (1, 4) and stage.loaded == ["im2.png"]
    assert outputs(out)["im2"] == "CCC"

    (out / "cls" / "im0.pkl").write_text("old")
    rewritten = run(TextStage(out), records, overwrite=True)
    assert (rewritten.written, rewritten.skipped) == (5, 0) and outputs(out)["im0"] == "A"


def test_nothing_to_do_loads_nothing_and_shows_no_bar(tmp_path, capsys):
    records, out = make_records(tmp_path / "images", ["a", "b"]), tmp_path / "out"
    run(TextStage(out), records)
    capsys.readouterr()
    stage = TextStage(out)
    progress = run_per_image(stage, records, show_progress=True)
    assert (progress.written, progress.skipped) == (0, 2) and stage.loaded == [] and not stage.compute_started
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.startswith("upper: 0 written, 2 skipped (already done), 0 failed")


def test_progress_bar_counts_written_and_failed_images(tmp_path):
    records, out = make_records(tmp_path / "images", ["a", "bad", "c"]), tmp_path / "out"
    progress = run_per_image(TextStage(out, skip_bad_images=True), records, show_progress=True)
    assert (progress.bar.n, progress.bar.total, progress.done) == (3, 3, 3)


def test_a_rank_takes_its_share_and_names_itself(tmp_path):
    records, out = make_records(tmp_path / "images", ["a", "b", "c", "d", "e"]), tmp_path / "out"
    progress = run(TextStage(out), records, worker=WorkerContext(rank=1, world_size=2))
    assert sorted(outputs(out)) == ["im1", "im3"] and progress.summary.startswith("upper [rank 1]: 2 written")


def test_batches_keep_their_size_and_order(tmp_path):
    records, out = make_records(tmp_path / "images", list("abcde")), tmp_path / "out"
    stage = TextStage(out)
    run(stage, records)
    assert stage.computed == [["im0.png", "im1.png"], ["im2.png", "im3.png"], ["im4.png"]]
    assert stage.saved == [f"im{i}.png" for i in range(5)] and stage.reader_closed
    assert stage.save_threads_seen == {threading.current_thread().name}  # save_threads=0: saved in the calling thread


# --------------------------------------------------------------------------- bad inputs


def test_a_bad_input_ends_the_run_after_the_images_in_hand_with_the_skip_hint(tmp_path, capsys):
    records, out = make_records(tmp_path / "images", ["a", "b", "c", "bad", "e", "f"]), tmp_path / "out"
    stage = TextStage(out)
    with pytest.raises(InputError) as error:
        run(stage, records)
    assert str(error.value) == f"{records[3].path}: cannot read image (or set skip_bad_images to skip it)"
    assert outputs(out) == {"im0": "A", "im1": "B", "im2": "C"}  # im2 was in hand (a half batch): written
    assert "im4.png" not in stage.loaded and not (out / "failed.txt").exists() and stage.reader_closed
    assert capsys.readouterr().out.startswith("upper: 3 written, 0 skipped (already done), 0 failed")


def test_a_reason_that_names_the_flag_gets_no_second_hint(tmp_path):
    class Hinted(TextStage):
        def load(self, records):
            for record in records:
                yield ReadFailure(record, f"{record.path}: broken; fix it (or pass --skip_bad_images)")

    records = make_records(tmp_path / "images", ["a"])
    with pytest.raises(InputError) as error:
        run(Hinted(tmp_path / "out"), records)
    assert str(error.value) == f"{records[0].path}: broken; fix it (or pass --skip_bad_images)"


def test_skipped_bad_inputs_are_listed_once_in_failed_txt(tmp_path):
    records, out = make_records(tmp_path / "images", ["a", "bad", "c", "bad"]), tmp_path / "out"
    progress = run(TextStage(out, skip_bad_images=True), records)
    assert (progress.written, progress.failed) == (2, 2) and sorted(outputs(out)) == ["im0", "im2"]
    lines = (out / "failed.txt").read_text().splitlines()
    assert lines == [f"{records[1].path}\t{records[1].path}: cannot read image", f"{records[3].path}\t{records[3].path}: cannot read image"]
    again = run(TextStage(out, skip_bad_images=True), records)  # the bad ones are tried again, listed once
    assert (again.written, again.skipped, again.failed) == (0, 2, 2)
    assert (out / "failed.txt").read_text().splitlines() == lines


# --------------------------------------------------------------------------- stop signals


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_finishes_the_images_in_hand_and_a_rerun_completes(tmp_path, signum):
    records, out = make_records(tmp_path / "images", list("abcdef")), tmp_path / "out"

    def signal_on_second_batch(call):
        if call == 2:
            os.kill(os.getpid(), signum)

    stage = TextStage(out, on_compute=signal_on_second_batch)
    with pytest.raises(Interrupted) as stop:
        run(stage, records)
    assert (stop.value.signum, stop.value.written, stop.value.remaining) == (signum, 4, 2)
    assert str(stop.value) == (f"stopped by {signal.Signals(signum).name} after writing 4 file(s); 2 image(s) left: "
                               "rerun the same command to finish them (finished files are skipped)")
    assert sorted(outputs(out)) == ["im0", "im1", "im2", "im3"] and len(stage.computed) == 2 and stage.reader_closed
    assert signal.getsignal(signum) is signal.SIG_DFL  # the handler is restored
    rerun = run(TextStage(out), records)
    assert (rerun.written, rerun.skipped) == (2, 4)


def test_a_reader_that_dies_of_the_stop_signal_ends_the_run_as_interrupted(tmp_path):
    class DyingReader(TextStage):  # a DataLoader worker killed by the signal sent to the process group
        def load(self, records):
            yield from super().load(records[:2])
            if self.computed:
                os.kill(os.getpid(), signal.SIGTERM)
            raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated")

    records, out = make_records(tmp_path / "images", list("abcd")), tmp_path / "out"
    with pytest.raises(Interrupted) as stop:
        run(DyingReader(out), records)
    assert (stop.value.written, stop.value.remaining) == (2, 2)

    class BrokenReader(TextStage):  # without a signal, the reader's error is the run's
        def load(self, records):
            yield from super().load(records[:1])
            raise RuntimeError("DataLoader worker exited unexpectedly")

    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        run(BrokenReader(tmp_path / "out2"), records)


# --------------------------------------------------------------------------- full disks


@pytest.mark.parametrize("save_threads", [0, 2])
def test_a_full_disk_says_what_the_remaining_images_need(tmp_path, save_threads):
    records, out = make_records(tmp_path / "images", ["aaaa", "bbbb", "cccc", "dddd", "eeee", "ffff"]), tmp_path / "out"

    def disk_fills_at_the_third(record):
        if record.path.name == "im2.png":
            raise OutputWriteError(f"cannot write im2.pkl in {out}/cls (No space left on device): needs 4 B", size=4)

    stage = TextStage(out, save_threads=save_threads, saves_in_flight=1, on_save=disk_fills_at_the_third)
    with pytest.raises(OutputWriteError) as error:
        run(stage, records)
    # 2 files counted before the error: 4 left, 4 bytes each as the files so far (a background save
    # already in flight may finish one of them)
    assert str(error.value) == (f"cannot write im2.pkl in {out}/cls (No space left on device): needs 4 B; the 4 image(s) "
                                f"left need about {format_bytes(16)} in {out} (finished files are kept and skipped on rerun)")
    assert error.value.size == 4 and stage.reader_closed
    written = sorted(outputs(out))
    assert written[:2] == ["im0", "im1"] and "im2" not in written and len(written) in ((2,) if save_threads == 0 else (2, 3))
    rerun = run(TextStage(out), records)
    assert (rerun.written, rerun.skipped) == (6 - len(written), len(written))


# --------------------------------------------------------------------------- background saves


def test_background_saves_keep_at_most_saves_in_flight_waiting(tmp_path):
    records, out = make_records(tmp_path / "images", list("abcdefgh")), tmp_path / "out"
    handed: list[int] = []  # saves finished when each result was handed over

    class Watched(TextStage):
        def compute(self, items):
            for record, text in super().compute(items):
                handed.append(len(self.saved))
                yield record, text

    stage = Watched(out, save_threads=2, saves_in_flight=2, on_save=lambda record: time.sleep(0.05))
    progress = run(stage, records)
    assert progress.written == 8 and len(outputs(out)) == 8
    assert threading.current_thread().name not in stage.save_threads_seen and len(stage.save_threads_seen) <= 2
    assert all(saved >= index - 2 for index, saved in enumerate(handed)), handed  # never more than 2 waiting


def test_an_error_in_compute_still_finishes_the_saves_in_flight(tmp_path):
    records, out = make_records(tmp_path / "images", list("abcdef")), tmp_path / "out"

    def dies_on_third_batch(call):
        if call == 3:
            raise KeyboardInterrupt

    stage = TextStage(out, save_threads=2, saves_in_flight=4, on_compute=dies_on_third_batch,
                      on_save=lambda record: time.sleep(0.1))
    with pytest.raises(KeyboardInterrupt):
        run(stage, records)
    assert outputs(out) == {"im0": "A", "im1": "B", "im2": "C", "im3": "D"} and stage.reader_closed
