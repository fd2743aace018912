"""Process plumbing for every stage: DataLoader worker processes that neither block a stop nor outlive
their main process, and glibc malloc settings for CPU runs.

* :func:`ignore_stop_signals` (a ``worker_init_fn``): loader processes ignore the stop signals
  (``runtime.STOP_SIGNALS``), which a cluster sends to the whole process group, and die with their
  parent (:func:`die_with_parent`); the main process handles them (``runtime.StopSignals``);
* :func:`end_loader_workers_at_exit` and :func:`shut_down_loader_workers`: the main process ends them;
* :func:`keep_freed_memory`: malloc keeps freed memory for reuse (page faults cost stage 2 30-50 %).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from typing import Iterable

from partwhole.common.runtime import STOP_SIGNALS


def die_with_parent() -> None:
    """Linux: have the kernel SIGKILL this process when the process (thread) that started it ends.

    A loader process ignores SIGTERM (see :func:`ignore_stop_signals`), so nothing else would end it
    if the main process were killed outright (``kill -9``, the OOM killer): it would stay behind,
    holding memory, possibly blocked forever on a queue nobody reads. Elsewhere: nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    import multiprocessing

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # no usable libc: the atexit reaper still covers a normal exit
        return
    # The kernel signals only a parent death that comes after the prctl: a parent killed while this process
    # was starting (a loaded machine) has left it adopted already, and it must end itself.
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        os.kill(os.getpid(), signal.SIGKILL)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: loader processes ignore SIGTERM/SIGUSR1 (a cluster signals the whole
    process group); the main process decides when to stop and shuts them down. They die with it.

    Use it with :func:`end_loader_workers_at_exit` in the main process.
    """
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    die_with_parent()


def shut_down_loader_workers(loaders: Iterable) -> None:
    """End the worker processes of ``loaders``' persistent iterators now, and drop those iterators.

    First the iterator's own orderly shutdown (each worker is told to stop and joined); a worker still
    alive after it gets SIGKILL (ours ignore the SIGTERM that torch falls back to). For a training run
    stopped by a signal: Lightning's teardown shuts down only the active loop's loaders (not those of
    the fit loop when the signal came during validation), so their workers would outlive the run.
    """
    # torch has no public way to end a DataLoader's persistent workers before the loader is garbage-collected:
    # the iterator (``loader._iterator``, kept with ``persistent_workers``) ends them in its private
    # ``_shutdown_workers`` (what its ``__del__`` calls), and only it knows its processes (``_workers``).
    # Dropping the reference instead would end them only when the last reference goes (Lightning's fetchers
    # may hold one), and killing every multiprocessing child would end other loaders' workers too.
    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter

    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)
        if isinstance(iterator, _MultiProcessingDataLoaderIter):
            iterator._shutdown_workers()
            for worker in iterator._workers:
                if worker.is_alive():
                    worker.kill()
                    worker.join(timeout=10)
        if iterator is not None:
            loader._iterator = None  # the next ``iter(loader)`` starts new workers


_LOADER_REAPER_REGISTERED = False


def end_loader_workers_at_exit() -> None:
    """Make sure DataLoader processes that ignore SIGTERM end when this process exits (register once).

    At exit, multiprocessing terminates the daemonic processes still running (SIGTERM) and waits
    for them; loader processes started with :func:`ignore_stop_signals` would make it wait forever
    (Lightning does not always shut a loader down when training stops on an exception). This exit
    handler, registered after multiprocessing's and so run before it, kills them (SIGKILL) first:
    every daemonic multiprocessing child still alive, which in this project means loader processes
    (DDP ranks are started by Lightning as subprocesses, not multiprocessing children). torch's
    SIGCHLD handler is put back to the default first: it would raise "DataLoader worker is killed"
    in the middle of this handler, which would leave the other workers alive and the exit hung.
    """
    global _LOADER_REAPER_REGISTERED
    if _LOADER_REAPER_REGISTERED:
        return
    import atexit
    import multiprocessing

    def kill_loader_workers() -> None:
        children = [child for child in multiprocessing.active_children() if child.daemon]
        if not children:
            return
        if hasattr(signal, "SIGCHLD") and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for child in children:
            child.kill()
        for child in children:
            child.join(timeout=10)

    atexit.register(kill_loader_workers)
    _LOADER_REAPER_REGISTERED = True


# glibc mallopt(3) parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse; True if it took effect.

    By default glibc serves every allocation above a threshold (at most 32 MB)
    with a fresh ``mmap`` and unmaps it on free, and trims the heap's top; a CPU
    forward pass that allocates and frees the same large activations every
    batch then pays a page fault per 4 KB each time (30-50% of stage 2's CPU
    time in bench/RESULTS.md). With mmap off and trimming raised to 2 GB, freed
    blocks are reused (allocations a thread arena cannot hold fall back to the
    main heap). The cost: the process keeps its peak memory until it exits.
    Left alone when the user set ``GLIBC_TUNABLES`` or ``MALLOC_*_`` variables,
    and off Linux or without glibc.
    """
    if sys.platform != "linux" or "GLIBC_TUNABLES" in os.environ or any(
        k.startswith("MALLOC_") and k.endswith("_") for k in os.environ
    ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc only (musl has its own malloc)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
