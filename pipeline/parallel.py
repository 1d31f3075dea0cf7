"""Per-case work spread over worker processes, with a progress bar (``medseg data check/prepare``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

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
    exceptions propagate. With ``progress``, a bar counts the finished items.
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

    if workers == 1 or len(items) < 2:
        return run(map(function, items))
    with ProcessPoolExecutor(min(workers, len(items))) as pool:
        return run(pool.map(function, items))
