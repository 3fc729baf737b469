"""The layering holds in the code itself: no function-local import of a tpc module (registries import by name,
with importlib), no comparison against a kind's name outside the kinds, and the import-linter contracts pass."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tpc"
KIND_NAMES = {"encoder", "vlm", "vla", "policy"}
KIND_MODULES = ("kinds",)  # the kinds and their registry: the one place that names them


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_no_function_local_import_of_a_tpc_module() -> None:
    found = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for inner in ast.walk(node):
                names = [inner.module or ""] if isinstance(inner, ast.ImportFrom) else []
                names += [a.name for a in inner.names] if isinstance(inner, ast.Import) else []
                found += [f"{path.relative_to(PACKAGE)}:{inner.lineno}" for n in names if n.split(".")[0] == "tpc"]
    assert found == []


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_no_import_cycle_among_tpc_modules() -> None:
    """Counting every import statement, `TYPE_CHECKING` ones included: import-linter's layers say nothing about two
    modules of one layer importing each other."""
    modules = {_module_name(path): path for path in _modules()}

    def target(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            imported = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                imported = [a.name for a in node.names]
            graph[name] |= {t for n in imported if n.split(".")[0] == "tpc" and (t := target(n)) not in (None, name)}
    cycles = []
    for start in graph:  # a cycle through `start`: a path from one of its imports back to it
        seen, frontier = set(), list(graph[start])
        while frontier:
            module = frontier.pop()
            if module == start:
                cycles.append(start)
                break
            if module not in seen:
                seen.add(module)
                frontier.extend(graph[module])
    assert cycles == []


def test_no_branch_on_a_kind_name_outside_the_kinds() -> None:
    """`x == "vlm"`, `kind in ("vla", ...)`, `match`-free: a comparison with a kind's name is the kinds' business."""
    found = []
    for path in _modules():
        if path.relative_to(PACKAGE).parts[0] in KIND_MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                strings = {o.value for o in operands if isinstance(o, ast.Constant) and isinstance(o.value, str)}
                for o in operands:
                    if isinstance(o, ast.Tuple | ast.List | ast.Set):
                        strings |= {e.value for e in o.elts if isinstance(e, ast.Constant)}
                if strings & KIND_NAMES:
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert found == []


def test_import_contracts_hold() -> None:
    lint_imports = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if lint_imports is None:
        pytest.skip("import-linter is not installed (pip install 'tpc[dev]')")
    result = subprocess.run([lint_imports], capture_output=True, text=True, cwd=PACKAGE.parent, check=False)
    assert result.returncode == 0, result.stdout[-3000:]
