"""Conformance section A: the device and the ioctl ABI, in one generation.

Every scenario of ``conformance.md`` section A is one test here, named after
its id. All but the wire-only ones (A11, A12, A14, A17) go through the client
library only (``open_dev``/``device_path``, the high-level API or
``Device.ioctl``/``Session.ioctl`` with raw struct bytes), so they run
unchanged against luod (default) and against a kernel's ``/dev/liveupdate``
(``LIVEUPDATE_TEST_DEVICE``). The wire-only scenarios speak raw
``SOCK_SEQPACKET`` to luod and are marked ``luod_only``.

Where Linux and luod differ on purpose (``semantics.md``, "Observed on a real
LUO kernel"), the test asserts the documented result of each.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from _env import (
    Fds,
    Peer,
    RawConn,
    assert_errno,
    errno_of,
    fd_field,
    name63,
    on_kernel,
    struct_buffer,
)

import liveupdate
from liveupdate import uapi, wire
from luodtest import Luod

CREATE = uapi.CREATE_SESSION
RETRIEVE = uapi.RETRIEVE_SESSION
PRESERVE = uapi.PRESERVE_FD
RETRIEVE_FD = uapi.RETRIEVE_FD
FINISH = uapi.FINISH
GET_NAME = uapi.GET_NAME
ALL_IOCTLS = [CREATE, RETRIEVE, PRESERVE, RETRIEVE_FD, FINISH, GET_NAME]


def _ids(info: uapi.IoctlInfo) -> str:
    return info.name.removeprefix("LIVEUPDATE_IOCTL_").removeprefix("LIVEUPDATE_SESSION_").lower()


def _IOWR(type_: int, nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (type_ << 8) | nr


@dataclass
class Ctx:
    """An open device and one outgoing session on it, both closed at teardown."""

    dev: liveupdate.Device
    session: liveupdate.Session
    stack: contextlib.ExitStack
    fds: Fds
    names: Callable[[str], str]

    def target(self, info: uapi.IoctlInfo) -> liveupdate.Device | liveupdate.Session:
        return self.dev if info.on is uapi.FdKind.DEVICE else self.session

    def adopt_session_fd(self, buf: bytearray) -> liveupdate.Session:
        """Own the session fd a successful CREATE/RETRIEVE_SESSION wrote into ``buf``."""
        fd = fd_field(buf)
        os.fstat(fd)  # a real, open fd
        return self.stack.enter_context(liveupdate.Session.from_fd(fd))


@pytest.fixture
def ctx(
    open_dev: Callable[..., liveupdate.Device],
    stack: contextlib.ExitStack,
    fds: Fds,
    names: Callable[[str], str],
) -> Ctx:
    dev = stack.enter_context(open_dev())
    session = stack.enter_context(dev.create_session(names("s")))
    return Ctx(dev, session, stack, fds, names)


def _fields(ctx: Ctx, info: uapi.IoctlInfo, tag: int) -> dict[str, object]:
    """Valid, fresh input fields for ``info`` (so that only ``size`` decides the outcome)."""
    if info is CREATE:
        return {"name": ctx.names(f"t{tag}"), "fd": -1}
    if info is RETRIEVE:
        return {"name": ctx.names("absent"), "fd": -1}
    if info is PRESERVE:
        return {"fd": ctx.fds.memfd(b"a memfd"), "token": 0xA000 + tag}
    if info is RETRIEVE_FD:
        return {"fd": -1, "token": 1}
    return {}


# ---------------------------------------------------------------------------
# A1-A6: open, single opener, session names
# ---------------------------------------------------------------------------


def test_a1_open_and_close(open_dev: Callable[..., liveupdate.Device]) -> None:
    dev = open_dev()
    assert not dev.closed
    os.fstat(dev.fileno())
    dev.close()
    assert dev.closed
    # Closed for real: the device can be opened again at once.
    open_dev(timeout=0).close()


def test_a2_second_open_is_ebusy(
    open_dev: Callable[..., liveupdate.Device], device_path: str, peer: Peer
) -> None:
    first = open_dev()
    try:
        # The same process...
        with pytest.raises(liveupdate.DeviceBusyError) as busy:
            liveupdate.open_device(device_path, timeout=0)
        assert busy.value.errno == errno.EBUSY
        # ...and another process.
        assert peer.open() == errno.EBUSY
    finally:
        first.close()
    assert peer.open() == 0
    assert_errno(lambda: liveupdate.open_device(device_path, timeout=0), errno.EBUSY)
    assert peer.close() == 0
    liveupdate.open_device(device_path, timeout=0).close()


def test_a3_duplicate_name_is_eexist(ctx: Ctx) -> None:
    name = ctx.names("x")
    first = ctx.stack.enter_context(ctx.dev.create_session(name))
    with pytest.raises(liveupdate.AlreadyExistsError) as exc:
        ctx.dev.create_session(name)
    assert exc.value.errno == errno.EEXIST
    assert first.get_name() == name.encode()  # the first one is untouched
    # Bytes after the NUL are ignored: "x\0junk" is the name "x".
    buf = struct_buffer(CREATE, fd=-1, name=name.encode() + b"\0junk")
    assert_errno(lambda: ctx.dev.ioctl(uapi.LIVEUPDATE_IOCTL_CREATE_SESSION, buf), errno.EEXIST)


def test_a4_two_distinct_names(ctx: Ctx) -> None:
    a = ctx.stack.enter_context(ctx.dev.create_session(ctx.names("a")))
    b = ctx.stack.enter_context(ctx.dev.create_session(ctx.names("b")))
    assert a.fileno() != b.fileno()
    assert a.get_name() == ctx.names("a").encode()
    assert b.get_name() == ctx.names("b").encode()


@pytest.mark.parametrize(
    "raw_name",
    [b"", b"n" * uapi.LIVEUPDATE_SESSION_NAME_LENGTH],
    ids=["empty", "64-bytes-no-nul"],
)
def test_a5_bad_names_are_einval(ctx: Ctx, raw_name: bytes) -> None:
    buf = struct_buffer(CREATE, fd=-1)
    buf[8 : 8 + len(raw_name)] = raw_name
    assert_errno(lambda: ctx.dev.ioctl(uapi.LIVEUPDATE_IOCTL_CREATE_SESSION, buf), errno.EINVAL)
    # The library refuses such names itself, with the same errno.
    assert_errno(lambda: ctx.dev.create_session(raw_name), errno.EINVAL)


def test_a6_63_byte_name_round_trips(ctx: Ctx) -> None:
    name = name63(ctx.names("")).encode()
    assert len(name) == 63
    session = ctx.stack.enter_context(ctx.dev.create_session(name))
    assert session.get_name() == name
    # The raw reply: 63 bytes then the terminating NUL.
    buf = struct_buffer(GET_NAME)
    session.ioctl(uapi.LIVEUPDATE_SESSION_GET_NAME, buf)
    assert bytes(buf[8:72]) == name + b"\0"


def test_a6_names_are_raw_bytes(ctx: Ctx) -> None:
    # Any non-NUL byte may appear in a name, and names compare exactly.
    name = ctx.names("").encode() + bytes(range(1, 8)) + b"\xff\xfe"
    session = ctx.stack.enter_context(ctx.dev.create_session(name))
    assert session.get_name() == name
    other = ctx.stack.enter_context(ctx.dev.create_session(name[:-1]))
    assert other.get_name() == name[:-1]


def test_a6_get_name_reply_is_nul_terminated_whatever_the_buffer_held(ctx: Ctx) -> None:
    name = ctx.names("g").encode()
    session = ctx.stack.enter_context(ctx.dev.create_session(name))
    arg = uapi.liveupdate_session_get_name(size=ctypes.sizeof(uapi.liveupdate_session_get_name))
    ctypes.memset(arg.name, 0xFF, uapi.LIVEUPDATE_SESSION_NAME_LENGTH)  # an output field
    session.ioctl(uapi.LIVEUPDATE_SESSION_GET_NAME, arg)
    raw = bytes(arg.name)
    assert raw[: len(name)] == name
    assert raw[len(name)] == 0, f"no NUL after the name: {raw!r}"


# ---------------------------------------------------------------------------
# A7-A10, A13, A15: the ioctl ABI through the library
# ---------------------------------------------------------------------------

#: (id, on, cmd, luod errno, Linux errno). luod follows uapi.md (ENOTTY for
#: every unsupported number); Linux answers EINVAL for an nr outside the fd's
#: table (semantics.md, "Observed on a real LUO kernel").
A7_CASES = [
    ("device-unknown-nr-02", "device", 0xBA02, errno.ENOTTY, errno.EINVAL),
    ("device-unknown-nr-7f", "device", 0xBA7F, errno.ENOTTY, errno.EINVAL),
    ("device-session-nr-40", "device", 0xBA40, errno.ENOTTY, errno.EINVAL),
    ("device-session-nr-43", "device", 0xBA43, errno.ENOTTY, errno.EINVAL),
    ("session-device-nr-00", "session", 0xBA00, errno.ENOTTY, errno.EINVAL),
    ("session-device-nr-01", "session", 0xBA01, errno.ENOTTY, errno.EINVAL),
    ("session-unknown-nr-44", "session", 0xBA44, errno.ENOTTY, errno.EINVAL),
    ("device-type-bb", "device", 0xBB00, errno.ENOTTY, errno.ENOTTY),
    ("session-type-bb", "session", 0xBB40, errno.ENOTTY, errno.ENOTTY),
    ("device-iowr-bits", "device", _IOWR(0xBA, 0x00, 72), errno.ENOTTY, errno.ENOTTY),
    ("session-iowr-bits", "session", _IOWR(0xBA, 0x40, 16), errno.ENOTTY, errno.ENOTTY),
    ("session-size-bits", "session", 0x0048BA43, errno.ENOTTY, errno.ENOTTY),
]


@pytest.mark.parametrize(
    ("on", "cmd", "luod_errno", "linux_errno"),
    [case[1:] for case in A7_CASES],
    ids=[case[0] for case in A7_CASES],
)
def test_a7_unsupported_numbers(
    ctx: Ctx, on: str, cmd: int, luod_errno: int, linux_errno: int
) -> None:
    target = ctx.dev if on == "device" else ctx.session
    # A zeroed 72-byte struct (empty name): were the number accepted, the
    # answer would be EINVAL from the handler, not the dispatcher's errno.
    buf = bytearray(80)
    buf[0] = 72
    expected = linux_errno if on_kernel() else luod_errno
    assert_errno(lambda: target.ioctl(cmd, buf), expected)
    assert buf[4:] == bytes(76), "a refused call wrote back"


@pytest.mark.parametrize("which", ["min_size-1", "zero"])
@pytest.mark.parametrize("info", ALL_IOCTLS, ids=_ids)
def test_a8_size_below_minimum_is_einval(ctx: Ctx, info: uapi.IoctlInfo, which: str) -> None:
    size = info.min_size - 1 if which == "min_size-1" else 0
    buf = struct_buffer(info, size=size, length=info.sizeof, **_fields(ctx, info, 8))
    before = bytes(buf)
    assert_errno(lambda: ctx.target(info).ioctl(info.cmd, buf), errno.EINVAL)
    assert bytes(buf) == before
    if info is CREATE:
        # Nothing was created: the name is still free.
        ctx.stack.enter_context(ctx.dev.create_session(ctx.names("t8")))


def _call(
    ctx: Ctx,
    info: uapi.IoctlInfo,
    size: int,
    fields: dict[str, object],
    tail: int | None = None,
) -> int:
    """Issue ``info`` with ``size``; ``tail``: offset of one non-zero byte past sizeof."""
    buf = struct_buffer(info, size=size, **fields)
    if tail is not None:
        buf[tail] = 0x5A
    err = errno_of(lambda: ctx.target(info).ioctl(info.cmd, buf))
    if err == 0 and info.on is uapi.FdKind.DEVICE:
        ctx.adopt_session_fd(buf)
    elif err == 0 and info.fd_out:
        os.close(fd_field(buf))
    if err == 0:
        assert int.from_bytes(buf[:4], "little") == size, "size was rewritten"
        assert bytes(buf[info.sizeof :]) == bytes(size - info.sizeof), "tail was written"
    return err


#: What each ioctl answers with a plain, valid struct in one generation: the
#: session is outgoing, so RETRIEVE_FD and FINISH are EINVAL (direction); no
#: session was handed over, so RETRIEVE_SESSION is ENOENT.
PLAIN = {
    CREATE.name: 0,
    RETRIEVE.name: errno.ENOENT,
    PRESERVE.name: 0,
    RETRIEVE_FD.name: errno.EINVAL,
    FINISH.name: errno.EINVAL,
    GET_NAME.name: 0,
}


@pytest.mark.parametrize("info", ALL_IOCTLS, ids=_ids)
def test_a9_bigger_struct_with_zero_tail_acts_like_sizeof(ctx: Ctx, info: uapi.IoctlInfo) -> None:
    plain = _call(ctx, info, info.sizeof, _fields(ctx, info, 1))
    bigger = _call(ctx, info, info.sizeof + 8, _fields(ctx, info, 2))
    assert (plain, bigger) == (PLAIN[info.name], PLAIN[info.name])


def test_a9_bigger_create_session_returns_a_working_session(ctx: Ctx) -> None:
    name = ctx.names("big")
    buf = struct_buffer(CREATE, size=CREATE.sizeof + 8, name=name, fd=1234)
    ctx.dev.ioctl(uapi.LIVEUPDATE_IOCTL_CREATE_SESSION, buf)
    session = ctx.adopt_session_fd(buf)
    assert session.get_name() == name.encode()
    memfd = ctx.fds.memfd(b"x")
    session.preserve(memfd, 7)


@pytest.mark.parametrize("where", ["first", "last"])
@pytest.mark.parametrize("info", ALL_IOCTLS, ids=_ids)
def test_a10_non_zero_tail_is_e2big(ctx: Ctx, info: uapi.IoctlInfo, where: str) -> None:
    offset = info.sizeof if where == "first" else info.sizeof + 7
    fields = _fields(ctx, info, 3)
    err = _call(ctx, info, info.sizeof + 8, fields, tail=offset)
    if info.direction is uapi.SessionDirection.INCOMING:
        # On an outgoing session the direction check comes first (uapi.md
        # dispatch order, and Linux agrees): EINVAL. The E2BIG answer of
        # RETRIEVE_FD and FINISH needs an incoming session (section C).
        assert err == errno.EINVAL, errno.errorcode.get(err, err)
    else:
        assert err == errno.E2BIG, errno.errorcode.get(err, err)
    # Nothing happened: the same call (same name, same memfd and token) with a
    # clean struct gets the plain answer (0, not EEXIST, for CREATE/PRESERVE).
    assert _call(ctx, info, info.sizeof, fields) == PLAIN[info.name]


@pytest.mark.parametrize("info", [GET_NAME, FINISH], ids=_ids)
def test_a13_reserved_not_zero_is_einval(ctx: Ctx, info: uapi.IoctlInfo) -> None:
    # FINISH is checked on an outgoing session here (EINVAL either way); its
    # reserved check on an incoming session belongs to a reboot (section C).
    buf = struct_buffer(info, reserved=1)
    assert_errno(lambda: ctx.session.ioctl(info.cmd, buf), errno.EINVAL)
    buf = struct_buffer(info, reserved=0)
    expected = 0 if info is GET_NAME else errno.EINVAL
    assert_errno(lambda: ctx.session.ioctl(info.cmd, buf), expected)


@pytest.mark.parametrize("extra", [0, 8], ids=["sizeof", "sizeof+8"])
@pytest.mark.parametrize("info", [CREATE, PRESERVE, GET_NAME], ids=_ids)
def test_a15_reply_covers_exactly_min_size_sizeof(
    ctx: Ctx, info: uapi.IoctlInfo, extra: int
) -> None:
    size = info.sizeof + extra
    marker = b"\xee" * 8
    session = ctx.session
    fields = _fields(ctx, info, 100 + extra)
    if info is GET_NAME:
        name = name63(ctx.names(f"r{extra}"))
        session = ctx.stack.enter_context(ctx.dev.create_session(name))
    # Bytes past the declared size are the caller's: never read, never written.
    buf = struct_buffer(info, size=size, length=size + len(marker), **fields)
    buf[size:] = marker
    target = ctx.dev if info is CREATE else session
    target.ioctl(info.cmd, buf)
    assert bytes(buf[size:]) == marker
    assert int.from_bytes(buf[:4], "little") == size
    assert bytes(buf[info.sizeof : size]) == bytes(extra)
    if info is CREATE:
        ctx.adopt_session_fd(buf)
    elif info is GET_NAME:
        # The name ends at byte 71, the struct's last: all of it came back.
        assert bytes(buf[8 : info.sizeof]) == name.encode() + b"\0"
    else:
        assert bytes(buf[: info.sizeof]) == bytes(struct_buffer(info, size=size, **fields))[:16]


def test_a16_close_then_open_from_another_process_is_never_ebusy(
    device_path: str, peer: Peer
) -> None:
    for round_ in range(50):
        # Our open comes right after the peer's close (from round 1 on)...
        dev = liveupdate.open_device(device_path, timeout=0)
        dev.close()
        # ...and the peer's open right after ours.
        assert peer.open() == 0, f"round {round_}: the peer saw EBUSY right after our close"
        assert peer.close() == 0


# ---------------------------------------------------------------------------
# The incoming-session halves of A8-A10, A13 (luod only)
#
# RETRIEVE_FD and FINISH are only valid on an incoming session, which Linux
# has only after a kexec (section C). luod's per-session update extension
# (LUOD_SESSION_UPDATE) makes one in a single generation.
# ---------------------------------------------------------------------------


@dataclass
class Incoming:
    session: liveupdate.Session
    memfd: int


@pytest.fixture
def incoming(
    luod: Luod, stack: contextlib.ExitStack, fds: Fds, names: Callable[[str], str]
) -> Incoming:
    memfd = fds.memfd(b"handed over")
    with luod.open() as dev:
        outgoing = dev.create_session(names("in"))
        outgoing.preserve(memfd, 1)
        outgoing.update()
        session = stack.enter_context(dev.retrieve_session(names("in")))
    return Incoming(session, memfd)


@pytest.mark.luod_only
@pytest.mark.parametrize("size", ["min_size-1", "zero"])
@pytest.mark.parametrize("info", [RETRIEVE_FD, FINISH], ids=_ids)
def test_a8_incoming_size_below_minimum_is_einval(
    incoming: Incoming, info: uapi.IoctlInfo, size: str
) -> None:
    declared = info.min_size - 1 if size == "min_size-1" else 0
    fields: dict[str, object] = {"fd": -1, "token": 1} if info is RETRIEVE_FD else {}
    buf = struct_buffer(info, size=declared, length=info.sizeof, **fields)
    assert_errno(lambda: incoming.session.ioctl(info.cmd, buf), errno.EINVAL)


@pytest.mark.luod_only
def test_a9_incoming_bigger_struct_with_zero_tail(incoming: Incoming) -> None:
    buf = struct_buffer(RETRIEVE_FD, size=RETRIEVE_FD.sizeof + 8, fd=-1, token=1)
    incoming.session.ioctl(uapi.LIVEUPDATE_SESSION_RETRIEVE_FD, buf)
    fd = fd_field(buf)
    try:
        assert os.pread(fd, 100, 0) == b"handed over"
        assert bytes(buf[RETRIEVE_FD.sizeof :]) == bytes(8)
    finally:
        os.close(fd)
    buf = struct_buffer(FINISH, size=FINISH.sizeof + 8)
    assert incoming.session.ioctl(uapi.LIVEUPDATE_SESSION_FINISH, buf) == 0


@pytest.mark.luod_only
@pytest.mark.parametrize("info", [RETRIEVE_FD, FINISH], ids=_ids)
def test_a10_incoming_non_zero_tail_is_e2big(incoming: Incoming, info: uapi.IoctlInfo) -> None:
    fields: dict[str, object] = {"fd": -1, "token": 1} if info is RETRIEVE_FD else {}
    buf = struct_buffer(info, size=info.sizeof + 8, **fields)
    buf[-1] = 1
    assert_errno(lambda: incoming.session.ioctl(info.cmd, buf), errno.E2BIG)
    # Nothing happened: the file is still there to retrieve.
    os.close(incoming.session.retrieve(1))


@pytest.mark.luod_only
def test_a13_finish_reserved_on_an_incoming_session(incoming: Incoming) -> None:
    assert_errno(
        lambda: incoming.session.ioctl(
            uapi.LIVEUPDATE_SESSION_FINISH, struct_buffer(FINISH, reserved=1)
        ),
        errno.EINVAL,
    )
    os.close(incoming.session.retrieve(1))  # not finished by the failed call
    incoming.session.finish()
    assert_errno(lambda: incoming.session.retrieve(1), errno.ENOENT)


# ---------------------------------------------------------------------------
# Wire-only scenarios: raw SOCK_SEQPACKET against luod
# ---------------------------------------------------------------------------


def _header(cmd: int, arg_len: int) -> bytes:
    return wire.REQUEST_HEADER.pack(cmd, arg_len)


@pytest.mark.luod_only
def test_a11_short_argument_is_efault(luod: Luod, names: Callable[[str], str]) -> None:
    with RawConn.open_device(luod.socket) as dev:
        create = uapi.LIVEUPDATE_IOCTL_CREATE_SESSION
        for n in range(4):
            assert dev.call(create, bytes(n)) == (-errno.EFAULT, b""), n
        # Declared size larger than the bytes sent.
        short = struct_buffer(CREATE, name=names("short"))[:40]
        assert dev.call(create, short) == (-errno.EFAULT, b"")
        big = struct_buffer(CREATE, size=CREATE.sizeof + 8, name=names("short"))[: CREATE.sizeof]
        assert dev.call(create, big) == (-errno.EFAULT, b"")
        # ENOTTY is decided before any argument byte is read.
        assert dev.call(0xBA02, b"") == (-errno.ENOTTY, b"")
        # Nothing was created, and the connection still works.
        with dev.create_session(names("short")) as session:
            for n in range(4):
                assert session.call(uapi.LIVEUPDATE_SESSION_GET_NAME, bytes(n))[0] == -errno.EFAULT
            short = struct_buffer(GET_NAME)[:71]
            assert session.call(uapi.LIVEUPDATE_SESSION_GET_NAME, short)[0] == -errno.EFAULT
            ret, out = session.call(uapi.LIVEUPDATE_SESSION_GET_NAME, struct_buffer(GET_NAME))
            assert ret == 0 and out[8:].rstrip(b"\0") == names("short").encode()


@pytest.mark.luod_only
def test_a12_argument_over_64k_is_e2big(luod: Luod, names: Callable[[str], str]) -> None:
    create = uapi.LIVEUPDATE_IOCTL_CREATE_SESSION
    with RawConn.open_device(luod.socket) as dev:
        arg = struct_buffer(CREATE, name=names("big"), length=wire.MAX_ARG_LEN + 1)
        assert dev.call(create, arg) == (-errno.E2BIG, b"")
        # A size field as large as the argument changes nothing.
        arg[:4] = (wire.MAX_ARG_LEN + 1).to_bytes(4, "little")
        assert dev.call(create, arg) == (-errno.E2BIG, b"")
        # Exactly at the cap is fine: the bytes past `size` are ignored.
        arg = struct_buffer(CREATE, name=names("big"), length=wire.MAX_ARG_LEN)
        ret, out = dev.call(create, arg)
        assert ret == 0 and len(out) == CREATE.sizeof
        # The connection keeps working (and the session above was released
        # when call() closed its fd, so the name is free again eventually).
        with dev.create_session(names("after")):
            pass


@pytest.mark.luod_only
def test_a14_preserve_fd_needs_exactly_one_fd(
    luod: Luod, fds: Fds, names: Callable[[str], str]
) -> None:
    preserve = uapi.LIVEUPDATE_SESSION_PRESERVE_FD
    with (
        RawConn.open_device(luod.socket) as dev,
        dev.create_session(names("s")) as session,
    ):
        a, b = fds.memfd(b"a"), fds.memfd(b"b")
        arg = struct_buffer(PRESERVE, fd=a, token=1)
        assert session.call(preserve, arg) == (-errno.EBADF, b"")
        assert session.call(preserve, arg, [a, b]) == (-errno.EBADF, b"")
        # Neither fd was kept: both can still be preserved, one at a time.
        ret, out = session.call(preserve, arg, [a])
        assert (ret, out) == (0, bytes(arg))
        arg = struct_buffer(PRESERVE, fd=b, token=2)
        assert session.call(preserve, arg, [b]) == (0, bytes(arg))


@pytest.mark.luod_only
def test_a15_wire_out_len_is_min_size_sizeof(
    luod: Luod, fds: Fds, names: Callable[[str], str]
) -> None:
    with RawConn.open_device(luod.socket) as dev:
        for extra in (0, 8, 4096 - CREATE.sizeof):
            size = CREATE.sizeof + extra
            arg = struct_buffer(CREATE, size=size, name=names(f"w{extra}"))
            ret, out = dev.call(uapi.LIVEUPDATE_IOCTL_CREATE_SESSION, arg)
            assert ret == 0 and len(out) == CREATE.sizeof
        with dev.create_session(names("w")) as session:
            for info in (GET_NAME, PRESERVE):
                for extra in (0, 8):
                    size = info.sizeof + extra
                    fields = {"fd": fds.memfd(), "token": extra} if info is PRESERVE else {}
                    attach = [fields["fd"]] if info is PRESERVE else []
                    arg = struct_buffer(info, size=size, **fields)
                    ret, out = session.call(info.cmd, arg, attach)  # type: ignore[arg-type]
                    assert ret == 0 and len(out) == info.sizeof, (info.name, extra)
            # A failure writes nothing back.
            assert session.call(uapi.LIVEUPDATE_SESSION_FINISH, struct_buffer(FINISH)) == (
                -errno.EINVAL,
                b"",
            )


@pytest.mark.luod_only
def test_a17_malformed_frames_are_efault_and_harmless(
    luod: Luod, names: Callable[[str], str]
) -> None:
    create = uapi.LIVEUPDATE_IOCTL_CREATE_SESSION
    with RawConn.open_device(luod.socket) as dev:
        for n in range(1, 8):
            assert dev.raw(b"\xba" * n) == -errno.EFAULT, n
        arg = bytes(struct_buffer(CREATE, name=names("x")))
        assert dev.raw(_header(create, len(arg) + 1) + arg) == -errno.EFAULT
        assert dev.raw(_header(create, len(arg) - 1) + arg) == -errno.EFAULT
        assert dev.raw(_header(create, 0) + arg) == -errno.EFAULT
        # Still the same working connection.
        with dev.create_session(names("x")) as session:
            get_name = uapi.LIVEUPDATE_SESSION_GET_NAME
            for n in range(1, 8):
                assert session.raw(b"\x43" * n) == -errno.EFAULT, n
            arg = bytes(struct_buffer(GET_NAME))
            assert session.raw(_header(get_name, len(arg) + 8) + arg) == -errno.EFAULT
            ret, out = session.call(get_name, arg)
            assert ret == 0 and out[8:].rstrip(b"\0") == names("x").encode()
        assert dev.call(0xBA02, b"") == (-errno.ENOTTY, b"")
