"""The one protocol every graph rewrite of a target follows: requires -> call -> ensures, run in a declared order.

In the spirit of torch.fx's pass infrastructure: a pass names the program it accepts (`requires` raises when the
precondition does not hold), rewrites it (`__call__` returns the new program), and checks what it promised
(`ensures`). A target lists its passes in order (`Target.passes`); `run_passes` runs them and a failing pass is
named in the one-line error, so "TensorRT legality failed" says which rewrite left the graph illegal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Generic, TypeVar

from tpc.errors import UsageError

P = TypeVar("P")  # the program a target rewrites: an ExportedProgram, an onnx ModelProto, a MIL Program, ...


class PassFailed(UsageError):
    """A graph pass could not run on, or did not produce, a program it accepts: the message names the pass."""


class GraphContractError(RuntimeError):
    """A check pass found the graph breaks a target's contract (static shapes, TensorRT legality): a bug in a
    lowering, not user input. `run_passes` re-raises it as its own class, the message prefixed with the pass."""


class GraphPass(Generic[P]):
    """A rewrite of a target's program. Subclasses set `name` and override `call` (and the checks they need)."""

    name: str = "pass"

    def requires(self, program: P) -> None:
        """Raise (any exception; its text is reported) when `program` is not one this pass accepts."""

    def call(self, program: P) -> P:
        return program

    def ensures(self, program: P) -> None:
        """Raise when the rewritten `program` does not have the property this pass promises."""


class CheckPass(GraphPass[P]):
    """A pass that rewrites nothing and promises a property: `check(program)` raises when it does not hold."""

    def check(self, program: P) -> None:
        raise NotImplementedError

    def ensures(self, program: P) -> None:
        self.check(program)


class ForEach(GraphPass[dict[str, P]]):
    """One pass over each program of a named set (an ExecuTorch program's methods), under the same name."""

    def __init__(self, inner: GraphPass[P]) -> None:
        self.inner = inner
        self.name = inner.name

    def requires(self, programs: dict[str, P]) -> None:
        for program in programs.values():
            self.inner.requires(program)

    def call(self, programs: dict[str, P]) -> dict[str, P]:
        return {name: self.inner.call(program) for name, program in programs.items()}

    def ensures(self, programs: dict[str, P]) -> None:
        for program in programs.values():
            self.inner.ensures(program)


def _named(error: Exception, where: str) -> Exception:
    """`error` as its own class with `where` prefixed (a UsageError or a GraphContractError, whose callers and
    tests catch the class); any other exception becomes a PassFailed."""
    if isinstance(error, (UsageError, GraphContractError)):
        try:
            return type(error)(f"{where}: {error}")
        except TypeError:  # a subclass whose constructor takes more than the message
            pass
    return PassFailed(f"{where}: {error}")


def run_passes(passes: Sequence[GraphPass[Any]], program: Any, target: str) -> Any:
    """Each pass in order; a failure is one line naming the target and the pass. A UsageError or
    GraphContractError keeps its class (the pass's name prefixed); any other exception becomes a PassFailed."""
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
                raise _named(error, where) from error
    return program
