"""Errors a user can act on.

Every failure caused by the user's input (a name, a number, a path) is a `UsageError`: the CLI prints its
message as one line and exits 2. Anything else is a bug in tpc and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class UsageError(Exception):
    """Bad input: the message says what was wrong and what to do instead."""


def unknown_name(kind: str, name: str, valid: Iterable[str], hint: str = "") -> UsageError:
    """The one wording for 'no such X', listing the valid ones so the user can retry at once."""
    listed = ", ".join(sorted(valid))
    return UsageError(f"unknown {kind} '{name}'; valid: {listed}{'. ' + hint if hint else ''}")


class RuntimeUnavailable(UsageError):
    """The export is fine, but its runtime cannot run on this machine (Core ML prediction off macOS).

    `tpc verify --allow-skip` accepts such an export on the checks that could run; without it, exit 2.
    """
