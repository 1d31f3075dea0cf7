"""Per-case work spread over worker processes, with a progress bar (``medseg data check/prepare``)."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

MIN_ITEMS_PER_WORKER = 4
Item = TypeVar("Item")
Result = TypeVar("Result")


def map_with_progress(
    function: Callable[[Item], Result],
    items: Sequence[Item],
    workers: int = 1,
    description: str = "",
    progress: bool = False,
) -> list[Result]:
    """``[function(item) for item in items]``, in order, over ``workers`` processes (1: this one).

    ``function`` must be picklable (a module-level function or a ``functools.partial`` of one);
    exceptions propagate. With ``progress``, a bar counts the finished items. Workers are spawned,
    not forked (a fork of a process running torch's thread pools can hang), so a pool pays a start
    of about a second: fewer than ``MIN_ITEMS_PER_WORKER`` items per worker run in this process.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    bar = Progress(TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    task = bar.add_task(description, total=len(items))

    def run(results: Iterable[Result]) -> list[Result]:
        done = []
        with bar if progress else contextlib.nullcontext():
            for result in results:
                done.append(result)
                bar.advance(task)
        return done

    workers = min(workers, len(items) // MIN_ITEMS_PER_WORKER)
    if workers < 2:
        return run(map(function, items))
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return run(pool.map(function, items))


def usable_cores() -> int:
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
