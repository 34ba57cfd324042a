"""What a backup may take from the machine it runs on: I/O and CPU priority, threads, read and write
rates, buffer memory. Defaults are fast; the controls exist so that a backup of a busy server goes
unnoticed by the database or the desktop it protects (docs/CLI.md, "Running on a busy server")."""

from __future__ import annotations

import math
import os
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import libc
from .errors import UsageError

# ioprio_set(2): the class in the top 3 bits of a 16-bit value, the level (0 highest .. 7) below them
IOPRIO_CLASS_BE, IOPRIO_CLASS_IDLE = 2, 3
IOPRIO_CLASS_SHIFT = 13
IOPRIO_WHO_PROCESS = 1
_SYSCALLS = {"x86_64": (251, 252), "aarch64": (30, 31), "arm64": (30, 31)}  # ioprio_set, ioprio_get
IO_PRIORITIES = {"normal": (IOPRIO_CLASS_BE, 4), "low": (IOPRIO_CLASS_BE, 7), "idle": (IOPRIO_CLASS_IDLE, 0)}
MIN_BUFFER = 32 << 20


@dataclass(frozen=True)
class Limits:
    io_priority: str | None = None  # idle, low, normal; None leaves what the process inherited
    cpu_priority: int | None = None  # nice value, -20..19
    threads: int | None = None  # None: the CPUs this process may use
    max_read_rate: int = 0  # bytes per second from the source; 0: no limit
    max_write_rate: int = 0  # bytes per second to the repository; 0: no limit
    buffer_memory: int = 0  # bytes of volume data in flight at most; 0: the default

    def __post_init__(self) -> None:
        if self.io_priority is not None and self.io_priority not in IO_PRIORITIES:
            raise UsageError(f"--io-priority must be one of {', '.join(IO_PRIORITIES)}, not {self.io_priority!r}")
        if self.cpu_priority is not None and not -20 <= self.cpu_priority <= 19:
            raise UsageError(f"--cpu-priority is a nice value from -20 to 19, not {self.cpu_priority}")
        if self.threads is not None and not 1 <= self.threads <= 256:
            raise UsageError(f"--threads must be between 1 and 256, not {self.threads}")
        if self.max_read_rate < 0 or self.max_write_rate < 0:
            raise UsageError("a rate limit must be positive")
        if self.buffer_memory and self.buffer_memory < MIN_BUFFER:
            raise UsageError(f"--buffer-memory must be at least {MIN_BUFFER >> 20}M, not {self.buffer_memory}")

    def check(self) -> None:
        """Refuse, before any thread starts, what apply() would fail at in every thread."""
        if self.io_priority is not None:
            _syscall(0)
        if self.cpu_priority is not None and self.cpu_priority < os.getpriority(os.PRIO_PROCESS, 0) \
                and os.geteuid() != 0:  # fmt: skip
            raise UsageError(f"--cpu-priority {self.cpu_priority}: raising the priority needs root")

    def apply(self) -> None:
        """Set this thread's I/O class and nice value; threads started after this inherit both."""
        if self.io_priority is not None:
            set_io_priority(self.io_priority)
        if self.cpu_priority is not None:
            try:
                os.setpriority(os.PRIO_PROCESS, 0, self.cpu_priority)  # Linux: the calling thread
            except PermissionError as e:
                raise UsageError(f"--cpu-priority {self.cpu_priority}: raising the priority needs root") from e


def _syscall(index: int) -> int:
    nr = _SYSCALLS.get(platform.machine())
    if nr is None:
        raise UsageError(f"--io-priority is not supported on {platform.machine()}")
    return nr[index]


def set_io_priority(name: str) -> None:
    klass, level = IO_PRIORITIES[name]
    value = (klass << IOPRIO_CLASS_SHIFT) | level
    result, err = libc.syscall(_syscall(0), IOPRIO_WHO_PROCESS, 0, value)
    if result != 0:
        raise UsageError(f"--io-priority {name}: {os.strerror(err)}")


def io_priority(tid: int = 0) -> tuple[int, int]:
    """(class, level) of a thread (0: the calling one), as ioprio_get reports it."""
    value, err = libc.syscall(_syscall(1), IOPRIO_WHO_PROCESS, tid)
    if value < 0:
        raise OSError(err, "ioprio_get failed")
    return value >> IOPRIO_CLASS_SHIFT, value & ((1 << IOPRIO_CLASS_SHIFT) - 1)


def usable_cpus(cgroup_root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> int:
    """The CPUs this process may really use: its affinity mask, further limited by a CPU quota of its
    cgroup (v2 `cpu.max`, or v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), rounded up."""
    cpus = len(os.sched_getaffinity(0))
    quota = _cgroup_quota(cgroup_root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, math.ceil(quota)))
    return max(1, cpus)


def _cgroup_quota(root: str, proc_cgroup: str) -> float | None:
    """CPUs allowed by the tightest quota on the path from this process's cgroup up to its hierarchy's root."""
    try:
        with open(proc_cgroup, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    found: list[float] = []
    files: tuple[str, str | None]
    for line in lines:
        _hid, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: the unified hierarchy, mounted at the root or (hybrid) at root/unified
            bases, files = [root, os.path.join(root, "unified")], ("cpu.max", None)
        elif "cpu" in controllers.split(","):
            bases = [os.path.join(root, c) for c in ("cpu", "cpu,cpuacct", "cpuacct,cpu")]
            files = ("cpu.cfs_quota_us", "cpu.cfs_period_us")
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for base in bases:
            for depth in range(len(parts), -1, -1):  # the process's own cgroup first, then each parent
                value = _quota_in(os.path.join(base, *parts[:depth]), *files)
                if value is not None:
                    found.append(value)
    return min(found) if found else None


def _quota_in(folder: str, quota_file: str, period_file: str | None) -> float | None:
    try:
        with open(os.path.join(folder, quota_file), encoding="utf-8") as f:
            text = f.read().split()
        if period_file is None:  # v2: "max 100000" or "200000 100000"
            if not text or text[0] == "max":
                return None
            return int(text[0]) / int(text[1] if len(text) > 1 else 100000)
        quota = int(text[0])
        if quota <= 0:
            return None
        with open(os.path.join(folder, period_file), encoding="utf-8") as f:
            return quota / int(f.read().split()[0])
    except (OSError, ValueError, IndexError, ZeroDivisionError):
        return None


class RateLimiter:
    """Bytes per second, smoothly: a caller asks for n bytes before it moves them and is held until the
    rate allows them, with at most a twentieth of a second of credit saved up, so the limit holds over
    every short window and not only on average. Shared by threads; stop() releases every waiter."""

    SLICE = 256 << 10  # callers move data in pieces of at most this size, so no burst is larger

    def __init__(self, rate: int, clock: Callable[[], float] = time.monotonic,
                 wait: Callable[[threading.Event, float], None] | None = None) -> None:  # fmt: skip
        self.rate = rate
        self.clock = clock
        self._wait = wait or (lambda ev, s: ev.wait(s))
        self._lock = threading.Lock()
        self._next = clock()  # when the next byte may move
        self._stop = threading.Event()

    def take(self, n: int) -> None:
        if self.rate <= 0 or n <= 0:
            return
        with self._lock:
            now = self.clock()
            start = max(self._next, now - 0.05)  # unused time becomes credit, but at most 50 ms of it
            self._next = start + n / self.rate
            delay = start - now
        if delay > 0 and not self._stop.is_set():
            self._wait(self._stop, delay)

    def stop(self) -> None:
        self._stop.set()


def pieces(offset: int, length: int, limiter: RateLimiter | None) -> list[tuple[int, int]]:
    """[offset, offset + length) cut for a rate limiter into slices of at most RateLimiter.SLICE bytes (one
    piece without a limiter)."""
    if limiter is None or limiter.rate <= 0:
        return [(offset, length)]
    step = RateLimiter.SLICE
    return [(offset + a, min(step, length - a)) for a in range(0, length, step)]
