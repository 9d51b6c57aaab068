"""An exclusive flock on a file that names its holder's pid.

    lock = PidLock.take("/var/lib/gateway/owner.lock")   # raises Held(pid) if taken
    ...
    lock.release()

Why flock: the kernel drops it when its holder dies, however it dies (SIGKILL
included), so a crash never leaves a lock that needs a human; and two open file
descriptions conflict even inside one process, so a second owner in the same
process is refused as well. The pid written in the file only words the refusal.

The holder unlinks the file on release while still holding the lock; a taker
that locked a file that was unlinked meanwhile (its inode is no longer the one
at the path) retries on the new file. So nothing is left behind after a clean
release, and a crashed holder's file is reused by the next taker.
"""

from __future__ import annotations

import errno
import fcntl
import os


class Held(Exception):
    """Someone else holds the lock; `pid` is theirs (None if unreadable)."""

    def __init__(self, path: str, pid: int | None) -> None:
        super().__init__(f"{path} is held by pid {pid}")
        self.path = path
        self.pid = pid


class PidLock:
    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd
        self.previous = ""  # what a holder that died without releasing wrote in the file

    @classmethod
    def take(cls, path: str, note: str = "") -> PidLock:
        """Lock `path` (created if missing) without waiting, and write our pid
        (and `note`, a second line) in it."""
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        for _ in range(100):  # each retry means the holder released between open and lock
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                    raise
                raise Held(path, read_pid(path)) from None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # locked a file its holder unlinked on release: try the new one
                os.close(fd)
                continue
            lock = cls(path, fd)
            lock.previous = os.pread(fd, 4096, 0).decode(errors="replace")
            lock.write(note)
            return lock
        raise OSError(f"{path}: could not take the lock (it keeps being replaced)")

    def write(self, note: str = "") -> None:
        """Rewrite the file: our pid, then `note` (what a next owner must know)."""
        data = f"{os.getpid()}\n{note}".encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Unlink the file and drop the lock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)  # closing the last descriptor drops the flock


def read_pid(path: str) -> int | None:
    """The pid written in a lock file, or None (missing, empty, garbage)."""
    try:
        with open(path) as f:
            first = f.readline().strip()
    except OSError:
        return None
    return int(first) if first.isdigit() else None


def note_of(content: str) -> str:
    """The note in a lock file's content (what follows the pid line)."""
    return content.partition("\n")[2]
