"""Core ML feature names: tpc's I/O names made valid ML program names, written into the converted spec.

ML program feature names must match `[A-Za-z_][A-Za-z0-9_]*` (coremltools enforces this), so tpc names such as
`past.0.key` become `past_0_key`. The map (Core ML name -> tpc name) is stored in the model's metadata by the
target, so a runtime without tpc's manifest can undo it.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from tpc.exporter.coreml.checks import operations

_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def coreml_name(name: str) -> str:
    """A tpc I/O name as an ML program feature name: every character outside [A-Za-z0-9_] becomes '_'."""
    sanitized = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return sanitized if _NAME_PATTERN.fullmatch(sanitized) else f"_{sanitized}"


def io_names(names: list[str]) -> dict[str, str]:
    """{tpc name: Core ML name}; two tpc names that sanitize alike would be indistinguishable, so refuse them."""
    mapping = {name: coreml_name(name) for name in names}
    clashes = [n for n, count in Counter(mapping.values()).items() if count > 1]
    if clashes:
        raise ValueError(f"I/O names {sorted(clashes)} collide once made valid Core ML feature names")
    return mapping


def with_tpc_names(facts: dict[str, dict[str, Any]], tpc_name: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Key I/O facts by tpc name; where Core ML's feature name differs, record it as `coreml_name`."""
    keyed = {}
    for name, fact in facts.items():
        keyed[tpc_name[name]] = fact if tpc_name[name] == name else {**fact, "coreml_name": name}
    return keyed


def _program_names(spec: Any) -> set[str]:
    names: set[str] = set()
    for function in spec.mlProgram.functions.values():
        names.update(value.name for value in function.inputs)
        for block in function.block_specializations.values():
            for op in operations(block):
                names.update(value.name for value in op.outputs)
    return names


def _rename(spec: Any, old: str, new: str) -> None:
    """Rename one value everywhere in an ML program spec (features, function inputs, block outputs, op bindings).

    coremltools' `rename_feature` does this for features only, and would silently merge a feature with an internal
    value that already has the new name; `name_features` moves such values aside first."""
    for feature in (*spec.description.input, *spec.description.output):
        if feature.name == old:
            feature.name = new
    for function in spec.mlProgram.functions.values():
        for value in function.inputs:
            if value.name == old:
                value.name = new
        for block in function.block_specializations.values():
            block.outputs[:] = [new if name == old else name for name in block.outputs]
            for op in operations(block):
                for argument in op.inputs.values():
                    for binding in argument.arguments:
                        if binding.HasField("name") and binding.name == old:
                            binding.name = new
                for value in op.outputs:
                    if value.name == old:
                        value.name = new


def _append_identity(spec: Any, source: str, new: str) -> None:
    """Append `new = identity(source)` to the main block, typed like `source` (an input or an op's output)."""
    from coremltools.proto import MIL_pb2

    function = spec.mlProgram.functions["main"]
    types = {value.name: value.type for value in function.inputs}
    for block in function.block_specializations.values():
        for op in operations(block):
            types.update({value.name: value.type for value in op.outputs})
        op = block.operations.add()
        op.type = "identity"
        op.inputs["x"].arguments.add().name = source
        output = op.outputs.add()
        output.name = new
        output.type.CopyFrom(types[source])
        attribute = op.attributes["name"]
        attribute.type.tensorType.dataType = MIL_pb2.STRING
        attribute.immediateValue.tensor.strings.values.append(new)


def name_features(spec: Any, inputs: list[str], outputs: list[str]) -> dict[str, str]:
    """Give the spec's features tpc's names (sanitized), by position; returns {Core ML name: tpc name}.

    The ExportedProgram frontend names inputs after the forward's parameters and outputs after the last MIL op,
    in the program's order, which is the order of `inputs` and `output_names`. An output that returns an input
    unchanged (a teacher-forced graph's `kept_indices`) or repeats another output gets its own value through an
    `identity`, and, where its tpc name is also an input's, the Core ML name `<name>_out`: one value per name.
    """
    current_inputs = [f.name for f in spec.description.input]
    current_outputs = [f.name for f in spec.description.output]
    if len(current_inputs) != len(inputs) or len(current_outputs) != len(outputs):
        raise RuntimeError(
            f"Core ML program has {len(current_inputs)} inputs / {len(current_outputs)} outputs, "
            f"expected {len(inputs)} / {len(outputs)}"
        )
    input_names = io_names(inputs)
    taken = set(input_names.values())
    output_targets = []
    for name, coreml in io_names(list(dict.fromkeys(outputs))).items():
        while coreml in taken:
            coreml = f"{coreml}_out"
        taken.add(coreml)
        output_targets.append((name, coreml))
    output_target = dict(output_targets)
    seen = set(current_inputs)
    blocks = spec.mlProgram.functions["main"].block_specializations.values()
    for index, value in enumerate(current_outputs):
        if value in seen:  # give the output a value of its own
            copy_name = f"tpc_io_copy_{index}"
            _append_identity(spec, value, copy_name)
            spec.description.output[index].name = copy_name
            for block in blocks:
                block.outputs[index] = copy_name
            current_outputs[index] = copy_name
        seen.add(current_outputs[index])
    targets = [input_names[n] for n in inputs] + [output_target[n] for n in outputs]
    if len(set(targets)) != len(targets):
        raise ValueError(f"output names {outputs} repeat a name")
    # two passes through fresh names, so that a swap or a clash with an internal value cannot merge two values
    for index, old in enumerate([*current_inputs, *current_outputs]):
        _rename(spec, old, f"tpc_io_{index}")
    internal = _program_names(spec)
    for target in targets:
        if target in internal:  # an internal value already has the name: move it aside
            _rename(spec, target, f"{target}_tpc_internal")
    for index, target in enumerate(targets):
        _rename(spec, f"tpc_io_{index}", target)
    return dict(zip(targets, [*inputs, *outputs], strict=True))
