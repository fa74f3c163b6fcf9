"""Per-uid quotas and luod's fd reserve (issue 8, finding 5).

One uid used to take every session, or fill luod's fd table through a few
sessions, after which nobody could create a session, new opens hung without
a hello and a reboot failed with EMFILE. Now:

- per uid, luod holds at most ``--max-sessions-per-uid`` sessions (ENOMEM),
  ``--max-files-per-uid`` files (ENOSPC) and ``--max-memfd-bytes-per-uid``
  bytes of memfd (ENOSPC), counting outgoing and unfinished incoming ones;
  uid 0 and luod's own uid are exempt;
- the last ``--fd-reserve`` fds of luod's table are kept for its own work:
  CREATE_SESSION and PRESERVE_FD that would use them fail with EMFILE, so a
  reboot stays possible;
- an open of the device is answered (EMFILE in the hello) even when the
  table is full.

Quota scenarios run two real uids (``setpriv``) against luod as root; the fd
table scenarios lower luod's ``RLIMIT_NOFILE`` with ``prlimit`` to stay fast.
"""

from __future__ import annotations

import errno
import os
import resource
from collections.abc import Callable

import pytest
from test_owner_policy import (  # noqa: F401 - the fixtures agent, lib and start_luod
    UidAgent,
    agent_fixture,
    lib_fixture,
    start_luod_fixture,
)

import liveupdate
from liveupdate import uapi
from luodtest import Luod, luoctl
from test_owner_checks import UID_A, UID_B

pytestmark = [
    pytest.mark.luod_only,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for other uids and prlimit"),
]

Agents = Callable[..., UidAgent]


def refused(answer: dict[str, object], errno_name: str) -> None:
    assert not answer["ok"], f"allowed: {answer}"
    assert answer["errno"] == errno_name, answer


def root_session(daemon: Luod, name: str) -> liveupdate.Session:
    with daemon.open(timeout=10.0) as dev:
        return dev.create_session(name)


# -- per-uid quotas -------------------------------------------------------------------------


def test_a_uid_at_its_session_quota_does_not_starve_another(
    start_luod: Callable[..., Luod], agent: Agents
) -> None:
    daemon = start_luod("--max-sessions-per-uid", "3")
    a, b = agent(daemon, UID_A), agent(daemon, UID_B)
    for i in range(3):
        a.ok("create", name=f"a{i}")
    refused(a.call("create", name="a3"), "ENOMEM")
    for i in range(3):
        b.ok("create", name=f"b{i}")  # A's use is not B's
    refused(b.call("create", name="b3"), "ENOMEM")
    # Root is exempt.
    held = [root_session(daemon, f"root{i}") for i in range(5)]
    for session in held:
        session.close()
    # A closes one: its room is back.
    a.ok("close", name="a0")
    a.ok("create", name="a3")


def test_handed_over_sessions_still_count_against_the_quota(
    start_luod: Callable[..., Luod], agent: Agents
) -> None:
    """UPDATE moves a session to incoming; luod still holds it for its owner."""
    daemon = start_luod("--max-sessions-per-uid", "2")
    a, b = agent(daemon, UID_A), agent(daemon, UID_B)
    for name in ("a0", "a1"):
        a.ok("create", name=name, data="x", token=1)
        a.ok("update", name=name)
    refused(a.call("create", name="a2"), "ENOMEM")
    b.ok("create", name="b0")
    # Finishing its own incoming sessions gives the room back.
    a.ok("event", event="finish")
    a.ok("create", name="a2")


def test_a_uid_at_its_file_quota_does_not_starve_another(
    start_luod: Callable[..., Luod], agent: Agents
) -> None:
    daemon = start_luod("--max-files-per-uid", "4")
    a, b = agent(daemon, UID_A), agent(daemon, UID_B)
    a.ok("create", name="a-one")
    a.ok("create", name="a-two")
    for token in range(3):
        a.ok("preserve", name="a-one", token=token)
    a.ok("preserve", name="a-two", token=0)  # the quota spans the uid's sessions
    refused(a.call("preserve", name="a-two", token=1), "ENOSPC")
    b.ok("create", name="b-one")
    for token in range(4):
        b.ok("preserve", name="b-one", token=token)
    a.ok("unpreserve", name="a-one", token=0)
    a.ok("preserve", name="a-two", token=1)


def test_a_uid_at_its_memfd_bytes_quota_does_not_starve_another(
    start_luod: Callable[..., Luod], agent: Agents
) -> None:
    mib = 1 << 20
    daemon = start_luod("--max-memfd-bytes-per-uid", str(mib))
    a, b = agent(daemon, UID_A), agent(daemon, UID_B)
    a.ok("create", name="a")
    a.ok("preserve", name="a", token=1, size=600_000)
    refused(a.call("preserve", name="a", token=2, size=600_000), "ENOSPC")
    a.ok("preserve", name="a", token=2, size=mib - 600_000)  # exactly the quota
    refused(a.call("preserve", name="a", token=3, size=1), "ENOSPC")
    a.ok("preserve", name="a", token=3, size=0)  # an empty memfd costs nothing
    b.ok("create", name="b")
    b.ok("preserve", name="b", token=1, size=mib)
    with daemon.open(timeout=10.0) as dev:
        (entry,) = dev.list_sessions("a").sessions
    assert sorted(f.token for f in entry.files or ()) == [1, 2, 3]


# -- the fd reserve -------------------------------------------------------------------------

#: luod's RLIMIT_NOFILE in these scenarios: small, so filling it is quick.
NOFILE = 160


def limit_fds(daemon: Luod, nofile: int = NOFILE) -> None:
    """Lower the running luod's RLIMIT_NOFILE (soft and hard); a re-exec keeps it."""
    resource.prlimit(daemon.pid, resource.RLIMIT_NOFILE, (nofile, nofile))


def new_memfd(number: int) -> int:
    """A memfd holding its ``number`` as text."""
    fd = os.memfd_create("fill")
    os.write(fd, b"%d" % number)
    return fd


def fill(session: liveupdate.Session) -> tuple[int, OSError]:
    """Preserve new memfds until luod refuses; how many it took, and the refusal."""
    for token in range(NOFILE + 1):
        fd = new_memfd(token)
        try:
            session.preserve(fd, token)
        except liveupdate.LiveUpdateError as exc:
            return token, exc
        finally:
            os.close(fd)
    raise AssertionError(f"luod took {NOFILE + 1} files with RLIMIT_NOFILE {NOFILE}")


def test_a_near_full_fd_table_still_answers_opens_and_still_reboots(
    luod_factory: Callable[..., Luod],
) -> None:
    daemon = luod_factory("--fd-reserve", "32")
    limit_fds(daemon)
    session = root_session(daemon, "filler")  # root: no quota, only the reserve
    held, refusal = fill(session)
    assert isinstance(refusal, liveupdate.OutOfResourcesError), refusal
    assert refusal.errno == errno.EMFILE
    assert NOFILE - 32 - 16 < held < NOFILE - 32, held
    # Creating a session is refused the same way; nothing was lost meanwhile.
    with daemon.open(timeout=10.0) as dev:
        with pytest.raises(liveupdate.OutOfResourcesError):
            dev.create_session("one-too-many")
        info = dev.get_state()
    assert info.preserved_files == held

    result = luoctl(daemon.socket, "reboot", "--wait", "30")
    assert result.returncode == 0, (result.stdout, result.stderr, daemon.log_text()[-3000:])
    session.close()
    with daemon.open(timeout=10.0) as dev:
        assert dev.get_state().generation == 2
        incoming = dev.retrieve_session("filler")
    with incoming:
        for token in (0, held - 1):
            fd = incoming.retrieve(token)
            try:
                assert os.pread(fd, 16, 0) == b"%d" % token
            finally:
                os.close(fd)
        incoming.finish()


def test_a_full_fd_table_answers_an_open_with_emfile(
    luod_factory: Callable[..., Luod],
) -> None:
    """Without a reserve the table can fill up: an opener still gets a hello."""
    daemon = luod_factory("--fd-reserve", "0")
    limit_fds(daemon)
    session = root_session(daemon, "filler")
    held, refusal = fill(session)
    assert held > NOFILE - 32, held
    # The fd sent with the last PRESERVE_FD found no slot: the kernel dropped it.
    assert isinstance(refusal, liveupdate.OutOfResourcesError), refusal
    with pytest.raises(liveupdate.OutOfResourcesError) as opened:
        daemon.open(timeout=5.0).close()  # EMFILE is not retried: at once
    assert opened.value.errno == errno.EMFILE  # in the hello
    assert daemon.alive()
    # One file let go: the device opens again and everything else is held.
    session.unpreserve(0)
    with daemon.open(timeout=10.0) as dev:
        info = dev.get_state()
    assert info.preserved_files == held - 1
    assert info.state == uapi.LuodState.NORMAL
    session.close()
