"""Step reporting: the library calls `step("...")` around each stage; the CLI shows it with rich."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

from rich.console import Console

Step = Callable[[str], AbstractContextManager[None]]


def silent(description: str) -> AbstractContextManager[None]:
    return nullcontext()


def rich_steps(console: Console) -> Step:
    """A step shows a spinner with its elapsed time while it runs (a policy's export step takes minutes) and a
    timed check mark when it is done."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    @contextmanager
    def step(description: str) -> Iterator[None]:
        start = time.perf_counter()
        if console.is_terminal:
            columns = (SpinnerColumn(), TextColumn("{task.description}..."), TimeElapsedColumn())
            with Progress(*columns, console=console, transient=True) as progress:
                progress.add_task(description, total=None)
                yield
        else:  # a log or a CI job: no live display, the finished line is the record
            yield
        elapsed = time.perf_counter() - start
        console.print(f"[green]✓[/green] {description} [dim]({elapsed:.1f}s)[/dim]", soft_wrap=True)

    return step
