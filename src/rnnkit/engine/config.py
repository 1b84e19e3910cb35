"""Frozen config dataclasses <-> command-line flags and JSON.

Every config is a frozen dataclass whose fields are declared with `option(default, help)`; the help
text lives in the field metadata, so `--help`, the defaults and `config.json` come from one place:

    @dataclass(frozen=True)
    class SortConfig:
        length: int = option(10, "length of each sequence to sort")
        cell: Literal["lstm", "gru"] = option("lstm", "recurrent cell")

gives `--length INT` and `--cell {lstm,gru}`. Supported field types: int, float, str, bool
(`--flag/--no-flag`), `X | None` of those, `Literal[...]` (becomes `choices`) and `tuple[X, ...]` of
int, float or str (one or more values: `--n 5 10 15`).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal, get_args, get_origin

from rnnkit.engine.errors import UsageError


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _parser_for(tp: Any, optional: bool, name: str):
    def parse(text: str):
        if optional and text.lower() == "none":
            return None
        try:
            return tp(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {tp.__name__}, got {text!r}") from None

    parse.__name__ = tp.__name__  # argparse names the type in "invalid <name> value"
    return parse


def add_dataclass_flags(
    parser: argparse.ArgumentParser, cls: type, title: str | None = None, defaults: dict[str, Any] | None = None
) -> None:
    """Add one flag per field of dataclass `cls`. Flags not given on the command line are absent
    from the parsed namespace (default SUPPRESS), so callers can tell given from defaulted.
    `defaults` overrides the default shown in the help for some fields (a task's train_defaults)."""
    defaults = defaults or {}
    group = parser.add_argument_group(title) if title else parser
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, optional = _unwrap_optional(hints[f.name])
        help_text = f.metadata.get("help")
        if not help_text:
            raise TypeError(f"{cls.__name__}.{f.name} needs help text: declare it with option(default, help)")
        help_text = f"{help_text} (default: {defaults.get(f.name, f.default)})".replace("%", "%%")
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if tp is bool:
            group.add_argument(flag_name(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif get_origin(tp) is Literal:
            choices = list(get_args(tp))
            group.add_argument(flag_name(f.name), choices=choices, type=type(choices[0]), **kw)
        elif (
            get_origin(tp) is tuple
            and len(get_args(tp)) == 2
            and get_args(tp)[1] is Ellipsis
            and get_args(tp)[0] in (int, float, str)
        ):
            item = get_args(tp)[0]
            group.add_argument(
                flag_name(f.name), type=_parser_for(item, False, f.name), nargs="+", metavar=item.__name__.upper(), **kw
            )
        elif tp in (int, float, str):
            group.add_argument(
                flag_name(f.name),
                type=_parser_for(tp, optional, f.name),
                metavar=f.metadata.get("metavar") or tp.__name__.upper(),
                **kw,
            )
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported flag type {hints[f.name]!r}")


def given_fields(namespace: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` that were given explicitly on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in vars(namespace).items() if k in names}


def from_dict(cls: type, values: dict[str, Any], source: str = "config") -> Any:
    """Build `cls` from a dict (e.g. config.json), refusing unknown keys with a clear message.
    Keys missing from `values` take their defaults (configs written by older versions still load)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UsageError(f"{source}: unknown {cls.__name__} field(s) {', '.join(unknown)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise UsageError(f"{source}: {e}") from None


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
