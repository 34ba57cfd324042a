"""What the kernel says about a mount tree: mounts (by mount id, so that open files can be matched to them),
loop devices and the files behind them, processes (with their start time, so that a reused pid is never taken
for the one recorded) and who keeps a mount busy. Tools are run with a timeout and their complaint kept to one
line."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from dataclasses import dataclass

from ..errors import MountError

TOOL_TIMEOUT_S = 60
_OCTAL = re.compile(r"\\([0-3][0-7]{2})")


def run(args: list[str], timeout: float = TOOL_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """A tool's result; MountError only when it is missing or hangs (the caller judges its exit code)."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False,
                              stdin=subprocess.DEVNULL, env={**os.environ, "LC_ALL": "C"})  # fmt: skip
    except FileNotFoundError as e:
        raise MountError(f"{args[0]} is not installed") from e
    except subprocess.TimeoutExpired as e:
        raise MountError(f"{args[0]} did not finish within {timeout:.0f} s") from e


def complaint(p: subprocess.CompletedProcess[str]) -> str:
    """The tool's last line of complaint (its message), or its exit code."""
    lines = [ln.strip() for ln in (p.stderr + "\n" + p.stdout).splitlines() if ln.strip()]
    return lines[-1] if lines else f"exit code {p.returncode}"


# ---- mounts


@dataclass(frozen=True)
class Mount:
    mount_id: int
    dev: int
    mountpoint: str
    fstype: str
    source: str


def mount_table() -> list[Mount]:
    """Our namespace's mounts, in the order they were made."""
    out = []
    with open("/proc/self/mountinfo", "rb") as f:
        lines = f.read().decode("utf-8", "surrogateescape").splitlines()
    for line in lines:
        f_ = line.split(" ")
        try:
            sep = f_.index("-", 6)
            major, minor = f_[2].split(":")
            out.append(Mount(int(f_[0]), os.makedev(int(major), int(minor)), _unescape(f_[4]),
                             _unescape(f_[sep + 1]), _unescape(f_[sep + 2])))  # fmt: skip
        except (ValueError, IndexError):
            continue
    return out


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def mounts_at_or_under(top: str) -> list[Mount]:
    return [m for m in mount_table() if under(m.mountpoint, top)]


def mount_at(path: str) -> Mount | None:
    """The mount on top at `path`, if any."""
    found = [m for m in mount_table() if m.mountpoint == path]
    return found[-1] if found else None


# ---- loop devices


def attach_loop(file: str) -> str:
    """A read-only loop device on `file`: the filesystem drivers read the point through it, never write."""
    p = run(["losetup", "-r", "-f", "--show", file])
    if p.returncode:
        raise MountError(f"cannot attach a loop device to {file}: {complaint(p)}")
    return p.stdout.strip()


def loop_backing(dev: str) -> str | None:
    """The file behind a loop device as the kernel names it (None: nothing attached)."""
    name = os.path.basename(dev)
    try:
        with open(f"/sys/block/{name}/loop/backing_file", "rb") as f:
            return os.fsdecode(f.read().rstrip(b"\n")).removesuffix(" (deleted)")
    except OSError:
        return None


def loops_under(top: str) -> list[str]:
    """Loop devices whose backing file lies under `top` (even after the process that attached them died)."""
    out = []
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir("/sys/block")):
            if name.startswith("loop"):
                backing = loop_backing(name)
                if backing is not None and under(backing, top) and backing != top:
                    out.append(f"/dev/{name}")
    return out


def detach_loop(dev: str) -> None:
    p = run(["losetup", "-d", dev])
    if p.returncode and loop_backing(dev) is not None:
        raise MountError(f"cannot detach loop device {dev}: {complaint(p)}")


# ---- processes


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, None when it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
    except OSError:
        return None
    return None if fields[0] == b"Z" else int(fields[19])


def alive(pid: int, started: int | None) -> bool:
    now = start_time(pid)
    return now is not None and (started is None or now == started)


def wait_gone(pid: int, started: int | None, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid, started):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def command_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return "?"


def driver_of(target: str) -> tuple[int, int] | None:
    """The FUSE driver process serving a mount (ntfs-3g, exfat-fuse, fusefat): the live process whose
    command line names the mount point. (pid, start time)."""
    want = os.fsencode(target)
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if want in args:
            started = start_time(int(d))
            if started is not None:
                return int(d), started
    return None


@dataclass(frozen=True)
class User:
    pid: int
    name: str
    mountpoint: str  # the mount it keeps busy


def users(mounts: list[Mount]) -> list[User]:
    """Processes that keep any of `mounts` busy: open files (matched by the mount id /proc gives for each
    open file), working or root folders, and mapped files. Never touches the filesystems themselves except
    to confirm a working folder whose path lies under one of them."""
    by_id = {m.mount_id: m for m in mounts}
    by_dev = {m.dev: m for m in mounts}
    out: list[User] = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        hit = _fd_hit(d, by_id) or _dir_hit(d, mounts, by_dev) or _map_hit(d, by_dev)
        if hit is not None:
            out.append(User(int(d), command_name(int(d)), hit.mountpoint))
    return out


def _fd_hit(pid: str, by_id: dict[int, Mount]) -> Mount | None:
    try:
        fds = os.listdir(f"/proc/{pid}/fdinfo")
    except OSError:
        return None
    for fd in fds:
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
                info = f.read()
        except OSError:
            continue
        m = re.search(rb"^mnt_id:\s*(\d+)", info, re.M)
        if m and int(m.group(1)) in by_id:
            return by_id[int(m.group(1))]
    return None


def _dir_hit(pid: str, mounts: list[Mount], by_dev: dict[int, Mount]) -> Mount | None:
    for link in ("cwd", "root"):
        try:
            path = os.readlink(f"/proc/{pid}/{link}")
        except OSError:
            continue
        inside = [m for m in mounts if under(path, m.mountpoint)]
        if not inside:
            continue
        try:
            return by_dev.get(os.stat(f"/proc/{pid}/{link}").st_dev)
        except OSError:  # a dead FUSE driver cannot answer: the path is all there is
            return max(inside, key=lambda m: len(m.mountpoint))
    return None


def _map_hit(pid: str, by_dev: dict[int, Mount]) -> Mount | None:
    try:
        with open(f"/proc/{pid}/maps", "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(None, 5)
        if len(parts) < 5 or parts[4] == b"0":
            continue
        major, _, minor = parts[3].partition(b":")
        with contextlib.suppress(ValueError):
            m = by_dev.get(os.makedev(int(major, 16), int(minor, 16)))
            if m is not None:
                return m
    return None
