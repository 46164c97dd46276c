"""What fl2t tells the person at the terminal: messages and progress, on stderr, quiet on request.

On a terminal progress is a live rich bar. When stderr is not a terminal (`fl2t demo > log 2>&1`, CI, nohup)
a live bar would stay silent until it ends, so the same progress is written as a plain line every few seconds.
Library functions never import this module's state: they take a `track` callable (see `Track`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True, soft_wrap=True)  # a message is one line in a log, never cut at 80 columns
PLAIN_EVERY_S = 5.0  # seconds between two plain progress lines of one task
_quiet = False


class Update(Protocol):
    def __call__(self, done: int, info: str = "") -> None: ...


# `track(label, total)` opens a progress report and yields `update(done, info)`; what library functions take.
Track = Callable[[str, int], Any]


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    return _quiet


def say(msg: str) -> None:
    """A message for the person (rich markup allowed); nothing when quiet."""
    if not _quiet:
        console.print(msg)


class PlainProgress:
    """The subset of rich's `Progress` that fl2t uses, writing one plain line per task every `every` seconds
    (and when a task completes), for logs that are not a terminal."""

    def __init__(self, every: float | None = None, disable: bool = False):
        self.every, self.disable = PLAIN_EVERY_S if every is None else every, disable
        self.tasks: dict[int, dict[str, Any]] = {}

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> int:
        task = len(self.tasks)
        now = time.monotonic()
        self.tasks[task] = {
            "description": description,
            "total": total,
            "completed": 0,
            "fields": fields,
            "start": now,
            "printed": now,
        }
        return task

    def update(self, task: int, *, completed: float | None = None, advance: float | None = None, **fields: Any) -> None:
        t = self.tasks[task]
        if completed is not None:
            t["completed"] = completed
        if advance is not None:
            t["completed"] += advance
        t["fields"].update(fields)
        now = time.monotonic()
        finished = t["total"] is not None and t["completed"] >= t["total"]
        if not self.disable and (finished or now - t["printed"] >= self.every):
            t["printed"] = now
            console.print(self._line(t, now), highlight=False, markup=False)

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)

    @staticmethod
    def _line(t: dict[str, Any], now: float) -> str:
        done, total, elapsed = t["completed"], t["total"], now - t["start"]
        line = f"{t['description']}: {done:g}"
        if total:
            line += f"/{total:g} ({100 * done / total:.0f}%)"
        line += f", {elapsed:.0f} s"
        if total and done and done < total:
            line += f", eta {elapsed * (total - done) / done:.0f} s"
        info = t["fields"].get("info")
        return f"{line}, {info}" if info else line


def progress() -> Progress | PlainProgress:
    """A progress display for one or more tasks (rich's API: `add_task`, `update`): a live bar on a terminal,
    plain periodic lines otherwise; nothing when quiet."""
    if not console.is_terminal:
        return PlainProgress(disable=_quiet)
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=_quiet,
        transient=False,
    )


@contextmanager
def track(label: str, total: int) -> Iterator[Update]:
    """One task's progress: `with track("learn dog", 500) as update: update(i + 1, "loss 0.1")`."""
    with progress() as bar:
        task: TaskID | int = bar.add_task(label, total=total, info="")

        def update(done: int, info: str = "") -> None:
            bar.update(task, completed=done, info=info)  # type: ignore[arg-type]

        yield update
