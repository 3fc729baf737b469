"""The `tpc` console script (and `python -m tpc`): signals first, then the CLI.

SIGTERM is turned into the same unwinding as Ctrl-C before anything heavy is imported, so an interrupt at any
moment, start-up included, cleans up (staging directories are removed by the exporter's `finally`), prints
`aborted` on one line and exits 130, the shell's convention.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from types import FrameType
from typing import NoReturn

from tpc.flows import flow

EXIT_INTERRUPTED = 130


class Terminated(KeyboardInterrupt):
    """SIGTERM, unwound like Ctrl-C."""


def _on_terminate(signum: int, frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the clean-up short
    raise Terminated


def main() -> int:
    signal.signal(signal.SIGTERM, _on_terminate)
    try:
        cli = flow("cli")  # imported after the handler: a SIGTERM during the imports is a clean exit too
        cli.native_output_to_log()
        code = cli.main()  # an interrupt while a command runs: the CLI prints `aborted` and returns 130
    except KeyboardInterrupt:  # one during the imports
        try:
            print("aborted", file=sys.stderr, flush=True)
        finally:
            _exit_interrupted()
    if code == EXIT_INTERRUPTED:
        _exit_interrupted()
    return code


def _exit_interrupted() -> NoReturn:
    """Exit 130 now, the clean-up having run while the interrupt unwound. Not through `sys.exit`: an interrupt that
    landed while an extension module ran Python code at import (PyRun_*) leaves CPython's "unhandled
    KeyboardInterrupt" flag set even though tpc caught it, and the interpreter would then kill itself with SIGINT
    (exit -2) instead of returning 130."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
