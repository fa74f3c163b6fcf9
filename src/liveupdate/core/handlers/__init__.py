"""File handlers shipped with liveupdate, and the default registry."""

from __future__ import annotations

from liveupdate.core.file import HandlerRegistry
from liveupdate.core.handlers.memfd import MemfdHandler

__all__ = ["default_registry"]


def default_registry() -> HandlerRegistry:
    """The built-in handlers, in the order they are asked."""
    return HandlerRegistry([MemfdHandler()])
