"""GET_STATE's status fields (issue 11, item 4's data): who serves, since
when, the last live update and its blackout, the crash copies and the fd
budget, what a crash recovery gave back; across a live update, a failed
REBOOT and a SIGKILL of luod; and the client's defaults when a luod's
struct is shorter than this library's."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import liveupdate
from liveupdate import uapi, wire
from liveupdate.client.device import Device
from liveupdate.client.transport import SocketTransport
from liveupdate.handover_abi import HandoverImage, SessionRecord
from liveupdate.handover_codec import (
    decode_image,
    encode_image,
    restamped_reboot_times,
    stamp_reboot_times,
)
from luodtest import Luod, copies_settled, luoctl, luoctl_reboot, memfd, preserved_session, state

pytestmark = pytest.mark.luod_only

#: The size of luod_get_state before the status fields were appended.
OLD_GET_STATE_SIZE = uapi.min_size(uapi.luod_get_state, "flags")


def _proc_nofile(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no Max open files line")


def test_get_state_says_who_serves_since_when_and_the_fd_budget(
    luod_factory: Callable[..., Luod],
) -> None:
    before = time.time()
    daemon = luod_factory()
    info = state(daemon)
    assert info.pid == daemon.pid
    assert before <= info.started <= time.time()
    # A cold start begins a line of generations, and no live update came before.
    assert info.cold_started == info.started
    assert (info.last_reboot, info.last_reboot_blackout, info.last_reboot_error) == (0.0, 0.0, 0)
    assert (info.recovered_sessions, info.recovered_files) == (0, 0)
    # The keeper is on by default: every preserved file costs two fds.
    assert (info.copies, info.copies_error, info.fds_per_file) == ("keeper", 0, 2)
    assert info.fd_limit == _proc_nofile(daemon.pid)
    assert info.fd_reserve == min(64, info.fd_limit // 4)
    # luod's own count, taken with this test's connection open: the same table.
    with daemon.open() as dev:
        counted = dev.get_state().fds_open
        listed = len(os.listdir(f"/proc/{daemon.pid}/fd"))
    assert abs(counted - listed) <= 1, (counted, listed)


def test_without_copies_a_file_costs_one_fd(luod_factory: Callable[..., Luod]) -> None:
    info = state(luod_factory("--keeper", "off"))
    assert (info.copies, info.copies_error, info.fds_per_file) == ("off", 0, 1)


@pytest.mark.parametrize("how", ["exec", "no-exec", "prepared"])
def test_a_live_update_keeps_the_cold_start_and_reports_its_blackout(
    luod_factory: Callable[..., Luod], how: str
) -> None:
    daemon = luod_factory()
    session = preserved_session(daemon, "kept", b"state")
    old = state(daemon)
    if how == "prepared":  # the image the pre-flight checked is stamped, not encoded again
        assert luoctl(daemon.socket, "prepare").returncode == 0
    luoctl_reboot(daemon, *(["--no-exec"] if how == "no-exec" else []))
    new = state(daemon)
    assert new.generation == old.generation + 1
    assert new.cold_started == old.cold_started
    assert new.started > old.started
    assert new.last_reboot == new.started
    # Frozen after the old generation started, and before the new one served.
    assert 0 < new.last_reboot_blackout <= new.started - old.started
    assert new.pid == daemon.pid
    assert (new.pid == old.pid) == (how == "no-exec")
    assert new.last_reboot_error == 0
    session.close()


def test_a_failed_reboot_is_reported_until_the_generation_ends(
    luod_factory: Callable[..., Luod],
) -> None:
    daemon = luod_factory()
    with daemon.open() as dev:
        waiting = dev.create_session("clash")
        waiting.update()  # handed over, waiting for its successor
        outgoing = dev.create_session("clash")  # its owner may make the name again
        with pytest.raises(liveupdate.AlreadyExistsError):
            dev.set_event(uapi.LuodEvent.REBOOT)
        info = dev.get_state()
    assert info.last_reboot_error == errno.EEXIST
    assert "clash" in info.last_error
    outgoing.close()
    with daemon.open() as dev:
        dev.retrieve_session("clash").close()
    luoctl_reboot(daemon)
    assert state(daemon).last_reboot_error == 0


def test_a_restart_after_a_crash_reports_what_the_copies_gave_back(
    luod_factory: Callable[..., Luod],
) -> None:
    daemon = luod_factory()
    with contextlib.ExitStack() as held:
        with daemon.open() as dev:
            for name, files in (("a", 2), ("b", 1)):
                session = held.enter_context(dev.create_session(name))
                for token in range(files):
                    fd = memfd(f"{name}{token}".encode())
                    session.preserve(fd, token)
                    os.close(fd)
            copies_settled(dev)
            first = dev.get_state()
        daemon.stop(signal.SIGKILL)
    daemon.log = daemon.state_dir / "restarted.log"
    daemon.start()
    info = state(daemon)
    assert (info.recovered_sessions, info.recovered_files) == (2, 3)
    assert info.incoming_sessions == 2
    # A crash is no live update: a new line of generations starts cold.
    assert info.cold_started == info.started > first.started
    assert (info.last_reboot, info.last_reboot_blackout) == (0.0, 0.0)
    assert info.pid == daemon.pid != first.pid


def test_an_older_shorter_get_state_gets_the_fields_it_knows(luod: Luod) -> None:
    with luod.open() as dev:
        full = dev.get_state()
        # The struct as it was before the status fields, then 8 bytes of the caller's own.
        buf = bytearray(OLD_GET_STATE_SIZE + 8)
        struct.pack_into("=I", buf, 0, OLD_GET_STATE_SIZE)
        buf[OLD_GET_STATE_SIZE:] = b"\xa5" * 8
        dev.ioctl(uapi.LUOD_IOCTL_GET_STATE, buf)
    padded = bytes(buf[:OLD_GET_STATE_SIZE]).ljust(uapi.GET_STATE.sizeof, b"\0")
    old = uapi.luod_get_state.from_buffer_copy(padded)
    assert (old.generation, old.max_sessions) == (full.generation, full.max_sessions)
    assert bytes(buf[OLD_GET_STATE_SIZE:]) == b"\xa5" * 8, "luod wrote past the caller's size"


@contextlib.contextmanager
def _older_luod(path: str) -> Iterator[threading.Thread]:
    """A peer that answers GET_STATE as a luod from before the status fields
    did: the struct up to ``flags`` only, whatever size was asked."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(path)
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.send(wire.encode_hello())
            request = wire.decode_request(conn.recv(wire.REQUEST_HEADER.size + 4096))
            reply = uapi.luod_get_state(size=OLD_GET_STATE_SIZE, state=0, generation=7)
            reply.pid = 4242  # set, but beyond what an older luod sends
            assert request.cmd == uapi.LUOD_IOCTL_GET_STATE
            conn.send(wire.encode_reply(0, bytes(reply)[:OLD_GET_STATE_SIZE]))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        thread.join(10)
        listener.close()


def test_a_luod_without_the_status_fields_leaves_the_defaults(tmp_path: Path) -> None:
    path = str(tmp_path / "older")
    with _older_luod(path):
        transport = SocketTransport()
        with Device(transport.open(path, 5), transport, path) as dev:
            info = dev.get_state()
    assert info.generation == 7
    assert (info.pid, info.copies, info.copies_error, info.fds_per_file) == (0, "off", 0, 0)
    assert (info.started, info.cold_started, info.last_reboot) == (0.0, 0.0, 0.0)
    assert info.last_reboot_blackout == 0.0
    assert (info.fd_limit, info.fds_open, info.fd_reserve) == (0, 0, 0)


def test_the_reboot_times_are_stamped_in_place_and_recognised() -> None:
    image = HandoverImage(4, [SessionRecord(b"s", 0, 0, 1, 1.0)], cold_started_ns=11)
    checked = encode_image(image)
    stamped = stamp_reboot_times(checked, 22, 33)
    assert stamped is not None and len(stamped) == len(checked)
    back = decode_image(stamped)
    assert (back.cold_started_ns, back.reboot_started_ns, back.frozen_ns) == (11, 22, 33)
    assert back == image  # the times are no part of what is handed over
    assert restamped_reboot_times(checked, stamped) == (22, 33)
    # Anything else changed: not the image that was checked.
    other = encode_image(HandoverImage(4, [SessionRecord(b"t", 0, 0, 1, 1.0)]))
    assert restamped_reboot_times(checked, other) is None
    flipped = bytearray(stamped)
    flipped[-1] ^= 1
    assert restamped_reboot_times(checked, bytes(flipped)) is None


def test_an_image_without_the_reboot_times_reads_as_unknown() -> None:
    old = Path(__file__).parent / "data" / "handover-v1-2026-11-30.dtb"
    image = decode_image(old.read_bytes())
    assert (image.cold_started_ns, image.reboot_started_ns, image.frozen_ns) == (0, 0, 0)
    assert stamp_reboot_times(old.read_bytes(), 1, 2) is None
