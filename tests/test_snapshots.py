"""Snapshots of live sources, with real filesystems: how auto chooses, freezes that always end (also when
the backup is killed), --max-freeze, hooks, reflink clones that leave nothing behind, and LVM as far as
this machine allows (its tools run for real; device-mapper is missing, so no snapshot can be made)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagechain.errors import SnapshotError, SourceError, UsageError
from imagechain.snapshots import SnapshotOptions, lvm, plan_snapshot
from imagechain.snapshots.freeze import FIFREEZE, FITHAW, Freezer, FreezeTarget
from imagechain.snapshots.hooks import Hooks

from .conftest import error_lines, exe, loop_device, need_root, need_tool
from .test_mounts import ext4_image, mounted

MiB = 1 << 20
pytestmark = pytest.mark.root


def ic(*args: object, check: bool = False) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([exe(), *map(str, args)], capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert "Traceback" not in p.stderr, p.stderr
    if check:
        assert p.returncode == 0, (args, p.stdout, p.stderr)
    return p


def last_error(p: subprocess.CompletedProcess[str], code: int) -> str:
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    lines = [ln for ln in error_lines(p.stderr) if ln.startswith("imagechain:")]
    assert len(lines) == 1, p.stderr
    return lines[0]


@contextlib.contextmanager
def live_ext4(folder: Path, size: int = 64 * MiB) -> Iterator[tuple[Path, Path, str]]:
    """An ext4 image file in `folder`, attached and mounted read-write: (image, mount point, device)."""
    img = ext4_image(folder / "vol.img", size)
    with loop_device(img) as dev, mounted(dev, folder / "mnt"):
        yield img, folder / "mnt", dev


@contextlib.contextmanager
def xfs_host(tmp_path: Path) -> Iterator[Path]:
    """A mounted XFS filesystem with reflink, to hold image files."""
    need_tool("mkfs.xfs")
    img = tmp_path / "host.img"
    with open(img, "wb") as f:
        f.truncate(512 * MiB)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(img)], check=True)
    with loop_device(img) as dev, mounted(dev, tmp_path / "host"):
        yield tmp_path / "host"


def is_frozen(mnt: Path) -> bool:
    """Ask the kernel: a second FIFREEZE of a frozen filesystem fails with EBUSY (ours is undone at once)."""
    fd = os.open(mnt, os.O_RDONLY)
    try:
        try:
            fcntl.ioctl(fd, FIFREEZE, 0)
        except OSError as e:
            return e.errno == errno.EBUSY
        fcntl.ioctl(fd, FITHAW, 0)
        return False
    finally:
        os.close(fd)


def writes_within(mnt: Path, seconds: float) -> bool:
    """Does a write (with fsync) to the filesystem complete within `seconds`? A frozen one blocks it."""
    done = threading.Event()

    def write() -> None:
        with open(mnt / f"probe-{time.monotonic_ns()}", "wb") as f:
            f.write(b"x" * 4096)
            os.fsync(f.fileno())
        done.set()

    threading.Thread(target=write, daemon=True).start()
    return done.wait(seconds)


def wait_frozen(mnt: Path, proc: subprocess.Popen[str], seconds: float = 20) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()
        if not writes_within(mnt, 0.3):
            return
        time.sleep(0.1)
    raise AssertionError("the backup never froze the filesystem")


def points(repo: Path) -> list[Path]:
    return sorted(repo.rglob("*.icimg")) if repo.exists() else []


# -- how auto chooses ---------------------------------------------------------------------------------


def test_auto_chooses_by_what_the_source_is_and_how_it_is_used(tmp_path: Path) -> None:
    need_root()
    opts = SnapshotOptions()
    with live_ext4(tmp_path) as (img, mnt, dev):
        p = plan_snapshot(str(img), False, opts, False)  # on ext4: no reflink, so the mounted fs is frozen
        assert p.provider == "fsfreeze" and [t.path for t in p.freeze] == [str(mnt)], p
        p = plan_snapshot(dev, True, opts, False)
        assert p.provider == "fsfreeze" and p.freeze[0].label == f"{mnt} (ext4)", p
        with pytest.raises(SnapshotError, match="reflink"):
            plan_snapshot(str(img), False, SnapshotOptions("reflink"), False)
        with pytest.raises(UsageError, match="not an LVM logical volume"):
            plan_snapshot(str(img), False, SnapshotOptions("lvm"), False)
        with pytest.raises(SourceError, match="--snapshot auto"):
            plan_snapshot(str(img), False, SnapshotOptions("none"), False)
        p = plan_snapshot(str(img), False, SnapshotOptions("none"), True)
        assert p.provider == "none" and "mounted read-write" in p.mounted
        with pytest.raises(SnapshotError, match="would block itself"):  # the repository on the frozen fs
            plan_snapshot(str(img), False, opts, False, writes=(str(mnt / "repo"),))
        p = plan_snapshot(str(img), False, opts, False, writes=(str(tmp_path / "repo"),), cache=str(mnt / "cache"))
        assert p.keep_cache_off
    assert plan_snapshot(str(img), False, opts, False).provider == "none"  # unmounted, on ext4
    with pytest.raises(UsageError, match="nothing to freeze"):
        plan_snapshot(str(img), False, SnapshotOptions("fsfreeze"), False)
    with xfs_host(tmp_path) as host:
        vol = ext4_image(host / "vol.img", 32 * MiB)
        p = plan_snapshot(str(vol), False, opts, False)
        assert p.provider == "reflink" and not p.freeze, p  # an unmounted image file (a VM disk): cloned
        with loop_device(vol) as dev, mounted(dev, tmp_path / "inner"):
            p = plan_snapshot(str(vol), False, opts, False)
            assert p.provider == "reflink" and [t.path for t in p.freeze] == [str(tmp_path / "inner")], p


def test_a_fuse_mounted_volume_cannot_be_frozen_and_is_refused(tmp_path: Path) -> None:
    from .fsfill import make_fs, mounted_fs, need_kind

    need_kind("exfat")
    img = make_fs(tmp_path, "exfat")
    with mounted_fs(img, "exfat", tmp_path / "m"):
        line = last_error(ic("backup", img, tmp_path / "repo", "--init"), 3)
        assert "cannot be frozen" in line and "--allow-mounted" in line, line
        line = last_error(ic("backup", img, tmp_path / "repo", "--init", "--snapshot", "fsfreeze"), 12)
        assert "cannot be frozen" in line, line
        r = json.loads(ic("backup", img, tmp_path / "repo", "--init", "--allow-mounted", "--json", check=True).stdout)
        assert r["snapshot"]["provider"] == "none"


# -- fsfreeze: the moment, the hooks, the limits, and a thaw that always comes ------------------------


def test_fsfreeze_point_holds_what_was_written_before_and_hooks_run_around_it(tmp_path: Path) -> None:
    need_tool("debugfs")
    env_file = tmp_path / "hook-env"
    with live_ext4(tmp_path) as (img, mnt, _dev):
        pre = f"echo before > {mnt}/pre-file"  # written before the freeze: in the point
        # after the thaw: a write to the volume would block (and time out) if it were still frozen
        post = f"echo after > {mnt}/post-file; env | grep ^IMAGECHAIN_ | sort > {env_file}"
        r = json.loads(ic("backup", img, tmp_path / "repo", "--init", "--json", "--pre-snapshot", pre,
                          "--post-snapshot", post, "--hook-timeout", "20s", check=True).stdout)  # fmt: skip
        assert r["snapshot"]["provider"] == "fsfreeze" and r["snapshot"]["post_hook_s"] < 5, r["snapshot"]
        assert (mnt / "post-file").read_text() == "after\n"
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    assert env["IMAGECHAIN_HOOK"] == "post-snapshot" and env["IMAGECHAIN_STATUS"] == "captured", env
    assert env["IMAGECHAIN_SNAPSHOT"] == "fsfreeze" and env["IMAGECHAIN_MOUNTPOINTS"] == str(mnt), env
    assert env["IMAGECHAIN_SOURCE"] == str(img) and env["IMAGECHAIN_CHAIN"] == "default", env
    out = tmp_path / "restored.img"
    ic("restore", f"{tmp_path / 'repo'}::default", out, check=True)
    fsck = subprocess.run(["e2fsck", "-fn", str(out)], capture_output=True, text=True, check=False)
    assert fsck.returncode == 0, fsck.stdout  # frozen: clean, no journal to replay
    cat = subprocess.run(["debugfs", "-R", "cat /pre-file", str(out)], capture_output=True, text=True, check=False)
    assert cat.stdout == "before\n", cat
    ls = subprocess.run(["debugfs", "-R", "ls -l /", str(out)], capture_output=True, text=True, check=False).stdout
    assert "post-file" not in ls, ls
    info = ic("info", f"{tmp_path / 'repo'}::default", check=True).stdout
    assert "snapshot" in info and "fsfreeze" in info and "writers blocked" in info, info


def test_a_killed_backup_leaves_nothing_frozen(tmp_path: Path) -> None:
    """SIGKILL runs no cleanup: the watchdog process thaws."""
    with live_ext4(tmp_path) as (img, mnt, _dev):
        (mnt / "data").write_bytes(os.urandom(30 * MiB))
        args = [exe(), "backup", str(img), str(tmp_path / "repo"), "--init", "--max-read-rate", "4M",
                "--max-freeze", "0"]
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_frozen(mnt, proc)
        proc.kill()
        _, err = proc.communicate()
        assert writes_within(mnt, 5), "still frozen after the backup was killed"
        assert "watchdog: thawed" in err, err
        assert not is_frozen(mnt)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_backup_thaws_runs_the_post_hook_and_publishes_nothing(tmp_path: Path, sig: int) -> None:
    flag = tmp_path / "status"
    with live_ext4(tmp_path) as (img, mnt, _dev):
        (mnt / "data").write_bytes(os.urandom(30 * MiB))
        proc = subprocess.Popen([exe(), "backup", str(img), str(tmp_path / "repo"), "--init", "--max-read-rate", "4M",
                                 "--post-snapshot", f"echo $IMAGECHAIN_STATUS > {flag}"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        wait_frozen(mnt, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + sig, err
        assert writes_within(mnt, 5)
        assert flag.read_text().strip() == "failed"
        assert not points(tmp_path / "repo")


def test_max_freeze_abandons_a_long_read_thawed_and_unpublished(tmp_path: Path) -> None:
    with live_ext4(tmp_path) as (img, mnt, _dev):
        (mnt / "data").write_bytes(os.urandom(30 * MiB))
        t0 = time.monotonic()
        p = ic("backup", img, tmp_path / "repo", "--init", "--max-read-rate", "4M", "--max-freeze", "1s")
        line = last_error(p, 12)
        assert "--max-freeze" in line and "thawed" in line and "nothing was published" in line, line
        assert time.monotonic() - t0 < 20
        assert writes_within(mnt, 5) and not points(tmp_path / "repo")
        ok = json.loads(ic("backup", img, tmp_path / "repo", "--json", check=True).stdout)  # no limit hit now
        assert ok["snapshot"]["writers_blocked_ms"] < 60_000 and len(points(tmp_path / "repo")) == 1


def test_a_filesystem_frozen_by_someone_else_is_neither_read_nor_thawed(tmp_path: Path) -> None:
    need_tool("fsfreeze")
    with live_ext4(tmp_path) as (img, mnt, _dev):
        subprocess.run(["fsfreeze", "-f", str(mnt)], check=True)
        try:
            line = last_error(ic("backup", img, tmp_path / "repo", "--init"), 12)
            assert "already frozen" in line, line
            assert is_frozen(mnt), "the backup thawed a freeze that was not its own"
        finally:
            subprocess.run(["fsfreeze", "-u", str(mnt)], check=False)


def test_freezer_timer_thaws_at_the_limit_and_the_read_is_refused(tmp_path: Path) -> None:
    with live_ext4(tmp_path) as (_img, mnt, _dev):
        with Freezer([FreezeTarget(str(mnt), "mnt")], limit_s=0.5) as fr:
            assert not writes_within(mnt, 0.2)
            time.sleep(0.8)  # the reader does not call check(): the timer thaws on its own
            assert writes_within(mnt, 2)
            with pytest.raises(SnapshotError, match="--max-freeze"):
                fr.check()
            with pytest.raises(SnapshotError):
                fr.still_frozen()
        assert 0.4 < fr.blocked_s < 1.5


def test_the_watchdog_thaws_at_its_own_deadline(tmp_path: Path) -> None:
    """The last line of defence against a backup that hangs while frozen (its own timer dead too)."""
    import sys

    with live_ext4(tmp_path) as (_img, mnt, _dev):
        dog = subprocess.Popen([sys.executable, "-m", "imagechain.snapshots.watchdog", "0.5", str(mnt)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        assert dog.stdout is not None and dog.stdin is not None
        assert dog.stdout.readline() == b"ready\n"
        dog.stdin.write(b"armed\n")
        dog.stdin.flush()
        fd = os.open(mnt, os.O_RDONLY)
        try:
            fcntl.ioctl(fd, FIFREEZE, 0)
            assert writes_within(mnt, 5), "the watchdog did not thaw at its deadline"
        finally:
            with contextlib.suppress(OSError):
                fcntl.ioctl(fd, FITHAW, 0)
            os.close(fd)
            dog.stdin.close()
            dog.wait(10)
        assert b"thawed" in (dog.stderr.read() if dog.stderr else b"")


def test_a_hook_that_outlasts_its_timeout_is_stopped_with_what_it_started(tmp_path: Path) -> None:
    marker = tmp_path / "child.pid"
    hooks = Hooks(timeout_s=1)
    t0 = time.monotonic()
    with pytest.raises(SnapshotError, match="did not finish within 1 s"):
        hooks.run("pre-snapshot", f"sleep 60 & echo $! > {marker}; wait")
    assert time.monotonic() - t0 < 10
    child = int(marker.read_text())
    time.sleep(0.2)
    try:  # gone, or a zombie waiting for whoever adopted it to reap it: either way no longer running
        state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z"), state


# -- reflink ------------------------------------------------------------------------------------------


def test_reflink_clone_continues_the_chain_and_leaves_nothing_behind(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    with xfs_host(tmp_path) as host:
        vol = ext4_image(host / "vol.img", 64 * MiB)
        before = sorted(os.listdir(host))
        with loop_device(vol) as dev, mounted(dev, tmp_path / "inner"):
            (tmp_path / "inner" / "f").write_bytes(os.urandom(20 * MiB))
            r1 = json.loads(ic("backup", vol, repo, "--init", "--json", check=True).stdout)
            assert r1["snapshot"]["provider"] == "reflink" and r1["snapshot"]["frozen"], r1["snapshot"]
            # killed while reading the clone: the clone had no name, so nothing is left in the folder
            proc = subprocess.Popen([exe(), "backup", str(vol), str(repo), "--max-read-rate", "2M"],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
            time.sleep(2.5)
            assert proc.poll() is None, proc.communicate()
            proc.kill()
            proc.communicate()
            assert writes_within(tmp_path / "inner", 5)
        assert sorted(os.listdir(host)) == before
        # unmounted now, read without a snapshot: the same source, the same chain
        r2 = json.loads(ic("backup", vol, repo, "--json", "--snapshot", "none", check=True).stdout)
        assert r2["kind"] == "incremental" and r2["chain_id"] == r1["chain_id"] and r2["source"] == r1["source"]
        r3 = json.loads(ic("backup", vol, repo, "--json", check=True).stdout)
        assert r3["kind"] == "incremental" and r3["snapshot"]["provider"] == "reflink"
        assert "writers_blocked_ms" not in r3["snapshot"]  # nothing mounted inside: nothing frozen
        out = tmp_path / "restored.img"
        ic("restore", f"{repo}::default", out, check=True)
        assert out.read_bytes() == vol.read_bytes()


# -- LVM: the real tools as far as this machine allows ---------------------------------------------------


def _vg_with_lvs(tmp_path: Path, lvs: dict[str, list[str]]) -> Iterator[str]:
    """A real volume group on a loop device whose metadata lists the given LVs (name: tags), written with
    vgcfgrestore: without device-mapper no LV can be created, but the tools list and remove inactive ones."""
    need_tool("pvcreate", "vgcreate", "vgcfgbackup", "vgcfgrestore")
    pv = tmp_path / "pv.img"
    with open(pv, "wb") as f:
        f.truncate(64 * MiB)
    vg = f"icvg{os.getpid()}"
    env = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"}
    with loop_device(pv) as dev:
        subprocess.run(["pvcreate", "-qq", dev], check=True, capture_output=True, env=env)
        subprocess.run(["vgcreate", "-qq", vg, dev], check=True, capture_output=True, env=env)
        try:
            backup = tmp_path / "vg.txt"
            subprocess.run(["vgcfgbackup", "-f", str(backup), vg], check=True, capture_output=True, env=env)
            text = backup.read_text()
            body = []
            for i, (name, tags) in enumerate(lvs.items()):
                tag_line = f"tags = [{', '.join(json.dumps(t) for t in tags)}]" if tags else ""
                body.append(f"""{name} {{
id = "lvid{i:02d}-aaaa-aaaa-aaaa-aaaa-aaaa-aaaaaa"
status = ["READ", "WRITE", "VISIBLE"]
flags = []
{tag_line}
segment_count = 1
segment1 {{
start_extent = 0
extent_count = 1
type = "striped"
stripe_count = 1
stripes = ["pv0", {i}]
}}
}}""")
            end = text.rindex("}", 0, text.rindex("}"))  # the end of the physical_volumes section
            text = text[: end + 1] + "\nlogical_volumes {\n" + "\n".join(body) + "\n}\n" + text[end + 1 :]
            backup.write_text(text)
            subprocess.run(["vgcfgrestore", "-f", str(backup), vg], check=True, capture_output=True, env=env)
            yield vg
        finally:
            subprocess.run(["vgremove", "-y", vg], check=False, capture_output=True, env=env)
            subprocess.run(["pvremove", "-qq", dev], check=False, capture_output=True, env=env)


def test_lvm_leftovers_of_dead_backups_are_removed_with_the_real_tools(tmp_path: Path) -> None:
    me = f"{lvm.OWNER}:{lvm.boot_id()}:{os.getpid()}"
    dead = f"{lvm.OWNER}:{lvm.boot_id()}:{2**22 + 12345}"  # above pid_max's default: no such process
    other_boot = f"{lvm.OWNER}:00000000000000000000000000000000:1"
    layout = {"data": [], "data-icsnap-live": [lvm.TAG, me], "data-icsnap-dead": [lvm.TAG, dead],
              "data-icsnap-oldboot": [lvm.TAG, other_boot], "unrelated": ["backup"]}
    for vg in _vg_with_lvs(tmp_path, layout):
        notes: list[str] = []
        removed = lvm.remove_leftovers(vg, notes.append)
        assert sorted(removed) == [f"{vg}/data-icsnap-dead", f"{vg}/data-icsnap-oldboot"], removed
        assert len(notes) == 2 and all("left by a backup" in n for n in notes)
        names = lvm._report(lvm.run_lvm(["lvs", "--reportformat", "json", "-o", "lv_name", vg]))
        assert sorted(r["lv_name"] for r in names) == ["data", "data-icsnap-live", "unrelated"]
        # making a snapshot needs device-mapper, which this machine lacks: the real lvcreate says so,
        # and the error is one line, with nothing left behind
        with pytest.raises(SnapshotError) as e, lvm.Snapshot(lvm.Volume(vg, "data", 4 * MiB, False), 4 * MiB):
            pass
        assert "lvm lvcreate failed" in str(e.value) and "\n" not in str(e.value), e.value
        names = lvm._report(lvm.run_lvm(["lvs", "--reportformat", "json", "-o", "lv_name", vg]))
        assert sorted(r["lv_name"] for r in names) == ["data", "data-icsnap-live", "unrelated"]


class FakeLvm:
    """The LVM tools as a script of answers, for the command sequences (unit tests only)."""

    def __init__(self, attr: str = "swi-a-s---", free: int = 50 << 30) -> None:
        self.calls: list[list[str]] = []
        self.attr, self.free = attr, free

    def __call__(self, args: list[str]) -> str:
        self.calls.append(args)
        if args[0] == "vgs":
            return json.dumps({"report": [{"vg": [{"vg_free": str(self.free)}]}]})
        if args[0] == "lvs":
            return json.dumps({"report": [{"lv": [{"lv_attr": self.attr, "snap_percent": "12.00"}]}]})
        return ""


def test_lvm_classic_snapshot_sized_tagged_checked_and_removed() -> None:
    run = FakeLvm()
    vol = lvm.Volume("vg0", "root", 100 << 30, thin=False)
    with lvm.Snapshot(vol, run=run) as snap:
        snap.check()
    create = run.calls[1]
    assert create[:2] == ["lvcreate", "--snapshot"] and create[-1] == "vg0/root"
    assert create[create.index("--size") + 1] == f"{20 << 30}b"  # 20% of the origin
    assert lvm.TAG in create and any(a.startswith(lvm.OWNER + ":") for a in create)
    assert run.calls[-1] == ["lvremove", "-y", snap.name]
    overflowed = FakeLvm(attr="swi-I-s---")
    with pytest.raises(SnapshotError, match="overflowed"), lvm.Snapshot(vol, run=overflowed) as snap:
        snap.check()
    assert overflowed.calls[-1] == ["lvremove", "-y", snap.name]  # removed all the same
    capped = FakeLvm(free=5 << 30)
    with lvm.Snapshot(vol, run=capped):
        pass
    assert capped.calls[1][capped.calls[1].index("--size") + 1] == f"{5 << 30}b"  # what the group has
    with pytest.raises(SnapshotError, match="too little"):
        lvm.Snapshot(vol, run=FakeLvm(free=16 << 20)).__enter__()


def test_lvm_thin_snapshot_is_activated_and_removed() -> None:
    run = FakeLvm()
    with lvm.Snapshot(lvm.Volume("vg0", "thinvol", 1 << 40, thin=True), run=run) as snap:
        pass
    assert [c[0] for c in run.calls] == ["lvcreate", "lvchange", "lvremove"]
    assert "--size" not in run.calls[0] and "--ignoreactivationskip" in run.calls[1]
    assert run.calls[-1] == ["lvremove", "-y", snap.name]
