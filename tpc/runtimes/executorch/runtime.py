"""ExecuTorch runtime (`executorch.runtime`, the portable kernels + XNNPACK): run one method of a `.pte`.

A `.pte` holds no input or output names, only positions; the manifest's component spec supplies them, so
`run` takes and returns arrays by name like every other runtime. Teacher forcing cannot cut a compiled
program, so verification runs the separately exported teacher-forced program instead (tpc.json names it).

A damaged `.pte` must not reach `executorch.runtime`: random bytes there can abort the whole process (its loader
logs the bad file identifier through a Python logger that cannot decode it). `check_pte` reads the header first:
the flatbuffer file identifier `ET<nn>` at bytes 4..8, and the extended header `eh00` at 8..12 whose sizes (the
program, the segment base and the segment data) must fit in the file, which catches every truncation.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr
from pathlib import Path
from typing import Any

import numpy as np

from tpc.errors import UsageError
from tpc.runtimes.base import ONLY_GRAPH, Entry, Runtime, TensorIO, artifact_path, invalid_artifact

PTE = "ExecuTorch program"
FILE_IDENTIFIER = re.compile(rb"ET[0-9]{2}")  # executorch 1.x writes ET12 (schema/program.fbs file_identifier)
EXTENDED_HEADER_MAGIC = b"eh00"
EXTENDED_HEADER_MIN_LENGTH = 24  # magic, length, program size, segment base offset (+ segment data size)
# ExecuTorch ScalarType codes -> numpy dtype names
SCALAR_TYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16", 6: "float32", 7: "float64",
                11: "bool", 15: "bfloat16"}  # fmt: skip


def check_pte(artifact: str | Path) -> Path:
    """`artifact` if its header is that of a complete ExecuTorch program, else one UsageError line."""
    path = artifact_path(artifact, PTE)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(64)
    if len(head) < 8 or not FILE_IDENTIFIER.fullmatch(head[4:8]):
        raise UsageError(f"'{path}' is not a valid {PTE} (no ExecuTorch file identifier at bytes 4..8); re-export it")
    if head[8:12] != EXTENDED_HEADER_MAGIC:  # an old program without the extended header: nothing more to check
        return path

    def field(start: int, width: int) -> int:
        return int.from_bytes(head[start : start + width], "little")

    length, program_size, segment_base = field(12, 4), field(16, 8), field(24, 8)
    segment_data = field(32, 8) if length > EXTENDED_HEADER_MIN_LENGTH else 0
    expected = max(program_size, segment_base + segment_data if segment_base else 0)
    if len(head) < 8 + EXTENDED_HEADER_MIN_LENGTH or length < EXTENDED_HEADER_MIN_LENGTH or expected > size:
        raise UsageError(
            f"'{path}' is not a valid {PTE} (truncated: its header says {expected} bytes, the file has {size}); "
            "re-export it"
        )
    return path


@contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Collect ExecuTorch's log (native writes to file descriptor 2, and the pybindings' writes to `sys.stderr`,
    e.g. cpuinfo's notes on its first load) into the yielded list, filled on exit; it goes to tpc's log too."""
    lines: list[str] = []
    python_side = io.StringIO()
    with tempfile.TemporaryFile() as sink, redirect_stderr(python_side):
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines += sink.read().decode(errors="replace").splitlines() + python_side.getvalue().splitlines()
            if lines:
                logging.getLogger("executorch").info("\n".join(lines))


def _native(call: Callable[[], Any], path: Path, context: str) -> Any:
    """`call()` with ExecuTorch's native log collected; its RuntimeError is one UsageError line quoting the log's
    last line (the reason; the exception itself only carries an error code)."""
    with captured_stderr() as log:
        try:
            return call()
        except RuntimeError as err:
            failure = err
    reason = next((line.split("] ", 1)[-1] for line in reversed(log) if line.strip()), str(failure))
    raise invalid_artifact(path, PTE, context + reason) from None


class ExecuTorchRuntime(Runtime):
    name = "executorch"
    cuts_outputs = False
    requires = ("executorch",)
    extra = "executorch"

    def __init__(self, method: Any, entry: Entry) -> None:
        self.method = method
        self.entry = entry

    @classmethod
    def load(cls, artifact: Path, entry: Entry = ONLY_GRAPH, forced: tuple[str, ...] = ()) -> ExecuTorchRuntime:
        """`entry.method` (default `forward`) of the program; `entry`'s names give the positional I/O its names. A
        missing, empty, truncated or corrupt program is one UsageError line (checked before the runtime sees it)."""
        if forced:
            raise ValueError("an ExecuTorch program cannot be cut; load the teacher-forced program instead")
        path = check_pte(artifact)
        from executorch.runtime import Runtime as ETRuntime

        method = entry.method or "forward"
        runtime = ETRuntime.get()
        program = _native(lambda: runtime.load_program(path), path, "")
        if method not in program.method_names:
            raise UsageError(
                f"'{path}' has no method '{method}' (it has {', '.join(sorted(program.method_names))}); re-export it"
            )
        loaded = _native(lambda: program.load_method(method), path, f"method '{method}': ")
        return cls(loaded, entry)

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        args = [torch.from_numpy(np.ascontiguousarray(inputs[name])) for name in self.entry.inputs]
        outputs = self.method.execute(args)
        return {name: out.numpy().copy() for name, out in zip(self.entry.outputs, outputs, strict=True)}

    @classmethod
    def versions(cls) -> dict[str, str]:
        from importlib.metadata import version

        return {"executorch": version("executorch")}

    @classmethod
    def artifact_io(
        cls, path: Path, method: str | None, want_inputs: TensorIO, want_outputs: TensorIO
    ) -> tuple[TensorIO, TensorIO]:
        """The method's tensor metadata. A `.pte` method has positions, not names: tpc.json's names (`want_*`)
        are given to its positions in order (`#N` past them)."""
        from executorch.runtime import Runtime as ETRuntime

        with captured_stderr():
            meta = ETRuntime.get().load_program(path).metadata(method or "forward")

        def described(count: int, tensor_meta: Any, names: list[str]) -> TensorIO:
            io = {}
            for position in range(count):
                info = tensor_meta(position)
                name = names[position] if position < len(names) else f"#{position}"
                code = info.dtype()
                io[name] = ([int(d) for d in info.sizes()], SCALAR_TYPES.get(int(code), str(code)))
            return io

        return (
            described(meta.num_inputs(), meta.input_tensor_meta, list(want_inputs)),
            described(meta.num_outputs(), meta.output_tensor_meta, list(want_outputs)),
        )
