"""``luoctl inspect``: decode a handover image file.

The one command that reads no device: an image is a file, decoded with the
ABI modules alone (:mod:`liveupdate.handover_codec` for the tree,
:mod:`liveupdate.handler_abi` for the built-in handlers' data), so it works
with no luod running and loads no core code.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
import time
from pathlib import Path

import click
from rich.table import Table

import liveupdate
from liveupdate.cli.context import Context, console, count, fail
from liveupdate.client.errors import error_from_errno, file_kind
from liveupdate.handler_abi import describe_data

__all__ = ["INSPECT_MAX_SIZE", "inspect"]


def _data_text(compatible: str, data: bytes) -> str:
    decoded = describe_data(compatible, data)
    if decoded is not None:
        return " ".join(f"{k}={v}" for k, v in decoded.items())
    return data.hex() if len(data) <= 32 else f"{len(data)} bytes"


#: The largest image ``inspect`` reads unless told otherwise. A handover
#: image of the default limits (4,096 sessions of small records) is a few
#: MiB; anything far larger is not an image, or is better refused than read.
INSPECT_MAX_SIZE = 64 << 20


def _read_image(image: Path, max_size: int) -> bytes:
    """The bytes of the regular file ``image``, at most ``max_size`` of them.

    Anything else is refused before it is read: a device would be read
    forever (``/dev/zero``), a FIFO would block. Symbolic links are followed:
    luoctl runs with its caller's rights, and an operator may well name an
    image through one. The type is checked on the path, so that no device is
    even opened, then again on the opened fd, so that a file swapped in
    between is caught; ``O_NONBLOCK`` keeps a FIFO swapped in from blocking
    the open.
    """
    what = str(image)
    try:
        mode = os.stat(image).st_mode
        if not stat.S_ISREG(mode):
            raise error_from_errno(
                errno.EINVAL, what, f"not a regular file ({file_kind(mode)})", _INSPECT_HINT
            )
        fd = os.open(image, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except liveupdate.LiveUpdateError:
        raise
    except OSError as exc:
        raise error_from_errno(exc.errno or errno.EIO, what) from None
    with os.fdopen(fd, "rb") as file:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error_from_errno(
                errno.EINVAL, what, f"not a regular file ({file_kind(st.st_mode)})", _INSPECT_HINT
            )
        # Read one byte more than allowed: a file that grew since fstat is caught too.
        data = file.read(max_size + 1) if st.st_size <= max_size else b""
        if st.st_size > max_size or len(data) > max_size:
            raise error_from_errno(
                errno.EFBIG,
                what,
                f"{max(st.st_size, len(data))} bytes is larger than --max-size {max_size}",
                "a handover image is far smaller; raise --max-size to read it anyway",
            )
    return data


_INSPECT_HINT = "give a handover image file, e.g. STATE_DIR/last-handover.dtb"


@click.command()
@click.argument("image", type=click.Path(path_type=Path))
@click.option(
    "--max-size",
    type=click.IntRange(min=1),
    default=INSPECT_MAX_SIZE,
    show_default=True,
    metavar="BYTES",
    help="Refuse an IMAGE larger than this.",
)
@click.pass_obj
def inspect(obj: Context, image: Path, max_size: int) -> None:
    """Decode a handover IMAGE file (e.g. STATE_DIR/last-handover.dtb)."""
    # The one command that reads no device: an image is a file, decoded with
    # the ABI modules alone (no luod needs to run, no core code is loaded).
    from liveupdate.handover_abi import HandoverError
    from liveupdate.handover_codec import decode_image, image_to_dict

    try:
        raw = _read_image(image, max_size)
    except OSError as exc:
        fail(exc)
    try:
        decoded = decode_image(raw)
    except HandoverError as exc:
        click.echo(f"luoctl: {image}: {exc}", err=True)
        sys.exit(1)
    data = image_to_dict(decoded)
    # What each built-in handler recorded at the reboot, decoded with its
    # layout (handler_abi); a third-party handler's data stays raw (null).
    for session_dict, session in zip(data["sessions"], decoded.sessions, strict=True):
        for file_dict, file in zip(session_dict["files"], session.files, strict=True):
            file_dict["decoded"] = describe_data(file.compatible, file.data)
    if obj.json:
        click.echo(json.dumps(data, sort_keys=True, indent=2))
        return
    console.print(
        f"handover image v{decoded.version}, liveupdate-number {decoded.liveupdate_number}, "
        f"{count(len(decoded.sessions), 'session')}"
        + (f", written by {decoded.writer}" if decoded.writer else ""),
        highlight=False,
    )
    table = Table("session", "owner uid:gid (pid)", "created", "token", "handler", "fd", "data")
    for session in decoded.sessions:
        name = session.name.decode(errors="backslashreplace")
        owner = f"{session.uid}:{session.gid} ({session.pid})"
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(session.created))
        if not session.files:
            table.add_row(name, owner, created, "-", "-", "-", "-")
        for i, file in enumerate(session.files):
            table.add_row(
                name if i == 0 else "",
                owner if i == 0 else "",
                created if i == 0 else "",
                f"{file.token:#x}",
                file.compatible,
                str(file.fd),
                _data_text(file.compatible, file.data),
            )
    console.print(table)
    if decoded.participants:
        parts = Table("participant", "owner uid:gid (pid)", "data")
        for part in decoded.participants:
            parts.add_row(
                part.name.decode(errors="backslashreplace"),
                f"{part.uid}:{part.gid} ({part.pid})",
                f"{len(part.data)} B {bytes(part.data).hex()}",
            )
        console.print(parts)
