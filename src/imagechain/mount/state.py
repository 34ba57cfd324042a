"""What a mount set up, recorded where `imagechain umount` finds it (/run/imagechain/mounts, one file per
mount point, named by a hash of its real path), and the taking down of it all in reverse order.

The record names the serving process (pid and start time), the loop devices and the filesystems mounted
inside. Taking down does not trust it alone: a process killed between attaching a loop device and writing
the record leaves things the record does not name, so the kernel's own tables are asked too (mounts under
the mount point, loop devices whose backing file lies under it). /run is a tmpfs: a reboot forgets records
whose mounts it took down anyway."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from ..errors import MountError
from . import system

STATE_ENV = "IMAGECHAIN_MOUNT_STATE"
STATE_DIR = "/run/imagechain/mounts"
FSTYPE = "fuse.imagechain"  # how our FUSE filesystems show in the mount table (subtype imagechain)
GONE_TIMEOUT_S = 15.0


@dataclass
class Inner:
    """A filesystem of the point mounted inside the FUSE filesystem."""

    target: str
    device: str
    kind: str
    driver_pid: int | None = None  # its FUSE driver (ntfs-3g, exfat-fuse, fusefat), waited for when unmounting
    driver_start: int | None = None


@dataclass
class Record:
    mountpoint: str  # real path
    address: str
    point_id: str
    pid: int  # the process serving the FUSE filesystem
    pid_start: int | None
    log: str | None = None  # where a background server writes its messages
    private: bool = False  # restore-files' own temporary mount: its folder goes with it
    loops: list[str] = field(default_factory=list)
    mounts: list[Inner] = field(default_factory=list)


def state_dir() -> str:
    """/run/imagechain/mounts for root; a user's own runtime folder otherwise (FUSE alone needs no root)."""
    if os.environ.get(STATE_ENV):
        return os.environ[STATE_ENV]
    if os.geteuid() != 0 and os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "imagechain", "mounts")
    return STATE_DIR


def state_path(mountpoint: str, suffix: str = ".json") -> str:
    key = hashlib.sha256(os.fsencode(os.path.realpath(mountpoint))).hexdigest()[:16]
    return os.path.join(state_dir(), key + suffix)


def claim(rec: Record) -> None:
    """The first record of a mount, created only if none exists: of two mounts started at once on one
    mount point, one goes ahead."""
    path = state_path(rec.mountpoint)
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        raise MountError(f"{rec.mountpoint} has an imagechain mount already (or one being set up)") from None
    except OSError as e:
        raise MountError(f"cannot record the mount in {os.path.dirname(path)}: {e.strerror or e}") from e
    save(rec)


def save(rec: Record) -> None:
    """Written whole or not at all: a reader sees the last complete record."""
    path = state_path(rec.mountpoint)
    try:
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(asdict(rec), f, indent=1)
        os.replace(tmp, path)
    except OSError as e:
        raise MountError(f"cannot record the mount in {os.path.dirname(path)}: {e.strerror or e}") from e


def load(mountpoint: str) -> Record | None:
    return _read(state_path(mountpoint))


def _read(path: str) -> Record | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        data["mounts"] = [Inner(**m) for m in data.get("mounts", [])]
        return Record(**data)
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def remove(mountpoint: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(state_path(mountpoint))


def records() -> list[Record]:
    try:
        names = sorted(os.listdir(state_dir()))
    except OSError:
        return []
    found = [_read(os.path.join(state_dir(), n)) for n in names if n.endswith(".json")]
    return [r for r in found if r is not None]


def busy_message(users: list[system.User]) -> str:
    u = users[0]
    more = f" and {len(users) - 1} more" if len(users) > 1 else ""
    return (f"{u.mountpoint} is busy: a process has files open in it ({u.name}, pid {u.pid}{more}; "
            f"`fuser -vm {u.mountpoint}` lists them); close them and retry")  # fmt: skip


def take_down(mountpoint: str, rec: Record | None, *, lazy: bool = False,
              notice: Callable[[str], None] | None = None) -> None:  # fmt: skip
    """Unmount the filesystems inside (newest first, waiting for their FUSE drivers), detach the loop
    devices, unmount the FUSE filesystem and wait for its server to end; then forget the record.

    Nothing is touched while a process keeps any of these mounts busy (MountError naming it). `lazy` (for
    restore-files' private mount, which nobody else should use) detaches busy mounts instead."""
    mnt = os.path.realpath(mountpoint)
    say = notice or (lambda _m: None)
    tree = system.mounts_at_or_under(mnt)
    if not lazy:
        found = system.users(tree)
        if found:
            raise MountError(busy_message(found))
    drivers = {m.target: (m.driver_pid, m.driver_start) for m in rec.mounts} if rec else {}
    for m in reversed([m for m in tree if m.mountpoint != mnt]):
        known = drivers.get(m.mountpoint)
        if known is None and m.fstype.startswith("fuse"):  # not in the record: its driver, found by its arguments
            known = system.driver_of(m.mountpoint)
        pid, started = known or (None, None)
        _unmount(["umount", m.mountpoint], m.mountpoint, lazy, say)
        if pid is not None and not system.wait_gone(pid, started, GONE_TIMEOUT_S):
            say(f"the driver of {m.mountpoint} (pid {pid}) is still running")
    for dev in dict.fromkeys([*(rec.loops if rec else []), *system.loops_under(mnt)]):
        backing = system.loop_backing(dev)
        if backing is not None and system.under(backing, mnt):
            system.detach_loop(dev)
    top = system.mount_at(mnt)
    if top is not None and top.fstype == FSTYPE:
        _unmount(["fusermount3", "-u", mnt], mnt, lazy, say)
    if rec is not None and rec.pid != os.getpid() and not system.wait_gone(rec.pid, rec.pid_start, GONE_TIMEOUT_S):
        say(f"the mount's server (pid {rec.pid}) did not end after the unmount; stopping it")
        with contextlib.suppress(OSError):
            os.kill(rec.pid, signal.SIGKILL)
        system.wait_gone(rec.pid, rec.pid_start, 5)
    remove(mnt)
    if rec is not None and rec.log:
        _settle_log(rec.log, say)


def _settle_log(path: str, say: Callable[[str], None]) -> None:
    """A background server's log goes with its mount unless it says more than the notices its parent
    already showed (a read answered EIO, a crash): then it stays, and is pointed at."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            said = [ln for ln in f.read().splitlines() if ln.strip() and not ln.startswith("notice: ")]
    except OSError:
        return
    if said:
        say(f"the mount's server logged {len(said)} message(s), kept in {path}")
    else:
        with contextlib.suppress(OSError):
            os.unlink(path)


def _unmount(cmd: list[str], target: str, lazy: bool, say: Callable[[str], None]) -> None:
    """Unmount; busy is the user's to resolve (unless lazy). A mount whose FUSE server died ("Transport
    endpoint is not connected") or that will not go otherwise is detached lazily, the last resort."""
    p = system.run(cmd)
    if p.returncode == 0 or system.mount_at(target) is None:
        return
    why = system.complaint(p)
    if "busy" in why.lower() and not lazy:
        found = system.users(system.mounts_at_or_under(target))
        raise MountError(busy_message(found) if found else f"{target} is busy ({why}); close what uses it and retry")
    last = system.run(["umount", "-l", target])
    if last.returncode and system.mount_at(target) is not None:
        raise MountError(f"cannot unmount {target}: {why}; umount -l: {system.complaint(last)}")
    if "not connected" not in why.lower():
        say(f"{target} was detached lazily ({why})")
