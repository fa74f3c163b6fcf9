"""The pre-flight: will the code that runs next read what this luod hands over?

A live update replaces luod by whatever is installed *now*, which may be a
new version with other handlers. If that code cannot read the handover
image, the reboot would fail after the freeze. So PREPARE (and a REBOOT from
NORMAL) first asks it, on a dry-run image of the sessions luod holds (no fd
in it is used):

* the successor (:mod:`liveupdate.server.successor`), the installed luod
  started ahead of the reboot, runs :func:`read_dry_run` on every dry-run
  image the old generation writes; a problem fails PREPARE with ``EIO`` and
  the reason, and the state stays NORMAL;
* ``luod --check-image IMAGE`` (:func:`check_image`) runs the same check as a
  command, for operators and packagers.

Both read the image with the very decoder a restore uses and check that a
handler exists for every file in it.
"""

from __future__ import annotations

import os
import sys

from liveupdate.core.file import HandlerRegistry
from liveupdate.handover_abi import HandoverError, HandoverImage
from liveupdate.handover_codec import decode_image

__all__ = ["check_image", "read_dry_run", "unknown_handlers"]


def unknown_handlers(image: HandoverImage, registry: HandlerRegistry) -> str | None:
    """Why this version has no handler for some file of ``image`` (``None``: it has)."""
    unknown = sorted(
        {
            f.compatible
            for s in image.sessions
            for f in s.files
            if registry.by_compatible(f.compatible) is None
        }
    )
    if not unknown:
        return None
    return (
        f"handler(s) {', '.join(unknown)} unknown to this luod "
        f"(known: {', '.join(registry.compatibles)})"
    )


def read_dry_run(data: bytes, registry: HandlerRegistry) -> tuple[str | None, HandoverImage | None]:
    """Why this version could not restore the image ``data`` (``None``: it can),
    and the image as decoded when it can (kept for the restore).

    The same full read as the restore (libfdt's ``fdt_check_full``, then every
    schema rule), plus a handler for every file.
    """
    try:
        image = decode_image(data)
    except HandoverError as exc:
        return f"cannot read the handover image: {exc}", None
    problem = unknown_handlers(image, registry)
    return problem, image if problem is None else None


def check_image(path: str, registry: HandlerRegistry) -> int:
    """``luod --check-image``: can this version restore ``path``? (the exit status)"""
    try:
        # Its directory was checked by the luod that wrote it; the file itself
        # is never read through a link.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            data = f.read()
        image = decode_image(data)
    except (OSError, HandoverError) as exc:
        print(f"cannot read handover image {path}: {exc}", file=sys.stderr)
        return 1
    unknown = unknown_handlers(image, registry)
    if unknown is not None:
        print(unknown, file=sys.stderr)
        return 1
    files = sum(len(s.files) for s in image.sessions)
    print(f"ok: image v{image.version}, {len(image.sessions)} sessions, {files} files")
    return 0
