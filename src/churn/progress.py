"""Progress of long stages on a terminal: rows scored, snapshots built, trees trained.

Shown on stderr only when it is a terminal, so CI logs and batch jobs stay quiet (their
progress is in the log lines each stage writes when it ends).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def shown() -> bool:
    """Whether progress is shown: stderr is a terminal."""
    return sys.stderr.isatty()


@contextlib.contextmanager
def progress(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``, which moves a bar of ``total`` steps (unknown: ``None``) on
    stderr when it is a terminal and does nothing otherwise; the bar goes when done.

    >>> with progress("rows scored", 10) as advance:
    ...     advance(10)
    """
    if not shown():
        yield lambda n=1: None
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(file=sys.stderr),
        transient=True,
    )
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda n=1: bar.advance(task, n)
