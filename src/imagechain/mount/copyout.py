"""Files and folders copied out of a mounted filesystem of a point into a folder (restore-files): all or
nothing. The copy is made in a locked staging folder inside the destination and its files are moved to their
names only once all of them are there, so a full disk, a corrupt block or a stop leaves no part-written file
under a real name, and a file --force replaces is whole old or whole new."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from .. import pending
from ..errors import ImagechainError, IntegrityError, NoSpaceError, TargetError, UsageError
from ..interrupts import Stopped, deferred
from ..sizes import human
from ..stores.local import filesystem_of


@dataclass
class Copied:
    items: int
    files: int
    bytes: int


STAGING = ".imagechain-files"  # DEST/.imagechain-files.tmp-XXXXXXXX holds a copy until all of it is there
NO_OWNERS = ("vfat", "exfat")  # filesystems without owners, modes, links or xattrs to keep


def copy_out(root: str, sources: list[tuple[str, str]], dest: str, force: bool,
             notice: Callable[[str], None]) -> Copied:  # fmt: skip
    """Copy each source ((the path as the user gave it, its real path under `root`, a mounted filesystem)) into
    the folder `dest`, with owner, mode, times, ACLs and extended attributes (`cp -a --preserve=all`; failures
    to keep xattrs or a security context where `dest` cannot hold them are not errors), symlinks as symlinks.
    Onto FAT and exFAT, bytes and times only, copied here (_copy_data).

    All or nothing: the copy goes to a locked folder in `dest` first, and its files are moved to their names
    only once every one of them is there. A failed or stopped copy leaves no part-written file, and an
    existing file that --force replaces keeps its content until its replacement is whole."""
    made = not os.path.lexists(dest)
    try:
        os.makedirs(dest, exist_ok=True)
    except OSError as e:
        raise TargetError(f"cannot create {dest}: {e.strerror or e}") from e
    if not os.path.isdir(dest):
        raise TargetError(f"{dest} is not a folder")
    done, fd, stage, proc = False, -1, "", None
    try:
        count, args, whole = _survey(sources, dest, force)
        kind = filesystem_of(dest)
        for left, n in pending.sweep(os.path.join(dest, STAGING), folders=True):
            notice(f"removed {left} ({human(n)}), left by a restore-files that did not finish")
        try:
            fd, stage = pending.create(os.path.join(dest, STAGING), folder=True)
        except OSError as e:
            raise TargetError(f"cannot write into {dest}: {e.strerror or e}") from e
        if kind in NO_OWNERS:
            try:
                skipped = _copy_data(args, stage)
            except OSError as e:
                said = _said(e, root, stage, dest)
                if kind == "vfat" and e.errno == errno.EPERM:
                    said[-1] += " (fusefat says so for a full disk too)"
                raise _failed(said, dest) from e
            if skipped:
                count.files -= len(skipped)  # what was copied: the summary line says so
                shown = ", ".join("/" + os.path.relpath(p, root) for p in skipped[:3])
                notice(f"{len(skipped)} symbolic link(s) or special file(s) not copied: {kind} cannot hold them "
                       f"({shown}{', ...' if len(skipped) > 3 else ''})")  # fmt: skip
        else:
            # the lock goes to cp too: a copy that outlives a killed imagechain keeps its folder from the sweep
            proc = subprocess.Popen(["cp", "-a", "--preserve=all", "--", *args, stage + "/"], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=(fd,))  # fmt: skip
            _, err = proc.communicate()
            if proc.returncode:
                lines = [_shown(ln, root, stage, dest) for ln in err.decode("utf-8", "replace").splitlines()
                         if ln.strip()]  # fmt: skip
                raise _failed(lines or [f"cp exited with code {proc.returncode}"], dest)
        with deferred():  # the moves are quick: a stop waits for them
            _publish(stage, dest, force, kind not in NO_OWNERS, whole)
            done = True
    except Stopped as stop:
        stop.what = f"all of the copy is in {dest}" if done else f"nothing was copied to {dest}"
        raise
    finally:
        if proc is not None and proc.poll() is None:  # stopped: its part-copy goes with the staging folder
            proc.kill()
            proc.wait()
        if stage:
            pending.remove(stage)
        if fd >= 0:
            os.close(fd)
        if made and not done:
            with contextlib.suppress(OSError):
                os.rmdir(dest)
    return count


def _survey(sources: list[tuple[str, str]], dest: str, force: bool) -> tuple[Copied, list[str], bool]:
    """Refuse what cannot be copied before anything is; (what will be copied, cp's source arguments,
    whether a filesystem's root is among them)."""
    count = Copied(len(sources), 0, 0)
    args, pairs, whole_any = [], [], False
    names: dict[str, str] = {}
    for given, src in sources:
        whole = os.path.ismount(src)  # a filesystem's root: its content goes into dest
        whole_any |= whole
        for name in sorted(os.listdir(src)) if whole else [os.path.basename(src)]:
            if name in names:
                raise UsageError(f"{names[name]} and {given} would both be copied to {os.path.join(dest, name)}")
            names[name] = given
            if os.path.lexists(os.path.join(dest, name)) and not force:
                raise TargetError(f"{os.path.join(dest, name)} exists (use --force to overwrite it)")
            pairs.append((os.path.join(src, name) if whole else src, os.path.join(dest, name)))
        args.append(src + "/." if whole else src)
        _count(src, count)
    device = os.stat(dest).st_dev
    for s, t in pairs:
        _no_folder_in_the_way(s, t, device)
    return count, args, whole_any


def _shown(text: str, root: str, stage: str, dest: str) -> str:
    """Paths as they are in the point and in dest, not under the private mount or the staging folder."""
    return text.replace(root.rstrip("/") + "/", "/").replace(stage + "/", dest.rstrip("/") + "/")


def _said(e: OSError, root: str, stage: str, dest: str) -> list[str]:
    where = e.filename if isinstance(e.filename, str) else ""
    return [_shown(f"{where}: {e.strerror or e}" if where else str(e.strerror or e), root, stage, dest)]


def _failed(lines: list[str], dest: str) -> ImagechainError:
    """The copy's error (the last of its lines); nothing of it was published."""
    why = lines[-1]
    if any("Input/output error" in ln for ln in lines):
        return IntegrityError(f"copying to {dest} failed: {why} (a block of the point is corrupt: see above); "
                              f"nothing was copied")  # fmt: skip
    if any("No space left on device" in ln or "Disk quota exceeded" in ln for ln in lines):
        return NoSpaceError(f"copying to {dest} failed: {why}; nothing was copied")
    return TargetError(f"copying to {dest} failed: {why}; nothing was copied")


def _copy_data(args: list[str], stage: str) -> list[str]:
    """Onto FAT and exFAT, which hold no owners, modes, links or xattrs: each file's bytes and times, each
    folder's times. What they cannot hold at all (symlinks, FIFOs, devices, sockets) is left out: returned."""
    left: list[str] = []
    for a in args:
        if a.endswith("/."):  # a filesystem's root: its content
            for name in sorted(os.listdir(a[:-2])):
                _copy_one(os.path.join(a[:-2], name), os.path.join(stage, name), left)
        else:
            _copy_one(a, os.path.join(stage, os.path.basename(a)), left)
    return left


def _copy_one(src: str, dst: str, left: list[str]) -> None:
    st = os.lstat(src)
    if stat.S_ISDIR(st.st_mode):
        os.mkdir(dst)
        for name in sorted(os.listdir(src)):
            _copy_one(os.path.join(src, name), os.path.join(dst, name), left)
    elif stat.S_ISREG(st.st_mode):
        try:
            shutil.copyfile(src, dst, follow_symlinks=False)
        except OSError as e:
            if not e.filename:  # the plain read/write copy names no file
                e.filename = src
            raise
    else:
        left.append(src)
        return
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def _no_folder_in_the_way(src: str, target: str, device: int) -> None:
    """--force replaces files and merges folders, but never replaces a folder (and all it holds) with a
    file; and files are moved into place by renames, which cannot reach into another filesystem mounted
    inside DEST. Both refused before anything is copied."""
    try:
        t = os.lstat(target)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(t.st_mode):
        return
    if not stat.S_ISDIR(os.lstat(src).st_mode):
        raise TargetError(f"{target} is a folder, and the point has a file there: --force replaces files, never "
                          f"folders; move it away first")  # fmt: skip
    if t.st_dev != device:
        raise TargetError(f"{target} is another filesystem, mounted there: restore its part into it on its own "
                          f"(as DEST)")  # fmt: skip
    for name in os.listdir(src):
        _no_folder_in_the_way(os.path.join(src, name), os.path.join(target, name), device)


def _publish(stage: str, dest: str, force: bool, owners: bool, whole: bool) -> None:
    """Move the finished copy from the staging folder to its names in dest. Folders are made anew and their
    files moved into them, never moved whole: fusefat loses a folder's content when it renames it."""
    if not force:
        for name in os.listdir(stage):
            if os.path.lexists(os.path.join(dest, name)):
                raise TargetError(f"{os.path.join(dest, name)} appeared while copying; nothing was copied")
    device = os.stat(dest).st_dev
    for name in os.listdir(stage):
        _no_folder_in_the_way(os.path.join(stage, name), os.path.join(dest, name), device)
    root = os.lstat(stage)
    try:
        _merge(stage, dest, owners)
        if whole and owners:  # the filesystem's root: its owner, mode and times go to dest, as cp gives them
            _copy_meta(stage, root, dest, owners)
    except OSError as e:
        name = (e.filename2 or e.filename or dest).replace(stage, dest)
        raise TargetError(f"cannot move the finished copy into {dest} ({name}): {e.strerror or e}; some of it may "
                          f"be there") from e  # fmt: skip


def _merge(src: str, dst: str, owners: bool) -> None:
    for name in sorted(os.listdir(src)):
        s, t = os.path.join(src, name), os.path.join(dst, name)
        try:
            there: os.stat_result | None = os.lstat(t)
        except FileNotFoundError:
            there = None
        st = os.lstat(s)
        if not stat.S_ISDIR(st.st_mode):
            if there is not None:
                os.rename(s, t)  # --force: the file (or link) there is replaced whole, in one step
            else:
                pending.publish(s, t)  # never over a name taken meanwhile
            if not owners:  # fusefat gives a file it renames the time of the rename
                os.utime(t, ns=(st.st_atime_ns, st.st_mtime_ns))
            continue
        if there is not None and not stat.S_ISDIR(there.st_mode):
            os.unlink(t)  # --force: a file or link where the point has a folder
            there = None
        if there is None:
            os.mkdir(t, 0o700)
        # st was taken before its files leave it, which changes its times
        _merge(s, t, owners)
        _copy_meta(s, st, t, owners)


def _copy_meta(src: str, st: os.stat_result, dst: str, owners: bool) -> None:
    """A folder's owner, mode, ACLs and xattrs as cp gave them to its copy, and its times as they were (st)
    before its files were moved out (times only on FAT)."""
    if owners:
        os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
        shutil.copystat(src, dst, follow_symlinks=False)  # mode, xattrs (ACLs among them)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


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
