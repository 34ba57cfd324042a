"""Is the storage behind a path mounted? Reading a volume whose filesystem is mounted read-write gives a torn image
that still passes every digest check, and restoring onto a mounted volume corrupts a live filesystem; the engines ask
here first and refuse with one line of evidence.

The answer comes from the mount tables (/proc/<pid>/mountinfo, every mount namespace we can see) joined with sysfs:
partitions, holders (device-mapper, md) and loop devices, followed transitively from the path. `exclusive_open` adds
the kernel's own answer for block devices (O_EXCL), which also sees claims no mount table shows (btrfs members, md,
mounts in namespaces we cannot read)."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["MountUse", "describe", "exclusive_open", "mounted_uses", "read_write"]

LOOP_GET_STATUS64 = 0x4C05
_LOOP_INFO64 = struct.Struct("<QQQ")  # lo_device, lo_inode, lo_rdevice: the head of struct loop_info64
_LOOP_INFO64_SIZE = 232
_OCTAL = re.compile(rb"\\([0-3][0-7]{2})")


@dataclass(frozen=True)
class MountUse:
    """One mount that reads or writes the storage behind the path asked about."""

    mountpoint: str  # where it is mounted (as seen from the mount namespace of `pid`)
    device: str  # the block device mounted there (/dev/loop3, /dev/sdb1), or the file a FUSE filesystem serves
    fstype: str
    read_only: bool  # the filesystem is read-only (superblock "ro"): neither users nor the kernel write to it
    via: str  # how the path relates: "the device itself", "loop device /dev/loop3 backed by it", ...
    mount_read_only: bool = False  # this mount is "ro" (a read-only bind of a writable filesystem still changes)
    pid: int | None = None  # None: our mount namespace; else a process whose mount namespace holds the mount


def mounted_uses(path: str) -> list[MountUse]:
    """Every mount that reads or writes the storage behind `path` (a block device or a regular file).

    Empty when nothing is mounted, or when `path` does not exist or is neither a block device nor a regular file
    (the caller reports those itself). Raises OSError only when our own mount table cannot be read: "nothing is
    mounted" would then be a guess."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    if stat.S_ISBLK(st.st_mode):
        users, file_key = _users_of_device(st.st_rdev, _loops()), None
    elif stat.S_ISREG(st.st_mode):
        file_key = (st.st_dev, st.st_ino)
        users = _users_of_file(file_key, _loops())
    else:
        return []
    uses: list[MountUse] = []
    reported: set[object] = set()  # what our namespace (and earlier ones) showed; later namespaces add only news
    for pid, table in _mount_tables():
        shown: set[object] = set()
        for m in _parse_mountinfo(table):
            if os.major(m.dev) == 0:  # FUSE (ntfs-3g, exfat-fuse) and btrfs show an anonymous device: use the source
                key, via = _source_match(m.source, file_key, users)
                device = m.source
            else:
                key, via = m.dev, users.get(m.dev)
                device = _device_path(m.dev) or m.source if via is not None else ""
            if via is not None and (pid is None or key not in reported):
                uses.append(MountUse(m.mountpoint, device, m.fstype, m.super_ro, via, m.mount_ro, pid))
                shown.add(key)
        reported |= shown
    return uses


def read_write(uses: list[MountUse]) -> list[MountUse]:
    """The uses whose filesystem can change while we read it (the ones that make an image torn)."""
    return [u for u in uses if not u.read_only]


def describe(use: MountUse) -> str:
    """One printable line of evidence, e.g. "/dev/loop3 (ext4) is mounted read-write at /mnt/data (loop device
    /dev/loop3 backed by it)"."""
    where = _printable(use.mountpoint)
    if use.pid is not None:
        where += f" in the mount namespace of process {use.pid}"
    if use.read_only:
        how = f"is mounted read-only at {where}"
    elif use.mount_read_only:
        how = f"is mounted read-only at {where}, but its filesystem is read-write"
    else:
        how = f"is mounted read-write at {where}"
    return f"{_printable(use.device)} ({_printable(use.fstype)}) {how} ({_printable(use.via)})"


def exclusive_open(path: str, flags: int) -> int | None:
    """Open `path`; for a block device exclusively (O_EXCL), so the kernel itself says whether anything holds it
    (a mount, a partition's mount, device-mapper or md, another exclusive opener): None when it does (EBUSY).

    While the returned fd stays open nothing can mount the device or claim it exclusively, which closes the window
    between checking and writing (a loop device can still be attached on it: `mounted_uses` sees those). Anything
    else (regular files, a path that O_CREAT will create) is opened with `flags` as given. Other errors raise
    OSError; the caller closes the fd."""
    try:
        is_device = stat.S_ISBLK(os.stat(path).st_mode)
    except FileNotFoundError:
        is_device = False
    if not is_device:
        return os.open(path, flags)
    try:
        return os.open(path, flags | os.O_EXCL)
    except OSError as e:
        if e.errno == errno.EBUSY:
            return None
        raise


# ---- mount tables


@dataclass(frozen=True)
class _Mount:
    dev: int
    mountpoint: str
    fstype: str
    source: str
    mount_ro: bool
    super_ro: bool


def _unescape(field: bytes) -> str:
    """mountinfo writes space, tab, newline and backslash as \\040 \\011 \\012 \\134; names need not be UTF-8."""
    return os.fsdecode(_OCTAL.sub(lambda m: bytes([int(m.group(1), 8)]), field))


def _parse_mountinfo(data: bytes) -> Iterator[_Mount]:
    # id parent major:minor root mountpoint options [optional fields...] - fstype source super-options
    for line in data.splitlines():
        f = line.split(b" ")
        try:
            sep = f.index(b"-", 6)
            major, minor = f[2].split(b":")
            dev = os.makedev(int(major), int(minor))
        except ValueError:
            continue
        if len(f) < sep + 4:
            continue
        yield _Mount(
            dev=dev,
            mountpoint=_unescape(f[4]),
            fstype=_unescape(f[sep + 1]),
            source=_unescape(f[sep + 2]),
            mount_ro=b"ro" in f[5].split(b","),
            super_ro=b"ro" in f[sep + 3].split(b","),
        )


def _mount_tables() -> Iterator[tuple[int | None, bytes]]:
    """Our mount table, then one table per other mount namespace we can see (containers, private mounts)."""
    with open("/proc/self/mountinfo", "rb") as f:
        yield None, f.read()
    seen = {_namespace("self")}
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return
    for pid in sorted(pids):
        ns = _namespace(str(pid))
        if ns is None or ns in seen:
            continue
        seen.add(ns)
        try:
            with open(f"/proc/{pid}/mountinfo", "rb") as f:
                yield pid, f.read()
        except OSError:  # the process ended, or is not ours to look at
            continue


def _namespace(pid: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _source_match(source: str, file_key: tuple[int, int] | None, users: dict[int, str]) -> tuple[object, str | None]:
    """For a mount without a real device number: what its source names, and how that relates to the path (None:
    it does not). The source is a block device (ntfs-3g, btrfs) or, for FUSE on an image, the file asked about."""
    if not source.startswith("/"):
        return source, None
    try:
        st = os.stat(source)
    except OSError:
        return source, None
    if stat.S_ISBLK(st.st_mode):
        return st.st_rdev, users.get(st.st_rdev)
    if file_key is not None and stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == file_key:
        return file_key, "the file itself"
    return source, None


# ---- sysfs: which block devices carry the storage of the path


def _users_of_file(key: tuple[int, int], loops: list[_Loop]) -> dict[int, str]:
    """Devices reading or writing a regular file: loop devices backed by it, and everything built on those."""
    users: dict[int, str] = {}
    for loop in loops:
        if loop.file == key:
            _expand(loop.dev, f"loop device {_name_or(loop.dev)} backed by it", users, loops, partitions=True)
    return users


def _users_of_device(dev: int, loops: list[_Loop]) -> dict[int, str]:
    """Devices sharing storage with block device `dev`: itself, its partitions, holders and loop devices on it,
    and (for a partition) the whole disk that contains it, with its holders."""
    users: dict[int, str] = {}
    _expand(dev, "the device itself", users, loops, partitions=True, obj="it")
    whole = _whole_disk(dev)
    if whole is not None:
        _expand(whole, f"whole disk {_name_or(whole)} containing it", users, loops, partitions=False)
    return users


def _expand(
    dev: int, via: str, users: dict[int, str], loops: list[_Loop], partitions: bool, obj: str | None = None
) -> None:
    """Record `dev` as reached by `via`, then what is built on it; `obj` names it in the phrases of those."""
    if dev in users:
        return
    users[dev] = via
    obj = obj or via
    if partitions:
        for part in _partitions(dev):
            _expand(part, f"partition {_name_or(part)} of {obj}", users, loops, partitions=False)
    for holder in _holders(dev):
        _expand(holder, f"{_holder_phrase(holder)} on {obj}", users, loops, partitions=True)
    for loop in loops:
        if loop.rdev == dev:
            _expand(loop.dev, f"loop device {_name_or(loop.dev)} on {obj}", users, loops, partitions=True)


def _sys(dev: int) -> str:
    return f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"


def _read_dev(path: str) -> int | None:
    """A sysfs "dev" file ("MAJ:MIN\\n") as a device number."""
    try:
        with open(path) as f:
            major, minor = f.read().strip().split(":")
        return os.makedev(int(major), int(minor))
    except (OSError, ValueError):
        return None


def _name(dev: int) -> str | None:
    """The kernel's name of a block device (loop3, sdb1, dm-0), from sysfs rather than from any path string."""
    try:
        return os.path.basename(os.readlink(_sys(dev)))
    except OSError:
        return None


def _device_path(dev: int) -> str | None:
    name = _name(dev)
    return "/dev/" + name.replace("!", "/") if name else None  # sysfs writes "/" in names (cciss/c0d0) as "!"


def _name_or(dev: int) -> str:
    return _device_path(dev) or f"block device {os.major(dev)}:{os.minor(dev)}"


def _partitions(dev: int) -> list[int]:
    base = _sys(dev)
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        return []
    found = []
    for e in entries:
        if os.path.exists(f"{base}/{e}/partition"):
            part = _read_dev(f"{base}/{e}/dev")
            if part is not None:
                found.append(part)
    return found


def _holders(dev: int) -> list[int]:
    try:
        names = sorted(os.listdir(f"{_sys(dev)}/holders"))
    except OSError:
        return []
    return [d for d in (_read_dev(f"/sys/class/block/{n}/dev") for n in names) if d is not None]


def _holder_phrase(dev: int) -> str:
    base = _sys(dev)
    try:
        with open(f"{base}/dm/name") as f:
            return f"device-mapper device {_name_or(dev)} ({f.read().strip()})"
    except OSError:
        pass
    return f"{'md array' if os.path.isdir(f'{base}/md') else 'device'} {_name_or(dev)}"


def _whole_disk(dev: int) -> int | None:
    """The disk a partition belongs to (its parent folder in sysfs); None for a whole disk."""
    base = _sys(dev)
    if not os.path.exists(f"{base}/partition"):
        return None
    return _read_dev(os.path.join(os.path.realpath(base), "..", "dev"))


@dataclass(frozen=True)
class _Loop:
    dev: int
    file: tuple[int, int] | None  # (st_dev, st_ino) of a regular backing file
    rdev: int | None  # the backing block device


def _loops() -> list[_Loop]:
    """Every bound loop device and what backs it. The kernel's LOOP_GET_STATUS64 gives the backing file's device
    and inode, which stay right when sysfs's backing_file text does not (" (deleted)", another mount namespace);
    the text is the fallback when the device node cannot be opened."""
    try:
        names = sorted(os.listdir("/sys/block"))
    except OSError:
        return []
    loops = []
    for name in names:
        if not os.path.isdir(f"/sys/block/{name}/loop"):
            continue  # not a loop device, or one with nothing attached
        dev = _read_dev(f"/sys/block/{name}/dev")
        if dev is None:
            continue
        backing = _loop_status(dev) or _loop_backing_file(name)
        if backing is not None:
            loops.append(_Loop(dev, *backing))
    return loops


def _loop_status(dev: int) -> tuple[tuple[int, int] | None, int | None] | None:
    path = _device_path(dev)
    if path is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(_LOOP_INFO64_SIZE))
    except OSError:
        return None
    finally:
        os.close(fd)
    device, inode, rdevice = _LOOP_INFO64.unpack_from(info)
    # lo_rdevice is the backing inode's rdev (0 for a file; kernels before 4.x gave st_dev there for files)
    if rdevice and rdevice != device:
        return None, rdevice
    return (device, inode), None


def _loop_backing_file(name: str) -> tuple[tuple[int, int] | None, int | None] | None:
    try:
        with open(f"/sys/block/{name}/loop/backing_file", "rb") as f:
            text = os.fsdecode(f.read().rstrip(b"\n"))
    except OSError:
        return None
    for candidate in (text, text.removesuffix(" (deleted)")):  # a file of that name now may be another inode
        try:
            st = os.stat(candidate)
            break
        except OSError:
            continue
    else:
        return None
    if stat.S_ISBLK(st.st_mode):
        return None, st.st_rdev
    return (st.st_dev, st.st_ino), None


def _printable(text: str) -> str:
    """Control characters and undecodable bytes escaped, so that a line of evidence stays one line."""
    if text.isprintable():
        return text
    out = []
    for c in text:
        if c.isprintable():
            out.append(c)
        elif 0xDC80 <= ord(c) <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
            out.append(f"\\x{ord(c) - 0xDC00:02x}")
        else:
            out.append(c.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def in_use(path: str, *, writable_only: bool) -> str:
    """One line of evidence that something mounted (or holding the device exclusively) uses the storage
    behind `path`, or "" when nothing does. With writable_only, read-only mounts do not count (reading is
    safe under them; writing never is)."""
    uses = mounted_uses(path)
    found = read_write(uses) if writable_only else uses
    if found:
        return describe(found[0])
    if uses:
        return ""
    fd = exclusive_open(path, os.O_RDONLY)
    if fd is None:
        return f"{path} is held exclusively by another user (a mount elsewhere, swap, RAID or device-mapper)"
    os.close(fd)
    return ""
