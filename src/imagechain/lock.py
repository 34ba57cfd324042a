"""One writer per chain, on any filesystem: an exclusively created lock file, refreshed while held.

Whether a lock is stale is decided without ever comparing another machine's clock with ours:
- A lock made on this machine whose process is provably gone (this machine restarted since it was
  last refreshed, or, in our pid namespace, its pid is absent, a zombie or another process) is removed
  automatically; `ChainLock.notices` says so.
- Any other lock (another machine, another pid namespace of this machine) is watched: it is stale once
  its content has not changed for STALE_AFTER as measured by this machine's clock. Such a lock, and an
  unreadable one, is reported with the command that removes it, never removed.
The holder rewrites the lock only while the file is still the one it wrote, and `check()` proves that
before anything is published: a lock taken over (or removed) stops the backup instead of being
overwritten. See docs/REPOSITORY.md "Locks"."""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import blake3

from . import interrupts
from .errors import LockedError, RepositoryError
from .identity import HostIdentity, read_text
from .mapcache import default_cache_dir
from .sizes import env_seconds
from .stores import Store, temporary_name

REFRESH_EVERY = 60.0  # IMAGECHAIN_LOCK_REFRESH overrides it
STALE_AFTER = 3600.0  # IMAGECHAIN_LOCK_STALE_AFTER overrides it
UNREADABLE_GRACE = 2.0  # an empty lock file may be one whose owner is still writing it
BREAK_WAIT = 5.0  # how long to wait for another process removing the same stale lock
MAX_ROUNDS = 8  # attempts to take a lock that keeps changing hands
LOCK_DIR = "locks"
BOOT_ID_FILE = "/proc/sys/kernel/random/boot_id"
MAX_LOCK_BYTES = 1 << 16


def refresh_every() -> float:
    """Seconds between refreshes of a held lock (read at every wait, so tests can change it)."""
    return env_seconds("IMAGECHAIN_LOCK_REFRESH", REFRESH_EVERY)


def stale_after() -> float:
    """Seconds a lock we cannot check must stay unchanged, on our clock, before it counts as stale."""
    return env_seconds("IMAGECHAIN_LOCK_STALE_AFTER", STALE_AFTER)


def default_seen_dir() -> str:
    """Where this machine remembers when it first saw each lock's content (next to the block-map cache)."""
    return os.path.join(os.path.dirname(default_cache_dir()), "locks-seen")


# -- this machine's processes ----------------------------------------------------------------------


def boot_id() -> str:
    """Random per boot of the kernel; shared by every container on it. '' when unknown."""
    return read_text(BOOT_ID_FILE)


def pid_namespace() -> str:
    """The pid namespace this process sees pids in ('pid:[4026531836]'); '' when unknown."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def _boot_time() -> float | None:
    for line in read_text("/proc/stat").splitlines():
        if line.startswith("btime "):
            try:
                return float(line.split()[1])
            except (IndexError, ValueError):
                return None
    return None


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of a process of our pid namespace."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rpartition(")")[2].split()
        return fields[0], fields[19]
    except (OSError, IndexError):
        return None


def proc_start(pid: int) -> str:
    """A process's start time (clock ticks since boot): with its pid, it names one process."""
    st = _proc_stat(pid)
    return st[1] if st else ""


def process_gone(pid: int, start: str) -> bool:
    """True only when provably gone from our pid namespace: no such pid, a zombie, or a reused pid."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        pass  # EPERM: it exists, owned by someone else
    st = _proc_stat(pid)
    if st is None:
        return False  # /proc hides it from us, or it ended this instant: not proven
    state, started = st
    return state in ("Z", "X") or (bool(start) and started != start)


# -- judging a lock --------------------------------------------------------------------------------


@dataclass
class LockState:
    name: str
    info: dict[str, object]  # empty when the file is unreadable
    live: bool
    why: str
    provably_dead: bool = False  # made on this machine by a process that is gone: removed without asking
    content: bytes = b""  # the exact bytes judged; an automatic removal re-checks them


def _int(v: object) -> int:
    try:
        return int(v)  # type: ignore[call-overload, no-any-return]
    except (TypeError, ValueError):
        return 0


def _float(v: object) -> float | None:
    try:
        f = float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _who(info: dict[str, object]) -> str:
    return f"pid {info.get('pid')} on {info.get('host')}"


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _read_lock(store: Store, name: str) -> bytes | None:
    """The lock file's bytes, None when there is none."""
    try:
        return store.read(name, 0, MAX_LOCK_BYTES)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise RepositoryError(f"cannot read the lock file {name}: {e.strerror or e}") from e


def _seen_path(seen_dir: str, store: Store, name: str) -> str:
    return os.path.join(seen_dir, blake3.blake3(f"{store.url}\0{name}".encode()).hexdigest()[:32] + ".json")


def _unchanged_for(seen_dir: str, store: Store, name: str, content: bytes) -> float:
    """Seconds, on this machine's clock, since it first saw the lock with exactly this content (0 the
    first time). Best effort: when the record cannot be kept, every look is a first look."""
    path = _seen_path(seen_dir, store, name)
    digest = blake3.blake3(content).hexdigest()
    now = time.time()
    try:
        with open(path, encoding="utf-8") as f:
            rec = json.load(f)
        first = _float(rec.get("first_seen")) if rec.get("digest") == digest else None
        if first is not None and first <= now:
            return now - first
    except (OSError, ValueError, AttributeError):
        pass
    rec = {"store": store.url, "lock": name, "digest": digest, "first_seen": now}
    tmp = temporary_name(path)
    try:
        os.makedirs(seen_dir, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(rec, f)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    return 0.0


def _forget(seen_dir: str, store: Store, name: str) -> None:
    try:
        os.unlink(_seen_path(seen_dir, store, name))
    except OSError:
        pass


def _judge_here(info: dict[str, object]) -> tuple[str, str]:
    """A lock of this machine: ('dead' | 'alive' | 'gone?' | 'watch', reason)."""
    mine, theirs = boot_id(), str(info.get("boot_id") or "")
    my_ns, their_ns = pid_namespace(), str(info.get("pidns") or "")
    pid, start = _int(info.get("pid")), str(info.get("pid_start") or "")
    if mine and theirs and mine != theirs:
        booted, refreshed = _boot_time(), _float(info.get("refreshed_unix"))
        if booted is not None and refreshed is not None and refreshed < booted:
            return "dead", "that process is gone: this machine has restarted since"
        # refreshed after we booted, under another boot: another machine with our fingerprint (a clone)
        return "watch", "made under another boot id, but not before this machine started"
    if mine and theirs and my_ns and their_ns:
        if my_ns != their_ns:
            return "watch", "in another pid namespace of this machine, where its process cannot be checked"
        if process_gone(pid, start):
            return "dead", "that process is gone"
        return ("alive", "") if pid > 0 else ("gone?", "the lock names no process")
    # a lock that does not say where its pid lives (or /proc is unreadable): the pid decides, nothing
    # is removed without asking
    if pid > 0 and not process_gone(pid, start):
        return "alive", ""
    return "gone?", "that process seems gone"


def running_sources(store: Store, me: HostIdentity) -> list[tuple[dict[str, object], str]]:
    """The sources of the backups running on this repository now (live locks): (source, holder)."""
    out = []
    for e in store.list(LOCK_DIR):
        if not e.name.endswith(".lock"):
            continue
        st = inspect_lock(store, e.name, me)
        src = st.info.get("source") if st is not None else None
        if st is not None and st.live and isinstance(src, dict):
            out.append((src, st.why))
    return out


def inspect_lock(store: Store, name: str, me: HostIdentity, *, seen_dir: str | None = None) -> LockState | None:
    """How the lock `name` stands, None when there is none. Looking at a lock of another machine (or
    pid namespace) records when this machine first saw its current content, in seen_dir."""
    seen = default_seen_dir() if seen_dir is None else seen_dir
    raw = _read_lock(store, name)
    if raw is None:
        _forget(seen, store, name)
        return None
    try:
        info = json.loads(raw)
        if not isinstance(info, dict):
            raise ValueError
    except ValueError:
        return LockState(name, {}, False, "the lock file is unreadable (left by a crash while it was written)",
                         content=raw)  # fmt: skip
    who, since = _who(info), info.get("since")
    if info.get("machine") == me.machine:
        verdict, reason = _judge_here(info)
        if verdict == "dead":
            return LockState(name, info, False, f"left by {who} at {since}; {reason}", True, raw)
        if verdict == "alive":
            return LockState(name, info, True, f"held by {who} since {since}", content=raw)
        if verdict == "gone?":
            return LockState(name, info, False, f"left by {who} at {since}; {reason}", content=raw)
        where = f" ({reason})"
    else:
        where = ""  # another machine: its pid means nothing here, its clock is not ours
    age = _unchanged_for(seen, store, name, raw)
    if age >= stale_after():
        return LockState(name, info, False,
                         f"left by {who} at {since}{where}; unchanged for {_duration(age)} as seen from here",
                         content=raw)  # fmt: skip
    return LockState(name, info, True,
                     f"held by {who} since {since}{where}, unchanged for {_duration(age)} as seen from here",
                     content=raw)  # fmt: skip


# -- holding a lock --------------------------------------------------------------------------------


class ChainLock:
    """The chain's write lock. `notices` lists what acquiring it did (stale locks removed); `check()`
    must pass right before publishing."""

    def __init__(self, store: Store, name: str, me: HostIdentity, what: str, repo_arg: str,
                 source: dict[str, object] | None = None) -> None:  # fmt: skip
        self.store, self.name, self.me, self.what, self.repo_arg = store, name, me, what, repo_arg
        self.source = source or {}  # what is being read (path, device/inode): a restore must not write there
        self.notices: list[str] = []
        self.info: dict[str, object] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._guard = threading.Lock()  # one look-then-write at a time (refresh, check, release)
        self._mine: tuple[bytes, ...] = ()  # what we wrote; two while a rewrite's outcome is unknown
        self._lost = ""  # why the lock is no longer ours
        self._refreshes = 0

    def _payload(self) -> bytes:
        self.info["refresh"] = self._refreshes
        self.info["refreshed_unix"] = time.time()
        self._refreshes += 1
        return json.dumps(self.info, indent=1).encode()

    def acquire(self) -> None:
        refresh_every()  # a bad override fails here, not in the refresh thread
        stale_after()
        self.info = {
            "host": self.me.name, "machine": self.me.machine, "boot_id": boot_id(), "pidns": pid_namespace(),
            "pid": os.getpid(), "pid_start": proc_start(os.getpid()),
            "since": datetime.now(UTC).isoformat(timespec="seconds"), "what": self.what,
            "command": " ".join(sys.argv[:3]), **({"source": self.source} if self.source else {}),
        }  # fmt: skip
        for _ in range(MAX_ROUNDS):
            payload = self._payload()
            with interrupts.deferred():  # a stop signal never falls between creating the lock and owning it
                created = self.store.create_exclusive(self.name, payload)
                if created:
                    self._mine, self._lost = (payload,), ""
            if created:
                self._start_refresh()
                self._clear_break_marks()
                return
            st = inspect_lock(self.store, self.name, self.me)
            if st is not None and not st.info:  # maybe caught between its creation and its write: look again
                time.sleep(UNREADABLE_GRACE)
                st = inspect_lock(self.store, self.name, self.me)
            if st is None:  # released between our attempt and the look: try again
                continue
            if st.live:
                raise LockedError(f"{self.what} is being written by another backup ({st.why})")
            if not st.provably_dead:
                raise self._stale(st.why)
            outcome = self._remove_stale(st)
            if outcome == "stuck":
                raise self._stale(f"{st.why}; another process began removing it and did not finish")
        raise LockedError(f"{self.what} is being written by another backup (its lock changed hands "
                          f"{MAX_ROUNDS} times while this one tried to take it)")  # fmt: skip

    def _stale(self, why: str) -> LockedError:
        lock_id = self.name.rpartition("/")[2].removesuffix(".lock")
        return LockedError(
            f"{self.what} has a stale lock ({why}); if no backup of it is running, remove it with: "
            f"imagechain break-lock {shlex.quote(self.repo_arg)} {lock_id}"
        )

    def _break_mark(self, content: bytes) -> str:
        return f"{self.name.removesuffix('.lock')}-{blake3.blake3(content).hexdigest()[:16]}.break"

    def _remove_stale(self, st: LockState) -> str:
        """Remove a provably dead lock, unless it changed since it was judged: 'removed', 'changed', or
        'stuck' (another process is removing it and does not finish).

        Removers of the same stale content first create its break mark exclusively, so only one of them
        at a time re-reads and deletes. That content never comes back once deleted, so a remover that
        finds the file different (gone, or a new holder's) deletes nothing."""
        mark = self._break_mark(st.content)
        body = json.dumps({"host": self.me.name, "pid": os.getpid(), "removing": self.name}).encode()
        if not self.store.create_exclusive(mark, body):
            deadline = time.monotonic() + BREAK_WAIT
            while time.monotonic() < deadline:
                time.sleep(0.05)
                if _read_lock(self.store, self.name) != st.content:
                    return "changed"
            return "stuck"
        try:
            if _read_lock(self.store, self.name) != st.content:
                return "changed"
            self.store.delete(self.name)
        finally:
            self.store.delete(mark)
        self.notices.append(f"removed a stale lock of {self.what}: {st.why}")
        return "removed"

    def _clear_break_marks(self) -> None:
        """Marks left by a remover that crashed. Harmless to delete once we hold the lock: each names a
        content the lock file can never have again."""
        prefix = self.name.removesuffix(".lock") + "-"
        try:
            for e in list(self.store.list(LOCK_DIR)):
                if e.name.startswith(prefix) and e.name.endswith(".break"):
                    self.store.delete(e.name)
        except OSError:
            pass

    def _start_refresh(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._refresh, name="lock-refresh", daemon=True)
        self._thread.start()

    def _verify(self) -> bool:
        """Whether the file still holds what we wrote; when not, why is kept in _lost. Raises
        RepositoryError when the file cannot be read."""
        raw = _read_lock(self.store, self.name)
        if raw is not None and raw in self._mine:
            self._mine = (raw,)
            return True
        if raw is None:
            self._lost = "the lock was taken over (its file was removed)"
        else:
            try:
                info = json.loads(raw)
                who = _who(info) if isinstance(info, dict) else "an unknown process"
            except ValueError:
                who = "an unknown process (the file is unreadable)"
            self._lost = f"the lock was taken over by {who}"
        return False

    def _refresh(self) -> None:
        while not self._stop.wait(refresh_every()):
            with self._guard:
                if self._stop.is_set():
                    return
                try:
                    if not self._verify():
                        return  # no longer ours: never overwrite another holder's lock
                except Exception:
                    continue  # cannot read it now: write nothing, look again next time
                payload = self._payload()
                self._mine = (self._mine[0], payload)  # either may be on disk if the rewrite fails midway
                try:
                    self.store.replace(self.name, payload)
                except Exception:
                    continue
                self._mine = (payload,)

    def check(self) -> None:
        """Raise LockedError unless the lock file is still the one this process wrote."""
        with self._guard:
            if not self._mine:
                lost = self._lost or "the lock was not held"
            else:
                if not self._lost:
                    self._verify()
                lost = self._lost
        if lost:
            raise LockedError(f"{self.what}: {lost} while this backup ran; nothing was published")

    def release(self) -> None:
        """Stop refreshing; delete the lock file if it is still ours (a lock already gone is fine)."""
        self._stop.set()
        if self._thread is not None:
            interrupts.join_started(self._thread)
            self._thread = None
        with self._guard:
            try:
                if self._mine and not self._lost and self._verify():
                    self.store.delete(self.name)
            except OSError as e:
                raise RepositoryError(f"cannot remove the lock file {self.name}: {e.strerror or e}") from e
            finally:
                self._mine = ()

    def __enter__(self) -> ChainLock:
        try:
            self.acquire()
        except BaseException:
            self.release()  # a stop signal right after the lock was created: it is ours, so it goes
            raise
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self.release()
        except RepositoryError:
            if exc_type is None:
                raise  # else the error that ended the backup is the one to report
