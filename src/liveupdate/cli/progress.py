"""The progress display of luoctl's long steps, on a terminal only.

A live update freezes every session and starts a new interpreter; a
pre-flight starts one too; an open may wait for another process to close
the device. Each can take seconds in which a silent command looks hung.
:class:`Steps` shows the step in progress with a spinner and the time it
has taken, the finished ones ticked, on standard error; it is transient
(erased once the command ends) and absent when standard error is not a
terminal, so scripts and logs see only the command's result.
"""

from __future__ import annotations

from types import TracebackType
from typing import Self

from rich.console import Console
from rich.errors import LiveError
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

__all__ = ["Steps"]


class Steps:
    """A list of steps, one in progress at a time (``with Steps(console) as steps``)."""

    def __init__(self, console: Console) -> None:
        self._progress: Progress | None = None
        if console.is_terminal and not console.is_dumb_terminal:
            self._progress = Progress(
                SpinnerColumn(finished_text="[green]✓[/]"),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            )
        self._current: TaskID | None = None

    @property
    def shown(self) -> bool:
        """Whether the steps are displayed (standard error is a terminal)."""
        return self._progress is not None

    def step(self, description: str) -> None:
        """The previous step is done; ``description`` is in progress."""
        if self._progress is None:
            return
        self.done()
        self._current = self._progress.add_task(description, total=None)

    def done(self) -> None:
        """The step in progress is done."""
        if self._progress is not None and self._current is not None:
            self._progress.update(self._current, total=1, completed=1)
            self._progress.stop_task(self._current)
            self._current = None

    def __enter__(self) -> Self:
        if self._progress is not None:
            try:
                self._progress.start()
            except LiveError:  # another display is active (a rich without nesting)
                self._progress = None
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
