"""Export a point as a VM disk image (raw, qcow2, vhdx, vmdk) by serving it over NBD on a private Unix
socket to `qemu-img convert`: qemu-img knows every format, and the block status the server reports lets
it skip zero and unused blocks, so the image is sparse (raw) or small (the others).

The image is written as OUT.tmp-XXXXXXXX beside OUT and appears under its name only once qemu-img
succeeded and the file is flushed: an interrupted or failed export never leaves a partial image at OUT.
The temporary is locked while the export runs, so the next export to OUT removes one a killed export left
(pending.py)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field

from .. import interrupts, pending
from ..chain import Catalog
from ..errors import ImagechainError, IntegrityError, MountError, NoSpaceError, TargetError, UsageError
from ..format.reader import PointFiles
from ..keyring import Keyring
from ..repository import Repository
from ..sizes import human
from ..stores.local import fsync_folder, too_big_for_fat
from ..view import PointView
from .server import NbdServer, close_view

FORMATS = ("raw", "qcow2", "vhdx", "vmdk")


@dataclass
class ExportResult:
    point_id: str
    out: str
    format: str
    volume_size: int
    file_bytes: int  # the image's size
    allocated_bytes: int  # what it takes on disk (sparse)
    duration_s: float
    notices: list[str] = field(default_factory=list)  # what was found and done on the way (leftovers removed)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def qemu_img() -> str:
    found = shutil.which("qemu-img")
    if found is None:
        raise MountError("qemu-img is not installed; export needs it (Debian: apt-get install qemu-utils)")
    return found


def export(repo: Repository, point: PointFiles, out: str, fmt: str, *, cat: Catalog | None = None,
           force: bool = False, keyring: Keyring | None = None, threads: int = 4) -> ExportResult:  # fmt: skip
    """Write point's volume to OUT as an image of format fmt. An existing OUT is replaced only with force."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r} (one of {', '.join(FORMATS)})")
    exe = qemu_img()
    _check_target(out, force, repo)
    size = point.header.volume_size
    if fmt == "raw" and too_big_for_fat(out, size):
        raise TargetError(f"export target {out} is on a FAT filesystem, whose files hold at most 4 GiB - 1 byte; "
                          f"a raw image of this volume is {human(size)}: export to another filesystem, or as "
                          f"qcow2, vhdx or vmdk")  # fmt: skip
    started = time.monotonic()
    errors: list[str] = []
    notices: list[str] = []
    for left, n in pending.sweep(out):
        notices.append(f"removed {left} ({human(n)}), left by an export that did not finish")
    try:
        fd, tmp = pending.create(out)  # held (and locked) until published: qemu-img writes it by name
    except OSError as e:
        raise TargetError(f"cannot create export target {out}: {e.strerror}") from e
    try:
        view = PointView(repo, point, cat=cat, keyring=keyring, threads=threads)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    server = NbdServer(view, log=errors.append)
    proc: subprocess.Popen[str] | None = None
    try:
        uri = server.start_background()
        # -f raw: the volume may itself hold an image file whose header qemu would otherwise obey
        cmd = [exe, "convert", "-f", "raw", "-O", fmt, *(["-S", "4k"] if fmt == "raw" else []), uri, tmp]
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip
        _out, err = proc.communicate()
        if proc.returncode != 0:
            raise _failure(err, errors, out)
        _publish(tmp, out, force)
        st = os.stat(out)
    except BaseException as e:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, KeyboardInterrupt):
            stop = interrupts.as_stopped(e)
            stop.what = f"nothing was written to {out}"
            raise stop from None
        raise
    finally:
        os.close(fd)
        server.stop()
        close_view(view)
    return ExportResult(str(point.point_id), out, fmt, view.size, st.st_size, st.st_blocks * 512,
                        time.monotonic() - started, notices)  # fmt: skip


def _check_target(out: str, force: bool, repo: Repository) -> None:
    if not out or out.endswith("/"):
        raise TargetError(f"export target {out!r} names no file")
    if repo.holds(out):
        raise TargetError(f"export target {out} is inside the repository being read ({repo.display})")
    folder = os.path.dirname(os.path.abspath(out))
    if pending.in_dev(out):
        raise TargetError(f"export target {out} is under /dev: an export is a file, never made there")
    if not os.path.isdir(folder):
        raise TargetError(f"cannot export to {out}: no folder {folder}")
    if os.path.lexists(out):
        if not force:
            raise TargetError(f"export target {out} exists; add --force to replace it")
        if not os.path.isfile(out) or os.path.islink(out):
            raise TargetError(f"export target {out} is not a regular file; not replaced")


def _failure(stderr: str, server_errors: list[str], out: str) -> ImagechainError:
    """One line saying why: the server's own reason (a corrupt block) before qemu-img's echo of it."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    said = lines[-1] if lines else "no message"
    if server_errors:
        more = f" (and {len(server_errors) - 1} more read error(s))" if len(server_errors) > 1 else ""
        return IntegrityError(f"export failed: {server_errors[0].removeprefix('serve: ')}{more}; "
                              f"nothing was written to {out}")  # fmt: skip
    if "No space left" in said:
        return NoSpaceError(f"export failed: {said}; nothing was written to {out}")
    return MountError(f"export failed: {said}; nothing was written to {out}")


def _publish(tmp: str, out: str, force: bool) -> None:
    """Flush the image (opened by name: what qemu-img wrote there, whatever it did to the file), then give it
    its name: over an existing OUT only with force."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    with interrupts.deferred():
        if force:
            os.replace(tmp, out)
        else:
            try:
                pending.publish(tmp, out)
            except FileExistsError:
                raise TargetError(f"export target {out} appeared while exporting; not replaced") from None
    fsync_folder(os.path.dirname(os.path.abspath(out)))
