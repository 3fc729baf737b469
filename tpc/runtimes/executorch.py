"""ExecuTorch runtime (`executorch.runtime`, the portable kernels + XNNPACK): run one method of a `.pte`.

A `.pte` holds no input or output names, only positions; the manifest's component spec supplies them, so
`run` takes and returns arrays by name like every other runtime. Teacher forcing cannot cut a compiled
program, so verification runs the separately exported teacher-forced program instead (tpc.json names it).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tpc.runtimes.base import Runtime


class ExecuTorchRuntime(Runtime):
    name = "executorch"
    cuts_outputs = False

    def __init__(self, method: Any, input_names: Sequence[str], output_names: Sequence[str]) -> None:
        self.method = method
        self.input_names = list(input_names)
        self.output_names = list(output_names)

    @classmethod
    def load(
        cls,
        artifact: Path,
        forced: tuple[str, ...] = (),
        *,
        method: str | None = None,
        input_names: Sequence[str] = (),
        output_names: Sequence[str] = (),
        etdump: bool = False,
    ) -> ExecuTorchRuntime:
        if forced:
            raise ValueError("an ExecuTorch program cannot be cut; load the teacher-forced program instead")
        from executorch.runtime import Runtime as ETRuntime

        program = ETRuntime.get().load_program(Path(artifact), enable_etdump=etdump)
        session = cls(program.load_method(method or "forward"), input_names, output_names)
        session.program = program
        return session

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        args = [torch.from_numpy(np.ascontiguousarray(inputs[name])) for name in self.input_names]
        outputs = self.method.execute(args)
        return {name: out.numpy().copy() for name, out in zip(self.output_names, outputs, strict=True)}

    @classmethod
    def versions(cls) -> dict[str, str]:
        from importlib.metadata import version

        return {"executorch": version("executorch")}
