"""ExecuTorch target: one `.pte` with a method per component, run by `executorch.runtime`, verified like ONNX.

The end-to-end test goes through the CLI exactly as a user would (`--target executorch --bundle`); the matrix
lowers each model's method variants and runs every one in the ExecuTorch runtime against eager PyTorch.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from tpc.cli import main
from tpc.exporter.base import ExportPart
from tpc.exporter.executorch import ExecuTorchTarget
from tpc.pipeline import PruneRequest, as_arrays, build
from tpc.profiling.report import validate
from tpc.runtimes.base import Entry
from tpc.runtimes.executorch import ExecuTorchRuntime
from tpc.verification import TOLERANCES, eager_outputs

STANDALONE_ET = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    from executorch.runtime import Runtime
    directory = sys.argv[1]
    manifest = json.load(open(f"{directory}/tpc.json"))
    program = Runtime.get().load_program(f"{directory}/model.pte")
    assert program.method_names == {c["method"] for c in manifest["components"]}, program.method_names
    for component in manifest["components"]:
        where = directory + "/samples/" + component["name"]
        inputs = np.load(where + "/inputs.npz")
        expected = np.load(where + "/expected.npz")
        args = [torch.from_numpy(inputs[spec["name"]]) for spec in component["inputs"]]
        outputs = program.load_method(component["method"]).execute(args)
        for spec, out in zip(component["outputs"], outputs):
            want = expected[spec["name"]]
            assert list(out.shape) == spec["shape"], (spec, out.shape)
            if spec["name"] == "kept_indices":
                np.testing.assert_array_equal(out.numpy(), want)
            else:
                np.testing.assert_allclose(out.numpy(), want, rtol=1e-3, atol=1e-4)
    assert not any(name == "tpc" or name.startswith("tpc.") for name in sys.modules)
    print("ran", sorted(program.method_names))
    """
)


def run_standalone(script: str, directory: Path) -> str:
    """Run `script` on an export directory in a fresh interpreter; its stdout (the script must succeed)."""
    result = subprocess.run([sys.executable, "-c", script, str(directory)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def llava_pte(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("et") / "llava"
    args = ["--method", "hiprune", "--keep", "64", "--target", "executorch", "--bundle"]
    assert main(["export", "zoo:tiny-llava", "--output", str(out), *args]) == 0
    return out


def test_tiny_llava_exports_verifies_and_reports_delegation(llava_pte: Path) -> None:
    manifest = json.loads((llava_pte / "tpc.json").read_text())
    assert manifest["verification"]["passed"] is True
    assert manifest["verification"]["kept_rows_agreeing"] == manifest["verification"]["kept_rows"] > 0
    assert manifest["verification"]["teacher_forced"], "the teacher-forced program must have been run"
    assert {c["method"] for c in manifest["components"]} == {"vision", "prefill", "decode"}
    assert {c["artifact"] for c in manifest["components"]} == {"model.pte"}
    vision = manifest["components"][0]
    assert vision["teacher_forced"] == "teacher_forced/model.pte"
    for component in manifest["components"]:
        report = component["graph"]["delegation"]
        assert report["backend"] == "XnnpackBackend" and report["islands"] >= 1
        assert report["delegated_nodes"] == sum(op["delegated"] for op in report["ops"].values())
        assert 0.5 < report["delegated_flops_share"] <= 1.0
        assert all(op["why"] for op in report["ops"].values() if op["portable"]), "every portable op says why"
    delegation = vision["graph"]["delegation"]
    topk = delegation["ops"]["aten.topk.default"]  # HiPrune's anchors + the select's threshold, priority, order
    assert topk["delegated"] == 0 and topk["portable"] >= 3 and topk["why"] == ["no XNNPACK kernel"]
    assert delegation["ops"]["aten.linear.default"]["portable"] == 0
    # HiPrune's anchor TopK and the select op's two TopKs share one portable run between two islands
    assert delegation["select_segments"] == 1
    assert manifest["verification"]["generation"]["passed"] is True


def test_pte_runs_in_a_separate_process_with_executorch_alone(llava_pte: Path) -> None:
    assert "ran ['decode', 'prefill', 'vision']" in run_standalone(STANDALONE_ET, llava_pte)


def test_bundle_checks_itself_in_the_runtime(llava_pte: Path) -> None:
    from executorch.extension.pybindings.portable_lib import _load_bundled_program_from_buffer

    bundle = llava_pte / "bundle"
    assert (bundle / "model.pte").read_bytes() == (llava_pte / "model.pte").read_bytes()
    bundled = _load_bundled_program_from_buffer((bundle / "model.bpte").read_bytes())
    for method in ("vision", "prefill", "decode"):  # runs the method on its bundled inputs, raises on a mismatch
        outputs = bundled.verify_result_with_bundled_expected_output(method, 0, 1e-3, 1e-4)
        expected = np.load(llava_pte / "samples" / method / "expected.npz")
        assert len(outputs) == len(expected.files)
    readme = (bundle / "README.md").read_text()
    for method in ("vision", "prefill", "decode"):
        files = sorted((bundle / "inputs" / method).iterdir())
        assert files and f"--method_name {method} --inputs " in readme
        assert all(f"inputs/{method}/{f.name}" in readme for f in files)
    pixels = np.fromfile(bundle / "inputs" / "vision" / "0_pixel_values.bin", dtype=np.float32)
    sample = np.load(llava_pte / "samples" / "vision" / "inputs.npz")["pixel_values"]
    np.testing.assert_array_equal(pixels, sample.ravel())


def test_onnx_and_executorch_keep_the_same_tokens(llava_pte: Path, exported: Callable[..., Path]) -> None:
    from tpc.runtimes.onnxruntime import OnnxRuntime

    onnx_dir = exported("zoo:tiny-llava", "hiprune", 64)
    pruned = build(PruneRequest("zoo:tiny-llava", "hiprune", 64))
    et = ExecuTorchRuntime.load(
        llava_pte / "model.pte", Entry("vision", ("pixel_values",), ("image_embeds", "kept_indices"))
    )
    ort = OnnxRuntime.load(onnx_dir / "vision.onnx")
    for seed in range(4):
        pixels = as_arrays(pruned.samples(seed))["vision"]
        kept_et, kept_onnx = et.run(pixels)["kept_indices"], ort.run(pixels)["kept_indices"]
        np.testing.assert_array_equal(kept_et, kept_onnx)
        np.testing.assert_array_equal(kept_et, eager_outputs(pruned.components["vision"], pixels)["kept_indices"])


def test_inspect_an_export_directory_shows_the_delegation_table(llava_pte: Path, capsys, tmp_path: Path) -> None:
    assert main(["inspect", str(llava_pte), "--json", str(tmp_path / "i.json")]) == 0
    shown = capsys.readouterr().out
    assert "XnnpackBackend" in shown and "islands" in shown and "topk" in shown
    info = json.loads((tmp_path / "i.json").read_text())
    assert [c["method"] for c in info["components"]] == ["vision", "prefill", "decode"]


def _synthetic_etdump(program: Path, method: str, path: Path) -> dict[str, float]:
    """An ETDump in the runtime's format (ExecuTorch's own serializer) for one run of `method`: each instruction
    of the method's chain an OPERATOR_CALL / DELEGATE_CALL event, 1 us longer than the one before it. The pip
    runtime is built without the event tracer, so a phone's file is stood in for by this one."""
    from executorch.devtools.etdump import schema_flatcc as schema
    from executorch.devtools.etdump.serialize import serialize_to_etdump_flatcc

    from tpc.runtimes.executorch.etdump import instruction_names

    names = instruction_names(program, method)
    events, clock, expected = [], 0, {}
    for (chain, index), (name, kind) in sorted(names.items()):
        duration = 1000 * (index + 1)
        event_name = "DELEGATE_CALL" if kind == "delegate" else "OPERATOR_CALL"
        profile = schema.ProfileEvent(event_name, chain, index, -1, "", b"", clock, clock + duration)
        events.append(schema.Event(profile, None, None))
        expected[name] = expected.get(name, 0.0) + duration / 1e6
        clock += duration
    run = schema.ProfileEvent("Method::execute", 0, -1, -1, "", b"", 0, clock)
    events.append(schema.Event(run, None, None))
    etdump = schema.ETDumpFlatCC(version=0, run_data=[schema.RunData("Execute", -1, [], events)])
    data = serialize_to_etdump_flatcc(etdump)
    path.write_bytes(struct.pack("<I", len(data)) + data)  # size-prefixed, as ETDumpGen writes it
    return expected


def test_profile_reads_an_etdump_into_a_per_operator_table(llava_pte: Path, tmp_path: Path, capsys) -> None:
    etdump = tmp_path / "vision.etdump"
    expected = _synthetic_etdump(llava_pte / "model.pte", "vision", etdump)
    report_path = tmp_path / "profile.json"
    assert main(["profile", str(llava_pte), "--etdump", str(etdump), "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    validate(report)  # the schema of every profile: a phone's recording reads like a local run
    side = report["export"]
    assert side["headline"] == "method vision" and side["timing"]["runs"] == 1 and report["machine"]["cores"] is None
    breakdown = side["operators"]["vision"]
    assert breakdown["attribution"] == "component"
    got = {row["name"]: row["ms"] for row in breakdown["top"]}
    assert got.keys() == expected.keys()
    for name, total in expected.items():
        assert got[name] == pytest.approx(total)
    assert {row["stage"] for row in breakdown["top"] if row["name"].startswith("aten::topk")} == {"select"}
    assert "XnnpackBackend island 0" in got
    assert side["timing"]["p50_ms"] == pytest.approx(sum(expected.values()))
    assert "XnnpackBackend island 0" in capsys.readouterr().out
    (tmp_path / "junk.etdump").write_bytes(b"not an etdump")
    assert main(["profile", str(llava_pte), "--etdump", str(tmp_path / "junk.etdump")]) == 2


MATRIX = {  # every method each family accepts among hiprune, fastv, divprune, random
    "zoo:tiny-clip": ["hiprune", "random"],  # divprune: the fp16 CLI export below
    "zoo:tiny-siglip": ["hiprune", "random"],  # hiprune: tanh-GELU stays off XNNPACK
    # tiny-llava: hiprune is the end-to-end export above; FastV in a decoder prefill is the policy export's
    # step_prefill below; divprune and random prune the same tower as on tiny-clip
}


@pytest.mark.parametrize("model", sorted(MATRIX))
def test_every_method_lowers_runs_and_matches_eager(model: str, tmp_path: Path) -> None:
    """All of a model's method variants as methods of one program (one lowering), each run in the runtime on
    two seeds: kept indices equal to eager, every other output within the fp32 tolerance."""
    variants, parts = {}, {}
    for method in MATRIX[model]:
        pruned = build(PruneRequest(model, method, 16))
        variants[method] = pruned
        samples = pruned.samples(0)
        for name, component in pruned.components.items():
            parts[f"{method}__{name}"] = ExportPart(component.module, samples[name], component.output_names)
    artifacts = ExecuTorchTarget().export_components(parts, tmp_path, tmp_path)
    tolerance = TOLERANCES["fp32"]
    for method, pruned in variants.items():
        for seed in (0, 1):
            inputs = as_arrays(pruned.samples(seed))
            for name, component in pruned.components.items():
                artifact = artifacts[f"{method}__{name}"]
                assert artifact.graph["delegation"]["islands"] >= 1
                entry = Entry(artifact.method, component.input_names, component.output_names)
                session = ExecuTorchRuntime.load(tmp_path / artifact.path, entry)
                got, want = session.run(inputs[name]), eager_outputs(component, inputs[name])
                for output, value in want.items():
                    if output == "kept_indices" or value.dtype.kind in "iu":
                        np.testing.assert_array_equal(got[output], value, err_msg=f"{method} {name} {output}")
                    else:
                        np.testing.assert_allclose(
                            got[output], value, rtol=tolerance.rtol, atol=tolerance.atol,
                            err_msg=f"{method} {name} {output}",
                        )  # fmt: skip


def test_tiny_clip_cli_export_verify_and_fp16(tmp_path: Path) -> None:
    out = tmp_path / "clip"
    args = ["--method", "divprune", "--keep", "16", "--target", "executorch", "--dtype", "fp16", "--samples", "2"]
    assert main(["export", "zoo:tiny-clip", "--output", str(out), *args]) == 0
    manifest = json.loads((out / "tpc.json").read_text())
    assert manifest["components"][0]["method"] == "forward" and manifest["dtype"] == "fp16"
    assert manifest["verification"]["passed"] is True
    assert main(["verify", str(out), "--samples", "2"]) == 0


def test_target_errors_are_one_line(tmp_path: Path, capsys) -> None:
    code = main(["export", "zoo:tiny-clip", "--method", "random", "--keep", "8", "--output", str(tmp_path / "o"),
                 "--bundle"])  # fmt: skip
    assert code == 2 and "--bundle applies to --target executorch" in capsys.readouterr().err
    code = main(["export", "zoo:tiny-clip", "--method", "random", "--keep", "8", "--output", str(tmp_path / "o"),
                 "--target", "executorch", "--compute-units", "all"])  # fmt: skip
    assert code == 2 and "option 'compute_units' does not apply to target 'executorch'" in capsys.readouterr().err


STANDALONE_POLICY = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    from executorch.runtime import Runtime
    directory = sys.argv[1]
    manifest = json.load(open(f"{directory}/tpc.json"))
    (step,) = manifest["components"]
    prefill_spec, decode_spec = step["stages"]
    program = Runtime.get().load_program(f"{directory}/{step['artifact']}")
    prefill, decode = (program.load_method(s["method"]) for s in (prefill_spec, decode_spec))
    def run(method, spec, named):
        outputs = method.execute([torch.from_numpy(named[s["name"]]) for s in spec["inputs"]])
        return {s["name"]: out.numpy() for s, out in zip(spec["outputs"], outputs)}
    inputs = dict(np.load(f"{directory}/samples/step/inputs.npz"))
    expected = np.load(f"{directory}/samples/step/expected.npz")
    out = run(prefill, prefill_spec, inputs)  # the protocol in tpc.json's policy.stages
    tokens = [out["token"]]
    for s in range(manifest["policy"]["action_dim"] - 1):
        past = {k.replace("present.", "past."): v for k, v in out.items() if k.startswith("present.")}
        out = run(decode, decode_spec, {"input_ids": tokens[-1], "step": np.array([s]), **past})
        tokens.append(out["token"])
    np.testing.assert_array_equal(np.concatenate(tokens, axis=1), expected["action_tokens"])
    assert not any(name == "tpc" or name.startswith("tpc.") for name in sys.modules)
    print("ran", sorted(program.method_names))
    """
)


@pytest.fixture(scope="module")
def policy_pte(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("et") / "openvla"
    args = ["--method", "fastv", "--keep", "64", "--target", "executorch", "--bundle", "--samples", "2"]
    assert main(["export", "zoo:tiny-openvla", "--output", str(out), *args]) == 0
    return out


def test_a_policy_lowers_per_stage_and_verifies(policy_pte: Path, capsys, tmp_path: Path) -> None:
    """The control step as `step_prefill` + `step_decode` methods: verified against the one-graph eager step
    (outputs, teacher-forced, seeded episodes), each stage with its delegation report and its bundled check."""
    from executorch.extension.pybindings.portable_lib import _load_bundled_program_from_buffer

    manifest = json.loads((policy_pte / "tpc.json").read_text())
    verification = manifest["verification"]
    assert verification["passed"] is True and verification["episode"]["passed"] is True
    assert verification["teacher_forced"] and verification["kept_rows_agreeing"] == verification["kept_rows"] > 0
    (step,) = manifest["components"]
    assert step["name"] == "step" and step["method"] is None
    assert [s["method"] for s in step["stages"]] == ["step_prefill", "step_decode"]
    assert "G_decode" in manifest["policy"]["stages"]
    prefill, decode = step["stages"]
    assert prefill["teacher_forced"] == "teacher_forced/model.pte" and decode["teacher_forced"] is None
    assert [s["name"] for s in decode["inputs"]][:2] == ["input_ids", "step"]
    for stage in step["stages"]:
        assert stage["graph"]["delegation"]["islands"] >= 1
        assert (policy_pte / "samples" / stage["name"] / "inputs.npz").exists()
    assert prefill["graph"]["delegation"]["select_segments"] == 1
    bundled = _load_bundled_program_from_buffer((policy_pte / "bundle" / "model.bpte").read_bytes())
    for method in ("step_prefill", "step_decode"):
        bundled.verify_result_with_bundled_expected_output(method, 0, 1e-3, 1e-4)
    assert "step_decode" in (policy_pte / "bundle" / "README.md").read_text()
    assert main(["inspect", str(policy_pte)]) == 0
    shown = capsys.readouterr().out
    assert "step_prefill" in shown and "step_decode" in shown and "islands" in shown


def test_a_policy_pte_runs_in_a_separate_process_by_the_documented_protocol(policy_pte: Path) -> None:
    assert "ran ['step_decode', 'step_prefill']" in run_standalone(STANDALONE_POLICY, policy_pte)


def test_the_policy_runtime_replays_the_eager_episode_from_the_pte(policy_pte: Path) -> None:
    """`Policy.load` on the ExecuTorch export reproduces the eager episode recorded at export time."""
    from tpc.runtimes.policy import Policy

    policy = Policy.load(policy_pte)
    episode = np.load(policy_pte / "samples" / "episode.npz")
    for step, image in enumerate(episode["images"]):
        result = policy.step_result(image, episode["input_ids"])
        np.testing.assert_array_equal(result.tokens, episode["action_tokens"][step])
        assert episode["kept_mask"][step, result.kept_indices].all()


def test_a_missing_target_package_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from tpc.errors import UsageError
    from tpc.exporter import get_target

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "executorch" else real(name))
    with pytest.raises(UsageError, match=r"pip install 'tpc\[executorch\]' -c constraints.txt"):
        get_target("executorch").check_installed()


def profiled_against_a_twin(export: Path, tmp_path: Path, *extra: str) -> dict:
    """`tpc profile` of an ExecuTorch export against a byte-identical copy of it: the full report, validated."""
    twin = tmp_path / f"{export.name}-twin"
    shutil.copytree(export, twin)
    report_file, plot_file = tmp_path / f"{export.name}.json", tmp_path / f"{export.name}.png"
    args = ["profile", str(export), "--baseline", str(twin), "--runs", "4", "--warmup", "1", *extra]
    assert main([*args, "--json", str(report_file), "--plot", str(plot_file)]) == 0
    report = json.loads(report_file.read_text())
    validate(report)
    assert report["export"]["runtime"] == "executorch" and plot_file.stat().st_size > 0
    assert report["export"]["cold"]["load_ms"] > 0 and report["baseline"]["timing"]["runs"] == 4
    return report


def test_profile_executorch_exports_of_each_kind(llava_pte: Path, policy_pte: Path, tmp_path: Path) -> None:
    clip = tmp_path / "clip"
    assert main(["export", "zoo:tiny-clip", "--method", "hiprune", "--keep", "16", "--target", "executorch",
                 "--output", str(clip), "--samples", "1", "--no-verify"]) == 0  # fmt: skip
    encoder = profiled_against_a_twin(clip, tmp_path)
    assert encoder["export"]["kind"] == "encoder" and encoder["export"]["headline"] == "model call"
    vlm = profiled_against_a_twin(llava_pte, tmp_path, "--tokens", "3")
    assert vlm["export"]["generation_tokens"] == 3 and set(vlm["comparison"]["components"]) == {
        "vision",
        "prefill",
        "decode",
    }
    policy = profiled_against_a_twin(policy_pte, tmp_path, "--rate", "10")
    assert policy["export"]["kind"] == "vla" and set(policy["export"]["deadlines"]) == {"step"}
