"""The filesystems inside a point, mounted read-only on a loop device over the FUSE file that holds them, and
paths resolved inside them as the volume's own system would (the copy itself: copyout.py).

Read-only means more than `-o ro`: an ext3/4 journal or an XFS log left by a volume backed up while mounted
would be replayed into the (read-only) loop device and fail, so they are not replayed (`noload`,
`norecovery`): what shows is the filesystem as its last checkpoint left it."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import MountError, UsageError
from . import system


@dataclass(frozen=True)
class Driver:
    name: str  # as messages show it
    command: Callable[[str, str, bool], list[str]]  # (device, target, allow_other) -> argv
    fuse: bool  # a FUSE driver process serves it (waited for when unmounting)


def _kernel(fstype: str, options: str) -> Callable[[str, str, bool], list[str]]:
    return lambda dev, target, _other: ["mount", "-t", fstype, "-o", options, dev, target]


def _fuse(tool: str, options: str) -> Callable[[str, str, bool], list[str]]:
    return lambda dev, target, other: [tool, "-o", options + (",allow_other" if other else ""), dev, target]


# fsprobe's kinds (ext4 stands for ext2/3/4: the ext4 driver mounts all three)
DRIVERS: dict[str, Driver] = {
    "ext4": Driver("ext4", _kernel("ext4", "ro,noload"), False),
    "xfs": Driver("xfs", _kernel("xfs", "ro,norecovery"), False),
    "ntfs": Driver("ntfs-3g", _fuse("ntfs-3g", "ro"), True),
    "exfat": Driver("exfat-fuse", _fuse("mount.exfat-fuse", "ro"), True),
    "vfat": Driver("fusefat", _fuse("fusefat", "ro"), True),
}


def mount_fs(kind: str, device: str, target: str, allow_other: bool) -> tuple[int, int] | None:
    """Mount the filesystem on `device` read-only at `target`; the FUSE driver's (pid, start time) if any."""
    d = DRIVERS[kind]
    p = system.run(d.command(device, target, allow_other))
    if p.returncode or system.mount_at(target) is None:
        raise MountError(f"cannot mount the {kind} filesystem of {device} at {target} ({d.name}): "
                         f"{system.complaint(p)}")  # fmt: skip
    return system.driver_of(target) if d.fuse else None


def blkid_type(path: str) -> str:
    """What blkid sees in a file (to name what cannot be mounted), "" when it sees nothing it knows."""
    try:
        p = system.run(["blkid", "-p", "-o", "value", "-s", "TYPE", path])
    except MountError:
        return ""
    return p.stdout.strip() if p.returncode == 0 else ""


# ---- paths inside a mounted filesystem


def resolve_inside(root: str, path: str) -> str:
    """`path` (absolute or relative, as in the volume) as a real path under `root`, following symlinks on
    the way as the volume's own system would (an absolute link starts at the volume's root, `..` stops
    there), never out of it; the last component is not followed (a symlink is copied as a symlink).
    UsageError when it does not exist."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    done: list[str] = []
    hops = 0
    while parts:
        name = parts.pop(0)
        if name == "..":
            if done:
                done.pop()
            continue
        here = os.path.join(root, *done, name)
        try:
            st = os.lstat(here)
        except FileNotFoundError:
            raise UsageError(f"{path}: no such file or folder in the point") from None
        except OSError as e:
            raise MountError(f"cannot read {path} in the point: {e.strerror or e}") from e
        if stat.S_ISLNK(st.st_mode) and parts:  # a folder on the way that is a link: follow it
            hops += 1
            if hops > 40:
                raise UsageError(f"{path}: too many levels of symbolic links in the point")
            link = os.readlink(here)
            parts = [p for p in link.split("/") if p not in ("", ".")] + parts
            if link.startswith("/"):
                done = []
            continue
        if parts and not stat.S_ISDIR(st.st_mode):
            raise UsageError(f"{path}: {'/'.join([*done, name])} is not a folder in the point")
        done.append(name)
    return os.path.join(root, *done) if done else root
