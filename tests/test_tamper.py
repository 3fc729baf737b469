"""Nothing forged: `tpc verify` checks the export's own files, and a tampered or malformed export never passes.

One tiny-clip export (and one tiny-llava export, unverified) per module; each case copies the directory, tampers
with it and runs `tpc verify`: exit 1 (FAIL, naming what differs) for content that differs from what the export
recorded or claims, exit 2 (one line, no traceback) for paths that escape the directory or files that cannot be
read. "Resealed" cases also rewrite the hashes in tpc.json, as a forger would, so that the checks behind the hash
check are exercised too. Hypothesis mutates tpc.json (drop / rename / retype a key, change a shape): never exit 0.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tpc.cli import main
from tpc.contract.manifest import Manifest, file_hashes
from tpc.errors import UsageError
from tpc.exporting import export
from tpc.pipeline import PruneRequest
from tpc.verification import check_shipped


@pytest.fixture(scope="module")
def clip_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tamper") / "clip"
    export(PruneRequest("zoo:tiny-clip", "hiprune", keep=16), "onnx", out, samples=1)
    return out


@pytest.fixture(scope="module")
def other_clip_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same model, same I/O, another method: its artifact is a plausible swap."""
    out = tmp_path_factory.mktemp("tamper") / "clip-random"
    export(PruneRequest("zoo:tiny-clip", "random", keep=16), "onnx", out, run_verify=False)
    return out


def _manifest(directory: Path) -> dict:
    return json.loads((directory / "tpc.json").read_text())


def _write_manifest(directory: Path, data: dict) -> None:
    (directory / "tpc.json").write_text(json.dumps(data, indent=2))


def reseal(directory: Path) -> None:
    """Rewrite tpc.json's hashes for the files as they are now (what a forger would do)."""
    data = _manifest(directory)
    data["files"] = file_hashes(directory)
    _write_manifest(directory, data)


def _edit_npz(path: Path, edit: Callable[[dict[str, np.ndarray]], None]) -> None:
    with np.load(path) as data:
        arrays = {key: data[key].copy() for key in data.files}
    edit(arrays)
    np.savez(path, **arrays)


def _set(arrays: dict[str, np.ndarray], key: str, change: Callable[[np.ndarray], np.ndarray]) -> None:
    arrays[key] = change(arrays[key])


def _bump(array: np.ndarray) -> np.ndarray:
    array = array.copy()
    array.flat[0] += 0.5
    return array


def _swap_kept(kept: np.ndarray) -> np.ndarray:
    kept = kept.copy()
    kept[..., -1] = kept[..., -1] - 1 if kept[..., -1].min() - 1 not in kept else kept.max() + 1
    return np.sort(kept, axis=-1)


def _manifest_edit(edit: Callable[[dict], None]) -> Callable[[Path, Path], None]:
    def apply(directory: Path, _: Path) -> None:
        data = _manifest(directory)
        edit(data)
        _write_manifest(directory, data)

    return apply


def _input_spec(data: dict) -> dict:
    return data["components"][0]["inputs"][0]


def _symlink_out(directory: Path, outside: Path) -> None:
    target = outside / "elsewhere.onnx"
    shutil.move(directory / "model.onnx", target)
    (directory / "model.onnx").symlink_to(target)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


# (id, tamper(directory, scratch outside it), reseal afterwards, exit code, fragment of the output)
CASES = [
    ("sample value", lambda d, _: _edit_npz(d / "samples/inputs.npz", lambda a: _set(a, "pixel_values", _bump)),
     False, 1, "samples/inputs.npz changed since export"),
    ("sample input, resealed",
     lambda d, _: _edit_npz(d / "samples/inputs.npz", lambda a: _set(a, "pixel_values", _bump)),
     True, 1, "expected.npz = eager"),
    ("expected value, resealed",
     lambda d, _: _edit_npz(d / "samples/expected.npz", lambda a: _set(a, "kept_features", _bump)),
     True, 1, "kept_features: margin"),
    ("expected kept_indices swapped, resealed",
     lambda d, _: _edit_npz(d / "samples/expected.npz", lambda a: _set(a, "kept_indices", _swap_kept)),
     True, 1, "kept_indices differ from eager"),
    ("expected kept_indices descending, resealed",
     lambda d, _: _edit_npz(d / "samples/expected.npz", lambda a: _set(a, "kept_indices", lambda k: k[..., ::-1])),
     True, 1, "not strictly ascending"),
    ("expected kept_indices out of range, resealed",
     lambda d, _: _edit_npz(d / "samples/expected.npz", lambda a: _set(a, "kept_indices", lambda k: k + 1000)),
     True, 1, "out of range"),
    ("sample array renamed, resealed",
     lambda d, _: _edit_npz(d / "samples/inputs.npz", lambda a: a.update(pixels=a.pop("pixel_values"))),
     True, 1, "missing ['pixel_values']"),
    ("manifest input shape", _manifest_edit(lambda m: _input_spec(m).update(shape=[1, 3, 32, 32])),
     False, 1, "input pixel_values: tpc.json says float32[1, 3, 32, 32], model.onnx has float32[1, 3, 64, 64]"),
    ("manifest output dtype", _manifest_edit(lambda m: m["components"][0]["outputs"][1].update(dtype="int32")),
     False, 1, "output kept_indices: tpc.json says int32"),
    ("artifact truncated", lambda d, _: _truncate(d / "model.onnx"), False, 1, "model.onnx changed since export"),
    ("file added", lambda d, _: (d / "extra.onnx").write_bytes(b"x"), False, 1, "extra.onnx was added since export"),
    ("artifact truncated, resealed", lambda d, _: _truncate(d / "model.onnx"), True, 2, "cannot be read as a"),
    ("hash of a file dropped", _manifest_edit(lambda m: m["files"].pop("samples/expected.npz")),
     False, 1, "samples/expected.npz has no recorded hash"),
    ("artifact ../", _manifest_edit(lambda m: m["components"][0].update(artifact="../clip/model.onnx")),
     False, 2, "climbs out with '..'"),
    ("artifact absolute", _manifest_edit(lambda m: m["components"][0].update(artifact="/etc/passwd")),
     False, 2, "is an absolute path"),
    ("teacher-forced ../", _manifest_edit(lambda m: m["components"][0].update(teacher_forced="a/../../x.onnx")),
     False, 2, "climbs out with '..'"),
    ("recorded file ../", _manifest_edit(lambda m: m["files"].update({"../x": "0" * 64})), False, 2, "climbs out"),
    ("artifact symlink out", _symlink_out, False, 2, "resolves outside the export directory"),
    ("sample missing", lambda d, _: (d / "samples/expected.npz").unlink(), False, 2, "is missing"),
    ("sample corrupt", lambda d, _: (d / "samples/expected.npz").write_bytes(b"not a zip"), False, 2,
     "is not a readable .npz"),
    ("artifact missing", lambda d, _: (d / "model.onnx").unlink(), False, 2, "is missing"),
    ("future format_version", _manifest_edit(lambda m: m.update(format_version=99)), False, 2, "format version 99"),
    ("unknown key", _manifest_edit(lambda m: m.update(surprise=1)), False, 2, "Additional properties"),
    ("missing key", _manifest_edit(lambda m: m.pop("keep")), False, 2, "'keep' is a required property"),
    ("wrong type", _manifest_edit(lambda m: m.update(keep="16")), False, 2, "keep: '16' is not of type"),
    ("NaN in tpc.json", lambda d, _: (d / "tpc.json").write_text((d / "tpc.json").read_text().replace(
        '"sample_seed": 0', '"sample_seed": NaN')), False, 2, "NaN is not allowed"),
]  # fmt: skip


@pytest.mark.parametrize(("tamper", "resealed", "code", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_tampered_export_never_passes(
    clip_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], tamper, resealed, code, fragment
) -> None:
    directory = tmp_path / "clip"
    shutil.copytree(clip_export, directory)
    outside = tmp_path / "outside"
    outside.mkdir()
    tamper(directory, outside)
    if resealed:
        reseal(directory)
    got = main(["verify", str(directory), "--samples", "1"])
    captured = capsys.readouterr()
    text = " ".join((captured.out + captured.err).split())
    assert got == code, text
    assert fragment in text
    assert "Traceback" not in text
    if code == 2:
        assert len(captured.err.strip().splitlines()) == 1, captured.err


def test_pristine_export_passes_with_shipped_checks(clip_export: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", str(clip_export), "--samples", "1"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "export's own files: sha256 as" in text
    checks = [c.check for c in check_shipped(clip_export, Manifest.read(clip_export), "onnxruntime").checks]
    counted = re.search(r"(\d+)/(\d+) checks yes", text)
    assert counted and counted[1] == counted[2] and int(counted[1]) > len(checks)  # + the samples-vs-eager checks
    for row in ("files match the sha256 recorded", "tpc.json I/O = model.onnx"):
        assert any(row in check for check in checks)
    assert "margin" in text and "<= atol + rtol" in text  # the pass rule and the deciding element, not max rel
    assert "kept_indices equal (1 samples) │ │ │ 1/1" in text


def test_swapped_artifact_fails(
    clip_export: Path, other_clip_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another export's artifact with the same I/O: the hash check names it; resealed, the runtime run drifts."""
    directory = tmp_path / "clip"
    shutil.copytree(clip_export, directory)
    shutil.copyfile(other_clip_export / "model.onnx", directory / "model.onnx")
    assert main(["verify", str(directory), "--samples", "1"]) == 1
    assert "model.onnx changed since export" in " ".join(capsys.readouterr().out.split())
    reseal(directory)
    assert main(["verify", str(directory), "--samples", "1"]) == 1
    assert "kept_indices equal (1 samples) │ │ │ 0/1" in " ".join(capsys.readouterr().out.split())


def test_inspect_of_tampered_export_does_not_say_passed(
    clip_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["inspect", str(clip_export)]) == 0
    assert "verification: passed at export" in capsys.readouterr().out
    directory = tmp_path / "clip"
    shutil.copytree(clip_export, directory)
    _edit_npz(directory / "samples/inputs.npz", lambda a: _set(a, "pixel_values", _bump))
    assert main(["inspect", str(directory)]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "verification: passed" not in text
    assert "void, 1 files changed since export (samples/inputs.npz)" in text


def test_verify_inputs_rules(clip_export: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inputs = tmp_path / "in.npz"
    with np.load(clip_export / "samples/inputs.npz") as data:
        pixels = data["pixel_values"].copy()
    np.savez(inputs, pixel_values=pixels)
    assert main(["verify", str(clip_export), "--inputs", str(inputs), "--samples", "2"]) == 2
    assert "--samples and --inputs exclude each other" in capsys.readouterr().err
    pixels[0, 0, 0, 0] = np.nan
    np.savez(inputs, pixel_values=pixels)
    assert main(["verify", str(clip_export), "--inputs", str(inputs)]) == 2
    assert "inputs contain NaN" in capsys.readouterr().err


# --- hypothesis: tpc.json mutations -----------------------------------------------------------------------------

# free-form parts not read as a contract (method parameters are re-validated when planning; graph facts, tool
# versions and the recorded verification are informational): their contents are not mutated, their keys are
OPEN = ("params", "graph", "verification", "extra", "versions")


def _paths(value: object, path: tuple = ()) -> list[tuple]:
    found = [path] if path else []
    if path and isinstance(path[-1], str) and path[-1] in OPEN:
        return found
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*path, index))
    return found


def _other_type(value: object) -> object:
    if isinstance(value, bool) or value is None:
        return "x"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return 7
    if isinstance(value, list):
        return {"x": value}
    if isinstance(value, dict):
        return [value]
    return None


# keys an export may lack (written before they were recorded): dropping one leaves a valid older manifest
OPTIONAL_KEYS = {("runtime",), ("cost",)}


def _mutate(data: dict, path: tuple, operation: str) -> bool:
    """Apply one mutation in place; False when it does not apply to this path."""
    *parents, last = path
    holder = data
    for key in parents:
        holder = holder[key]
    if operation == "retype":
        holder[last] = _other_type(holder[last])
    elif operation == "drop" and isinstance(holder, dict) and path not in OPTIONAL_KEYS:
        del holder[last]
    elif operation == "rename" and isinstance(holder, dict):
        holder[f"{last}_renamed"] = holder.pop(last)
    elif operation == "shape" and last == "shape":
        holder["shape"] = [*holder["shape"][:-1], holder["shape"][-1] + 1]
    else:
        return False
    return True


def test_manifest_mutations_never_pass(clip_export: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    directory = tmp_path_factory.mktemp("mutations") / "clip"
    shutil.copytree(clip_export, directory)
    original = _manifest(directory)
    paths = _paths(original)
    shape_paths = [p for p in paths if p[-1] == "shape"]

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        st.one_of(
            st.tuples(st.sampled_from(paths), st.sampled_from(["drop", "rename", "retype"])),
            st.tuples(st.sampled_from(shape_paths), st.just("shape")),
        )
    )
    def check(mutation: tuple) -> None:
        data = json.loads(json.dumps(original))
        if not _mutate(data, *mutation):
            return
        _write_manifest(directory, data)
        try:
            shipped = check_shipped(directory, Manifest.read(directory), "onnxruntime")
        except UsageError as error:  # exit 2: one line
            assert "\n" not in str(error)
            return
        assert not shipped.passed, f"mutation {mutation} passed the shipped-file checks"  # exit 1

    check()


def test_forged_generation_sample_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A VLM's generation.npz: its stored tokens must be eager's greedy tokens for its stored inputs."""
    directory = tmp_path / "llava"
    export(PruneRequest("zoo:tiny-llava", "fastv", keep=8, max_new_tokens=8), "onnx", directory, run_verify=False)
    _edit_npz(directory / "samples/generation.npz", lambda a: _set(a, "tokens", lambda t: (t + 1) % 500))
    reseal(directory)
    assert main(["verify", str(directory), "--samples", "1"]) == 1
    text = " ".join(capsys.readouterr().out.split())
    assert "samples/generation.npz: tokens = eager greedy generation" in text
    assert "tokens differ from eager's (first at [0, 0]" in text
