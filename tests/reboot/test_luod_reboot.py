"""Conformance section C against luod: the reboot is ``luoctl reboot``.

The bulk of section C lives in ``scenarios.py`` as stage functions, shared
with the kernel driver (``test_kernel_reboot.py``). Here one luod runs all of
them at once: stage 1 of every scenario, ``luoctl reboot``, stage 2 of
every scenario, another reboot, stage 3 of the scenarios that have one. The
run happens once per module in a fixture (once re-executing, once with
``--no-exec``); each scenario then has its own test comparing its
observations with the expectations stated in ``scenarios.py``.

The scenarios that only make sense for a daemon (C17 to C20: stale fds of
the old generation, connections during the reboot, injected freeze
failures, an unusable handover image) are tests of their own below.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import signal
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from scenarios import C1_NAME, SCENARIOS, Keep, Obs, Scenario, diff, rc, run_stage, stage_count

import liveupdate
from liveupdate import uapi, wire
from liveupdate.handover_abi import UnknownVersionError
from liveupdate.handover_codec import decode_image
from luodtest import LUOCTL, Luod, events, luoctl, luoctl_reboot

pytestmark = pytest.mark.luod_only

FAULT_ENV = "LUOD_FAULT_FILE"
IMAGE_NAME = "handover.dtb"

#: Scenarios that need exactly two generations, except the 2000 sessions of
#: C3: the handover set of the C19/C20 tests, whose stage 2 runs after the
#: fault was fixed.
HANDOVER_SET = [s for s in SCENARIOS.values() if len(s.stages) == 2 and s.id != "C3"]


# -- helpers ---------------------------------------------------------------------------


def reboot(daemon: Luod, no_exec: bool = False) -> tuple[int, int]:
    """``luoctl reboot``: must return 0 once the next generation serves, saying so."""
    return luoctl_reboot(daemon, *(["--no-exec"] if no_exec else []), wait=None)


#: Open errors while a generation ends and the next one starts: the old one
#: closed the connection (ENODEV), the next one is not serving yet (ETIMEDOUT:
#: no hello within the open's timeout), a failed restore (EIO), a busy device.
_IN_TRANSITION = {errno.ENODEV, errno.ETIMEDOUT, errno.EIO, errno.EBUSY, errno.ENOENT}


def wait_generation(socket: str, generation: int, timeout: float = 30.0) -> liveupdate.StateInfo:
    """Open the device until generation ``generation`` (or a later one) answers."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            with liveupdate.open_device(socket, timeout=2.0) as dev:
                info = dev.get_state()
            if info.generation >= generation:
                return info
        except liveupdate.LiveUpdateError as exc:
            if exc.errno not in _IN_TRANSITION:
                raise
            last = exc
        time.sleep(0.01)
    raise AssertionError(f"generation {generation} did not serve within {timeout} s ({last!r})")


def close_kept(keep: dict[str, Keep]) -> None:
    for sessions in keep.values():
        for session in sessions:
            session.close()
    keep.clear()


def stale_results(keep: dict[str, Keep]) -> list[int | str]:
    """GET_NAME on every held session of the previous generation (C17: ENODEV each)."""
    return [rc(session.get_name) for sessions in keep.values() for session in sessions]


def check(scenario: Scenario, observed: dict[str, Obs]) -> None:
    problems = diff(scenario.expected, observed.get(scenario.id, {}))
    assert not problems, f"{scenario.id} ({scenario.title}):\n  " + "\n  ".join(problems)


def raise_nofile() -> None:
    """C3 holds 2000 session fds in this process."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- the bulk run: every scenario, one luod, one reboot per stage ----------------------


@dataclass
class BulkRun:
    mode: str
    observed: dict[str, Obs] = field(default_factory=dict)
    generations: list[tuple[int, int]] = field(default_factory=list)
    stale: list[int | str] = field(default_factory=list)
    stage_seconds: list[float] = field(default_factory=list)
    reboot_seconds: list[float] = field(default_factory=list)
    daemon_alive: bool = False
    final_state: liveupdate.StateInfo | None = None


@pytest.fixture(scope="module", params=["exec", "no-exec"])
def bulk(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> BulkRun:
    """Stage 1 of every scenario, a reboot, stage 2 of every scenario, and so on."""
    raise_nofile()
    mode: str = request.param
    state = tmp_path_factory.mktemp(f"luod-bulk-{mode}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("NOTIFY_SOCKET", None)
    env.pop(FAULT_ENV, None)
    daemon = Luod(str(state / "device"), state, state / "luod.log", [], env)
    daemon.start()
    run = BulkRun(mode)
    keep: dict[str, Keep] = {}
    scenarios = list(SCENARIOS.values())
    try:
        for index in range(1, stage_count(scenarios) + 1):
            if index > 1:
                start = time.monotonic()
                run.generations.append(reboot(daemon, no_exec=mode == "no-exec"))
                run.reboot_seconds.append(time.monotonic() - start)
                run.stale += stale_results(keep)
                close_kept(keep)
            start = time.monotonic()
            run_stage(index, daemon.socket, scenarios, run.observed, keep)
            run.stage_seconds.append(time.monotonic() - start)
        close_kept(keep)
        run.final_state = wait_generation(daemon.socket, stage_count(scenarios))
        run.daemon_alive = daemon.alive()
    finally:
        close_kept(keep)
        daemon.stop()
    return run


@pytest.mark.parametrize("sid", list(SCENARIOS))
def test_scenario(bulk: BulkRun, sid: str) -> None:
    """The scenario's observations on luod are exactly its expectations."""
    check(SCENARIOS[sid], bulk.observed)


def test_bulk_generations(bulk: BulkRun) -> None:
    """luoctl reported each reboot, and every held fd of an old generation is dead (C17)."""
    assert bulk.generations == [(1, 2), (2, 3)]
    assert bulk.stale, "no session was held across a reboot"
    assert set(bulk.stale) == {"ENODEV"}, Counter(bulk.stale)
    assert bulk.daemon_alive
    assert bulk.final_state is not None
    # C16: what generation 2 never finished was released by the second reboot;
    # everything retrieved in generation 3 was finished and closed.
    assert bulk.final_state.incoming_sessions == 0
    assert bulk.final_state.outgoing_sessions == 0
    assert bulk.final_state.preserved_files == 0


# -- C17: fds of the old generation ----------------------------------------------------


def test_c17_old_generation_fds_fail_enodev(luod_factory: Callable[..., Luod]) -> None:
    daemon = luod_factory()
    observed: dict[str, Obs] = {}
    keep: dict[str, Keep] = {}
    c1 = SCENARIOS["C1"]
    run_stage(1, daemon.socket, [c1], observed, keep)
    (outgoing,) = keep["C1"]
    assert reboot(daemon) == (1, 2)

    memfd = os.memfd_create("c17")
    try:
        calls = {
            "get_name": outgoing.get_name,
            "preserve": lambda: outgoing.preserve(memfd, 0x17),
            "retrieve": lambda: outgoing.retrieve(0x1A),
            "finish": outgoing.finish,
        }
        assert {name: rc(call) for name, call in calls.items()} == dict.fromkeys(calls, "ENODEV")
    finally:
        os.close(memfd)
    with pytest.raises(liveupdate.StaleGenerationError):
        outgoing.get_name()
    outgoing.close()

    # The daemon keeps serving: the session is there, as incoming.
    with daemon.open() as dev:
        assert dev.get_state().generation == 2
        incoming = dev.retrieve_session(C1_NAME)
    assert incoming.get_name() == C1_NAME.encode()

    # A device fd dies too: reboot through a device we keep open.
    dev = daemon.open()
    try:
        assert dev.set_event(uapi.LuodEvent.REBOOT) == 2
        wait_generation(daemon.socket, 3)
        with pytest.raises(liveupdate.StaleGenerationError):
            dev.get_state()
        # ... and the incoming session of generation 2, retrieved, never finished.
        assert rc(incoming.get_name) == "ENODEV"
        assert rc(incoming.finish) == "ENODEV"
    finally:
        dev.close()
        incoming.close()
    with daemon.open() as dev:
        info = dev.get_state()
        assert (info.generation, info.incoming_sessions) == (3, 0)
        assert rc(lambda: dev.retrieve_session(C1_NAME).close()) == "ENOENT"
    assert daemon.alive()


def test_c17_request_after_accepted_reboot_is_not_served(luod_factory: Callable[..., Luod]) -> None:
    """Once REBOOT is accepted, the device fd belongs to the ending generation.

    The client library makes one call at a time, but nothing stops it from
    sending the next request right after the REBOOT reply, before luod ran
    the deferred reboot (under load the C17 test above hit exactly this). Two
    requests queued back to back (``wire.md`` allows it: one reply per
    message, in order) make the window certain: CREATE_SESSION behind REBOOT
    must not succeed, since the image is already written and a session
    created now can never reach the next generation.
    """
    daemon = luod_factory()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    received: list[int] = []
    try:
        sock.connect(daemon.socket)
        assert wire.decode_hello(sock.recv(64)) == 0
        event = uapi.luod_set_event(
            size=ctypes.sizeof(uapi.luod_set_event), event=uapi.LuodEvent.REBOOT
        )
        create = uapi.liveupdate_ioctl_create_session(
            size=ctypes.sizeof(uapi.liveupdate_ioctl_create_session), fd=-1
        )
        ctypes.memmove(create.name, b"c17-queued", len(b"c17-queued"))
        wire.send_message(sock, wire.encode_request(uapi.LUOD_IOCTL_SET_EVENT, bytes(event)))
        wire.send_message(
            sock, wire.encode_request(uapi.LIVEUPDATE_IOCTL_CREATE_SESSION, bytes(create))
        )
        first = wire.recv_message(sock, 4096)
        received += first.fds
        assert wire.decode_reply(first.data)[0] == 0  # the REBOOT was accepted
        try:
            second = wire.recv_message(sock, 4096)
        except ConnectionResetError:
            # Closed with the request unread: a reset, which the library
            # reports as ENODEV exactly like an EOF.
            second = wire.Message(b"", 0)
        received += second.fds
    finally:
        wire.close_fds(received)
        sock.close()
    wait_generation(daemon.socket, 2)
    with daemon.open() as dev:
        lost = rc(lambda: dev.retrieve_session("c17-queued").close())
    # Expected: EOF (ENODEV for the library) or an error, never a session the
    # next generation does not know.
    answered = second.length > 0 and wire.decode_reply(second.data)[0] == 0
    assert not answered, f"CREATE_SESSION after REBOOT succeeded; next generation: {lost}"


# -- C18: connecting in a loop during the reboot ---------------------------------------


@pytest.mark.parametrize("mode", ["exec", "no-exec"])
def test_c18_no_connection_refused_during_reboot(
    luod_factory: Callable[..., Luod], mode: str
) -> None:
    daemon = luod_factory()
    observed: dict[str, Obs] = {}
    keep: dict[str, Keep] = {}
    handed_over = [SCENARIOS[i] for i in ("C1", "C4", "C5")]  # some real work to hand over
    run_stage(1, daemon.socket, handed_over, observed, keep)

    outcomes: Counter[str] = Counter()
    window = {"start": 0.0, "end": 0.0}
    during = Counter[str]()
    stop = threading.Event()

    def connect_loop() -> None:
        while not stop.is_set():
            began = time.monotonic()
            try:
                liveupdate.open_device(daemon.socket, timeout=0).close()
                outcome = "ok"
            except OSError as exc:
                outcome = errno.errorcode.get(exc.errno or 0, repr(exc))
            outcomes[outcome] += 1
            if window["start"] <= began and (not window["end"] or began <= window["end"]):
                during[outcome] += 1
            time.sleep(0.001)

    thread = threading.Thread(target=connect_loop, daemon=True)
    thread.start()
    try:
        time.sleep(0.05)
        window["start"] = time.monotonic()
        reboot(daemon, no_exec=mode == "no-exec")
        window["end"] = time.monotonic()
        time.sleep(0.05)
    finally:
        stop.set()
        thread.join(10)
    close_kept(keep)
    assert not thread.is_alive()
    assert outcomes["ECONNREFUSED"] == 0, outcomes
    assert set(outcomes) <= {"ok", "EBUSY"}, outcomes
    assert during["ok"] > 0 and sum(during.values()) >= 5, during
    run_stage(2, daemon.socket, handed_over, observed, keep)
    for scenario in handed_over:
        check(scenario, observed)


# -- C19: a freeze that fails ----------------------------------------------------------

C19_NAME = "c19-freeze-fails"
C19_TOKEN = 0x1234
C19_LATE_TOKEN = 0x5678


@pytest.mark.parametrize("err", ["EIO", "ENOLCK"])
def test_c19_freeze_failure_keeps_old_generation(
    luod_factory: Callable[..., Luod], tmp_path: Path, err: str
) -> None:
    faults = tmp_path / "faults"
    faults.write_text("")
    daemon = luod_factory(env={FAULT_ENV: str(faults)})
    observed: dict[str, Obs] = {}
    keep: dict[str, Keep] = {}
    run_stage(1, daemon.socket, HANDOVER_SET, observed, keep)
    with daemon.open() as dev:
        session = dev.create_session(C19_NAME)  # created last: frozen last
    memfd = os.memfd_create(C19_NAME)
    os.write(memfd, b"c19 before")
    session.preserve(memfd, C19_TOKEN)
    os.close(memfd)

    faults.write_text(f"freeze-fail {err} {C19_TOKEN:#x}\n")
    failed = luoctl(daemon.socket, "reboot")
    assert failed.returncode != 0
    assert f"({err})" in failed.stderr, failed.stderr
    assert f"injected freeze failure of token {C19_TOKEN:#x}" in failed.stderr, failed.stderr

    # The old generation is intact: same generation, every held fd still works.
    with daemon.open() as dev:
        info = dev.get_state()
    assert (info.generation, info.state) == (1, uapi.LuodState.NORMAL)
    assert not (daemon.state_dir / IMAGE_NAME).exists()
    held = [s for sessions in keep.values() for s in sessions]
    assert all(rc(s.get_name) == 0 for s in [*held, session])
    late = os.memfd_create("c19-late")
    os.write(late, b"c19 after the failed reboot")
    assert rc(lambda: session.preserve(late, C19_LATE_TOKEN)) == 0
    os.close(late)

    # Fixed: the retry succeeds and hands everything over.
    faults.write_text("")
    assert reboot(daemon) == (1, 2)
    close_kept(keep)
    session.close()
    run_stage(2, daemon.socket, HANDOVER_SET, observed, keep)
    for scenario in HANDOVER_SET:
        check(scenario, observed)
    with daemon.open() as dev, dev.retrieve_session(C19_NAME) as incoming:
        contents = []
        for token in (C19_TOKEN, C19_LATE_TOKEN):
            fd = incoming.retrieve(token)
            contents.append(os.pread(fd, 100, 0))
            os.close(fd)
        incoming.finish()
    assert contents == [b"c19 before", b"c19 after the failed reboot"]


# -- C20: an unusable handover image ---------------------------------------------------


def _fdt_set_u32(blob: bytes, prop: str, value: int) -> bytes:
    """``blob`` with the u32 property ``prop`` (anywhere in the tree) set to ``value``.

    A minimal walk of the FDT structure block (devicetree spec, chapter 5):
    the image's own writer refuses any version but its own, so an image of
    "another version" is made by patching the bytes in place.
    """
    header = struct.unpack_from(">10I", blob)
    off_struct, off_strings = header[2], header[3]
    size_struct = header[9]
    out = bytearray(blob)
    pos, end = off_struct, off_struct + size_struct
    while pos < end:
        (token,) = struct.unpack_from(">I", blob, pos)
        pos += 4
        if token == 1:  # FDT_BEGIN_NODE: NUL-terminated name, padded to 4
            pos = (blob.index(b"\0", pos) + 4) & ~3
        elif token == 3:  # FDT_PROP: len, nameoff, value padded to 4
            length, nameoff = struct.unpack_from(">II", blob, pos)
            name_end = blob.index(b"\0", off_strings + nameoff)
            if blob[off_strings + nameoff : name_end] == prop.encode() and length == 4:
                struct.pack_into(">I", out, pos + 8, value)
                return bytes(out)
            pos = (pos + 8 + length + 3) & ~3
        elif token == 9:  # FDT_END
            break
    raise ValueError(f"no u32 property {prop!r} in the image")


def _version_99(original: bytes) -> bytes:
    patched = _fdt_set_u32(original, "luo,version", 99)
    with pytest.raises(UnknownVersionError) as info:
        decode_image(patched)
    assert info.value.found == 99
    return patched


BROKEN_IMAGES: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    # variant: (how the image is damaged, what the reason of luod's
    # restore-failed event must name)
    "garbage": (lambda _b: b"this is no flattened device tree\n" * 8, ""),
    "truncated": (lambda b: b[: len(b) // 2], ""),
    "version-99": (_version_99, "version 99"),
}


def _proc_state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2]


def _wait_stopped(daemon: Luod, luoctl_proc: subprocess.Popen[str], timeout: float = 30.0) -> None:
    """Wait until luod stops itself at ``stop-at before-exec`` (state ``T``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert daemon.alive(), daemon.log_text()
        if _proc_state(daemon.pid) == "T":
            return
        if luoctl_proc.poll() is not None:
            out, err = luoctl_proc.communicate()
            raise AssertionError(
                f"luoctl reboot exited {luoctl_proc.returncode} before luod stopped:\n"
                f"{out}{err}\nluod log:\n{daemon.log_text()}"
            )
        time.sleep(0.01)
    raise AssertionError(f"luod never stopped at before-exec:\n{daemon.log_text()}")


def _memfds_held(pid: int) -> int:
    count = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}").startswith("/memfd:"):
                count += 1
        except OSError:
            pass
    return count


@pytest.fixture
def stopped_reboot() -> Iterator[list[subprocess.Popen[str]]]:
    """Background ``luoctl reboot`` processes, reaped at teardown."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


@pytest.mark.parametrize("variant", list(BROKEN_IMAGES))
def test_c20_unusable_image_keeps_everything(
    luod_factory: Callable[..., Luod],
    tmp_path: Path,
    variant: str,
    stopped_reboot: list[subprocess.Popen[str]],
) -> None:
    damage, reason_names = BROKEN_IMAGES[variant]
    faults = tmp_path / "faults"
    # Stopped with the image written, before the successor reads it.
    faults.write_text("stop-at before-handoff\n")
    daemon = luod_factory(env={FAULT_ENV: str(faults)})
    observed: dict[str, Obs] = {}
    keep: dict[str, Keep] = {}
    run_stage(1, daemon.socket, HANDOVER_SET, observed, keep)

    proc = subprocess.Popen(
        [*LUOCTL, "--socket", daemon.socket, "reboot"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    stopped_reboot.append(proc)
    image_path = daemon.state_dir / IMAGE_NAME
    try:
        _wait_stopped(daemon, proc)
        original = image_path.read_bytes()
        nfiles = sum(len(s.files) for s in decode_image(original).sessions)
        image_path.write_bytes(damage(original))
        faults.write_text("")
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0, err
    assert "(EIO)" in err, err

    # The successor could not restore: the reboot rolled back, the old
    # generation serves on and nothing preserved was let go.
    assert daemon.alive()
    with liveupdate.open_device(daemon.socket, timeout=5.0) as dev:
        info = dev.get_state()
    assert info.generation == 1
    assert info.preserved_files == nfiles
    assert "could not restore" in info.last_error
    assert _memfds_held(daemon.pid) >= nfiles
    failed = events(daemon, "restore-failed")
    assert failed and all(reason_names in e["reason"] for e in failed), daemon.log_text()
    assert not image_path.exists()

    # The retry writes a fresh image and hands everything over.
    reboot(daemon)
    info = wait_generation(daemon.socket, 2)
    assert info.preserved_files == nfiles
    close_kept(keep)  # the old generation's session fds are dead now
    run_stage(2, daemon.socket, HANDOVER_SET, observed, keep)
    close_kept(keep)
    for scenario in HANDOVER_SET:
        check(scenario, observed)
