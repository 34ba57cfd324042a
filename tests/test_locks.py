"""Chain locks: what is removed without asking (a dead process of this machine), what is only reported
(another machine, another pid namespace, an unreadable file), staleness on our own clock, refresh that
never overwrites a lock taken over, racing removers; and folder fsync in the local store.

Locks are real files in a LocalStore and holders are real processes; the conftest sets the machine
fingerprint ("test-machine-0") and puts the cache, and with it the record of locks seen, under tmp_path."""

from __future__ import annotations

import errno
import json
import os
import re
import selectors
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import imagechain.stores.local as local
from imagechain import lock
from imagechain.errors import LockedError, RepositoryError
from imagechain.identity import HostIdentity, local_host
from imagechain.lock import ChainLock, inspect_lock
from imagechain.stores import LocalStore

NAME = "locks/0123abcd-4567ef01-89abcdef.lock"
WHAT = "chain 'default' of disk.img on alpha"


@pytest.fixture
def store(repo: Path) -> LocalStore:
    return LocalStore(str(repo))


def me() -> HostIdentity:
    return local_host("alpha")


def chain_lock(store: LocalStore) -> ChainLock:
    return ChainLock(store, NAME, me(), WHAT, store.root)


def lock_path(store: LocalStore) -> Path:
    return Path(store.path(NAME))


def write_lock(store: LocalStore, **fields: object) -> bytes:
    """A lock as a holder of this machine, pid namespace and boot writes it; `fields` change it."""
    info = {"host": "alpha", "machine": "test-machine-0", "boot_id": lock.boot_id(), "pidns": lock.pid_namespace(),
            "pid": 0, "pid_start": "", "since": "2026-01-01T00:00:00+00:00", "what": WHAT,
            "command": "imagechain backup", "refresh": 0, "refreshed_unix": time.time()} | fields  # fmt: skip
    body = json.dumps(info, indent=1).encode()
    path = lock_path(store)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(body)
    os.replace(tmp, path)  # atomically, as another holder would
    return body


def locked_error(store: LocalStore) -> str:
    """Acquiring fails with exit code 9 and one line; the message."""
    with pytest.raises(LockedError) as ei:
        chain_lock(store).acquire()
    assert ei.value.exit_code == 9
    msg = str(ei.value)
    assert "\n" not in msg
    return msg


def expect_live(store: LocalStore, *words: str) -> None:
    before = lock_path(store).read_bytes()
    msg = locked_error(store)
    assert "is being written by another backup" in msg and "break-lock" not in msg, msg
    assert all(w in msg for w in words), msg
    assert lock_path(store).read_bytes() == before


def expect_reported_stale(store: LocalStore, *words: str) -> None:
    before = lock_path(store).read_bytes()
    msg = locked_error(store)
    assert "has a stale lock" in msg, msg
    assert msg.endswith(f"remove it with: imagechain break-lock {store.root} {Path(NAME).stem}"), msg
    assert all(w in msg for w in words), msg
    assert lock_path(store).read_bytes() == before  # reported, never removed


def expect_removed(store: LocalStore, *words: str) -> None:
    """The next acquire removes the lock without asking, says so once, and holds the chain."""
    cl = chain_lock(store)
    cl.acquire()
    try:
        assert len(cl.notices) == 1, cl.notices
        notice = cl.notices[0]
        assert notice.startswith(f"removed a stale lock of {WHAT}: left by "), notice
        assert all(w in notice for w in words), notice
        assert json.loads(lock_path(store).read_bytes())["pid"] == os.getpid()
    finally:
        cl.release()
    assert not lock_path(store).exists()
    assert not list(lock_path(store).parent.glob("*.break"))


HOLDER = r"""
import os, sys
from imagechain.identity import local_host
from imagechain.lock import ChainLock
from imagechain.stores import LocalStore

lock = ChainLock(LocalStore(sys.argv[1]), sys.argv[2], local_host("alpha"), sys.argv[3], sys.argv[1])
lock.acquire()
print("held", flush=True)
if sys.argv[4] == "exit":
    os._exit(0)  # gone without releasing
sys.stdin.readline()
lock.check()
lock.release()
print("released", flush=True)
"""


@pytest.fixture
def holder(store: LocalStore) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start a process that takes the lock, says "held", then exits at once ("exit") or waits ("wait")."""
    procs: list[subprocess.Popen[str]] = []

    def start(how: str, **env: str) -> subprocess.Popen[str]:
        p = subprocess.Popen([sys.executable, "-c", HOLDER, store.root, NAME, WHAT, how], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ) | env)  # fmt: skip
        procs.append(p)
        assert p.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(p.stdout, selectors.EVENT_READ)
        assert sel.select(60), "the holder did not start"
        line = p.stdout.readline()
        assert line == "held\n", (line, p.stderr.read() if p.stderr else "")
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate(timeout=30)


def gone_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# -- this machine ----------------------------------------------------------------------------------


def test_a_dead_process_of_this_machine_loses_its_lock(store: LocalStore, holder: Callable[..., subprocess.Popen[str]],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    # a backup that ended without releasing (killed, crashed): removed on the next acquire, which says so
    p = holder("exit")
    p.wait()
    info = json.loads(lock_path(store).read_bytes())
    assert info["pid"] == p.pid and info["boot_id"] == lock.boot_id() and info["pidns"] == lock.pid_namespace()
    expect_removed(store, f"pid {p.pid} on alpha", "that process is gone")

    # killed while it held the lock, with its refresh running (IMAGECHAIN_LOCK_REFRESH for processes)
    p = holder("wait", IMAGECHAIN_LOCK_REFRESH="0.05")
    first = json.loads(lock_path(store).read_bytes())["refresh"]
    deadline = time.monotonic() + 30
    while json.loads(lock_path(store).read_bytes())["refresh"] < first + 2:
        assert time.monotonic() < deadline, "the holder never refreshed its lock"
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL)
    p.wait()
    expect_removed(store, f"pid {p.pid} on alpha", "that process is gone")

    # a process that has exited but was not yet reaped (a zombie) is gone too
    zombie = subprocess.Popen(["true"])
    deadline = time.monotonic() + 30
    while lock._proc_stat(zombie.pid) is None or lock._proc_stat(zombie.pid)[0] != "Z":  # type: ignore[index]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    write_lock(store, pid=zombie.pid, pid_start=lock.proc_start(zombie.pid))
    expect_removed(store, f"pid {zombie.pid} on alpha")
    zombie.wait()

    # our own pid, but with another start time: the pid was reused
    write_lock(store, pid=os.getpid(), pid_start="1")
    expect_removed(store, f"pid {os.getpid()} on alpha", "that process is gone")

    # this machine has restarted since the lock was last refreshed: whatever its pid is now, that process is gone
    write_lock(store, pid=os.getpid(), pid_start=lock.proc_start(os.getpid()), boot_id="another-boot",
               refreshed_unix=time.time() - 10 * 365 * 86400)  # fmt: skip
    expect_removed(store, "this machine has restarted since")


def test_a_live_process_of_this_machine_keeps_its_lock(store: LocalStore,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(lock, "UNREADABLE_GRACE", 0.05)
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        write_lock(store, pid=sleeper.pid, pid_start=lock.proc_start(sleeper.pid))
        expect_live(store, f"held by pid {sleeper.pid} on alpha")
        write_lock(store, pid=os.getpid(), pid_start=lock.proc_start(os.getpid()))
        expect_live(store, f"held by pid {os.getpid()} on alpha")
        # the same boot id and pid namespace are needed to call a process gone; a lock that does not say
        # (an older version's) is judged by its pid but never removed without asking
        write_lock(store, pid=sleeper.pid, pid_start=lock.proc_start(sleeper.pid), boot_id=None, pidns=None)
        expect_live(store)
        write_lock(store, pid=gone_pid(), boot_id=None, pidns=None)
        expect_reported_stale(store, "that process seems gone")
        # an unreadable lock file (a crash between its creation and its write) says nothing: reported
        lock_path(store).write_bytes(b"")
        expect_reported_stale(store, "unreadable")
        lock_path(store).write_bytes(b'{"host": "al')
        expect_reported_stale(store, "unreadable")

        write_lock(store, pid=sleeper.pid, pid_start=lock.proc_start(sleeper.pid))
    finally:
        sleeper.kill()
        sleeper.wait()
    # ...and once that process has ended, its lock goes
    expect_removed(store, f"pid {sleeper.pid} on alpha", "that process is gone")


def test_another_pid_namespace_or_boot_of_this_machine_is_watched_not_removed(
    store: LocalStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a container with its own pid namespace on this kernel (same boot id): its pid cannot be checked from here
    write_lock(store, pid=gone_pid(), pidns="pid:[1]")
    expect_live(store, "another pid namespace", "unchanged for 0 s as seen from here")
    monkeypatch.setattr(lock, "STALE_AFTER", 0.3)
    time.sleep(0.4)
    expect_reported_stale(store, "another pid namespace", "as seen from here")

    # another boot id, yet refreshed after this machine started: a clone with our fingerprint, not a restart
    write_lock(store, pid=gone_pid(), boot_id="another-boot", refreshed_unix=time.time())
    expect_live(store, "another boot id")
    time.sleep(0.4)
    expect_reported_stale(store, "another boot id")


# -- another machine: judged on our clock ----------------------------------------------------------


def test_another_machine_lock_is_stale_only_after_it_stops_changing_here(
    store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = {"machine": "other-machine", "host": "beta", "pid": 4321, "boot_id": "b", "pidns": lock.pid_namespace()}
    # its clock is a year behind ours (or it has not refreshed for a year): unknown on first sight, so live
    write_lock(store, **other, refreshed_unix=time.time() - 365 * 86400)
    expect_live(store, "held by pid 4321 on beta", "unchanged for 0 s as seen from here")
    seen = list((tmp_path / "locks-seen").glob("*.json"))  # next to the block-map cache (IMAGECHAIN_CACHE)
    assert len(seen) == 1 and json.loads(seen[0].read_text())["lock"] == NAME

    monkeypatch.setattr(lock, "STALE_AFTER", 1.0)
    time.sleep(0.3)
    expect_live(store, "held by pid 4321 on beta")
    time.sleep(0.8)
    # unchanged for STALE_AFTER as seen from here: reported with the command, not removed (it may be a live
    # process whose refreshes fail)
    expect_reported_stale(store, "left by pid 4321 on beta at 2026-01-01T00:00:00+00:00; unchanged for ")
    assert re.search(r"unchanged for \d+ s as seen from here", locked_error(store))
    # it changes (a refresh, from any clock): live again, and the watch starts over
    write_lock(store, **other, refresh=1, refreshed_unix=time.time() - 365 * 86400)
    expect_live(store, "unchanged for 0 s")
    time.sleep(1.1)
    expect_reported_stale(store)
    write_lock(store, **other, refresh=2, refreshed_unix=time.time() + 365 * 86400)  # a clock a year ahead
    expect_live(store)

    # the environment overrides STALE_AFTER (processes)
    monkeypatch.setattr(lock, "STALE_AFTER", 3600.0)
    monkeypatch.setenv("IMAGECHAIN_LOCK_STALE_AFTER", "0.2")
    time.sleep(0.3)
    expect_reported_stale(store)
    monkeypatch.setenv("IMAGECHAIN_LOCK_STALE_AFTER", "soon")
    with pytest.raises(Exception, match="IMAGECHAIN_LOCK_STALE_AFTER must be a positive number"):
        chain_lock(store).acquire()
    monkeypatch.delenv("IMAGECHAIN_LOCK_STALE_AFTER")

    # the record of what was seen is best effort: when it cannot be kept, every look is a first look
    (tmp_path / "not-a-folder").write_text("")
    default_seen_dir = lock.default_seen_dir
    monkeypatch.setattr(lock, "default_seen_dir", lambda: str(tmp_path / "not-a-folder" / "locks-seen"))
    monkeypatch.setattr(lock, "STALE_AFTER", 0.01)
    time.sleep(0.05)
    expect_live(store, "unchanged for 0 s")

    # gone: its record goes too
    monkeypatch.setattr(lock, "default_seen_dir", default_seen_dir)
    lock_path(store).unlink()
    assert inspect_lock(store, NAME, me()) is None
    assert not list((tmp_path / "locks-seen").glob("*.json"))


# -- holding: refresh, takeover, release -----------------------------------------------------------


def test_a_stop_signal_before_the_refresh_thread_starts(store: LocalStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGINT landing in Thread.start(): release() joined a thread that had not started, and the backup died
    with "RuntimeError: cannot join thread before it is started" instead of the stop's one line."""

    class Interrupted(threading.Thread):
        def start(self) -> None:
            raise KeyboardInterrupt

    monkeypatch.setattr(lock.threading, "Thread", Interrupted)
    with pytest.raises(KeyboardInterrupt), chain_lock(store):
        pass
    assert not lock_path(store).exists()  # it was ours: it went


def test_refresh_stops_when_the_lock_is_taken_over(store: LocalStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lock, "REFRESH_EVERY", 0.05)
    cl = chain_lock(store)
    cl.acquire()
    try:
        first = lock_path(store).read_bytes()
        deadline = time.monotonic() + 30
        while json.loads(lock_path(store).read_bytes())["refresh"] < 3:  # each refresh changes the content
            assert time.monotonic() < deadline, "no refresh"
            time.sleep(0.01)
        assert lock_path(store).read_bytes() != first
        cl.check()  # still ours

        theirs = write_lock(store, machine="other-machine", host="beta", pid=4321)
        time.sleep(0.5)  # ten refresh intervals
        assert lock_path(store).read_bytes() == theirs, "the holder overwrote a lock that is no longer its own"
        with pytest.raises(LockedError) as ei:
            cl.check()
        msg = str(ei.value)
        assert ei.value.exit_code == 9
        assert msg == (f"{WHAT}: the lock was taken over by pid 4321 on beta while this backup ran; "
                       f"nothing was published"), msg  # fmt: skip
    finally:
        cl.release()
    assert lock_path(store).read_bytes() == theirs  # release leaves another owner's lock alone

    # without waiting for a refresh: check() itself looks at the file
    monkeypatch.setattr(lock, "REFRESH_EVERY", 3600.0)
    lock_path(store).unlink()
    cl = chain_lock(store)
    cl.acquire()
    theirs = write_lock(store, pid=os.getpid(), pid_start=lock.proc_start(os.getpid()), since="elsewhere")
    with pytest.raises(LockedError, match="taken over by pid"):
        cl.check()
    cl.release()
    assert lock_path(store).read_bytes() == theirs

    # removed under its holder: check() says so; release() does not fail and creates nothing
    lock_path(store).unlink()
    cl = chain_lock(store)
    cl.acquire()
    lock_path(store).unlink()
    with pytest.raises(LockedError, match=r"taken over \(its file was removed\) while this backup ran"):
        cl.check()
    cl.release()
    assert not lock_path(store).exists()

    # a lock still ours is removed by release
    with chain_lock(store) as cl:
        cl.check()
        assert lock_path(store).exists()
    assert not lock_path(store).exists()


def test_a_holder_process_sees_a_takeover(store: LocalStore, holder: Callable[..., subprocess.Popen[str]]) -> None:
    p = holder("wait", IMAGECHAIN_LOCK_REFRESH="0.05")
    theirs = write_lock(store, machine="other-machine", host="beta", pid=4321)
    time.sleep(0.5)
    out, err = p.communicate("\n", timeout=60)
    assert p.returncode != 0 and "released" not in out
    assert "LockedError" in err and "taken over by pid 4321 on beta" in err, err
    assert lock_path(store).read_bytes() == theirs


# -- racing removers -------------------------------------------------------------------------------


def test_racing_removers_of_one_stale_lock(store: LocalStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """Removers that only re-read the lock before deleting it can each delete the lock a faster one has
    just made, and hold the chain together (about one round in ten here): the break mark prevents it."""
    monkeypatch.setattr(lock, "UNREADABLE_GRACE", 0.05)
    for round_ in range(30):
        write_lock(store, pid=gone_pid(), refresh=round_)
        locks = [chain_lock(store) for _ in range(4)]
        results: list[str] = []
        start = threading.Barrier(len(locks))

        def take(cl: ChainLock, start: threading.Barrier, results: list[str]) -> None:
            start.wait()
            try:
                cl.acquire()
                results.append("held")
            except LockedError as e:
                results.append(str(e))

        threads = [threading.Thread(target=take, args=(cl, start, results)) for cl in locks]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == len(locks) and results.count("held") == 1, results  # exactly one holds the chain
        for loser in (r for r in results if r != "held"):
            assert f"is being written by another backup (held by pid {os.getpid()} " in loser, loser
        assert sum(len(cl.notices) for cl in locks) == 1, [cl.notices for cl in locks]
        winner = next(cl for cl in locks if cl._mine)
        assert lock_path(store).read_bytes() in winner._mine
        winner.release()
        assert not lock_path(store).exists() and not list(lock_path(store).parent.glob("*.break"))


def test_a_remover_that_died_midway(store: LocalStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lock, "BREAK_WAIT", 0.2)
    stale = write_lock(store, pid=gone_pid())
    mark = chain_lock(store)._break_mark(stale)
    Path(store.path(mark)).write_text("{}")  # it claimed the removal, then crashed
    expect_reported_stale(store, "another process began removing it and did not finish")
    lock_path(store).unlink()  # what break-lock does
    cl = chain_lock(store)
    cl.acquire()
    assert not Path(store.path(mark)).exists()  # the holder clears the leftover mark
    cl.release()


# -- folder fsync in the local store ---------------------------------------------------------------


def test_folder_fsync_errors_fail_the_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(str(tmp_path / "repo"))
    real_fsync = os.fsync
    failure = {"errno": errno.EIO}

    def fsync(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(failure["errno"], os.strerror(failure["errno"]))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    # EIO: the folder entry may not be on the disk; the write fails, naming the folder, in one line
    with pytest.raises(RepositoryError) as ei:
        store.create_exclusive("locks/a.lock", b"{}")
    assert str(ei.value) == f"cannot write folder {tmp_path / 'repo' / 'locks'} (fsync): Input/output error"
    assert not os.path.exists(store.path("locks/a.lock"))
    with pytest.raises(RepositoryError, match=re.escape(f"folder {tmp_path / 'repo' / 'x' / 'y'} (fsync)")):
        store.create("x/y/point.icimg")
    w = store.create("x/y/point.icimg")  # the folders exist now: nothing to fsync until the commit
    w.write(b"data")
    with pytest.raises(RepositoryError, match=re.escape(f"folder {tmp_path / 'repo' / 'x' / 'y'} (fsync)")):
        w.commit()

    # filesystems that cannot fsync a folder at all: let through
    for e in sorted({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EISDIR}):
        failure["errno"] = e
        w = store.create(f"z{e}/point.icimg")
        w.write(b"data")
        w.commit()
        assert store.read(f"z{e}/point.icimg", 0, 10) == b"data"
        assert store.create_exclusive(f"locks/{e}.lock", b"{}")
    # ...or open one
    monkeypatch.setattr(os, "fsync", real_fsync)
    real_open = os.open

    def open_(path: str, flags: int, *a: int) -> int:
        if flags & os.O_DIRECTORY:
            raise PermissionError(errno.EPERM, "Operation not permitted")
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", open_)
    assert store.create_exclusive("locks/b.lock", b"{}")


def test_new_folders_are_fsynced_into_their_parents(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "repo"
    root.mkdir()
    store = LocalStore(str(root))
    synced: list[str] = []
    real = local._fsync_dir

    def spy(path: str) -> None:
        assert os.path.isdir(path)
        synced.append(os.path.relpath(path, root))
        real(path)

    monkeypatch.setattr(local, "_fsync_dir", spy)
    w = store.create("host-1/disk-2/chain-3/point.icimg")
    # every folder created, and the folder it was created in, before anything is written into them
    assert set(synced) == {".", "host-1", "host-1/disk-2", "host-1/disk-2/chain-3"}, synced
    w.write(b"data")
    synced.clear()
    w.commit()
    assert synced == ["host-1/disk-2/chain-3"]
    synced.clear()
    w = store.create("host-1/disk-2/chain-3/point2.icimg")  # nothing new: nothing more
    w.abort()
    assert synced == []
    assert store.create_exclusive("locks/x.lock", b"{}")
    assert set(synced) == {".", "locks"}, synced
