"""Read an ETDump recorded on a device (`executor_runner --etdump_path`, the benchmark apps) into a latency table.

An ETDump holds profiling events but few names: a portable kernel is an `OPERATOR_CALL` event carrying its
chain and instruction index, a delegate island a `DELEGATE_CALL`. The names live in the program, so the
table is built from the export's own `.pte`: instruction -> kernel (`aten::topk.values`) or delegate
(`XnnpackBackend island 3`). No ETRecord is needed, and the numbers are the device's, not this machine's.

Times: ETDump records the device's ticks; ExecuTorch's default platform layer ticks in nanoseconds, which
is what this reader assumes (`--tick-ns` to override for a custom PAL).

Stages: the rows group into tpc's stages by component only (`tpc.profiling.stages.etdump_breakdown`). An event's
debug handle leads to the module it came from only through an ETRecord, which tpc does not write, and a delegate
island mixes a tower's layers with its projector; what the method and the kernel name tell is all there is (a
decode method's rows are its step; the select op's TopK kernels stay portable and are the select).

No ETDump is recorded here: the pip runtime is built without the event tracer (`LOCAL_PROFILE_UNAVAILABLE`).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tpc.contract.manifest import Manifest
from tpc.errors import UsageError

OPERATOR_CALL, DELEGATE_CALL, METHOD_EXECUTE = "OPERATOR_CALL", "DELEGATE_CALL", "Method::execute"
# why a local `tpc profile` of an ExecuTorch export has no per-operator breakdown
LOCAL_PROFILE_UNAVAILABLE = (
    "the pip ExecuTorch runtime is built without the event tracer, so it records no ETDump; record one on the "
    "device (executor_runner --etdump_path FILE) and read it with `tpc profile DIR --etdump FILE`"
)


@dataclass
class OperatorTime:
    name: str
    kind: str  # portable | delegate | other
    calls: int
    total_ms: float
    median_ms: float
    share: float  # of the summed time of all rows


@dataclass
class EtdumpReport:
    etdump: str
    directory: str
    method: str
    operators: list[OperatorTime]
    run_ms: list[float]  # each recorded execution of the method, in order

    @property
    def runs(self) -> int:
        return len(self.run_ms)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def instruction_names(program_path: Path, method: str) -> dict[tuple[int, int], tuple[str, str]]:
    """(chain, instruction) -> (name, kind) for one method of a `.pte`, read from the program itself."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(program_path.read_bytes())
    program = getattr(program, "program", program)
    plans = {plan.name: plan for plan in program.execution_plan}
    if method not in plans:
        raise UsageError(f"'{program_path}' has no method '{method}' (it has: {', '.join(plans)})")
    plan, names = plans[method], {}
    island = 0
    for chain_index, chain in enumerate(plan.chains):
        for index, instruction in enumerate(chain.instructions):
            args = instruction.instr_args
            if hasattr(args, "op_index"):
                op = plan.operators[args.op_index]
                names[(chain_index, index)] = (f"{op.name}.{op.overload}" if op.overload else op.name, "portable")
            elif hasattr(args, "delegate_index"):
                backend = plan.delegates[args.delegate_index].id
                names[(chain_index, index)] = (f"{backend} island {island}", "delegate")
                island += 1
    return names


def read_etdump(path: Path) -> list[list[Any]]:
    """The profile events of each recorded block (one block per method execution)."""
    from executorch.devtools.etdump.serialize import deserialize_from_etdump_flatcc

    if not path.is_file():
        raise UsageError(f"ETDump file '{path}' does not exist")
    try:
        etdump = deserialize_from_etdump_flatcc(path.read_bytes())
    except Exception as error:  # flatbuffer parse errors have no common base class
        kind = type(error).__name__
        raise UsageError(f"'{path}' is not an ETDump ({kind}); pass the file that --etdump_path wrote") from None
    return [[e.profile_event for e in run.events or [] if e.profile_event is not None] for run in etdump.run_data]


def etdump_report(directory: Path, etdump: Path, method: str | None = None, tick_ns: float = 1.0) -> EtdumpReport:
    """Per-operator times of an ETDump recorded for `method` of the export in `directory`.

    `method` defaults to the one named by the file's stem (`vision.etdump`, as the bundle's README writes it),
    else the export's first method.
    """
    manifest = Manifest.read(Path(directory))
    if manifest.target != "executorch":
        raise UsageError(f"--etdump reads ExecuTorch exports; '{directory}' is a {manifest.target} export")
    methods: list[str] = []
    for spec in manifest.methods:
        assert spec.method is not None  # Manifest.read: every graph of an ExecuTorch export names its method
        methods.append(spec.method)
    if method is None:
        method = etdump.stem if etdump.stem in methods else methods[0]
    if method not in methods:
        raise UsageError(f"the export has no method '{method}' (it has: {', '.join(methods)})")
    names = instruction_names(Path(directory) / manifest.components[0].artifact, method)
    durations: dict[tuple[str, str], list[float]] = defaultdict(list)
    runs: list[float] = []
    for block in read_etdump(Path(etdump)):
        for event in block:
            ms = (event.end_time - event.start_time) * tick_ns / 1e6
            if event.name == METHOD_EXECUTE:
                runs.append(ms)
            elif event.name in (OPERATOR_CALL, DELEGATE_CALL) and event.delegate_debug_id_int in (None, -1):
                key = names.get((event.chain_index, event.instruction_id), (f"instruction {event.instruction_id}", "?"))
                durations[key].append(ms)
            else:  # a backend's own event inside a delegate (XNNPACK op-level profiling)
                durations[(event.name or str(event.delegate_debug_id_int), "other")].append(ms)
    if not durations and not runs:
        raise UsageError(f"'{etdump}' holds no profiling events (was the runner built with the event tracer on?)")
    total = sum(sum(times) for (_, kind), times in durations.items() if kind != "other") or 1.0
    operators = [
        OperatorTime(name, kind, len(times), sum(times), float(np.median(times)), sum(times) / total)
        for (name, kind), times in durations.items()
    ]
    operators.sort(key=lambda row: row.total_ms, reverse=True)
    return EtdumpReport(str(etdump), str(directory), method, operators, runs)
