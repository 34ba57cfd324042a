"""CLI commands of the mount package (registered on the main group by cli.py): mount, umount, restore-files
(docs/MOUNT.md)."""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

import click

from .. import interrupts
from ..errors import ImagechainError, MountError


def _need_fuse() -> None:
    """FUSE's pieces, checked first so that their absence is one clear line, not libfuse's complaint."""
    if not os.path.exists("/dev/fuse"):
        raise MountError("FUSE is not available: /dev/fuse is missing (modprobe fuse; in a container, give it "
                         "/dev/fuse)")  # fmt: skip
    if shutil.which("fusermount3") is None:
        raise MountError("fusermount3 is not installed (apt-get install fuse3)")
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as e:
        raise MountError(f"FUSE is not available: {e} (apt-get install fuse3)") from e


def _notice(message: str) -> None:
    click.echo(f"notice: {message}", err=True)


def _shown(summary: dict[str, Any], address: str) -> str:
    from ..sizes import human

    mnt = summary["mountpoint"]
    images = ", ".join(f"{name} ({human(size)})" for name, size in summary["images"])
    inside = "".join(f"; {folder}/ ({kind})" for folder, kind, _n in summary["filesystems"])
    return f"mounted point {summary['point_id'][:8]} ({address}) read-only at {mnt}: {images}{inside}"


def register(main: click.Group) -> None:
    """Add mount, umount and restore-files to the CLI."""
    from ..cli import _keyring, handle_errors, key_options

    @main.command()
    @click.argument("point")
    @click.argument("mountpoint")
    @click.option("--files", "with_files", is_flag=True, help="Also mount the filesystem(s) inside read-only, under "
                  "MOUNTPOINT/files (a disk's partitions under files/part<N>).")  # fmt: skip
    @click.option("--foreground", is_flag=True, help="Serve in this process until Ctrl-C or `imagechain umount` "
                  "(default: return once the mount is ready, a background process serves it).")  # fmt: skip
    @click.option("--allow-other", is_flag=True, help="Let other users than the one mounting read it (the "
                  "files' own permissions still apply).")  # fmt: skip
    @key_options
    @click.option("--ready-fd", type=int, hidden=True)  # a background mount's child: where to say it is ready
    @click.option("--log", "log_path", hidden=True)  # ...and where its messages go
    @handle_errors
    def mount(point: str, mountpoint: str, with_files: bool, foreground: bool, allow_other: bool,
              passphrase_file: str | None, identity: str | None, ready_fd: int | None,
              log_path: str | None) -> None:  # fmt: skip
        """Mount POINT read-only at MOUNTPOINT (an empty folder) as disk.img, part<N>.img per partition, and
        with --files the filesystems inside."""
        if not foreground:
            _background(point, mountpoint, with_files, allow_other, passphrase_file, identity)
            return
        _foreground(point, mountpoint, with_files, allow_other, passphrase_file, identity, ready_fd, log_path)

    @main.command()
    @click.argument("mountpoint")
    @handle_errors
    def umount(mountpoint: str) -> None:
        """Take down a mount made by `imagechain mount`: the filesystems inside, their loop devices, the FUSE
        filesystem and its server; also after the server died."""
        from . import state, system

        real = os.path.realpath(mountpoint)
        rec = state.load(real)
        top = system.mount_at(real)
        if top is not None and top.fstype != state.FSTYPE:
            raise MountError(f"{real} is not an imagechain mount ({top.fstype} of {top.source} is mounted there)")
        if rec is None and top is None and not system.loops_under(real):
            raise MountError(f"nothing of imagechain is mounted at {real}")
        state.take_down(real, rec, notice=_notice)
        if rec is not None and rec.private:
            os.rmdir(real)
        click.echo(f"unmounted {real}")

    @main.command(name="restore-files")
    @click.argument("point")
    @click.argument("paths", nargs=-1, required=True, metavar="PATH...")
    @click.argument("dest")
    @click.option("--partition", type=int, metavar="N", help="The partition of a disk point to copy from "
                  "(default: the only one holding a filesystem).")  # fmt: skip
    @click.option("--force", is_flag=True, help="Overwrite what DEST already holds under the same names.")
    @key_options
    @handle_errors
    def restore_files(point: str, paths: tuple[str, ...], dest: str, partition: int | None, force: bool,
                      passphrase_file: str | None, identity: str | None) -> None:  # fmt: skip
        """Copy files and folders (PATH: a path inside the point's filesystem) out of POINT into the folder
        DEST, with owner, mode, times, ACLs, extended attributes, symlinks as symlinks."""
        from ..address import open_point
        from ..sizes import human

        _need_fuse()
        from .session import restore_files as run

        res = open_point(point)
        r = run(res, _keyring(passphrase_file, identity), list(paths), dest, partition, force, _notice)
        where = f"partition {r.partition}, " if r.partition is not None else ""
        n, k = r.copied.items, r.copied.files  # files: regular files and symlinks
        click.echo(f"restored {n} path{'s' if n != 1 else ''} ({k} file{'s' if k != 1 else ''}, "
                   f"{human(r.copied.bytes)}) from point {r.point_id[:8]} ({where}{r.kind}) to "
                   f"{os.path.abspath(dest)}")  # fmt: skip


def _background(point: str, mountpoint: str, with_files: bool, allow_other: bool, passphrase_file: str | None,
                identity: str | None) -> None:  # fmt: skip
    """Start the serving process and wait for it to say the mount is ready. Nothing heavy is opened here
    (no thread runs), and a passphrase the point needs is asked for here, where the terminal is."""
    from ..address import open_point
    from ..cli import _keyring
    from ..crypto import SLOT_PASSPHRASE, slot_kind, slots
    from .session import check_mountpoint, check_outside, spawn

    _need_fuse()
    real = check_mountpoint(mountpoint)
    res = open_point(point)
    check_outside(res, real)
    ring = _keyring(passphrase_file, identity)
    secret = None
    lineage = res.catalog.lineage(res.point)
    needs = any(p.header.encrypted and SLOT_PASSPHRASE in {slot_kind(s) for s in slots(p.header.key_material)}
                for p in lineage)  # fmt: skip
    if needs and ring.identity is None and ring.passphrase is None:
        asked = ring.need_passphrase()  # on the terminal, or CredentialsError without one
        secret = asked.secret if asked is not None else None
    debug = click.get_current_context().find_root().params.get("debug", False)
    argv = [sys.executable, "-c", "from imagechain.entry import run; run()", *(["--debug"] if debug else []),
            "mount", point, real, "--foreground", *(["--files"] if with_files else []),
            *(["--allow-other"] if allow_other else []),
            *(["--passphrase-file", os.path.abspath(passphrase_file)] if passphrase_file else []),
            *(["--identity", os.path.abspath(identity)] if identity else [])]  # fmt: skip
    summary = spawn(argv, real, secret, _notice)
    click.echo(_shown(summary, point))
    click.echo(f"served by process {summary['pid']} (messages: {summary['log']}); `imagechain umount {real}` "
               f"takes it down")  # fmt: skip


def _foreground(point: str, mountpoint: str, with_files: bool, allow_other: bool, passphrase_file: str | None,
                identity: str | None, ready_fd: int | None, log_path: str | None) -> None:  # fmt: skip
    """Set the mount up and serve it here. A background mount's child tells its parent each notice and then
    `ready` (or the error) through `ready_fd`."""
    from ..address import open_point
    from ..cli import _keyring
    from ..view import PointView
    from .session import Ready, Session, check_mountpoint, check_outside, new_record, plan

    ready = Ready(ready_fd)

    def notice(message: str) -> None:
        _notice(message)
        ready.send(notice=message)

    try:
        _need_fuse()
        real = check_mountpoint(mountpoint)
        res = open_point(point)
        check_outside(res, real)
        ring = _keyring(passphrase_file, identity, ask=ready_fd is None)  # a background child has no terminal
        with PointView(res.repo, res.point, cat=res.catalog, keyring=ring) as view:
            header = res.point.header
            session = Session(view, header, real, plan(view, header, with_files),
                              new_record(real, point, header, log=log_path), allow_other)  # fmt: skip
            try:
                session.up(notice)
            except BaseException as e:
                session.down(lazy=True, notice=_notice)
                if isinstance(e, interrupts.Stopped):
                    e.what = f"nothing is mounted at {real}"
                raise
            summary = session.summary()
            ready.send(ready=summary)
            if ready_fd is None:
                click.echo(_shown(summary, point))
                click.echo(f"serving until Ctrl-C or `imagechain umount {real}`", err=True)
            session.serve(_notice)
    except ImagechainError as e:
        ready.send(error={"message": str(e), "exit_code": e.exit_code, "kind": type(e).__name__})
        raise
    except KeyboardInterrupt as e:
        stop = interrupts.as_stopped(e)
        ready.send(error={"message": f"interrupted ({stop.name})", "exit_code": stop.exit_code, "kind": "Interrupted"})
        raise
    except Exception as e:
        ready.send(error={"message": f"{type(e).__name__}: {e}", "exit_code": 1, "kind": type(e).__name__})
        raise
