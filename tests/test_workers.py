"""core/workers.py: TaskPool runs tasks in spawned processes like inline, bounds what is in flight,
and raises a worker's error in the main process."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from core.errors import UserError
from core.workers import TaskPool, default_workers


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
