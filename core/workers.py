"""A small pool of worker processes for per-image CPU work that would otherwise idle the GPU.

The dense CRF takes seconds per VOC image on one CPU core while the GPU computes the next
image's probabilities in a fraction of that; run one after the other, the CRF sets the pace.
:class:`TaskPool` runs such tasks in worker processes, keeps a bounded number in flight (so
memory stays flat however long the list), raises a worker's exception in the main process,
and with ``workers=0`` runs every task inline (same results, no processes). Its :meth:`TaskPool.map`
returns the tasks' results in order (the evaluation's per-chunk sums, mask painting). A large
array argument wrapped in :class:`Shared` reaches the worker through shared memory instead of
being pickled through a pipe.

With ``threads=True`` the same pool runs its tasks in threads of the main process instead:
for tasks that mostly wait on files (numpy, PIL and zlib release the GIL while they write),
such as writing an inference batch's outputs while the next batch runs on the GPU.

:func:`default_workers` is the one default number of worker processes of the repository.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
from collections import deque
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from core.errors import worker_process_init

# Where POSIX shared memory lives on Linux: a tmpfs whose size a container may cap (Docker: 64 MB).
SHM_DIR = "/dev/shm"


def default_workers() -> int:
    """Worker processes for one rank: the CPUs this process may use, shared among the ranks on
    this machine (torchrun's ``LOCAL_WORLD_SIZE``, 1 without it), one left for the rank itself;
    at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, cpus // local_ranks - 1)


class Shared:
    """A numpy array argument of :meth:`TaskPool.submit` that travels through shared memory.

    Pickled, a task's arguments are copied into a pipe by the main process and out of it by the
    worker; for the segmentation stage's (C, H, W) float32 probabilities that is 16 MB per VOC
    image (100 MB per COCO image) at the pace of the model. A ``Shared`` array is copied once
    into a new shared-memory segment; the worker copies it out (the task gets its own array, as
    when pickled) and unlinks the segment before the task runs; the pool unlinks it in any case
    once the task has ended, failed or been cancelled, so no segment outlives its task. Inline
    (``workers=0``) the task receives the array itself. When the shared-memory folder lacks
    room for it (see :data:`SHM_DIR`), the array is pickled as usual: a full tmpfs would kill
    the process with SIGBUS rather than raise.
    """

    def __init__(self, array: np.ndarray):
        self.array = np.asarray(array)


@dataclass(frozen=True)
class _SegmentRef:
    """What a worker receives for a :class:`Shared` argument: the segment's name and the array's layout."""

    name: str
    shape: tuple[int, ...]
    dtype: str


def _shm_has_room(nbytes: int) -> bool:
    """Whether :data:`SHM_DIR` has twice ``nbytes`` free (the rest is left to others, DataLoader workers)."""
    try:
        return shutil.disk_usage(SHM_DIR).free >= 2 * nbytes
    except OSError:  # no such folder (macOS): its shared memory is not a capped tmpfs
        return True


def _to_segment(array: np.ndarray) -> tuple[_SegmentRef, SharedMemory]:
    """Copy ``array`` into a new shared-memory segment (the caller unlinks it)."""
    segment = SharedMemory(create=True, size=max(1, array.nbytes))
    np.copyto(np.ndarray(array.shape, array.dtype, buffer=segment.buf), array)
    return _SegmentRef(segment.name, array.shape, array.dtype.str), segment


def _from_segment(ref: _SegmentRef) -> np.ndarray:
    """In a worker: a copy of the array of ``ref``'s segment, which is then unlinked (its memory freed)."""
    segment = SharedMemory(ref.name)
    try:
        return np.ndarray(ref.shape, np.dtype(ref.dtype), buffer=segment.buf).copy()
    finally:
        segment.close()
        segment.unlink()


def _release(segments: list[SharedMemory]) -> None:
    """In the main process, once a task is done: unlink the segments its worker has not unlinked."""
    for segment in segments:
        segment.close()
        try:
            segment.unlink()
        except FileNotFoundError:
            pass


def _call_with_segments(fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    """In a worker: ``fn(*args)`` with each :class:`_SegmentRef` replaced by its array."""
    fn(*(_from_segment(a) if isinstance(a, _SegmentRef) else a for a in args))


class TaskPool:
    """Run ``fn(*args)`` tasks in ``workers`` processes (0: inline), at most ``in_flight`` (default
    ``2 * workers``) in flight; with ``threads``, in ``workers`` threads of this process.

    Use as a context manager; :meth:`submit` and :meth:`drain` return how many tasks finished
    since the last call (for a progress bar), counted in submission order, so that the first
    failed task is the one whose error is raised. Leaving the block on an exception (a worker's error,
    Ctrl-C) cancels the tasks not started and waits for the running ones, whose outputs are
    written atomically by the tasks themselves. Workers ignore Ctrl-C: the main process
    decides; they die with the main process however it ends (core.errors.die_with_parent).
    They are spawned, not forked (``start``), so that a parent holding CUDA or thread pools
    hands them nothing; a caller that holds neither may fork them, which starts them in
    milliseconds rather than the seconds a spawned worker takes to import its modules.
    """

    def __init__(self, workers: int, start: str = "spawn", threads: bool = False, in_flight: int | None = None):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.workers = workers
        self.threads = threads
        self.in_flight = max(1, in_flight if in_flight is not None else 2 * workers)
        self._pending: deque[Future] = deque()
        self._pool: Executor | None = None
        if workers and threads:
            self._pool = ThreadPoolExecutor(workers, thread_name_prefix="TaskPool")
        elif workers:
            self._pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(start),
                                             initializer=worker_process_init)

    def submit(self, fn: Callable[..., Any], *args: Any) -> int:
        """Queue one task; when ``in_flight`` are in flight, wait for the oldest first.

        ``fn`` receives each :class:`Shared` argument as its array (threads share it as it is).
        """
        if self._pool is None:
            fn(*(a.array if isinstance(a, Shared) else a for a in args))
            return 1
        if self.threads:
            self._pending.append(self._pool.submit(fn, *(a.array if isinstance(a, Shared) else a for a in args)))
        elif any(isinstance(a, Shared) for a in args):
            self._pending.append(self._submit_shared(fn, args))
        else:
            self._pending.append(self._pool.submit(fn, *args))
        finished = 0
        while self._pending and (len(self._pending) >= self.in_flight or self._pending[0].done()):
            self._pending.popleft().result()
            finished += 1
        return finished

    def _submit_shared(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Future:
        """Submit ``fn(*args)`` with the :class:`Shared` arguments in shared-memory segments, freed when it is done."""
        segments: list[SharedMemory] = []
        sent = []
        try:
            for a in args:
                if isinstance(a, Shared) and _shm_has_room(a.array.nbytes):
                    ref, segment = _to_segment(a.array)
                    segments.append(segment)
                    sent.append(ref)
                else:
                    sent.append(a.array if isinstance(a, Shared) else a)
            future = self._pool.submit(_call_with_segments, fn, tuple(sent))
        except BaseException:
            _release(segments)
            raise
        future.add_done_callback(lambda _: _release(segments))
        return future

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        """Yield ``fn(item)`` for every item, in the order of ``items``, at most ``in_flight`` in flight.

        A worker's error is raised here; leaving the pool's block then cancels the tasks not started.
        """
        if self._pool is None:
            yield from map(fn, items)
            return
        pending: deque[Future] = deque()
        for item in items:
            pending.append(self._pool.submit(fn, item))
            if len(pending) >= self.in_flight:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    def drain(self) -> int:
        """Wait for every queued task (raising the first error)."""
        finished = 0
        while self._pending:
            self._pending.popleft().result()
            finished += 1
        return finished

    def __enter__(self) -> TaskPool:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if self._pool is None:
            return
        failed = exc_type is not None
        try:
            if not failed:
                self.drain()
        except BaseException:
            failed = True
            raise
        finally:
            self._pool.shutdown(wait=True, cancel_futures=failed)
