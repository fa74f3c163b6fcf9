"""The pre-flight: will the code that runs next read what this luod hands over?

A live update replaces luod by whatever is installed *now*, which may be a
new version with other handlers. If that code cannot read the handover
image, every preserved file would be lost after the exec, when nothing can be
rolled back any more. So PREPARE (and a REBOOT from NORMAL) first asks it:

* :func:`run_preflight` (the old luod) writes a dry-run image of the
  sessions it holds (no fd in it is used) and runs the next luod's command
  as a child with ``--check-image IMAGE``; a non-zero exit fails PREPARE with
  ``EIO`` and the child's last line as the reason, and the state stays NORMAL;
* :func:`check_image` (``luod --check-image``, the new code) reads the image
  with the very decoder a restore uses and checks that it has a handler for
  every file in it.

The child runs only installed code, in ``/``, with the environment luod
builds for its children (:func:`liveupdate.server.reexec.child_environment`).
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence

from liveupdate.core.file import HandlerRegistry
from liveupdate.events import event
from liveupdate.handover_abi import HandoverError, HandoverImage
from liveupdate.handover_codec import decode_image, encode_image
from liveupdate.server.safefs import StateDir

__all__ = ["PREFLIGHT_TIMEOUT", "check_image", "run_preflight"]

#: Seconds the next luod has to read the image (importing a new version included).
PREFLIGHT_TIMEOUT = 120


def run_preflight(
    image: HandoverImage, state_dir: StateDir, exec_argv: Sequence[str], env: Mapping[str, str]
) -> None:
    """Have ``exec_argv --check-image`` read ``image``; ``OSError(EIO, why)`` if it cannot."""
    name = f".preflight.{os.getpid()}.dtb"
    argv = [*exec_argv, "--check-image", state_dir.show(name)]
    try:
        state_dir.write_atomic(name, encode_image(image))
    except OSError as exc:
        raise OSError(
            exc.errno, f"cannot write the pre-flight image in {state_dir.path}: {exc.strerror}"
        ) from None
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=PREFLIGHT_TIMEOUT,
            check=False,
            cwd="/",
            env=dict(env),
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise OSError(errno.EIO, f"pre-flight could not run {argv[0]}: {exc}") from None
    finally:
        state_dir.unlink(name)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines() or ["no output"]
        reason = f"pre-flight failed: {lines[-1]}"
        event("preflight-failed", logging.WARNING, reason=reason, rc=proc.returncode)
        raise OSError(errno.EIO, reason)
    event("preflight-passed", sessions=len(image.sessions))


def check_image(path: str, registry: HandlerRegistry) -> int:
    """``luod --check-image``: can this version restore ``path``? (the exit status)"""
    try:
        # The same full read as the restore (libfdt's fdt_check_full, then
        # every schema rule), run before the reboot instead of after it.
        # Its directory was checked by the luod that wrote it; the file itself
        # is never read through a link.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            data = f.read()
        image = decode_image(data)
    except (OSError, HandoverError) as exc:
        print(f"cannot read handover image {path}: {exc}", file=sys.stderr)
        return 1
    unknown = sorted(
        {
            f.compatible
            for s in image.sessions
            for f in s.files
            if registry.by_compatible(f.compatible) is None
        }
    )
    if unknown:
        print(
            f"handler(s) {', '.join(unknown)} unknown to this luod "
            f"(known: {', '.join(registry.compatibles)})",
            file=sys.stderr,
        )
        return 1
    files = sum(len(s.files) for s in image.sessions)
    print(f"ok: image v{image.version}, {len(image.sessions)} sessions, {files} files")
    return 0
