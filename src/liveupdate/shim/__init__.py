"""Where the C side of the package lives: the preload shim and the header.

``libluoshim.so`` lets unmodified C programs that ``open("/dev/liveupdate")``
and call ``ioctl()`` run against luod (``docs/guides/c-programs.md``). It is
built from ``luoshim.c`` by ``scripts/build-shim`` (run by the set-up
scripts) into this directory; the header ``liveupdate/luo.h`` is installed
with the package under ``include/``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["SHIM_NAME", "include_dir", "shim_path", "shim_source"]

#: The preload library's file name.
SHIM_NAME = "libluoshim.so"
_HERE = Path(__file__).resolve().parent


def shim_path() -> Path:
    """The preload library, for ``LD_PRELOAD``.

    Raises :class:`FileNotFoundError` when it was not built (no C compiler
    when the package was set up): run ``scripts/build-shim``.
    """
    path = _HERE / SHIM_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not built: run scripts/build-shim")
    return path


def shim_source() -> Path:
    """The shim's C source (``luoshim.c``), to build it elsewhere."""
    return _HERE / "luoshim.c"


def include_dir() -> Path:
    """The directory to give ``gcc -I`` for ``#include <liveupdate/luo.h>``."""
    return _HERE.parent / "include"
