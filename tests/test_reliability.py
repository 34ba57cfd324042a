"""Reliability: SIGKILL at any moment of a backup, detection of every kind of damage to an image file,
and the exit code and one-line message of every kind of bad input.

The crash and bad-input tests drive the installed console script in a subprocess, as a user would;
damage is done to real image files, located through the byte layout of docs/FORMAT.md."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3
import numpy as np
import pytest

import imagechain
from imagechain.address import open_point
from imagechain.codec import CodecParams
from imagechain.engine.backup import backup
from imagechain.engine.restore import restore
from imagechain.engine.verify import verify
from imagechain.errors import ImagechainError
from imagechain.format import spec
from imagechain.format.reader import PointReader
from imagechain.repository import MARKER, Repository
from imagechain.stores import TEMP_MARK

from .conftest import (
    assert_portable,
    error_lines,
    exe,
    flip,
    loop_device,
    need_root,
    need_tool,
    restore_as_target_appears,
    write_volume,
)

BS = 64 << 10  # the default block size

# -- running the console script --------------------------------------------------------------------



def ic(*args: object, timeout: float = 120, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([exe(), *map(str, args)], capture_output=True, text=True, env=dict(os.environ),
                          timeout=timeout, **kw)  # type: ignore[call-overload]  # fmt: skip


def ic_ok(*args: object, **kw: object) -> subprocess.CompletedProcess[str]:
    p = ic(*args, **kw)
    assert p.returncode == 0, f"imagechain {' '.join(map(str, args))} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    assert "Traceback" not in p.stderr
    return p


def one_line_error(p: subprocess.CompletedProcess[str], code: int) -> str:
    """The process failed with `code` and said why in exactly one line on stderr, without a traceback."""
    assert p.returncode == code, f"exit {p.returncode}, wanted {code}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    assert "Traceback" not in p.stderr and "Traceback" not in p.stdout, p.stderr
    lines = error_lines(p.stderr)
    assert len(lines) == 1, f"wanted one line on stderr besides notices, got {len(lines)}:\n{p.stderr}"
    assert lines[0].startswith("imagechain: error: "), lines[0]
    return lines[0]


def b3(data: bytes | bytearray) -> bytes:
    return blake3.blake3(data, max_threads=blake3.blake3.AUTO).digest()


def files_in(repo: Path) -> set[str]:
    out = set()
    for dirpath, _dirs, names in os.walk(repo):
        for n in names:
            out.add((Path(dirpath) / n).relative_to(repo).as_posix())
    return out


def temporaries(repo: Path) -> list[str]:
    return sorted(f for f in files_in(repo) if TEMP_MARK in f.rpartition("/")[2])


def new_bytes(repo: Path, before: set[str]) -> int:
    """Bytes in image files (temporary or not) that were not in the repository before; -1 for none."""
    total = -1
    for dirpath, _dirs, names in os.walk(repo):
        for n in names:
            path = os.path.join(dirpath, n)
            rel = os.path.relpath(path, repo).replace(os.sep, "/")
            if rel not in before and not rel.startswith("locks/"):
                with contextlib.suppress(FileNotFoundError):
                    total = max(total, 0) + os.stat(path).st_size
    return total


def locks(repo: Path) -> list[Path]:
    return sorted((repo / "locks").glob("*.lock"))


def restore_to(address: str, target: Path) -> bytes:
    """Restore through the library; returns the BLAKE3 of what was written."""
    res = open_point(address)
    restore(res.repo, res.point, str(target))
    try:
        return b3(target.read_bytes())
    finally:
        target.unlink()


# == 1. crash safety ================================================================================

CRASH_SIZE = 160 << 20


@pytest.mark.slow
def test_sigkill_at_any_moment_of_a_backup_publishes_nothing_and_harms_nothing(tmp_path: Path, repo: Path) -> None:
    rng = np.random.default_rng(20261124)
    vol = tmp_path / "vol.img"
    out = tmp_path / "out.img"
    data = bytearray(rng.bytes(CRASH_SIZE))
    vol.write_bytes(data)
    expected: dict[str, bytes] = {}  # point id -> BLAKE3 of the volume it holds
    r0 = backup(str(vol), str(repo), codec=CodecParams.parse("none"))
    expected[r0.point_id] = b3(data)
    data[5 << 20 : 9 << 20] = rng.bytes(4 << 20)
    vol.write_bytes(data)
    r1 = backup(str(vol), str(repo))
    assert r1.kind == "incremental" and r1.changed_blocks == (4 << 20) // BS
    expected[r1.point_id] = b3(data)
    latest, sequence = r1.point_id, 1

    delay = random.Random(7).uniform(0.3, 1.0)
    Cond = Callable[[float], bool]
    before: set[str] = set()
    triggers: list[tuple[str, Cond]] = [
        ("at once", lambda t: True),
        ("lock taken", lambda t: bool(locks(repo))),
        ("first bytes written", lambda t: new_bytes(repo, before) >= 0),
        ("half the payloads written", lambda t: new_bytes(repo, before) >= CRASH_SIZE // 2),
        ("all payloads written (index, footer, fsync, rename)", lambda t: new_bytes(repo, before) >= CRASH_SIZE),
        (f"after {delay:.2f} s", lambda t: t >= delay),
    ]
    outcomes: list[tuple[str, str]] = []
    saw_leftovers = saw_stale_lock = False
    restored: set[str] = set()
    for i, (label, cond) in enumerate(triggers):
        data = bytearray(rng.bytes(CRASH_SIZE))  # every block changes: the backup stores the whole volume
        vol.write_bytes(data)
        want = b3(data)
        before = files_in(repo)
        split = ["--split-size", "48M"] if i % 2 else []
        proc = subprocess.Popen([exe(), "backup", str(vol), str(repo), "--json", *split], env=dict(os.environ),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        t0 = time.monotonic()
        try:
            while proc.poll() is None and not cond(time.monotonic() - t0):
                assert time.monotonic() - t0 < 60, f"{label}: the condition never came true"
                time.sleep(0.002)
            proc.send_signal(signal.SIGKILL)  # a no-op when the backup already finished
        finally:
            stdout, stderr = proc.communicate(timeout=60)
        what = f"killed {label}"
        assert "Traceback" not in stderr
        if proc.returncode == 0:  # it finished before the kill landed: then it must be a whole, correct point
            res = json.loads(stdout)
            expected[res["point_id"]] = want
            latest, sequence = res["point_id"], sequence + 1
            outcomes.append((label, "finished"))
        else:
            assert proc.returncode == -signal.SIGKILL, f"{what}: exit {proc.returncode}: {stderr}"
            outcomes.append((label, "killed"))

        # nothing new is a point; what the kill left is reported, not taken for a point
        listing = json.loads(ic_ok("list", repo, "--json").stdout)
        listed = {p["point_id"]: p for ch in listing["chains"] for p in ch}
        assert set(listed) == set(expected), f"{what}: points {set(listed)} != {set(expected)}"
        temps = temporaries(repo)
        assert sorted(listing["leftovers"]) == temps, what
        saw_leftovers |= bool(temps)
        incomplete = {f for inc in listing["incomplete"] for f in inc["files"]}
        # only a split point killed between the renames of its segments can leave files that are not temporaries
        assert not incomplete or split, f"{what}: not a temporary, yet not a point: {listing['incomplete']}"
        assert not incomplete & before, f"{what}: an earlier file is reported incomplete: {listing['incomplete']}"
        point_files = {f for p in listed.values() for f in p["files"]}
        for f in files_in(repo) - point_files - set(temps) - incomplete:
            assert f == MARKER or (f.startswith("locks/") and f.endswith(".lock")), f"{what}: unreported file {f}"
        # every earlier point verifies, and the parent the killed backup read from restores bit-exact
        v = ic("verify", repo, "--json")
        report = json.loads(v.stdout)
        assert {p["point_id"] for p in report["points"]} == set(expected), what
        assert all(p["ok"] for p in report["points"]), f"{what}: {report}"
        assert sorted(report["leftovers"]) == temps, what
        assert v.returncode == (7 if listing["incomplete"] else 0), f"{what}: {v.stdout}"
        if temps:  # and says so in words
            text = ic("verify", repo).stdout
            assert all(f"leftover temporary file {t}" in text for t in temps), text
        assert restore_to(f"{repo}::{latest}", out) == expected[latest], f"{what}: parent restores wrong"
        restored.add(latest)

        # the next backup: the lock of the killed process (of this machine, now gone) is removed, and it says
        # so; only an unreadable lock file (the kill came between its creation and its write) names nobody,
        # and is reported with the command that removes it, never taken over
        had_lock = bool(locks(repo))
        saw_stale_lock |= had_lock
        p = ic("backup", vol, repo, "--json", *split)
        if had_lock and p.returncode != 0:
            line = one_line_error(p, 9)
            assert "stale lock" in line and "unreadable" in line, line
            command = shlex.split(line.partition("remove it with: ")[2])
            assert command[:3] == ["imagechain", "break-lock", str(repo)], line
            ic_ok(*command[1:])
            assert not locks(repo)
            had_lock = False
            p = ic("backup", vol, repo, "--json", *split)
        assert p.returncode == 0, f"{what}: the next backup failed: {p.stderr}"
        res = json.loads(p.stdout)
        removed_locks = [n for n in res["notices"] if n.startswith("removed a stale lock")]
        if had_lock:
            assert len(removed_locks) == 1 and f"left by pid {proc.pid} on " in removed_locks[0], res["notices"]
            assert removed_locks[0].endswith("that process is gone"), removed_locks
        else:
            assert not removed_locks, res["notices"]
        published = [n for n in res["notices"] if n.startswith("published point")]
        if published:  # killed between its renames with every byte written: the point is whole, and published
            assert outcomes[-1][1] == "killed" and len(published) == 1 and temps, (outcomes, res["notices"])
            assert res["parent_id"][:8] in published[0], published
            expected[res["parent_id"]] = want
            sequence += 1
            outcomes[-1] = (label, "killed, published by the next run")
        assert res["kind"] == "incremental" and res["sequence"] == sequence + 1, res
        assert res["changed_blocks"] == (CRASH_SIZE // BS if outcomes[-1][1] == "killed" else 0), res
        for t in temps:
            assert published or any(t in n and "removed" in n for n in res["notices"]), f"{what}: no notice for {t}"
        assert not temporaries(repo) and not locks(repo), what
        expected[res["point_id"]] = want
        latest, sequence = res["point_id"], sequence + 1

    print("kill outcomes:", outcomes)
    killed = [label for label, o in outcomes if o.startswith("killed")]
    assert len(killed) >= 4, f"too few backups were interrupted: {outcomes}"
    assert saw_leftovers and saw_stale_lock, outcomes
    # every point of the chain restores bit-exact (those restored after a kill above are not done again)
    for pid, want in expected.items():
        if pid in restored:
            continue
        assert restore_to(f"{repo}::{pid}", out) == want, f"point {pid[:8]}"
    assert_portable(repo)
    shutil.rmtree(repo)  # over a GiB: not worth keeping in pytest's retained temporary folders
    vol.unlink()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_stop_signals_publish_nothing_and_clean_up(tmp_path: Path, repo: Path, sig: signal.Signals) -> None:
    vol = tmp_path / "vol.img"
    data = os.urandom(96 << 20)
    vol.write_bytes(data)
    first = backup(str(vol), str(repo), codec=CodecParams.parse("none"))
    vol.write_bytes(os.urandom(96 << 20))
    before = files_in(repo)
    proc = subprocess.Popen([exe(), "backup", str(vol), str(repo)], env=dict(os.environ), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    t0 = time.monotonic()
    while proc.poll() is None and new_bytes(repo, before) < 16 << 20:
        assert time.monotonic() - t0 < 60
        time.sleep(0.002)
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert error_lines(err) == [f"imagechain: interrupted ({sig.name}); nothing was published"], err
    assert files_in(repo) == before, "an interrupted backup left files behind (a temporary or its lock)"
    assert not locks(repo)
    # an interrupted restore to a new file leaves neither the file nor its temporary
    target = tmp_path / "out.img"
    proc = subprocess.Popen([exe(), "restore", f"{repo}::default", str(target)], env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    while proc.poll() is None and not list(tmp_path.glob("out.img.tmp-*")):
        assert time.monotonic() - t0 < 60
        time.sleep(0.001)
    time.sleep(0.05)
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=60)
    if proc.returncode == 0:  # it won the race: then what it wrote must be exact
        assert b3(target.read_bytes()) == b3(data)
        target.unlink()
    else:
        assert proc.returncode == 128 + sig and "Traceback" not in err, err
        assert err.strip() == f"imagechain: interrupted ({sig.name}); nothing was written to {target}", err
        assert not target.exists(), "an interrupted restore left a half-written target"
    assert not list(tmp_path.glob("out.img.tmp-*"))
    # over an existing file (--force), an interrupted restore says the target is now partial
    target.write_bytes(b"x" * 4096)
    proc = subprocess.Popen([exe(), "restore", f"{repo}::default", str(target), "--force"], env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    while proc.poll() is None and target.stat().st_size < 32 << 20:
        assert time.monotonic() - t0 < 60
        time.sleep(0.001)
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=60)
    if proc.returncode != 0:
        assert proc.returncode == 128 + sig and "Traceback" not in err, err
        line = err.strip()
        assert line.startswith(f"imagechain: interrupted ({sig.name}); {target} ") and "partial" in line, line
    assert verify(Repository.open(str(repo))).ok and first.point_id[:8] in ic_ok("list", repo).stdout


def test_a_killed_restore_leaves_a_temporary_that_the_next_restore_removes(tmp_path: Path, repo: Path) -> None:
    """kill -9 leaves the new file's temporary (nothing can remove it then); the next restore to that name
    removes it, with a notice, and leaves alone the temporary of a restore still running."""
    from imagechain import pending

    vol = tmp_path / "vol.img"
    data = os.urandom(128 << 20)
    vol.write_bytes(data)
    backup(str(vol), str(repo), codec=CodecParams.parse("none"))
    target = tmp_path / "out.img"
    proc = subprocess.Popen([exe(), "restore", f"{repo}::default", str(target)], env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    t0 = time.monotonic()
    while proc.poll() is None and not [p for p in tmp_path.glob("out.img.tmp-*") if p.stat().st_blocks > 0]:
        assert time.monotonic() - t0 < 60
        time.sleep(0.001)
    proc.kill()
    proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.fail("the restore finished before it could be killed: make the volume bigger")
    (left,) = tmp_path.glob("out.img.tmp-*")
    assert not target.exists()
    fd, running = pending.create(str(target))  # as a restore to the same name still running holds it
    try:
        p = ic_ok("restore", f"{repo}::default", target)
        notices = [ln for ln in p.stderr.splitlines() if ln.startswith("notice: ")]
        assert notices == [f"notice: removed {left} (128.0 MiB), left by a restore that did not finish"], p.stderr
        assert b3(target.read_bytes()) == b3(data)
        assert sorted(tmp_path.glob("out.img*")) == sorted([target, Path(running)])
    finally:
        os.close(fd)
    target.unlink()
    p = ic_ok("restore", f"{repo}::default", target, "--json")
    assert json.loads(p.stdout)["notices"] == [f"removed {running} (0 B), left by a restore that did not finish"]
    assert sorted(tmp_path.glob("out.img*")) == [target]
    # a restore over the existing file (in place, no temporary of its own) removes one too
    orphan = tmp_path / "out.img.tmp-0badc0de"
    orphan.write_bytes(bytes(4096))
    p = ic_ok("restore", f"{repo}::default", target, "--delta")
    assert f"notice: removed {orphan} (4.0 KiB), left by a restore that did not finish" in p.stderr.splitlines()
    assert sorted(tmp_path.glob("out.img*")) == [target]


def test_a_delta_restore_reads_on_after_short_reads(tmp_path: Path, repo: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A read may return less than asked without being at the end (FUSE, network filesystems): a delta
    restore reads on, and never takes the part it did not read for zeros."""
    from imagechain.engine import restore as engine

    vol = tmp_path / "vol.img"
    data = write_volume(vol, 4 << 20, seed=5, zero_fraction=0.5)
    backup(str(vol), str(repo))
    zero_blocks = [b for b in range(len(data) // BS) if not any(data[b * BS : (b + 1) * BS])]
    assert len(zero_blocks) >= 3
    target = tmp_path / "target.img"
    damaged = bytearray(data)
    for b in zero_blocks[:3]:
        damaged[b * BS + 5000 : b * BS + 5100] = b"\xee" * 100  # past what one short read returns
    target.write_bytes(bytes(damaged))
    real = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        short = os.readlink(f"/proc/self/fd/{fd}") == str(target)
        return real(fd, min(n, 4096) if short else n, offset)

    res = open_point(f"{repo}::default")
    with monkeypatch.context() as mp:
        mp.setattr(engine.os, "pread", pread)
        r = restore(res.repo, res.point, str(target), delta=True)
    assert target.read_bytes() == data
    assert r.written_blocks == 3, r  # the three zero blocks, zeroed; every data block read whole and equal


def test_a_target_appearing_while_restoring_keeps_the_restored_volume(tmp_path: Path, repo: Path) -> None:
    """Never over a file that appeared meanwhile; the restored volume is kept under a name the next restore's
    sweep of leftovers does not take for one."""
    vol = tmp_path / "vol.img"
    data = write_volume(vol, 4 << 20, seed=4)
    backup(str(vol), str(repo))
    target = tmp_path / "out.img"
    error, kept = restore_as_target_appears(f"{repo}::default", target)
    assert error.endswith(f"the restored volume is left as {kept}") and kept.read_bytes() == data
    target.unlink()
    assert restore_to(f"{repo}::default", target) == b3(data)
    assert kept.read_bytes() == data and not list(tmp_path.glob("out.img.tmp-*"))


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.15, 0.3])
def test_a_stop_in_the_first_instant_is_one_line(tmp_path: Path, repo: Path, delay: float) -> None:
    vol = tmp_path / "vol.img"
    write_volume(vol, 4 << 20, seed=1)
    proc = subprocess.Popen([exe(), "backup", str(vol), str(repo)], env=dict(os.environ), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=60)
    if "Traceback" in err:
        # the interpreter's own start-up (site, finding the package), after it set its SIGINT handler and before
        # the first line of imagechain's ran: that one is Python's; a frame in the package would be ours
        assert proc.returncode == -signal.SIGINT and str(Path(imagechain.__file__).parent) not in err, err
        assert err.rstrip().endswith("KeyboardInterrupt") and files_in(repo) == {MARKER}, err
        return
    if proc.returncode == -signal.SIGINT:  # before the interpreter ran any code: like any program, nothing done
        assert err == "" and files_in(repo) == {MARKER}, err
    elif proc.returncode != 0:
        assert proc.returncode == 130, (proc.returncode, err)
        *notices, line = err.strip().splitlines()  # notices the run printed before the stop may come first
        assert line.startswith("imagechain: interrupted (SIGINT)"), line
        assert all(n.startswith("notice: ") for n in notices), err
    assert not locks(repo) and not temporaries(repo) if repo.exists() else True


@pytest.mark.parametrize("thread", ["lock-refresh", "image-writer"])
def test_a_stop_inside_a_helper_thread_s_start(tmp_path: Path, repo: Path, thread: str) -> None:
    """A stop signal inside Thread.start() left a thread object that never started; joining it on the way
    out raised "cannot join thread before it is started" over the stop (seen once in CI, with SIGINT at
    0.3 s, for the lock's refresh thread)."""
    import threading

    class StoppedInStart(threading.Thread):
        def start(self) -> None:
            if self.name == thread:
                raise KeyboardInterrupt
            super().start()

    vol = tmp_path / "vol.img"
    write_volume(vol, 4 << 20, seed=1)
    with pytest.MonkeyPatch.context() as mp:  # its own: monkeypatch.undo() would undo conftest's isolation too
        mp.setattr(threading, "Thread", StoppedInStart)
        with pytest.raises(KeyboardInterrupt):
            backup(str(vol), str(repo), cache_dir=None)
    assert not locks(repo) and not temporaries(repo)
    assert backup(str(vol), str(repo), cache_dir=None).kind == "full"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_stop_while_the_signal_routing_is_imported_is_one_line(sig: signal.Signals) -> None:
    """The console script's module notes a stop signal from its first line; run() then stops at once."""
    code = ("import os, sys, imagechain.entry as e\n"
            f"os.kill(os.getpid(), {int(sig)})\n"
            "sys.argv = ['imagechain', '--version']\n"
            "e.run()\n")  # fmt: skip
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 128 + sig, (p.returncode, p.stderr)
    assert p.stderr == f"imagechain: interrupted ({sig.name}) while starting; nothing was done\n", p.stderr
    assert p.stdout == "", "it went on to run the command"


def test_a_stop_during_publishing_waits_for_the_last_rename(tmp_path: Path, repo: Path) -> None:
    """A signal while a split point's segments are renamed takes effect after the last one: the point is
    whole, and the message says it was published."""
    from imagechain import interrupts
    from imagechain.stores import local

    vol = tmp_path / "vol.img"
    vol.write_bytes(os.urandom(5 << 20))
    orig = local._LocalWriter.commit
    calls = []

    def commit(self: local._LocalWriter) -> None:
        calls.append(self.name)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # delivered at once: in the middle of the renames
        orig(self)

    saved = {s: signal.getsignal(s) for s in interrupts.STOP_SIGNALS}
    interrupts.install()
    try:
        local._LocalWriter.commit = commit  # type: ignore[method-assign]
        with pytest.raises(interrupts.Stopped) as e:
            backup(str(vol), str(repo), split_size=1 << 20)
    finally:
        local._LocalWriter.commit = orig  # type: ignore[method-assign]
        for s, h in saved.items():
            signal.signal(s, h)
    assert e.value.signum == signal.SIGTERM and "published" in e.value.what, e.value.what
    assert len(calls) >= 5
    cat = Repository.open(str(repo)).catalog()
    assert len(cat.points) == 1 and not cat.problems and not cat.leftovers and not locks(repo)
    assert restore_to(f"{repo}::default", tmp_path / "out.img") == b3(vol.read_bytes())


# == 2. damage to image files ========================================================================


@dataclass
class Chain:
    repo: Path
    files: dict[str, Path]  # "full"/"incr" -> image file
    ids: dict[str, str]
    volumes: dict[str, bytes]
    changed: list[int]  # blocks the incremental point replaced

    def rel(self, which: str) -> str:
        return self.files[which].relative_to(self.repo).as_posix()


def make_chain(tmp_path: Path, repo: Path) -> Chain:
    vol = tmp_path / "vol.img"
    v0 = bytearray(write_volume(vol, 4 << 20, seed=11))
    changed = [3, 17, 40]
    rnd = random.Random(3)
    for b in changed:  # text between two zero blocks: stored alone in the full point, not in a group
        v0[(b - 1) * BS : (b + 2) * BS] = bytes(BS) + ((b"text %d " % b) * BS)[:BS] + bytes(BS)
    vol.write_bytes(v0)
    r0 = backup(str(vol), str(repo))
    v1 = bytearray(v0)
    for b in changed:
        v1[b * BS : (b + 1) * BS] = rnd.randbytes(BS)
    vol.write_bytes(v1)
    r1 = backup(str(vol), str(repo))
    assert (r0.kind, r1.kind, r1.changed_blocks) == ("full", "incremental", len(changed))
    return Chain(repo, {"full": repo / r0.files[0], "incr": repo / r1.files[0]},
                 {"full": r0.point_id, "incr": r1.point_id}, {"full": bytes(v0), "incr": bytes(v1)},
                 changed)  # fmt: skip


def sharing(idx: np.ndarray, e: np.ndarray) -> list[int]:
    """The blocks stored in the payload of entry e: its group's (codec 3), else e's own."""
    if int(e["codec"]) != spec.PAYLOAD_ZSTD_GROUP:
        return [int(e["block"])]
    return idx[(idx["offset"] == e["offset"]) & (idx["kind"] == spec.BLOCK_DATA)]["block"].tolist()


def layout(path: Path) -> dict[str, tuple[int, int]]:
    """File ranges of every part of a single-segment image file (docs/FORMAT.md); checks they tile it."""
    raw = path.read_bytes()
    seg = spec.SEGMENT_HEADER_SIZE
    hlen = spec.PointHeader.length_from_prefix(raw[seg : seg + 16])
    ft = spec.Footer.unpack(raw[-spec.FOOTER_SIZE :], path.name)
    parts = {
        "segment header": (0, seg),
        "point header": (seg, seg + hlen),
        "payloads": (seg + hlen, seg + ft.index_offset),
        "index": (seg + ft.index_offset, seg + ft.index_offset + ft.index_length),
        "frame directory": (seg + ft.directory_offset, seg + ft.summary_offset),
        "summary": (seg + ft.summary_offset, seg + ft.summary_offset + ft.summary_length),
        "footer": (len(raw) - spec.FOOTER_SIZE, len(raw)),
    }
    order = list(parts.values())
    assert all(a[1] == b[0] for a, b in itertools.pairwise(order)) and order[-1][1] == len(raw), parts
    assert ft.logical_length == len(raw) - seg
    return parts


def damage(chain: Chain, which: str, how: str) -> list[int] | None:
    """Damage one image file; returns the blocks stored in the payload it hit (a group holds several: any
    of them may then be the one whose bytes changed)."""
    path = chain.files[which]
    parts = layout(path)
    if how == "payload":
        res = open_point(str(path))
        with PointReader(res.repo.store, res.point) as r:
            idx = r.index()
        data = idx[idx["kind"] == spec.BLOCK_DATA]
        # a block the incremental point still takes from the full point (or any block of the incremental)
        usable = [e for e in data if which == "incr" or not set(sharing(idx, e)) & set(chain.changed)]
        e = usable[len(usable) // 2]
        flip(path, spec.SEGMENT_HEADER_SIZE + int(e["offset"]) + int(e["length"]) // 2)
        return sharing(idx, e)
    if how == "truncated":
        os.truncate(path, path.stat().st_size // 2)
    elif how == "truncated to 10 bytes":
        os.truncate(path, 10)
    elif how == "segment magic":
        flip(path, 0)
    elif how == "footer magic":
        flip(path, parts["footer"][1] - 1)
    elif how == "point header":
        flip(path, parts["point header"][0] + 144)  # created_us
    else:
        lo, hi = parts[how]
        flip(path, (lo + hi) // 2)
    return None


DAMAGE = ["payload", "index", "summary", "point header", "footer", "footer magic", "segment header",
          "segment magic", "truncated", "truncated to 10 bytes"]  # fmt: skip


@pytest.mark.parametrize("which", ["full", "incr"])
@pytest.mark.parametrize("how", DAMAGE)
def test_damage_is_detected_named_and_never_restored(tmp_path: Path, repo: Path, how: str, which: str) -> None:
    chain = make_chain(tmp_path, repo)
    hit = damage(chain, which, how)
    rel, name = chain.rel(which), chain.files[which].name
    damaged_bytes = chain.files[which].read_bytes()

    # library verify names the file (and the block); a damaged summary carries no data: a notice only
    rep = verify(Repository.open(str(repo)))
    if how == "summary":
        assert rep.ok, rep
        mine = next(p for p in rep.points if p.point_id == chain.ids[which])
        assert any(rel in n and "summary" in n for n in mine.notices), mine.notices
        v = ic("verify", repo)
        assert v.returncode == 0 and any(rel in line and "notice" in line for line in v.stdout.splitlines()), v.stdout
    else:
        assert not rep.ok
        texts = [t for p in rep.points for t in p.problems] + rep.incomplete
        assert any(rel in t for t in texts), texts
        block = None
        if hit is not None:
            mine = next(p for p in rep.points if p.point_id == chain.ids[which])
            assert mine.bad_blocks and set(mine.bad_blocks) <= set(hit) and not mine.ok, (mine.bad_blocks, hit)
            block = mine.bad_blocks[0]
            assert any(rel in t and str(block) in t for t in mine.problems), mine.problems
        # the CLI too, with exit code 7
        v = ic("verify", repo)
        assert v.returncode == 7, v.stdout + v.stderr
        assert "Traceback" not in v.stdout + v.stderr
        assert any(rel in line for line in v.stdout.splitlines()), v.stdout
        if block is not None:
            assert any(rel in line and str(block) in line for line in v.stdout.splitlines()), v.stdout
        if which == "full":  # verifying the later point alone checks what it is restored from
            v = ic("verify", f"{repo}::{chain.ids['incr'][:8]}")
            assert v.returncode == 7 and name in v.stdout and "Traceback" not in v.stderr, v.stdout + v.stderr

    # list still shows everything: a damaged file is reported, never hides the rest of the repository
    listing = json.loads(ic_ok("list", repo, "--json").stdout)
    rows = {p["point_id"]: p for ch in listing["chains"] for p in ch}
    if how in ("payload", "index", "summary"):  # still a whole point (its data is checked by verify)
        assert set(rows) == set(chain.ids.values())
    else:
        assert set(rows) == set(chain.ids.values()) - {chain.ids[which]}
        # a footer that was written once makes it a damaged point (listed by id); without one it is
        # an unfinished write, and a file without a readable segment header belongs to no point
        unusable = listing["incomplete"] + listing["damaged"]
        assert any(rel in inc["files"] for inc in unusable), unusable
        if how in ("point header", "footer"):
            assert [d["point_id"] for d in listing["damaged"]] == [chain.ids[which]], listing
        if how in ("footer magic", "truncated"):
            assert not listing["damaged"] and "incomplete" in listing["incomplete"][0]["problem"], listing
    if how == "summary":
        assert rel in rows[chain.ids[which]]["summary_problem"]

    block = None if hit is None or how == "summary" else block
    # restoring the damaged point, or one that depends on it, fails with one line and writes nothing
    dependants = ["full", "incr"] if which == "full" else ["incr"]
    for k, point in enumerate(dependants):
        target = tmp_path / f"restored-{k}.img"
        address = str(chain.files[point]) if point == which else f"{repo}::{chain.ids[point][:8]}"
        if how == "summary":  # restore does not need the summary; what it writes must still be exact
            ic_ok("restore", address, target)
            assert target.read_bytes() == chain.volumes[point]
            target.unlink()
            continue
        with pytest.raises(ImagechainError) as exc:
            res = open_point(address)
            restore(res.repo, res.point, str(target))
        assert not target.exists(), f"{how}: a half-restored target was left behind"
        line = one_line_error(ic("restore", address, target), exc.value.exit_code)
        assert not target.exists()
        if point != which:  # a dependant names the damaged parent
            assert name in line or chain.ids[which][:8] in line, line
            assert exc.value.exit_code == 7
        if block is not None or how == "index":
            assert rel in line and exc.value.exit_code == 7, line
        if block is not None:
            assert f"block {block}" in line, line
    if which == "incr":  # damage to a child does not touch its parent
        ic_ok("restore", f"{repo}::{chain.ids['full'][:8]}", tmp_path / "parent.img")
        assert (tmp_path / "parent.img").read_bytes() == chain.volumes["full"]

    # the next backup of the chain leaves the damaged file alone, for a person to inspect
    with contextlib.suppress(ImagechainError):
        backup(str(tmp_path / "vol.img"), str(repo))
    assert chain.files[which].read_bytes() == damaged_bytes


def damage_full_block(chain: Chain, superseded: bool) -> list[int]:
    """Flip a byte in the payload of DATA blocks of the full point that the incremental stored anew
    (superseded) or still takes from the full point; returns the blocks that payload holds (byte 5 is in
    a zstd frame's header: a group that loses it fails as a whole)."""
    res = open_point(str(chain.files["full"]))
    with PointReader(res.repo.store, res.point) as r:
        idx = r.index()
    e = next(e for e in idx if e["kind"] == spec.BLOCK_DATA and (
        set(sharing(idx, e)) <= set(chain.changed) if superseded else not set(sharing(idx, e)) & set(chain.changed)))
    flip(chain.files["full"], spec.SEGMENT_HEADER_SIZE + int(e["offset"]) + 5)
    return sharing(idx, e)


def test_damaged_block_superseded_by_the_child_only_fails_the_parent(tmp_path: Path, repo: Path) -> None:
    chain = make_chain(tmp_path, repo)
    [block] = damage_full_block(chain, superseded=True)
    rep = verify(Repository.open(str(repo)))
    bad = {p.point_id: p.bad_blocks for p in rep.points}
    assert bad == {chain.ids["full"]: [block], chain.ids["incr"]: []}
    ic_ok("restore", f"{repo}::{chain.ids['incr'][:8]}", tmp_path / "incr.img")
    assert (tmp_path / "incr.img").read_bytes() == chain.volumes["incr"]
    line = one_line_error(ic("restore", f"{repo}::{chain.ids['full'][:8]}", tmp_path / "full.img"), 7)
    assert chain.rel("full") in line and f"block {block}" in line
    assert not (tmp_path / "full.img").exists()
    assert {p.point_id: p.ok for p in rep.points} == {chain.ids["full"]: False, chain.ids["incr"]: True}


def test_a_damaged_block_the_child_still_uses_fails_the_child_too(tmp_path: Path, repo: Path) -> None:
    """verify says which later points cannot be restored because of a damaged block of an earlier one."""
    chain = make_chain(tmp_path, repo)
    hit = damage_full_block(chain, superseded=False)
    rep = verify(Repository.open(str(repo)))
    mine = {p.point_id: p for p in rep.points}
    assert mine[chain.ids["full"]].bad_blocks == hit
    block = hit[0]
    child = mine[chain.ids["incr"]]
    assert not child.ok and child.bad_blocks == [], child
    assert any("cannot be restored" in t and str(block) in t and chain.ids["full"][:8] in t
               for t in child.problems), child.problems  # fmt: skip
    v = ic("verify", repo)
    assert v.returncode == 7 and v.stdout.count("FAILED") == 2, v.stdout
    one_line_error(ic("restore", f"{repo}::{chain.ids['incr'][:8]}", tmp_path / "incr.img"), 7)


def _remade_full(tmp_path: Path, chain: Chain, monkeypatch: pytest.MonkeyPatch, same_ids: bool) -> Path:
    """A full point of slightly different data, made in another repository; with same_ids it carries the
    point id and chain id of the chain's full point (a re-made backup), else its own (another chain)."""
    other_repo = tmp_path / "other-repo"
    vol = tmp_path / "vol.img"
    data = bytearray(chain.volumes["full"])
    data[100_000:100_010] = b"0123456789"
    vol.write_bytes(data)
    with monkeypatch.context() as mp:
        if same_ids:
            chain_id = open_point(str(chain.files["full"])).point.header.chain_id.hex
            ids = iter([uuid.UUID(chain_id), uuid.UUID(chain.ids["full"])])
            mp.setattr(uuid, "uuid4", lambda: next(ids))
        r = backup(str(vol), str(other_repo), init=True)
    assert (r.point_id == chain.ids["full"]) == same_ids
    return other_repo / r.files[0]


@pytest.mark.parametrize("same_ids", [True, False], ids=["re-made with the same ids", "from another chain"])
def test_replaced_parent_is_named_as_not_the_state_the_child_was_made_from(
    tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch, same_ids: bool
) -> None:
    chain = make_chain(tmp_path, repo)
    replacement = _remade_full(tmp_path, chain, monkeypatch, same_ids)
    os.replace(replacement, chain.files["full"])
    full_name, incr8 = chain.files["full"].name, chain.ids["incr"][:8]
    rep = verify(Repository.open(str(repo)))
    child = next(p for p in rep.points if p.point_id == chain.ids["incr"])
    assert not child.ok and any(full_name in t for t in child.problems), child.problems
    assert any("not the state it was made from" in t or "not the point" in t for t in child.problems)
    line = one_line_error(ic("restore", f"{repo}::{incr8}", tmp_path / "out.img"), 7)
    assert full_name in line and chain.ids["full"][:8] in line, line
    assert "replaced" in line, line
    assert not (tmp_path / "out.img").exists()
    v = ic("verify", repo)
    assert v.returncode == 7 and full_name in v.stdout


def test_missing_parent_is_named(tmp_path: Path, repo: Path) -> None:
    chain = make_chain(tmp_path, repo)
    chain.files["full"].unlink()
    full_name, full8 = chain.files["full"].name, chain.ids["full"][:8]
    rep = verify(Repository.open(str(repo)))
    assert [p.point_id for p in rep.points] == [chain.ids["incr"]] and not rep.ok
    assert any(full8 in t and full_name in t and "missing" in t for t in rep.points[0].problems)
    line = one_line_error(ic("restore", f"{repo}::default", tmp_path / "out.img"), 7)
    assert full8 in line and full_name in line and "missing" in line, line
    assert not (tmp_path / "out.img").exists()
    v = ic("verify", repo)
    assert v.returncode == 7 and full_name in v.stdout


# == 3. bad input ===================================================================================


@pytest.fixture
def small_vol(tmp_path: Path) -> tuple[Path, bytes]:
    vol = tmp_path / "small.img"
    return vol, write_volume(vol, 1 << 20, seed=5)


@contextlib.contextmanager
def tmpfs(mountpoint: Path, options: str) -> Iterator[Path]:
    need_root()
    need_tool("mount", "umount")
    mountpoint.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mountpoint)], capture_output=True,
                       text=True)  # fmt: skip
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@pytest.mark.parametrize("kind", ["missing", "directory", "char device", "fifo", "empty"])
def test_bad_source(tmp_path: Path, repo: Path, kind: str) -> None:
    src = {"missing": tmp_path / "nope.img", "directory": tmp_path, "char device": Path("/dev/null"),
           "fifo": tmp_path / "fifo", "empty": tmp_path / "empty.img"}[kind]  # fmt: skip
    if kind == "fifo":
        os.mkfifo(src)
    if kind == "empty":
        src.write_bytes(b"")
    line = one_line_error(ic("backup", src, repo, timeout=30), 3)
    assert str(src) in line or src.name in line, line
    assert not any(f.endswith(".icimg") for f in (files_in(repo) if repo.exists() else ()))


def test_unreadable_source(tmp_path: Path, repo: Path, small_vol: tuple[Path, bytes]) -> None:
    """A file without read permission: root reads every file, so run without CAP_DAC_OVERRIDE."""
    need_tool("setpriv")
    src = small_vol[0]
    os.chmod(src, 0)
    p = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search", exe(), "backup", str(src),
                        str(repo)], capture_output=True, text=True, env=dict(os.environ), timeout=60)  # fmt: skip
    line = one_line_error(p, 3)
    assert "Permission denied" in line and str(src) in line, line
    assert files_in(repo) == {MARKER}


def test_repository_not_writable(tmp_path: Path, small_vol: tuple[Path, bytes]) -> None:
    vol, content = small_vol
    (tmp_path / "plain-file").write_bytes(b"x")
    line = one_line_error(ic("backup", vol, tmp_path / "plain-file" / "repo"), 4)
    assert "plain-file" in line
    line = one_line_error(ic("backup", vol, tmp_path / "plain-file"), 4)
    assert "not a folder" in line
    one_line_error(ic("list", tmp_path / "no-such-repo"), 4)
    with tmpfs(tmp_path / "ro", "ro,size=4m") as ro:
        line = one_line_error(ic("backup", vol, ro / "repo"), 4)
        assert str(ro / "repo") in line
    with tmpfs(tmp_path / "rw", "size=8m") as rw:
        repo = rw / "repo"
        first = json.loads(ic_ok("backup", vol, repo, "--init", "--json").stdout)
        subprocess.run(["mount", "-o", "remount,ro", str(rw)], check=True)
        vol.write_bytes(content[:-BS] + bytes(BS))
        one_line_error(ic("backup", vol, repo), 4)
        assert [p["point_id"] for ch in json.loads(ic_ok("list", repo, "--json").stdout)["chains"] for p in ch] \
            == [first["point_id"]]  # fmt: skip
        ic_ok("verify", repo)
        ic_ok("restore", f"{repo}::default", tmp_path / "out.img")
        assert (tmp_path / "out.img").read_bytes() == content


def test_full_disk(tmp_path: Path, small_vol: tuple[Path, bytes]) -> None:
    vol, small = small_vol
    with tmpfs(tmp_path / "usb", "size=8m") as mnt:
        repo = mnt / "repo"
        first = json.loads(ic_ok("backup", vol, repo, "--init", "--json", "--compression", "none").stdout)
        big = os.urandom(32 << 20)
        vol.write_bytes(big)
        line = one_line_error(ic("backup", vol, repo), 10)
        assert "full" in line or "space" in line.lower(), line
        left = sorted(files_in(repo) - {MARKER, *first["files"]})
        assert left == [], f"left behind after a full disk: {left}"
        listing = json.loads(ic_ok("list", repo, "--json").stdout)
        assert [p["point_id"] for ch in listing["chains"] for p in ch] == [first["point_id"]]
        assert listing["incomplete"] == [] and listing["leftovers"] == []
        assert "1 point(s) checked, 0 problem(s)" in ic_ok("verify", repo).stdout
        ic_ok("restore", f"{repo}::default", tmp_path / "out.img")
        assert (tmp_path / "out.img").read_bytes() == small
        # the space of the failed attempt was given back: a small backup fits again
        vol.write_bytes(small[:BS] + bytes(BS) + small[2 * BS :])
        again = json.loads(ic_ok("backup", vol, repo, "--json").stdout)
        assert again["kind"] == "incremental" and again["changed_blocks"] == 1
        assert_portable(repo)


def test_a_full_disk_never_damages_what_is_there(tmp_path: Path) -> None:
    """consolidate and prune in a full repository, replicate, restore and export onto a full disk: exit 10
    with one line, nothing left behind, the space given back, and every point still verifies and restores
    bit for bit (what replicate copied before the disk filled too)."""
    vol, data, volumes = tmp_path / "vol.img", bytearray(random.Random(8).randbytes(4 << 20)), []
    with tmpfs(tmp_path / "usb", "size=16m") as usb:
        repo = usb / "repo"
        for i in range(3):
            data[i << 20 : (i + 1) << 20] = random.Random(9 + i).randbytes(1 << 20)
            vol.write_bytes(data)
            ic_ok("backup", vol, repo, "--compression", "none", *(["--init"] if i == 0 else []))
            volumes.append(bytes(data))
        st = os.statvfs(usb)
        (usb / "filler").write_bytes(bytes(st.f_bavail * st.f_frsize - (2 << 20)))  # 2 MiB left: < one point
        before, free = files_in(repo), os.statvfs(usb).f_bavail
        one_line_error(ic("consolidate", f"{repo}::default@2"), 10)  # a 4 MiB synthetic full
        one_line_error(ic("prune", repo, "--keep-last", "1"), 10)
        assert files_in(repo) == before and os.statvfs(usb).f_bavail == free
        with tmpfs(tmp_path / "small", "size=5m") as small:
            one_line_error(ic("replicate", repo, small / "copy", "--init"), 10)
            copied = json.loads(ic_ok("list", small / "copy", "--json").stdout)["chains"]
            assert len(copied) == 1 and 1 <= len(copied[0]) < 3, copied
            assert "0 problem(s)" in ic_ok("verify", small / "copy").stdout
            one_line_error(ic("restore", f"{repo}::default", small / "out.img"), 10)
            if shutil.which("qemu-img"):
                one_line_error(ic("export", f"{repo}::default", small / "out.qcow2", "--format", "qcow2"), 10)
            assert sorted(os.listdir(small)) == ["copy"]
        assert "3 point(s) checked, 0 problem(s)" in ic_ok("verify", repo).stdout
        for i, v in enumerate(volumes):
            ic_ok("restore", f"{repo}::default@{i}", tmp_path / "out.img", "--force")
            assert (tmp_path / "out.img").read_bytes() == v


@pytest.mark.parametrize("args", [["--block-size", "3000"], ["--block-size", "2K"], ["--block-size", "32M"],
                                  ["--block-size", "0"], ["--block-size", "lots"], ["--split-size", "100K"],
                                  ["--split-size", "99999999999999999T"],  # past the header's u64: struct.error
                                  ["--compression", "gzip"], ["--compression", "zstd:99"]])  # fmt: skip
def test_bad_arguments(tmp_path: Path, repo: Path, small_vol: tuple[Path, bytes], args: list[str]) -> None:
    line = one_line_error(ic("backup", small_vol[0], repo, *args), 2)
    what = {"--block-size": "block size", "--split-size": "split size", "--compression": "zstd"}[args[0]]
    assert args[1] in line or what in line, line
    assert files_in(repo) == {MARKER}, "a bad argument must be refused before anything is written"


def test_bad_restore_targets(tmp_path: Path, repo: Path, small_vol: tuple[Path, bytes]) -> None:
    vol, content = small_vol
    backup(str(vol), str(repo))
    existing = tmp_path / "existing.img"
    existing.write_bytes(b"precious" * 1000)
    line = one_line_error(ic("restore", f"{repo}::default", existing), 8)
    assert "--force" in line and existing.read_bytes() == b"precious" * 1000
    one_line_error(ic("restore", f"{repo}::default", tmp_path), 8)
    one_line_error(ic("restore", f"{repo}::default", tmp_path / "no-dir" / "x.img"), 8)
    for nothing in ("", f"{tmp_path}/new.img/"):  # names no file: said before anything is written
        line = one_line_error(ic("restore", f"{repo}::default", nothing), 8)
        assert line == f"imagechain: error: restore target {nothing!r} names no file: give a file or a block device"
    assert not [p for p in tmp_path.iterdir() if "tmp-" in p.name] and not list(Path.cwd().glob(".tmp-*"))
    # a dangling symbolic link: said at once, not after the whole volume was written beside it
    link = tmp_path / "link.img"
    link.symlink_to(tmp_path / "nowhere.img")
    line = one_line_error(ic("restore", f"{repo}::default", link), 8)
    assert f"is a symbolic link to {tmp_path / 'nowhere.img'}, which does not exist" in line, line
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("link.img", "nowhere"))) == ["link.img"]
    # a disk that is not attached: never a new file under /dev (devtmpfs: memory), reported as restored
    missing = f"/dev/imagechain-test-{os.urandom(4).hex()}"
    line = one_line_error(ic("restore", f"{repo}::default", missing), 8)
    assert line.endswith("no such device is attached (a new file is never made under /dev)"), line
    assert not [n for n in os.listdir("/dev") if n.startswith(os.path.basename(missing))]
    # a block device smaller than the volume
    need_root()
    image = tmp_path / "small-disk.img"
    image.write_bytes(bytes(256 << 10))
    with loop_device(image) as dev:
        line = one_line_error(ic("restore", f"{repo}::default", dev, "--force"), 8)
        assert dev in line and str(len(content)) in line, line
    assert image.read_bytes() == bytes(256 << 10), "the too-small device was written to"


def test_unknown_and_ambiguous_points(tmp_path: Path, repo: Path, small_vol: tuple[Path, bytes],
                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    vol, _ = small_vol
    backup(str(vol), str(repo))
    out = tmp_path / "out.img"
    for address in ("nosuchchain", "deadbeef", "default@5", "default@-3", "nohost/small.img/default"):
        line = one_line_error(ic("restore", f"{repo}::{address}", out), 5)
        assert address.partition("@")[0] in line, line
    one_line_error(ic("info", tmp_path / "not-an-image.icimg"), 5)
    one_line_error(ic("restore", f"{repo}::default@yesterdayish", out), 2)
    one_line_error(ic("info", f"{tmp_path / 'no-repo'}::default"), 4)
    # two chains of one source: an address that names no chain, or the repository alone, is ambiguous
    backup(str(vol), str(repo), chain="other")
    for address in (f"{repo}::", str(repo)):
        line = one_line_error(ic("restore", address, out), 6)
        assert "small.img/default" in line and "small.img/other" in line, line
    # a chain name that two sources have is ambiguous until the source is named
    vol2 = tmp_path / "second.img"
    write_volume(vol2, 1 << 20, seed=6)
    backup(str(vol2), str(repo))
    line = one_line_error(ic("restore", f"{repo}::default", out), 6)
    assert "small.img/default" in line and "second.img/default" in line, line
    assert json.loads(ic_ok("info", f"{repo}::second.img/default", "--json").stdout)["source"] == "second.img"
    # two points whose ids share their first 4 hex digits
    with monkeypatch.context() as mp:
        mp.setattr(uuid, "uuid4", lambda: uuid.UUID("abcd" + os.urandom(14).hex()))
        third = [backup(str(vol), str(repo), chain="third").point_id for _ in range(2)]
    line = one_line_error(ic("restore", f"{repo}::abcd", out), 6)
    # (the chain's id starts with abcd too: the address is ambiguous with it as well)
    assert "abcd" in line and all(p[:8] in line for p in third), line
    assert not out.exists()


def test_concurrent_backups_of_one_chain(tmp_path: Path, repo: Path) -> None:
    vol = tmp_path / "vol.img"
    vol.write_bytes(os.urandom(96 << 20))
    proc = subprocess.Popen([exe(), "backup", str(vol), str(repo), "--compression", "none"], env=dict(os.environ),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    stopped = False
    try:
        t0 = time.monotonic()
        while not locks(repo):
            assert proc.poll() is None, f"the first backup ended before taking its lock: {proc.stderr}"
            assert time.monotonic() - t0 < 30
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGSTOP)  # hold it mid-backup, lock taken
        stopped = True
        assert locks(repo) and proc.poll() is None, "the first backup finished before it could be held"
        line = one_line_error(ic("backup", vol, repo), 9)
        assert f"pid {proc.pid}" in line and "held by" in line, line
        lock_id = locks(repo)[0].stem
        one_line_error(ic("break-lock", repo, lock_id), 1)  # a live lock is not removed without --force
        assert locks(repo)
        other = json.loads(ic_ok("backup", vol, repo, "--chain", "other", "--json").stdout)
        assert other["kind"] == "full" and other["chain"] == "other"
    finally:
        if stopped:
            os.kill(proc.pid, signal.SIGCONT)
        _out, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert not locks(repo)
    listing = json.loads(ic_ok("list", repo, "--json").stdout)
    assert sorted(ch[0]["chain"] for ch in listing["chains"]) == ["default", "other"]
    ic_ok("verify", repo)
    for chain in ("default", "other"):
        assert restore_to(f"{repo}::{chain}", tmp_path / "out.img") == b3(vol.read_bytes())


def test_the_next_backup_heals_a_chain_that_verify_found_damaged(tmp_path: Path, repo: Path) -> None:
    """verify records the damaged blocks; the next incremental stores them anew even though the volume
    did not change there, so the new point (and the chain from it on) restores bit-exact again."""
    chain = make_chain(tmp_path, repo)
    hit = damage_full_block(chain, superseded=False)
    v = ic("verify", repo)
    assert v.returncode == 7 and "stores them anew" in v.stdout, v.stdout
    vol = tmp_path / "vol.img"
    vol.write_bytes(chain.volumes["incr"])  # the volume as at the incremental: nothing changed since
    healed = json.loads(ic_ok("backup", vol, repo, "--json").stdout)
    assert healed["changed_blocks"] == len(hit) and healed["stored_bytes"] > 0, (healed, hit)
    assert any("anew" in n and chain.ids["full"][:8] in n for n in healed["notices"]), healed["notices"]
    assert restore_to(f"{repo}::{healed['point_id'][:8]}", tmp_path / "healed.img") == b3(chain.volumes["incr"])
    rep = verify(Repository.open(str(repo)))
    ok = {p.point_id: p.ok for p in rep.points}
    assert ok == {chain.ids["full"]: False, chain.ids["incr"]: False, healed["point_id"]: True}, ok
    again = json.loads(ic_ok("backup", vol, repo, "--json").stdout)  # healed once: not stored again
    assert again["changed_blocks"] == 0, again
    listing = json.loads(ic_ok("list", repo, "--json").stdout)  # list knows what verify found
    rows = {p["point_id"]: p for ch in listing["chains"] for p in ch}
    assert not rows[chain.ids["full"]]["restorable"] and "damaged block" in rows[chain.ids["full"]][
        "not_restorable_because"]  # fmt: skip
    assert not rows[chain.ids["incr"]]["restorable"] and chain.ids["full"][:8] in rows[chain.ids["incr"]][
        "not_restorable_because"]  # fmt: skip
    assert rows[healed["point_id"]]["restorable"] and rows[again["point_id"]]["restorable"]
    assert "not restorable" in ic_ok("list", repo).stdout
