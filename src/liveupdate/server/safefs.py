"""luod's files, reached only through directories checked once and never through a link.

luod runs as root beside other users. A path is only as safe as every
directory on the way to it: whoever can write to one of them can swap what
follows for a symbolic link and make luod write, truncate or read a file of
their choosing. So luod opens each directory it keeps files in once, walking
from ``/`` one component at a time (:func:`open_checked_dir`), and from then on
reaches its files *relative to that directory fd* (:class:`StateDir`):

* every directory on the way is owned by root or by luod's own user;
* none may be writable by its group or by others, except an *ancestor* with
  the sticky bit (``/tmp``): there only the owner of an entry (checked at the
  next step: root or us) or of the directory (root or us) can rename or
  remove it, so nobody else can swap the next component;
* the directory itself (where files are created) is never writable by
  anyone else, sticky or not;
* a symbolic link on the way is followed only when it is owned by root or
  us, inside a directory already checked (``/var/run -> /run``), and what it
  leads to is checked like the rest;
* files are created under a fresh name with ``O_CREAT|O_EXCL|O_NOFOLLOW``, then
  renamed over the final name (which replaces a planted link, never follows
  it), and read back with ``O_NOFOLLOW``.

Any violation is an :class:`UnsafePathError` whose message is one line naming
the directory and why.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque

__all__ = ["StateDir", "UnsafePathError", "open_checked_dir"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: More links than this on the way to one directory is a loop.
_MAX_LINKS = 40


class UnsafePathError(Exception):
    """A directory luod would keep files in is (or leads through) one another user controls."""


def _trusted_owner(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _check_dir(fd: int, shown: str, *, final: bool) -> None:
    st = os.fstat(fd)
    if not _trusted_owner(st.st_uid):
        raise UnsafePathError(
            f"{shown} is owned by uid {st.st_uid} (neither root nor uid {os.geteuid()}); "
            "refusing to keep files under it"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022 and (final or not mode & stat.S_ISVTX):
        where = "group or others"
        raise UnsafePathError(
            f"{shown} is writable by {where} (mode {mode:04o}); refusing to keep files "
            + ("in it" if final else "under it (only a sticky ancestor may be)")
        )


def open_checked_dir(path: str, *, create_mode: int | None = None) -> int:
    """Open the directory ``path`` (absolute), checking every directory from ``/``.

    Missing components are created with ``create_mode`` when it is given.
    Returns an ``O_DIRECTORY`` fd (close-on-exec).
    """
    if not os.path.isabs(path):
        raise UnsafePathError(f"{path!r} is not an absolute path")
    parts = deque(p for p in path.split("/") if p and p != ".")
    chain = [os.open("/", _DIR_FLAGS)]
    shown = ["/"]
    links = 0
    try:
        _check_dir(chain[0], "/", final=not parts)
        while parts:
            name = parts.popleft()
            if name == "..":
                if len(chain) > 1:
                    os.close(chain.pop())
                    shown.pop()
                continue
            here = os.path.join(shown[-1], name)
            try:
                fd = os.open(name, _DIR_FLAGS, dir_fd=chain[-1])
            except FileNotFoundError:
                if create_mode is None:
                    raise UnsafePathError(f"{here} does not exist") from None
                try:
                    os.mkdir(name, create_mode, dir_fd=chain[-1])
                except FileExistsError:
                    pass  # created meanwhile: opened and checked below like any other
                except OSError as exc:
                    raise UnsafePathError(f"cannot create {here}: {exc.strerror}") from None
                fd = os.open(name, _DIR_FLAGS, dir_fd=chain[-1])
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafePathError(f"cannot open {here}: {exc.strerror}") from None
                st = os.lstat(name, dir_fd=chain[-1])
                if not stat.S_ISLNK(st.st_mode):
                    raise UnsafePathError(f"{here} is not a directory") from None
                if not _trusted_owner(st.st_uid):
                    raise UnsafePathError(
                        f"{here} is a symbolic link owned by uid {st.st_uid}; not following it"
                    ) from None
                links += 1
                if links > _MAX_LINKS:
                    raise UnsafePathError(f"too many symbolic links on the way to {path}") from None
                target = os.readlink(name, dir_fd=chain[-1])
                if target.startswith("/"):
                    while len(chain) > 1:
                        os.close(chain.pop())
                        shown.pop()
                parts.extendleft(reversed([p for p in target.split("/") if p and p != "."]))
                continue
            chain.append(fd)
            shown.append(here)
            _check_dir(fd, here, final=not parts)
        return chain.pop()
    finally:
        for fd in chain:
            os.close(fd)


class StateDir:
    """A directory luod keeps files in, opened and checked once (:func:`open_checked_dir`).

    Every name given to the methods is a single path component, resolved
    relative to the checked directory fd.
    """

    def __init__(self, path: str, *, create_mode: int | None = None) -> None:
        #: The absolute path, for messages only: files are reached through :attr:`fd`.
        self.path = os.path.abspath(path)
        self.fd = open_checked_dir(self.path, create_mode=create_mode)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def show(self, name: str) -> str:
        """``name``'s path, for logs and messages."""
        return os.path.join(self.path, name)

    def _name(self, name: str) -> str:
        if not name or "/" in name or name in (".", ".."):
            raise ValueError(f"{name!r} is not a file name")
        return name

    def write_atomic(self, name: str, data: bytes, mode: int = 0o600, durable: bool = True) -> None:
        """Replace ``name`` with ``data``: readers see the old or the new file, never a mix.

        The data goes to a fresh file (``O_EXCL|O_NOFOLLOW``, exactly ``mode``)
        that is renamed over ``name``; on any failure it is removed, so a full
        disk leaves nothing behind and ``name`` as it was. ``durable``: the
        data is fsync'ed before the rename (what must survive a crash of the
        machine); without it, only readers are served (a file rewritten at
        every start).
        """
        self._name(name)
        while True:
            tmp = f".{name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
            try:
                fd = os.open(
                    tmp,
                    os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                    mode,
                    dir_fd=self.fd,
                )
            except FileExistsError:
                continue  # a leftover (or a planted name): never reused, pick another
            break
        try:
            try:
                os.fchmod(fd, mode)  # exactly ``mode``, whatever the umask
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except BaseException:
            self.unlink(tmp)
            raise

    def read(self, name: str) -> bytes:
        """The content of the regular file ``name`` (a link is refused: ``ELOOP``)."""
        fd = os.open(self._name(name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self.fd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, f"{self.show(name)} is not a regular file")
            chunks = []
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def open_lock(self, name: str) -> int:
        """Open (creating it 0600) the lock file ``name``: a regular file of ours, never a link."""
        try:
            fd = os.open(
                self._name(name),
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=self.fd,
            )
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePathError(
                    f"{self.show(name)} is a symbolic link; not following it (remove it)"
                ) from None
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1 or st.st_uid != os.geteuid():
            os.close(fd)
            raise UnsafePathError(
                f"{self.show(name)} is not a regular file of uid {os.geteuid()} with one link; "
                "not using it (remove it)"
            )
        return fd

    def exists(self, name: str) -> bool:
        """Whether ``name`` exists (a link counts as existing; it is never followed)."""
        try:
            os.lstat(self._name(name), dir_fd=self.fd)
        except FileNotFoundError:
            return False
        return True

    def unlink(self, name: str) -> None:
        """Remove ``name`` if it exists."""
        try:
            os.unlink(self._name(name), dir_fd=self.fd)
        except FileNotFoundError:
            pass

    def rename(self, src: str, dst: str) -> None:
        """Rename ``src`` over ``dst`` (a link at either name is moved, not followed)."""
        os.replace(self._name(src), self._name(dst), src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def link(self, src: str, dst: str) -> None:
        """A second name ``dst`` for ``src`` (``EEXIST`` if ``dst`` exists)."""
        os.link(
            self._name(src),
            self._name(dst),
            src_dir_fd=self.fd,
            dst_dir_fd=self.fd,
            follow_symlinks=False,
        )

    def create_empty(self, name: str, mode: int = 0o600) -> None:
        """Create the empty file ``name`` if missing (a marker: needs no data blocks)."""
        try:
            fd = os.open(
                self._name(name),
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                mode,
                dir_fd=self.fd,
            )
        except FileExistsError:
            return
        os.close(fd)
