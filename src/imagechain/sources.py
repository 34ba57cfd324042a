"""Open a volume for reading: a raw image file or a block device, with its size and identity.

Two identities describe a source:

- ``identity`` (the header metadata's ``source_identity``; docs/REPOSITORY.md, "Identity") names the
  *volume*: its filesystem or partition-table UUID, else its real path. The source id, and so the
  chain a backup continues, is derived from it alone. Two disks cloned with ``dd``, or an image file
  and its ``cp``, share it.
- ``device_identity`` is evidence of which *physical thing* holds that volume, so that a backup
  can tell a clone from the volume a chain was made of (``same_source``). It is best effort: ``""``
  when nothing is known, never an error. Derivation, first match wins:

  * a regular file: ``file:<st_dev>:<st_ino>`` (decimal, from ``fstat`` of the opened file). A copy
    of an image file is another file, so it gets another identity.
  * a block device with device number MAJ:MIN: the folder ``D = realpath(/sys/dev/block/MAJ:MIN)``;
    when ``D/partition`` exists, D is a partition, its number ``N`` is that file's content and the
    disk is ``dirname(D)``; else the disk is D. From the disk's folder:

    - a loop device: ``loop:`` + the real path of the file in ``loop/backing_file``, then
      ``#offset=<bytes>`` when ``loop/offset`` is not 0 (``losetup -o``). A backing file the kernel
      shows as ``(deleted)`` gives ``""``.
    - else the first non-empty of ``device/wwid``, ``wwid`` (SCSI/SATA/NVMe world wide name, as the
      kernel shows it: ``naa.``, ``eui.``, ``t10.``, ``nvme.`` ...) giving ``wwn:<value>``, then
      ``device/serial`` (NVMe controller, MMC/SD), ``serial`` (virtio), ``device/vpd_pg80`` (the SCSI
      unit serial number page: its bytes 4 to 4 + big-endian length at 2..3) giving
      ``serial:<value>``. Values are text with surrounding whitespace removed and inner runs of
      whitespace (and NULs) made one space; a value made only of zeros (``0x`` allowed) counts as
      empty.
    - nothing found (device-mapper, md, zram, NBD, most USB bridges without a serial page, no
      /sys): ``""``. A partition number alone is no evidence.

    For a partition, ``#p<N>`` is appended: ``wwn:naa.5000c500a1b2c3d4#p1``, ``serial:S3Z9NB0K#p2``,
    ``loop:/srv/disk.img#p1``.

``same_source(recorded, current)`` compares a chain's recorded device identity with the source's:
None (no evidence) when either is ``""`` or they are of different kinds (the text before the first
``:``: ``wwn``, ``serial``, ``loop``, ``file``), because different kinds are different ways of
looking at possibly the same thing (a disk moved from SATA to a USB enclosure, an image file backed
up directly and through a loop device). Of the same kind, equal text is True and different text is
False: two different WWNs or serials are two different disks, two different partition numbers are two
different partitions, two different ``file:`` identities are two different files. A ``file:``
identity also differs, although the volume may well be the one the chain was made of, when the file
was moved to another filesystem, restored from a backup, replaced by a new file through a
write-then-rename (``rsync`` without ``--inplace``, many tools), or when its filesystem came back
with another device number (a removable disk that became ``sdc`` instead of ``sdb``); a ``loop:``
identity differs when the backing file was renamed or moved. Those are the cases the engine's
override is for: the source cannot tell them from a copy.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
import struct
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass

import blake3

from .errors import SnapshotError, SourceError, UsageError
from .fsprobe import PROBE_BYTES, Probe, probe

BLKGETSIZE64 = 0x80081272
SYS_DEV_BLOCK = "/sys/dev/block"

# the disk attributes that name one physical disk, in the order they are tried, with the kind they give
_DISK_EVIDENCE = (
    ("device/wwid", "wwn"),
    ("wwid", "wwn"),
    ("device/serial", "serial"),
    ("serial", "serial"),
    ("device/vpd_pg80", "serial"),
)


def pread_upto(fd: int, length: int, offset: int) -> bytes:
    """length bytes from offset, fewer only where the file ends: a read may return less than it was asked
    for without being at the end (FUSE and network filesystems)."""
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length and parts[-1]:
        parts.append(os.pread(fd, length - got, offset + got))
        got += len(parts[-1])
    return b"".join(parts)


@dataclass
class Source:
    path: str
    fd: int
    size: int
    is_device: bool
    identity: str  # "ext4:<uuid>", or "path:<realpath>" where the volume has no recognisable UUID
    source_id: bytes
    name: str
    probe: Probe | None
    device_identity: str = ""  # "wwn:...", "serial:...#p1", "loop:/path.img", "file:<dev>:<ino>" or ""
    mtime_ns: int = 0  # of a regular file when it was opened (0 for a device)
    ctime_ns: int = 0

    def read(self, offset: int, length: int) -> bytes:
        try:
            data = pread_upto(self.fd, length, offset)
        except OSError as e:
            raise SourceError(f"cannot read source {self.path} at {offset}: {e.strerror}") from e
        if len(data) != length:
            raise SourceError(
                f"source {self.path} ended at {offset + len(data)} bytes while reading; "
                f"it was {self.size} bytes when the backup started"
            )
        return data

    def read_into(self, offset: int, view: memoryview) -> None:
        """Fill view with the bytes at offset (no copy through an intermediate buffer)."""
        done = 0
        while done < len(view):
            try:
                n = os.preadv(self.fd, [view[done:]], offset + done)
            except OSError as e:
                raise SourceError(f"cannot read source {self.path} at {offset + done}: {e.strerror}") from e
            if n == 0:
                raise SourceError(f"source {self.path} ended at {offset + done} bytes while reading; "
                                  f"it was {self.size} bytes when the backup started")  # fmt: skip
            done += n

    def drop_cache(self, offset: int, length: int) -> None:
        """What the backup has read is of no further use to the host: keep its page cache for others."""
        with contextlib.suppress(OSError):
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)

    def data_chunks(self, chunk: int) -> bytearray | None:
        """Per `chunk` bytes of an image file: 1 where it holds data, 0 where it is all hole; None for a
        device, which has no holes. One walk over SEEK_DATA/SEEK_HOLE, made before the volume is read: once
        the kernel has read ahead into a hole that is an unwritten extent, SEEK_DATA reports its cached pages
        as data."""
        n = -(-self.size // chunk)
        if self.is_device:
            return None
        out = bytearray(n)
        off = 0
        try:
            while off < self.size:
                try:
                    first = os.lseek(self.fd, off, os.SEEK_DATA)
                except OSError as e:
                    if e.errno == errno.ENXIO:  # no data at or after off
                        break
                    raise
                if first >= self.size:
                    break
                end = min(os.lseek(self.fd, first, os.SEEK_HOLE), self.size)
                a, b = first // chunk, (end - 1) // chunk + 1
                out[a:b] = b"\1" * (b - a)
                off = max(end, first + 1)
        except OSError:  # SEEK_DATA refused: every chunk is read
            return bytearray(b"\1" * n)
        return out

    def lock_record(self) -> dict[str, object]:
        """What a chain lock says is being read, so a restore can refuse to write over it meanwhile."""
        st = os.fstat(self.fd)
        return {"path": os.path.realpath(self.path), "dev": st.st_dev, "ino": st.st_ino, "rdev": st.st_rdev}

    def check_unchanged(self) -> list[str]:
        """After the last read: raise SourceError when the size changed since open; for a regular file,
        warnings (one line each) when its mtime or ctime changed since open, else []."""
        try:
            if self.is_device:
                size, st = device_size(self.fd), None
            else:
                st = os.fstat(self.fd)
                size = st.st_size
        except OSError as e:
            raise SourceError(f"cannot check source {self.path} after reading it: {e.strerror}; "
                              f"nothing was published") from e  # fmt: skip
        if size != self.size:
            raise SourceError(f"source {self.path} changed size while being read "
                              f"(was {self.size} bytes, now {size}); nothing was published")  # fmt: skip
        if st is None:
            return []
        changed = [what for what, was, now in (("mtime", self.mtime_ns, st.st_mtime_ns),
                                               ("ctime", self.ctime_ns, st.st_ctime_ns)) if was != now]  # fmt: skip
        if not changed:
            return []
        return [f"source {self.path} was modified while being read ({' and '.join(changed)} changed): "
                f"the point may not be consistent; use a snapshot"]  # fmt: skip

    @contextlib.contextmanager
    def view(self, fd: int | None) -> Iterator[None]:
        """Read a snapshot of the volume (`fd`, of the same size) in place of the volume itself. Path,
        identity and name stay the source's: a snapshot is how a source is read, not which one. With
        None the source itself is read; what changed in it before now (a freeze flushing the filesystem
        inside an image file) is no change *while* it is read."""
        if fd is None:
            if not self.is_device:
                st = os.fstat(self.fd)
                self.mtime_ns, self.ctime_ns = st.st_mtime_ns, st.st_ctime_ns
            yield
            return
        st = os.fstat(fd)
        is_dev = stat.S_ISBLK(st.st_mode)
        size = device_size(fd) if is_dev else st.st_size
        if size != self.size:
            raise SnapshotError(f"the snapshot of {self.path} is {size} bytes, the source {self.size}: "
                                f"not a view of it; nothing was published")  # fmt: skip
        own = self.fd, self.is_device, self.mtime_ns, self.ctime_ns
        self.fd, self.is_device, self.mtime_ns, self.ctime_ns = fd, is_dev, st.st_mtime_ns, st.st_ctime_ns
        try:
            yield
        finally:
            self.fd, self.is_device, self.mtime_ns, self.ctime_ns = own

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def device_size(fd: int) -> int:
    buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
    return int(struct.unpack("<Q", buf)[0])


def open_source(path: str, name: str | None = None) -> Source:
    try:
        # O_NONBLOCK: opening a FIFO (or some character devices) for reading would otherwise wait forever
        # for a writer; the type is checked below and blocking reads are restored for files and devices
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError as e:
        raise SourceError(f"source not found: {path}") from e
    except OSError as e:
        raise SourceError(f"cannot open source {path}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode):
            size, is_dev = device_size(fd), True
            device_identity = block_device_identity(st.st_rdev)
            mtime_ns = ctime_ns = 0
        elif stat.S_ISREG(st.st_mode):
            size, is_dev = st.st_size, False
            device_identity = file_identity(st)
            mtime_ns, ctime_ns = st.st_mtime_ns, st.st_ctime_ns
        else:
            raise SourceError(f"source is neither a block device nor a regular file: {path}")
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        if size == 0:
            raise SourceError(f"source is empty: {path}")
        head = os.pread(fd, min(size, PROBE_BYTES), 0)
    except OSError as e:
        os.close(fd)
        raise SourceError(f"cannot read source {path}: {e.strerror}") from e
    except SourceError:
        os.close(fd)
        raise
    p = probe(head)
    identity = f"{p.kind}:{p.uuid}" if p else f"path:{path_text(os.path.realpath(path))}"
    # a name given with --source-name makes a source of its own (a clone of a disk backed up apart from it)
    named = identity if name is None else f"{identity}\0name={name}"
    sid = blake3.blake3(b"imagechain-source\0" + named.encode()).digest(16)
    return Source(path, fd, size, is_dev, identity, sid, name or path_text(os.path.basename(os.path.normpath(path))),
                  p, device_identity, mtime_ns, ctime_ns)  # fmt: skip


def path_text(path: str) -> str:
    """A path as text that can be written anywhere (UTF-8, JSON, a terminal): the bytes of a file name that
    are not UTF-8 (Python holds them as lone surrogates) become `\\xNN`; any other path is itself."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


# --- device identity (see the module docstring) ---


def file_identity(st: os.stat_result) -> str:
    """`file:<st_dev>:<st_ino>` of a regular file."""
    return f"file:{st.st_dev}:{st.st_ino}"


def block_device_identity(rdev: int, sys_dev_block: str = SYS_DEV_BLOCK) -> str:
    """The device identity of the block device numbered rdev, from sysfs; "" when nothing is known."""
    folder = os.path.realpath(os.path.join(sys_dev_block, f"{os.major(rdev)}:{os.minor(rdev)}"))
    if not os.path.isdir(folder):
        return ""
    part = _read_text(os.path.join(folder, "partition"))
    if part and not part.isdigit():
        return ""
    disk = os.path.dirname(folder) if part else folder
    ident = _loop_identity(disk) if os.path.isdir(os.path.join(disk, "loop")) else _disk_identity(disk)
    return f"{ident}#p{int(part)}" if ident and part else ident


def _loop_identity(disk: str) -> str:
    backing = _read_text(os.path.join(disk, "loop", "backing_file"))
    if not backing or backing.endswith(" (deleted)"):
        return ""
    ident = f"loop:{os.path.realpath(backing)}"
    offset = _read_text(os.path.join(disk, "loop", "offset"))
    if offset.isdigit() and int(offset):
        ident += f"#offset={int(offset)}"
    return ident


def _disk_identity(disk: str) -> str:
    for rel, kind in _DISK_EVIDENCE:
        path = os.path.join(disk, rel)
        value = _vpd_serial(_read_bytes(path)) if rel.endswith("vpd_pg80") else _read_text(path)
        value = _clean(value)
        if value and value.lower().removeprefix("0x").strip("0"):
            return f"{kind}:{value}"
    return ""


def _vpd_serial(page: bytes) -> str:
    """The product serial number of a SCSI VPD page 0x80 (Unit Serial Number)."""
    if len(page) < 4 or page[1] != 0x80:
        return ""
    n = int.from_bytes(page[2:4], "big")
    return page[4 : 4 + n].decode("ascii", "replace")


def _clean(value: str) -> str:
    return re.sub(r"[\s\0]+", " ", value).strip()


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(4096)
    except OSError:
        return b""


def _read_text(path: str) -> str:
    return _read_bytes(path).decode("utf-8", "replace").strip()


def same_source(recorded: str, current: str) -> bool | None:
    """Does a chain's recorded device identity match the source's? None when either is unknown ("").

    None too when they are evidence of different kinds (`wwn:` vs `serial:`, `loop:` vs `file:`):
    not comparable. Same kind: True when equal, else False (a different disk, partition or file;
    see the module docstring for when a `file:` or `loop:` identity changes without a copy)."""
    if not recorded or not current:
        return None
    if recorded.partition(":")[0] != current.partition(":")[0]:
        return None
    return recorded == current


# --- names given on the command line ---

MAX_NAME = 1024
NAME_RULE = ("1 to 1024 characters of UTF-8, without '/', '@', '::', control characters or line breaks, "
             "not only whitespace, and not '.' or '..'")  # fmt: skip


def check_name(kind: str, name: str) -> str:
    """A host, source or chain name as given on the command line, unchanged; UsageError when it breaks
    the rule (NAME_RULE): '/' separates and '@' selects in addresses (REPO::HOST/SOURCE/CHAIN@SEL),
    '::' separates the repository, and a name is shown on one line."""
    shown = repr(name) if len(name) <= 64 else repr(name[:60]) + f"... ({len(name)} characters)"
    why = _name_problem(name)
    if why:
        raise UsageError(f"invalid {kind} name {shown}: {why}; a {kind} name is {NAME_RULE}")
    return name


def _name_problem(name: str) -> str:
    if not name:
        return "it is empty"
    if len(name) > MAX_NAME:
        return f"it is {len(name)} characters long"
    if name in (".", ".."):
        return f"{name!r} is reserved"
    if "/" in name:
        return "it contains '/'"
    if "@" in name:
        return "it contains '@'"
    if "::" in name:
        return "it contains '::'"
    if any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in name):
        return "it contains a control character or line break"
    if any(0xDC80 <= ord(c) <= 0xDCFF for c in name):  # bytes of the command line that were not UTF-8
        return "it is not valid UTF-8"
    if not name.strip():
        return "it is only whitespace"
    return ""
