"""Open a volume for reading: a raw image file or a block device, with its size and identity."""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from dataclasses import dataclass

import blake3

from .errors import SourceError
from .fsprobe import PROBE_BYTES, Probe, probe

BLKGETSIZE64 = 0x80081272


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

    def read(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as e:
            raise SourceError(f"cannot read source {self.path} at {offset}: {e.strerror}") from e
        if len(data) != length:
            raise SourceError(
                f"source {self.path} ended at {offset + len(data)} bytes while reading; "
                f"it was {self.size} bytes when the backup started"
            )
        return data

    def hole(self, offset: int, length: int) -> bool:
        """True when [offset, offset+length) of an image file is a hole (reads as zeros, costs no read)."""
        if self.is_device:
            return False
        try:
            return os.lseek(self.fd, offset, os.SEEK_DATA) >= offset + length
        except OSError as e:
            return e.errno == errno.ENXIO  # no data at or after offset

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
        elif stat.S_ISREG(st.st_mode):
            size, is_dev = st.st_size, False
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
    identity = f"{p.kind}:{p.uuid}" if p else f"path:{os.path.realpath(path)}"
    sid = blake3.blake3(b"imagechain-source\0" + identity.encode()).digest(16)
    return Source(path, fd, size, is_dev, identity, sid, name or os.path.basename(os.path.normpath(path)), p)
