"""Conformance section C (reboot scenarios), written once as stage functions.

Every scenario of ``conformance.md`` section C that fits the pattern
"do something, reboot the orchestrator, look at what survived" is a
:class:`Scenario`: a tuple of *stage functions* and the observations they
must produce, stated once. Two drivers run the very same functions:

* ``test_luod_reboot.py``: against ``luod``, rebooted with ``luoctl reboot``;
* ``vm_stage.py`` + ``test_kernel_reboot.py``: against a real
  ``/dev/liveupdate`` in a VM, rebooted with a real kexec.

A stage function has the signature ``stage(dev_path, keep) -> observations``:

* it opens the device itself (``dev_path``: luod's socket or
  ``/dev/liveupdate``) and closes it before returning, since the device
  admits one opener at a time and must not be held across a reboot;
* it appends to ``keep`` every session the driver must hold open across the
  *next* reboot (closing an outgoing session unpreserves it); everything else
  it opened, it closes;
* it returns a dict of JSON-friendly observations: ``0`` for a call that
  succeeded, the errno's name (``"EINVAL"``) for one that failed as asked,
  contents as text, sizes, booleans.

Session names are unique per scenario, so all scenarios share one reboot:
stage 1 of every scenario, one reboot, stage 2 of every scenario, and for the
scenarios with three stages (C16, C21) a second reboot and stage 3. That
matters for the kernel driver, where every boot costs seconds.

This module imports nothing from pytest: ``vm_stage.py`` runs it inside the
VM, where only the standard library and ``liveupdate`` are needed.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import liveupdate
from liveupdate import Session

__all__ = [
    "SCENARIOS",
    "Scenario",
    "diff",
    "kernel_scenarios",
    "rc",
    "run_stage",
    "stage_count",
]

#: Observations of one scenario (merged over its stages).
Obs = dict[str, Any]
#: Sessions a stage hands to the driver, to hold across the next reboot.
Keep = list[Session]
Stage = Callable[[str, Keep], Obs]

#: Seconds to wait for the device while another opener has it (luoctl's
#: connection during a reboot, a previous stage's close not yet seen).
OPEN_TIMEOUT = 10.0


@dataclass(frozen=True)
class Scenario:
    """One reboot scenario of conformance section C.

    Attributes:
        id: The scenario's id in ``conformance.md`` (``"C1"``).
        title: What it checks, in one line.
        stages: The stage functions; stage ``n`` runs in generation ``n``.
        expected: The observations every stage together must produce, exactly.
        kernel: Whether the kernel driver runs it (``False``: luod only).
    """

    id: str
    title: str
    stages: tuple[Stage, ...]
    expected: Mapping[str, Any]
    kernel: bool = True


# -- helpers ---------------------------------------------------------------------------


def rc(fn: Callable[[], object]) -> int | str:
    """Run ``fn``: ``0`` when it succeeds, else the name of the errno it failed with.

    Only :class:`OSError` is turned into an observation; anything else is a
    bug of the scenario and propagates (the runner records it).
    """
    try:
        fn()
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return 0


def _open(dev: str) -> liveupdate.Device:
    return liveupdate.open_device(dev, timeout=OPEN_TIMEOUT)


class _Fds:
    """Plain fds opened by a stage, each closed exactly once."""

    def __init__(self) -> None:
        self.fds: list[int] = []

    def add(self, fd: int) -> int:
        self.fds.append(fd)
        return fd

    def close_all(self) -> None:
        while self.fds:
            os.close(self.fds.pop())


@contextmanager
def _fds() -> Iterator[_Fds]:
    fds = _Fds()
    try:
        yield fds
    finally:
        fds.close_all()


def _write_all(fd: int, data: bytes, offset: int = 0) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks: list[bytes] = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _memfd(data: bytes, name: str = "reboot-scenario") -> int:
    """A memfd holding ``data``, written *before* it is preserved (the kernel
    locks a preserved memfd's size)."""
    fd = os.memfd_create(name)
    try:
        _write_all(fd, data)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _create(dev: str, keep: Keep, name: str, files: Mapping[int, bytes]) -> Obs:
    """Create session ``name`` holding a memfd per token; keep it across the reboot.

    The memfds are closed once preserved: the orchestrator holds its own
    reference (B9), so what survives is what the orchestrator kept.
    """
    with _open(dev) as device:
        session = device.create_session(name)
    keep.append(session)
    results = []
    for token, data in files.items():
        fd = _memfd(data)
        try:
            results.append(rc(partial(session.preserve, fd, token)))
        finally:
            os.close(fd)
    return {"preserve": results} if results else {}


def _retrieve(dev: str, name: str) -> Session:
    with _open(dev) as device:
        return device.retrieve_session(name)


def _retrieve_and_close(device: liveupdate.Device, name: str) -> None:
    device.retrieve_session(name).close()


def _text(data: bytes) -> str:
    return data.decode(errors="backslashreplace")


def _random_bytes(seed: str, size: int) -> bytes:
    """Deterministic pseudo-random bytes: stage 2 regenerates what stage 1 wrote
    (in the VM, stage 2 runs in another boot)."""
    return random.Random(seed).randbytes(size)


def _check_contents(session: Session, files: Mapping[int, bytes], fds: _Fds) -> list[bool]:
    return [_read_all(fds.add(session.retrieve(token))) == data for token, data in files.items()]


# -- C1: the basic round trip ----------------------------------------------------------

C1_NAME = "test-session"
C1_TOKEN = 0x1A
C1_DATA = b"hello kexec world"


def c1_stage1(dev: str, keep: Keep) -> Obs:
    return _create(dev, keep, C1_NAME, {C1_TOKEN: C1_DATA})


def c1_stage2(dev: str, keep: Keep) -> Obs:
    with _fds() as fds, _retrieve(dev, C1_NAME) as session:
        fd = fds.add(session.retrieve(C1_TOKEN))
        content = _text(_read_all(fd))
        return {"content": content, "finish": rc(session.finish)}


# -- C2: several sessions, empty ones too ----------------------------------------------

C2_EMPTY = ("c2-empty-1", "c2-empty-2")
C2_FILES: dict[str, dict[int, bytes]] = {
    "c2-files-1": {0x1001: b"c2: the only file of files-1"},
    "c2-files-2": {0x2002: b"c2: files-2, first", 0x3003: b"c2: files-2, second file"},
}


def c2_stage1(dev: str, keep: Keep) -> Obs:
    preserve: list[Any] = []
    for name in C2_EMPTY:
        _create(dev, keep, name, {})
    for name, files in C2_FILES.items():
        preserve += _create(dev, keep, name, files)["preserve"]
    return {"preserve": preserve}


def c2_stage2(dev: str, keep: Keep) -> Obs:
    retrieved: list[Any] = []
    finished: list[Any] = []
    contents: list[bool] = []
    with _fds() as fds:
        for name in (*C2_EMPTY, *C2_FILES):
            try:
                session = _retrieve(dev, name)
            except OSError as exc:
                retrieved.append(errno.errorcode.get(exc.errno or 0, "?"))
                continue
            retrieved.append(0)
            with session:
                contents += _check_contents(session, C2_FILES.get(name, {}), fds)
                finished.append(rc(session.finish))
    return {"retrieve": retrieved, "contents_ok": contents, "finish": finished}


# -- C3: 2000 empty sessions (luod only) -----------------------------------------------

C3_COUNT = 2000


def _c3_name(i: int) -> str:
    return f"c3-empty-{i:04d}"


def c3_stage1(dev: str, keep: Keep) -> Obs:
    created = 0
    with _open(dev) as device:
        for i in range(C3_COUNT):
            keep.append(device.create_session(_c3_name(i)))
            created += 1
    return {"created": created}


def c3_stage2(dev: str, keep: Keep) -> Obs:
    retrieved = finished = 0
    failures: list[str] = []
    with _open(dev) as device:
        sessions = []
        for i in range(C3_COUNT):
            try:
                sessions.append(device.retrieve_session(_c3_name(i)))
                retrieved += 1
            except OSError as exc:
                failures.append(f"{_c3_name(i)}: {exc}")
    for session in sessions:
        with session:
            result = rc(session.finish)
            if result == 0:
                finished += 1
            else:
                failures.append(f"{session.name}: finish {result}")
    return {"retrieved": retrieved, "finished": finished, "failures": failures[:5]}


# -- C4: 500 memfds in one session (luod only) -----------------------------------------

C4_NAME = "c4-many-files"
C4_COUNT = 500


def _c4_data(i: int) -> bytes:
    return f"file-data-{i}".encode()


def c4_stage1(dev: str, keep: Keep) -> Obs:
    results = _create(dev, keep, C4_NAME, {i: _c4_data(i) for i in range(C4_COUNT)})
    return {"preserved": results["preserve"].count(0)}


def c4_stage2(dev: str, keep: Keep) -> Obs:
    matched = 0
    with _retrieve(dev, C4_NAME) as session:
        for i in range(C4_COUNT):
            fd = session.retrieve(i)
            try:
                matched += _read_all(fd) == _c4_data(i)
            finally:
                os.close(fd)
        return {"matched": matched, "finish": rc(session.finish)}


# -- C5: 1 MiB of random bytes ---------------------------------------------------------

C5_NAME = "c5-random-mib"
C5_TOKEN = 0x5
C5_SIZE = 1 << 20


def c5_stage1(dev: str, keep: Keep) -> Obs:
    return _create(dev, keep, C5_NAME, {C5_TOKEN: _random_bytes(C5_NAME, C5_SIZE)})


def c5_stage2(dev: str, keep: Keep) -> Obs:
    with _fds() as fds, _retrieve(dev, C5_NAME) as session:
        data = _read_all(fds.add(session.retrieve(C5_TOKEN)))
        want = hashlib.sha256(_random_bytes(C5_NAME, C5_SIZE)).hexdigest()
        return {
            "size": len(data),
            "byte_exact": hashlib.sha256(data).hexdigest() == want,
            "finish": rc(session.finish),
        }


# -- C6: an empty memfd ----------------------------------------------------------------

C6_NAME = "c6-empty-memfd"
C6_TOKEN = 0x6


def c6_stage1(dev: str, keep: Keep) -> Obs:
    return _create(dev, keep, C6_NAME, {C6_TOKEN: b""})


def c6_stage2(dev: str, keep: Keep) -> Obs:
    with _fds() as fds, _retrieve(dev, C6_NAME) as session:
        fd = fds.add(session.retrieve(C6_TOKEN))
        return {"size": os.fstat(fd).st_size, "finish": rc(session.finish)}


# -- C7: data written after preserving -------------------------------------------------

C7_NAME = "c7-write-after-preserve"
C7_TOKEN = 0x7
C7_SIZE = 8192
C7_OFFSET = 4000  # straddles the first page boundary
C7_DATA = b"written after PRESERVE_FD, inside the size"


def c7_stage1(dev: str, keep: Keep) -> Obs:
    with _open(dev) as device:
        session = device.create_session(C7_NAME)
    keep.append(session)
    fd = os.memfd_create(C7_NAME)
    try:
        # Sized first: a kernel locks the size of a preserved memfd, but
        # writing inside the size stays allowed, and must be carried over.
        os.ftruncate(fd, C7_SIZE)
        preserve = rc(lambda: session.preserve(fd, C7_TOKEN))
        late_write = rc(lambda: _write_all(fd, C7_DATA, C7_OFFSET))
    finally:
        os.close(fd)
    return {"preserve": preserve, "late_write": late_write}


def c7_stage2(dev: str, keep: Keep) -> Obs:
    with _fds() as fds, _retrieve(dev, C7_NAME) as session:
        data = _read_all(fds.add(session.retrieve(C7_TOKEN)))
        end = C7_OFFSET + len(C7_DATA)
        return {
            "size": len(data),
            "late_data": _text(data[C7_OFFSET:end]),
            "zeros_elsewhere": not any(data[:C7_OFFSET]) and not any(data[end:]),
            "finish": rc(session.finish),
        }


# -- C8: a session closed before the reboot --------------------------------------------

C8_NAME = "c8-closed-before-reboot"


def c8_stage1(dev: str, keep: Keep) -> Obs:
    scratch: Keep = []
    obs = _create(dev, scratch, C8_NAME, {0x8: b"c8: dropped with its session"})
    for session in scratch:
        session.close()  # unpreserves: nothing of it may reach the next generation
    return obs


def c8_stage2(dev: str, keep: Keep) -> Obs:
    with _open(dev) as device:
        return {"retrieve_session": rc(partial(_retrieve_and_close, device, C8_NAME))}


# -- C9: retrieve a session twice ------------------------------------------------------

C9_NAME = "c9-retrieve-twice"


def c9_stage1(dev: str, keep: Keep) -> Obs:
    return _create(dev, keep, C9_NAME, {0x9: b"c9"})


def c9_stage2(dev: str, keep: Keep) -> Obs:
    with _open(dev) as device:
        first = device.retrieve_session(C9_NAME)
        with first:
            second = rc(partial(_retrieve_and_close, device, C9_NAME))
            return {"retrieve_first": 0, "retrieve_second": second, "finish": rc(first.finish)}


# -- C10: RETRIEVE_FD of one token twice -----------------------------------------------

C10_NAME = "c10-retrieve-fd-twice"
C10_TOKEN = 0x10
C10_DATA = b"c10: one open file behind two fds"


def c10_stage1(dev: str, keep: Keep) -> Obs:
    return _create(dev, keep, C10_NAME, {C10_TOKEN: C10_DATA})


def c10_stage2(dev: str, keep: Keep) -> Obs:
    with _fds() as fds, _retrieve(dev, C10_NAME) as session:
        got: list[int] = []
        results = [rc(lambda: got.append(fds.add(session.retrieve(C10_TOKEN)))) for _ in range(2)]
        obs: Obs = {"retrieve": results}
        if len(got) == 2:
            a, b = got
            obs["same_inode"] = os.fstat(a).st_ino == os.fstat(b).st_ino
            # Same open file: moving one fd's position moves the other's.
            os.lseek(a, 5, os.SEEK_SET)
            obs["shared_position"] = os.lseek(b, 0, os.SEEK_CUR) == 5
            obs["content"] = _text(_read_all(b))
        obs["finish"] = rc(session.finish)
        return obs


# -- C11: an unknown token -------------------------------------------------------------

C11_NAME = "c11-unknown-token"


def c11_stage1(dev: str, keep: Keep) -> Obs:
    return _create(dev, keep, C11_NAME, {0x11: b"c11"})


def c11_stage2(dev: str, keep: Keep) -> Obs:
    with _fds() as fds, _retrieve(dev, C11_NAME) as session:
        unknown = rc(lambda: fds.add(session.retrieve(0xDEADBEEF)))
        return {"retrieve_unknown": unknown, "finish": rc(session.finish)}


# -- C12: FINISH twice -----------------------------------------------------------------

C12_NAME = "c12-finish-twice"
C12_TOKEN = 0x12


def c12_stage1(dev: str, keep: Keep) -> Obs:
    return _create(dev, keep, C12_NAME, {C12_TOKEN: b"c12: discarded by FINISH"})


def c12_stage2(dev: str, keep: Keep) -> Obs:
    with _fds() as fds, _retrieve(dev, C12_NAME) as session:
        return {
            "finish": [rc(session.finish), rc(session.finish)],
            "retrieve_after_finish": rc(lambda: fds.add(session.retrieve(C12_TOKEN))),
        }


# -- C13: a retrieved fd outlives FINISH -----------------------------------------------

C13_NAME = "c13-fd-after-finish"
C13_TOKEN = 0x13
C13_DATA = b"c13: still mine after FINISH"


def c13_stage1(dev: str, keep: Keep) -> Obs:
    return _create(dev, keep, C13_NAME, {C13_TOKEN: C13_DATA})


def c13_stage2(dev: str, keep: Keep) -> Obs:
    with _fds() as fds:
        with _retrieve(dev, C13_NAME) as session:
            fd = fds.add(session.retrieve(C13_TOKEN))
            finish = rc(session.finish)
        # The session is finished and closed: the fd is the caller's alone.
        content = _text(_read_all(fd))
        rewrite = rc(lambda: _write_all(fd, b"C13"))
        return {
            "finish": finish,
            "content_after_finish": content,
            "write_after_finish": rewrite,
            "reread": _text(os.pread(fd, 3, 0)),
        }


# -- C14: PRESERVE_FD on an incoming session -------------------------------------------

C14_NAME = "c14-preserve-incoming"


def c14_stage1(dev: str, keep: Keep) -> Obs:
    return _create(dev, keep, C14_NAME, {0x14: b"c14"})


def c14_stage2(dev: str, keep: Keep) -> Obs:
    with _fds() as fds, _retrieve(dev, C14_NAME) as session:
        fd = fds.add(_memfd(b"c14: may not join an incoming session"))
        return {
            "preserve_incoming": rc(lambda: session.preserve(fd, 0x1414)),
            "finish": rc(session.finish),
        }


# -- C15: an outgoing session with an incoming session's name --------------------------

C15_NAME = "c15-same-name"


def c15_stage1(dev: str, keep: Keep) -> Obs:
    return _create(dev, keep, C15_NAME, {0x15: b"c15: incoming"})


def c15_stage2(dev: str, keep: Keep) -> Obs:
    outgoing: list[Session] = []
    try:
        with _open(dev) as device:
            create = rc(lambda: outgoing.append(device.create_session(C15_NAME)))
            # Both namespaces hold the name now; the incoming one is still retrievable.
            incoming = device.retrieve_session(C15_NAME)
    finally:
        for session in outgoing:
            session.close()
    with _fds() as fds, incoming:
        contents = _check_contents(incoming, {0x15: b"c15: incoming"}, fds)
        return {"create_outgoing": create, "contents_ok": contents, "finish": rc(incoming.finish)}


# -- C16: an incoming session never finished, then another reboot (3 generations) ------

C16_UNTOUCHED = "c16-never-retrieved"
C16_HELD = "c16-retrieved-not-finished"
C16_TOKEN = 0x16
C16_DATA = b"c16: gone in the third generation"


def c16_stage1(dev: str, keep: Keep) -> Obs:
    preserve = _create(dev, keep, C16_UNTOUCHED, {C16_TOKEN: C16_DATA})["preserve"]
    preserve += _create(dev, keep, C16_HELD, {C16_TOKEN: C16_DATA})["preserve"]
    return {"preserve": preserve}


def c16_stage2(dev: str, keep: Keep) -> Obs:
    # C16_UNTOUCHED is left alone; C16_HELD is retrieved and read but never
    # finished, and its fd is held across the next reboot.
    session = _retrieve(dev, C16_HELD)
    keep.append(session)
    with _fds() as fds:
        return {"gen2_contents_ok": _check_contents(session, {C16_TOKEN: C16_DATA}, fds)}


def c16_stage3(dev: str, keep: Keep) -> Obs:
    with _open(dev) as device:
        return {
            "gen3_retrieve": [
                rc(partial(_retrieve_and_close, device, name)) for name in (C16_UNTOUCHED, C16_HELD)
            ]
        }


# -- C21: preserve a retrieved memfd again, before and after FINISH --------------------

C21_NAME = "c21-incoming"
C21_NEXT = "c21-outgoing-again"
C21_TOKEN = 0x21
C21_DATA = b"c21: handed over twice"


def c21_stage1(dev: str, keep: Keep) -> Obs:
    return _create(dev, keep, C21_NAME, {C21_TOKEN: C21_DATA})


def c21_stage2(dev: str, keep: Keep) -> Obs:
    with _fds() as fds:
        incoming = _retrieve(dev, C21_NAME)
        with incoming:
            fd = fds.add(incoming.retrieve(C21_TOKEN))
            with _open(dev) as device:
                outgoing = device.create_session(C21_NEXT)
            keep.append(outgoing)
            before = rc(lambda: outgoing.preserve(fd, 0x2101))
            finish = rc(incoming.finish)
            after = rc(lambda: outgoing.preserve(fd, 0x2102))
        return {"preserve_before_finish": before, "finish": finish, "preserve_after_finish": after}


def c21_stage3(dev: str, keep: Keep) -> Obs:
    # What was preserved again after FINISH crossed the second reboot.
    with _fds() as fds, _retrieve(dev, C21_NEXT) as session:
        return {
            "gen3_content": _text(_read_all(fds.add(session.retrieve(0x2102)))),
            "gen3_retrieve_refused_token": rc(lambda: fds.add(session.retrieve(0x2101))),
            "gen3_finish": rc(session.finish),
        }


# -- the registry ----------------------------------------------------------------------

_ALL = [
    Scenario(
        "C1",
        "one memfd in one session: content intact, FINISH 0",
        (c1_stage1, c1_stage2),
        {"preserve": [0], "content": C1_DATA.decode(), "finish": 0},
    ),
    Scenario(
        "C2",
        "two empty sessions and two with files: all retrievable, contents intact",
        (c2_stage1, c2_stage2),
        {
            "preserve": [0, 0, 0],
            "retrieve": [0, 0, 0, 0],
            "contents_ok": [True, True, True],
            "finish": [0, 0, 0, 0],
        },
    ),
    Scenario(
        "C3",
        f"{C3_COUNT} empty sessions, each retrieved and finished",
        (c3_stage1, c3_stage2),
        {"created": C3_COUNT, "retrieved": C3_COUNT, "finished": C3_COUNT, "failures": []},
        kernel=False,
    ),
    Scenario(
        "C4",
        f"{C4_COUNT} memfds in one session, all contents intact",
        (c4_stage1, c4_stage2),
        {"preserved": C4_COUNT, "matched": C4_COUNT, "finish": 0},
        kernel=False,
    ),
    Scenario(
        "C5",
        "1 MiB of random bytes, byte-exact",
        (c5_stage1, c5_stage2),
        {"preserve": [0], "size": C5_SIZE, "byte_exact": True, "finish": 0},
    ),
    Scenario(
        "C6",
        "an empty memfd has size 0",
        (c6_stage1, c6_stage2),
        {"preserve": [0], "size": 0, "finish": 0},
    ),
    Scenario(
        "C7",
        "data written after preserving is carried over",
        (c7_stage1, c7_stage2),
        {
            "preserve": 0,
            "late_write": 0,
            "size": C7_SIZE,
            "late_data": C7_DATA.decode(),
            "zeros_elsewhere": True,
            "finish": 0,
        },
    ),
    Scenario(
        "C8",
        "a session closed before the reboot is gone",
        (c8_stage1, c8_stage2),
        {"preserve": [0], "retrieve_session": "ENOENT"},
    ),
    Scenario(
        "C9",
        "a session is retrieved once",
        (c9_stage1, c9_stage2),
        {"preserve": [0], "retrieve_first": 0, "retrieve_second": "EINVAL", "finish": 0},
    ),
    Scenario(
        "C10",
        "RETRIEVE_FD twice: two fds, one open file",
        (c10_stage1, c10_stage2),
        {
            "preserve": [0],
            "retrieve": [0, 0],
            "same_inode": True,
            "shared_position": True,
            "content": C10_DATA.decode(),
            "finish": 0,
        },
    ),
    Scenario(
        "C11",
        "RETRIEVE_FD of an unknown token",
        (c11_stage1, c11_stage2),
        {"preserve": [0], "retrieve_unknown": "ENOENT", "finish": 0},
    ),
    Scenario(
        "C12",
        "FINISH twice, then RETRIEVE_FD",
        (c12_stage1, c12_stage2),
        {"preserve": [0], "finish": [0, 0], "retrieve_after_finish": "ENOENT"},
    ),
    Scenario(
        "C13",
        "a retrieved fd stays valid after FINISH",
        (c13_stage1, c13_stage2),
        {
            "preserve": [0],
            "finish": 0,
            "content_after_finish": C13_DATA.decode(),
            "write_after_finish": 0,
            "reread": "C13",
        },
    ),
    Scenario(
        "C14",
        "PRESERVE_FD on an incoming session",
        (c14_stage1, c14_stage2),
        {"preserve": [0], "preserve_incoming": "EINVAL", "finish": 0},
    ),
    Scenario(
        "C15",
        "an outgoing session may take an incoming session's name",
        (c15_stage1, c15_stage2),
        {"preserve": [0], "create_outgoing": 0, "contents_ok": [True], "finish": 0},
    ),
    Scenario(
        "C16",
        "incoming sessions never finished are gone after another reboot",
        (c16_stage1, c16_stage2, c16_stage3),
        {
            "preserve": [0, 0],
            "gen2_contents_ok": [True],
            "gen3_retrieve": ["ENOENT", "ENOENT"],
        },
    ),
    Scenario(
        "C21",
        "a retrieved memfd: preserve EBUSY before FINISH, 0 after (and it crosses a reboot)",
        (c21_stage1, c21_stage2, c21_stage3),
        {
            "preserve": [0],
            "preserve_before_finish": "EBUSY",
            "finish": 0,
            "preserve_after_finish": 0,
            "gen3_content": C21_DATA.decode(),
            "gen3_retrieve_refused_token": "ENOENT",
            "gen3_finish": 0,
        },
    ),
]

#: Every staged scenario, by id, in conformance order.
SCENARIOS: dict[str, Scenario] = {s.id: s for s in _ALL}


def kernel_scenarios() -> list[Scenario]:
    """The scenarios the kernel driver runs."""
    return [s for s in SCENARIOS.values() if s.kernel]


def stage_count(scenarios: Iterable[Scenario]) -> int:
    """How many generations a run of ``scenarios`` needs."""
    return max((len(s.stages) for s in scenarios), default=0)


# -- running stages --------------------------------------------------------------------


def run_stage(
    index: int,
    dev: str,
    scenarios: Iterable[Scenario],
    observed: dict[str, Obs],
    keep: dict[str, Keep],
) -> None:
    """Run stage ``index`` (1-based) of every scenario that has one.

    Observations are merged into ``observed[id]``; sessions to hold across
    the next reboot are appended to ``keep[id]``. A stage that raises is
    recorded as ``stageN_error`` (which no expectation contains) and the
    other scenarios carry on; its kept sessions are dropped.
    """
    for scenario in scenarios:
        if len(scenario.stages) < index:
            continue
        obs = observed.setdefault(scenario.id, {})
        kept: Keep = []
        try:
            result = scenario.stages[index - 1](dev, kept)
        except Exception as exc:
            obs[f"stage{index}_error"] = f"{type(exc).__name__}: {exc}"
            for session in kept:
                session.close()
            continue
        clash = sorted(set(result) & set(obs))
        if clash:
            obs[f"stage{index}_error"] = f"observation keys reused across stages: {clash}"
        obs.update(result)
        keep.setdefault(scenario.id, []).extend(kept)


def diff(expected: Mapping[str, Any], observed: Mapping[str, Any]) -> list[str]:
    """Where ``observed`` differs from ``expected`` (empty: they are equal)."""
    lines = []
    for key in sorted(set(expected) | set(observed)):
        if key not in observed:
            lines.append(f"{key}: missing (expected {expected[key]!r})")
        elif key not in expected:
            lines.append(f"{key}: unexpected {observed[key]!r}")
        elif expected[key] != observed[key]:
            lines.append(f"{key}: expected {expected[key]!r}, got {observed[key]!r}")
    return lines
