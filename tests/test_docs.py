"""The docs tell the truth: every relative link resolves, docs/methods.md covers every method, and the README runs.

README: every fenced ```python block runs as written (each in a fresh namespace, as a reader pastes it), and every
line of a ```bash block that starts with `tpc` or `python examples/` runs and exits 0, top to bottom, in one
working directory holding the model directories the README names (`./my-clip`, `./my-llava`: tiny random
checkpoints saved with `save_pretrained`, at the 224-px geometry the README's snippets use). `tpc` lines run
through the console script's own function (`tpc.cli.main`, which returns the exit code) in this process, to spare
a torch start-up per line; `python` lines run as subprocesses from a directory where `examples/` is the
repository's. Not run, on purpose: `make ...` lines (`make install && source .venv/bin/activate`, `make demo`,
`make test` set up this very environment or run this suite). Any other kind of line fails the test, so a new
README command cannot go untested silently. One file is made here that the README says comes from a phone: the
ETDump that `tpc profile --etdump` reads (the pip ExecuTorch runtime records none).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
LINKED_DOCS = [
    README,
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "benchmarks/README.md",
    ROOT / "plugins_cuda/README.md",
]

FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
# [text](target "title"); the text may wrap lines and hold `code` or one level of brackets; ![alt](image) too
LINK = re.compile(r"\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s<>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


# --- links ------------------------------------------------------------------------------------------------


def without_code_blocks(text: str) -> str:
    """The text with fenced blocks blanked (line numbers kept): a link inside a code block is not a link."""
    return FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    result = set()
    for heading in HEADING.findall(without_code_blocks(markdown)):
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a linked heading: its text
        slug = re.sub(r"[^\w\- ]", "", text.replace("`", "").strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        result.add(slug if count == 0 else f"{slug}-{count}")
    return result


def broken_links(path: Path) -> list[str]:
    """Relative links of a markdown file whose file does not exist, or whose #anchor names no heading there."""
    text = without_code_blocks(path.read_text(encoding="utf-8"))
    problems = []
    for match in LINK.finditer(text):
        target = match.group(1)
        if EXTERNAL.match(target):
            continue
        line = text.count("\n", 0, match.start()) + 1
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            problems.append(f"{path.name}:{line}: {target} -> {resolved} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text(encoding="utf-8")):
            problems.append(f"{path.name}:{line}: {target} -> no heading '#{anchor}' in {resolved.name}")
    return problems


@pytest.mark.parametrize("doc", LINKED_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    assert doc.exists(), doc
    assert broken_links(doc) == []


def test_link_check_finds_broken_links(tmp_path: Path) -> None:
    """The checker itself: a missing file, a missing anchor and a wrapped link are reported; code blocks, external
    links, existing files and existing anchors are not."""
    (tmp_path / "other.md").write_text("# Other page\n\n## The `select` op\n", encoding="utf-8")
    (tmp_path / "page.md").write_text(
        "# Page\n"
        "[ok](other.md) [ok anchor](other.md#the-select-op) [self](#page) [web](https://example.com/x.md)\n"
        "[missing](nothing.md) [bad anchor](other.md#nowhere) [wrapped\ntext](gone/file.py)\n"
        "```bash\n[in code](not-checked.md)\n```\n",
        encoding="utf-8",
    )
    problems = broken_links(tmp_path / "page.md")
    assert [p.split(": ")[1].split(" ")[0] for p in problems] == ["nothing.md", "other.md#nowhere", "gone/file.py"]


def test_methods_doc_covers_every_method() -> None:
    """docs/methods.md has a section per registered method naming each of its parameters and its default."""
    from tpc.methods import REGISTRY

    text = (ROOT / "docs" / "methods.md").read_text(encoding="utf-8")
    sections = dict(re.findall(r"^## (\S+)\n(.*?)(?=^## |\Z)", text, re.MULTILINE | re.DOTALL))
    for name, method in REGISTRY.items():
        assert name in sections, f"docs/methods.md has no '## {name}' section"
        for param in method.params:
            row = re.search(rf"^\| `{param.name}` \| ([^|]*)\|", sections[name], re.MULTILINE)
            assert row, f"{name}: parameter {param.name} has no row in docs/methods.md"
            if param.default is not None:
                shown = row.group(1).replace("`", "").strip()
                assert shown.startswith(str(param.default)), f"{name}.{param.name}: default {shown!r}"


# --- the README, run top to bottom ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    line: int  # 1-based line in README.md
    kind: str  # "python" (a whole block), "tpc", "python-script"
    text: str

    @property
    def id(self) -> str:
        first = self.text.strip().splitlines()[0]
        return f"L{self.line}-{self.kind}: {first[:70]}"


SKIPPED_PREFIXES = ("make ",)  # environment setup (make install, make demo) and the suite itself (make test)


def readme_steps(text: str) -> list[Step]:
    steps = []
    for block in FENCE.finditer(text):
        language, body = block.group(1), block.group(2)
        first_line = text.count("\n", 0, block.start()) + 2
        if language == "python":
            steps.append(Step(first_line, "python", body))
        elif language == "bash":
            for offset, raw in enumerate(body.splitlines()):
                command = raw.split(" #")[0].strip()
                if not command or command.startswith("#") or command.startswith(SKIPPED_PREFIXES):
                    continue
                kind = "tpc" if command.startswith("tpc ") else "python-script" if command.startswith("python ") else ""
                steps.append(Step(first_line + offset, kind or "unknown", command))
        elif language:
            steps.append(Step(first_line, f"unknown ({language})", body))
    return steps


STEPS = readme_steps(README.read_text(encoding="utf-8"))


def save_models(directory: Path) -> None:
    """./my-clip (CLIPVisionModel) and ./my-llava (LlavaForConditionalGeneration): 224 px, 16-px patches (196
    tokens + CLS), 4 layers, random weights initialised peaked as tpc's zoo does (stable selections)."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    vision = CLIPVisionConfig(
        image_size=224,
        patch_size=16,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=2,
        initializer_factor=4.0,
    )
    torch.manual_seed(0)
    CLIPVisionModel(vision).save_pretrained(directory / "my-clip")
    text = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        initializer_range=0.1,
    )
    config = LlavaConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=511, image_seq_length=196
    )
    torch.manual_seed(0)
    LlavaForConditionalGeneration(config).save_pretrained(directory / "my-llava")


def phone_etdump(program: Path, method: str, path: Path) -> None:
    """Stands in for an ETDump recorded on a phone (the pip runtime has no event tracer): one run of `method`, an
    OPERATOR_CALL / DELEGATE_CALL event per instruction, in ExecuTorch's own format."""
    from executorch.devtools.etdump import schema_flatcc as schema
    from executorch.devtools.etdump.serialize import serialize_to_etdump_flatcc

    from tpc.runtimes.executorch.etdump import instruction_names

    events, clock = [], 0
    for (chain, index), (_, kind) in sorted(instruction_names(program, method).items()):
        name = "DELEGATE_CALL" if kind == "delegate" else "OPERATOR_CALL"
        events.append(
            schema.Event(schema.ProfileEvent(name, chain, index, -1, "", b"", clock, clock + 1000), None, None)
        )
        clock += 1000
    events.append(schema.Event(schema.ProfileEvent("Method::execute", 0, -1, -1, "", b"", 0, clock), None, None))
    data = serialize_to_etdump_flatcc(
        schema.ETDumpFlatCC(version=0, run_data=[schema.RunData("Execute", -1, [], events)])
    )
    path.write_bytes(struct.pack("<I", len(data)) + data)


def prepare(step: Step, workdir: Path) -> None:
    """Files a README line expects from elsewhere (a phone)."""
    args = shlex.split(step.text)
    if "--etdump" in args:
        etdump = workdir / args[args.index("--etdump") + 1]
        if not etdump.exists():
            phone_etdump(workdir / args[2] / "model.pte", etdump.stem, etdump)


def run_step(step: Step, workdir: Path) -> str | None:
    """None when the step worked, else what went wrong (exit code and the output's tail, or the traceback)."""
    if step.kind == "python":
        namespace = {"__name__": "__readme__"}
        try:
            exec(compile(step.text, f"README.md:{step.line}", "exec"), namespace)  # the README's own code
        except Exception:
            return traceback.format_exc(limit=-6)
        return None
    if step.kind == "tpc":
        from tpc.cli import main

        prepare(step, workdir)
        shown = io.StringIO()
        with contextlib.redirect_stdout(shown), contextlib.redirect_stderr(shown):
            try:
                code = main(shlex.split(step.text)[1:])
            except BaseException:  # anything but a return of 0 is the failure being tested
                code = "raised"
                shown.write(traceback.format_exc(limit=-6))
        return None if code == 0 else f"exit {code}:\n{shown.getvalue()[-3000:]}"
    if step.kind == "python-script":
        args = shlex.split(step.text)
        result = subprocess.run(
            [sys.executable, *args[1:]], cwd=workdir, capture_output=True, text=True, timeout=300, check=False
        )
        return (
            None if result.returncode == 0 else f"exit {result.returncode}:\n{(result.stdout + result.stderr)[-3000:]}"
        )
    return f"no rule to run a README step of kind '{step.kind}': add one to tests/test_docs.py"


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[Step, str | None]]:
    """Every README step, in README order, in one working directory: step -> None (worked) or the failure."""
    workdir = tmp_path_factory.mktemp("readme")
    save_models(workdir)
    (workdir / "examples").symlink_to(ROOT / "examples")  # `python examples/...` as from a checkout
    outcomes: dict[Step, str | None] = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(workdir)
        for step in STEPS:
            started = time.perf_counter()
            outcomes[step] = run_step(step, workdir)
            status = "ok" if outcomes[step] is None else "FAILED"
            print(f"README {step.id} ({time.perf_counter() - started:.1f} s) {status}", file=sys.__stdout__)
    yield outcomes


def test_readme_has_runnable_steps() -> None:
    """The parse found what the README holds: CLI lines of each section and several Python blocks."""
    kinds = [step.kind for step in STEPS]
    assert kinds.count("python") >= 4 and kinds.count("tpc") >= 10 and "python-script" in kinds, kinds
    assert not [step.id for step in STEPS if step.kind.startswith("unknown")]


@pytest.mark.slow
@pytest.mark.parametrize("step", STEPS, ids=[step.id for step in STEPS])
def test_readme_step_runs(step: Step, readme_run: dict[Step, str | None]) -> None:
    failure = readme_run[step]
    assert failure is None, f"README.md line {step.line} failed:\n{step.text}\n{failure}"


def test_readme_runner_reports_failures(tmp_path: Path) -> None:
    """The runner can fail: a bad CLI line, a raising snippet and an unknown command are each reported."""
    previous = Path.cwd()
    os.chdir(tmp_path)
    try:
        assert "exit 2" in run_step(Step(1, "tpc", "tpc export ./nothing-here --method hiprune --keep 4"), tmp_path)
        assert "ZeroDivisionError" in run_step(Step(1, "python", "1 / 0\n"), tmp_path)
        assert "no rule" in run_step(Step(1, "unknown", "curl example.com"), tmp_path)
        assert run_step(Step(1, "python", "x = 1\n"), tmp_path) is None
    finally:
        os.chdir(previous)
