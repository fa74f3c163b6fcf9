"""The two transports: luod's socket and a kernel's ``/dev/liveupdate``.

A transport knows how to open the device and how to issue one ioctl on an fd
of its kind. It is deliberately the only place where the two differ: the
kernel path is a thin ``fcntl.ioctl``; the socket path frames the very same
struct bytes per ``wire.md`` and moves fds as ``SCM_RIGHTS``, then writes
the received fd number into the struct like the kernel does. Everything
above (sessions, errors, context managers) is shared.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import socket
import stat
import struct
import time
from collections.abc import Sequence
from typing import Protocol

from liveupdate import uapi, wire
from liveupdate.client.errors import LiveUpdateError, call_error, error_from_errno, file_kind

__all__ = ["KernelTransport", "SocketTransport", "Transport", "transport_for_fd"]

_FD_FIELD = struct.Struct("=i")
_SIZE = struct.Struct("=I")
_FD_OFFSET = 4
#: Requests a batch keeps in flight on luod's socket at most: their replies
#: (with an fd each) must fit in luod's socket send buffer, or luod would stop
#: reading while this side blocks sending (SCM_RIGHTS replies cost ~1 KiB of it).
BATCH_WINDOW = 64
_PEER_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ECONNREFUSED)
# Plain ints: the socket module's constants are enum members.
_AF_UNIX = int(socket.AF_UNIX)
_SOCK_SEQPACKET = int(socket.SOCK_SEQPACKET)

Buffer = bytearray | memoryview


class Transport(Protocol):
    """How to open the device and issue an ioctl on one of its fds."""

    name: str

    def open(self, path: str, timeout: float | None = None) -> int:
        """Open the device at ``path``; raise :class:`LiveUpdateError` (EBUSY, EIO...).

        ``timeout`` bounds how long the open itself may block (``None``: as
        long as it takes); running out is ``ETIMEDOUT``.
        """
        ...

    def ioctl(self, fd: int, cmd: int, buf: Buffer) -> int:
        """Run ``cmd`` on ``fd`` with ``buf`` in and out, as the kernel would."""
        ...

    def fence(self, fd: int, timeout: float | None = None) -> int:
        """Discard every reply waiting on session ``fd`` that answers a request
        someone else sent; returns how many were discarded."""
        ...

    def bind(self, fd: int) -> int:
        """An fd through which this process's calls on the shared ``fd`` get
        their own replies; ``fd`` itself when its calls already do."""
        ...

    def ioctl_many(self, fd: int, cmd: int, bufs: Sequence[Buffer]) -> list[LiveUpdateError | None]:
        """Run ``cmd`` on ``fd`` once per buffer, in order; each call's error or None.

        Every call is made, whatever the others answer; a buffer is written
        back (and owns its returned fd) only where its entry is None. Raises
        only when the transport itself fails (luod gone, the stream broken);
        the fds already returned by the batch are closed then.
        """
        ...


def _as_bytes_view(buf: object) -> memoryview:
    view = memoryview(buf)  # type: ignore[arg-type]
    if view.readonly:
        raise TypeError("the ioctl buffer must be writable (bytearray or ctypes struct)")
    return view.cast("B")


class KernelTransport:
    """A real ``/dev/liveupdate``: ``open(2)`` and ``ioctl(2)``, nothing more."""

    name = "kernel"

    def open(self, path: str, timeout: float | None = None) -> int:
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            err = exc.errno or errno.EIO
            what = f"open {path}"
            if err == errno.EACCES:
                what += " (the kernel's device is root-only)"
            raise error_from_errno(err, what) from None

    def ioctl(self, fd: int, cmd: int, buf: Buffer) -> int:
        view = _as_bytes_view(buf)
        # CPython copies a buffer of up to 1 KiB into a larger scratch area, so
        # the kernel could read past the caller's bytes without a fault: check
        # here what the socket transport's framing checks (EFAULT).
        if len(view) < _SIZE.size or len(view) < _SIZE.unpack_from(view)[0]:
            raise error_from_errno(errno.EFAULT, _ioctl_name(cmd))
        try:
            # mutate_flag=True: the kernel's writes land in the caller's buffer.
            return int(fcntl.ioctl(fd, cmd, view, True))
        except OSError as exc:
            raise call_error(cmd, exc.errno or errno.EIO, view) from None

    def fence(self, fd: int, timeout: float | None = None) -> int:
        """Nothing to discard: ``ioctl(2)`` returns its own caller's answer."""
        return 0

    def bind(self, fd: int) -> int:
        """``fd`` itself: ``ioctl(2)`` answers its own caller, shared fd or not."""
        return fd

    def ioctl_many(self, fd: int, cmd: int, bufs: Sequence[Buffer]) -> list[LiveUpdateError | None]:
        """One ``ioctl(2)`` per buffer: a system call has no round trip to save."""
        results: list[LiveUpdateError | None] = []
        for buf in bufs:
            try:
                self.ioctl(fd, cmd, buf)
            except LiveUpdateError as exc:
                results.append(exc)
            else:
                results.append(None)
        return results


def _send_request(sock: socket.socket, request: bytes, fds: list[int]) -> None:
    """Send one request with the caller's fds. A caller's fd that is not
    open is sent without it: luod then answers in its own check order (a
    duplicate token is EEXIST before a bad fd is EBADF), as the kernel would."""
    try:
        wire.send_message(sock, request, fds)
    except OSError as exc:
        if exc.errno != errno.EBADF or not fds:
            raise
        wire.send_message(sock, request)


class SocketTransport:
    """luod's Unix socket: the same structs, framed per ``wire.md``."""

    name = "socket"

    def open(self, path: str, timeout: float | None = None) -> int:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # A daemon stuck before serving leaves the connection queued on its
        # listener: bound the connect and the wait for the hello.
        sock.settimeout(timeout)
        try:
            sock.connect(path)
            hello = sock.recv(wire.HELLO.size + 1)
            sock.settimeout(None)
            if not hello:
                raise error_from_errno(errno.ENODEV, f"luod at {path} closed the connection")
            status = wire.decode_hello(hello)
        except wire.FramingError as exc:
            sock.close()
            raise error_from_errno(exc.errno, f"{path}: {exc}") from None
        except LiveUpdateError:
            sock.close()
            raise
        except TimeoutError:
            sock.close()
            raise error_from_errno(errno.ETIMEDOUT, f"open {path}: no answer from luod") from None
        except OSError as exc:
            sock.close()
            raise _open_error(path, exc.errno or errno.EIO) from None
        if status < 0:
            sock.close()
            if -status == errno.EBUSY:
                raise error_from_errno(
                    errno.EBUSY,
                    f"open {path}",
                    "another process has the device open (one opener at a time)",
                    "retry once it has closed it",
                )
            raise error_from_errno(-status, f"open {path}")
        return sock.detach()

    def bind(self, fd: int) -> int:
        """Bind a private channel to the device or session behind ``fd`` (wire 1.1).

        Sends a BIND carrying one end of a fresh socketpair and waits for
        luod's acknowledgement on the other end, which is returned: calls
        made on it reach the same device or session, and their replies come
        back on it, whoever else shares ``fd``.

        A luod older than channels (1.0) closes the fd the BIND carried and
        answers it ``ENOTTY`` on ``fd``; that answer is read off ``fd`` and
        ``fd`` itself is returned: calls then go there as before. Any other
        refusal raises its error (``EMFILE``: luod's channel limit).
        """
        what = "BIND (wire 1.1 channel)"
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        shared = socket.socket(_AF_UNIX, _SOCK_SEQPACKET, 0, fd)
        try:
            try:
                wire.send_message(shared, wire.encode_bind(), [theirs.fileno()])
            finally:
                theirs.close()
            # The acknowledgement comes on the channel; a refusal closes it
            # (EOF) and is answered on the shared fd, after the close.
            ack = wire.recv_message(ours, wire.REPLY_HEADER.size + 1)
            wire.close_fds(ack.fds)
            if ack.length:
                ret, _out = wire.decode_reply(ack.data)
                if ret:
                    raise error_from_errno(-ret, what)
                return ours.detach()
            refusal = wire.recv_message(shared, wire.REPLY_HEADER.size + 1)
            wire.close_fds(refusal.fds)
            if refusal.length == 0:
                raise error_from_errno(errno.ENODEV, f"{what} (luod rebooted or stopped)")
            ret, _out = wire.decode_reply(refusal.data)
            if ret == -errno.ENOTTY:
                return fd
            raise error_from_errno(-ret if ret < 0 else errno.EPROTO, what)
        except wire.FramingError as exc:
            raise error_from_errno(exc.errno, f"{what}: {exc}") from None
        except OSError as exc:
            if isinstance(exc, LiveUpdateError):
                raise
            raise _transport_error(exc, what) from None
        finally:
            shared.detach()  # the fd stays the caller's
            ours.close()  # unless detached above

    def ioctl(self, fd: int, cmd: int, buf: Buffer) -> int:
        view = _as_bytes_view(buf)
        info = uapi.IOCTLS.get(cmd)
        # Family and type given: socket.socket(fileno=fd) alone asks the
        # kernel for them (three getsockopt calls) on every call.
        sock = socket.socket(_AF_UNIX, _SOCK_SEQPACKET, 0, fd)
        try:
            return self._call(sock, cmd, view, info)
        finally:
            sock.detach()  # the fd stays the caller's

    def _call(
        self,
        sock: socket.socket,
        cmd: int,
        view: memoryview,
        info: uapi.IoctlInfo | None,
    ) -> int:
        fds: list[int] = []
        if info is not None and info.fd_in and len(view) >= _FD_OFFSET + _FD_FIELD.size:
            (caller_fd,) = _FD_FIELD.unpack_from(view, _FD_OFFSET)
            if caller_fd >= 0:
                fds.append(caller_fd)
        fd_out = info is not None and info.fd_out
        msg = self._exchange(sock, wire.encode_request(cmd, view), fds, fd_out, len(view), cmd)
        received = msg.fds
        try:
            return self._accept_reply(msg, cmd, view, fd_out)
        finally:
            wire.close_fds(received)

    @staticmethod
    def _exchange(
        sock: socket.socket, request: bytes, fds: list[int], fd_out: bool, size: int, cmd: int
    ) -> wire.Message:
        """Send one request (with the caller's fd, if any) and receive its reply."""
        spare = -1
        if fd_out:
            # Make sure the returned fd can be installed *before* asking: if it
            # could not, the kernel would drop it on receipt, and for a
            # RETRIEVE_SESSION luod would take that as the session's close
            # (an implicit FINISH). The slot is freed right before recvmsg.
            try:
                spare = os.dup(sock.fileno())
            except OSError as exc:
                raise error_from_errno(exc.errno or errno.EMFILE, _ioctl_name(cmd)) from None
        try:
            _send_request(sock, request, fds)
            if spare >= 0:
                os.close(spare)
                spare = -1
            return wire.recv_message(sock, wire.REPLY_HEADER.size + size + 1)
        except OSError as exc:
            if spare >= 0:
                os.close(spare)
            raise _transport_error(exc, _ioctl_name(cmd)) from None

    def ioctl_many(self, fd: int, cmd: int, bufs: Sequence[Buffer]) -> list[LiveUpdateError | None]:
        """Pipelined: requests go out ahead of the replies, at most :data:`BATCH_WINDOW` ahead.

        luod answers one connection's requests in order, one reply each, so
        the n-th reply read is the n-th request's: a batch costs about one
        round trip instead of one per call. Each reply is checked exactly as
        :meth:`ioctl` checks it (a reply that fails to decode is that call's
        error; the stream stays in step). A returned fd that did not fit
        (``MSG_CTRUNC``) is that call's ``EMFILE``: unlike :meth:`ioctl`, no
        spare slot is reserved per call, so only use this for calls whose fd
        can be asked for again (RETRIEVE_FD, not RETRIEVE_SESSION).
        """
        info = uapi.IOCTLS.get(cmd)
        fd_out = info is not None and info.fd_out
        views = [_as_bytes_view(buf) for buf in bufs]
        results: list[LiveUpdateError | None] = []
        returned: list[int] = []  # fds the batch wrote into the callers' buffers
        sock = socket.socket(_AF_UNIX, _SOCK_SEQPACKET, 0, fd)
        try:
            sent = 0
            while len(results) < len(views):
                while sent < len(views) and sent - len(results) < BATCH_WINDOW:
                    self._send(sock, cmd, views[sent], info)
                    sent += 1
                view = views[len(results)]
                try:
                    msg = wire.recv_message(sock, wire.REPLY_HEADER.size + len(view) + 1)
                except OSError as exc:
                    raise _transport_error(exc, _ioctl_name(cmd)) from None
                if msg.length == 0:
                    wire.close_fds(msg.fds)
                    raise error_from_errno(
                        errno.ENODEV, f"{_ioctl_name(cmd)} (luod rebooted or stopped)"
                    )
                try:
                    self._accept_reply(msg, cmd, view, fd_out)
                except LiveUpdateError as exc:
                    results.append(exc)
                else:
                    results.append(None)
                    if fd_out and len(view) >= _FD_OFFSET + _FD_FIELD.size:
                        returned.append(_FD_FIELD.unpack_from(view, _FD_OFFSET)[0])
                finally:
                    wire.close_fds(msg.fds)
        except BaseException:
            wire.close_fds(returned)
            raise
        finally:
            sock.detach()  # the fd stays the caller's
        return results

    @staticmethod
    def _send(sock: socket.socket, cmd: int, view: memoryview, info: uapi.IoctlInfo | None) -> None:
        """Send one request of a batch, with the caller's fd when the ioctl takes one."""
        fds: list[int] = []
        if info is not None and info.fd_in and len(view) >= _FD_OFFSET + _FD_FIELD.size:
            (caller_fd,) = _FD_FIELD.unpack_from(view, _FD_OFFSET)
            if caller_fd >= 0:
                fds.append(caller_fd)
        request = wire.encode_request(cmd, view)
        try:
            _send_request(sock, request, fds)
        except OSError as exc:
            raise _transport_error(exc, _ioctl_name(cmd)) from None

    @staticmethod
    def _accept_reply(msg: wire.Message, cmd: int, view: memoryview, fd_out: bool) -> int:
        """Check one reply, copy its struct into the caller's buffer, take its fd."""
        # The ioctl's name is looked up only for an error's message.
        if msg.length == 0:
            raise error_from_errno(errno.ENODEV, f"{_ioctl_name(cmd)} (luod rebooted or stopped)")
        if msg.fds_truncated:
            raise error_from_errno(errno.EMFILE, f"{_ioctl_name(cmd)}: no room for the returned fd")
        if msg.truncated:
            raise error_from_errno(
                errno.EPROTO, f"{_ioctl_name(cmd)}: reply longer than the struct"
            )
        try:
            ret, out = wire.decode_reply(msg.data)
        except wire.FramingError as exc:
            raise error_from_errno(exc.errno, f"{_ioctl_name(cmd)}: {exc}") from None
        if ret < 0:
            raise call_error(cmd, -ret, view)
        view[: len(out)] = out
        if fd_out:
            if len(msg.fds) != 1:
                raise error_from_errno(errno.EPROTO, f"{_ioctl_name(cmd)}: reply carried no fd")
            new_fd = msg.fds.pop()  # no longer closed by the caller's finally
            if len(view) >= _FD_OFFSET + _FD_FIELD.size:
                _FD_FIELD.pack_into(view, _FD_OFFSET, new_fd)
        return ret

    def fence(self, fd: int, timeout: float | None = None) -> int:
        """LUOD_SESSION_SYNC with a fresh random cookie; discard replies up to its answer.

        luod's socket carries no request ids: a reply is matched to its
        request by order alone, and processes sharing one session fd (a
        supervisor and its service) share one queue of replies. A service
        killed with a request in flight leaves luod's answer in that queue,
        where it would be taken for the answer to the next call. luod
        answers each fd's requests in order, so every reply before the SYNC's
        is someone else's. The cookie is random, never a constant, so that
        no stale reply can pass for the fence's: not even the answer to a
        SYNC the dead process sent itself.

        Stale replies' fds are closed. Waiting uses ``poll`` rather than a
        socket timeout, which would set ``O_NONBLOCK`` on the open file shared
        with the service. ``ETIMEDOUT`` after ``timeout`` seconds, ``ENODEV``
        when luod closed the session (it rebooted).
        """
        what = uapi.SESSION_SYNC.name
        cookie = int.from_bytes(os.urandom(8), "little")
        arg = uapi.luod_session_sync(size=ctypes.sizeof(uapi.luod_session_sync), cookie=cookie)
        deadline = None if timeout is None else time.monotonic() + timeout
        sock = socket.socket(fileno=fd)
        try:
            try:
                wire.send_message(sock, wire.encode_request(uapi.LUOD_SESSION_SYNC, bytes(arg)))
            except OSError as exc:
                raise _transport_error(exc, what) from None
            discarded = 0
            while True:
                ret, reply = _next_reply(sock, deadline, what)
                if ret == 0 and _carries_cookie(reply, cookie):
                    return discarded
                if ret == -errno.ENODEV:
                    # luod answers ENODEV to everything on a dead session fd:
                    # whoever this answer was for, the SYNC will get it too.
                    raise error_from_errno(errno.ENODEV, f"{what} (luod rebooted or stopped)")
                discarded += 1
        finally:
            sock.detach()  # the fd stays the caller's


def _next_reply(sock: socket.socket, deadline: float | None, what: str) -> tuple[int, bytes]:
    """The next reply on ``sock`` (its fds closed), waiting until ``deadline``.

    Returns its return value and argument bytes; a reply that does not even
    frame is returned as ``EPROTO`` (it is discarded like any stale one).
    """
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    left = None if deadline is None else max(0.0, deadline - time.monotonic())
    if not poller.poll(None if left is None else int(left * 1000) + 1):
        raise error_from_errno(errno.ETIMEDOUT, f"{what}: luod did not answer")
    try:
        msg = wire.recv_message(sock, wire.REPLY_HEADER.size + wire.MAX_ARG_LEN + 1)
    except OSError as exc:
        raise _transport_error(exc, what) from None
    wire.close_fds(msg.fds)
    if msg.length == 0:
        raise error_from_errno(errno.ENODEV, f"{what} (luod rebooted or stopped)")
    try:
        return wire.decode_reply(msg.data)
    except wire.FramingError:
        return -errno.EPROTO, b""


def _carries_cookie(out: bytes, cookie: int) -> bool:
    """Whether the argument bytes of a successful reply are a SYNC's carrying ``cookie``."""
    size = ctypes.sizeof(uapi.luod_session_sync)
    if len(out) < size:
        return False
    return int(uapi.luod_session_sync.from_buffer_copy(out[:size]).cookie) == cookie


def _transport_error(exc: OSError, what: str) -> LiveUpdateError:
    if exc.errno in _PEER_GONE:
        return error_from_errno(errno.ENODEV, f"{what} (luod rebooted or stopped)")
    return error_from_errno(exc.errno or errno.EIO, what)


def _open_error(path: str, err: int) -> LiveUpdateError:
    """Why connecting to luod's socket at ``path`` failed, and what to do about it.

    ``connect(2)`` answers ECONNREFUSED both for a socket nobody listens on
    and for a path that is no socket at all: the path's type tells them apart.
    """
    where = f"open {path}"
    give = "give luod's socket with --socket or LIVEUPDATE_DEVICE"
    if err == errno.ENOENT:
        return error_from_errno(
            err, where, f"luod is not running at {path}", f"start luod, or {give}"
        )
    if err == errno.EACCES:
        return error_from_errno(
            err,
            where,
            "this user may not use luod's socket",
            "luod's --socket-mode and --socket-group say who may",
        )
    if err == errno.ECONNREFUSED:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            mode = stat.S_IFSOCK
        if not stat.S_ISSOCK(mode):
            return error_from_errno(err, where, f"not a socket but a {file_kind(mode)}", give)
        return error_from_errno(
            err,
            where,
            "nothing listens on this socket (left behind by a stopped luod)",
            "start luod",
        )
    return error_from_errno(err, where)


def _ioctl_name(cmd: int) -> str:
    info = uapi.IOCTLS.get(cmd)
    return info.name if info else f"ioctl {cmd:#x}"


def transport_for_path(path: str) -> KernelTransport | SocketTransport:
    """A character device is a kernel; anything else is luod's socket."""
    try:
        if stat.S_ISCHR(os.stat(path).st_mode):
            return KernelTransport()
    except OSError:
        pass
    return SocketTransport()


def transport_for_fd(fd: int) -> KernelTransport | SocketTransport:
    """The transport an already open device or session fd belongs to."""
    return SocketTransport() if stat.S_ISSOCK(os.fstat(fd).st_mode) else KernelTransport()


def open_with_retry(transport: KernelTransport | SocketTransport, path: str, timeout: float) -> int:
    """Open ``path``, retrying ``EBUSY`` until ``timeout`` seconds have passed."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            # With no timeout an open blocks like open(2); with one, it is a bound.
            return transport.open(
                path, max(0.001, deadline - time.monotonic()) if timeout else None
            )
        except LiveUpdateError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                raise
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 2, 0.05)
