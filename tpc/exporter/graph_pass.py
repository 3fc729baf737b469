"""The one protocol every graph rewrite of a target follows: requires -> call -> ensures, run in a declared order.

In the spirit of torch.fx's pass infrastructure: a pass names the program it accepts (`requires` raises when the
precondition does not hold), rewrites it (`__call__` returns the new program), and checks what it promised
(`ensures`). A target lists its passes in order (`Target.passes`); `run_passes` runs them and a failing pass is
named in the one-line error, so "TensorRT legality failed" says which rewrite left the graph illegal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

from tpc.errors import UsageError

P = TypeVar("P")  # the program a target rewrites: an ExportedProgram, an onnx ModelProto, a MIL Program, ...


class PassFailed(UsageError):
    """A graph pass could not run on, or did not produce, a program it accepts: the message names the pass."""


class GraphPass(Generic[P]):
    """A rewrite of a target's program. Subclasses set `name` and override `call` (and the checks they need)."""

    name: str = "pass"

    def requires(self, program: P) -> None:
        """Raise (any exception; its text is reported) when `program` is not one this pass accepts."""

    def call(self, program: P) -> P:
        return program

    def ensures(self, program: P) -> None:
        """Raise when the rewritten `program` does not have the property this pass promises."""


def run_passes(passes: Sequence[GraphPass[P]], program: P, target: str) -> P:
    """Each pass in order; a failure is one line naming the target and the pass (its own UsageError passes
    through with the pass's name prefixed)."""
    for graph_pass in passes:
        for stage, run in (("requires", graph_pass.requires), ("call", None), ("ensures", graph_pass.ensures)):
            try:
                if run is None:
                    program = graph_pass.call(program)
                else:
                    run(program)
            except PassFailed:
                raise
            except Exception as error:
                where = f"target {target}: graph pass '{graph_pass.name}' failed ({stage})"
                raise PassFailed(f"{where}: {error}") from error
    return program
