"""Point-in-time views of live sources: how a volume is read so that a point reflects one moment.

A snapshot is *how* a source is read, never *which* source it is: the engine opens the source for its
identity, then reads the view a provider gives it. Providers (docs/SNAPSHOTS.md):

- ``none``: read the source itself (refused when it is mounted read-write, unless --allow-mounted);
- ``fsfreeze``: freeze the mounted filesystem(s) for the whole read, bounded by --max-freeze;
- ``reflink``: freeze the filesystems inside an image file for a moment, clone the file (FICLONE),
  thaw, read the clone;
- ``lvm``: an LVM snapshot of a logical volume.

``auto`` picks the best that applies: reflink for an image file whose filesystem can clone, lvm for a
logical volume, fsfreeze for a mounted volume with nothing better, else none.

A provider is a context manager that makes the moment on enter and gives `Capture` a descriptor to read
(or None: the source itself), with `check` (called as the read goes: raise once the moment no longer
holds) and `verify` (after the read). Windows VSS and ZFS zvol snapshots fit the same shape: VSS makes
a shadow copy of the volume (with its writers, the counterpart of --app) and returns the shadow
device; a zvol snapshot is made with `zfs snapshot`, read through its device node, destroyed after.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import SnapshotError, SourceError, UsageError
from ..mounts import MountUse, describe, in_use, mounted_uses, read_write
from . import apps, lvm, reflink
from .freeze import FREEZABLE, Freezer, FreezeTarget, presync
from .hooks import DEFAULT_TIMEOUT_S, Hooks

__all__ = ["MODES", "Capture", "Plan", "SnapshotOptions", "plan_snapshot"]

MODES = ("auto", "none", "fsfreeze", "reflink", "lvm")
DEFAULT_MAX_FREEZE_S = 60.0
CLONE_BUSY_WAIT_S = 10.0  # a filesystem frozen by someone else's clone is thawed within this


@dataclass
class SnapshotOptions:
    mode: str = "auto"
    max_freeze_s: float = DEFAULT_MAX_FREEZE_S  # how long fsfreeze may block writers (0: no limit)
    size: int | None = None  # a classic LVM snapshot's size (default: a share of the origin)
    pre: str | None = None  # --pre-snapshot command
    post: str | None = None  # --post-snapshot command
    hook_timeout_s: float = DEFAULT_TIMEOUT_S
    app: str | None = None  # a built-in database recipe (snapshots.apps)
    app_connect: str = ""

    def check(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"unknown --snapshot {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.max_freeze_s < 0 or self.hook_timeout_s < 0:
            raise UsageError("--max-freeze and --hook-timeout cannot be negative")
        if self.app is not None and self.app not in apps.APPS:
            raise UsageError(f"unknown --app {self.app!r}; choose one of {', '.join(apps.APPS)}")
        if self.mode == "none" and (self.pre or self.post or self.app):
            raise UsageError("--pre-snapshot, --post-snapshot and --app go with a snapshot, not --snapshot none")


@dataclass
class Plan:
    """What a backup will read and how, decided before the chain is locked."""

    provider: str  # none, fsfreeze, reflink, lvm
    why: str  # one phrase: why this provider (shown, and kept in the point)
    freeze: list[FreezeTarget] = field(default_factory=list)
    mounted: str = ""  # read while mounted read-write without a snapshot (--allow-mounted): the evidence
    volume: lvm.Volume | None = None
    keep_cache_off: bool = False  # the block-map cache is on a filesystem that will be frozen


def plan_snapshot(path: str, is_device: bool, opts: SnapshotOptions, allow_mounted: bool,
         writes: tuple[str, ...] = (), cache: str | None = None) -> Plan:  # fmt: skip
    """Choose how to read the source at `path`. `writes` are paths the backup writes while it reads (the
    repository): a freeze of their filesystem would block the backup itself, so it is refused."""
    opts.check()
    uses = mounted_uses(path)
    rw = read_write(uses)
    evidence = describe(rw[0]) if rw else in_use(path, writable_only=True)
    targets, unfreezable = _targets(rw)
    mode = opts.mode
    is_lv = is_device and lvm.is_logical_volume(os.stat(path).st_rdev)

    def unsafe(why: str, instead: Plan | None = None) -> Plan:
        """No consistent view can be had of a volume in use: refused unless --allow-mounted."""
        if not allow_mounted:
            raise SourceError(f"source {path} is in use: {evidence}; {why} (or --snapshot none --allow-mounted "
                              f"images it anyway, likely inconsistent)")  # fmt: skip
        if instead is not None:
            instead.mounted = evidence
            return instead
        return Plan("none", "mounted, read without a snapshot (--allow-mounted)", mounted=evidence)

    if mode == "none":
        if evidence:
            return unsafe("unmount it, mount it read-only or back it up with a snapshot (--snapshot auto)")
        return Plan("none", "chosen (--snapshot none)")
    if mode == "lvm" or (mode == "auto" and is_lv):
        if not is_lv:
            raise UsageError(f"--snapshot lvm: {path} is not an LVM logical volume")
        return Plan("lvm", "the source is an LVM logical volume", volume=lvm.volume_of(path))
    if mode == "reflink" or (mode == "auto" and not is_device):
        why = "it is a block device, not an image file" if is_device else reflink.supported(path)
        if not why:
            clone = Plan("reflink", "the image file's filesystem makes reflink clones", freeze=targets)
            if evidence and (unfreezable or not rw):  # a clone without a freeze: crash-consistent at best
                return unsafe(f"{unfreezable or 'what holds it'} cannot be frozen for the clone", clone)
            return clone
        if mode == "reflink":
            raise SnapshotError(f"--snapshot reflink: {path}: {why}")
    if mode == "fsfreeze" or (mode == "auto" and evidence):
        if not evidence:
            raise UsageError(f"--snapshot fsfreeze: {path} is not mounted read-write; there is nothing to freeze "
                             f"(use --snapshot none)")  # fmt: skip
        if unfreezable or not rw:
            if mode == "fsfreeze":
                raise SnapshotError(f"--snapshot fsfreeze: {unfreezable or evidence}: cannot be frozen")
            return unsafe(f"{unfreezable or 'what holds it'} cannot be frozen and no other snapshot applies")
        _refuse_frozen_writes(targets, writes)
        return Plan("fsfreeze", "mounted read-write: frozen while it is read", freeze=targets,
                    keep_cache_off=bool(cache) and _on_frozen(targets, cache or ""))  # fmt: skip
    return Plan("none", "not mounted read-write")


def _targets(rw: list[MountUse]) -> tuple[list[FreezeTarget], str]:
    """The filesystems to freeze (one per device, however many places mount it), and the first that
    cannot be (FUSE, filesystems without freeze support), described."""
    out: list[FreezeTarget] = []
    seen: set[str] = set()
    bad = ""
    for u in rw:
        if u.device in seen:
            continue
        seen.add(u.device)
        if u.fstype not in FREEZABLE:
            bad = bad or describe(u)
            continue
        path = u.mountpoint if u.pid is None else f"/proc/{u.pid}/root{u.mountpoint}"
        out.append(FreezeTarget(path, f"{u.mountpoint} ({u.fstype})"))
    return out, bad


def _device_of(path: str) -> int | None:
    p = os.path.abspath(path)
    while True:
        try:
            return os.stat(p).st_dev
        except OSError:
            if p == os.path.dirname(p):
                return None
            p = os.path.dirname(p)


def _on_frozen(targets: list[FreezeTarget], path: str) -> bool:
    dev = _device_of(path)
    return dev is not None and any(_device_of(t.path) == dev for t in targets)


def _refuse_frozen_writes(targets: list[FreezeTarget], writes: tuple[str, ...]) -> None:
    for w in writes:
        if _on_frozen(targets, w):
            raise SnapshotError(f"{w} is on a filesystem that would be frozen while the source is read: the backup "
                                f"would block itself; write the repository to another filesystem")  # fmt: skip


class Capture:
    """One snapshot being taken, read and let go. Enter: pre hook, database quiesce, the provider's
    moment, and (for providers whose moment is made at once) database release and post hook. The
    caller reads `fd` (None: the source itself), calls `check()` as it goes and `finish()` when the read
    is done; leaving without finish() undoes everything (thaw, remove, abort the database session, run
    the post hook with IMAGECHAIN_STATUS=failed)."""

    def __init__(self, p: Plan, opts: SnapshotOptions, source: str, chain: str,
                 note: Callable[[str], None]) -> None:  # fmt: skip
        self.plan, self.opts, self.source, self.note = p, opts, source, note
        self.fd: int | None = None
        self.record: dict[str, Any] = {"provider": p.provider, "why": p.why}
        self.warnings: list[str] = []
        self._held = contextlib.ExitStack()  # what makes the moment: freeze, clone, LVM snapshot
        self._undo = contextlib.ExitStack()  # what a failure must still do: abort the database, post hook
        self._check: Callable[[], None] = lambda: None
        self._verify: Callable[[], None] = lambda: None
        self._freezer: Freezer | None = None
        self._app: apps.App | None = None
        self._posted = False
        self.hooks = Hooks(opts.pre, opts.post, opts.hook_timeout_s,
                           {"IMAGECHAIN_SOURCE": source, "IMAGECHAIN_CHAIN": chain, "IMAGECHAIN_SNAPSHOT": p.provider,
                            "IMAGECHAIN_MOUNTPOINTS": "\n".join(t.path for t in p.freeze)})  # fmt: skip

    @property
    def lasting(self) -> bool:
        """The moment lasts as long as the read (a freeze, or no snapshot at all): the database recipe
        and the post hook wait for the read to end."""
        return self.plan.provider in ("fsfreeze", "none")

    def __enter__(self) -> Capture:
        try:
            self._take()
        except BaseException:
            self._release()
            raise
        return self

    def _take(self) -> None:
        opts, p = self.opts, self.plan
        if opts.post:
            self._undo.callback(self._post, "failed")  # unless the post hook ran already
        if opts.pre:
            self.record["pre_hook_s"] = round(self.hooks.run("pre-snapshot", opts.pre), 3)
        if opts.app:
            app = apps.make(opts.app, opts.app_connect, opts.hook_timeout_s)
            app.quiesce()
            self._app = app
            self._undo.callback(self._abort_app)
        if p.freeze:
            self.record["frozen"] = [t.label for t in p.freeze]
        t0 = time.monotonic()
        presync([t.path for t in p.freeze] + ([self.source] if p.provider == "reflink" else []))
        if p.freeze or p.provider == "reflink":
            self.record["presync_ms"] = round((time.monotonic() - t0) * 1000, 1)
        if p.provider == "fsfreeze":
            fr = self._held.enter_context(Freezer(p.freeze, opts.max_freeze_s))
            self._freezer, self._check, self._verify = fr, fr.check, fr.still_frozen
        elif p.provider == "reflink":
            # the filesystems inside the image are frozen for the clone only: milliseconds
            clip = Freezer(p.freeze, busy_wait_s=CLONE_BUSY_WAIT_S)
            with clip if p.freeze else contextlib.nullcontext():
                tc = time.monotonic()
                self.fd = reflink.clone(os.path.realpath(self.source))
                self.record["clone_ms"] = round((time.monotonic() - tc) * 1000, 1)
            self._held.callback(os.close, self.fd)
            if p.freeze:
                self.record["writers_blocked_ms"] = round(clip.blocked_s * 1000, 1)
        elif p.provider == "lvm":
            assert p.volume is not None
            lvm.remove_leftovers(p.volume.vg, self.note)
            t0 = time.monotonic()
            snap = self._held.enter_context(lvm.Snapshot(p.volume, self.opts.size))
            self.record["lvm_snapshot"] = snap.name
            self.record["create_ms"] = round((time.monotonic() - t0) * 1000, 1)
            try:
                self.fd = os.open(snap.device, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise SnapshotError(f"cannot open LVM snapshot {snap.device}: {e.strerror}") from e
            self._held.callback(os.close, self.fd)
            self._verify = snap.check
        if not self.lasting:
            self._settle()

    def _settle(self) -> None:
        """The moment is captured: let the database go on, run the post hook."""
        app, self._app = self._app, None
        if app is not None:
            self.record["app"] = app.release()
        self._post("captured")

    def _abort_app(self) -> None:
        app, self._app = self._app, None
        if app is not None:
            app.abort()

    def _post(self, status: str) -> None:
        if self._posted or not self.opts.post:
            return
        self._posted = True
        try:
            took = self.hooks.run("post-snapshot", self.opts.post, {"IMAGECHAIN_STATUS": status})
            self.record["post_hook_s"] = round(took, 3)
        except SnapshotError as e:
            if status == "captured" and not self.lasting:
                raise  # nothing was read yet: stop before the backup does any work
            self.warnings.append(str(e))
            self.note(str(e))

    def check(self) -> None:
        self._check()

    def finish(self) -> dict[str, Any]:
        """The read is done: prove the moment held through it, then let go of everything."""
        self._verify()
        self._held.close()  # thaw / close the clone / remove the LVM snapshot
        if self._freezer is not None:
            self.record["writers_blocked_ms"] = round(self._freezer.blocked_s * 1000, 1)
        if self.lasting:
            self._settle()
        self._undo.pop_all()  # done: nothing to undo
        if self.warnings:
            self.record["warnings"] = self.warnings
        return self.record

    def _release(self) -> None:
        try:
            self._held.close()
        finally:
            self._undo.close()

    def __exit__(self, *exc: object) -> None:
        self._release()

    def summary(self) -> str:
        """One phrase for the output: "reflink clone, writers blocked 8 ms (/mnt/data (ext4))"."""
        r = self.record
        what = {"fsfreeze": "fsfreeze", "reflink": "reflink clone", "lvm": f"LVM snapshot {r.get('lvm_snapshot')}",
                "none": "no snapshot"}[self.plan.provider]  # fmt: skip
        if "writers_blocked_ms" in r:
            what += f", writers blocked {r['writers_blocked_ms']:g} ms ({', '.join(r.get('frozen', []))})"
        return what
