"""Fuzz: the frame decoder, the dispatcher, and a real luod under random frames.

Two levels, both held to the same rule: every frame gets an answer from the
errno contract (``uapi.md``), nothing else, and nothing leaks.

* In-process (hypothesis): arbitrary bytes through ``wire.decode_request``
  and ``dispatch`` over the real device and session tables of a real
  orchestrator, with real fds attached. The only exception the decoder may
  raise is :class:`~liveupdate.wire.FramingError`; the dispatcher never
  raises.
* A real luod: ``LIVEUPDATE_FUZZ_FRAMES`` frames (random lengths, random
  headers, well-formed headers over random structs, lying lengths, random
  attached memfds, pipes and its own session fds) over device and session
  connections. Afterwards luod holds as many fds as before, its memory has
  not grown past a bound, and a session preserved before the storm is still
  there, with its memfd, for the next holder.

The run's seed is printed (and named in every failure); set
``LIVEUPDATE_FUZZ_SEED`` to replay it. ``scripts/fuzz`` runs a million frames.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import socket
import struct
import time
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import liveupdate
from liveupdate import uapi, wire
from liveupdate.core.handlers import default_registry
from liveupdate.core.luo import DeviceCall, Orchestrator
from liveupdate.core.policy import Owner
from liveupdate.core.session import Session
from liveupdate.core.session_ops import SessionCall
from liveupdate.core.tables import device_table, session_table
from liveupdate.dispatch import DispatchTable, dispatch
from luodtest import Luod, events, wait_for, wait_until

#: Every errno the contract allows in a reply (uapi.md, "The errno contract").
CONTRACT = frozenset(
    {
        errno.ENOTTY,
        errno.E2BIG,
        errno.EOPNOTSUPP,
        errno.EINVAL,
        errno.ENOENT,
        errno.EEXIST,
        errno.EBUSY,
        errno.EBADF,
        errno.ENOSPC,
        errno.ENOMEM,
        errno.EFAULT,
        errno.EMFILE,
        errno.ENODEV,
        errno.EIO,
        errno.EACCES,
    }
)

FRAMES_ENV = "LIVEUPDATE_FUZZ_FRAMES"
SEED_ENV = "LIVEUPDATE_FUZZ_SEED"
#: Frames thrown at the real luod in CI (a few seconds).
CI_FRAMES = 5000
#: How far luod's RSS may grow over the run, after a warm-up (Python's
#: allocator keeps some arenas; a leak per frame would exceed this quickly).
RSS_GROWTH_BOUND = 48 << 20

COMMANDS = sorted(uapi.IOCTLS)
#: State events a fuzzer must not send: they reboot luod, run a pre-flight
#: child, or finish the sessions the run checks. Every other value is fair.
_REAL_EVENTS = frozenset(int(e) for e in uapi.LuodEvent)
_SET_EVENT_OFFSET = uapi.luod_set_event.event.offset
_SIZE = struct.Struct("<I")
_INT = struct.Struct("<i")


def _seed() -> int:
    return int(os.environ.get(SEED_ENV) or random.SystemRandom().randrange(1 << 32))


def _tame(cmd: int, arg: bytearray) -> None:
    """Make a SET_EVENT harmless: an event number no state machine knows."""
    if cmd == uapi.LUOD_IOCTL_SET_EVENT and len(arg) >= _SET_EVENT_OFFSET + 4:
        (event,) = _SIZE.unpack_from(arg, _SET_EVENT_OFFSET)
        if event in _REAL_EVENTS:
            _SIZE.pack_into(arg, _SET_EVENT_OFFSET, 0x7FFF0000 | event)


def random_frame(rng: random.Random, fd_numbers: list[int]) -> bytes:
    """One request message: garbage, or a header over a plausible, mutated struct."""
    roll = rng.random()
    if roll < 0.2:  # pure garbage, header-sized or not (never empty: that is a close)
        return rng.randbytes(rng.choice([rng.randint(1, 12), rng.randint(1, 400)]))
    if roll < 0.25:  # over the 64 KiB cap, or just at it
        arg = bytearray(rng.randbytes(rng.choice([wire.MAX_ARG_LEN, wire.MAX_ARG_LEN + 1, 70000])))
        return wire.REQUEST_HEADER.pack(rng.choice(COMMANDS), len(arg)) + bytes(arg)
    # A command: a known one, a neighbour of one (bits flipped), or any number.
    pick = rng.random()
    if pick < 0.7:
        cmd = rng.choice(COMMANDS)
    elif pick < 0.9:
        cmd = rng.choice(COMMANDS) ^ (1 << rng.randrange(32))
    else:
        cmd = rng.getrandbits(32)
    info = uapi.IOCTLS.get(cmd)
    sizeof = info.sizeof if info else rng.randint(0, 96)
    # Mostly the right length and size, so that frames reach the handlers.
    length = rng.choice([sizeof] * 6 + [0, 3, 4, sizeof - 1, sizeof + 8, sizeof + 200])
    length = max(0, length)
    arg = bytearray(length) if rng.random() < 0.5 else bytearray(rng.randbytes(length))
    if length >= 4:
        size = rng.choice([sizeof] * 6 + [length, 0, 4, sizeof + 8, rng.getrandbits(32)])
        _SIZE.pack_into(arg, 0, size & 0xFFFFFFFF)
    if info is not None and length >= 8 and hasattr(info.struct, "fd"):
        fd = rng.choice([-1, 0, 1, 2, 999, *fd_numbers]) if fd_numbers else -1
        _INT.pack_into(arg, info.struct.fd.offset, fd)  # type: ignore[attr-defined]
    if info is not None and hasattr(info.struct, "name") and length >= sizeof:
        name = rng.choice([b"fuzz-%d" % rng.randrange(8), rng.randbytes(rng.randint(0, 70))])
        off = info.struct.name.offset  # type: ignore[attr-defined]
        end = min(off + 64, length)
        arg[off:end] = (name + bytes(64))[: end - off]
    _tame(cmd, arg)
    header_len = len(arg)
    if rng.random() < 0.08:  # a header that lies about its length
        header_len = rng.choice([len(arg) + 1, max(0, len(arg) - 1), rng.getrandbits(32)])
    return wire.REQUEST_HEADER.pack(cmd, header_len & 0xFFFFFFFF) + bytes(arg)


# ---------------------------------------------------------------------------
# In-process: decoder and dispatcher, driven by hypothesis
# ---------------------------------------------------------------------------


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@dataclass
class World:
    """A real orchestrator with an outgoing and an incoming session, in this process."""

    luo: Orchestrator = field(default_factory=lambda: Orchestrator(default_registry()))
    owner: Owner = field(default_factory=lambda: Owner(pid=os.getpid(), uid=0, gid=0))
    sessions: list[Session] = field(default_factory=list)
    ends: list[socket.socket] = field(default_factory=list)
    devtable: DispatchTable[DeviceCall] = field(default_factory=device_table)
    sestable: DispatchTable[SessionCall] = field(default_factory=session_table)

    def bind(self, session: Session) -> int:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.ends.append(ours)
        self.sessions.append(session)
        return theirs.detach()

    def device(self, cmd: int, arg: bytes, fds: list[int]) -> tuple[int, bytes, int | None]:
        call = DeviceCall(self.luo, self.owner, self.bind, fds)
        reply = dispatch(self.devtable, cmd, arg, call)
        return reply.ret, reply.out, reply.fd

    def session(
        self, session: Session, cmd: int, arg: bytes, fds: list[int]
    ) -> tuple[int, bytes, int | None]:
        call = SessionCall(self.luo.sessions, session, fds, self.owner, lambda: None)
        reply = dispatch(self.sestable, cmd, arg, call, session.direction)
        return reply.ret, reply.out, reply.fd

    def setup(self) -> None:
        for name in (b"fuzz-out", b"fuzz-in"):
            arg = uapi.liveupdate_ioctl_create_session(size=uapi.CREATE_SESSION.sizeof, fd=-1)
            ctypes.memmove(arg.name, name, len(name))
            ret, _out, fd = self.device(uapi.LIVEUPDATE_IOCTL_CREATE_SESSION, bytes(arg), [])
            assert ret == 0 and fd is not None
            os.close(fd)
        update = uapi.luod_session_update(size=ctypes.sizeof(uapi.luod_session_update))
        assert self.session(self.sessions[1], uapi.LUOD_SESSION_UPDATE, bytes(update), [])[0] == 0
        arg = uapi.liveupdate_ioctl_retrieve_session(size=uapi.RETRIEVE_SESSION.sizeof, fd=-1)
        ctypes.memmove(arg.name, b"fuzz-in", 7)
        ret, _out, fd = self.device(uapi.LIVEUPDATE_IOCTL_RETRIEVE_SESSION, bytes(arg), [])
        assert ret == 0 and fd is not None
        os.close(fd)

    def close(self) -> None:
        self.luo.close()
        for end in self.ends:
            end.close()


def _attachments(kinds: list[str]) -> list[int]:
    fds: list[int] = []
    for kind in kinds:
        if kind == "memfd":
            fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
            os.write(fd, b"x" * 10)
            fds.append(fd)
        elif kind == "pipe":
            r, w = os.pipe2(os.O_CLOEXEC)
            fds += [r, w]
        else:
            fds.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
    return fds


def _commands() -> st.SearchStrategy[int]:
    return st.one_of(
        st.sampled_from(COMMANDS),
        st.builds(lambda c, b: c ^ (1 << b), st.sampled_from(COMMANDS), st.integers(0, 31)),
        st.integers(0, 0xFFFFFFFF),
    )


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    """Raw bytes, or a header over a struct whose size field and length vary."""
    if draw(st.booleans()):
        return draw(st.binary(min_size=1, max_size=200))
    cmd = draw(_commands())
    info = uapi.IOCTLS.get(cmd)
    body = bytearray(draw(st.binary(max_size=(info.sizeof if info else 80) + 16)))
    if len(body) >= 4 and draw(st.booleans()):
        size = info.sizeof if info else len(body)
        _SIZE.pack_into(body, 0, draw(st.sampled_from([size, len(body), 0, 4, size + 8])))
    _tame(cmd, body)
    return wire.REQUEST_HEADER.pack(cmd, len(body)) + bytes(body)


_FRAME_CALL = st.tuples(
    frames(),
    st.integers(0, 2),  # 0: device, 1: outgoing session, 2: incoming session
    st.lists(st.sampled_from(["memfd", "pipe", "null"]), max_size=3),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_FRAME_CALL, min_size=1, max_size=12))
def test_decoder_and_dispatcher_answer_any_bytes_from_the_contract(
    calls: list[tuple[bytes, int, list[str]]],
) -> None:
    before = _open_fds()
    world = World()
    try:
        world.setup()
        for data, target, kinds in calls:
            try:
                req = wire.decode_request(data)
            except wire.FramingError as exc:
                assert exc.errno in (errno.EFAULT, errno.E2BIG)
                continue
            fds = _attachments(kinds)
            try:
                if target == 0:
                    ret, out, fd = world.device(req.cmd, req.arg, fds)
                else:
                    session = world.sessions[target - 1]
                    ret, out, fd = world.session(session, req.cmd, req.arg, fds)
            finally:
                wire.close_fds(fds)  # what the handler did not keep, as the transport does
            assert ret == 0 or -ret in CONTRACT, f"errno {-ret} is not in the contract"
            info = uapi.IOCTLS.get(req.cmd)
            if ret < 0:
                assert out == b"" and fd is None
                continue
            assert info is not None
            (size,) = _SIZE.unpack_from(req.arg)
            assert len(out) == min(size, info.sizeof)
            assert (fd is not None) == info.fd_out
            if fd is not None:
                os.close(fd)
    finally:
        world.close()
    assert _open_fds() == before, "the orchestrator leaked fds"


def test_decoder_accepts_exactly_the_frames_whose_length_matches() -> None:
    rng = random.Random(_seed())
    for _ in range(2000):
        data = random_frame(rng, [])
        try:
            req = wire.decode_request(data)
        except wire.FramingError as exc:
            assert exc.errno in (errno.EFAULT, errno.E2BIG)
            continue
        assert wire.encode_request(req.cmd, req.arg) == data


# ---------------------------------------------------------------------------
# A real luod under a storm of frames
# ---------------------------------------------------------------------------


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Conn:
    """One connection to luod, spoken to frame by frame."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(30)

    @classmethod
    def device(cls, path: str) -> Conn:
        deadline = time.monotonic() + 30
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            sock.connect(path)
            status = wire.decode_hello(sock.recv(64))
            if status == 0:
                return cls(sock)
            sock.close()
            # luod releases a closed device connection asynchronously.
            assert status == -errno.EBUSY and time.monotonic() < deadline, status
            time.sleep(0.002)

    def call(self, data: bytes, fds: list[int]) -> tuple[int, bytes, list[int]] | None:
        """Send one frame; its reply ``(ret, out, fds)``, or ``None`` when luod closed."""
        try:
            wire.send_message(self.sock, data, fds)
            msg = wire.recv_message(self.sock, wire.REPLY_HEADER.size + wire.MAX_ARG_LEN + 1)
        except (BrokenPipeError, ConnectionResetError):
            return None  # luod closed it after the previous reply (a hand-over)
        if msg.length == 0:
            wire.close_fds(msg.fds)
            return None
        assert not msg.truncated and not msg.fds_truncated
        ret, out = wire.decode_reply(msg.data)
        return ret, out, msg.fds

    def close(self) -> None:
        self.sock.close()


@dataclass
class Storm:
    """What one fuzz run holds: connections, its own session fds, fds to attach."""

    path: str
    rng: random.Random
    seed: int
    device: Conn | None = None
    sessions: list[Conn] = field(default_factory=list)
    pool: list[int] = field(default_factory=list)
    replies: dict[int, int] = field(default_factory=dict)

    def refill(self) -> None:
        wire.close_fds(self.pool)
        self.pool = []
        for n in range(4):
            fd = os.memfd_create(f"storm-{n}", os.MFD_CLOEXEC)
            os.write(fd, self.rng.randbytes(self.rng.randint(0, 5000)))
            self.pool.append(fd)
        for _ in range(2):
            self.pool.extend(os.pipe2(os.O_CLOEXEC))

    def dev(self) -> Conn:
        if self.device is None:
            self.device = Conn.device(self.path)
        return self.device

    def new_session(self) -> None:
        arg = uapi.liveupdate_ioctl_create_session(size=uapi.CREATE_SESSION.sizeof, fd=-1)
        name = b"storm-%d" % self.rng.randrange(1 << 30)
        ctypes.memmove(arg.name, name, len(name))
        request = wire.encode_request(uapi.LIVEUPDATE_IOCTL_CREATE_SESSION, bytes(arg))
        got = self.dev().call(request, [])
        assert got is not None and got[0] == 0 and len(got[2]) == 1, (self.seed, got)
        self.sessions.append(Conn(socket.socket(fileno=got[2][0])))

    def attachments(self) -> list[int]:
        count = self.rng.choice([0, 0, 1, 1, 1, 2, 3, 5])
        own = [c.sock.fileno() for c in self.sessions]
        return [self.rng.choice(self.pool + own) for _ in range(count)]

    def throw(self, index: int) -> None:
        if len(self.sessions) < 2:
            self.new_session()
        on_session = self.rng.random() < 0.5
        conn = self.rng.choice(self.sessions) if on_session else self.dev()
        frame = random_frame(self.rng, self.pool)
        got = conn.call(frame, self.attachments())
        where = f"seed {self.seed}, frame {index} ({frame[:24].hex()}...)"
        if got is None:  # luod closed it: a session handed over, or released
            assert on_session, f"luod closed the device connection: {where}"
            self.sessions.remove(conn)
            conn.close()
            return
        ret, _out, fds = got
        self.replies[-ret] = self.replies.get(-ret, 0) + 1
        assert ret == 0 or -ret in CONTRACT, f"errno {-ret} is not in the contract: {where}"
        assert ret == 0 or not fds, f"an error reply carried fds: {where}"
        # Only these return session fds (REGISTER_PARTICIPANT's fd is no session).
        cmd = struct.unpack_from("=I", frame)[0] if len(frame) >= 4 else -1
        returns_session = cmd in _SESSION_RETURNING
        for fd in fds:
            if (
                returns_session
                and is_session_fd(fd)
                and self.rng.random() < 0.3
                and len(self.sessions) < 8
            ):
                self.sessions.append(Conn(socket.socket(fileno=fd)))  # a session it made
            else:
                os.close(fd)

    def close(self) -> None:
        for conn in self.sessions:
            conn.close()
        self.sessions.clear()
        if self.device is not None:
            self.device.close()
            self.device = None
        wire.close_fds(self.pool)
        self.pool = []


_SESSION_RETURNING = frozenset(
    {uapi.LIVEUPDATE_IOCTL_CREATE_SESSION, uapi.LIVEUPDATE_IOCTL_RETRIEVE_SESSION}
)


def is_session_fd(fd: int) -> bool:
    """A seqpacket socket luod handed back: a session (CREATE or RETRIEVE_SESSION)."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False  # not a socket at all
    try:
        return sock.family == socket.AF_UNIX and sock.type == socket.SOCK_SEQPACKET
    finally:
        sock.close()


def _finish_everything(daemon: Luod) -> None:
    """FINISH every incoming session the storm handed over (EINVAL: there was none)."""
    with daemon.open(timeout=30) as dev:
        try:
            dev.set_event(uapi.LuodEvent.FINISH)
        except liveupdate.InvalidArgumentError:
            pass


def _keeper_holds(pid: int, link: str) -> bool:
    try:
        return any(
            os.readlink(f"/proc/{pid}/fd/{name}") == link for name in os.listdir(f"/proc/{pid}/fd")
        )
    except FileNotFoundError:  # an fd closed while we looked
        return False


def _settle(luod: Luod, session: liveupdate.Session) -> None:
    """Wait until luod holds only what it keeps: the baseline of the fd count.

    Closing our device connection is asynchronous (luod closes its end when
    it sees ours hang up), and luod's copies (the keeper) are brought up to
    date on an idle turn of its loop, holding the state's memfd meanwhile.
    """
    me = os.getpid()
    wait_for(lambda: bool(events(luod, "device-closed", peer_pid=me)), "device closed", daemon=luod)
    for pid in luod.keeper_pids():
        wait_for(
            lambda pid=pid: _keeper_holds(pid, "/memfd:keeper (deleted)"),
            "the keeper got its copy of the preserved memfd",
            daemon=luod,
        )
    # A call luod answers after the sync that sent that copy has returned.
    session.get_name()


@pytest.mark.luod_only
def test_luod_survives_random_frames_without_leaking(luod: Luod) -> None:
    frames_total = int(os.environ.get(FRAMES_ENV) or CI_FRAMES)
    seed = _seed()
    print(f"fuzz: {frames_total} frames, {SEED_ENV}={seed}")

    # A well-formed session that the storm must not disturb.
    keeper_data = b"keep me across the storm " * 100
    memfd = os.memfd_create("keeper", os.MFD_CLOEXEC)
    os.write(memfd, keeper_data)
    with luod.open() as dev:
        keeper = dev.create_session("keeper")
    keeper.preserve(memfd, 0xC0FFEE)
    os.close(memfd)
    _settle(luod, keeper)
    baseline_fds = luod.fd_count()

    storm = Storm(luod.socket, random.Random(seed), seed)
    warmup = min(500, frames_total // 4)
    rss_start = 0
    try:
        for index in range(frames_total):
            if index % 2000 == 0:
                storm.refill()
            if index == warmup:
                rss_start = _rss(luod.pid)
            storm.throw(index)
            if index and index % 100_000 == 0:
                print(f"fuzz: {index} frames, luod rss {_rss(luod.pid) >> 20} MiB")
    finally:
        storm.close()
    print(f"fuzz: replies by errno: {dict(sorted(storm.replies.items()))}")
    assert luod.alive(), f"luod died (seed {seed})"

    _finish_everything(luod)
    settled = wait_until(lambda: luod.fd_count() == baseline_fds, timeout=20)
    assert settled, f"luod holds {luod.fd_count()} fds, {baseline_fds} before (seed {seed})"
    rss_end = _rss(luod.pid)
    print(f"fuzz: luod rss {rss_start >> 20} MiB after warm-up, {rss_end >> 20} MiB at the end")
    assert rss_end - rss_start < RSS_GROWTH_BOUND, f"luod grew by {rss_end - rss_start} bytes"

    # The keeper's file is still preserved and reaches its next holder intact.
    with keeper:
        keeper.update()
    with luod.open() as dev, dev.retrieve_session("keeper") as incoming:
        fd = incoming.retrieve(0xC0FFEE)
        try:
            assert os.pread(fd, len(keeper_data) + 1, 0) == keeper_data
        finally:
            os.close(fd)
        incoming.finish()
