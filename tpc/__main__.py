"""The `tpc` console script (and `python -m tpc`): signals first, then the CLI.

SIGTERM is turned into the same unwinding as Ctrl-C before anything heavy is imported, so an interrupt at any
moment, start-up included, cleans up (staging directories are removed by the exporter's `finally`), prints
`aborted` on one line and exits 130, the shell's convention.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

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
        return cli.main()
    except KeyboardInterrupt:
        try:
            print("aborted", file=sys.stderr, flush=True)
        finally:
            return EXIT_INTERRUPTED  # noqa: B012


if __name__ == "__main__":
    sys.exit(main())
