"""The flows by name, imported when a command or an API call runs one: the registry that keeps `import tpc` and
`tpc --help` light (the flows import torch). The CLI and the Python API reach every flow through `flow(name)`."""

from __future__ import annotations

import importlib
from types import ModuleType

FLOWS = {
    "export": "tpc.exporting",  # export(request, target, output, ...)
    "verify": "tpc.verification",  # verify(directory, ...)
    "profile": "tpc.profiling",  # profile(directory, ...)
    "inspect": "tpc.inspect",  # describe(request), describe_and_render(request), describe_export(directory)
    "evaluate": "tpc.evaluation",  # evaluate(options), render(report), plot(report, path): accuracy under pruning
    "testbed": "tpc.testbed",  # train_command(name, output, ...): the trained zoo models
    "build": "tpc.pipeline",  # PruneRequest, plan(request), build(request)
    "targets": "tpc.exporter",  # option_specs(), PARAM_OPTIONS: the targets' options, for `tpc export`'s flags
    "etdump": "tpc.runtimes.executorch.etdump",  # etdump_report(pte, etdump)
    "cli": "tpc.cli",  # the console entry's commands (tpc.__main__ installs its signal handler first)
}


def flow(name: str) -> ModuleType:
    return importlib.import_module(FLOWS[name])
