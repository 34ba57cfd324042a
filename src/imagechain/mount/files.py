"""The filesystems inside a point, mounted read-only on a loop device over the FUSE file that holds them, and
files copied out of them with their metadata.

Read-only means more than `-o ro`: an ext3/4 journal or an XFS log left by a volume backed up while mounted
would be replayed into the (read-only) loop device and fail, so they are not replayed (`noload`,
`norecovery`): what shows is the filesystem as its last checkpoint left it."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import IntegrityError, MountError, TargetError, UsageError
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


@dataclass
class Copied:
    items: int
    files: int
    bytes: int


def copy_out(root: str, sources: list[tuple[str, str]], dest: str, force: bool,
             started: Callable[[subprocess.Popen[bytes]], None]) -> Copied:  # fmt: skip
    """Copy each source ((the path as the user gave it, its real path under `root`, a mounted filesystem)) into
    the folder `dest`, with owner, mode, times, ACLs and extended attributes (`cp -a --preserve=all`; failures
    to keep xattrs or a security context where `dest` cannot hold them are not errors), symlinks as symlinks.
    `started` gets the copy process, so that a stop can end it."""
    try:
        os.makedirs(dest, exist_ok=True)
    except OSError as e:
        raise TargetError(f"cannot create {dest}: {e.strerror or e}") from e
    if not os.path.isdir(dest):
        raise TargetError(f"{dest} is not a folder")
    args, count = [], Copied(len(sources), 0, 0)
    names: dict[str, str] = {}
    for given, src in sources:
        whole = os.path.ismount(src)  # a filesystem's root: its content goes into dest
        for name in sorted(os.listdir(src)) if whole else [os.path.basename(src)]:
            if name in names:
                raise UsageError(f"{names[name]} and {given} would both be copied to {os.path.join(dest, name)}")
            names[name] = given
            if os.path.lexists(os.path.join(dest, name)) and not force:
                raise TargetError(f"{os.path.join(dest, name)} exists (use --force to overwrite it)")
        args.append(src + "/." if whole else src)
        _count(src, count)
    proc = subprocess.Popen(["cp", "-a", "--preserve=all", "--", *args, dest + "/"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    started(proc)
    _, err = proc.communicate()
    if proc.returncode:
        # paths as they are in the point, not under the private mount's temporary folder
        lines = [ln.replace(root.rstrip("/") + "/", "/") for ln in err.decode("utf-8", "replace").splitlines()
                 if ln.strip()]  # fmt: skip
        why = lines[-1] if lines else f"cp exited with code {proc.returncode}"
        if any("Input/output error" in ln for ln in lines):
            raise IntegrityError(f"copying to {dest} failed: {why} (a block of the point is corrupt: see above)")
        raise TargetError(f"copying to {dest} failed: {why}")
    return count


def _count(src: str, into: Copied) -> None:
    st = os.lstat(src)
    if not stat.S_ISDIR(st.st_mode):
        into.files += 1
        into.bytes += st.st_size if stat.S_ISREG(st.st_mode) else 0
        return
    for folder, dirs, names in os.walk(src):
        for n in names + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            st = os.lstat(os.path.join(folder, n))
            into.files += 1
            into.bytes += st.st_size if stat.S_ISREG(st.st_mode) else 0
