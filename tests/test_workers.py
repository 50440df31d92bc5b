"""core/workers.py: TaskPool runs tasks in spawned processes like inline, bounds what is in flight,
and raises a worker's error in the main process; Shared arrays reach the workers through shared
memory whose segments are gone once the tasks are."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import core.workers
from core.errors import UserError
from core.workers import Shared, TaskPool, default_workers


def write_square(path: Path, value: int) -> None:
    """A task: write value**2 to path (module level, so a spawned worker can import it)."""
    if value < 0:
        raise UserError(f"negative value {value} for {path.name}")
    path.write_text(str(value * value))


def _run(folder: Path, workers: int, values: list[int]) -> int:
    folder.mkdir()
    finished = 0
    with TaskPool(workers) as pool:
        for v in values:
            finished += pool.submit(write_square, folder / f"{v}.txt", v)
            assert len(pool._pending) < max(1, 2 * workers)  # bounded: older tasks waited for
        finished += pool.drain()
    return finished


def test_workers_write_what_inline_writes(tmp_path):
    values = list(range(9))
    assert _run(tmp_path / "inline", 0, values) == len(values)
    assert _run(tmp_path / "pool", 2, values) == len(values)
    for v in values:
        assert (tmp_path / "pool" / f"{v}.txt").read_text() == (tmp_path / "inline" / f"{v}.txt").read_text() \
            == str(v * v)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_task_error_reaches_the_main_process(tmp_path, workers):
    with pytest.raises(UserError, match="negative value -3 for -3.txt"):
        _run(tmp_path / "out", workers, [1, 2, -3, 4])
    assert (tmp_path / "out" / "1.txt").read_text() == "1"


def test_default_workers_share_the_cpus_among_the_ranks_of_the_machine(monkeypatch):
    cpus = len(os.sched_getaffinity(0))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_workers() == max(1, cpus - 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_workers() == max(1, cpus // 2 - 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(10 ** 6))
    assert default_workers() == 1
    with pytest.raises(ValueError):
        TaskPool(-1)


def square(value: int) -> int:
    """A task returning its result (module level, so a spawned worker can import it)."""
    if value < 0:
        raise UserError(f"negative value {value}")
    return value * value


@pytest.mark.parametrize("workers, start", [(0, "spawn"), (2, "fork")])  # spawned map: tests/test_coco14.py
def test_map_returns_the_results_in_order_and_raises_a_task_error(workers, start):
    with pytest.raises(UserError, match="negative value -3"):
        with TaskPool(workers, start) as pool:
            assert list(pool.map(square, range(9))) == [0, 1, 4, 9, 16, 25, 36, 49, 64]
            list(pool.map(square, [1, -3, 2]))


def test_threads_run_the_tasks_beside_the_main_thread_bounded_and_in_order(tmp_path):
    """threads=True: tasks run in threads of this process (not the main one), at most ``in_flight`` are
    queued, finished tasks are counted as soon as a later submit sees them, and the first failed task's
    error is the one raised."""
    import threading

    ran_in: set[str] = set()

    def task(path: Path, value: int) -> None:
        ran_in.add(threading.current_thread().name)
        write_square(path, value)

    finished = 0
    with TaskPool(2, threads=True, in_flight=3) as pool:
        for v in range(10):
            finished += pool.submit(task, tmp_path / f"{v}.txt", v)
            assert len(pool._pending) < 3
        finished += pool.drain()
    assert finished == 10
    assert [(tmp_path / f"{v}.txt").read_text() for v in range(10)] == [str(v * v) for v in range(10)]
    assert ran_in and threading.main_thread().name not in ran_in
    with pytest.raises(UserError, match="negative value -3 for -3.txt"):
        with TaskPool(2, threads=True, in_flight=8) as pool:
            for v in (1, -3, -4, 2):
                pool.submit(task, tmp_path / f"{v}.txt", v)
    assert (tmp_path / "1.txt").read_text() == "1"


def save_array(path: Path, array: np.ndarray, tag: str) -> None:
    """A task: save the array it received (module level, so a spawned worker can import it)."""
    if tag == "fail":
        raise UserError(f"failing task {path.name}")
    assert isinstance(array, np.ndarray) and array.flags.writeable
    np.save(path, array)


@pytest.fixture
def segment_names(monkeypatch) -> list[str]:
    """The names of the shared-memory segments the pool creates in this process."""
    names: list[str] = []
    to_segment = core.workers._to_segment

    def recording(array):
        ref, segment = to_segment(array)
        names.append(segment.name)
        return ref, segment

    monkeypatch.setattr(core.workers, "_to_segment", recording)
    return names


def _segment_exists(name: str) -> bool:
    return (Path(core.workers.SHM_DIR) / name.lstrip("/")).exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_shared_arrays_arrive_equal_and_leave_no_segment(tmp_path, workers, segment_names):
    rng = np.random.default_rng(0)
    arrays = [rng.random((3, 17, 5), dtype=np.float32), rng.integers(0, 255, (40, 30, 3), dtype=np.uint8),
              np.zeros((0, 4), np.float64), rng.random((2, 3))[:, ::2]]  # empty and non-contiguous too
    with TaskPool(workers) as pool:
        for i, array in enumerate(arrays):
            pool.submit(save_array, tmp_path / f"{i}.npy", Shared(array), "ok")
    for i, array in enumerate(arrays):
        got = np.load(tmp_path / f"{i}.npy")
        assert got.dtype == array.dtype and np.array_equal(got, array)
    # inline the task gets the array itself; through processes every array went by a segment, now gone
    assert len(segment_names) == (len(arrays) if workers else 0)
    assert not any(_segment_exists(n) for n in segment_names)


def test_segments_of_a_failed_task_and_the_one_behind_it_are_freed(tmp_path, segment_names):
    array = np.arange(6000, dtype=np.float32).reshape(3, 40, 50)
    with pytest.raises(UserError, match="failing task"):
        with TaskPool(1) as pool:
            pool.submit(save_array, tmp_path / "a.npy", Shared(array), "fail")
            # queued behind the failing one: cancelled or run when the pool stops on the error
            pool.submit(save_array, tmp_path / "b.npy", Shared(array), "ok")
            pool.drain()
    assert len(segment_names) == 2
    assert not any(_segment_exists(n) for n in segment_names)


def test_segments_of_tasks_cancelled_before_reaching_a_worker_are_freed(tmp_path, segment_names):
    """The main process fails with tasks queued that no worker has taken: they are cancelled, and
    their segments, which no worker ever opened, are unlinked by the pool."""
    array = np.ones((5, 7), np.float32)
    with pytest.raises(RuntimeError, match="the model failed"):
        with TaskPool(3) as pool:
            # 5 of the 6 in flight allowed, so no submit waits: all queued before the spawned workers start;
            # the executor hands 4 (workers + 1) on to its call queue, the fifth waits and is cancelled
            for i in range(5):
                pool.submit(save_array, tmp_path / f"{i}.npy", Shared(array), "ok")
            raise RuntimeError("the model failed")
    written = sorted(tmp_path.glob("*.npy"))
    assert len(segment_names) == 5 and len(written) < 5
    assert not any(_segment_exists(n) for n in segment_names)


def test_shared_arrays_are_pickled_when_shared_memory_lacks_room(tmp_path, segment_names, monkeypatch):
    monkeypatch.setattr(core.workers.shutil, "disk_usage", lambda path: SimpleNamespace(free=100))
    array = np.ones((10, 10), np.float32)  # 400 bytes: not twice in the 100 free
    with TaskPool(1) as pool:
        pool.submit(save_array, tmp_path / "a.npy", Shared(array), "ok")
    assert segment_names == []
    assert np.array_equal(np.load(tmp_path / "a.npy"), array)
