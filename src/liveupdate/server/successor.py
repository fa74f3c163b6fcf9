"""The successor: the next generation of luod, started ahead of its reboot.

Linux loads the next kernel ahead of time (``kexec -l``) and only jumps at
reboot; luod does the same. PREPARE (or a REBOOT from NORMAL, in one go)
starts the installed luod as a *successor* process: the same command as any
child of luod (``python -P -m liveupdate.server.luod``, in ``/``, with the
environment :func:`~liveupdate.server.reexec.child_environment` builds),
with nothing but ``--successor-fd N``, one end of a socketpair the old
generation keeps the other end of; its configuration is the first message
on it (JSON, not options: ``luod --successor-fd N`` never imports the
command line's ``click``). The successor imports everything, checks dry-run images
(the pre-flight) and waits. At REBOOT the old generation freezes, writes the
image and *hands over* every fd; the successor restores, and takes over the
listening socket, the lock and the state directory once the old one said so.

The conversation, one ``SOCK_SEQPACKET`` message each (a JSON object; fds
ride along as ``SCM_RIGHTS``, at most :data:`MAX_FDS_PER_MESSAGE` a message)::

    successor                                   old generation
                                       <----    config {fields}     (at its start)
    ready {pid}  or  failed {reason}   ---->    (PREPARE answers)
                                       <----    check {image}       (a session changed)
    ready  or  failed {reason}         ---->
                                       <----    fds {numbers, last} + SCM_RIGHTS, ...
    restored  or  failed {reason}      ---->    (the REBOOT answers)
                                       <----    serve
    serving                            ---->    (the old generation closes its
                                                 connections and exits)

Who holds the files at every moment decides what a SIGKILL does
(``docs/concepts/crash-safety.md``): the old generation until the successor
said ``restored`` (a failed or dead successor changes nothing: the reboot
rolls back), both from then on (the successor takes over when the old one
dies, the old one restores in-process when the successor dies). A successor
whose old generation hangs up before the last fd arrived holds an
incomplete set: it closes it and exits, and the next cold start reports the
image left behind.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from liveupdate import wire
from liveupdate.events import event

__all__ = [
    "HANDOFF_TIMEOUT",
    "MAX_FDS_PER_MESSAGE",
    "READY_TIMEOUT",
    "Channel",
    "Successor",
    "SuccessorError",
]

#: The kernel's limit of fds in one ``SCM_RIGHTS`` record (``SCM_MAX_FD``).
MAX_FDS_PER_MESSAGE = 253
#: Seconds a successor has to import everything and check the first image.
READY_TIMEOUT = 120.0
#: Seconds a successor has to restore what it was handed (15,000 files included).
HANDOFF_TIMEOUT = 120.0
#: Seconds a successor has to say ``serving`` once told to serve.
SERVE_TIMEOUT = 30.0
#: Largest message of the conversation (fd numbers of one batch, a reason).
_BUFSIZE = 64 * 1024


class SuccessorError(OSError):
    """The successor failed or is gone; ``strerror`` says why (``EIO``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.EIO, reason)


@dataclass
class Channel:
    """One end of the socketpair between two generations: JSON messages, fds alongside."""

    sock: socket.socket

    def send(self, kind: str, fds: Sequence[int] = (), **fields: Any) -> None:
        wire.send_message(self.sock, json.dumps({"kind": kind, **fields}).encode(), fds)

    def recv(self, timeout: float | None = None) -> tuple[dict[str, Any], list[int]] | None:
        """The next message and its fds; ``None`` when the other side hung up.

        Raises :class:`SuccessorError` on a timeout or a message that cannot be
        used (its fds are closed first: nothing received is leaked).
        """
        if timeout is not None:
            # poll, not select: luod's fds go far beyond FD_SETSIZE.
            poller = select.poll()
            poller.register(self.sock, select.POLLIN)
            if not poller.poll(timeout * 1000):
                raise SuccessorError(f"no answer in {timeout:g} s")
        try:
            msg = wire.recv_message(self.sock, _BUFSIZE, MAX_FDS_PER_MESSAGE)
        except (ConnectionResetError, BrokenPipeError):
            return None
        if msg.length == 0 and not msg.fds:
            return None
        try:
            if msg.fds_truncated or msg.truncated:
                raise SuccessorError("a hand-over message was truncated (MSG_CTRUNC or MSG_TRUNC)")
            try:
                body = json.loads(msg.data)
            except ValueError:
                raise SuccessorError("a hand-over message is not JSON") from None
            if not isinstance(body, dict) or not isinstance(body.get("kind"), str):
                raise SuccessorError("a hand-over message has no kind")
        except SuccessorError:
            wire.close_fds(msg.fds)
            raise
        return body, msg.fds

    def close(self) -> None:
        self.sock.close()


@dataclass
class Successor:
    """The old generation's handle on its waiting successor."""

    proc: subprocess.Popen[bytes]
    channel: Channel
    #: The dry-run image names it already checked (nothing to ask again).
    checked: set[str] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @classmethod
    def start(
        cls, argv: Sequence[str], env: Mapping[str, str], config: Mapping[str, Any]
    ) -> Successor:
        """Start ``argv --successor-fd N``, send it ``config`` (luod's
        :meth:`~liveupdate.server.config.Config.to_fields`) and wait until it
        is ready (imported)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        command = [*argv, "--successor-fd", str(theirs.fileno())]
        try:
            proc = subprocess.Popen(
                command,
                cwd="/",
                env=dict(env),
                stdin=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
            )
        except OSError as exc:
            ours.close()
            raise SuccessorError(f"cannot start the next luod {argv[0]}: {exc}") from None
        finally:
            theirs.close()
        successor = cls(proc, Channel(ours))
        event("successor-started", successor=proc.pid, argv=" ".join(command))
        try:
            try:
                successor.channel.send("config", fields=dict(config))
            except OSError:
                pass  # it is gone already: what comes next says how it ended
            successor._expect("ready", READY_TIMEOUT)
        except SuccessorError:
            successor.stop()
            raise
        return successor

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check(self, image_name: str) -> None:
        """Have it read the dry-run image ``image_name`` (in the state directory)."""
        self.channel.send("check", image=image_name)
        self._expect("ready", READY_TIMEOUT)

    def hand_over(self, fds: Sequence[int], sent: Any = None, control: int = -1) -> None:
        """Send every fd (``fds[0]`` the listener, ``fds[1]`` the lock, then the
        files, in image order) and wait until it restored them all.

        ``control``: the control socket's listener, among ``fds`` after the
        lock (its number says which one it is; ``-1``: none).
        ``sent`` is called once every message is out (fault injection).
        """
        batches = [
            fds[i : i + MAX_FDS_PER_MESSAGE] for i in range(0, len(fds), MAX_FDS_PER_MESSAGE)
        ]
        try:
            for number, batch in enumerate(batches, start=1):
                self.channel.send(
                    "fds",
                    batch,
                    numbers=list(batch),
                    last=number == len(batches),
                    control=control,
                )
        except OSError as exc:
            raise SuccessorError(f"the hand-over to pid {self.pid} failed: {exc}") from None
        if sent is not None:
            sent()
        self._expect("restored", HANDOFF_TIMEOUT)

    def serve(self) -> bool:
        """Tell it to serve; ``True`` once it said it does."""
        try:
            self.channel.send("serve")
            self._expect("serving", SERVE_TIMEOUT)
        except OSError as exc:
            event(
                "successor-failed",
                logging.ERROR,
                successor=self.pid,
                reason=str(exc.strerror or exc),
            )
            return False
        return True

    def stop(self) -> None:
        """Make sure it is gone (and reaped): it must never take over after this.

        A successor that has not got every fd exits when the channel closes;
        one that did (or does not answer) gets ``SIGKILL``.
        """
        self.channel.close()
        try:
            self.proc.wait(1.0)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        event("successor-stopped", successor=self.pid, status=self.proc.returncode)

    def _expect(self, kind: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        try:
            received = self.channel.recv(max(0.0, deadline - time.monotonic()))
        except SuccessorError as exc:
            raise SuccessorError(f"the next luod (pid {self.pid}): {exc.strerror}") from None
        if received is None:
            try:
                status = self.proc.wait(5.0)
            except subprocess.TimeoutExpired:
                status = None
            raise SuccessorError(
                f"the next luod (pid {self.pid}) exited with status {status} "
                f"before it was {kind} (see its log)"
            )
        body, fds = received
        wire.close_fds(fds)
        if body["kind"] == "failed":
            raise SuccessorError(str(body.get("reason", "the next luod failed")))
        if body["kind"] != kind:
            raise SuccessorError(f"the next luod said {body['kind']!r}, not {kind!r}")
        return body


@dataclass
class Handed:
    """What the old generation handed over, as fds of this process."""

    listener_fd: int
    lock_fd: int
    #: The old generation's fd number of each file -> ours.
    files: dict[int, int]
    #: The control socket's listener (``-1``: none handed over).
    control_fd: int = -1

    def close(self) -> None:
        control = [self.control_fd] if self.control_fd >= 0 else []
        wire.close_fds([self.listener_fd, self.lock_fd, *control, *self.files.values()])


class Predecessor:
    """The successor's end of the channel: the generation it will replace."""

    def __init__(self, fd: int) -> None:
        os.set_inheritable(fd, False)
        self.channel = Channel(socket.socket(fileno=fd))

    def configuration(self) -> dict[str, Any] | None:
        """The configuration the old generation sent first (``None``: it is gone).

        Raises :class:`SuccessorError` on anything else.
        """
        received = self.channel.recv()
        if received is None:
            return None
        body, fds = received
        wire.close_fds(fds)
        fields = body.get("fields")
        if body["kind"] != "config" or not isinstance(fields, dict):
            raise SuccessorError(f"expected the configuration, got {body['kind']!r}")
        return fields

    def say(self, kind: str, **fields: Any) -> bool:
        """Send ``kind``; ``False`` when the old generation is gone."""
        try:
            self.channel.send(kind, **fields)
        except OSError:
            return False
        return True

    def next_request(self) -> str | Handed | None:
        """A dry-run image to check (its name), every fd handed over, or
        ``None``: the old generation hung up first (CANCEL, a crash before the
        last fd): whatever arrived is closed, nothing is ours."""
        numbers: list[int] = []
        fds: list[int] = []
        control = -1
        while True:
            try:
                received = self.channel.recv()
            except SuccessorError as exc:
                event("handoff-refused", logging.ERROR, reason=exc.strerror)
                self.say("failed", reason=f"the next luod: {exc.strerror}")
                received = None
            if received is None:
                if fds:
                    event("handoff-incomplete", logging.ERROR, received=len(fds))
                wire.close_fds(fds)
                return None
            body, got = received
            fds += got
            if body["kind"] == "check" and not fds:
                wire.close_fds(got)
                return str(body.get("image", ""))
            if body["kind"] != "fds" or len(body.get("numbers", ())) != len(got):
                wire.close_fds(fds)
                self.say("failed", reason=f"the next luod: unexpected {body['kind']!r} message")
                return None
            numbers += [int(n) for n in body["numbers"]]
            control = int(body.get("control", -1))
            if body.get("last"):
                break
        if len(fds) < 2:
            wire.close_fds(fds)
            self.say("failed", reason="the next luod: no listener and lock handed over")
            return None
        files = dict(zip(numbers[2:], fds[2:], strict=True))
        control_fd = files.pop(control, -1) if control >= 0 else -1
        return Handed(fds[0], fds[1], files, control_fd)

    def wait_serve(self) -> None:
        """Wait until told to serve, or until the old generation is gone: either
        way the files are this process's alone to keep from now on."""
        try:
            received = self.channel.recv()
        except SuccessorError:
            received = None
        if received is not None:
            wire.close_fds(received[1])
            if received[0]["kind"] != "serve":
                event("successor-unexpected", logging.WARNING, kind=received[0]["kind"])
        else:
            event("predecessor-gone", logging.WARNING, consequence="serving without its word")

    def close(self) -> None:
        self.channel.close()
