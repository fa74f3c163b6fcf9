"""The C conformance program against luod: the same errnos as the Python library.

``tests/shim/conformance.c`` runs the scenarios of ``conformance.md`` sections
A and B that a C program calling ``ioctl()`` can run, against our header only,
under ``LD_PRELOAD=libluoshim.so``; it prints one ``<id> <step> <result>``
line per check. :func:`python_twin` makes the very same checks through the
client library (the errno of its exceptions) and prints the same lines. The
test compares the two line by line (issue 13: "errno values seen by the C
programs match those seen by the Python library"), and pins the expected
answers of ``conformance.md`` for key lines, so that both sides being wrong
the same way cannot pass.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cprograms import assert_same_lines, lines_of

import liveupdate
from liveupdate import uapi
from luodtest import Luod, errno_of, memfd, read_all

pytestmark = pytest.mark.luod_only

HERE = Path(__file__).resolve().parent
NAME_LEN = uapi.LIVEUPDATE_SESSION_NAME_LENGTH
B13_FILES = 500

#: (step name, ioctl) in the C program's order (its IOCTLS table).
IOCTLS = [
    ("create_session", uapi.CREATE_SESSION),
    ("retrieve_session", uapi.RETRIEVE_SESSION),
    ("preserve_fd", uapi.PRESERVE_FD),
    ("retrieve_fd", uapi.RETRIEVE_FD),
    ("finish", uapi.FINISH),
    ("get_name", uapi.GET_NAME),
]

A7_CASES = [
    ("device-nr-02", False, 0xBA02),
    ("device-nr-7f", False, 0xBA7F),
    ("device-session-nr-40", False, 0xBA40),
    ("device-session-nr-43", False, 0xBA43),
    ("session-device-nr-00", True, 0xBA00),
    ("session-device-nr-01", True, 0xBA01),
    ("session-nr-44", True, 0xBA44),
    ("device-type-bb", False, 0xBB00),
    ("session-type-bb", True, 0xBB40),
    ("device-iowr-bits", False, (3 << 30) | (72 << 16) | 0xBA00),
    ("session-iowr-bits", True, (3 << 30) | (16 << 16) | 0xBA40),
    ("session-size-bits", True, 0x0048BA43),
]


class Lines:
    """The output being built, in the C program's format."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def errno(self, id_: str, step: str, err: int) -> None:
        self.lines.append(f"{id_} {step} {errno.errorcode[err] if err else 'OK'}")

    def verdict(self, id_: str, step: str, ok: bool) -> None:
        self.lines.append(f"{id_} {step} {'OK' if ok else 'MISMATCH'}")

    def skip(self, id_: str, why: str) -> None:
        self.lines.append(f"{id_} skip {why}")


def ioctl_errno(target: liveupdate.Device | liveupdate.Session, cmd: int, buf: bytearray) -> int:
    """``target.ioctl(cmd, buf)``: 0 or the errno of the library's exception."""
    return errno_of(lambda: target.ioctl(cmd, buf))


def holds(fd: int, data: bytes) -> bool:
    os.lseek(fd, 0, os.SEEK_SET)
    return bool(read_all(fd) == data)


def raw(info: uapi.IoctlInfo, size: int, length: int = 128) -> bytearray:
    buf = bytearray(length)
    buf[:4] = size.to_bytes(4, "little")
    return buf


def open_elsewhere(path: str) -> int:
    """Another process opens the device: 0 or its errno."""
    code = (
        "import sys, liveupdate\n"
        "try:\n"
        f"    liveupdate.open_device({path!r}, timeout=0).close()\n"
        "except OSError as exc:\n"
        "    sys.exit(exc.errno)\n"
    )
    return subprocess.run([sys.executable, "-c", code], check=False, timeout=30).returncode


@contextlib.contextmanager
def closing_fds() -> Iterator[list[int]]:
    fds: list[int] = []
    try:
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


class Twin:
    """conformance.c's checks, through the client library."""

    def __init__(self, path: str, prefix: str) -> None:
        self.path = path
        self.prefix = prefix
        self.out = Lines()

    def name(self, suffix: str) -> bytes:
        return f"{self.prefix}-{suffix}".encode()[: NAME_LEN - 1]

    def open(self) -> liveupdate.Device:
        return liveupdate.open_device(self.path, timeout=0)

    def create(self, dev: liveupdate.Device, suffix: str) -> tuple[int, liveupdate.Session | None]:
        try:
            return 0, dev.create_session(self.name(suffix))
        except OSError as exc:
            assert exc.errno is not None
            return exc.errno, None

    def raw_call(
        self,
        dev: liveupdate.Device,
        session: liveupdate.Session,
        i: int,
        size: int,
        tail: int | None,
        tag: int,
    ) -> int:
        _step, info = IOCTLS[i]
        buf = raw(info, size)
        memfd_fd = -1
        if i <= 1:
            buf[4:8] = (-1).to_bytes(4, "little", signed=True)
            name = self.name(f"t{tag}" if i == 0 else "absent")
            buf[8 : 8 + len(name)] = name
        elif i <= 3:
            fd = -1
            if i == 2:
                fd = memfd_fd = memfd(b"a memfd")
            buf[4:8] = fd.to_bytes(4, "little", signed=True)
            buf[8:16] = (0xA000 + tag if i == 2 else 1).to_bytes(8, "little")
        if tail is not None:
            buf[tail] = 0x5A
        target = session if info.on is uapi.FdKind.SESSION else dev
        err = errno_of(lambda: target.ioctl(info.cmd, buf))
        if err == 0 and info.fd_out:
            os.close(int.from_bytes(buf[4:8], "little", signed=True))
        if memfd_fd >= 0:
            os.close(memfd_fd)
        return err

    def section_a(self) -> None:
        out = self.out
        dev = self.open()
        out.errno("A1", "open", 0)
        dev.close()
        out.errno("A1", "close", 0)

        first = self.open()
        out.errno("A2", "open", 0)
        out.errno("A2", "open-same-process", errno_of(lambda: self.open().close()))
        out.errno("A2", "open-other-process", open_elsewhere(self.path))
        first.close()
        dev = self.open()
        out.errno("A2", "open-after-close", 0)

        with dev:
            err, s = self.create(dev, "s")
            out.errno("A3", "create-s", err)
            assert s is not None
            with s:
                self._a_on(dev, s)
        out.skip("A16", "covered-by-python")
        out.skip("A17", "wire-only")

    def _a_on(self, dev: liveupdate.Device, s: liveupdate.Session) -> None:
        out = self.out
        err, x = self.create(dev, "x")
        out.errno("A3", "create-x", err)
        out.errno("A3", "create-x-again", self.create(dev, "x")[0])
        for name in ("a", "b"):
            err, other = self.create(dev, name)
            out.errno("A4", f"create-{name}", err)
            if other is not None:
                other.close()
        if x is not None:
            x.close()

        create = uapi.LIVEUPDATE_IOCTL_CREATE_SESSION
        buf = raw(uapi.CREATE_SESSION, 72, 72)
        buf[4:8] = (-1).to_bytes(4, "little", signed=True)
        out.errno("A5", "empty-name", errno_of(lambda: dev.ioctl(create, buf)))
        buf[8:72] = b"n" * NAME_LEN
        out.errno("A5", "64-bytes-no-nul", errno_of(lambda: dev.ioctl(create, buf)))

        name63 = (self.prefix + "-").encode().ljust(NAME_LEN - 1, b"6")
        err, s63 = self.create_raw_name(dev, name63)
        out.errno("A6", "create-63", err)
        assert s63 is not None
        with s63:
            got = b""
            try:
                got = s63.get_name()
                out.errno("A6", "get-name", 0)
            except OSError as exc:
                assert exc.errno is not None
                out.errno("A6", "get-name", exc.errno)
            out.verdict("A6", "same-63-bytes", got == name63)

        for step, on_session, cmd in A7_CASES:
            buf = bytearray(128)
            buf[0] = 72
            target: liveupdate.Device | liveupdate.Session = s if on_session else dev
            out.errno("A7", step, ioctl_errno(target, cmd, buf))

        for i, (step, info) in enumerate(IOCTLS):
            sz = info.sizeof
            out.errno("A8", f"{step}-size-min-1", self.raw_call(dev, s, i, sz - 1, None, 10))
            out.errno("A8", f"{step}-size-0", self.raw_call(dev, s, i, 0, None, 11))
            out.errno("A9", f"{step}-sizeof", self.raw_call(dev, s, i, sz, None, 12))
            out.errno("A9", f"{step}-sizeof+8", self.raw_call(dev, s, i, sz + 8, None, 13))
            out.errno("A10", f"{step}-tail-first", self.raw_call(dev, s, i, sz + 8, sz, 14))
            out.errno("A10", f"{step}-tail-last", self.raw_call(dev, s, i, sz + 8, sz + 7, 15))

        out.skip("A11", "wire-only")
        out.skip("A12", "wire-only")
        get_name = uapi.LIVEUPDATE_SESSION_GET_NAME
        buf = raw(uapi.GET_NAME, 72, 72)
        buf[4] = 1
        out.errno("A13", "get-name-reserved-1", errno_of(lambda: s.ioctl(get_name, buf)))
        buf[4] = 0
        out.errno("A13", "get-name-reserved-0", errno_of(lambda: s.ioctl(get_name, buf)))
        fin = raw(uapi.FINISH, 8, 8)
        fin[4] = 1
        out.errno(
            "A13",
            "finish-reserved-1",
            errno_of(lambda: s.ioctl(uapi.LIVEUPDATE_SESSION_FINISH, fin)),
        )
        out.skip("A14", "wire-only")
        self._a15(dev, s)

    def create_raw_name(
        self, dev: liveupdate.Device, name: bytes
    ) -> tuple[int, liveupdate.Session | None]:
        try:
            return 0, dev.create_session(name)
        except OSError as exc:
            assert exc.errno is not None
            return exc.errno, None

    def _a15(self, dev: liveupdate.Device, s: liveupdate.Session) -> None:
        for i in (0, 2, 5):
            step, info = IOCTLS[i]
            for extra in (0, 8):
                size = info.sizeof + extra
                buf = raw(info, size, size + 8)
                buf[size:] = b"\xee" * 8
                fd = -1
                if i == 0:
                    name = self.name(f"r{extra}")
                    buf[8 : 8 + len(name)] = name
                elif i == 2:
                    fd = memfd(b"a15")
                    buf[4:8] = fd.to_bytes(4, "little")
                    buf[8:16] = (0xF000 + extra).to_bytes(8, "little")
                target = dev if i == 0 else s
                err = ioctl_errno(target, info.cmd, buf)
                self.out.errno("A15", f"{step}-sizeof+{extra}", err)
                ok = buf[size:] == b"\xee" * 8 and buf[:4] == size.to_bytes(4, "little")
                ok = ok and buf[info.sizeof : size] == bytes(extra)
                if i == 5:
                    ok = ok and buf[8:72] == self.name("s").ljust(NAME_LEN, b"\0")
                self.out.verdict("A15", f"{step}-sizeof+{extra}-reply", ok)
                if i == 0 and err == 0:
                    os.close(int.from_bytes(buf[4:8], "little", signed=True))
                if fd >= 0:
                    os.close(fd)

    def preserve(self, session: liveupdate.Session, fd: int, token: int) -> int:
        return errno_of(lambda: session.preserve(fd, token))

    def section_b(self) -> None:
        with self.open() as dev, closing_fds() as fds:
            self._b(dev, fds)

    def _session(self, dev: liveupdate.Device, suffix: str) -> liveupdate.Session:
        return dev.create_session(self.name(suffix))

    def _b(self, dev: liveupdate.Device, fds: list[int]) -> None:
        out = self.out

        def new_memfd(data: bytes) -> int:
            fds.append(memfd(data))
            return fds[-1]

        err, b1 = self.create(dev, "b1")
        out.errno("B1", "create", err)
        assert b1 is not None
        a = new_memfd(b"hello liveupdate")
        out.errno("B1", "preserve-0x1234", self.preserve(b1, a, 0x1234))
        out.verdict("B1", "data-while-preserved", holds(a, b"hello liveupdate"))
        b1.close()
        out.errno("B1", "close-session", 0)
        out.verdict("B1", "data-after-close", holds(a, b"hello liveupdate"))

        with self._session(dev, "b2") as s1:
            a, b = new_memfd(b"first file"), new_memfd(b"second file")
            out.errno("B2", "preserve-0xaaaa", self.preserve(s1, a, 0xAAAA))
            out.errno("B2", "preserve-0xbbbb", self.preserve(s1, b, 0xBBBB))
        out.verdict("B2", "data", holds(a, b"first file") and holds(b, b"second file"))

        with self._session(dev, "b3-one") as s1, self._session(dev, "b3-two") as s2:
            out.errno("B3", "preserve-s1-data", self.preserve(s1, new_memfd(b"one"), 0x10))
            out.errno("B3", "preserve-s1-empty", self.preserve(s1, new_memfd(b""), 0x11))
            out.errno("B3", "preserve-s2-data", self.preserve(s2, new_memfd(b"two"), 0x20))
            out.errno("B3", "preserve-s2-empty", self.preserve(s2, new_memfd(b""), 0x21))

        with self._session(dev, "b4") as s1:
            fds.append(os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC))
            out.errno("B4", "preserve-dev-null", self.preserve(s1, fds[-1], 0xDEAD))

        with self._session(dev, "b5-one") as s1, self._session(dev, "b5-two") as s2:
            a = new_memfd(b"only once")
            out.errno("B5", "preserve-s1-0x1111", self.preserve(s1, a, 0x1111))
            out.errno("B5", "preserve-s2-0x2222", self.preserve(s2, a, 0x2222))
            out.errno("B5", "preserve-s1-0x3333", self.preserve(s1, a, 0x3333))

        with self._session(dev, "b6") as s1:
            out.errno("B6", "preserve-a-0x66", self.preserve(s1, new_memfd(b"a"), 0x66))
            out.errno("B6", "preserve-b-0x66", self.preserve(s1, new_memfd(b"b"), 0x66))

        with self._session(dev, "b7-one") as s1, self._session(dev, "b7-two") as s2:
            out.errno("B7", "preserve-s1-0x77", self.preserve(s1, new_memfd(b"1"), 0x77))
            out.errno("B7", "preserve-s2-0x77", self.preserve(s2, new_memfd(b"2"), 0x77))

        with self._session(dev, "b8") as s1:
            out.errno("B8", "preserve-token-0", self.preserve(s1, new_memfd(b"zero"), 0))
            out.errno("B8", "preserve-token-max", self.preserve(s1, new_memfd(b"max"), 2**64 - 1))

        with self._session(dev, "b9") as s1:
            own = memfd(b"still here")
            out.errno("B9", "preserve", self.preserve(s1, own, 0xB9))
            os.close(own)
            out.errno("B9", "close-own-fd", 0)
            again = self.preserve(s1, new_memfd(b"another"), 0xB9)
            out.errno("B9", "preserve-again-0xb9", again)

        with self._session(dev, "b10") as s1:
            s1.preserve(new_memfd(b"x"), 1)
            out.errno("B10", "retrieve-fd", errno_of(lambda: os.close(s1.retrieve(1))))
            out.errno("B10", "finish", errno_of(s1.finish))

        out.skip("B11", "needs-max-files")
        out.skip("B12", "slow")

        with self._session(dev, "b13") as s1:
            files = [new_memfd(b"file-data-%d" % n) for n in range(B13_FILES)]
            err = 0
            for n, fd in enumerate(files):
                err = err or self.preserve(s1, fd, n)
            out.errno("B13", "preserve-500", err)
        out.verdict(
            "B13", "data", all(holds(fd, b"file-data-%d" % n) for n, fd in enumerate(files))
        )

        with self._session(dev, "b14") as s1:
            a = new_memfd(b"reachable by O_PATH")
            fds.append(os.open(f"/proc/self/fd/{a}", os.O_PATH | os.O_CLOEXEC))
            out.errno("B14", "preserve-o-path", self.preserve(s1, fds[-1], 0x14))
            out.errno("B14", "preserve-memfd", self.preserve(s1, a, 0x14))

        with self._session(dev, "b15") as s1:
            r, w = os.pipe2(os.O_CLOEXEC)
            fds.extend((r, w))
            out.errno("B15", "preserve-read-end", self.preserve(s1, r, 0x150))
            out.errno("B15", "preserve-write-end", self.preserve(s1, w, 0x151))
            out.errno("B15", "preserve-read-end-again", self.preserve(s1, r, 0x152))


def python_twin(path: str, prefix: str) -> list[str]:
    twin = Twin(path, prefix)
    twin.section_a()
    twin.section_b()
    return twin.out.lines


#: conformance.md's answers for key lines (luod's; semantics.md lists the kernel's).
EXPECTED = {
    "A1 open": "OK",
    "A2 open-same-process": "EBUSY",
    "A2 open-other-process": "EBUSY",
    "A2 open-after-close": "OK",
    "A3 create-x-again": "EEXIST",
    "A5 empty-name": "EINVAL",
    "A5 64-bytes-no-nul": "EINVAL",
    "A6 same-63-bytes": "OK",
    "A7 device-nr-02": "ENOTTY",
    "A7 session-device-nr-00": "ENOTTY",
    "A7 device-type-bb": "ENOTTY",
    "A7 session-iowr-bits": "ENOTTY",
    "A8 create_session-size-0": "EINVAL",
    "A8 get_name-size-min-1": "EINVAL",
    "A9 create_session-sizeof+8": "OK",
    "A9 retrieve_session-sizeof+8": "ENOENT",
    "A9 preserve_fd-sizeof+8": "OK",
    "A10 create_session-tail-last": "E2BIG",
    "A10 preserve_fd-tail-first": "E2BIG",
    "A10 finish-tail-first": "EINVAL",
    "A13 get-name-reserved-1": "EINVAL",
    "A13 finish-reserved-1": "EINVAL",
    "A15 get_name-sizeof+8-reply": "OK",
    "B1 preserve-0x1234": "OK",
    "B1 data-after-close": "OK",
    "B4 preserve-dev-null": "ENOENT",
    "B5 preserve-s2-0x2222": "EBUSY",
    "B5 preserve-s1-0x3333": "EBUSY",
    "B6 preserve-b-0x66": "EEXIST",
    "B8 preserve-token-max": "OK",
    "B9 preserve-again-0xb9": "EEXIST",
    "B10 retrieve-fd": "EINVAL",
    "B10 finish": "EINVAL",
    "B13 preserve-500": "OK",
    "B14 preserve-o-path": "EBADF",
    "B15 preserve-read-end": "OK",
    "B15 preserve-read-end-again": "EBUSY",
}


def test_c_conformance_program_sees_the_python_librarys_errnos(
    luod: Luod, shim_env: dict[str, str], build_c: Callable[[Path], Path]
) -> None:
    program = build_c(HERE / "conformance.c")
    c_lines = lines_of(program, shim_env, "c")
    assert_same_lines(c_lines, python_twin(luod.socket, "py"), "C against its Python twin")
    results = {line.rsplit(" ", 1)[0]: line.rsplit(" ", 1)[1] for line in c_lines}
    assert {key: results.get(key) for key in EXPECTED} == EXPECTED
    # Every checked line of A and B says OK or an errno; nothing failed unlabelled.
    assert not [line for line in c_lines if line.endswith("MISMATCH")]


#: Where Linux answers otherwise on purpose (docs/guides/c-programs.md): the
#: line's key -> (luod's answer, Linux's answer).
KERNEL_DEVIATIONS_A7 = ("A7 device-nr-02", "A7 device-nr-7f", "A7 device-session-nr-",
                        "A7 session-device-nr-", "A7 session-nr-44")  # fmt: skip
KERNEL_DEVIATIONS_B15 = (
    "B15 preserve-read-end",
    "B15 preserve-write-end",
    "B15 preserve-read-end-again",
)


def allowed_deviation(key: str, luod_answer: str, kernel_answer: str) -> bool:
    """Whether a line may differ between luod and the kernel (the documented list)."""
    if key.startswith(KERNEL_DEVIATIONS_A7):
        return (luod_answer, kernel_answer) == ("ENOTTY", "EINVAL")
    if key in KERNEL_DEVIATIONS_B15:
        return kernel_answer == "ENOENT"  # Linux has no pipe handler
    return False


@pytest.mark.vm
@pytest.mark.timeout(900)
def test_the_same_c_binary_on_the_kernel_differs_only_where_documented(
    luod: Luod,
    shim_env: dict[str, str],
    build_c: Callable[[Path], Path],
    kernel_ab_lines: list[str],
) -> None:
    """The binary without the shim, in the kernel VM against the real
    /dev/liveupdate, prints luod's lines except the documented deviations."""
    program = build_c(HERE / "conformance.c")
    on_luod = lines_of(program, shim_env, "c")
    on_kernel = kernel_ab_lines
    assert len(on_kernel) == len(on_luod), on_kernel[-5:]
    differing = []
    for luod_line, kernel_line in zip(on_luod, on_kernel, strict=True):
        key, luod_answer = luod_line.rsplit(" ", 1)
        kernel_key, kernel_answer = kernel_line.rsplit(" ", 1)
        assert kernel_key == key, (luod_line, kernel_line)
        if luod_answer != kernel_answer and not allowed_deviation(key, luod_answer, kernel_answer):
            differing.append((key, luod_answer, kernel_answer))
    assert not differing, differing
