"""Bad local model directories: one clear line, exit 2, no traceback, the directory untouched (issue 13).

A good tiny CLIP (and LLaVA) directory is saved once with transformers' own `save_pretrained`; each row copies it,
corrupts one thing (config.json fields, the safetensors bytes, shards, pickles, remote code, symlinks) and runs
`tpc inspect` or `tpc export --no-verify` in-process.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tpc.cli import main
from tpc.errors import UsageError

VISION = {
    "image_size": 32,
    "patch_size": 8,  # 4 x 4 = 16 patches
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
}
TEXT = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 256,
}
WEIGHTS = "model.safetensors"
TOWER = {"hidden_size": 32, "num_layers": 3, "num_heads": 2, "intermediate_size": 64, "patch_size": 14}


@pytest.fixture(scope="module")
def good_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Good tiny directories, saved as transformers saves them: clip, llava, and an OpenVLA config (no weights)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from tpc.models_zoo import adapter_for_family
    from tpc.models_zoo.zoo import ZOO, materialize

    root = tmp_path_factory.mktemp("good")
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(root / "clip")
    llava = LlavaConfig(vision_config=VISION, text_config=LlamaConfig(**TEXT).to_dict(), image_token_id=60)
    llava.vision_config.model_type = "clip_vision_model"
    LlavaForConditionalGeneration(llava).save_pretrained(root / "llava")
    openvla = root / "openvla"
    openvla.mkdir()
    config = ZOO["tiny-openvla"].make_config().to_dict()
    config["auto_map"] = {"AutoConfig": "configuration_prismatic.OpenVLAConfig"}
    (openvla / "config.json").write_text(json.dumps(config))
    (openvla / WEIGHTS).write_bytes(b"")  # config rows fail before any weight is read
    # the release layout (auto_map to its *_prismatic code, never run)
    release = materialize(ZOO["tiny-openvla"], adapter_for_family("openvla"))
    return {"clip": root / "clip", "llava": root / "llava", "openvla": openvla, "openvla-release": release}


# --- corruptions (each takes the copied model directory) ----------------------------------------------------------


def _config(**changes: object) -> Callable[[Path], None]:
    """Set (or with None, delete) config.json fields; a dotted name reaches into a nested config."""

    def mutate(model: Path) -> None:
        data = json.loads((model / "config.json").read_text())
        for dotted, value in changes.items():
            *parents, key = dotted.split(".")
            target = data
            for parent in parents:
                target = target[parent]
            if value is None:
                del target[key]
            else:
                target[key] = value
        (model / "config.json").write_text(json.dumps(data))

    return mutate


def _write_config(text: str) -> Callable[[Path], None]:
    return lambda model: (model / "config.json").write_text(text)


def _bytes(edit: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def mutate(model: Path) -> None:
        (model / WEIGHTS).write_bytes(edit((model / WEIGHTS).read_bytes()))

    return mutate


def _bad_header(model: Path) -> None:
    garbage = b"{not json at all"
    (model / WEIGHTS).write_bytes(struct.pack("<Q", len(garbage)) + garbage + b"\0" * 64)


def _tensors(edit: Callable[[dict[str, torch.Tensor]], None]) -> Callable[[Path], None]:
    def mutate(model: Path) -> None:
        state = load_file(str(model / WEIGHTS))
        edit(state)
        save_file(state, str(model / WEIGHTS), metadata={"format": "pt"})

    return mutate


def _reshape(name: str) -> Callable[[dict[str, torch.Tensor]], None]:
    def edit(state: dict[str, torch.Tensor]) -> None:
        state[name] = torch.zeros(*state[name].shape[:-1], state[name].shape[-1] + 1)

    return edit


def _shards(drop_shard: bool = False, misplace: bool = False) -> Callable[[Path], None]:
    """Split the weights into two shards + index; then lose a shard, or list a tensor in the wrong shard."""

    def mutate(model: Path) -> None:
        state = load_file(str(model / WEIGHTS))
        (model / WEIGHTS).unlink()
        names = sorted(state)
        halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
        weight_map = {}
        for shard, part in halves.items():
            save_file({n: state[n] for n in part}, str(model / shard), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, shard))
        if misplace:
            weight_map[names[0]] = "model-00002-of-00002.safetensors"
        (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        if drop_shard:
            (model / "model-00002-of-00002.safetensors").unlink()

    return mutate


def _pickled(model: Path) -> None:
    torch.save(load_file(str(model / WEIGHTS)), model / "pytorch_model.bin")
    (model / WEIGHTS).unlink()


def _remote_code(model: Path) -> None:
    """auto_map + a modeling file that would leave a mark if anything ever imported it."""
    (model / "modeling_evil.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('RAN').write_text('ran')\nclass EvilConfig: pass\n"
    )
    _config(auto_map={"AutoConfig": "modeling_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"})(model)


def _link_loop(name: str) -> Callable[[Path], None]:
    def mutate(model: Path) -> None:
        if (model / name).exists():
            (model / name).unlink()
        os.symlink(name, model / name)  # a link to itself

    return mutate


def _dir_loop(model: Path) -> None:
    shutil.rmtree(model)
    os.symlink("model", model)


# (id, base, corruption, command, fragment of the one error line)
INSPECT, EXPORT = "inspect", "export"
CASES = [
    ("config-list", "clip", _write_config("[1, 2]"), INSPECT, "holds a JSON list, not an object of config fields"),
    ("config-not-json", "clip", _write_config("{"), INSPECT, "is not valid JSON"),
    ("model-type-int", "clip", _config(model_type=7), INSPECT, "model_type must be a string, got 7"),
    (
        "hidden-size-str",
        "clip",
        _config(hidden_size="big"),
        INSPECT,
        "hidden_size must be a positive integer, got 'big'",
    ),
    ("layers-negative", "clip", _config(num_hidden_layers=-1), INSPECT, "num_hidden_layers must be a positive"),
    ("layers-huge", "clip", _config(num_hidden_layers=10**6), INSPECT, "num_hidden_layers = 1000000 is implausibly"),
    ("heads-zero", "clip", _config(num_attention_heads=0), INSPECT, "num_attention_heads must be a positive integer"),
    ("image-vs-patch", "clip", _config(image_size=30), INSPECT, "image_size 30 is not divisible by patch_size 8"),
    ("hidden-vs-heads", "clip", _config(num_attention_heads=3), INSPECT, "hidden_size 32 is not divisible by num_att"),
    ("no-weights", "clip", lambda m: (m / WEIGHTS).unlink(), INSPECT, "has a config.json but no weights"),
    ("empty", "clip", _bytes(lambda b: b""), INSPECT, "model.safetensors' is empty (0 bytes)"),
    ("truncated", "clip", _bytes(lambda b: b[: len(b) // 2]), INSPECT, "model.safetensors' is truncated"),
    ("truncated-header", "clip", _bytes(lambda b: b[:100]), INSPECT, "is not a safetensors file or is truncated"),
    ("random-bytes", "clip", _bytes(lambda b: os.urandom(len(b))), INSPECT, "is not a safetensors file"),
    ("header-not-json", "clip", _bad_header, INSPECT, "is not a safetensors file (its header is not JSON)"),
    ("trailing-bytes", "clip", _bytes(lambda b: b + b"\0" * 16), INSPECT, "has 16 bytes after its last tensor"),
    ("missing-shard", "clip", _shards(drop_shard=True), INSPECT, "is missing 1 of the 2 weight shards"),
    ("misplaced-tensor", "clip", _shards(misplace=True), INSPECT, "that model.safetensors.index.json places there"),
    ("pickled-bin", "clip", _pickled, INSPECT, "holds pickled weights (pytorch_model.bin); tpc reads weights only"),
    ("remote-code", "clip", _remote_code, INSPECT, "auto_map naming the model's own code (modeling_evil)"),
    ("weights-link-loop", "clip", _link_loop(WEIGHTS), INSPECT, "model.safetensors' is a symlink loop"),
    ("config-link-loop", "clip", _link_loop("config.json"), INSPECT, "config.json' is a symlink loop"),
    ("dir-link-loop", "clip", _dir_loop, INSPECT, "cannot be resolved"),
    (
        "wrong-shape",
        "clip",
        _tensors(_reshape("embeddings.patch_embedding.weight")),
        EXPORT,
        "tensor 'embeddings.patch_embedding.weight' has shape [32, 3, 8, 9], but the model in config.json needs",
    ),
    (
        "missing-tensor",
        "clip",
        _tensors(lambda s: s.pop("encoder.layers.1.mlp.fc2.bias")),
        EXPORT,
        "lacks 1 of the model's tensors (encoder.layers.1.mlp.fc2.bias)",
    ),
    ("llava-no-text-config", "llava", _config(text_config=None), INSPECT, "'text_config' is missing; a llava config"),
    ("llava-vision-list", "llava", _config(vision_config=[1]), INSPECT, "'vision_config' is list, not an object"),
    (
        "llava-feature-layer",
        "llava",
        _config(vision_feature_layer=5),
        INSPECT,
        "vision_feature_layer 5 selects outside the tower's layers 1..2",
    ),
    (
        "llava-vision-heads",
        "llava",
        _config(**{"vision_config.num_attention_heads": 0}),
        INSPECT,
        "vision_config.num_attention_heads must be a positive integer, got 0",
    ),
    (
        "llava-kv-heads",
        "llava",
        _config(**{"text_config.num_key_value_heads": 3, "text_config.num_attention_heads": 4}),
        INSPECT,
        "text_config.num_attention_heads 4 is not a multiple of num_key_value_heads 3",
    ),
    ("llava-image-token", "llava", _config(image_token_index=64), INSPECT, "image_token_id 64 is outside text_config"),
    (
        "llava-wrong-shape",  # transformers renames LLaVA's saved tensors: the load report names the module tensor
        "llava",
        _tensors(_reshape("language_model.model.layers.1.mlp.down_proj.weight")),
        EXPORT,
        "tensor 'model.language_model.layers.1.mlp.down_proj.weight' has shape [32, 65]",
    ),
    (
        "openvla-foreign-code",
        "openvla",
        _config(auto_map={"AutoModelForVision2Seq": "modeling_other.Policy"}),
        INSPECT,
        "auto_map naming the model's own code (modeling_other)",
    ),
    (
        "openvla-release-shape",
        "openvla-release",
        _tensors(_reshape("projector.fc3.weight")),
        EXPORT,
        "tensor 'projector.fc3.weight' has shape [64, 65], but the model in config.json needs [64, 64]",
    ),
    ("openvla-release-pickled", "openvla-release", _pickled, EXPORT, "holds pickled weights (pytorch_model.bin)"),
    (
        "openvla-tower-heads",
        "openvla",
        _config(tower_specs=[{**TOWER, "family": "dinov2", "num_heads": 0}, {**TOWER, "family": "siglip"}]),
        INSPECT,
        "tower_specs[0].num_heads must be a positive integer, got 0",
    ),
]


def _tree(root: Path) -> dict[str, str]:
    """Every path under root (links not followed) -> its content hash, or where a link points."""
    found = {}
    for current, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(current, name)
            if path.is_symlink():
                found[str(path.relative_to(root))] = "-> " + os.readlink(path)
            elif path.is_file():
                found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[str(path.relative_to(root))] = "dir"
    return found


def _command(kind: str, model: Path, out: Path, base: str = "clip") -> list[str]:
    method = ["--method", "none"] if base.startswith("openvla") else ["--method", "hiprune", "--keep", "4"]
    if kind == INSPECT:
        return ["inspect", str(model), *method]
    return ["export", str(model), *method, "--output", str(out), "--no-verify"]


@pytest.mark.parametrize(("base", "corrupt", "kind", "fragment"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_model_directory(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    good_dirs: dict[str, Path],
    base: str,
    corrupt: Callable[[Path], None],
    kind: str,
    fragment: str,
):
    case = tmp_path / "case"
    model, out = case / "model", tmp_path / "out"
    shutil.copytree(good_dirs[base], model)
    corrupt(model)
    before = _tree(case)
    code = main(_command(kind, model, out, base))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, err
    assert len(lines) == 1 and fragment in lines[0], err
    assert "Traceback" not in err
    assert _tree(case) == before  # nothing written, nothing imported (no __pycache__, no RAN mark)
    assert not out.exists()


def test_good_directories_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str], good_dirs: dict[str, Path]):
    """The controls: the uncorrupted directories (and two shards) plan and load as before."""
    from tpc.pipeline import PruneRequest, build

    for base in ("clip", "llava", "openvla-release"):
        assert main(_command(INSPECT, good_dirs[base], tmp_path / "out", base)) == 0, capsys.readouterr().err
    sharded = tmp_path / "sharded"
    shutil.copytree(good_dirs["clip"], sharded)
    _shards()(sharded)
    pruned = build(PruneRequest(str(sharded), "hiprune", keep=4))
    from transformers import CLIPVisionModel

    reference = CLIPVisionModel.from_pretrained(str(good_dirs["clip"]))
    loaded = list(pruned.module.state_dict().values())  # the shards' weights, not a random initialisation
    for name in ("embeddings.patch_embedding.weight", "encoder.layers.0.mlp.fc1.weight"):
        wanted = reference.state_dict()[name]
        assert any(t.shape == wanted.shape and torch.equal(t, wanted) for t in loaded), name


def test_python_api_refuses_pickles(tmp_path: Path, good_dirs: dict[str, Path]):
    """The Python API raises the same UsageError line; the pickle is never opened."""
    from tpc.pipeline import PruneRequest, build

    model = tmp_path / "model"
    shutil.copytree(good_dirs["clip"], model)
    (model / WEIGHTS).unlink()
    (model / "pytorch_model.bin").write_bytes(b"not even a pickle")  # reading it would fail differently
    with pytest.raises(
        UsageError, match=r"holds pickled weights .*\.save_pretrained\(NEW_DIR, safe_serialization=True\)"
    ):
        build(PruneRequest(str(model), "hiprune", keep=4))
