"""Result locks: two runs writing into one output folder never work on the same result at the same time.

A result (a slide's or an image's files, named by its output stem) is locked by ``OUTPUT/.locks/{stem}.lock``, a
file held with an exclusive, non-blocking ``flock`` on an open descriptor. The kernel drops such a lock when the
descriptor is closed, so also when its process dies (SIGKILL, out of memory): a killed run never leaves a lock that
has to be broken by hand, and the next run simply acquires it ("takes it over"). The file's content names the holder
(pid, host, start time, command) for messages only; it never decides who holds the lock. The descriptor is not
inherited by programs started with exec (the package's worker pools spawn theirs); a process forked without exec
while a lock is held would share it until it exits.

Lock files are removed on release, safely: the holder truncates and unlinks its file *while it still holds it*, and
an acquirer checks after locking that the descriptor it locked is still the file at the path (same device and
inode), else it opens the path again; so a process that opened the old file just before it was unlinked never
believes it holds the lock. A lock file that still has content when it is acquired was left by a run that ended
without releasing it (killed): :attr:`ResultLock.took_over` names that run. The lock folder goes too when it is
empty, and so does an output folder that the lock created and nothing else filled (a run that fails before any
result leaves no folder): every writer of a result holds its lock, whose file is in that folder, so an empty folder
has no writer, and an acquirer whose folder a release removed just before it created its file creates it again.

Where ``fcntl`` is missing (Windows) ``msvcrt.locking`` locks one byte of the file far past its content (Windows
releases it when the process ends); there the file is unlinked only after it is closed, which Windows refuses while
another process has it open. The Linux path is the one the test suite runs. On NFS, Linux maps ``flock`` onto NFS
byte-range locks (NFSv4 or NLM), which hold between machines.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..errors import CerberusError
from .files import json_text

try:  # POSIX
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
    import msvcrt

LOCK_DIR = ".locks"
_WINDOWS_BYTE = 1 << 30  # the byte msvcrt locks: past any content, so the holder's record stays readable


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a lock, as its file records it."""

    pid: int | None = None
    host: str = ""
    started: str = ""
    command: str = ""

    def __str__(self) -> str:
        """``pid 123 on host`` (``unknown holder`` for a file not yet written)."""
        if self.pid is None:
            return "unknown holder"
        return f"pid {self.pid}" + (f" on {self.host}" if self.host else "")

    @classmethod
    def from_bytes(cls, data: bytes) -> Holder | None:
        """The holder a lock file records; None for an empty file, an unknown holder for an unreadable one."""
        if not data.strip():
            return None
        try:
            got = json.loads(data.decode("utf-8", "replace"))
        except ValueError:
            return cls()
        if not isinstance(got, dict):
            return cls()
        pid = got.get("pid")
        return cls(pid if isinstance(pid, int) else None, str(got.get("host", "")), str(got.get("started", "")),
                   str(got.get("command", "")))


def lock_path(folder: str | Path, name: str) -> Path:
    """The lock file of result ``name`` (an output stem) in the output ``folder``."""
    return Path(folder) / LOCK_DIR / f"{name}.lock"


def _this_holder() -> bytes:
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.argv[0]).name if sys.argv else "python", *sys.argv[1:]])[:500]}
    return (json_text(record) + "\n").encode()


def _lock(fd: int) -> bool:
    """Take the exclusive lock of ``fd`` without waiting; False when another open file holds it."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            os.lseek(fd, _WINDOWS_BYTE, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:  # BlockingIOError (EWOULDBLOCK) on POSIX, PermissionError/EACCES on Windows
        return False
    return True


def _unlock(fd: int) -> None:
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
    else:
        os.lseek(fd, _WINDOWS_BYTE, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def _read(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096)


def held_by(folder: str | Path, name: str) -> Holder | None:
    """The holder of result ``name``'s lock in ``folder`` when another open file holds it, else None (free, or
    left by a run that ended). Creates nothing: a cheap look before deciding what to do first, which the lock's
    own :meth:`ResultLock.acquire` confirms."""
    try:
        fd = os.open(lock_path(folder, name), os.O_RDWR)
    except OSError:  # no lock file (or none this process can open): nobody holds it
        return None
    try:
        if _lock(fd):
            _unlock(fd)
            return None
        return Holder.from_bytes(_read(fd)) or Holder()
    finally:
        os.close(fd)


class ResultLock:
    """The lock of one result (output stem ``name``) in the output ``folder`` (see the module docstring).

    ``try_acquire()`` takes it if free; ``acquire()`` waits for it, polling every ``poll`` seconds, and calls
    ``on_wait(holder)`` once when it has to wait; ``release()`` gives it back (and removes its file). As a context
    manager it acquires (waiting) on entry and releases on exit. After acquiring, :attr:`took_over` is the holder
    of a run that ended while holding it (its lock file was left with content), else None; :attr:`holder` is the
    other process last seen holding it.
    """

    def __init__(self, folder: str | Path, name: str, poll: float = 0.5):
        self.path = lock_path(folder, name)
        self.name = name
        self.poll = float(poll)
        self.fd: int | None = None
        self.holder: Holder | None = None
        self.took_over: Holder | None = None
        self._made: list[Path] = []  # the missing folders above the lock folder that creating it makes

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self.fd is not None

    def _open(self) -> int:
        """Open (creating) the lock file; its folder is created as needed (again, when a releasing run removed it
        between the two steps)."""
        for _ in range(100):
            try:
                if not self._made:
                    made, above = [], self.path.parent.parent
                    while not above.exists() and above != above.parent:
                        made.append(above)
                        above = above.parent
                    self._made = made
                self.path.parent.mkdir(parents=True, exist_ok=True)
                return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except FileNotFoundError:  # the folder was removed by a run releasing its last lock: again
                continue
            except OSError as exc:
                raise CerberusError(f"cannot create the lock file {self.path} ({exc.strerror}); check that the "
                                    "output folder is writable") from None
        raise CerberusError(f"cannot create the lock file {self.path}; its folder keeps disappearing")

    def _is_current(self, fd: int) -> bool:
        """Whether the locked descriptor is still the file at the path (not one a releasing run has unlinked)."""
        try:
            here = os.stat(self.path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)

    def try_acquire(self) -> bool:
        """Take the lock if no other process (or other open file) holds it; True when this object holds it."""
        if self.fd is not None:
            return True
        while True:
            fd = self._open()
            if not _lock(fd):
                self.holder = Holder.from_bytes(_read(fd)) or Holder()
                os.close(fd)
                return False
            if not self._is_current(fd):  # unlinked by its releasing holder meanwhile: lock the path's file
                _unlock(fd)
                os.close(fd)
                continue
            left = Holder.from_bytes(_read(fd))  # content left behind: its run ended without releasing
            mine = left is not None and (left.pid, left.host) == (os.getpid(), socket.gethostname())
            self.took_over = left if left is not None and not mine else None
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, _this_holder())
            self.fd = fd
            return True

    def acquire(self, wait: bool = True, on_wait: Callable[[Holder], None] | None = None) -> bool:
        """Take the lock; when another run holds it, call ``on_wait(holder)`` once and wait for it (``wait``), or
        return False at once (``wait=False``). True when this object holds it."""
        if self.try_acquire():
            return True
        if not wait:
            return False
        if on_wait is not None:
            on_wait(self.holder or Holder())
        while not self.try_acquire():
            time.sleep(self.poll)
        return True

    def release(self) -> None:
        """Give the lock back: empty and unlink its file while still holding it, remove the lock folder when it is
        empty, then unlock. Nothing when not held."""
        fd, self.fd = self.fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # a file found with content means a run that ended holding it: not this one
            if fcntl is not None:  # POSIX: unlinked while held (acquirers check that they locked the path's file)
                self.path.unlink(missing_ok=True)
                for folder in (self.path.parent, *self._made):  # and the output folder this lock created, if empty
                    try:
                        folder.rmdir()
                    except OSError:  # other locks or files in it (or already gone)
                        break
        finally:
            _unlock(fd)
            os.close(fd)
        if fcntl is None:  # Windows refuses to unlink a file another process has open: then it stays, empty
            try:
                self.path.unlink(missing_ok=True)
            except OSError:
                pass

    def __enter__(self) -> ResultLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:  # a lock never outlives its object (the kernel would drop it with the process)
        if getattr(self, "fd", None) is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass


__all__ = ["LOCK_DIR", "Holder", "ResultLock", "held_by", "lock_path"]
