"""What the runtimes accept (issue 13): numpy of any float dtype and torch tensors in, shapes, dtypes and token ids
checked against the export with one UsageError line naming the expected layout, NaN/inf pixels warned about (or
refused with strict=True); damaged artifacts refused with one line, never a crash of the process; and the
runtimes never import torch to run an ONNX export."""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tpc.contract.protocols import DecoderLengths, ImageSpec, Normalization, PolicyPromptSpec, PolicyProtocol
from tpc.errors import UsageError
from tpc.runtimes import VLM, Encoder, NonFiniteInputWarning
from tpc.runtimes.base import TARGET_RUNTIMES
from tpc.runtimes.coreml import CoreMLRuntime
from tpc.runtimes.policy import Policy, pixel_shape

Change = Callable[[np.ndarray], Any] | None


@pytest.fixture(scope="module")
def clip(exported: Callable[..., Path]) -> Path:
    return exported("zoo:tiny-clip", "hiprune", 32)


@pytest.fixture(scope="module")
def llava(exported: Callable[..., Path]) -> Path:
    return exported("zoo:tiny-llava", "hiprune", 64)


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


# --- encoder ---------------------------------------------------------------------------------------------------


def test_encoder_takes_any_float_dtype_and_torch_tensors(clip: Path) -> None:
    encoder = Encoder.load(clip)
    pixels = np.load(clip / "samples" / "inputs.npz")["pixel_values"]
    expected = np.load(clip / "samples" / "expected.npz")
    features, indices = encoder(pixels)
    np.testing.assert_array_equal(indices, expected["kept_indices"])
    np.testing.assert_allclose(features, expected["kept_features"], rtol=1e-3, atol=1e-4)
    for same in (pixels.astype(np.float64), torch.from_numpy(pixels).requires_grad_()):  # exact in float32
        np.testing.assert_array_equal(encoder(same)[1], indices)
    half = encoder.run(torch.from_numpy(pixels).half())  # rounded: only the layout is certain
    assert half["kept_indices"].shape == indices.shape and half["kept_features"].dtype == np.float32


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda p: p.astype(np.int64), "got int64[1, 3, 64, 64]"),
        (lambda p: p[0], "got float32[3, 64, 64]"),
        (lambda p: p[..., :32], "got float32[1, 3, 64, 32]"),
        (lambda p: "pixels", "must be a numeric numpy array or torch tensor"),
    ],
)
def test_encoder_refuses_another_layout(clip: Path, change: Callable[[np.ndarray], Any], fragment: str) -> None:
    pixels = np.load(clip / "samples" / "inputs.npz")["pixel_values"]
    with pytest.raises(UsageError) as err:
        Encoder.load(clip)(change(pixels))
    message = one_line(err)
    assert fragment in message
    if "numeric" not in fragment:
        assert "a float array of shape (1, 3, 64, 64) (batch, channels, height, width" in message


def test_encoder_warns_on_nan_and_refuses_it_when_strict(clip: Path) -> None:
    pixels = np.load(clip / "samples" / "inputs.npz")["pixel_values"].copy()
    pixels[0, 0, 0, :2] = [np.nan, np.inf]
    with pytest.warns(NonFiniteInputWarning, match="1 NaN and 1 infinite values"):
        Encoder.load(clip)(pixels)
    with pytest.raises(UsageError, match="1 NaN and 1 infinite"):
        Encoder.load(clip, strict=True)(pixels)
    with pytest.raises(UsageError, match="NaN"):
        Encoder.load(clip).run(pixels, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Encoder.load(clip)(np.full((1, 3, 64, 64), 1e6))  # finite in float32: no warning


def test_each_kind_names_its_loader(clip: Path, llava: Path) -> None:
    with pytest.raises(UsageError, match=r"is a VLM export, not an encoder: load it with tpc.runtimes.VLM.load"):
        Encoder.load(llava)
    with pytest.raises(UsageError, match=r"is an encoder export, not a VLM: load it with tpc.runtimes.Encoder.load"):
        VLM.load(clip)


def test_target_runtimes_agree_with_the_exporters() -> None:
    from tpc.exporter import TARGETS

    assert TARGET_RUNTIMES == {name: target.runtime for name, target in TARGETS.items()}


# --- VLM -------------------------------------------------------------------------------------------------------


def test_generate_takes_torch_tensors_and_any_float_dtype(llava: Path) -> None:
    vlm = VLM.load(llava)
    sample = np.load(llava / "samples" / "generation.npz")
    pixels, ids, eager = sample["pixel_values"], sample["input_ids"], sample["tokens"]
    # the README's snippet: the processor's torch tensors as they are
    np.testing.assert_array_equal(vlm.generate(torch.from_numpy(pixels), torch.from_numpy(ids)), eager)
    np.testing.assert_array_equal(vlm.generate(pixels.astype(np.float64), ids.astype(np.int32)), eager)
    assert vlm.generate(pixels.astype(np.float16), ids, max_new_tokens=2).shape == (1, 2)


@pytest.mark.parametrize(
    ("pixels", "ids", "fragment"),
    [
        (lambda p: p.astype(np.uint8), None, "pixel_values must be a float array of shape (1, 3, 64, 64)"),
        (lambda p: p[0], None, "got float32[3, 64, 64]"),
        (None, lambda i: i.astype(np.float32), "input_ids must be integer token ids of shape (1, 303)"),
        (None, lambda i: i[:, 1:], "got int64[1, 302]"),
        (None, lambda i: i[0], "got int64[303]"),
        (None, lambda i: np.where(i == 500, i, 512), "ids outside 0..511 (e.g. 512)"),
        (None, lambda i: np.where(i == 500, i, -1), "vocabulary has 512 tokens, the width of the prefill"),
    ],
)
def test_generate_refuses_another_layout(
    llava: Path, pixels: Callable | None, ids: Callable | None, fragment: str
) -> None:
    sample = np.load(llava / "samples" / "generation.npz")
    given_pixels, given_ids = sample["pixel_values"], sample["input_ids"]
    with pytest.raises(UsageError) as err:
        VLM.load(llava).generate(
            pixels(given_pixels) if pixels else given_pixels, ids(given_ids) if ids else given_ids, max_new_tokens=2
        )
    message = one_line(err)
    assert fragment in message
    if "outside" not in fragment and "vocabulary" not in fragment:  # the layout is named
        assert "(batch, channels, height, width" in message or "47 text + 256 image tokens (id 500)" in message


def test_generate_warns_on_nan_pixels_and_refuses_them_when_strict(llava: Path) -> None:
    sample = np.load(llava / "samples" / "generation.npz")
    pixels = sample["pixel_values"].copy()
    pixels[0, 1] = np.nan
    with pytest.warns(NonFiniteInputWarning, match="4096 NaN and 0 infinite") as record:
        VLM.load(llava).generate(pixels, sample["input_ids"], max_new_tokens=2)
    assert record[0].filename == __file__  # points at the caller's line
    with pytest.raises(UsageError, match="NaN"):
        VLM.load(llava, strict=True).generate(pixels, sample["input_ids"], max_new_tokens=2)
    with pytest.raises(UsageError, match=r"is not an integer in 1\.\.32"):
        VLM.load(llava).generate(sample["pixel_values"], sample["input_ids"], max_new_tokens=2.5)


# --- policy: the loop over two stand-in step graphs (the checks run before any graph) ---------------------------

POLICY = PolicyProtocol(
    action_dim=7,
    n_action_bins=256,
    action_vocab_size=1000,
    unnorm_key=None,
    action_stats={"q01": [-1.0] * 7, "q99": [1.0] * 7},
    image=ImageSpec(32, (Normalization("dinov2", (0.5,) * 3, (0.5,) * 3),) * 2),
    prompt=PolicyPromptSpec(
        text_tokens=12, image_start=1, image_tokens=16, length=28, template="In: {x}?\nOut:", empty_token_id=29871
    ),
    kept_image_tokens=16,
    decoder_lengths=DecoderLengths((28,), (28,)),
    state=None,
    graphs={"step": "every step"},
    protocol="step(image, prompt ids): action_tokens = step(pixel_values, input_ids); decode them",
)


def stand_in_step(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A step graph's interface (what Policy feeds and reads), for checking what reaches it."""
    assert inputs["pixel_values"].dtype == np.float32 and inputs["pixel_values"].shape == (1, 6, 32, 32)
    assert inputs["input_ids"].dtype == np.int64 and inputs["input_ids"].shape == (1, 12)
    return {"action_tokens": np.full((1, 7), 900, dtype=np.int64)}


def test_policy_takes_torch_and_float_pixels() -> None:
    policy = Policy({"step": stand_in_step}, POLICY)
    ids = np.arange(1, 13)
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    assert policy.step(image, ids).shape == (7,)
    assert policy.step(torch.from_numpy(image), torch.from_numpy(ids)[None]).shape == (7,)
    assert policy.step(np.zeros(pixel_shape(POLICY), dtype=np.float64), ids.tolist()).shape == (7,)
    with pytest.warns(NonFiniteInputWarning):
        policy.step(np.full(pixel_shape(POLICY), np.nan), ids)
    with pytest.raises(UsageError, match="NaN"):
        Policy({"step": stand_in_step}, POLICY, strict=True).step(np.full(pixel_shape(POLICY), np.nan), ids)


@pytest.mark.parametrize(
    ("ids", "fragments"),
    [
        (np.arange(1, 11), ["has 10 tokens", "takes 12 text tokens", "28-token decoder prompt", "--prompt-len 10"]),
        (np.arange(1, 29), ["has 28 tokens", "takes 12 text tokens", "pass only the 12 text ids", "16 image tokens"]),
        (np.arange(1, 13) * 1.0, ["integer token ids of shape (1, 12)", "got float64[1, 12]"]),
        (np.arange(1, 13) + 990, ["ids outside 0..999 (e.g. 1000)", "policy.action_vocab_size"]),
        (np.arange(1, 25).reshape(2, 12), ["of shape (1, 12)", "got int64[2, 12]"]),
    ],
)
def test_policy_prompt_errors_name_the_layout_and_the_fix(ids: np.ndarray, fragments: list[str]) -> None:
    with pytest.raises(UsageError) as err:
        Policy({"step": stand_in_step}, POLICY).step(np.zeros((32, 32, 3), dtype=np.uint8), ids)
    message = one_line(err)
    for fragment in fragments:
        assert fragment in message


def test_policy_refuses_an_image_of_another_layout() -> None:
    policy = Policy({"step": stand_in_step}, POLICY)
    for image in (np.zeros((32, 32, 3), dtype=np.float32), np.zeros((16, 16, 3), dtype=np.uint8)):
        with pytest.raises(UsageError, match=r"\(32, 32, 3\) uint8 RGB array .* pixel values \(1, 6, 32, 32\)"):
            policy.step(image, np.arange(1, 13))
    with pytest.raises(UsageError, match=r"got float32\[1, 3, 32, 32\]"):
        policy.step(np.zeros((1, 3, 32, 32), dtype=np.float32), np.arange(1, 13))


# --- damaged artifacts: one line, and the process lives ---------------------------------------------------------

DAMAGED = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from tpc.errors import UsageError
    from tpc.runtimes import Encoder
    from tpc.runtimes.executorch import ExecuTorchRuntime
    from tpc.runtimes.onnxruntime import OnnxRuntime

    def attempt(load, path):
        try:
            load(path)
        except UsageError as err:
            print(err)
        else:
            print("LOADED", path)

    root = Path(sys.argv[1])
    for path in sorted(root.glob("*.onnx")):
        attempt(OnnxRuntime.load, path)
    attempt(Encoder.load, root / "export")
    for path in sorted(root.glob("*.pte")):
        attempt(ExecuTorchRuntime.load, path)
    print("alive")
    """
)


def pte_header(claimed: int) -> bytes:
    """An ExecuTorch program header (flatbuffer root offset, `ET12`, extended header `eh00`) claiming `claimed`
    bytes of program and no segments."""
    sizes = (32).to_bytes(4, "little") + claimed.to_bytes(8, "little") + bytes(16)
    return (64).to_bytes(4, "little") + b"ET12" + b"eh00" + sizes


def test_damaged_artifacts_are_one_line_and_never_abort(clip: Path, tmp_path: Path) -> None:
    model = (clip / "model.onnx").read_bytes()
    noise = random.Random(0).randbytes
    files = {
        "truncated.onnx": model[: len(model) // 2],
        "random.onnx": noise(4096),
        "empty.onnx": b"",
        "random.pte": noise(4096),
        "empty.pte": b"",
        "truncated.pte": pte_header(4096) + noise(1000),
    }
    if importlib.util.find_spec("executorch") is not None:  # complete by its header: executorch's verifier runs
        files["garbage.pte"] = pte_header(4096) + noise(4096 - 40)
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    shutil.copytree(clip, tmp_path / "export")
    (tmp_path / "export" / "model.onnx").write_bytes(model[:1000])
    result = subprocess.run([sys.executable, "-c", DAMAGED, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[-1] == "alive" and not any(line.startswith("LOADED") for line in lines), lines
    expected = [
        ("empty.onnx", "(the file is empty); re-export it"),
        ("random.onnx", "is not a valid ONNX model (Protobuf parsing failed.); re-export it"),
        ("truncated.onnx", "is not a valid ONNX model (Protobuf parsing failed.); re-export it"),
        ("model.onnx", "is not a valid ONNX model"),
        ("empty.pte", "is not a valid ExecuTorch program (the file is empty); re-export it"),
        ("garbage.pte", "is not a valid ExecuTorch program (Verification failed; data may be truncated or corrupt)"),
        ("random.pte", "(no ExecuTorch file identifier at bytes 4..8); re-export it"),
        ("truncated.pte", "(truncated: its header says 4096 bytes, the file has 1040); re-export it"),
    ]
    expected = [(name, fragment) for name, fragment in expected if name in files or name == "model.onnx"]
    for (name, fragment), line in zip(expected, lines[:-1], strict=True):
        assert name in line and fragment in line, (name, line)


def test_missing_or_damaged_core_ml_package_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"does not exist: the export is incomplete; re-export it"):
        CoreMLRuntime.load(tmp_path / "missing.mlpackage")
    (tmp_path / "file.mlpackage").write_bytes(b"\x00" * 10)
    with pytest.raises(UsageError, match=r"not a valid Core ML package \(not a directory\)"):
        CoreMLRuntime.load(tmp_path / "file.mlpackage")
    package = tmp_path / "model.mlpackage"
    package.mkdir()
    with pytest.raises(UsageError, match=r"\(it has no Manifest.json\)"):
        CoreMLRuntime.load(package)
    item = {"path": "com.apple.CoreML/model.mlmodel"}
    (package / "Manifest.json").write_text(json.dumps({"itemInfoEntries": {"a": item}, "rootModelIdentifier": "a"}))
    with pytest.raises(UsageError, match=r"'Data/com.apple.CoreML/model.mlmodel' is missing or empty"):
        CoreMLRuntime.load(package)


# --- no torch ---------------------------------------------------------------------------------------------------

NO_TORCH = textwrap.dedent(
    """
    import sys
    import numpy as np
    import tpc.runtimes
    from tpc.runtimes import VLM, Encoder
    from tpc.runtimes.policy import Policy
    encoder, llava = sys.argv[1], sys.argv[2]
    pixels = np.load(f"{encoder}/samples/inputs.npz")["pixel_values"]
    features, kept = Encoder.load(encoder)(pixels.astype(np.float64))
    sample = np.load(f"{llava}/samples/generation.npz")
    tokens = VLM.load(llava).generate(sample["pixel_values"], sample["input_ids"])
    assert (tokens == sample["tokens"]).all(), (tokens, sample["tokens"])
    heavy = [n for n in ("torch", "transformers", "tpc.exporter.base", "tpc.pipeline") if n in sys.modules]
    print("imported:", heavy)
    """
)


def test_running_an_onnx_export_never_imports_torch(clip: Path, llava: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", NO_TORCH, str(clip), str(llava)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "imported: []", result.stdout
