"""`tpc.runtimes` is what ships to a Jetson or a phone host: it imports only the contract leaf (`tpc.contract`,
`tpc.errors`), numpy and its runtime package. So every kind of export (an encoder, a VLM's `generate`, a policy's
episode) loads and runs, matching what the export shipped, in a process where `import torch` fails."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

# Runs in a fresh interpreter. Before anything else, `torch`, `transformers` (and their submodules) cannot be
# imported; at the end, neither they nor any tpc module above the runtimes' layer (beyond what `import tpc` itself
# imports) has been imported.
NO_TORCH = textwrap.dedent(
    """
    import sys

    BLOCKED = ("torch", "torchvision", "torchaudio", "transformers")
    for name in BLOCKED:
        sys.modules[name] = None  # `import torch` (and `import torch.nn`, ...) raises ImportError


    class Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked: the runtimes must run without it")
            return None


    sys.meta_path.insert(0, Blocker())
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the blocker let torch import")

    import numpy as np

    import tpc  # the package root (`tpc/__init__.py`, its lazy registries): what any `tpc.*` import runs first

    PACKAGE = {m for m in sys.modules if m.startswith("tpc.")}

    from tpc.runtimes import VLM, Encoder
    from tpc.runtimes.policy import Policy

    encoder_dir, vlm_dir, policy_dir = sys.argv[1:4]

    # (a) an encoder export on its shipped sample, against the shipped expected outputs
    inputs = np.load(f"{encoder_dir}/samples/inputs.npz")
    expected = np.load(f"{encoder_dir}/samples/expected.npz")
    outputs = Encoder.load(encoder_dir).run(inputs["pixel_values"])
    assert sorted(outputs) == sorted(expected.files), (sorted(outputs), expected.files)
    for name in expected.files:
        if expected[name].dtype.kind in "iub":
            np.testing.assert_array_equal(outputs[name], expected[name], err_msg=name)
        else:
            np.testing.assert_allclose(outputs[name], expected[name], rtol=1e-3, atol=1e-4, err_msg=name)
    print("encoder ok", outputs["kept_indices"].shape)

    # (b) a VLM's greedy generation, against the tokens eager PyTorch generated at export
    sample = np.load(f"{vlm_dir}/samples/generation.npz")
    tokens = VLM.load(vlm_dir).generate(sample["pixel_values"], sample["input_ids"])
    np.testing.assert_array_equal(tokens, sample["tokens"])
    print("vlm ok", tokens.shape)

    # (c) a policy episode over the shipped frames, against what eager PyTorch did at every step
    episode = np.load(f"{policy_dir}/samples/episode.npz")
    policy = Policy.load(policy_dir)
    results = [policy.step_result(image, episode["input_ids"]) for image in episode["images"]]
    assert [r.graph for r in results] == [str(g) for g in episode["graph"]]
    np.testing.assert_array_equal(np.stack([r.tokens for r in results]), episode["action_tokens"])
    np.testing.assert_allclose(np.stack([r.action for r in results]), episode["actions"], rtol=1e-5, atol=1e-6)
    for step, result in enumerate(results):
        np.testing.assert_array_equal(np.flatnonzero(episode["kept_mask"][step]), np.sort(result.kept_indices))
    if "history" in episode.files:
        history = np.stack([r.history for r in results])
        np.testing.assert_allclose(history, episode["history"], rtol=1e-3, atol=1e-6)
    print("policy ok", len(results), "steps", "stateful" if policy.stateful else "stateless")

    assert "torch" not in sys.modules or sys.modules["torch"] is None, "torch was imported"
    LEAF = ("tpc.errors", "tpc.progress", "tpc.contract", "tpc.runtimes")  # and the package `tpc` itself
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED and sys.modules[m] is not None)
    upper = sorted(m for m in sys.modules if m.startswith("tpc.") and m not in PACKAGE and not any(
        m == leaf or m.startswith(leaf + ".") for leaf in LEAF
    ))
    assert not loaded and not upper, f"imported: {loaded + upper}"
    print("imported: none above the leaf")
    """
)


@pytest.fixture(scope="module")
def exports(exported: Callable[..., Path]) -> tuple[Path, Path, Path]:
    """An encoder, a VLM and a policy export, ONNX (the session's `exported`: the first two are shared with
    tests/test_runtime_inputs.py). The policy is FastV: one stateless graph, half the export time of VLA-Pruner."""
    return (
        exported("zoo:tiny-clip", "hiprune", 32),
        exported("zoo:tiny-llava", "hiprune", 64),
        exported("zoo:tiny-openvla", "fastv", 64),
    )


def test_every_export_kind_runs_where_torch_cannot_be_imported(exports: tuple[Path, Path, Path]) -> None:
    done = subprocess.run(
        [sys.executable, "-c", NO_TORCH, *map(str, exports)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["encoder", "vlm", "policy", "imported:"], done.stdout
    assert lines[-1] == "imported: none above the leaf"
