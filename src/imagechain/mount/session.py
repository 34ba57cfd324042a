"""One mount of a point, from start to finish: what it shows (a plan), setting it up in order (FUSE
filesystem, loop devices, filesystems inside), recording each step as it is done, serving, and taking it all
down. Also the background mount (a child process that serves, started before any thread exists here) and
restore-files (a private mount for the time of one copy)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..address import Resolved
from ..engine.restore import partition_window
from ..errors import ImagechainError, IntegrityError, MountError, TargetError, UsageError
from ..format import spec
from ..fsprobe import PROBE_BYTES, probe
from ..interrupts import Stopped, deferred
from ..keyring import Keyring
from ..view import PointView
from . import copyout, files, state, system
from .fuse import Image, PointFS, Server
from .state import Inner, Record

LIVE_TIMEOUT_S = 30.0  # for the FUSE filesystem to answer
READY_TIMEOUT_S = 300.0  # for a background mount to be set up (opening a long encrypted chain takes a while)
Notice = Callable[[str], None]


@dataclass(frozen=True)
class Filesystem:
    image: Image
    folder: str  # where it is mounted, relative to the mount point: files, files/part1
    kind: str  # fsprobe's: ext4 (also ext2/3), xfs, ntfs, exfat, vfat


@dataclass
class Plan:
    images: list[Image]
    filesystems: list[Filesystem] = field(default_factory=list)
    skipped: list[tuple[Image, str]] = field(default_factory=list)  # (image, what it holds, if anything known)


def layout_of(header: spec.PointHeader) -> dict[str, Any] | None:
    layout = header.metadata.get("layout")
    return layout if isinstance(layout, dict) and isinstance(layout.get("partitions"), list) else None


def images_of(header: spec.PointHeader) -> list[Image]:
    """disk.img, and for a disk point one window per partition (clipped to the volume, should a table claim
    more than it holds)."""
    out = [Image("disk.img", 0, header.volume_size)]
    layout = layout_of(header)
    for p in layout["partitions"] if layout else []:
        if isinstance(p, dict) and isinstance(p.get("number"), int):
            start, size = partition_window(header, p["number"])
            length = max(0, min(size, header.volume_size - start))
            out.append(Image(f"part{p['number']}.img", start, length, p["number"]))
    return out


def plan(view: PointView, header: spec.PointHeader, with_files: bool, only: int | None = None) -> Plan:
    """What the FUSE filesystem shows and, with_files, which filesystems are mounted inside: each one whose
    superblock says it is a kind that can be mounted read-only here (the volume's for a plain point, each
    partition's for a disk point; only partition `only` if given)."""
    images = images_of(header)
    out = Plan(images)
    if not with_files:
        return out
    layout = layout_of(header)
    if layout is None:
        candidates = images[:1]
    else:
        volumes = layout.get("volumes")
        numbers = {v.get("number") for v in volumes if isinstance(v, dict)} if isinstance(volumes, list) else None
        candidates = [i for i in images[1:] if numbers is None or i.number in numbers]  # not extended containers
    if only is not None:
        candidates = [i for i in candidates if i.number == only]
    for img in candidates:
        try:
            found = probe(view.read(img.offset, min(PROBE_BYTES, img.length)))
        except IntegrityError as e:
            out.skipped.append((img, f"its first blocks are unreadable: {e}"))
            continue
        if found is not None and found.kind in files.DRIVERS:
            folder = "files" if layout is None else f"files/part{img.number}"
            out.filesystems.append(Filesystem(img, folder, found.kind))
        else:
            out.skipped.append((img, found.kind if found is not None else ""))
    return out


def check_mountpoint(path: str) -> str:
    """The mount point's real path; it must be an empty folder that nothing of ours is mounted on."""
    real = os.path.realpath(path)
    if state.load(real) is not None:
        raise MountError(f"{real} has an imagechain mount already (or one whose server died): "
                         f"`imagechain umount {real}` first")  # fmt: skip
    try:
        entries = os.listdir(real)
    except FileNotFoundError:
        raise MountError(f"mount point {path} does not exist (create an empty folder)") from None
    except NotADirectoryError:
        raise MountError(f"mount point {path} is not a folder") from None
    except OSError as e:
        dead = e.errno in (errno.ENOTCONN, errno.ECONNABORTED)
        hint = f" (a FUSE filesystem whose server died is mounted there: `imagechain umount {real}` or " \
               f"`fusermount3 -u {real}`)" if dead else ""  # fmt: skip
        raise MountError(f"cannot use {path} as a mount point: {e.strerror or e}{hint}") from e
    if entries:
        raise MountError(f"mount point {path} is not empty")
    return real


def check_outside(res: Resolved, mountpoint: str) -> None:
    """A repository is every file below its folder: a mount inside it would have the point's files (every
    file of its filesystems, and any image files among them) read as part of it."""
    if res.repo.holds(mountpoint):
        raise MountError(f"mount point {mountpoint} is inside the repository being read ({res.repo.display}): "
                         f"what it shows would be read as part of it; mount it elsewhere")  # fmt: skip


KINDS_TEXT = "ext2/3/4, XFS, NTFS, FAT and exFAT"


def describe_skip(img: Image, kind: str, whole_disk: bool) -> str:
    """What a volume or partition that will not be mounted holds, in words."""
    what = f"partition {img.number}" if img.number is not None else ("the disk" if whole_disk else "the volume")
    if kind.startswith("its first blocks"):
        return f"{what}: {kind}"
    return f"{what} holds {kind or 'no filesystem imagechain recognises'}"


class Session:
    """A mount point being served by this process."""

    def __init__(self, view: PointView, header: spec.PointHeader, mountpoint: str, the_plan: Plan, record: Record,
                 allow_other: bool = False, log: Notice | None = None) -> None:  # fmt: skip
        self.view, self.header, self.mountpoint, self.plan, self.record = view, header, mountpoint, the_plan, record
        self.allow_other = allow_other
        self.log: Notice = log or (lambda m: print(f"imagechain: {m}", file=sys.stderr, flush=True))
        folders = [f.folder for f in the_plan.filesystems]
        fs = PointFS(view, the_plan.images, folders, header.created_us * 1000, self.log)
        self.server = Server(fs, mountpoint, allow_other)
        self.mounted: list[Filesystem] = []
        self.claimed = False  # the mount point is ours to set up and take down

    def up(self, notice: Notice, strict: bool = False) -> None:
        """Serve, then mount each filesystem inside; every step is in the record before the next one starts.
        A filesystem that will not mount is an error for a single one (or when strict); among a disk's
        partitions it is a notice, and the others are still mounted."""
        state.claim(self.record)
        self.claimed = True
        self.server.start()
        self.server.wait_live(LIVE_TIMEOUT_S)
        for img, kind in self.plan.skipped:
            path = os.path.join(self.mountpoint, img.name)
            what = describe_skip(img, kind or files.blkid_type(path), layout_of(self.header) is not None)
            notice(f"{what}; not mounted (--files mounts {KINDS_TEXT})")
        for fs in self.plan.filesystems:
            try:
                self._mount(fs)
            except MountError as e:
                if strict or len(self.plan.filesystems) == 1:
                    raise
                notice(f"partition {fs.image.number} not mounted: {e}")

    def _mount(self, fs: Filesystem) -> None:
        dev = system.attach_loop(os.path.join(self.mountpoint, fs.image.name))
        self.record.loops.append(dev)
        state.save(self.record)
        target = os.path.join(self.mountpoint, fs.folder)
        try:
            driver = files.mount_fs(fs.kind, dev, target, self.allow_other)
        except MountError:
            system.detach_loop(dev)
            self.record.loops.remove(dev)
            state.save(self.record)
            raise
        self.record.mounts.append(Inner(target, dev, fs.kind, *(driver or (None, None))))
        state.save(self.record)
        self.mounted.append(fs)

    def down(self, lazy: bool = False, notice: Notice | None = None) -> None:
        """Take everything down (MountError when busy, and then nothing was touched) and let libfuse end."""
        if not self.claimed:  # another mount's, or nothing was set up
            return
        with deferred():  # a second stop must not cut the taking down in two
            state.take_down(self.mountpoint, self.record, lazy=lazy, notice=notice or self.log)
        self.server.join(LIVE_TIMEOUT_S)

    def serve(self, notice: Notice) -> None:
        """Until unmounted from outside (`imagechain umount`, fusermount3 -u) or stopped by a signal. A stop
        while the mount is busy is refused (said on stderr) and serving goes on."""
        while self.server.running:
            try:
                self.server.join(1.0)
            except Stopped as stop:
                try:
                    self.down(notice=notice)
                except MountError as e:
                    self.log(f"not unmounted on {stop.name}: {e}")
                    continue
                stop.what = f"{self.mountpoint} was unmounted"
                raise
        # unmounted from outside: what is left (loop devices over a lazily detached tree) goes too
        state.take_down(self.mountpoint, self.record, lazy=True, notice=notice)

    def summary(self) -> dict[str, Any]:
        return {
            "mountpoint": self.mountpoint,
            "point_id": str(self.header.point_id),
            "pid": os.getpid(),
            "images": [[i.name, i.length] for i in self.plan.images],
            "filesystems": [[f.folder, f.kind, f.image.number] for f in self.mounted],
            "log": self.record.log,
        }


def new_record(mountpoint: str, address: str, header: spec.PointHeader, log: str | None = None,
               private: bool = False) -> Record:  # fmt: skip
    pid = os.getpid()
    return Record(mountpoint, address, str(header.point_id), pid, system.start_time(pid), log, private)


# ---- background mounts


class Ready:
    """The child's side of a background mount: notices, then `ready` or `error`, as JSON lines on a pipe."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def send(self, **msg: Any) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):  # the parent gave up waiting: nothing to tell
            os.write(self.fd, (json.dumps(msg) + "\n").encode())
        if "ready" in msg or "error" in msg:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = None


def spawn(argv: list[str], mountpoint: str, secret: bytes | None, notice: Notice) -> dict[str, Any]:
    """Run the mount command in the foreground in a child process of its own session (it outlives us; no
    fork here, where threads may run), and wait until it says the mount is ready. Its messages go to a log
    file beside its record. A passphrase asked here reaches it through a pipe, never the command line."""
    log = state.state_path(mountpoint, ".log")
    os.makedirs(os.path.dirname(log), mode=0o700, exist_ok=True)
    r, w = os.pipe()
    keep = [w]
    args = list(argv)
    if secret is not None:
        pr, pw = os.pipe()
        os.write(pw, secret + b"\n")
        os.close(pw)
        keep.append(pr)
        args += ["--passphrase-file", f"/dev/fd/{pr}"]
    with open(log, "wb") as out:
        proc = subprocess.Popen([*args, "--ready-fd", str(w), "--log", log], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=out, pass_fds=keep, start_new_session=True)  # fmt: skip
    for fd in keep:
        os.close(fd)
    try:
        return _await(proc, r, log, notice)
    except BaseException as e:
        if proc.poll() is None:  # stopped, or it took too long: it takes down what it set up
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(LIVE_TIMEOUT_S)
        if isinstance(e, Stopped):
            e.what = f"nothing is mounted at {mountpoint}"
        raise
    finally:
        os.close(r)


def _await(proc: subprocess.Popen[bytes], r: int, log: str, notice: Notice) -> dict[str, Any]:
    deadline = time.monotonic() + READY_TIMEOUT_S
    buf = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise MountError(f"the mount was not ready after {READY_TIMEOUT_S:.0f} s; stopped (log: {log})")
        readable, _, _ = select.select([r], [], [], min(left, 1.0))
        chunk = os.read(r, 65536) if readable else b""
        if readable and not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            msg = json.loads(line)
            if "notice" in msg:
                notice(str(msg["notice"]))
            elif "ready" in msg:
                return dict(msg["ready"])
            elif "error" in msg:
                e = MountError(str(msg["error"]["message"]))
                e.exit_code = int(msg["error"]["exit_code"])
                raise e
    code = proc.wait(LIVE_TIMEOUT_S)
    try:
        with open(log, encoding="utf-8", errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        lines = []
    raise MountError(f"the mount process ended (exit code {code}) before the mount was ready"
                     f"{': ' + lines[-1] if lines else ''}")  # fmt: skip


# ---- restore-files


@dataclass
class Restored:
    point_id: str
    partition: int | None
    kind: str
    copied: copyout.Copied


def restore_files(res: Resolved, keyring: Keyring, paths: list[str], dest: str, partition: int | None,
                  force: bool, notice: Notice) -> Restored:  # fmt: skip
    """Copy PATHs out of the point's filesystem (of partition `partition`, or the only one a disk point has)
    through a private mount, taken down however this ends."""
    dest = os.path.abspath(dest)
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise TargetError(f"{dest} exists and is not a folder")
    if res.repo.holds(dest):
        raise TargetError(f"{dest} is inside the repository being read ({res.repo.display}): what is copied there "
                          f"would be read as part of it")  # fmt: skip
    header = res.point.header
    if partition is not None:
        partition_window(header, partition)  # no such partition: an error before anything is mounted
    cleanup_private(notice)
    with PointView(res.repo, res.point, cat=res.catalog, keyring=keyring) as view:
        p = plan(view, header, True, partition)
        fs = _choose(p, header)
        p = Plan(p.images, [fs])
        tmp = tempfile.mkdtemp(prefix="imagechain-files-")
        session = Session(view, header, tmp, p, new_record(tmp, "restore-files", header, private=True))
        copying = False
        try:
            session.up(notice, strict=True)
            root = os.path.join(tmp, fs.folder)
            sources = [(path, files.resolve_inside(root, path)) for path in paths]
            copying = True  # from here copy_out says what a stop left
            copied = copyout.copy_out(root, sources, dest, force, notice)
        except Stopped as stop:
            stop.what = f"the private mount was taken down; {stop.what if copying else f'nothing was copied to {dest}'}"
            raise
        finally:
            session.down(lazy=True, notice=notice)
            with contextlib.suppress(OSError):
                os.rmdir(tmp)
    return Restored(str(header.point_id), fs.image.number, fs.kind, copied)


def _choose(p: Plan, header: spec.PointHeader) -> Filesystem:
    if len(p.filesystems) == 1:
        return p.filesystems[0]
    if p.filesystems:
        have = ", ".join(f"{f.image.number} ({f.kind})" for f in p.filesystems)
        raise UsageError(f"point {str(header.point_id)[:8]} has filesystems on partitions {have}: choose one with "
                         f"--partition N")  # fmt: skip
    whole = layout_of(header) is not None
    why = "; ".join(describe_skip(i, k, whole) for i, k in p.skipped) or "the point has no partitions"
    raise MountError(f"{why}: restore-files reads {KINDS_TEXT}")


def cleanup_private(notice: Notice) -> None:
    """Private mounts whose restore-files was killed (its process is gone) are taken down and their
    folders removed."""
    for rec in state.records():
        if rec.private and not system.alive(rec.pid, rec.pid_start):
            try:
                state.take_down(rec.mountpoint, rec, lazy=True, notice=notice)
                os.rmdir(rec.mountpoint)
                notice(f"took down the private mount {rec.mountpoint} left by a killed restore-files")
            except (ImagechainError, OSError) as e:
                notice(f"could not take down the private mount {rec.mountpoint} left by a killed restore-files: {e}")
