"""The ``kvcache`` command: ``serve``, ``upgrade``, ``handoff`` (see :mod:`liveupdate.kvcache`)."""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import liveupdate
from liveupdate.kvcache import savefile
from liveupdate.kvcache.arena import Arena, FaultHook
from liveupdate.kvcache.participant import participant_name
from liveupdate.kvcache.protocol import Protocol
from liveupdate.kvcache.server import (
    ARENA,
    CONN_STATE,
    FIRST_CONNECTION,
    FREEZE,
    HANDOFF,
    LISTENER,
    Server,
    read_conn_state,
)
from liveupdate.version import __version__

__all__ = ["FAULT_ENV", "KillInSet", "fault_from_env", "main"]

#: ``kill-in-set:N[:STAGE]``: SIGKILL this process inside its Nth ``set``
#: (STAGE ``value``, the default: half the value written; ``link``: the new
#: item linked, the old one not yet unlinked). For crash-consistency tests.
FAULT_ENV = "KVCACHE_FAULT"
#: What ``version`` answers: memcached's version (clients parse it), then ours.
PROTOCOL_VERSION = f"1.6.18-kvcache-{__version__}"
_LISTEN_FD = 3
#: Seconds ``--session`` waits for a device another process has open (a kernel's is exclusive).
_DEVICE_BUSY_WAIT = 10.0


class KillInSet:
    """A fault hook: SIGKILL the process at ``stage`` of its ``n``-th store."""

    def __init__(self, n: int, stage: str = "value") -> None:
        self.n = n
        self.stage = stage
        self.count = 0

    def __call__(self, stage: str) -> None:
        if stage == "value":
            self.count += 1
        if self.count == self.n and stage == self.stage:
            os.kill(os.getpid(), signal.SIGKILL)


def fault_from_env(text: str | None) -> FaultHook | None:
    """The hook ``KVCACHE_FAULT`` asks for (None when unset)."""
    if not text:
        return None
    kind, _, rest = text.partition(":")
    n, _, stage = rest.partition(":")
    if kind != "kill-in-set" or not n.isdigit() or stage not in ("", "value", "link"):
        raise ValueError(f"{FAULT_ENV}={text!r}: expected kill-in-set:N[:value|link]")
    return KillInSet(int(n), stage or "value")


def _say(message: str) -> None:
    print(f"kvcache[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


def make_listener(listen: str) -> socket.socket:
    """A listening socket: TCP on ``HOST:PORT`` (``[::1]:PORT`` for IPv6; port 0: any),
    or Unix on ``unix:PATH`` (memcached's ``-s``; a kernel without TCP/IP, as in the
    LUO test VM, has only these). A stale socket left at PATH is replaced."""
    if listen.startswith("unix:"):
        path = listen[len("unix:") :]
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # a dead server's socket; anything else makes bind fail
        except FileNotFoundError:
            pass
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            unix.bind(path)
            unix.listen(1024)
        except BaseException:
            unix.close()
            raise
        return unix
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--listen {listen!r}: expected HOST:PORT")
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, int(port)), family=family, backlog=1024)


def bound_address(listener: socket.socket) -> int | str:
    """What the ready file says: the TCP port, or a Unix listener's path."""
    name = listener.getsockname()
    return name if isinstance(name, str) else int(name[1])


def write_ready(path: str | None, port: int | str) -> None:
    """Write the bound port (or Unix path) to ``path`` atomically (a temporary file renamed)."""
    if path:
        with open(path + ".tmp", "w") as f:
            f.write(str(port))
        os.replace(path + ".tmp", path)


def _participant(args: argparse.Namespace, session: str | None) -> str | None:
    """The participant to register: ``--participant NAME``, else ``kvcache:SESSION``
    with a session (none standalone, none with ``--no-participant``)."""
    if args.no_participant:
        return None
    if args.participant:
        return str(args.participant)
    return None if session is None else participant_name(session)


def _protocol(arena: Arena, server_stats: Callable[[], list[tuple[str, int]]]) -> Protocol:
    return Protocol(arena, PROTOCOL_VERSION, server_stats)


def serve_session(args: argparse.Namespace, svc: liveupdate.InheritedSession) -> int:
    """Serve under ``luoctl run``: arena, listener and connections live in the session."""
    fault = fault_from_env(os.environ.get(FAULT_ENV))
    # Pre-started: reports ready, waits for the hand-over; the files are
    # preserved again from the loop, after the first requests are answered.
    fds = svc.restore(defer=True)
    arena_fd = fds.pop(ARENA, None)
    if arena_fd is None:
        arena_fd = Arena.create(args.memory << 20, args.max_item_size)
        svc.preserve(arena_fd, ARENA)
    arena = Arena(arena_fd, fault)
    listener_fd = fds.pop(LISTENER, None)
    if listener_fd is None:
        listener = make_listener(args.listen)
        svc.preserve(listener, LISTENER)
    else:
        listener = socket.socket(fileno=listener_fd)
    state_fd = fds.pop(CONN_STATE, None)
    if state_fd is None:
        state_fd = os.memfd_create("kvcache-connections", os.MFD_CLOEXEC)
        svc.preserve(state_fd, CONN_STATE)
    pending = read_conn_state(state_fd)
    server = Server(arena, listener, _protocol, svc, state_fd)
    name = _participant(args, svc.name)
    if name is not None:
        server.take_part(name, None)  # luoctl run gives luod's device in the environment
    for token, fd in sorted(fds.items()):
        if token < FIRST_CONNECTION:
            os.close(fd)  # not ours (a newer version's token?): leave it
            continue
        server.adopt(socket.socket(fileno=fd), token, *pending.get(token, (b"", b"")))
    server.install_signals()
    port = bound_address(listener)
    write_ready(args.ready_file, port)
    _say(
        f"{svc.state}: port {port}, {arena.curr_items} items, {len(server.conns)} connections"
        + (", arena rebuilt after a crash" if arena.recovered else "")
    )
    reason = server.run()
    svc.preserve_pending()  # however it stops, every file is in the session
    server.hand_over()
    if reason == FREEZE:
        svc.frozen()  # the successor goes now: the unmap below is not in its way
    arena.close(clean=True)
    _say(f"{reason}: handed over")
    return 0


def _take_session(device: str | None, name: str) -> tuple[liveupdate.Session, dict[int, int]]:
    """Create the outgoing session ``name``, then take the incoming one's arena and listener.

    The outgoing one first: when another process still holds it (``EEXIST``),
    nothing has been retrieved yet, so the incoming session is left intact.
    The incoming one is finished at once (so its files may be preserved
    again); what it held besides the arena and the listener (connections of a
    ``luoctl run`` predecessor) is discarded by the FINISH. The device is
    closed again before serving: a kernel lets one process at a time open it.
    """
    fds: dict[int, int] = {}
    with liveupdate.open_device(device, timeout=_DEVICE_BUSY_WAIT) as dev:
        outgoing = dev.create_session(name)
        try:
            try:
                incoming = dev.retrieve_session(name)
            except liveupdate.NotFoundError:
                return outgoing, fds  # a first start, or a cold boot
            with incoming:
                for token in (ARENA, LISTENER):
                    try:
                        fds[token] = incoming.retrieve(token)
                    except liveupdate.NotFoundError:
                        pass
                incoming.finish()
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            outgoing.close()
            raise
    return outgoing, fds


def serve_direct(args: argparse.Namespace) -> int:
    """Serve on an LUO device itself (``--session NAME``): no ``luoctl run`` needed.

    The arena is taken from the incoming session NAME when there is one
    (after a kexec, or a reboot or restart of luod), else created; it is kept
    in the outgoing session NAME, whose fd this process holds open: the
    orchestrator carries it as long as this process lives (across a kexec, a
    luod reboot). The listener is kept too where the orchestrator can keep
    sockets (luod); a kernel keeps memfds only (``ENOENT``), so each start
    binds a new one. Client connections are not kept (that takes ``luoctl
    run``). On luod the session is keep-on-close: a stop or a crash hands it
    over, and the next start is warm. SIGUSR1 freezes the server for a kexec:
    it stops serving, leaves the arena clean and keeps holding the session
    until the kexec (or SIGTERM) ends it.
    """
    fault = fault_from_env(os.environ.get(FAULT_ENV))
    session, fds = _take_session(args.device, args.session)
    try:
        arena_fd = fds.pop(ARENA, None)
        if arena_fd is None:
            arena_fd = Arena.create(args.memory << 20, args.max_item_size)
        try:
            session.preserve(arena_fd, ARENA)
            arena = Arena(arena_fd, fault)
        finally:
            os.close(arena_fd)  # the session and the mapping hold it
        listener_fd = fds.pop(LISTENER, None)
        if listener_fd is None:
            listener = make_listener(args.listen)
        else:
            listener = socket.socket(fileno=listener_fd)
        try:
            session.preserve(listener, LISTENER)
            kept = "arena and listener"
        except liveupdate.NotFoundError:  # a kernel: no handler for sockets
            kept = "arena"
        try:
            session.keep_on_close()
        except (liveupdate.InvalidArgumentError, liveupdate.NotSupportedError):
            pass  # a kernel: the session ends with this process (or goes through a kexec)
        server = Server(arena, listener, _protocol)
        name = _participant(args, args.session)
        if name is not None:
            server.take_part(name, args.device)
        server.install_signals()

        def freeze(_sig: int, _frame: object) -> None:
            if server.stop_reason is None:
                server.stop_reason = FREEZE

        signal.signal(signal.SIGUSR1, freeze)
        write_ready(args.ready_file, bound_address(listener))
        _say(
            f"session {args.session} on {args.device or 'the default device'}: "
            f"port {bound_address(listener)}, {arena.curr_items} items, {kept} kept"
            + (", arena rebuilt after a crash" if arena.recovered else "")
        )
        reason = server.run()
        server.hand_over()  # the arena is clean from here on
        server.close()
        arena.close(clean=True)
        signal.set_wakeup_fd(-1)
        if reason == FREEZE:
            if args.ready_file:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(args.ready_file)  # not serving any more
            _say(f"frozen: holding session {args.session} until the kexec (SIGTERM ends it)")
            stops = {signal.SIGTERM, signal.SIGINT}
            signal.pthread_sigmask(signal.SIG_BLOCK, stops)
            signal.sigwait(stops)
        _say(f"{reason}: session {args.session} closed")
        return 0
    finally:
        session.close()


def serve_standalone(args: argparse.Namespace) -> int:
    """Serve without a session: items from and to ``--save-file``, listener maybe inherited."""
    fault = fault_from_env(os.environ.get(FAULT_ENV))
    arena_fd = Arena.create(args.memory << 20, args.max_item_size)
    arena = Arena(arena_fd, fault)
    os.close(arena_fd)  # the mapping keeps the memory
    if args.save_file and os.path.exists(args.save_file):
        loaded = savefile.load(arena, args.save_file, int(time.time()))
        _say(f"loaded {loaded} items from {args.save_file}")
    if args.inherit_listener:
        if os.environ.get("LISTEN_FDS") != "1":
            raise ValueError("--inherit-listener: LISTEN_FDS=1 (the listener as fd 3) expected")
        listener = socket.socket(fileno=_LISTEN_FD)
        listener.set_inheritable(False)
        for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)
    else:
        listener = make_listener(args.listen)
    server = Server(arena, listener, _protocol)
    participant = _participant(args, None)
    if participant is not None:
        server.take_part(participant, None)
    server.install_signals()
    write_ready(args.ready_file, bound_address(listener))
    _say(f"standalone: port {bound_address(listener)}, {arena.curr_items} items")
    reason = server.run()
    if args.ready_file and reason == HANDOFF:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(args.ready_file)  # the successor writes it once it serves
    if args.save_file:
        saved = savefile.save(arena, args.save_file, int(time.time()))
        _say(f"saved {saved} items to {args.save_file}")
    if reason == HANDOFF:
        pid = _spawn_successor(listener, args.argv)
        _say(f"handed the listener off to pid {pid}")
    server.close()
    arena.close()
    return 0


def _spawn_successor(listener: socket.socket, args: list[str]) -> int:
    """Start ``kvcache serve`` again (same options) with the listener as fd 3."""
    argv = [sys.executable, "-m", "liveupdate.kvcache", *args]
    if "--inherit-listener" not in argv:
        argv.append("--inherit-listener")
    env = {**os.environ, "LISTEN_FDS": "1"}
    return os.posix_spawn(
        sys.executable,
        argv,
        env,
        file_actions=[(os.POSIX_SPAWN_DUP2, listener.fileno(), _LISTEN_FD)],
    )


def handoff(pid: int, ready_file: str | None, timeout: float) -> int:
    """SIGUSR2 to ``pid``, then wait for it to exit and (if given) the ready file."""
    pidfd = os.pidfd_open(pid)
    try:
        os.kill(pid, signal.SIGUSR2)
        if not select.select([pidfd], [], [], timeout)[0]:
            print(f"kvcache handoff: pid {pid} still running after {timeout} s", file=sys.stderr)
            return 1
    finally:
        os.close(pidfd)
    deadline = time.monotonic() + timeout
    while ready_file and not os.path.exists(ready_file):
        if time.monotonic() > deadline:
            print(f"kvcache handoff: no successor wrote {ready_file}", file=sys.stderr)
            return 1
        time.sleep(0.005)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvcache", description="A memcached-compatible cache that survives its updates."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the memcached text protocol")
    serve.add_argument("--listen", default="127.0.0.1:11211", help="HOST:PORT (port 0: any)")
    serve.add_argument("--memory", type=int, default=64, help="MiB of item memory (default 64)")
    serve.add_argument(
        "--max-item-size", type=int, default=0, help="largest value in bytes (default: a page)"
    )
    serve.add_argument("--save-file", help="standalone: save items here at a stop, load at start")
    serve.add_argument("--ready-file", help="write the bound port here once serving")
    serve.add_argument(
        "--inherit-listener", action="store_true", help="standalone: listener from LISTEN_FDS"
    )
    serve.add_argument(
        "--session", help="without luoctl run: keep the arena in this session of the device"
    )
    serve.add_argument(
        "--device", help="with --session: /dev/liveupdate or luod's socket (default: as luoctl)"
    )
    part = serve.add_mutually_exclusive_group()
    part.add_argument(
        "--participant",
        metavar="NAME",
        help="take part in luod's live updates as NAME: hold writes from its FREEZE to its end "
        "(default with a session: kvcache:SESSION)",
    )
    part.add_argument(
        "--no-participant",
        action="store_true",
        help="with a session: take no part in luod's live updates",
    )
    upgrade = commands.add_parser("upgrade", help="luoctl update NAME")
    upgrade.add_argument("name", help="the session name given to luoctl run")
    upgrade.add_argument("--socket", help="luod's socket (luoctl's default otherwise)")
    hand = commands.add_parser("handoff", help="listener hand-off of a standalone kvcache")
    hand.add_argument("--pid", type=int, required=True, help="the running kvcache serve")
    hand.add_argument("--ready-file", help="wait for the successor to write it")
    hand.add_argument("--timeout", type=float, default=60.0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.command == "upgrade":
        luoctl = [sys.executable, "-m", "liveupdate.cli.luoctl"]
        if args.socket:
            luoctl += ["--socket", args.socket]
        return subprocess.run([*luoctl, "update", args.name], check=False).returncode
    if args.command == "handoff":
        return handoff(args.pid, args.ready_file, args.timeout)
    try:
        svc = liveupdate.inherited_session()
        if args.session is not None:
            if svc is not None:
                raise ValueError("--session: not under luoctl run, which gives the session")
            return serve_direct(args)
        if args.device is not None:
            raise ValueError("--device goes with --session")
        if svc is not None:
            return serve_session(args, svc)
        return serve_standalone(args)
    except (ValueError, OSError) as exc:
        print(f"kvcache: {exc}", file=sys.stderr)
        return 1
