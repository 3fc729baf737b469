"""A target's options as a typed, frozen dataclass (`Target.Options`), from which the CLI builds its flags.

Each field is declared with `option(...)`: its default, help text, valid values, and how the CLI takes it (its
own flag, `--compute-units`, or `--param NAME=VALUE`). `TargetOptions.parse` is the one place a user's strings
become options. No torch here: `tpc export --help` reads these declarations without loading the targets
(`tpc.exporter.option_specs`), so a target keeps its `Options` in a module as light as this one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from tpc.errors import UsageError, unknown_name

CliForm = Literal["flag", "param"]  # how the CLI takes an option: its own flag (--compute-units), or --param NAME=


def option(
    default: str,
    *,
    help: str,
    choices: Mapping[str, Any] | tuple[str, ...],
    cli: CliForm = "flag",
    kind: str = "",
    metavar: str = "",
) -> Any:
    """A field of a target's options: its default, help text, valid values, the CLI form that takes it, (for a
    flag) the `kind` an invalid value is named as ("unknown KIND 'x'; valid: ...") and its metavar (default: the
    name's last word, `compute_units` -> UNITS)."""
    metadata = {"help": help, "choices": tuple(choices), "cli": cli, "kind": kind, "metavar": metavar}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class OptionSpec:
    """One target option as the CLI shows and takes it (read from the options dataclass's field metadata)."""

    name: str
    default: str
    help: str
    choices: tuple[str, ...]
    cli: CliForm
    kind: str = ""
    metavar: str = ""

    @property
    def flag(self) -> str:
        """`--compute-units` (a flag), or `--param` for an option given as `--param NAME=VALUE`."""
        return f"--{self.name.replace('_', '-')}" if self.cli == "flag" else "--param"

    def check(self, value: str) -> str:
        """`value` if it is one of the choices; otherwise one UsageError line."""
        if value in self.choices:
            return value
        if self.cli == "param":
            raise UsageError(f"--param {self.name}={value}: expected one of {', '.join(self.choices)}")
        raise unknown_name(self.kind or self.name.replace("_", " "), value, self.choices)


@dataclass(frozen=True)
class TargetOptions:
    """A target's settings, one field per option, each declared with `option(...)`; no fields: no options.

    `parse` is the one place a user's strings become options: an unknown option or value is one UsageError line.
    A target declares its own as `Target.Options`, in a module without torch (`tpc.exporter.option_specs` reads
    it for the CLI), e.g.

        @dataclass(frozen=True)
        class CoreMLOptions(TargetOptions):
            compute_units: str = option("all", help="...", choices=COMPUTE_UNITS, kind="Core ML compute units")
    """

    @classmethod
    def specs(cls) -> tuple[OptionSpec, ...]:
        specs = []
        for f in dataclasses.fields(cls):
            assert isinstance(f.default, str)  # every field is declared with option(default: str, ...)
            specs.append(
                OptionSpec(
                    f.name,
                    f.default,
                    f.metadata["help"],
                    f.metadata["choices"],
                    f.metadata["cli"],
                    f.metadata.get("kind", ""),
                    f.metadata.get("metavar") or f.name.rsplit("_", 1)[-1].upper(),
                )
            )
        return tuple(specs)

    @classmethod
    def parse(cls, target: str, values: Mapping[str, Any]) -> TargetOptions:
        specs = {spec.name: spec for spec in cls.specs()}
        for name in values:
            if name not in specs:
                accepted = ", ".join(specs) or "none"
                raise UsageError(f"option '{name}' does not apply to target '{target}' (its options: {accepted})")
        return cls(**{name: specs[name].check(str(value)) for name, value in values.items()})
