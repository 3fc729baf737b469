"""Fast start: `tpc --help`, `tpc methods` and `tpc zoo` run without importing torch or transformers, and the light
declarations they list (zoo geometry, family kinds, method priority functions) agree with the heavy code."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tpc.kinds import accepts_method
from tpc.methods import REGISTRY
from tpc.methods.base import Deferred
from tpc.models_zoo import FAMILIES, FAMILY_KINDS, ZOO

HEAVY = ("torch", "transformers", "numpy", "onnx", "onnxruntime", "safetensors")

LISTING_WITHOUT_HEAVY_IMPORTS = textwrap.dedent(
    """
    import contextlib, io, sys
    import tpc.cli, tpc.methods, tpc.methods.registry, tpc.models_zoo, tpc.models_zoo.zoo
    from tpc.cli import main
    for argv in (["--help"], ["methods"], ["zoo"]):
        with contextlib.redirect_stdout(io.StringIO()) as shown:
            code = main(argv)
        assert code == 0, (argv, code)
        assert shown.getvalue().strip(), argv
    heavy = sorted(name for name in sys.modules if name.split(".")[0] in HEAVY)
    assert not heavy, heavy
    print("light")
    """
)


def test_listing_commands_import_neither_torch_nor_transformers() -> None:
    """In a fresh interpreter: import the CLI and the registries, run the three listing commands, then check."""
    code = f"HEAVY = {HEAVY!r}\n" + LISTING_WITHOUT_HEAVY_IMPORTS
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("light")


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_entries_declare_the_geometry_their_config_gives(name: str) -> None:
    entry = ZOO[name]
    geometry = FAMILIES[entry.family].geometry(entry.make_config())
    declared = (entry.patches, entry.prefix, entry.layers)
    assert declared == (geometry.num_patches, geometry.prefix_tokens, geometry.num_layers)


def test_family_kinds_are_the_adapters_and_accepts_follows_them() -> None:
    assert {name: adapter.kind for name, adapter in FAMILIES.items()} == FAMILY_KINDS
    assert [m for m in REGISTRY if accepts_method("vla", REGISTRY[m])] == ["fastv", "vla-pruner", "lvlm-csp", "none"]
    assert "vla-pruner" not in [m for m in REGISTRY if accepts_method("vlm", REGISTRY[m])]


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_deferred_priority_resolves_to_its_modules_function(name: str) -> None:
    priority = REGISTRY[name].priority
    if isinstance(priority, Deferred):
        function = priority.resolve()
        assert callable(function) and function.__module__ == priority.target.partition(":")[0]
