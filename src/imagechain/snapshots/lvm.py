"""LVM snapshots (classic copy-on-write and thin), made and removed with the LVM tools.

Every snapshot this module makes carries two tags: ``imagechain_snapshot`` and
``imagechain_owner:<boot id>:<pid>``. A backup that dies (even by SIGKILL, or with the machine) leaves
its snapshot behind; the next backup of any LV in that volume group lists the tagged snapshots and
removes those whose owner is provably gone (another boot, or a process that no longer exists), with a
notice. A classic snapshot that fills up becomes invalid; that is checked after the read, and such a
point is never published."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from .. import lock
from ..errors import SnapshotError

TAG = "imagechain_snapshot"
OWNER = "imagechain_owner"
DEFAULT_SHARE = 0.2  # a classic snapshot gets this share of its origin's size by default...
MIN_SIZE = 256 << 20  # ...but at least this, if the volume group has it
LVM_TIMEOUT_S = 300

Runner = Callable[[list[str]], str]


def run_lvm(args: list[str]) -> str:
    """Run one LVM command; its stdout, or SnapshotError with the tool's own last line of complaint."""
    env = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1", "LC_ALL": "C"}
    try:
        p = subprocess.run(["lvm", *args], capture_output=True, text=True, env=env, timeout=LVM_TIMEOUT_S,
                           check=False)  # fmt: skip
    except FileNotFoundError as e:
        raise SnapshotError("the LVM tools are not installed (lvm2); no LVM snapshot can be made") from e
    except subprocess.TimeoutExpired as e:
        raise SnapshotError(f"lvm {args[0]} did not finish within {LVM_TIMEOUT_S} s") from e
    if p.returncode:
        lines = [ln.strip() for ln in p.stderr.splitlines() if ln.strip()]
        raise SnapshotError(f"lvm {args[0]} failed: {lines[-1] if lines else f'exit code {p.returncode}'}")
    return p.stdout


def boot_id() -> str:
    """This boot's id as an LVM tag carries it (no dashes)."""
    return lock.boot_id().replace("-", "") or "unknown"


@dataclass(frozen=True)
class Volume:
    vg: str
    lv: str
    size: int
    thin: bool

    @property
    def name(self) -> str:
        return f"{self.vg}/{self.lv}"


def is_logical_volume(rdev: int) -> bool:
    """The block device is an LVM logical volume (device-mapper, with an "LVM-" uuid)."""
    try:
        with open(f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}/dm/uuid") as f:
            return f.read().startswith("LVM-")
    except OSError:
        return False


def _report(out: str, kind: str = "lv") -> list[dict[str, str]]:
    try:
        rows: list[dict[str, str]] = json.loads(out)["report"][0][kind]
    except (ValueError, KeyError, IndexError, TypeError) as e:
        raise SnapshotError(f"cannot read the LVM tools' report: {e}") from e
    return rows


def volume_of(device: str, run: Runner = run_lvm) -> Volume:
    rows = _report(run(["lvs", "--reportformat", "json", "--units", "b", "--nosuffix",
                        "-o", "vg_name,lv_name,lv_size,segtype", device]))  # fmt: skip
    if len(rows) != 1:
        raise SnapshotError(f"{device} is not one LVM logical volume")
    r = rows[0]
    return Volume(r["vg_name"], r["lv_name"], int(r["lv_size"]), r["segtype"] == "thin")


def remove_leftovers(vg: str, note: Callable[[str], None], run: Runner = run_lvm,
                     alive: Callable[[int], bool] | None = None) -> list[str]:  # fmt: skip
    """Remove the snapshots of `vg` that a backup made and could not remove (it died); keep those of a
    backup that still runs. Returns the names removed."""
    rows = _report(run(["lvs", "--reportformat", "json", "-o", "vg_name,lv_name,lv_tags", vg]))
    me, removed = boot_id(), []
    for r in rows:
        tags = r.get("lv_tags", "").split(",")
        if TAG not in tags:
            continue
        owner = [t for t in tags if t.startswith(OWNER + ":")]
        boot, _, pid = owner[0].partition(":")[2].partition(":") if owner else ("", "", "")
        if boot == me and pid.isdigit() and (alive or _alive)(int(pid)):
            continue  # a backup running now made it
        name = f"{r['vg_name']}/{r['lv_name']}"
        run(["lvremove", "-y", name])
        removed.append(name)
        note(f"removed LVM snapshot {name}, left by a backup that ended without removing it")
    return removed


def _alive(pid: int) -> bool:
    return not lock.process_gone(pid, "")


class Snapshot:
    """One LVM snapshot of `volume`, made on enter (the LVM tools suspend the origin, which freezes a
    filesystem mounted on it), removed on exit."""

    def __init__(self, volume: Volume, size: int | None = None, run: Runner = run_lvm) -> None:
        self.volume = volume
        self.size = size
        self.run = run
        self.lv = f"{volume.lv[:80]}-icsnap-{os.urandom(4).hex()}"
        self.made = False

    @property
    def name(self) -> str:
        return f"{self.volume.vg}/{self.lv}"

    @property
    def device(self) -> str:
        return f"/dev/{self.volume.vg}/{self.lv}"

    def _size(self) -> int:
        if self.size:
            return self.size
        rows = _report(self.run(["vgs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o", "vg_free",
                                 self.volume.vg]), "vg")  # fmt: skip
        free = int(rows[0]["vg_free"]) if rows else 0
        want = max(int(self.volume.size * DEFAULT_SHARE), MIN_SIZE)
        if free < min(want, MIN_SIZE):
            raise SnapshotError(f"volume group {self.volume.vg} has {free >> 20} MiB free, too little for a snapshot "
                                f"of {self.volume.name}; free some space or give --snapshot-size")  # fmt: skip
        return min(want, free)

    def __enter__(self) -> Snapshot:
        tags = ["--addtag", TAG, "--addtag", f"{OWNER}:{boot_id()}:{os.getpid()}"]
        if self.volume.thin:
            self.run(["lvcreate", "--snapshot", "--name", self.lv, *tags, self.volume.name])
            self.made = True
            try:
                self.run(["lvchange", "--activate", "y", "--ignoreactivationskip", self.name])
            except BaseException:
                self.__exit__(None, None, None)
                raise
        else:
            size = self._size()
            self.run(["lvcreate", "--snapshot", "--name", self.lv, "--size", f"{size}b", *tags, self.volume.name])
            self.made = True
        return self

    def check(self) -> None:
        """Raise when a classic snapshot overflowed (it is invalid: its data is no longer of one moment)."""
        if self.volume.thin:
            return
        rows = _report(self.run(["lvs", "--reportformat", "json", "-o", "lv_attr,snap_percent", self.name]))
        attr = rows[0].get("lv_attr", "") if rows else ""
        if len(attr) > 4 and attr[4] == "I":
            raise SnapshotError(f"LVM snapshot {self.name} overflowed while the source was read (too many writes "
                                f"for its size); nothing was published: give a larger --snapshot-size")  # fmt: skip

    def __exit__(self, *exc: object) -> None:
        if self.made:
            self.run(["lvremove", "-y", self.name])
            self.made = False
