"""Low impact: what a backup may take from the machine. Priorities are read back from the kernel in a
process of their own (they would otherwise stay on the test process); the rate limiter is checked on an
injected clock; the page cache a backup read is dropped behind it (fincore); a bounded buffer bounds
the backup's memory."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from imagechain.engine.backup import backup
from imagechain.errors import UsageError
from imagechain.limits import Limits, RateLimiter, io_priority, pieces, usable_cpus

from .conftest import exe, need_tool, write_volume

MiB = 1 << 20


def run_py(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    return out.stdout.strip()


def test_io_and_cpu_priority_reach_every_pipeline_thread() -> None:
    """The backup's threads run idle-class I/O at nice 10; the caller's own thread is left as it was."""
    code = """
import threading, os, json
from imagechain.limits import Limits, io_priority
from imagechain.engine import pipeline
seen = []
def probe():
    seen.append((io_priority(), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
lim = Limits(io_priority="idle", cpu_priority=10)
def init():
    lim.apply()
    probe()
list(pipeline.ordered_map(lambda x: x, range(8), 3, 4, init))
list(pipeline.prefetch(iter(range(3)), 2, init))
print(json.dumps({"threads": seen, "caller": [io_priority(), os.getpriority(os.PRIO_PROCESS, 0)]}))
"""
    got = json.loads(run_py(code))
    assert got["threads"] and all(t == [[3, 0], 10] for t in got["threads"]), got
    assert got["caller"] != [[3, 0], 10]


def test_backup_runs_at_the_priorities_it_was_given(tmp_path: Path, repo: Path) -> None:
    """Through the CLI: the threads of a running backup that do its work are seen at nice 19 in the idle
    I/O class (from /proc and ioprio_get); its main thread keeps what it inherited."""
    vol = tmp_path / "vol.img"
    write_volume(vol, 64 * MiB, seed=3)
    p = subprocess.Popen([exe(), "backup", str(vol), str(repo), "--cpu-priority", "19", "--io-priority", "idle",
                          "--max-read-rate", "16M", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)  # fmt: skip
    polite: set[int] = set()  # threads seen at nice 19 in the idle class
    main: set[tuple[int, tuple[int, int]]] = set()
    deadline = time.monotonic() + 60
    while p.poll() is None and time.monotonic() < deadline:
        try:
            for tid in map(int, os.listdir(f"/proc/{p.pid}/task")):
                with open(f"/proc/{p.pid}/task/{tid}/stat") as f:
                    nice = int(f.read().rpartition(")")[2].split()[16])
                io = io_priority(tid)
                if tid == p.pid:
                    main.add((nice, io))
                elif (nice, io) == (19, (3, 0)):
                    polite.add(tid)
        except OSError:
            pass
        time.sleep(0.02)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert len(polite) >= 3, polite  # the reader/planner, the workers and the writer
    assert all(nice == 0 and io != (3, 0) for nice, io in main), main
    assert json.loads(out)["kind"] == "full"


def test_priority_errors_are_usage_errors(tmp_path: Path, repo: Path) -> None:
    with pytest.raises(UsageError, match="io-priority"):
        Limits(io_priority="fast")
    with pytest.raises(UsageError, match="cpu-priority"):
        Limits(cpu_priority=30)
    with pytest.raises(UsageError, match="buffer-memory"):
        Limits(buffer_memory=MiB)
    vol = tmp_path / "vol.img"
    write_volume(vol, 4 * MiB, seed=1)
    bad = subprocess.run([exe(), "backup", str(vol), str(repo), "--io-priority", "urgent"], capture_output=True,
                         text=True)  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_usable_cpus_honours_affinity_and_cgroup_quota(tmp_path: Path) -> None:
    assert run_py("import os; os.sched_setaffinity(0, {0}); from imagechain.limits import usable_cpus; "
                  "print(usable_cpus())") == "1"  # fmt: skip
    assert usable_cpus() == len(os.sched_getaffinity(0)) or usable_cpus() < len(os.sched_getaffinity(0))
    # a v2 quota of 1.5 CPUs on a parent of this process's cgroup, and v1 quotas
    root = tmp_path / "cg"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "cpu.max").write_text("150000 100000\n")
    (root / "a" / "b" / "cpu.max").write_text("max 100000\n")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/a/b\n")
    n = min(len(os.sched_getaffinity(0)), 2)
    assert usable_cpus(str(root), str(proc)) == n
    (root / "cpu" / "x").mkdir(parents=True)
    (root / "cpu" / "x" / "cpu.cfs_quota_us").write_text("50000\n")
    (root / "cpu" / "x" / "cpu.cfs_period_us").write_text("100000\n")
    proc.write_text("4:cpu,cpuacct:/x\n")
    assert usable_cpus(str(root), str(proc)) == 1
    (root / "cpu" / "x" / "cpu.cfs_quota_us").write_text("-1\n")  # no quota
    assert usable_cpus(str(root), str(proc)) == len(os.sched_getaffinity(0))


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def wait(self, _ev: threading.Event, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def test_rate_limiter_is_smooth() -> None:
    """10 MiB at 1 MiB/s in slices: each slice waits its turn, none rushes ahead, and idle time earns at
    most 50 ms of credit (no burst after a pause)."""
    clock = FakeClock()
    rl = RateLimiter(MiB, clock, clock.wait)
    moved = []
    for off, n in pieces(0, 10 * MiB, rl):
        assert n <= RateLimiter.SLICE
        rl.take(n)
        moved.append((clock.now, off))
    step = RateLimiter.SLICE / MiB  # seconds per slice at 1 MiB/s
    assert [round(t - 100.0, 6) for t, _ in moved] == [round(i * step, 6) for i in range(len(moved))]
    assert len(moved) == 10 * MiB // RateLimiter.SLICE
    clock.now += 60  # a long pause
    rl.take(MiB)
    rl.take(MiB)
    assert clock.slept[-1] == pytest.approx(1.0 - 0.05)  # the second MiB after the pause waits again
    assert pieces(5, 3 * MiB, None) == [(5, 3 * MiB)]
    assert RateLimiter(0).rate == 0


def test_rate_limit_holds_in_a_real_backup(tmp_path: Path, repo: Path) -> None:
    """A backup capped at 32 MiB/s reads a 48 MiB volume in no less than about 1.5 s (and without the cap,
    which this machine reads far faster, the same work takes much less)."""
    vol = tmp_path / "vol.img"
    write_volume(vol, 48 * MiB, seed=7, zero_fraction=0.0)
    t0 = time.monotonic()
    r = backup(str(vol), str(repo), limits=Limits(max_read_rate=32 * MiB))
    took = time.monotonic() - t0
    assert r.read_bytes == 48 * MiB
    assert took >= 48 / 32 - 0.1, took
    t0 = time.monotonic()
    backup(str(vol), str(repo), chain="w", limits=Limits(max_write_rate=16 * MiB), codec=None)
    assert time.monotonic() - t0 >= 0.8 * r.stored_bytes / (16 * MiB) - 0.1


def test_backup_drops_what_it_read_from_the_page_cache(tmp_path: Path, repo: Path) -> None:
    """A pass over a volume must not leave it in the host's page cache (where it would have evicted what
    the host's programs keep there)."""
    need_tool("fincore")
    vol = tmp_path / "vol.img"
    write_volume(vol, 64 * MiB, seed=9, zero_fraction=0.0)
    with open(vol, "rb+") as f:  # written back (dirty pages cannot be dropped), and cached whole
        os.fsync(f.fileno())
        while f.read(MiB):
            pass

    def cached() -> int:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(vol)],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        return int(out.split()[0])

    assert cached() > 48 * MiB
    backup(str(vol), str(repo))
    assert cached() < 4 * MiB


def test_buffer_memory_bounds_peak_memory(tmp_path: Path, repo: Path) -> None:
    """With --buffer-memory 32M the backup's peak RSS stays far below the default pipeline's."""
    vol = tmp_path / "vol.img"
    write_volume(vol, 256 * MiB, seed=11, zero_fraction=0.0)

    def peak(*extra: str) -> int:
        code = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, capture_output=True); "
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")  # fmt: skip
        out = subprocess.run([sys.executable, "-c", code, exe(), "backup", str(vol), str(repo), "--chain",
                              f"c{len(extra)}", "--threads", "4", *extra],
                             capture_output=True, text=True, check=True)  # fmt: skip
        return int(out.stdout) * 1024

    bounded, default = peak("--buffer-memory", "32M"), peak()
    assert bounded < default - 24 * MiB, (bounded >> 20, default >> 20)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0


@pytest.mark.parametrize("buffer_memory, threads", [(32 * MiB, 2), (64 * MiB, 2), (0, 3)])
def test_chunk_buffers_stay_within_the_bound(tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch,
                                             buffer_memory: int, threads: int) -> None:  # fmt: skip
    """The reader thread reads ahead into reused chunk buffers; however far ahead it may read, it never
    holds more buffers than the chunks --buffer-memory allows (the smallest bound allows one), and the
    point still restores bit-exact."""
    import imagechain.engine.backup as engine
    from imagechain.address import open_point
    from imagechain.engine.restore import restore

    lock = threading.Lock()
    seen = {"now": 0, "max": 0, "limit": 0}
    init, take, give = engine._Buffers.__init__, engine._Buffers.take, engine._Buffers.give

    def counted_init(self, limit):  # type: ignore[no-untyped-def]
        seen["limit"] = limit
        init(self, limit)

    def counted_take(self, size):  # type: ignore[no-untyped-def]
        buf = take(self, size)
        with lock:
            seen["now"] += 1
            seen["max"] = max(seen["max"], seen["now"])
        return buf

    def counted_give(self, buf):  # type: ignore[no-untyped-def]
        with lock:
            seen["now"] -= 1
        give(self, buf)

    monkeypatch.setattr(engine._Buffers, "__init__", counted_init)
    monkeypatch.setattr(engine._Buffers, "take", counted_take)
    monkeypatch.setattr(engine._Buffers, "give", counted_give)
    vol = tmp_path / "vol.img"
    data = write_volume(vol, 80 * MiB, seed=5, zero_fraction=0.1)
    backup(str(vol), str(repo), threads=threads, limits=Limits(buffer_memory=buffer_memory) if buffer_memory else None)
    expected = buffer_memory // (2 * engine.CHUNK_BYTES) - 1 if buffer_memory else threads * 2 + 6
    assert seen["limit"] == expected
    assert 1 <= seen["max"] <= expected
    res = open_point(f"{repo}::default@latest")
    restore(res.repo, res.point, str(tmp_path / "out.img"))
    assert (tmp_path / "out.img").read_bytes() == data


@pytest.mark.parametrize("value, ok", [("", True), ("2.5", True), ("0", False), ("-1", False), ("nan", False),
                                       ("inf", False), ("soon", False)])  # fmt: skip
def test_seconds_and_numbers_from_the_environment(monkeypatch: pytest.MonkeyPatch, value: str, ok: bool) -> None:
    """Lock timings, the SSH timeout and the S3 settings all read numbers from the environment through one
    helper; a value out of range is one usage error that names the variable and what it expected."""
    from imagechain.sizes import env_seconds
    from imagechain.stores.s3 import _env_number

    monkeypatch.setenv("IMAGECHAIN_TEST_SECONDS", value)
    if ok:
        assert env_seconds("IMAGECHAIN_TEST_SECONDS", 7.0) == (float(value) if value else 7.0)
    else:
        with pytest.raises(UsageError, match=r"IMAGECHAIN_TEST_SECONDS must be a positive number of seconds, not "):
            env_seconds("IMAGECHAIN_TEST_SECONDS", 7.0)
    monkeypatch.setenv("IMAGECHAIN_TEST_NUMBER", value)
    in_range = value == "" or (value.replace(".", "").isdigit() and 1 <= float(value) <= 64)
    if in_range:
        assert _env_number("IMAGECHAIN_TEST_NUMBER", 4, 1, 64) == (float(value) if value else 4)
    else:
        with pytest.raises(UsageError, match=r"IMAGECHAIN_TEST_NUMBER must be a number from 1 to 64, not "):
            _env_number("IMAGECHAIN_TEST_NUMBER", 4, 1, 64)
