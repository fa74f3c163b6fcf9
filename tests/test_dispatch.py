"""The generic dispatcher against the "Dispatch order" of uapi.md.

The tables here hold small real handlers that record the struct they were
given and change it (an fd, a name, a marker byte), so that what goes in and
what comes back can be checked byte for byte. Besides every registered ioctl,
each table holds one made-up op whose struct has an optional tail
(``min_size < sizeof``): the upstream structs all have ``min_size == sizeof``,
so without it the "older, shorter struct" rule could not be exercised.
"""

from __future__ import annotations

import ctypes
import errno
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from liveupdate import uapi
from liveupdate.dispatch import DispatchTable, IoctlOp, Reply, dispatch

FdKind = uapi.FdKind
SessionDirection = uapi.SessionDirection

MAX_SIZE = 70000
FD_BASE = 1000
NAME = b"recorded-session"

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# ---------------------------------------------------------------------------
# Made-up ops with an optional tail (never registered in uapi.IOCTLS)
# ---------------------------------------------------------------------------


class demo_device_op(ctypes.Structure):
    """A device op of "version 2": ``extra`` and ``fd`` were added after ``token``."""

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("token", ctypes.c_uint64),
        ("extra", ctypes.c_uint64),
        ("fd", ctypes.c_int32),
        ("pad", ctypes.c_uint32),
    ]


class demo_session_op(ctypes.Structure):
    """A session op valid on any session; ``more`` is optional."""

    _fields_ = [
        ("size", ctypes.c_uint32),
        ("value", ctypes.c_uint32),
        ("more", ctypes.c_uint32),
    ]


def _free_nr(kind: FdKind, top: int) -> int:
    used = {uapi._IOC_NR(i.cmd) for i in uapi.IOCTLS.values() if i.on is kind}
    nr = top
    while nr in used:
        nr -= 1
    return nr


DEMO_DEVICE = uapi.IoctlInfo(
    "DEMO_DEVICE_OP",
    uapi._IO(uapi.LIVEUPDATE_IOCTL_TYPE, _free_nr(FdKind.DEVICE, 0xBF)),
    demo_device_op,
    "token",
    FdKind.DEVICE,
    fd_out=True,
)
DEMO_SESSION = uapi.IoctlInfo(
    "DEMO_SESSION_OP",
    uapi._IO(uapi.LIVEUPDATE_IOCTL_TYPE, _free_nr(FdKind.SESSION, 0xFF)),
    demo_session_op,
    "value",
    FdKind.SESSION,
)
assert DEMO_DEVICE.min_size == 16 < DEMO_DEVICE.sizeof == 32
assert DEMO_SESSION.min_size == 8 < DEMO_SESSION.sizeof == 12


# ---------------------------------------------------------------------------
# Recording handlers
# ---------------------------------------------------------------------------


@dataclass
class Call:
    name: str
    given: bytes
    left: bytes
    fd: int | None


@dataclass
class Ctx:
    """Per-call context: what the handlers saw, and how they should behave."""

    calls: list[Call] = field(default_factory=list)
    fail: int | None = None
    fail_without_errno: bool = False
    crash: bool = False


def make_handler(info: uapi.IoctlInfo) -> Callable[[Ctx, ctypes.Structure], int | None]:
    def handler(ctx: Ctx, obj: ctypes.Structure) -> int | None:
        assert type(obj) is info.struct
        given_bytes = bytes(obj)
        fd = None
        if info.fd_out:
            fd = FD_BASE + len(ctx.calls)
            obj.fd = fd  # type: ignore[attr-defined]
        if info is uapi.GET_NAME:
            obj.name[: len(NAME) + 1] = NAME + b"\0"  # type: ignore[attr-defined]
        # A marker in the last byte, to see how much of the struct comes back.
        raw = (ctypes.c_uint8 * ctypes.sizeof(obj)).from_buffer(obj)
        raw[-1] ^= 0xA5
        ctx.calls.append(Call(info.name, given_bytes, bytes(obj), fd))
        if ctx.crash:
            raise RuntimeError("handler bug")
        if ctx.fail_without_errno:
            raise OSError("no errno attached")
        if ctx.fail is not None:
            raise OSError(ctx.fail, "refused on demand")
        return fd

    return handler


def make_table(kind: FdKind, extra: list[uapi.IoctlInfo]) -> DispatchTable[Ctx]:
    infos = [i for i in uapi.IOCTLS.values() if i.on is kind] + extra
    return DispatchTable(kind, [IoctlOp(i, make_handler(i)) for i in infos])


DEVICE = make_table(FdKind.DEVICE, [DEMO_DEVICE])
SESSION = make_table(FdKind.SESSION, [DEMO_SESSION])
TABLES = {FdKind.DEVICE: DEVICE, FdKind.SESSION: SESSION}
INFOS = {op.info.cmd: op.info for t in TABLES.values() for op in t.ops.values()}
ALL_CMDS = sorted(INFOS)
SESSION_INFOS = [op.info for op in SESSION.ops.values()]
DIRECTED = [i for i in SESSION_INFOS if i.direction is not None]
SHORTABLE = [DEMO_DEVICE, DEMO_SESSION]


# ---------------------------------------------------------------------------
# The rules of uapi.md, written down independently of the dispatcher
# ---------------------------------------------------------------------------


@dataclass
class Expected:
    ret: int
    given: bytes | None = None  # what the handler must receive
    ncopy: int = 0


def model(
    table: DispatchTable[Ctx], cmd: int, arg: bytes, direction: SessionDirection | None
) -> Expected:
    info = {op.info.cmd: op.info for op in table.ops.values()}.get(cmd)
    if info is None:
        return Expected(-errno.ENOTTY)
    if len(arg) < 4:
        return Expected(-errno.EFAULT)
    size = int.from_bytes(arg[:4], sys.byteorder)
    if len(arg) < size:
        return Expected(-errno.EFAULT)
    if table.kind is FdKind.SESSION and info.direction not in (None, direction):
        return Expected(-errno.EINVAL)
    if size < info.min_size:
        return Expected(-errno.EINVAL)
    if any(arg[info.sizeof : size]):
        return Expected(-errno.E2BIG)
    ncopy = min(size, info.sizeof)
    return Expected(0, arg[:ncopy] + bytes(info.sizeof - ncopy), ncopy)


def check(
    table: DispatchTable[Ctx],
    cmd: int,
    arg: bytes,
    direction: SessionDirection | None,
    ctx: Ctx | None = None,
) -> tuple[Reply, Ctx]:
    ctx = ctx or Ctx()
    reply = dispatch(table, cmd, arg, ctx, direction)
    exp = model(table, cmd, arg, direction)
    if exp.given is None:
        assert reply == Reply(exp.ret), (hex(cmd), len(arg))
        assert ctx.calls == []
        return reply, ctx
    assert len(ctx.calls) == 1
    call = ctx.calls[0]
    assert call.given == exp.given
    if ctx.fail is not None:
        assert reply == Reply(-ctx.fail)
    else:
        assert reply.ret == 0
        assert reply.out == call.left[: exp.ncopy]
        assert reply.fd == call.fd
    return reply, ctx


# ---------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------

u32 = st.integers(0, 2**32 - 1)
ioctl_numbers = st.sampled_from(ALL_CMDS)
cmds = st.one_of(
    ioctl_numbers,
    # Direction and size bits set on a valid number.
    st.builds(lambda c, hi: c | (hi << 16), ioctl_numbers, st.integers(1, 0xFFFF)),
    # Wrong type byte.
    st.builds(
        lambda c, t: (c & ~0xFF00) | (t << 8),
        ioctl_numbers,
        st.integers(0, 0xFF).filter(lambda t: t != uapi.LIVEUPDATE_IOCTL_TYPE),
    ),
    # Any nr of the right type.
    st.builds(lambda nr: (uapi.LIVEUPDATE_IOCTL_TYPE << 8) | nr, st.integers(0, 0xFF)),
    u32,
)


def _set(buf: bytearray, pos: int, value: int) -> None:
    if 0 <= pos < len(buf):
        buf[pos] = value


@st.composite
def struct_args(draw: st.DrawFn, ref: uapi.IoctlInfo) -> bytes:
    """Argument bytes around ``ref``'s struct: any size, any length, sparse tails.

    Weighted so that every step of the dispatch order, success included, is
    reached often.
    """
    bucket = draw(st.integers(0, 19))
    if bucket == 0:
        return draw(st.binary(max_size=3))
    if bucket <= 9:
        size = draw(st.integers(ref.min_size, ref.sizeof))
    elif bucket <= 12:
        size = ref.sizeof + draw(st.integers(1, 64))
    elif bucket <= 14:
        size = draw(st.integers(ref.sizeof, MAX_SIZE))
    elif bucket <= 17:
        size = draw(st.integers(0, ref.sizeof + 16))
    else:
        size = draw(u32)
    length = size
    if draw(st.integers(0, 3)) == 0:
        length = draw(st.one_of(st.integers(size - 8, size + 8), st.integers(4, MAX_SIZE)))
    length = max(4, min(length, MAX_SIZE + 8))
    buf = bytearray(length)
    buf[:4] = size.to_bytes(4, sys.byteorder)
    head = draw(st.binary(min_size=0, max_size=ref.sizeof - 4))[: length - 4]
    buf[4 : 4 + len(head)] = head
    positions = st.one_of(
        st.sampled_from([ref.sizeof, size - 1, size, length - 1]),
        st.integers(ref.sizeof, max(ref.sizeof, length)),
    )
    if draw(st.booleans()):
        for pos, value in draw(st.lists(st.tuples(positions, st.integers(1, 255)), max_size=3)):
            _set(buf, pos, value)
    return bytes(buf)


@st.composite
def any_call(draw: st.DrawFn) -> tuple[FdKind, int, bytes, SessionDirection | None]:
    kind = draw(st.sampled_from(list(TABLES)))
    info = draw(st.sampled_from([op.info for op in TABLES[kind].ops.values()]))
    cmd = draw(cmds) if draw(st.integers(0, 3)) == 0 else info.cmd
    ref = INFOS.get(cmd, info)
    arg = draw(struct_args(ref))
    direction = None
    if kind is FdKind.SESSION:
        direction = draw(st.sampled_from(list(SessionDirection)))
    return kind, cmd, arg, direction


def exact(info: uapi.IoctlInfo, body: bytes, size: int | None = None, total: int = 0) -> bytes:
    """A struct of ``info`` with ``body`` after the size field, ``total`` bytes long."""
    size = info.sizeof if size is None else size
    buf = bytearray(max(total, size, 4))
    buf[:4] = size.to_bytes(4, sys.byteorder)
    body = body[: min(info.sizeof, len(buf)) - 4]
    buf[4 : 4 + len(body)] = body
    return bytes(buf)


def right_direction(info: uapi.IoctlInfo) -> SessionDirection | None:
    if info.on is FdKind.DEVICE:
        return None
    return info.direction or SessionDirection.OUTGOING


def wrong_direction(info: uapi.IoctlInfo) -> SessionDirection:
    assert info.direction is not None
    return SessionDirection(3 - info.direction)


infos = st.sampled_from(list(INFOS.values()))
bodies = st.binary(min_size=0, max_size=80)


# ---------------------------------------------------------------------------
# The whole dispatch order at once
# ---------------------------------------------------------------------------


@settings(SETTINGS, max_examples=400)
@given(any_call(), st.sampled_from([None, errno.EEXIST, errno.ENOENT, errno.EBUSY]))
def test_dispatch_matches_the_rules(
    call: tuple[FdKind, int, bytes, SessionDirection | None], fail: int | None
) -> None:
    kind, cmd, arg, direction = call
    reply, ctx = check(TABLES[kind], cmd, arg, direction, Ctx(fail=fail))
    event(f"{errno.errorcode.get(-reply.ret, 'ok')} handler={'yes' if ctx.calls else 'no'}")


# ---------------------------------------------------------------------------
# Each rule on its own
# ---------------------------------------------------------------------------


@SETTINGS
@given(st.sampled_from(list(TABLES)), cmds, st.binary(max_size=100))
def test_unsupported_numbers_are_enotty(kind: FdKind, cmd: int, arg: bytes) -> None:
    table = TABLES[kind]
    supported = {op.info.cmd for op in table.ops.values()}
    if cmd in supported:
        cmd |= 0x10000  # a size bit makes any valid number foreign
    ctx = Ctx()
    for direction in (None, *SessionDirection):
        assert dispatch(table, cmd, arg, ctx, direction) == Reply(-errno.ENOTTY)
    assert ctx.calls == []


@pytest.mark.parametrize("info", list(INFOS.values()), ids=lambda i: i.name)
def test_other_kind_and_variants_are_enotty(info: uapi.IoctlInfo) -> None:
    other = TABLES[FdKind.SESSION if info.on is FdKind.DEVICE else FdKind.DEVICE]
    own = TABLES[info.on]
    arg = exact(info, b"")
    nr = uapi._IOC_NR(info.cmd)
    for cmd in (
        info.cmd | (1 << 30),  # _IOC_WRITE
        info.cmd | (info.sizeof << 16),
        (0xBB << 8) | nr,
        nr,
    ):
        assert dispatch(own, cmd, arg, Ctx(), right_direction(info)).ret == -errno.ENOTTY
    assert dispatch(other, info.cmd, arg, Ctx(), SessionDirection.OUTGOING).ret == -errno.ENOTTY
    assert dispatch(other, info.cmd, arg, Ctx(), None).ret == -errno.ENOTTY
    assert own.lookup(info.cmd) is own.ops[nr]
    assert other.lookup(info.cmd) is None


@SETTINGS
@given(infos, st.binary(max_size=3), st.sampled_from(list(SessionDirection)))
def test_fewer_than_four_bytes_is_efault(
    info: uapi.IoctlInfo, arg: bytes, direction: SessionDirection
) -> None:
    ctx = Ctx()
    assert dispatch(TABLES[info.on], info.cmd, arg, ctx, direction) == Reply(-errno.EFAULT)
    assert ctx.calls == []


@SETTINGS
@given(infos, st.integers(1, MAX_SIZE), st.data())
def test_shorter_than_declared_size_is_efault(
    info: uapi.IoctlInfo, size: int, data: st.DataObject
) -> None:
    """EFAULT comes before every other size check, the direction check too."""
    length = data.draw(st.integers(4, size - 1)) if size > 4 else 4
    if length >= size:
        size = length + 1
    arg = exact(info, data.draw(bodies), size=size)[:length]
    ctx = Ctx()
    for direction in SessionDirection:
        reply = dispatch(TABLES[info.on], info.cmd, arg, ctx, direction)
        assert reply == Reply(-errno.EFAULT)
    assert ctx.calls == []


@SETTINGS
@given(st.sampled_from(DIRECTED), st.integers(0, MAX_SIZE), st.data())
def test_wrong_direction_is_einval(info: uapi.IoctlInfo, size: int, data: st.DataObject) -> None:
    """Direction is checked before the minimum size and before E2BIG."""
    arg = bytearray(exact(info, data.draw(bodies), size=size))
    if size > info.sizeof:
        arg[data.draw(st.integers(info.sizeof, size - 1))] = 1
    ctx = Ctx()
    reply = dispatch(SESSION, info.cmd, bytes(arg), ctx, wrong_direction(info))
    assert reply == Reply(-errno.EINVAL)
    assert ctx.calls == []
    if size >= info.sizeof:
        expected = -errno.E2BIG if size > info.sizeof else 0
        assert dispatch(SESSION, info.cmd, bytes(arg), ctx, info.direction).ret == expected


def test_any_direction_op_accepts_both() -> None:
    for info in SESSION_INFOS:
        if info.direction is None:
            for direction in SessionDirection:
                assert dispatch(SESSION, info.cmd, exact(info, b""), Ctx(), direction).ret == 0


def test_no_direction_given_skips_the_direction_check() -> None:
    info = uapi.RETRIEVE_FD
    assert dispatch(SESSION, info.cmd, exact(info, b""), Ctx(), None).ret == 0


@SETTINGS
@given(infos, st.data())
def test_below_min_size_is_einval(info: uapi.IoctlInfo, data: st.DataObject) -> None:
    size = data.draw(st.integers(0, info.min_size - 1))
    extra = data.draw(st.integers(0, 100))
    arg = exact(info, data.draw(bodies), size=size, total=size + extra)
    ctx = Ctx()
    reply = dispatch(TABLES[info.on], info.cmd, arg, ctx, right_direction(info))
    assert reply == Reply(-errno.EINVAL)
    assert ctx.calls == []


@SETTINGS
@given(infos, st.integers(1, MAX_SIZE - 80), st.data())
def test_non_zero_tail_is_e2big(info: uapi.IoctlInfo, extra: int, data: st.DataObject) -> None:
    size = info.sizeof + extra
    arg = bytearray(exact(info, data.draw(bodies), size=size))
    pos = data.draw(
        st.one_of(st.sampled_from([info.sizeof, size - 1]), st.integers(info.sizeof, size - 1))
    )
    arg[pos] = data.draw(st.integers(1, 255))
    ctx = Ctx()
    reply = dispatch(TABLES[info.on], info.cmd, bytes(arg), ctx, right_direction(info))
    assert reply == Reply(-errno.E2BIG)
    assert ctx.calls == []


@SETTINGS
@given(infos, bodies, st.integers(0, 64), st.integers(1, 64), st.binary(min_size=1, max_size=64))
def test_bytes_beyond_size_are_ignored(
    info: uapi.IoctlInfo, body: bytes, extra: int, junk_at: int, junk: bytes
) -> None:
    """Only ``[sizeof, size)`` must be zero: what follows ``size`` is not the struct."""
    size = info.sizeof + extra
    arg = exact(info, body, size=size) + bytes(junk_at - 1) + junk
    reply, _ = check(TABLES[info.on], info.cmd, arg, right_direction(info))
    assert reply.ret == 0
    assert len(reply.out) == info.sizeof


@SETTINGS
@given(infos, bodies, st.integers(1, MAX_SIZE - 80), st.sampled_from([None, errno.EEXIST]))
def test_larger_struct_with_zero_tail_is_the_current_struct(
    info: uapi.IoctlInfo, body: bytes, extra: int, fail: int | None
) -> None:
    table = TABLES[info.on]
    direction = right_direction(info)
    current_ctx, newer_ctx = Ctx(fail=fail), Ctx(fail=fail)
    current = dispatch(table, info.cmd, exact(info, body), current_ctx, direction)
    newer_arg = exact(info, body, size=info.sizeof + extra)
    newer = dispatch(table, info.cmd, newer_arg, newer_ctx, direction)

    def without_size(b: bytes) -> bytes:
        return b[4:]

    assert newer.ret == current.ret
    assert newer.fd == current.fd
    assert len(newer_ctx.calls) == len(current_ctx.calls) == 1
    got_new, got_cur = newer_ctx.calls[0].given, current_ctx.calls[0].given
    assert int.from_bytes(got_new[:4], sys.byteorder) == info.sizeof + extra
    assert without_size(got_new) == without_size(got_cur)
    assert len(newer.out) == len(current.out)
    assert without_size(newer.out) == without_size(current.out)
    if fail is None:
        assert newer.out == newer_ctx.calls[0].left[: info.sizeof]
        assert len(newer.out) == info.sizeof
    else:
        assert newer.out == current.out == b""


@SETTINGS
@given(st.sampled_from(SHORTABLE), st.binary(min_size=32, max_size=32), st.data())
def test_shorter_struct_reads_missing_tail_as_zero(
    info: uapi.IoctlInfo, body: bytes, data: st.DataObject
) -> None:
    size = data.draw(st.integers(info.min_size, info.sizeof - 1))
    # The caller's memory past its struct holds garbage; it must not be read.
    arg = exact(info, body, size=size)[:size] + b"\xff" * data.draw(st.integers(0, 40))
    reply, ctx = check(TABLES[info.on], info.cmd, arg, right_direction(info))
    assert reply.ret == 0
    given_bytes = ctx.calls[0].given
    assert given_bytes[:size] == arg[:size]
    assert given_bytes[size:] == bytes(info.sizeof - size)
    assert len(reply.out) == size


def test_shorter_struct_fields_are_zero() -> None:
    seen: list[demo_device_op] = []

    def handler(ctx: None, obj: ctypes.Structure) -> None:
        assert isinstance(obj, demo_device_op)
        seen.append(demo_device_op.from_buffer_copy(obj))
        obj.extra = 99  # not the caller's: must not come back
        obj.flags = 7

    table: DispatchTable[None] = DispatchTable(FdKind.DEVICE, [IoctlOp(DEMO_DEVICE, handler)])
    older = demo_device_op(size=16, flags=1, token=0x1122334455667788)
    reply = dispatch(table, DEMO_DEVICE.cmd, bytes(older)[:16], None)
    assert seen[0].token == 0x1122334455667788
    assert (seen[0].extra, seen[0].fd, seen[0].pad) == (0, 0, 0)
    assert reply == Reply(0, bytes(demo_device_op(size=16, flags=7, token=older.token))[:16])


@SETTINGS
@given(infos, bodies, st.sampled_from([errno.EEXIST, errno.ENOENT, errno.EBUSY, errno.ENOSPC]))
def test_failure_writes_nothing_back(info: uapi.IoctlInfo, body: bytes, err: int) -> None:
    ctx = Ctx(fail=err)
    reply = dispatch(TABLES[info.on], info.cmd, exact(info, body), ctx, right_direction(info))
    assert reply == Reply(-err, b"", None)
    assert len(ctx.calls) == 1  # the handler ran and changed its struct; none of it returns


def test_oserror_without_errno_is_einval() -> None:
    info = uapi.GET_NAME
    ctx = Ctx(fail_without_errno=True)
    assert dispatch(SESSION, info.cmd, exact(info, b""), ctx, None) == Reply(-errno.EINVAL)


@pytest.mark.parametrize("info", list(INFOS.values()), ids=lambda i: i.name)
def test_other_exceptions_propagate(info: uapi.IoctlInfo) -> None:
    ctx = Ctx(crash=True)
    with pytest.raises(RuntimeError, match="handler bug"):
        dispatch(TABLES[info.on], info.cmd, exact(info, b""), ctx, right_direction(info))


@pytest.mark.parametrize("info", list(INFOS.values()), ids=lambda i: i.name)
def test_handler_fd_is_in_reply(info: uapi.IoctlInfo) -> None:
    ctx = Ctx()
    reply = dispatch(TABLES[info.on], info.cmd, exact(info, b""), ctx, right_direction(info))
    assert reply.ret == 0
    if info.fd_out:
        assert reply.fd == FD_BASE
        obj = info.struct.from_buffer_copy(reply.out)
        assert obj.fd == FD_BASE  # type: ignore[attr-defined]
    else:
        assert reply.fd is None


def test_get_name_output() -> None:
    info = uapi.GET_NAME
    reply = dispatch(SESSION, info.cmd, exact(info, b""), Ctx(), SessionDirection.INCOMING)
    obj = uapi.liveupdate_session_get_name.from_buffer_copy(reply.out)
    assert uapi.decode_name(obj.name) == NAME
    assert obj.size == 72


def test_arg_types() -> None:
    info = uapi.CREATE_SESSION
    raw = exact(info, b"\xff\xff\xff\xffname")
    outs = {
        dispatch(DEVICE, info.cmd, kind(raw), Ctx(), None).out
        for kind in (bytes, bytearray, memoryview)
    }
    assert len(outs) == 1


# ---------------------------------------------------------------------------
# Table construction
# ---------------------------------------------------------------------------


def _noop(ctx: object, obj: ctypes.Structure) -> None:
    return None


def test_table_rejects_the_wrong_kind() -> None:
    with pytest.raises(ValueError, match="not a device ioctl"):
        DispatchTable(FdKind.DEVICE, [IoctlOp(uapi.FINISH, _noop)])
    with pytest.raises(ValueError, match="not a session ioctl"):
        DispatchTable(FdKind.SESSION, [IoctlOp(uapi.CREATE_SESSION, _noop)])


def test_table_rejects_duplicate_nr() -> None:
    with pytest.raises(ValueError, match="two entries for nr 0x0"):
        DispatchTable(
            FdKind.DEVICE,
            [IoctlOp(uapi.CREATE_SESSION, _noop), IoctlOp(uapi.CREATE_SESSION, _noop)],
        )
    # Same nr under another type byte is still the same slot of the table.
    clash = uapi.IoctlInfo(
        "CLASH",
        (0x12 << 8) | uapi._IOC_NR(uapi.FINISH.cmd),
        uapi.liveupdate_session_finish,
        "reserved",
        FdKind.SESSION,
    )
    with pytest.raises(ValueError, match="two entries for nr 0x42"):
        DispatchTable(FdKind.SESSION, [IoctlOp(uapi.FINISH, _noop), IoctlOp(clash, _noop)])


def test_table_contents() -> None:
    empty: DispatchTable[None] = DispatchTable(FdKind.DEVICE, [])
    assert empty.kind is FdKind.DEVICE
    assert dict(empty.ops) == {}
    assert empty.lookup(uapi.CREATE_SESSION.cmd) is None
    assert dispatch(empty, uapi.CREATE_SESSION.cmd, b"", None) == Reply(-errno.ENOTTY)
    assert set(SESSION.ops) == {uapi._IOC_NR(i.cmd) for i in SESSION_INFOS}
    assert all(op.info.on is FdKind.DEVICE for op in DEVICE.ops.values())


def test_reply_error() -> None:
    assert Reply.error(errno.EBUSY) == Reply(-errno.EBUSY, b"", None)
