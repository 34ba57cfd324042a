"""The thaw watchdog: a separate small process that thaws what a backup froze when the backup cannot.

A frozen filesystem blocks every writer on the machine until someone thaws it; a backup killed with
SIGKILL (or the OOM killer) runs no cleanup. So the backup starts this process *before* it freezes
anything, and tells it over a pipe when the freeze begins and ends. The watchdog thaws on its own when

- the pipe reaches end-of-file while a freeze is on: the backup is gone, however it died;
- the freeze has lasted longer than its deadline: the backup hangs (its own, earlier limit failed).

It opens the filesystems' mount points before the freeze (opening a path may need the frozen
filesystem's own metadata), ignores the stop signals a terminal or systemd sends to the backup's
process group (it runs in a session of its own), and imports nothing but the standard library.

Protocol, one line each, backup to watchdog on stdin: ``armed`` (a freeze begins: thaw on EOF, start
the deadline), ``disarmed`` (thawed by the backup: nothing to do). The watchdog writes ``ready`` on
stdout once every mount point is open, and reports what it did on stderr.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import sys
import time

FITHAW = 0xC0045878


def _thaw(fds: list[tuple[str, int]], why: str) -> None:
    for path, fd in reversed(fds):
        try:
            fcntl.ioctl(fd, FITHAW, 0)
        except OSError:
            continue  # not frozen (EINVAL): the backup thawed it after all
        sys.stderr.write(f"imagechain watchdog: thawed {path} ({why})\n")
    sys.stderr.flush()


def main(argv: list[str]) -> int:
    deadline = float(argv[0])  # seconds a freeze may last before the watchdog thaws; 0: no deadline
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(s, signal.SIG_IGN)
    fds = [(p, os.open(p, os.O_RDONLY | os.O_CLOEXEC)) for p in argv[1:]]
    os.write(1, b"ready\n")
    armed, until, pending = False, 0.0, b""
    while True:
        wait = max(0.0, until - time.monotonic()) if armed and deadline else None
        ready, _, _ = select.select([0], [], [], wait)
        if not ready:
            _thaw(fds, f"the freeze lasted longer than {deadline:g} s")
            armed = False
            continue
        data = os.read(0, 256)
        if not data:
            if armed:
                _thaw(fds, "the backup that froze it ended without thawing")
            return 0
        pending += data
        while b"\n" in pending:
            line, _, pending = pending.partition(b"\n")
            if line == b"armed":
                armed, until = True, time.monotonic() + deadline
            elif line == b"disarmed":
                armed = False


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
