"""ExecuTorch runtime (`executorch.runtime`, the portable kernels + XNNPACK): run one method of a `.pte`.

A `.pte` holds no input or output names, only positions; the manifest's component spec supplies them, so
`run` takes and returns arrays by name like every other runtime. Teacher forcing cannot cut a compiled
program, so verification runs the separately exported teacher-forced program instead (tpc.json names it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tpc.runtimes.base import ONLY_GRAPH, Entry, Runtime


class ExecuTorchRuntime(Runtime):
    name = "executorch"
    cuts_outputs = False

    def __init__(self, method: Any, entry: Entry) -> None:
        self.method = method
        self.entry = entry

    @classmethod
    def load(cls, artifact: Path, entry: Entry = ONLY_GRAPH, forced: tuple[str, ...] = ()) -> ExecuTorchRuntime:
        """`entry.method` (default `forward`) of the program; `entry`'s names give the positional I/O its names."""
        if forced:
            raise ValueError("an ExecuTorch program cannot be cut; load the teacher-forced program instead")
        from executorch.runtime import Runtime as ETRuntime

        program = ETRuntime.get().load_program(Path(artifact))
        return cls(program.load_method(entry.method or "forward"), entry)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        args = [torch.from_numpy(np.ascontiguousarray(inputs[name])) for name in self.entry.inputs]
        outputs = self.method.execute(args)
        return {name: out.numpy().copy() for name, out in zip(self.entry.outputs, outputs, strict=True)}

    @classmethod
    def versions(cls) -> dict[str, str]:
        from importlib.metadata import version

        return {"executorch": version("executorch")}
