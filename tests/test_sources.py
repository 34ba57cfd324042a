"""Source identity beyond the filesystem UUID (clones must not share a chain silently), a source that
changes while being read, and the names given on the command line (src/imagechain/sources.py)."""

from __future__ import annotations

import contextlib
import os
import stat
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagechain.errors import SourceError, UsageError
from imagechain.sources import (
    NAME_RULE,
    block_device_identity,
    check_name,
    open_source,
    same_source,
)

from .conftest import need_root, need_tool

MiB = 1 << 20


def ext4_like(path: Path, size: int = 2 * MiB, fs_uuid: uuid.UUID | None = None) -> uuid.UUID:
    """A sparse image holding only an ext2/3/4 superblock's magic and UUID, as fsprobe reads them."""
    u = fs_uuid or uuid.uuid4()
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(1024 + 56)
        f.write(b"\x53\xef")
        f.seek(1024 + 104)
        f.write(u.bytes)
        f.seek(size - 4096)
        f.write(os.urandom(4096))
    return u


def mkfs_ext4(path: Path) -> None:
    need_tool("mkfs.ext4")
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-U", str(uuid.uuid4()), str(path)], check=True, capture_output=True)


def cp(src: Path, dst: Path) -> None:
    need_tool("cp")
    subprocess.run(["cp", str(src), str(dst)], check=True)


@contextlib.contextmanager
def loop(image: Path, *options: str) -> Iterator[str]:
    """A loop device on image (losetup OPTIONS -f --show), always detached afterwards."""
    need_root()
    need_tool("losetup")
    dev = subprocess.run(["losetup", *options, "-f", "--show", str(image)], check=True, capture_output=True,
                         text=True).stdout.strip()  # fmt: skip
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


# --- device identity of image files ---


@pytest.mark.parametrize("make", ["superblock", "mkfs"])
def test_copied_image_is_the_same_volume_on_another_file(tmp_path: Path, make: str) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    if make == "mkfs":
        mkfs_ext4(a)
    else:
        ext4_like(a)
    cp(a, b)
    with open_source(str(a)) as sa, open_source(str(b)) as sb:
        assert sa.identity.startswith("ext4:") and sa.identity == sb.identity
        assert sa.source_id == sb.source_id  # the chain is keyed by the volume: a clone finds the same chain
        sta, stb = os.stat(a), os.stat(b)
        assert sa.device_identity == f"file:{sta.st_dev}:{sta.st_ino}"
        assert sb.device_identity == f"file:{stb.st_dev}:{stb.st_ino}"
        assert sa.device_identity != sb.device_identity
        assert same_source(sa.device_identity, sb.device_identity) is False


def test_same_file_reopened_is_the_same_source(tmp_path: Path) -> None:
    a = tmp_path / "a.img"
    ext4_like(a)
    with open_source(str(a)) as s1:
        first = s1.device_identity
    with open_source(str(a), "other-name") as s2:
        assert s2.device_identity == first
    assert first.startswith("file:")
    assert same_source(first, s2.device_identity) is True


def test_renamed_file_keeps_its_identity(tmp_path: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "renamed.img"
    ext4_like(a)
    with open_source(str(a)) as s:
        before = s.device_identity
    os.rename(a, b)
    with open_source(str(b)) as s:
        assert s.device_identity == before
        assert same_source(before, s.device_identity) is True


def test_rewritten_file_is_another_file(tmp_path: Path) -> None:
    """Write-then-rename (rsync without --inplace) makes a new inode: a documented False."""
    a = tmp_path / "a.img"
    ext4_like(a)
    with open_source(str(a)) as s:
        before = s.device_identity
    cp(a, tmp_path / "tmp")
    os.replace(tmp_path / "tmp", a)
    with open_source(str(a)) as s:
        assert same_source(before, s.device_identity) is False


# --- device identity of block devices ---


def test_loop_devices_name_their_backing_files(tmp_path: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    ext4_like(a)
    cp(a, b)
    with loop(a) as da, loop(b) as db, loop(a, "-r") as da2, open_source(da) as sa, open_source(db) as sb, \
            open_source(da2) as sa2, open_source(str(a)) as fa:  # fmt: skip
        assert sa.is_device and sa.source_id == sb.source_id  # the clone has the same UUID
        assert sa.device_identity == f"loop:{os.path.realpath(a)}"
        assert sb.device_identity == f"loop:{os.path.realpath(b)}"
        assert same_source(sa.device_identity, sb.device_identity) is False
        assert sa2.device_identity == sa.device_identity  # another loop device, the same file
        assert same_source(sa.device_identity, sa2.device_identity) is True
        assert same_source(sa.device_identity, fa.device_identity) is None  # the file itself: other evidence


def mbr_image(img: Path) -> str:
    """A 4 MiB image with an MBR holding one partition (sectors 2048..6143); its real path."""
    ext4_like(img, 4 * MiB)
    with open(img, "r+b") as f:
        entry = bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + (2048).to_bytes(4, "little") + (4096).to_bytes(4, "little")
        f.seek(440)
        f.write(b"\x12\x34\x56\x78\0\0" + entry + bytes(48) + b"\x55\xaa")
    return os.path.realpath(img)


def test_loop_offset(tmp_path: Path) -> None:
    real = mbr_image(tmp_path / "disk.img")
    with loop(Path(real), "-o", str(MiB)) as dev, open_source(dev) as s:
        assert s.device_identity == f"loop:{real}#offset={MiB}"
    with loop(Path(real)) as dev, open_source(dev) as s:
        assert s.device_identity == f"loop:{real}"


def test_loop_partition(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    real = mbr_image(img)
    with loop(img, "-P") as dev:
        name = os.path.basename(dev)
        sys_part = f"/sys/block/{name}/{name}p1"
        for _ in range(100):
            if os.path.exists(f"{sys_part}/dev"):
                break
            time.sleep(0.02)
        else:
            pytest.skip(f"the kernel made no partition of {dev} from its MBR (built without MSDOS partition support?)")
        part = f"{dev}p1"
        if not os.path.exists(part):  # no udev: make the node
            part = str(tmp_path / f"{name}p1")
            major, minor = map(int, Path(f"{sys_part}/dev").read_text().split(":"))
            os.mknod(part, 0o600 | stat.S_IFBLK, os.makedev(major, minor))
        with open_source(dev) as whole, open_source(part) as p1:
            assert whole.device_identity == f"loop:{real}"
            assert p1.device_identity == f"loop:{real}#p1"
            assert same_source(whole.device_identity, p1.device_identity) is False


def test_a_real_disk_has_a_serial_or_wwn() -> None:
    """The disks of this machine, through the real /sys (no need to open them)."""
    seen = []
    for name in sorted(os.listdir("/sys/block")):
        d = f"/sys/block/{name}"
        evidence = ("device/wwid", "wwid", "device/serial", "serial", "device/vpd_pg80")
        if name.startswith(("loop", "zram", "ram", "dm-", "md", "nbd", "sr")) or not any(
            os.path.exists(f"{d}/{f}") for f in evidence
        ):
            continue
        rdev = os.makedev(*map(int, Path(f"{d}/dev").read_text().split(":")))
        ident = block_device_identity(rdev)
        if ident:  # a serial of only zeros or blanks counts as none
            assert ident.startswith(("wwn:", "serial:")) and "#p" not in ident, ident
            seen.append(ident)
        for part in sorted(p for p in os.listdir(d) if os.path.exists(f"{d}/{p}/partition")):
            n = Path(f"{d}/{part}/partition").read_text().strip()
            prdev = os.makedev(*map(int, Path(f"{d}/{part}/dev").read_text().split(":")))
            assert block_device_identity(prdev) == (f"{ident}#p{n}" if ident else "")
    if not seen:
        pytest.skip("no disk here exposes a WWN or serial in /sys")
    assert len(set(seen)) == len(seen), seen


def _sysfs(root: Path, disk: str, major: int, files: dict[str, bytes], partitions: int = 1) -> None:
    """A fake /sys: devices/.../block/<disk>[/<disk>N] and dev/block/MAJ:MIN links to them."""
    dev = root / "devices" / "pci0000:00" / "host0" / "block" / disk
    for rel, data in files.items():
        (dev / rel).parent.mkdir(parents=True, exist_ok=True)
        (dev / rel).write_bytes(data)
    dev.mkdir(parents=True, exist_ok=True)
    links = root / "dev" / "block"
    links.mkdir(parents=True, exist_ok=True)
    (links / f"{major}:0").symlink_to(os.path.relpath(dev, links))
    for n in range(1, partitions + 1):
        (dev / f"{disk}{n}").mkdir()
        (dev / f"{disk}{n}" / "partition").write_text(f"{n}\n")
        (links / f"{major}:{n}").symlink_to(os.path.relpath(dev / f"{disk}{n}", links))


def test_sysfs_evidence_order_and_forms(tmp_path: Path) -> None:
    sys_ = tmp_path / "sys"
    vpd = b"\x00\x80\x00\x0c  WD-WX1234  "
    _sysfs(sys_, "sda", 8, {"device/wwid": b"naa.5000c500a1b2c3d4\n", "device/vpd_pg80": vpd}, partitions=2)
    _sysfs(sys_, "sdb", 9, {"device/vpd_pg80": vpd})
    _sysfs(sys_, "nvme0n1", 10, {"wwid": b"eui.0025388b91b1c2d3\n", "device/serial": b"S4EVNF0M  \n"})
    _sysfs(sys_, "vda", 11, {"serial": b"19966343833643  68"})  # virtio: no newline, inner spaces
    _sysfs(sys_, "mmcblk0", 12, {"device/serial": b"0x00000000\n", "serial": b"  \n"})
    _sysfs(sys_, "sdc", 13, {"device/vpd_pg80": b"\x00\x83\x00\x04abcd"})  # not page 0x80
    root = str(sys_ / "dev" / "block")

    def ident(major: int, minor: int) -> str:
        return block_device_identity(os.makedev(major, minor), root)

    assert ident(8, 0) == "wwn:naa.5000c500a1b2c3d4"
    assert ident(8, 1) == "wwn:naa.5000c500a1b2c3d4#p1"
    assert ident(8, 2) == "wwn:naa.5000c500a1b2c3d4#p2"
    assert ident(9, 1) == "serial:WD-WX1234#p1"
    assert ident(10, 0) == "wwn:eui.0025388b91b1c2d3"  # the namespace's wwid before the controller serial
    assert ident(11, 1) == "serial:19966343833643 68#p1"
    assert ident(12, 0) == ident(12, 1) == ""  # only zeros and blanks: nothing known, a partition alone is none
    assert ident(13, 0) == ""
    assert ident(99, 0) == ""  # not in /sys
    assert same_source(ident(8, 1), ident(8, 2)) is False
    assert same_source(ident(8, 1), ident(9, 1)) is None  # wwn vs serial: not comparable


def test_same_source_semantics() -> None:
    assert same_source("", "") is None
    assert same_source("", "serial:A") is None
    assert same_source("wwn:naa.1", "") is None
    assert same_source("wwn:naa.1", "serial:A") is None
    assert same_source("file:2049:12", "loop:/srv/a.img") is None
    assert same_source("serial:A#p1", "serial:A#p1") is True
    assert same_source("serial:A#p1", "serial:B#p1") is False
    assert same_source("serial:A#p1", "serial:A#p2") is False
    assert same_source("serial:A", "serial:A#p1") is False
    assert same_source("wwn:naa.1", "wwn:naa.2") is False
    assert same_source("file:2049:12", "file:2049:13") is False
    assert same_source("file:2049:12", "file:2065:12") is False  # moved to another filesystem, or copied
    assert same_source("loop:/srv/a.img", "loop:/srv/b.img") is False


# --- a source that changes while being read ---


@pytest.mark.parametrize("new_size", [MiB, 3 * MiB])
def test_file_that_changes_size_is_an_error(tmp_path: Path, new_size: int) -> None:
    a = tmp_path / "a.img"
    ext4_like(a, 2 * MiB)
    with open_source(str(a)) as s:
        os.truncate(a, new_size)
        with pytest.raises(SourceError) as e:
            s.check_unchanged()
    assert e.value.exit_code == 3
    assert str(e.value) == (f"source {a} changed size while being read (was {2 * MiB} bytes, now {new_size}); "
                            f"nothing was published")  # fmt: skip


def test_short_reads_are_read_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read may return less than asked without being at the end (a source image on FUSE or NFS): that is
    no reason to say the source ended. Where it really ends, the error says so."""
    import imagechain.sources as sources

    a = tmp_path / "a.img"
    data = os.urandom(MiB)
    a.write_bytes(data)
    real = os.pread
    monkeypatch.setattr(sources.os, "pread", lambda fd, n, off: real(fd, min(n, 1000), off))
    with open_source(str(a)) as s:
        assert s.read(12345, 300_000) == data[12345:312345]
        os.truncate(a, MiB // 2)
        with pytest.raises(SourceError, match=f"ended at {MiB // 2} bytes while reading"):
            s.read(MiB // 2 - 5000, 10_000)


def test_file_written_while_read_is_flagged(tmp_path: Path) -> None:
    a = tmp_path / "a.img"
    ext4_like(a)
    os.utime(a, ns=(1_000_000_000, 1_000_000_000))  # an mtime any write moves, whatever the clock's grain
    with open_source(str(a)) as s:
        assert s.mtime_ns == 1_000_000_000
        assert s.check_unchanged() == []
        with open(a, "r+b") as f:
            f.seek(MiB)
            f.write(b"changed")
        warnings = s.check_unchanged()
    assert len(warnings) == 1
    assert warnings[0].startswith(f"source {a} was modified while being read (mtime")
    assert warnings[0].endswith("changed): the point may not be consistent; use a snapshot")


def test_metadata_change_while_read_is_flagged_by_ctime(tmp_path: Path) -> None:
    a = tmp_path / "a.img"
    ext4_like(a)
    with open_source(str(a)) as s:
        time.sleep(0.03)  # past the timestamp grain of kernels without fine-grained ctime
        os.utime(a, ns=(s.mtime_ns, s.mtime_ns))  # mtime put back, as `touch -r` or a careful tool would
        assert s.check_unchanged() == [f"source {a} was modified while being read (ctime changed): "
                                       f"the point may not be consistent; use a snapshot"]  # fmt: skip


def test_device_that_changes_size_is_an_error(tmp_path: Path) -> None:
    need_tool("losetup")
    a = tmp_path / "a.img"
    ext4_like(a, 2 * MiB)
    with loop(a) as dev, open_source(dev) as s:
        assert s.check_unchanged() == []
        os.truncate(a, 3 * MiB)
        subprocess.run(["losetup", "-c", dev], check=True)  # the loop device takes the file's new size
        with pytest.raises(SourceError, match=rf"changed size while being read \(was {2 * MiB} bytes, "
                                              rf"now {3 * MiB}\); nothing was published"):  # fmt: skip
            s.check_unchanged()


# --- names ---


@pytest.mark.parametrize("name", ["a/b", "x@-1", "", "::", "a::b", "a\nb", "a\tb", "a\x7fb", "a\u2028b", " ",
                                  "\t", ".", "..", "x" * 1025, "a\udcffb"])  # fmt: skip
def test_check_name_rejects(name: str) -> None:
    with pytest.raises(UsageError) as e:
        check_name("chain", name)
    assert e.value.exit_code == 2
    msg = str(e.value)
    assert msg.startswith("invalid chain name ") and msg.endswith(f"a chain name is {NAME_RULE}")
    assert "\n" not in msg and len(msg) < 400


@pytest.mark.parametrize("name", ["daily", "PC-01.example", "a:b", "with space", "Übung", "x" * 1024, "...",
                                  " padded "])  # fmt: skip
def test_check_name_accepts(name: str) -> None:
    assert check_name("host", name) is name


def test_data_chunks_of_a_sparse_image(tmp_path: Path) -> None:
    """Which chunks of an image file hold data: a chunk touched by one byte of data counts, holes at the
    end and a file of holes only count as none."""
    img = tmp_path / "sparse.img"
    with open(img, "wb") as f:
        f.write(b"\1" * (MiB + MiB // 2))  # chunks 0 and 1
        f.seek(7 * MiB + 4096)
        f.write(b"\2" * 4096)  # chunk 7
        f.truncate(10 * MiB + 5)  # chunk 10 is 5 bytes of hole
    with open_source(str(img)) as src:
        got = src.data_chunks(MiB)
    assert got is not None and list(got) == [1, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0]
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    os.truncate(empty, 3 * MiB)
    with open_source(str(empty)) as src:
        got = src.data_chunks(MiB)
    assert got is not None and list(got) == [0, 0, 0]


def test_a_source_file_name_that_is_not_utf8(tmp_path: Path, repo: Path) -> None:
    """A file name from a system that wrote Latin-1 (`März` as 4D E4 72 7A): the backup died with a
    UnicodeEncodeError traceback while making the source's id. Its name is kept with the byte escaped."""
    from .conftest import assert_portable, exe, write_volume

    vol = Path(os.fsdecode(bytes(tmp_path) + b"/M\xe4rz.img"))
    data = bytearray(write_volume(vol, 2 * MiB, seed=41))
    for kind in ("full", "incremental"):  # the same source both times
        if kind == "incremental":
            data[:4096] = os.urandom(4096)
            vol.write_bytes(data)
        r = subprocess.run([exe(), "backup", str(vol), str(repo), "--json"], capture_output=True, text=True,
                           check=False)  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert f'"kind": "{kind}"' in r.stdout
    info = subprocess.run([exe(), "info", str(repo), "--json"], capture_output=True, text=True, check=True)
    assert '"source": "M\\\\xe4rz.img"' in info.stdout
    out = tmp_path / "out.img"
    subprocess.run([exe(), "restore", str(repo), str(out)], capture_output=True, check=True)
    assert out.read_bytes() == data
    assert_portable(repo)
    # names given that are not UTF-8 are refused, in one line (they died with the same traceback)
    for opt in ("--chain", "--source-name", "--host"):
        bad = subprocess.run([exe(), "backup", str(vol), str(repo), opt, os.fsdecode(b"x\xff")], capture_output=True,
                             text=True, check=False)  # fmt: skip
        assert bad.returncode == 2 and "it is not valid UTF-8" in bad.stderr and len(bad.stderr.splitlines()) == 1
