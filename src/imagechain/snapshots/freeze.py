"""Freezing mounted filesystems (FIFREEZE/FITHAW), always thawed again.

A freeze flushes the filesystem to its device and blocks every writer until the thaw: the device then
holds one consistent moment. Nothing may be left frozen: the thaw runs on success, on errors, on stop
signals (context exit), and when this process dies without running any code (the watchdog process,
see watchdog.py). A time limit bounds how long writers wait: past it the freeze is given up, thawed,
and the caller's check() raises, so nothing read after the limit is published."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import select
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from .. import interrupts, libc
from ..errors import SnapshotError

FIFREEZE = 0xC0045877
FITHAW = 0xC0045878
WATCHDOG_GRACE_S = 5.0  # the watchdog's deadline comes this long after the backup's own limit
WATCHDOG_START_S = 30.0

# filesystems whose kernel drivers implement freezing (FUSE and most others do not)
FREEZABLE = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "jfs", "nilfs2", "gfs2", "ocfs2",
                       "reiserfs", "bcachefs"})  # fmt: skip


def presync(paths: list[str]) -> None:
    """Write out what is dirty before freezing, while writers still run: the freeze then has little
    left to flush, and writers wait that much less. Best effort (a freeze flushes anyway)."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            if os.path.isdir(path):
                libc.syncfs(fd)
            else:
                os.fdatasync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)


@dataclass(frozen=True)
class FreezeTarget:
    path: str  # the mount point to open (through /proc/PID/root for another mount namespace)
    label: str  # "/mnt/data (ext4)"


class Freezer:
    """Freezes the targets on enter, thaws them on exit (in reverse order), with a watchdog meanwhile.

    `limit_s` (0: none) is how long the freeze may last: check() raises once it has, after thawing.
    `blocked_s` is how long writers were blocked: from the first FIFREEZE call to the last thaw."""

    def __init__(self, targets: list[FreezeTarget], limit_s: float = 0.0, busy_wait_s: float = 0.0) -> None:
        self.targets = targets
        self.limit_s = limit_s
        self.busy_wait_s = busy_wait_s  # another freezer's turn (a clone of another chain) ends this soon
        self.blocked_s = 0.0
        self._fds: list[tuple[FreezeTarget, int]] = []
        self._frozen: list[tuple[FreezeTarget, int]] = []
        self._t0 = 0.0
        self._dog: subprocess.Popen[bytes] | None = None
        self._expired = False
        self._timer: threading.Timer | None = None  # thaws at the limit, whatever the reader is doing
        self._lock = threading.Lock()

    # -- the watchdog

    def _start_watchdog(self) -> None:
        deadline = self.limit_s + WATCHDOG_GRACE_S if self.limit_s else 0.0
        args = [sys.executable, "-m", "imagechain.snapshots.watchdog", f"{deadline:.3f}",
                *(t.path for t in self.targets)]
        try:
            dog = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
                                   close_fds=True)  # fmt: skip
        except OSError as e:
            raise SnapshotError(f"cannot start the thaw watchdog ({e.strerror}); nothing was frozen") from e
        self._dog = dog
        assert dog.stdout is not None
        ready, _, _ = select.select([dog.stdout], [], [], WATCHDOG_START_S)
        line = dog.stdout.readline() if ready else b""
        if line.strip() != b"ready":
            self._stop_watchdog()
            raise SnapshotError("the thaw watchdog did not start (it could not open the mount points?); "
                                "nothing was frozen")  # fmt: skip

    def _tell(self, line: bytes) -> None:
        if self._dog is not None and self._dog.stdin is not None:
            with contextlib.suppress(OSError):  # a watchdog that died leaves us to thaw, which we do anyway
                self._dog.stdin.write(line + b"\n")
                self._dog.stdin.flush()

    def _stop_watchdog(self) -> None:
        dog, self._dog = self._dog, None
        if dog is None:
            return
        with contextlib.suppress(OSError):
            if dog.stdin is not None:
                dog.stdin.close()
        try:
            dog.wait(10)
        except subprocess.TimeoutExpired:
            dog.kill()
            dog.wait()
        if dog.stdout is not None:
            dog.stdout.close()

    # -- freeze and thaw

    def __enter__(self) -> Freezer:
        self._start_watchdog()
        try:
            for t in self.targets:
                try:
                    self._fds.append((t, os.open(t.path, os.O_RDONLY | os.O_CLOEXEC)))
                except OSError as e:
                    raise SnapshotError(f"cannot open {t.label} to freeze it: {e.strerror}") from e
            self._tell(b"armed")
            self._t0 = time.monotonic()
            for t, fd in self._fds:
                self._freeze(t, fd)
            if self.limit_s:
                self._timer = threading.Timer(max(0.0, self._t0 + self.limit_s - time.monotonic()), self._expire)
                self._timer.daemon = True
                self._timer.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _freeze(self, t: FreezeTarget, fd: int) -> None:
        give_up = time.monotonic() + self.busy_wait_s
        while True:
            with interrupts.deferred():  # frozen and recorded as frozen, or neither
                try:
                    fcntl.ioctl(fd, FIFREEZE, 0)
                    self._frozen.append((t, fd))
                    return
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() > give_up:
                        raise SnapshotError(_freeze_failure(t, e)) from e
            time.sleep(0.05)

    def _expire(self) -> None:
        self._expired = True
        with contextlib.suppress(SnapshotError):  # the main thread's thaw reports what failed
            self.thaw()

    def check(self) -> None:
        """Raise once the freeze has lasted longer than its limit (the timer has thawed by then)."""
        if self._expired:
            raise SnapshotError(self._expiry())

    def _expiry(self) -> str:
        return (f"reading the source took longer than --max-freeze {self.limit_s:g} s allows writers to be blocked; "
                f"thawed {', '.join(t.label for t in self.targets)}; nothing was published (a reflink or LVM "
                f"snapshot blocks writers only for a moment; or raise --max-freeze)")  # fmt: skip

    def still_frozen(self) -> None:
        """Raise unless every target is frozen right now: someone (the watchdog at its deadline, an
        administrator) may have thawed one while it was read, and then the read was not of one moment."""
        if self._expired:
            raise SnapshotError(self._expiry())
        for t, fd in self._frozen:
            try:
                fcntl.ioctl(fd, FIFREEZE, 0)
            except OSError as e:
                if e.errno == errno.EBUSY:
                    continue  # already frozen: by us, as it should be
                raise SnapshotError(f"cannot check that {t.label} is still frozen: {e.strerror}") from e
            fcntl.ioctl(fd, FITHAW, 0)  # it was not: undo our probe
            raise SnapshotError(f"{t.label} was thawed while the source was read (by someone else, or by the "
                                f"watchdog at its deadline): the data is not of one moment; nothing was "
                                f"published")  # fmt: skip

    def thaw(self) -> None:
        errors = []
        main = threading.current_thread() is threading.main_thread()  # signals arrive there, not in the timer
        with self._lock, interrupts.deferred() if main else contextlib.nullcontext():
            while self._frozen:
                t, fd = self._frozen.pop()
                try:
                    fcntl.ioctl(fd, FITHAW, 0)
                except OSError as e:
                    if e.errno != errno.EINVAL:  # EINVAL: not frozen (thawed by someone else)
                        errors.append(f"{t.label}: {e.strerror}")
            if self._t0 and not self.blocked_s:
                self.blocked_s = time.monotonic() - self._t0
            self._tell(b"disarmed")
        if errors:
            raise SnapshotError(f"cannot thaw {'; '.join(errors)}; run fsfreeze --unfreeze on it")

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        try:
            self.thaw()
        finally:
            self._stop_watchdog()
            for _, fd in self._fds:
                os.close(fd)
            self._fds = []


def _freeze_failure(t: FreezeTarget, e: OSError) -> str:
    if e.errno == errno.EBUSY:
        return f"{t.label} is already frozen (by someone else); not reading it while its owner may thaw it"
    if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
        return f"{t.label} cannot be frozen (its filesystem does not support it)"
    if e.errno == errno.EPERM:
        return f"freezing {t.label} needs root (CAP_SYS_ADMIN)"
    return f"cannot freeze {t.label}: {e.strerror}"
