"""One writer per chain, on any filesystem: an exclusively created lock file, refreshed while held.

A lock is stale when its process is gone (same machine) or it has not been refreshed for
STALE_AFTER (another machine; its clock is trusted only through the time it wrote). Stale locks
are reported with the command that removes them; no lock is ever taken over silently."""

from __future__ import annotations

import json
import os
import shlex
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from .errors import LockedError
from .identity import HostIdentity
from .stores import Store

REFRESH_EVERY = 60.0
STALE_AFTER = 3600.0
UNREADABLE_GRACE = 2.0  # an empty lock file may be one whose owner is still writing it
LOCK_DIR = "locks"


def _proc_start(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return ""


def _alive(pid: int, start: str) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not start or not _proc_start(pid) or _proc_start(pid) == start


@dataclass
class LockState:
    name: str
    info: dict[str, object]
    live: bool
    why: str


def inspect_lock(store: Store, name: str, me: HostIdentity) -> LockState | None:
    try:
        raw = store.read(name, 0, 1 << 16)
    except FileNotFoundError:
        return None
    try:
        info = json.loads(raw)
        if not isinstance(info, dict):
            raise ValueError
    except ValueError:
        return LockState(name, {}, False, "the lock file is unreadable (left by a crash while it was written)")
    refreshed = float(info.get("refreshed_unix", 0) or 0)
    who = f"pid {info.get('pid')} on {info.get('host')}"
    if info.get("machine") == me.machine:
        pid = int(info.get("pid", 0) or 0)
        if pid and _alive(pid, str(info.get("pid_start", ""))):
            return LockState(name, info, True, f"held by {who} since {info.get('since')}")
        return LockState(name, info, False, f"left by {who} at {info.get('since')}; that process is gone")
    age = time.time() - refreshed
    if age > STALE_AFTER:
        return LockState(name, info, False,
                         f"left by {who} at {info.get('since')}; not refreshed for {age / 3600:.1f} h")  # fmt: skip
    return LockState(name, info, True, f"held by {who} since {info.get('since')} (refreshed {age:.0f} s ago)")


class ChainLock:
    def __init__(self, store: Store, name: str, me: HostIdentity, what: str, repo_arg: str) -> None:
        self.store, self.name, self.me, self.what, self.repo_arg = store, name, me, what, repo_arg
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.info: dict[str, object] = {}

    def _payload(self) -> bytes:
        self.info["refreshed_unix"] = time.time()
        return json.dumps(self.info, indent=1).encode()

    def acquire(self) -> None:
        self.info = {
            "host": self.me.name, "machine": self.me.machine, "pid": os.getpid(),
            "pid_start": _proc_start(os.getpid()), "since": datetime.now(UTC).isoformat(timespec="seconds"),
            "what": self.what, "command": " ".join(sys.argv[:3]),
        }  # fmt: skip
        if self.store.create_exclusive(self.name, self._payload()):
            self._start_refresh()
            return
        st = inspect_lock(self.store, self.name, self.me)
        if st is not None and not st.info:  # maybe caught between its creation and its write: look again
            time.sleep(UNREADABLE_GRACE)
            st = inspect_lock(self.store, self.name, self.me)
        if st is None:  # released between our attempt and the look: try once more
            if self.store.create_exclusive(self.name, self._payload()):
                self._start_refresh()
                return
            st = inspect_lock(self.store, self.name, self.me)
        why = st.why if st else "held"
        if st is not None and st.live:
            raise LockedError(f"{self.what} is being written by another backup ({why})")
        lock_id = self.name.rpartition("/")[2].removesuffix(".lock")
        raise LockedError(
            f"{self.what} has a stale lock ({why}); if no backup of it is running, remove it with: "
            f"imagechain break-lock {shlex.quote(self.repo_arg)} {lock_id}"
        )

    def _start_refresh(self) -> None:
        self._thread = threading.Thread(target=self._refresh, name="lock-refresh", daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_EVERY):
            try:
                self.store.replace(self.name, self._payload())
            except Exception:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.store.delete(self.name)

    def __enter__(self) -> ChainLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
