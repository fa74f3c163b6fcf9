"""What ``/proc/self`` says about an open fd.

Handlers identify and describe files through ``/proc/self/fd/N`` (the link
target: a path, ``pipe:[ino]``, ``anon_inode:[eventfd]``...) and
``/proc/self/fdinfo/N`` (``pos``, ``flags`` and per-type lines such as
``eventfd-count`` or ``tty-index``). Both only *read* the kernel's view: none
of these helpers changes the open file (no ``read()``, no ``lseek()`` to a
new position).
"""

from __future__ import annotations

import os

__all__ = ["fd_link", "fd_link_bytes", "fdinfo", "open_flags"]

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0o2000000)


def fd_link(fd: int) -> str:
    """The target of ``/proc/self/fd/<fd>`` (``""`` when it cannot be read)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return ""


def fd_link_bytes(fd: int) -> bytes:
    """:func:`fd_link` as raw bytes (paths need not be valid UTF-8)."""
    try:
        return os.readlink(os.fsencode(f"/proc/self/fd/{fd}"))
    except OSError:
        return b""


def fdinfo(fd: int) -> dict[str, str]:
    """The ``key: value`` lines of ``/proc/self/fdinfo/<fd>`` (values stripped).

    Raises :class:`OSError` when the fd is not open.
    """
    with open(f"/proc/self/fdinfo/{fd}", encoding="ascii", errors="replace") as f:
        text = f.read()
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key not in info:
            info[key.strip()] = value.strip()
    return info


def open_flags(info: dict[str, str]) -> int:
    """The open file's status flags from fdinfo's octal ``flags`` line.

    ``O_CLOEXEC`` is dropped: it belongs to the descriptor (luod's own, which
    changes across the re-exec), not to the open file.
    """
    try:
        return int(info.get("flags", "0"), 8) & ~_O_CLOEXEC & 0xFFFFFFFF
    except ValueError:
        return 0
