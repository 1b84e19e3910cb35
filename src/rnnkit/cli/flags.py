"""Command-line flags derived from frozen config dataclasses, so help, defaults and config.json agree.

Every config field is declared with `option(default, help)` (rnnkit.tasks.base); its help text lives
in the field's metadata:

    @dataclass(frozen=True)
    class SortConfig:
        min_len: int = option(2, "shortest training sequence")
        decoder: Literal["state-only", "pointer"] = option("pointer", "how the output is produced")

gives `--min-len INT` and `--decoder {state-only,pointer}`. Supported field types: int, float, str,
bool (`--flag/--no-flag`), `X | None` of those (`none` on the command line is None), `Literal[...]`
(becomes `choices`) and `tuple[X, ...]` of int, float or str (one or more values: `--lengths 5 10 15`).
A field may give `parse` (a function from the text to the value that raises ValueError with the
reason) and `choices` (a function listing what it accepts, for the help) in `option()`.

The default is printed once, after the help text, in the user's words: `none`, `on`/`off` for
switches, values separated by spaces. A help text that says its own default ("(default: all)") is
left as it is.

A config may keep old flag spellings working: a class attribute `renamed_flags = {"--n-max": ("max_len",)}`
maps an old flag to the field(s) it now sets (hidden from the help; using it prints a warning), and
`renamed_values = {"decoder": {"seed": "state-only"}}` does the same for old values of a field.
A field declared with `option(..., group="recurrent regularisers")` is listed in a section of its own,
described by the config's class attribute `flag_groups = {"recurrent regularisers": "..."}`.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import types
import typing
from typing import Any, Literal, get_args, get_origin


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def show_default(value: Any) -> str:
    """A default as a user would type or read it: none, on/off, space-separated values."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value)) if value else "none"
    return str(value)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _parser_for(tp: Any, optional: bool, parse=None, renamed: dict | None = None, flag: str = ""):
    def convert(text: str):
        if optional and text.lower() == "none":
            return None
        if renamed and text in renamed:
            print(f"rnnkit: warning: {flag} {text} is now called {flag} {renamed[text]}", file=sys.stderr)
            text = renamed[text]
        try:
            return parse(text) if parse is not None else tp(text)
        except ValueError as e:
            reason = str(e) if parse is not None else f"expected {tp.__name__}, got {text!r}"
            raise argparse.ArgumentTypeError(reason) from None

    convert.__name__ = getattr(tp, "__name__", "value")  # argparse names the type in "invalid <name> value"
    return convert


def _help(f: dataclasses.Field, defaults: dict[str, Any]) -> str:
    """The field's help and its default, once: a default given in `defaults` replaces the one the help
    text states; otherwise a help text that states its default keeps it."""
    text = f.metadata.get("help")
    if not text:
        raise TypeError(f"{f.name} needs help text: declare it with option(default, help)")
    if f.name in defaults:
        text = re.sub(r"\s*\(default: [^)]*\)", "", text) + f" (default: {show_default(defaults[f.name])})"
    elif "(default:" not in text:
        text = f"{text} (default: {show_default(f.default)})"
    return text.replace("%", "%%")


class _RenamedFlag(argparse.Action):
    """An old flag spelling: sets the field(s) it became, with a warning naming the new flag."""

    def __init__(self, option_strings, dest, fields: tuple[str, ...], new: str, **kwargs):
        self.fields, self.new = fields, new
        super().__init__(option_strings, dest=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"rnnkit: warning: {option_string} is now {self.new}", file=sys.stderr)
        for name in self.fields:
            setattr(namespace, name, values)


def add_dataclass_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    title: str | None = None,
    defaults: dict[str, Any] | None = None,
    only: typing.Iterable[str] | None = None,
) -> None:
    """Add one flag per field of dataclass `cls` (or per field named in `only`). Flags not given on the
    command line are absent from the parsed namespace (default SUPPRESS), so callers can tell given
    from defaulted. `defaults` overrides the default shown in the help for some fields (a task's
    train_defaults, or words such as "the run's")."""
    defaults = defaults or {}
    wanted = None if only is None else set(only)
    main_group = parser.add_argument_group(title) if title else parser
    sections: dict[str, Any] = {}  # a field's `group` -> its own section, after the main one
    descriptions = getattr(cls, "flag_groups", {})
    hints = typing.get_type_hints(cls)
    renamed_values = getattr(cls, "renamed_values", {})
    for f in dataclasses.fields(cls):
        if wanted is not None and f.name not in wanted:
            continue
        section = f.metadata.get("group")
        group = main_group
        if section:
            if section not in sections:
                name = f"{title}: {section}" if title else section
                sections[section] = parser.add_argument_group(name, descriptions.get(section))
            group = sections[section]
        tp, optional = _unwrap_optional(hints[f.name])
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=_help(f, defaults))
        flag = flag_name(f.name)
        metavar = f.metadata.get("metavar")
        if f.metadata.get("choices") is not None:
            metavar = "{" + ",".join(f.metadata["choices"]()) + "}"
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif get_origin(tp) is Literal:
            choices = list(get_args(tp))
            convert = _parser_for(type(choices[0]), optional, renamed=renamed_values.get(f.name), flag=flag)
            group.add_argument(flag, choices=choices, type=convert, **kw)
        elif (
            get_origin(tp) is tuple
            and len(get_args(tp)) == 2
            and get_args(tp)[1] is Ellipsis
            and get_args(tp)[0] in (int, float, str)
        ):
            item = get_args(tp)[0]
            group.add_argument(
                flag,
                type=_parser_for(item, False, f.metadata.get("parse")),
                nargs="+",
                metavar=metavar or item.__name__.upper(),
                **kw,
            )
        elif tp in (int, float, str):
            group.add_argument(
                flag,
                type=_parser_for(tp, optional, f.metadata.get("parse")),
                metavar=metavar or tp.__name__.upper(),
                **kw,
            )
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported flag type {hints[f.name]!r}")
    group = main_group
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for old, names in getattr(cls, "renamed_flags", {}).items():
        if wanted is not None and not wanted.intersection(names):
            continue
        tp, optional = _unwrap_optional(hints[names[0]])
        item, nargs = (get_args(tp)[0], "+") if get_origin(tp) is tuple else (tp, None)
        new = flag_name(names[0]) if len(names) == 1 else " and ".join(map(flag_name, names)) + ", both set to it"
        group.add_argument(
            old,
            action=_RenamedFlag,
            fields=tuple(names),
            new=new,
            nargs=nargs,
            type=_parser_for(item, optional, fields[names[0]].metadata.get("parse")),
            help=argparse.SUPPRESS,
        )


def given_fields(namespace: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` that were given explicitly on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in vars(namespace).items() if k in names}
