"""Method parameters: every value outside a parameter's domain is refused once, in planning, with the same line
from `tpc inspect`, `tpc export` and the Python API; and HiPrune's register layer follows the reference's
`attentions[vision_feature_layer]` indexing on a LLaVA."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

import tpc
from tpc import cli
from tpc.cli import main
from tpc.errors import UsageError
from tpc.methods import REGISTRY
from tpc.methods.base import Param
from tpc.models_zoo import FAMILIES, ZOO, ModelSource
from tpc.pipeline import PruneRequest, plan

MODEL_FOR = {"vla-pruner": "zoo:tiny-openvla", "fastv": "zoo:tiny-llava"}  # others: an encoder

# (method, parameter, value) outside the domain -> a fragment of the one line
BAD = [
    ("hiprune", "alpha", "nan", "expected a finite number in (0, 1]"),
    ("hiprune", "alpha", "inf", "expected a finite number in (0, 1]"),
    ("hiprune", "alpha", "-inf", "expected a finite number in (0, 1]"),
    ("hiprune", "alpha", "1e400", "expected a finite number in (0, 1]"),
    ("hiprune", "alpha", "0", "expected a value in (0, 1]"),
    ("hiprune", "alpha", "1.5", "expected a value in (0, 1]"),
    ("hiprune", "alpha", "-0.1", "expected a value in (0, 1]"),
    ("random", "seed", "-1", "expected a value >= 0"),
    ("random", "seed", "1.5", "expected int"),
    ("vla-pruner", "window", "0", "expected a value in [1, 64]"),
    ("vla-pruner", "window", "65", "expected a value in [1, 64]"),
    ("vla-pruner", "decay", "NaN", "expected a finite number in (0, 1]"),
    ("vla-pruner", "decay", "0", "expected a value in (0, 1]"),
    ("vla-pruner", "decay", "1.01", "expected a value in (0, 1]"),
    ("vla-pruner", "criterion", "first", "expected one of prefill, last"),
]


def _line(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(list(argv)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0].removeprefix("error: ")


@pytest.mark.parametrize(("method", "name", "value", "fragment"), BAD)
def test_a_value_outside_the_domain_is_one_line(method: str, name: str, value: str, fragment: str) -> None:
    param = next(p for p in REGISTRY[method].params if p.name == name)
    with pytest.raises(UsageError) as raised:
        REGISTRY[method].resolve_params({name: value}, {})
    line = str(raised.value)
    assert "\n" not in line and line.startswith(f"--param {name}={value.strip()}: ") and fragment in line
    assert f"({param.help})" in line


@pytest.mark.parametrize(
    ("method", "name", "value"),
    [
        ("hiprune", "alpha", "nan"),
        ("hiprune", "alpha", "1.5"),
        ("random", "seed", "-1"),
        ("vla-pruner", "decay", "inf"),
    ],
)
def test_inspect_export_and_the_python_api_refuse_with_the_same_line(
    method: str, name: str, value: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, param = MODEL_FOR.get(method, "zoo:tiny-clip"), f"{name}={value}"
    inspected = _line(capsys, "inspect", model, "--method", method, "--keep", "16", "--param", param)
    out = tmp_path / "out"
    exported = _line(
        capsys, "export", model, "--method", method, "--keep", "16", "--param", param, "--output", str(out)
    )
    with pytest.raises(UsageError) as raised:
        tpc.export(model, method, 16, tmp_path / "api", params={name: float(value) if name != "seed" else -1})
    assert inspected == exported == str(raised.value)
    assert not out.exists() and not (tmp_path / "api").exists()


def test_nan_from_the_python_api_is_refused_before_it_can_reach_a_manifest() -> None:
    with pytest.raises(UsageError, match=r"^--param decay=nan: expected a finite number in \(0, 1\]"):
        plan(PruneRequest("zoo:tiny-openvla", "vla-pruner", 64, {"decay": str(math.nan)}))
    with pytest.raises(UsageError, match=r"^--param window=0: expected a value in \[1, 64\]"):
        plan(PruneRequest("zoo:tiny-openvla", "vla-pruner", 64, {"window": "0"}))


def test_domain_edges_are_accepted_and_every_default_is_inside_its_domain() -> None:
    assert REGISTRY["hiprune"].resolve_params({"alpha": "1"}, {})["alpha"] == 1.0
    edges = {"window": "1", "decay": "1.0"}
    assert (
        REGISTRY["vla-pruner"].resolve_params(edges, {}) | edges
        == REGISTRY["vla-pruner"].resolve_params({"window": "1", "decay": "1"}, {}) | edges
    )
    assert REGISTRY["random"].resolve_params({"seed": "0"}, {})["seed"] == 0
    for method in REGISTRY.values():
        for param in method.params:
            assert param.default is None or param.violation(param.default) is None, (method.name, param.name)
            if param.type is float:  # every float parameter is bounded and refuses NaN
                assert param.violation(math.nan) is not None and param.low is not None, param.name
    with pytest.raises(ValueError, match="outside its domain"):
        Param("alpha", float, 2.0, "a share", low=0.0, high=1.0)


def test_tpc_methods_shows_each_domain(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli.out, "_width", 400)  # one row per parameter, unwrapped
    assert main(["methods"]) == 0
    shown = " ".join(capsys.readouterr().out.split())
    for text in ("alpha=0.1 in (0, 1]", "seed=0 (>= 0)", "window=3 in [1, 64]", "decay=0.8 in (0, 1]"):
        assert text in shown
    assert "deep_layer=auto (encoder layer)" in shown and "criterion=prefill (prefill|last)" in shown
    assert "re-selecting the image tokens at every generated token" in shown  # FastV's interpretation


# --- HiPrune's register layer on a LLaVA -------------------------------------------------------------------------


def _llava_source(vision_feature_layer: int | list[int]) -> ModelSource:
    """zoo:tiny-llava's config (a 4-layer CLIP tower) with another vision_feature_layer: planning reads only it."""
    entry = ZOO["tiny-llava"]
    config = copy.deepcopy(entry.make_config())
    config.vision_feature_layer = vision_feature_layer
    return ModelSource("zoo:tiny-llava", FAMILIES["llava"], config, zoo_entry=entry)


@pytest.mark.parametrize(
    ("index", "params", "deep"),
    [
        (2, {}, 3),  # hidden_states[2] (layer 2's output) with attentions[2]: layer 3
        (1, {}, 2),
        (-2, {}, 3),  # negative: both count from the end, the same layer (3 of 4)
        (-3, {}, 2),
        (4, {}, 4),  # the last layer's output: attentions[4] is past the tower, the last layer is used
        ([1, -2], {}, 3),  # a list: the deepest
        (2, {"deep_layer": "2"}, 2),  # --param deep_layer overrides
    ],
)
def test_hiprune_deep_layer_pairs_attentions_p_with_hidden_states_p(
    index: int | list[int], params: dict[str, str], deep: int
) -> None:
    the_plan = plan(PruneRequest("zoo:tiny-llava", "hiprune", 32, params), _llava_source(index))
    assert the_plan.method_params["deep_layer"] == deep
    assert deep in the_plan.cut.tapped_layers


def test_bare_encoder_keeps_the_feature_layer_as_deep_layer() -> None:
    assert plan(PruneRequest("zoo:tiny-clip", "hiprune", 32, {"feature_layer": "2"})).method_params["deep_layer"] == 2
    assert plan(PruneRequest("zoo:tiny-clip", "hiprune", 32)).method_params["deep_layer"] == 3


@pytest.mark.parametrize("index", [2, -3])
def test_hiprune_vision_component_matches_the_reference_indexing(tmp_path: Path, index: int) -> None:
    """The reference: features hidden_states[p], registers scored on attentions[p], anchors on attentions[o - 1]."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from tpc.methods import hiprune
    from tpc.pipeline import build

    config = _llava_source(index).config
    torch.manual_seed(0)
    directory = tmp_path / "llava"
    LlavaForConditionalGeneration(config).save_pretrained(directory)
    assert json.loads((directory / "config.json").read_text())["vision_feature_layer"] == index
    pruned = build(PruneRequest(str(directory), "hiprune", 48))
    model = LlavaForConditionalGeneration.from_pretrained(directory, attn_implementation="eager").eval()
    pixels = pruned.samples(seed=3)["vision"]["pixel_values"]
    with torch.no_grad():
        embeds, kept = pruned.components["vision"].module(pixels)
        tower = model.model.vision_tower(pixels, output_attentions=True, output_hidden_states=True)
        obj = hiprune.scores(tower.attentions[pruned.params["object_layer"] - 1])
        want = hiprune.select(obj, hiprune.scores(tower.attentions[index]), 48, (16, 16))
        features = model.model.multi_modal_projector(tower.hidden_states[index][:, 1:])
    torch.testing.assert_close(kept, want, rtol=0, atol=0)
    torch.testing.assert_close(embeds[0], features[0, want[0]], rtol=1e-4, atol=1e-5)
