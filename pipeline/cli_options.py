"""click options generated from option groups (:mod:`generators.options`).

Every declared field of a group becomes one flag carrying the field's help, default, bounds and choices;
the command reads the group back from its parameters with :func:`from_params`. An option added to a group
therefore reaches the CLI without an edit to any command.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import click

from rlsynth.generators.options import OptionSpec, declared

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def flag_of(name: str, spec: OptionSpec) -> str:
    """The CLI spelling of option ``name`` (its first flag for a boolean ``--a/--b`` pair)."""
    return (spec.flag or "--" + name.replace("_", "-")).split("/")[0]


def group_options(cls: type, *, skip: tuple[str, ...] = ()) -> Callable[[F], F]:
    """Decorate a click command with one option per declared field of ``cls``, the parameter named as
    the field; fields in ``skip`` are left to the command (a flag it shares with another use)."""

    def apply(f: F) -> F:
        for fld, spec, tp in reversed(declared(cls)):
            if fld.name not in skip:
                f = _click_option(fld, spec, tp)(f)
        return f

    return apply


def _click_option(fld: dataclasses.Field[Any], spec: OptionSpec, tp: Any) -> Callable[[F], F]:
    flag = spec.flag or "--" + fld.name.replace("_", "-")
    kw: dict[str, Any] = {
        "default": fld.default,
        "help": spec.doc,
        "show_default": fld.default not in (None, ()),
    }
    if tp is bool and "/" not in flag:
        flag = f"{flag}/--no-{flag.removeprefix('--')}"
    elif typing.get_origin(tp) is tuple:
        kw |= {
            "multiple": True,
            "type": _scalar_type(typing.get_args(tp)[0], spec),
            "help": spec.doc + " Repeatable.",
        }
    elif tp is not bool:
        kw["type"] = _scalar_type(tp, spec)
    return click.option(flag, fld.name, **kw)


def _scalar_type(tp: Any, spec: OptionSpec) -> Any:
    if spec.choices is not None:
        return click.Choice(spec.choices)
    if tp is int:
        low = None if spec.low is None else int(spec.low)
        high = None if spec.high is None else int(spec.high)
        return click.IntRange(min=low, max=high, min_open=spec.low_open)
    if tp is float:
        return click.FloatRange(min=spec.low, max=spec.high, min_open=spec.low_open)
    if spec.folder:
        return click.Path(file_okay=False)
    return tp


def from_params(cls: type[T], params: dict[str, Any], **given: Any) -> T:
    """The group ``cls`` from a command's parameters (its fields are taken out of ``params``); ``given``
    sets the fields the command declares itself."""
    names = [f.name for f, _, _ in declared(cls) if f.name in params]
    return cls(**{n: params.pop(n) for n in names}, **given)
