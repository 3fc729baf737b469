"""The failures tpc reports, and the exit code each one means (see the README's contract).

A failure caused by the user's input or environment (a name, a number, a path, a file) is a `UsageError`: the CLI
prints its message as one line and exits 2. `VerificationFailed`, an export that drifts from eager, is the only
failure that exits 1. Anything else also exits 2 with one line; `TPC_DEBUG=1` shows its traceback.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol


class UsageError(Exception):
    """Bad input: the message says what was wrong and what to do instead."""


def unknown_name(kind: str, name: str, valid: Iterable[str], hint: str = "") -> UsageError:
    """The one wording for 'no such X', listing the valid ones so the user can retry at once."""
    listed = ", ".join(sorted(valid))
    return UsageError(f"unknown {kind} '{name}'; valid: {listed}{'. ' + hint if hint else ''}")


def require(what: str, modules: Iterable[str], extra: str) -> None:
    """One line naming the pip extra to install when a module `what` needs (a target, a runtime) is missing."""
    import importlib.util

    missing = [module for module in modules if importlib.util.find_spec(module) is None]
    if missing:
        raise UsageError(
            f"{what} needs {', '.join(missing)}, which is not installed; install it with: "
            f"pip install 'tpc[{extra}]' -c constraints.txt"
        )


class RuntimeUnavailable(UsageError):
    """The export is fine, but its runtime cannot run on this machine (Core ML prediction off macOS).

    `tpc verify --allow-skip` accepts such an export on the checks that could run; without it, exit 2.
    """


class DiagnosedReport(Protocol):
    """What a failure's report offers this module: its one-line diagnosis (the verification report,
    `tpc.contract.report.VerifyReport`, from a layer above this one)."""

    @property
    def diagnosis(self) -> str: ...


class VerificationFailed(Exception):
    """The export ran but does not match eager (exit 1); carries the verification report."""

    def __init__(self, report: DiagnosedReport) -> None:
        super().__init__(report.diagnosis)
        self.report = report
