"""OpenVLA-style policies: the release checkpoint layout, the unrolled control step, VLA-Pruner's state as tensors.

The checkpoint test writes a directory the way the public `openvla/openvla-7b` release lays it out (timm names for
the towers, fused qkv, layer scales under `scale_factor`, SigLIP's unused attention-pool head) and checks the loaded
towers against a direct timm-semantics forward over the raw tensors. The export tests run the exported graphs in
onnxruntime, from this process and from one that has only onnxruntime and numpy.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from tpc.contract.manifest import TensorSpec
from tpc.contract.names import DECODE, PREFILL
from tpc.errors import UsageError
from tpc.exporting import export
from tpc.kinds.policy import seeded_frames, seeded_prompt
from tpc.methods import fastv, vla_pruner
from tpc.models_zoo import resolve
from tpc.passes.policy_stages import policy_stages
from tpc.pipeline import Component, Pruned, PruneRequest, as_arrays, build
from tpc.profiling.report import validate
from tpc.runtimes.policy import Policy, actions_from_tokens
from tpc.runtimes.staged import StagedStep
from tpc.verification import eager_outputs

TOWERS = [
    {"family": "dinov2", "hidden_size": 32, "num_layers": 3, "num_heads": 2, "intermediate_size": 64,
     "patch_size": 14, "registers": 4},
    {"family": "siglip", "hidden_size": 32, "num_layers": 3, "num_heads": 2, "intermediate_size": 64,
     "patch_size": 14},
]  # fmt: skip
PREFIXES = ("vision_backbone.featurizer.", "vision_backbone.fused_featurizer.")
NORM_STATS = {
    "libero_spatial": {
        "action": {
            "q01": [-0.5, -0.6, -0.7, -0.1, -0.1, -0.2, 0.0],
            "q99": [0.5, 0.6, 0.7, 0.1, 0.1, 0.2, 1.0],
            "mask": [True] * 6 + [False],
        }
    }
}


def _release_state(seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """Random weights under the release's names, and the text config they belong to."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.1) -> torch.Tensor:
        return torch.randn(shape, generator=generator) * scale

    state: dict[str, torch.Tensor] = {}
    for prefix, spec in zip(PREFIXES, TOWERS, strict=True):
        d, inner = spec["hidden_size"], spec["intermediate_size"]
        state |= {f"{prefix}patch_embed.proj.weight": rand(d, 3, 14, 14), f"{prefix}patch_embed.proj.bias": rand(d)}
        state[f"{prefix}pos_embed"] = rand(1, 256, d, scale=0.5)
        if spec["family"] == "dinov2":
            state |= {f"{prefix}cls_token": rand(1, 1, d), f"{prefix}reg_token": rand(1, 4, d)}
        for block in range(spec["num_layers"]):
            b = f"{prefix}blocks.{block}."
            for norm in ("norm1", "norm2"):
                state |= {f"{b}{norm}.weight": 1 + rand(d), f"{b}{norm}.bias": rand(d)}
            state |= {f"{b}attn.qkv.weight": rand(3 * d, d, scale=0.4), f"{b}attn.qkv.bias": rand(3 * d)}
            state |= {f"{b}attn.proj.weight": rand(d, d), f"{b}attn.proj.bias": rand(d)}
            state |= {f"{b}mlp.fc1.weight": rand(inner, d), f"{b}mlp.fc1.bias": rand(inner)}
            state |= {f"{b}mlp.fc2.weight": rand(d, inner), f"{b}mlp.fc2.bias": rand(d)}
            if spec["family"] == "dinov2":
                state |= {f"{b}ls1.scale_factor": 1 + rand(d), f"{b}ls2.scale_factor": 1 + rand(d)}
        state |= {f"{prefix}norm.weight": 1 + rand(d), f"{prefix}norm.bias": rand(d)}
    pool = f"{PREFIXES[1]}attn_pool."  # SigLIP's MAP head: in the release, unused by the policy
    state |= {f"{pool}latent": rand(1, 1, 32), f"{pool}q.weight": rand(32, 32), f"{pool}kv.weight": rand(64, 32)}
    vision_dim, llm_dim = 64, 48
    state |= {"projector.fc1.weight": rand(4 * vision_dim, vision_dim), "projector.fc1.bias": rand(4 * vision_dim)}
    state |= {"projector.fc2.weight": rand(llm_dim, 4 * vision_dim), "projector.fc2.bias": rand(llm_dim)}
    state |= {"projector.fc3.weight": rand(llm_dim, llm_dim), "projector.fc3.bias": rand(llm_dim)}
    text = LlamaConfig(
        vocab_size=320, hidden_size=llm_dim, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, initializer_range=0.2, pad_token_id=256,
    )  # fmt: skip
    torch.manual_seed(seed)
    state |= {f"language_model.{k}": v for k, v in LlamaForCausalLM(text).state_dict().items()}
    return state, text.to_dict()


def write_release_checkpoint(path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny checkpoint in the openvla-7b release layout (config fields and weight names)."""
    from safetensors.torch import save_file

    state, text = _release_state(seed)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    config = {
        "architectures": ["OpenVLAForActionPrediction"],
        "auto_map": {"AutoConfig": "configuration_prismatic.OpenVLAConfig"},
        "model_type": "openvla",
        "arch_specifier": "no-align+fused-gelu-mlp",
        "vision_backbone_id": "dinosiglip-vit-so-224px",
        "llm_backbone_id": "llama2-7b-pure",
        "use_fused_vision_backbone": True,
        "image_resize_strategy": "resize-naive",
        "image_sizes": [224, 224],
        "timm_model_ids": ["vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_224"],
        "timm_override_act_layers": [None, None],
        "tower_specs": TOWERS,
        "llm_max_length": 2048,
        "n_action_bins": 256,
        "norm_stats": NORM_STATS,
        "pad_to_multiple_of": 64,
        "pad_token_id": 256,
        "text_config": {"model_type": "llama", **{k: text[k] for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "pad_token_id")}},
        "torch_dtype": "float32",
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return state


def timm_tower(state: dict[str, torch.Tensor], prefix: str, spec: dict, pixels: torch.Tensor) -> torch.Tensor:
    """timm's VisionTransformer as OpenVLA uses it: patches + pos_embed (patches only), CLS/registers prepended,
    pre-norm blocks with fused qkv (and layer scale for DINOv2), output of the second-to-last block, prefix cut."""
    x = F.conv2d(pixels, state[f"{prefix}patch_embed.proj.weight"], state[f"{prefix}patch_embed.proj.bias"], stride=14)
    x = x.flatten(2).transpose(1, 2) + state[f"{prefix}pos_embed"]
    prefix_tokens = 0
    if spec["family"] == "dinov2":
        x = torch.cat([state[f"{prefix}cls_token"], state[f"{prefix}reg_token"], x], dim=1)
        prefix_tokens = 5
    d, heads = spec["hidden_size"], spec["num_heads"]
    for block in range(spec["num_layers"] - 1):
        b = f"{prefix}blocks.{block}."
        h = F.layer_norm(x, (d,), state[f"{b}norm1.weight"], state[f"{b}norm1.bias"], eps=1e-6)
        qkv = F.linear(h, state[f"{b}attn.qkv.weight"], state[f"{b}attn.qkv.bias"])
        q, k, v = qkv.reshape(1, -1, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) * (d // heads) ** -0.5, dim=-1) @ v
        out = F.linear(
            attn.transpose(1, 2).reshape(1, -1, d), state[f"{b}attn.proj.weight"], state[f"{b}attn.proj.bias"]
        )
        x = x + (out * state[f"{b}ls1.scale_factor"] if spec["family"] == "dinov2" else out)
        h = F.layer_norm(x, (d,), state[f"{b}norm2.weight"], state[f"{b}norm2.bias"], eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, state[f"{b}mlp.fc1.weight"], state[f"{b}mlp.fc1.bias"])),
                     state[f"{b}mlp.fc2.weight"], state[f"{b}mlp.fc2.bias"])  # fmt: skip
        x = x + (h * state[f"{b}ls2.scale_factor"] if spec["family"] == "dinov2" else h)
    return x[:, prefix_tokens:]


def eager_reference(pruned: Pruned, inputs: dict[str, np.ndarray]) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The loaded policy with transformers' eager attention (it returns the maps), and the sample's tensors."""
    model = pruned.source.adapter.load(pruned.source.path)
    model.language_model.config._attn_implementation = "eager"
    return model, torch.from_numpy(inputs["pixel_values"]), torch.from_numpy(inputs["input_ids"])


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    path = tmp_path_factory.mktemp("openvla-release") / "checkpoint"
    return path, write_release_checkpoint(path)


def test_release_checkpoint_loads_onto_transformers_towers(release_dir: tuple[Path, dict]) -> None:
    path, state = release_dir
    source = resolve(str(path))
    assert source.adapter.family == "openvla"
    model = source.adapter.load(source.path)
    pixels = torch.randn(1, 6, 224, 224, generator=torch.Generator().manual_seed(1))
    want = torch.cat(
        [timm_tower(state, p, spec, x) for p, spec, x in zip(PREFIXES, TOWERS, pixels.split(3, dim=1), strict=True)],
        dim=2,
    )
    with torch.no_grad():
        got = model.vision_backbone(pixels)
    assert got.shape == (1, 256, 64)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert torch.equal(model.projector.fc3.weight, state["projector.fc3.weight"])
    layer = model.language_model.model.layers[4].self_attn.k_proj.weight
    assert torch.equal(layer, state["language_model.model.layers.4.self_attn.k_proj.weight"])


def test_release_checkpoint_with_unknown_weights_is_one_clear_error(tmp_path: Path) -> None:
    write_release_checkpoint(tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "model.safetensors"))
    state["vision_backbone.featurizer.blocks.0.attn.q_norm.weight"] = torch.ones(32)
    save_file(state, str(tmp_path / "model.safetensors"))
    source = resolve(str(tmp_path))
    with pytest.raises(UsageError, match=r"does not know: vision_backbone\.featurizer\.blocks\.0\.attn\.q_norm"):
        source.adapter.load(source.path)


def test_step_graph_decodes_as_transformers_generate(release_dir: tuple[Path, dict]) -> None:
    """The unpruned step graph (towers, prefill, 6 unrolled decode steps) = the release's predict_action tokens."""
    path, _ = release_dir
    pruned = build(PruneRequest(str(path), "none", None, prompt_len=20))
    model = pruned.source.adapter.load(pruned.source.path)
    for seed in range(3):
        inputs = as_arrays(pruned.samples(seed))["step"]
        got = eager_outputs(pruned.components["step"], inputs)["action_tokens"]
        pixels, ids = (torch.from_numpy(inputs[k]) for k in ("pixel_values", "input_ids"))
        want = model.generate_action_tokens(pixels, ids, action_dim=7)
        np.testing.assert_array_equal(got, want.numpy())


def test_warmup_importance_equals_functional_api_on_eager_attentions(release_dir: tuple[Path, dict]) -> None:
    """The tapped history vector = vla_pruner.action_importance on transformers' own eager attention maps."""
    path, _ = release_dir
    pruned = build(PruneRequest(str(path), "vla-pruner", 64, prompt_len=20))
    history_layer = pruned.plan.method_params["history_layer"]
    inputs = as_arrays(pruned.samples(0))["warmup"]
    got = eager_outputs(pruned.components["warmup"], inputs)
    model, pixels, ids = eager_reference(pruned, inputs)
    with torch.no_grad():
        embeds = model.multimodal_embeddings(pixels, ids)
        out = model.language_model.generate(
            inputs_embeds=embeds, max_new_tokens=7, min_new_tokens=7, do_sample=False,
            output_attentions=True, return_dict_in_generate=True,
        )  # fmt: skip
    rows = [step[history_layer][0, :, -1, :] for step in out.attentions]  # the 7 action-producing queries
    want = vla_pruner.action_importance(rows, torch.arange(256), image_start=1, num_image=256)
    np.testing.assert_array_equal(got["action_tokens"], out.sequences.numpy())
    np.testing.assert_allclose(got["action_importance"][0], want.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got["history_next"][-1], want.numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_array_equal(got["history_next"][:-1], inputs["history"][1:])


def test_pruned_selection_equals_functional_api(release_dir: tuple[Path, dict]) -> None:
    """The pruned graph's kept set = semantic_scores + History guide + select on transformers' eager layer-2 map."""
    path, _ = release_dir
    pruned = build(PruneRequest(str(path), "vla-pruner", 48, {"criterion": "prefill"}, prompt_len=20))
    inputs = as_arrays(pruned.samples(3))["pruned"]
    kept = eager_outputs(pruned.components["pruned"], inputs)["kept_indices"]
    model, pixels, ids = eager_reference(pruned, inputs)
    with torch.no_grad():
        embeds = model.multimodal_embeddings(pixels, ids)
        attentions = model.language_model(inputs_embeds=embeds, output_attentions=True).attentions
        image_embeds = model.image_embeddings(pixels)
    scores = vla_pruner.semantic_scores(attentions[2], 1, 256, "prefill")
    history = vla_pruner.History(num_tokens=256)
    for vector in inputs["history"]:
        history.push(torch.from_numpy(vector))
    want = vla_pruner.select(scores, history.guide(), image_embeds, 48)
    np.testing.assert_array_equal(kept, want.numpy())


def test_fastv_on_a_policy_keeps_the_top_of_the_last_row(release_dir: tuple[Path, dict]) -> None:
    """FastV (VLA-Pruner's use_temporal=False baseline) in the step graph: stateless, one graph, last-row scores."""
    path, _ = release_dir
    pruned = build(PruneRequest(str(path), "fastv", 40, {"layer": "3"}, prompt_len=20))
    assert list(pruned.components) == ["step"]
    inputs = as_arrays(pruned.samples(1))["step"]
    kept = eager_outputs(pruned.components["step"], inputs)["kept_indices"]
    model, pixels, ids = eager_reference(pruned, inputs)
    with torch.no_grad():
        attentions = model.language_model(
            inputs_embeds=model.multimodal_embeddings(pixels, ids), output_attentions=True
        ).attentions
    want = fastv.select(fastv.scores(attentions[2], 1, 256), 40)
    np.testing.assert_array_equal(kept, want.numpy())


@pytest.mark.parametrize(("method", "keep"), [("vla-pruner", 64), ("fastv", 48), ("none", None)])
def test_prefill_and_decode_stages_compute_the_one_graph_step(method: str, keep: int | None) -> None:
    """The per-stage lowering (ExecuTorch's): prefill once + decode 6 times on the static cache, driven by the
    runtime's StagedStep, = the unrolled step graph, tokens and kept indices exactly, action importance to ulps."""
    pruned = build(PruneRequest("zoo:tiny-openvla", method, keep))
    for seed in (0, 1):
        samples = as_arrays(pruned.samples(seed))
        for name, component in pruned.components.items():
            want = eager_outputs(component, samples[name])
            stages = policy_stages(component.module, {k: torch.from_numpy(v) for k, v in samples[name].items()})
            prefill, decode = (eager_session(stages[stage].part.module) for stage in (PREFILL, DECODE))
            spec = SimpleNamespace(outputs=[TensorSpec.of(n, a) for n, a in want.items()])
            got = StagedStep(prefill, decode, spec).run(samples[name])
            assert list(got) == list(want)
            for output, value in want.items():
                if value.dtype == np.float32:
                    np.testing.assert_allclose(got[output], value, rtol=1e-5, atol=1e-8, err_msg=output)
                else:
                    np.testing.assert_array_equal(got[output], value, err_msg=output)


def eager_session(module: torch.nn.Module) -> SimpleNamespace:
    component = Component("", module, tuple(module.input_names), module.output_names)
    return SimpleNamespace(run=functools.partial(eager_outputs, component))


@pytest.fixture(scope="module")
def vla_export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """zoo:tiny-openvla, VLA-Pruner keep 64, exported and verified (the issue's command)."""
    output = tmp_path_factory.mktemp("vla") / "export"
    result = export(PruneRequest("zoo:tiny-openvla", "vla-pruner", 64), "onnx", output, samples=2)
    assert result.report is not None and result.report.passed, result.report
    return output


def test_export_documents_state_and_static_graphs(vla_export: Path) -> None:
    import onnx

    manifest = json.loads((vla_export / "tpc.json").read_text())
    policy = manifest["policy"]
    assert policy["state"]["history"]["shape"] == [3, 256]
    assert set(policy["graphs"]) == {"warmup", "pruned"}
    assert manifest["verification"]["episode"]["passed"]
    assert manifest["verification"]["episode"]["total_steps"] >= 8
    pruned = next(c for c in manifest["components"] if c["name"] == "pruned")
    shapes = {t["name"]: t["shape"] for t in pruned["inputs"] + pruned["outputs"]}
    assert shapes == {
        "pixel_values": [1, 6, 224, 224], "input_ids": [1, 24], "history": [3, 256],
        "action_tokens": [1, 7], "kept_indices": [1, 64], "action_importance": [1, 256], "history_next": [3, 256],
    }  # fmt: skip
    graph = onnx.load(str(vla_export / "pruned.onnx"))
    for value in [*graph.graph.input, *graph.graph.output]:
        assert all(d.HasField("dim_value") for d in value.type.tensor_type.shape.dim), value.name


EPISODE_SCRIPT = """
import json, sys
import numpy as np
import onnxruntime as ort

directory = sys.argv[1]
manifest = json.load(open(f"{directory}/tpc.json"))
state = manifest["policy"]["state"]
episode = np.load(f"{directory}/samples/episode.npz")
sessions = {c["name"]: ort.InferenceSession(f"{directory}/{c['artifact']}") for c in manifest["components"]}
stats = manifest["policy"]["image"]["normalization"]

def pixels(image):
    x = image.astype(np.float32).transpose(2, 0, 1) / 255.0
    planes = [(x - np.array(s["mean"], np.float32)[:, None, None]) / np.array(s["std"], np.float32)[:, None, None]
              for s in stats]
    return np.concatenate(planes)[None].astype(np.float32)

history = np.zeros(state["history"]["shape"], np.float32)
history_len, window = 0, state["history_len"]["max"]
for step, image in enumerate(episode["images"]):
    graph = "warmup" if history_len < window else "pruned"
    out = dict(zip([o.name for o in sessions[graph].get_outputs()],
                   sessions[graph].run(None, {"pixel_values": pixels(image), "input_ids": episode["input_ids"],
                                              "history": history})))
    assert graph == str(episode["graph"][step]), (step, graph)
    assert np.array_equal(out["action_tokens"][0], episode["action_tokens"][step]), step
    kept = out.get("kept_indices", np.arange(256)[None])[0]
    assert np.array_equal(np.flatnonzero(episode["kept_mask"][step]), kept), step
    history, history_len = out["history_next"], min(history_len + 1, window)
    assert np.allclose(history, episode["history"][step], rtol=1e-3, atol=1e-6), step
assert "torch" not in sys.modules
print("episode ok", len(episode["images"]), "steps")
"""


def test_separate_process_replays_the_episode_with_onnxruntime_alone(vla_export: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", EPISODE_SCRIPT, str(vla_export)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "episode ok 8 steps" in done.stdout


def test_policy_runtime_carries_the_state(vla_export: Path) -> None:
    policy = Policy.load(vla_export)
    episode = np.load(vla_export / "samples" / "episode.npz")
    results = [policy.step_result(image, episode["input_ids"]) for image in episode["images"][:5]]
    assert [r.graph for r in results] == ["warmup"] * 3 + ["pruned"] * 2
    assert [len(r.kept_indices) for r in results] == [256] * 3 + [64] * 2
    np.testing.assert_array_equal(np.stack([r.tokens for r in results]), episode["action_tokens"][:5])
    np.testing.assert_allclose(results[-1].action, actions_from_tokens(results[-1].tokens, policy.policy))
    np.testing.assert_allclose(results[-1].action, episode["actions"][4])
    policy.reset()
    assert policy.history_len == 0 and not policy.history.any()
    assert policy.step_result(episode["images"][0], episode["input_ids"]).graph == "warmup"
    with pytest.raises(UsageError, match="this export takes 24"):
        policy.step(episode["images"][0], episode["input_ids"][0, :10])
    with pytest.raises(UsageError, match=r"\(224, 224, 3\) uint8"):
        policy.step(episode["images"][0][:100], episode["input_ids"])


def test_actions_decode_as_the_release_does() -> None:
    policy = SimpleNamespace(
        n_action_bins=256, action_vocab_size=32000, action_stats=NORM_STATS["libero_spatial"]["action"]
    )
    tokens = np.array([31999, 31744, 31872, 100, 31900, 31950, 31744])  # bin 0, bin 255 (clipped to 254), ...
    actions = actions_from_tokens(tokens, policy)
    centers = (np.linspace(-1, 1, 256)[:-1] + np.linspace(-1, 1, 256)[1:]) / 2
    assert actions[0] == pytest.approx(0.5 * (centers[0] + 1) * 1.0 - 0.5)
    assert actions[1] == pytest.approx(0.5 * (centers[254] + 1) * 1.2 - 0.6)
    assert actions[3] == pytest.approx(0.5 * (centers[254] + 1) * 0.2 - 0.1)  # id 100: far below, clipped
    assert actions[6] == pytest.approx(centers[254])  # the gripper is not un-normalised (mask False)


def test_seeded_episodes_differ_by_seed_and_move_between_steps() -> None:
    plan = build(PruneRequest("zoo:tiny-openvla", "none", None)).plan
    first, other = seeded_frames(plan, 0, 3), seeded_frames(plan, 1, 3)
    assert all(frame.shape == (224, 224, 3) for frame in seeded_frames(plan, 0, 200))  # long episodes too
    assert first[0].shape == (224, 224, 3) and first[0].dtype == np.uint8
    assert not np.array_equal(first[0], first[1]) and not np.array_equal(first[0], other[0])
    assert seeded_prompt(plan, 0)[0, 0] == 1 and seeded_prompt(plan, 0).shape == (1, 24)


@pytest.mark.parametrize(
    ("model", "method", "keep", "params", "batch", "message"),
    [
        ("zoo:tiny-llava", "vla-pruner", 64, {}, 1, "carries action attention between control steps"),
        ("zoo:tiny-openvla", "hiprune", 64, {}, 1, "towers are not pruned"),
        ("zoo:tiny-openvla", "vla-pruner", 300, {}, 1, "policy sees 256 image tokens"),
        ("zoo:tiny-openvla", "vla-pruner", 64, {}, 2, "batch 1"),
        ("zoo:tiny-openvla", "vla-pruner", 64, {"history_layer": "2"}, 1, "must not precede the prune layer 3"),
        ("zoo:tiny-openvla", "vla-pruner", 64, {"order": "newest"}, 1, "expected one of oldest-heaviest"),
        ("zoo:tiny-openvla", "vla-pruner", 64, {"unnorm_key": "bridge"}, 1, "choose one of: bridge_orig"),
    ],
)
def test_bad_policy_requests_are_one_clear_error(
    model: str, method: str, keep: int, params: dict, batch: int, message: str
) -> None:
    from tpc.pipeline import plan

    with pytest.raises(UsageError, match=message):
        plan(PruneRequest(model, method, keep, params, batch=batch))


def test_cli_verify_profile_and_inspect_a_policy(vla_export: Path, tmp_path: Path, capsys) -> None:
    from tpc.cli import main

    report_file = tmp_path / "verify.json"
    assert main(["verify", str(vla_export), "--samples", "1", "--json", str(report_file)]) == 0
    assert "PASS" in capsys.readouterr().out
    episode = json.loads(report_file.read_text())["episode"]
    assert episode["passed"] and episode["steps_agreeing"] == episode["total_steps"] == 8
    profile_file, plot_file, twin = tmp_path / "profile.json", tmp_path / "profile.png", tmp_path / "twin"
    shutil.copytree(vla_export, twin)
    args = ["profile", str(vla_export), "--runs", "6", "--warmup", "0", "--rate", "50", "--baseline", str(twin)]
    assert main([*args, "--json", str(profile_file), "--plot", str(plot_file)]) == 0
    assert plot_file.stat().st_size > 0
    assert "control step (pruned)" in capsys.readouterr().out
    profiled = json.loads(profile_file.read_text())
    validate(profiled)
    side = profiled["export"]
    assert set(side["deadlines"]) == set(side["components"]) == {"warmup", "pruned"}
    for graph, deadline in side["deadlines"].items():  # misses counted against the 20 ms period of 50 Hz
        samples = side["component_samples_ms"][graph]
        assert deadline["misses"] == sum(ms > 20.0 for ms in samples) and deadline["deadline_ms"] == 20.0
        assert deadline["sustained_hz"] == pytest.approx(1e3 / side["components"][graph]["p99_ms"])
    plan_file = tmp_path / "plan.json"
    args = ["inspect", "zoo:tiny-openvla", "--method", "vla-pruner", "--keep", "64", "--json", str(plan_file)]
    assert main(args) == 0
    plan = json.loads(plan_file.read_text())
    assert [t["layer"] for t in plan["taps"]] == [2, 3]
    assert plan["decoder_lengths"]["pruned"] == [280, 280, 280, 88]
    assert plan["ideal_speedup"]["step"] > 1
