"""Partition tables made by the real tools (sfdisk, mkfs) read back as those tools see them; broken
tables refuse; bare filesystems are not mistaken for tables; a GPT restored onto a larger disk is
repaired so that sfdisk and sgdisk find nothing wrong."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from imagechain.partitions import Table, TableError, from_json, read_table, relocate_gpt_backup, to_json

from .conftest import loop_device, need_root, need_tool

MiB = 1 << 20

GPT_SCRIPT = (
    "label: gpt\n"
    'size=20MiB, type=linux, name="root fs"\n'
    'size=10MiB, type=uefi, name="EFI système"\n'
    "size=8MiB, type=swap\n"
)
MBR_SCRIPT = (
    "label: dos\n"
    "size=10MiB, type=83, bootable\n"
    "size=10MiB, type=7\n"
    "size=30MiB, type=5\n"
    "{img}5 : size=8MiB, type=83\n"
    "{img}6 : size=8MiB, type=82\n"
)


def sfdisk(target: str | Path, script: str) -> None:
    need_tool("sfdisk")
    subprocess.run(["sfdisk", "-q", "--no-reread", str(target)], input=script.replace("{img}", str(target)),
                   text=True, check=True, capture_output=True)  # fmt: skip


def make_image(path: Path, size: int, script: str) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    sfdisk(path, script)
    return path


def sfdisk_json(target: str | Path) -> dict[str, Any]:
    out = subprocess.run(["sfdisk", "--json", str(target)], check=True, capture_output=True, text=True).stdout
    return json.loads(out)["partitiontable"]  # type: ignore[no-any-return]


def table_of(path: Path) -> Table | None:
    fd = os.open(path, os.O_RDONLY)
    try:
        return read_table(lambda off, n: os.pread(fd, n, off), os.fstat(fd).st_size)
    finally:
        os.close(fd)


def peek(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def assert_matches_sfdisk(table: Table, pt: dict[str, Any]) -> None:
    ss = pt["sectorsize"]
    assert table.sector_size == ss
    assert table.kind == {"gpt": "gpt", "dos": "mbr"}[pt["label"]]
    want_id = pt["id"].lower().removeprefix("0x")
    assert table.disk_id == want_id
    got = {p.number: p for p in table.partitions}
    want = {int(re.search(r"(\d+)$", p["node"]).group(1)): p for p in pt["partitions"]}  # type: ignore[union-attr]
    assert sorted(got) == sorted(want)
    for n, w in want.items():
        p = got[n]
        assert (p.start, p.size) == (w["start"] * ss, w["size"] * ss), n
        if table.kind == "gpt":
            assert p.type == w["type"].lower()
            assert p.uuid == w["uuid"].lower()
            assert p.name == w.get("name", "")
        else:
            assert p.type == f"0x{int(w['type'], 16):02x}"
            assert p.container == (int(w["type"], 16) == 5)


# ---------------------------------------------------------------- reading what sfdisk wrote


def test_gpt_matches_sfdisk(tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", 64 * MiB, GPT_SCRIPT)
    table = table_of(img)
    assert table is not None
    assert_matches_sfdisk(table, sfdisk_json(img))
    assert [p.name for p in table.partitions] == ["root fs", "EFI système", ""]
    assert table.notes == []
    end = 64 * MiB
    # pMBR, primary header, primary array (128 x 128 bytes), backup array, backup header
    assert table.metadata_areas == [(0, 512), (512, 512), (1024, 16384), (end - 512 - 16384, 16384), (end - 512, 512)]


def test_mbr_with_logical_partitions_matches_sfdisk(tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", 64 * MiB, MBR_SCRIPT)
    table = table_of(img)
    assert table is not None
    pt = sfdisk_json(img)
    assert_matches_sfdisk(table, pt)
    assert [p.number for p in table.partitions] == [1, 2, 3, 5, 6]
    assert [p.type for p in table.partitions] == ["0x83", "0x07", "0x05", "0x83", "0x82"]
    # the MBR and one EBR per logical partition, each just before it
    ext = table.partition(3)
    assert table.metadata_areas == [(0, 512), (ext.start, 512), (table.partition(6).start - MiB, 512)]
    assert all(ext.start < p.start and p.end <= ext.end for p in table.partitions if p.number >= 5)


@contextlib.contextmanager
def loop_4k(image: Path) -> Iterator[str]:
    """The image as a 4Kn disk: sfdisk has no --sector-size for image files."""
    need_root()
    need_tool("losetup", "sfdisk")
    dev = subprocess.run(["losetup", "-f", "--show", "--sector-size", "4096", str(image)], check=True,
                         capture_output=True, text=True).stdout.strip()  # fmt: skip
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def make_4k_image(path: Path, size: int) -> dict[str, Any]:
    with open(path, "wb") as f:
        f.truncate(size)
    with loop_4k(path) as dev:
        sfdisk(dev, GPT_SCRIPT)
        return sfdisk_json(dev)


def test_gpt_with_4k_sectors(tmp_path: Path) -> None:
    img = tmp_path / "disk4k.img"
    pt = make_4k_image(img, 64 * MiB)
    assert pt["sectorsize"] == 4096
    table = table_of(img)  # found without being told the sector size
    assert table is not None
    assert_matches_sfdisk(table, pt)
    assert table.metadata_areas[:2] == [(0, 4096), (4096, 4096)]


def test_hybrid_mbr_gpt_wins(tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", 64 * MiB, GPT_SCRIPT)
    # a hybrid MBR: keep the 0xEE entry, mirror GPT partition 1 as an MBR 0x83 entry in slot 2
    patch(img, 446 + 16, struct.pack("<B3sB3sII", 0x80, b"\0\0\0", 0x83, b"\0\0\0", 2048, 40960))
    table = table_of(img)
    assert table is not None and table.kind == "gpt"
    assert_matches_sfdisk(table, sfdisk_json(img))


def test_json_round_trip(tmp_path: Path) -> None:
    for script in (GPT_SCRIPT, MBR_SCRIPT):
        img = make_image(tmp_path / "disk.img", 64 * MiB, script)
        table = table_of(img)
        assert table is not None
        d = json.loads(json.dumps(to_json(table)))
        assert from_json(d) == table
    with pytest.raises(ValueError):
        from_json({"kind": "gpt", "partitions": []})


# ---------------------------------------------------------------- what is not a table


@pytest.mark.parametrize("kind", ["ext4", "vfat", "ntfs", "exfat"])
def test_bare_filesystem_is_not_a_table(tmp_path: Path, kind: str) -> None:
    cmd = {
        "ext4": ["mkfs.ext4", "-q", "-F"],
        "vfat": ["mkfs.vfat", "-F", "32"],
        "ntfs": ["mkntfs", "-F", "-Q", "-q"],
        "exfat": ["mkfs.exfat"],
    }[kind]
    need_tool(cmd[0])
    img = tmp_path / "fs.img"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    subprocess.run([*cmd, str(img)], check=True, capture_output=True)
    if kind != "ext4":
        assert peek(img, 510, 2) == b"\x55\xaa"  # the boot sector looks like an MBR at first glance
    assert table_of(img) is None


def test_nothing_there_is_not_a_table(tmp_path: Path) -> None:
    assert read_table(lambda off, n: bytes(n), 64 * MiB) is None
    assert read_table(lambda off, n: bytes(n), 100) is None
    sector = bytearray(512)
    sector[510:] = b"\x55\xaa"
    assert read_table(lambda off, n: bytes(sector + bytes(n))[off : off + n], MiB) is None  # no entries
    sector[446:462] = struct.pack("<B3sB3sII", 0x13, b"", 0x83, b"", 2048, 100)  # boot flag 0x13: not a table
    assert read_table(lambda off, n: bytes(sector + bytes(n))[off : off + n], MiB) is None


# ---------------------------------------------------------------- damaged tables


def test_gpt_damaged_primary_header_reads_backup(tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", 64 * MiB, GPT_SCRIPT)
    good = table_of(img)
    assert good is not None
    patch(img, 512 + 60, b"\xff")  # inside the disk GUID: the header CRC no longer matches
    table = table_of(img)
    assert table is not None
    assert table.partitions == good.partitions and table.disk_id == good.disk_id
    assert len(table.notes) == 1 and "backup" in table.notes[0] and "CRC" in table.notes[0]


def test_gpt_damaged_primary_array_reads_backup(tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", 64 * MiB, GPT_SCRIPT)
    good = table_of(img)
    patch(img, 1024 + 40, b"\xff\xff")  # partition 1's first LBA, covered by the array CRC
    table = table_of(img)
    assert table is not None and good is not None
    assert table.partitions == good.partitions
    assert any("array CRC" in n for n in table.notes)


def test_gpt_both_headers_damaged(tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", 64 * MiB, GPT_SCRIPT)
    patch(img, 512 + 60, b"\xff")
    patch(img, 64 * MiB - 512 + 60, b"\xff")
    with pytest.raises(TableError, match="no valid GPT"):
        table_of(img)


def test_gpt_partition_past_the_end(tmp_path: Path) -> None:
    """A correct-CRC GPT describing a bigger disk (a truncated image) refuses rather than guesses."""
    img = make_image(tmp_path / "disk.img", 64 * MiB, GPT_SCRIPT)
    with open(img, "r+b") as f:
        f.truncate(36 * MiB)  # partition 3 runs from 31 to 39 MiB
    with pytest.raises(TableError, match="past the end"):
        table_of(img)


def _set_mbr_entry(img: Path, slot: int, start: int, count: int) -> None:
    off = 446 + 16 * slot
    raw = bytearray(peek(img, off, 16))
    struct.pack_into("<II", raw, 8, start, count)
    patch(img, off, bytes(raw))


def test_mbr_overlapping_partitions(tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", 64 * MiB, MBR_SCRIPT)
    _set_mbr_entry(img, 1, 2048 + 100, 20480)  # partition 2 now starts inside partition 1
    with pytest.raises(TableError, match="overlaps"):
        table_of(img)


def test_mbr_partition_past_the_end(tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", 64 * MiB, MBR_SCRIPT)
    _set_mbr_entry(img, 1, 22528, 200000)
    with pytest.raises(TableError, match="past the end"):
        table_of(img)


def test_mbr_ebr_loop(tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", 64 * MiB, MBR_SCRIPT)
    table = table_of(img)
    assert table is not None
    second_ebr = table.metadata_areas[2][0]
    raw = bytearray(peek(img, second_ebr + 446 + 16, 16))
    raw[4] = 0x05
    struct.pack_into("<II", raw, 8, 0, 2048)  # link back to the first EBR
    patch(img, second_ebr + 446 + 16, bytes(raw))
    with pytest.raises(TableError, match="loops"):
        table_of(img)


# ---------------------------------------------------------------- restore onto a larger disk


def verify(target: Path) -> tuple[str, str]:
    """(sfdisk --verify complaints, sgdisk -v problems); empty strings when both are clean."""
    r = subprocess.run(["sfdisk", "--verify", str(target)], capture_output=True, text=True, check=False)
    sf = "" if r.returncode == 0 and "No errors detected" in r.stdout and not r.stderr.strip() else r.stdout + r.stderr
    sg = ""
    if shutil.which("sgdisk"):
        r = subprocess.run(["sgdisk", "-v", str(target)], capture_output=True, text=True, check=False)
        sg = "" if r.returncode == 0 and "No problems found" in r.stdout else r.stdout + r.stderr
    return sf, sg


@pytest.fixture
def grown(tmp_path: Path) -> Iterator[tuple[Path, Table]]:
    """A 64 MiB GPT disk image written onto a 96 MiB target, as a restore leaves it."""
    src = make_image(tmp_path / "disk.img", 64 * MiB, GPT_SCRIPT)
    before = table_of(src)
    assert before is not None
    target = tmp_path / "target.img"
    shutil.copyfile(src, target)
    with open(target, "r+b") as f:
        f.truncate(96 * MiB)
    yield target, before


def test_grown_disk_without_relocation_is_flagged(grown: tuple[Path, Table]) -> None:
    target, before = grown
    sf, sg = verify(target)
    assert "backup GPT table is not on the end" in sf
    if shutil.which("sgdisk"):
        assert "doesn't reside" in sg
    table = table_of(target)  # still readable: the primary is intact
    assert table is not None and table.partitions == before.partitions
    assert any("not at the last LBA" in n for n in table.notes)


def test_relocate_gpt_backup(grown: tuple[Path, Table]) -> None:
    target, before = grown
    fd = os.open(target, os.O_RDWR)
    try:
        assert not relocate_gpt_backup(fd, 64 * MiB, 64 * MiB, 512)  # no growth: leave the copy exact
        assert relocate_gpt_backup(fd, 64 * MiB, 96 * MiB, 512)
        assert not relocate_gpt_backup(fd, 64 * MiB, 96 * MiB, 512)  # already at the end
    finally:
        os.close(fd)
    assert verify(target) == ("", "")
    pt = sfdisk_json(target)
    new_last = 96 * MiB // 512 - 1
    assert pt["lastlba"] == new_last - 32 - 1  # the backup array (32 sectors) and header follow it
    after = table_of(target)
    assert after is not None and after.notes == []
    assert after.partitions == before.partitions and after.disk_id == before.disk_id
    assert_matches_sfdisk(after, pt)
    assert peek(target, 64 * MiB - 512, 512) == bytes(512)  # the stale backup header is gone
    assert struct.unpack_from("<I", peek(target, 446 + 12, 4))[0] == new_last  # protective MBR covers the disk
    hdr = peek(target, new_last * 512, 92)
    assert hdr[:8] == b"EFI PART"
    assert zlib.crc32(hdr[:16] + bytes(4) + hdr[20:]) == struct.unpack_from("<I", hdr, 16)[0]


def test_relocate_4k_sectors(tmp_path: Path) -> None:
    src = tmp_path / "disk4k.img"
    make_4k_image(src, 64 * MiB)
    target = tmp_path / "target.img"
    shutil.copyfile(src, target)
    with open(target, "r+b") as f:
        f.truncate(96 * MiB)
    with loop_4k(target) as dev:
        assert "backup GPT table is not on the end" in verify(Path(dev))[0]
    fd = os.open(target, os.O_RDWR)
    try:
        assert relocate_gpt_backup(fd, 64 * MiB, 96 * MiB, 4096)
    finally:
        os.close(fd)
    with loop_4k(target) as dev:
        assert verify(Path(dev)) == ("", "")
        assert sfdisk_json(dev)["lastlba"] == 96 * MiB // 4096 - 1 - 4 - 1  # 16 KiB array = 4 sectors
    table = table_of(target)
    assert table is not None and table.sector_size == 4096 and table.notes == []
    assert table.metadata_areas[-1] == (96 * MiB - 4096, 4096)


def test_relocate_on_a_loop_device(grown: tuple[Path, Table]) -> None:
    """The same through a block device, where the target's size comes from the device, not the file."""
    target, _ = grown
    with loop_device(target) as dev:
        fd = os.open(dev, os.O_RDWR)
        try:
            assert relocate_gpt_backup(fd, 64 * MiB, 96 * MiB, 512)
            os.fsync(fd)
        finally:
            os.close(fd)
    assert verify(target) == ("", "")


def test_relocate_without_gpt(tmp_path: Path) -> None:
    img = make_image(tmp_path / "disk.img", 64 * MiB, MBR_SCRIPT)
    before = zlib.crc32(img.read_bytes())
    fd = os.open(img, os.O_RDWR)
    try:
        assert not relocate_gpt_backup(fd, 64 * MiB, 96 * MiB, 512)
    finally:
        os.close(fd)
    assert zlib.crc32(img.read_bytes()) == before
