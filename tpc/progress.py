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
    """A step shows a spinner while it runs and a timed check mark when it is done."""

    @contextmanager
    def step(description: str) -> Iterator[None]:
        start = time.perf_counter()
        with console.status(f"{description}..."):
            yield
        console.print(f"[green]✓[/green] {description} [dim]({time.perf_counter() - start:.1f}s)[/dim]")

    return step
