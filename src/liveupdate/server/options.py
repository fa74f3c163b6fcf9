"""luod's command line: :class:`~liveupdate.server.config.Config`'s options as click's.

Only the command imports ``click``: a successor, which gets its
configuration as JSON (:meth:`~liveupdate.server.config.Config.from_fields`),
never pays for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from liveupdate.server.config import OPTION, AtLeast, Config, Converted, OneOf, Option

__all__ = ["click_options", "click_type"]

F = TypeVar("F", bound=Callable[..., Any])

if TYPE_CHECKING:
    _ParamType = click.ParamType[Any, Any]
else:  # older clicks' ParamType is not generic
    _ParamType = click.ParamType


class _ConvertedType(_ParamType):
    """A :class:`~liveupdate.server.config.Converted` value, as a click type."""

    def __init__(self, spec: Converted) -> None:
        self.spec = spec
        self.name = spec.name

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):
            return value  # converted already (a default given as its value)
        try:
            return self.spec.convert(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def click_type(spec: object) -> object:
    """The click type of an option's ``type`` (anything else is passed as is)."""
    if isinstance(spec, Converted):
        return _ConvertedType(spec)
    if isinstance(spec, AtLeast):
        if spec.kind is int:
            return click.IntRange(int(spec.low))
        return click.FloatRange(spec.low)
    if isinstance(spec, OneOf):
        return click.Choice(list(spec.choices))
    return spec


def click_options(command: F) -> F:
    """Declare every :class:`Config` field as an option of ``command``.

    ``command`` gets them as keyword arguments named after the fields, ready
    for ``Config(**options)``.
    """
    for field in reversed(dataclasses.fields(Config)):
        spec: Option = field.metadata[OPTION]
        params = dict(spec.params)
        if "type" in params:
            params["type"] = click_type(params["type"])
        command = click.option(spec.flag, field.name, **params)(command)
    return command
