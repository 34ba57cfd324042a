"""What the format spec (docs/FORMAT.md) promises about the 1.1 frame directory, 1.0 compatibility, the
existence rule (sound / damaged / incomplete), segments found by header, temporaries, the chain's
compression, and how problems are reported: which file is named, where notices go, which exit code.

Damage is done to real image files, located through the byte layout of docs/FORMAT.md; the CLI is the
installed console script in a subprocess."""

from __future__ import annotations

import errno
import itertools
import json
import os
import random
import re
import resource
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from imagechain.address import open_point
from imagechain.codec import CodecParams
from imagechain.engine.backup import backup
from imagechain.engine.restore import restore
from imagechain.engine.verify import verify
from imagechain.errors import IntegrityError, RepositoryError
from imagechain.format import spec
from imagechain.format.reader import PointFiles, PointReader
from imagechain.format.writer import ImageWriter
from imagechain.repository import Repository
from imagechain.sizes import human
from imagechain.stores.local import _LocalReader

from .conftest import error_lines, exe, flip, write_volume

BS = 64 << 10
MIB = 1 << 20


# -- helpers ---------------------------------------------------------------------------------------------


def ic(*args: object, env: dict[str, str] | None = None, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([exe(), *map(str, args)], capture_output=True, text=True,
                          env=env if env is not None else dict(os.environ), timeout=120, **kw)  # fmt: skip


def ok(*args: object) -> subprocess.CompletedProcess[str]:
    p = ic(*args)
    assert p.returncode == 0, f"imagechain {' '.join(map(str, args))} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
    assert "Traceback" not in p.stderr
    return p


def one_line_error(p: subprocess.CompletedProcess[str], code: int) -> str:
    assert p.returncode == code, f"exit {p.returncode}, wanted {code}\nstdout: {p.stdout}\nstderr: {p.stderr}"
    assert "Traceback" not in p.stderr + p.stdout, p.stderr
    lines = error_lines(p.stderr)
    assert len(lines) == 1 and lines[0].startswith("imagechain: error: "), p.stderr
    return lines[0]


def point_of(repo: Path, point_id: str) -> PointFiles:
    cat = Repository.open(str(repo)).catalog()
    [p] = [p for p in cat.points.values() if str(p.point_id) == point_id]
    return p


def file_pos(repo: Path, point: PointFiles, logical: int) -> tuple[Path, int]:
    """The segment file holding a logical offset of a point, and the offset in that file."""
    for f in point.segments:
        if f.seg.logical_offset <= logical < f.data_end:
            return repo / f.name, spec.SEGMENT_HEADER_SIZE + logical - f.seg.logical_offset
    raise AssertionError(f"logical offset {logical} is in no segment of {point.name}")


def restored(repo: Path, point_id: str, target: Path) -> bytes:
    res = open_point(f"{repo}::{point_id[:8]}")
    assert str(res.point.point_id) == point_id
    restore(res.repo, res.point, str(target))
    try:
        return target.read_bytes()
    finally:
        target.unlink()


def edit(data: bytes, blocks: list[int], seed: int) -> bytes:
    out = bytearray(data)
    rnd = random.Random(seed)
    for b in blocks:
        out[b * BS + 100 : b * BS + 300] = rnd.randbytes(200)
    return bytes(out)


@dataclass
class Split:
    """A full point of incompressible data split into 1 MiB segments."""

    vol: Path
    data: bytes
    point_id: str
    files: list[Path]  # in segment order


def split_point(tmp_path: Path, repo: Path, size: int = 4 * MIB) -> Split:
    vol = tmp_path / "vol.img"
    data = os.urandom(size)
    vol.write_bytes(data)
    r = backup(str(vol), str(repo), split_size=MIB)
    files = [repo / f for f in r.files]
    assert len(files) >= 4, files
    assert [f.name for f in files[1:3]] == [files[0].name.replace(".icimg", f".s{i:03d}.icimg") for i in (1, 2)]
    return Split(vol, data, r.point_id, files)


# == 1. the frame directory (1.1) ============================================================================


def framed_point(tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[bytes, str]:
    monkeypatch.setattr("imagechain.format.writer.INDEX_FRAME_ENTRIES", 5)
    vol = tmp_path / "vol.img"
    data = write_volume(vol, 3 * MIB, seed=31)
    r = backup(str(vol), str(repo))
    return data, r.point_id


def test_frame_directory_tiles_the_index_and_lets_a_reader_skip_frames(
    tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data, pid = framed_point(tmp_path, repo, monkeypatch)
    p = point_of(repo, pid)
    ft = p.footer
    assert p.header.minor == spec.FORMAT_MINOR >= 1
    with PointReader(Repository.open(str(repo)).store, p) as r:
        d = r.directory()
        assert d is not None and len(d) >= 4, d
        assert ft.directory_length == len(d) * spec.FRAME_ENTRY.itemsize
        offsets = d["offset"].astype(np.int64)
        ends = offsets + d["length"]
        assert int(offsets[0]) == ft.index_offset
        assert (offsets[1:] == ends[:-1]).all()
        assert int(ends[-1]) == ft.index_offset + ft.index_length == ft.directory_offset
        assert int(d["entries"].astype(np.int64).sum()) == ft.index_count
        assert (d["entries"] <= 5).all() and (d["entries"] > 0).all()
        first, end = d["first_block"].astype(np.int64), d["end_block"].astype(np.int64)
        assert (first < end).all() and (first[1:] >= end[:-1]).all() and (end[1:] > end[:-1]).all()

        frames = list(r.iter_index())
        assert len(frames) == len(d)
        for fr, de in zip(frames, d, strict=True):
            assert len(fr) == int(de["entries"])
            assert int(fr["block"][0]) == int(de["first_block"])
            assert int(fr["block"][-1]) + int(fr["count"][-1]) == int(de["end_block"])

        # from_block skips every frame that ends at or before it, and reads none of them
        k = len(d) // 2
        b = int(d["end_block"][k - 1])
        read_at: list[int] = []
        orig = PointReader.read

        def spy(self: PointReader, offset: int, length: int) -> bytes:
            read_at.append(offset)
            return orig(self, offset, length)

        monkeypatch.setattr(PointReader, "read", spy)
        later = list(r.iter_index(from_block=b))
        monkeypatch.setattr(PointReader, "read", orig)
        keep = d["end_block"] > b
        assert len(later) == int(keep.sum()) == len(d) - k
        assert int(later[0]["block"][0]) == int(d["first_block"][k])
        skipped = {int(o) for o in d["offset"][~keep]}
        assert skipped and not skipped & set(read_at), (skipped, read_at)
        assert np.array_equal(np.concatenate(later), np.concatenate(frames[k:]))
    assert restored(repo, pid, tmp_path / "out.img") == data
    v = ok("verify", repo)
    assert "1 point(s) checked, 0 problem(s)" in v.stdout


def _damage_directory(repo: Path, pid: str) -> Path:
    p = point_of(repo, pid)
    ft = p.footer
    assert ft.directory_length >= 2 * spec.FRAME_ENTRY.itemsize
    path, pos = file_pos(repo, p, ft.directory_offset + ft.directory_length // 2 + 3)
    flip(path, pos)
    return path


def test_damaged_frame_directory_fails_restore_and_verify(
    tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _data, pid = framed_point(tmp_path, repo, monkeypatch)
    _damage_directory(repo, pid)
    target = tmp_path / "out.img"
    res = open_point(f"{repo}::{pid[:8]}")  # headers and footer are sound: the point exists
    with pytest.raises(IntegrityError, match="directory"):
        restore(res.repo, res.point, str(target))
    assert not target.exists()
    line = one_line_error(ic("restore", f"{repo}::{pid[:8]}", target), 7)
    assert "directory" in line, line
    assert not target.exists()

    rep = verify(Repository.open(str(repo)))
    [pr] = rep.points
    assert pr.point_id == pid and not pr.ok and not rep.ok
    assert any("directory" in t for t in pr.problems), pr.problems
    v = ic("verify", repo)
    assert v.returncode == 7 and "FAILED" in v.stdout and "directory" in v.stdout, v.stdout


def test_backup_does_not_build_on_a_damaged_frame_directory(
    tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _data, pid = framed_point(tmp_path, repo, monkeypatch)
    path = _damage_directory(repo, pid)
    before = sorted(p.name for p in repo.rglob("*.icimg"))
    with pytest.raises(IntegrityError, match="directory"):
        backup(str(tmp_path / "vol.img"), str(repo))
    assert sorted(p.name for p in repo.rglob("*.icimg")) == before and path.exists()


# == 2. reading 1.0 files ===================================================================================


def test_format_1_0_point_without_directory_lists_verifies_restores_and_is_continued(
    tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("imagechain.format.writer.INDEX_FRAME_ENTRIES", 5)
    vol = tmp_path / "vol.img"
    v0 = write_volume(vol, 3 * MIB, seed=41)
    orig = ImageWriter.__init__

    def as_1_0(self: ImageWriter, store: Any, base: str, header: spec.PointHeader, *args: Any, **kw: Any) -> None:
        header.minor = 0
        orig(self, store, base, header, *args, **kw)

    with monkeypatch.context() as m:
        m.setattr(ImageWriter, "__init__", as_1_0)
        r0 = backup(str(vol), str(repo))
    p0 = point_of(repo, r0.point_id)
    ft = p0.footer
    assert p0.header.minor == 0
    raw = (repo / r0.files[0]).read_bytes()
    assert struct.unpack_from("<H", raw, spec.SEGMENT_HEADER_SIZE + 10)[0] == 0  # format_minor on disk
    assert ft.directory_length == 0 and ft.summary_offset == ft.index_offset + ft.index_length
    assert ft.directory_digest == bytes(spec.DIRECTORY_DIGEST_SIZE)
    assert ft.index_count > 10  # so the index is several zstd frames of 5 entries, back to back
    with PointReader(Repository.open(str(repo)).store, p0) as r:
        assert r.directory() is None
        idx = r.index()
        assert len(idx) == ft.index_count
        assert np.array_equal(np.concatenate(list(r.iter_index(from_block=20))), idx)

    listing = json.loads(ok("list", repo, "--json").stdout)
    assert [[row["point_id"] for row in ch] for ch in listing["chains"]] == [[r0.point_id]]
    assert listing["damaged"] == [] and listing["incomplete"] == []
    assert json.loads(ok("info", f"{repo}::{r0.point_id[:8]}", "--json").stdout)["format"] == "1.0"
    ok("verify", repo)
    assert verify(Repository.open(str(repo))).ok
    assert restored(repo, r0.point_id, tmp_path / "out.img") == v0

    # an ordinary (1.5) incremental on top, its parent map rebuilt from the 1.0 index (no cache)
    v1 = edit(v0, [1, 7, 30], seed=4)
    vol.write_bytes(v1)
    r1 = backup(str(vol), str(repo), cache_dir=None)
    assert (r1.kind, r1.parent_id, r1.changed_blocks) == ("incremental", r0.point_id, 3)
    assert point_of(repo, r1.point_id).header.minor == spec.FORMAT_MINOR == 5
    rep = verify(Repository.open(str(repo)))
    assert rep.ok and [p.point_id for p in rep.points] == [r0.point_id, r1.point_id], rep.as_dict()
    ok("verify", f"{repo}::{r1.point_id[:8]}")
    assert restored(repo, r1.point_id, tmp_path / "out.img") == v1
    assert restored(repo, r0.point_id, tmp_path / "out.img") == v0


# == 3. an incremental without changes ======================================================================


def test_unchanged_volume_gives_an_empty_index(tmp_path: Path, repo: Path) -> None:
    vol = tmp_path / "vol.img"
    data = write_volume(vol, 2 * MIB, seed=51)
    backup(str(vol), str(repo))
    r1 = backup(str(vol), str(repo))
    assert (r1.kind, r1.changed_blocks, r1.stored_bytes) == ("incremental", 0, 0)
    p1 = point_of(repo, r1.point_id)
    assert p1.footer.index_length == 0 and p1.footer.index_count == 0
    assert p1.footer.directory_length == 0
    with PointReader(Repository.open(str(repo)).store, p1) as r:
        assert len(r.index()) == 0
    assert restored(repo, r1.point_id, tmp_path / "out.img") == data
    assert verify(Repository.open(str(repo))).ok
    r2 = backup(str(vol), str(repo), cache_dir=None)  # and a point builds on it
    assert (r2.parent_id, r2.changed_blocks) == (r1.point_id, 0)
    assert restored(repo, r2.point_id, tmp_path / "out.img") == data


# == 4. existence: sound, damaged, incomplete ==============================================================


@pytest.mark.parametrize("which", ["incr", "split full"])
def test_altered_point_header_is_damaged_and_named_by_its_id(tmp_path: Path, repo: Path, which: str) -> None:
    sp = split_point(tmp_path, repo, 3 * MIB)
    v1 = sp.data[: 5 * BS] + os.urandom(BS) + sp.data[6 * BS :]
    sp.vol.write_bytes(v1)
    r1 = backup(str(sp.vol), str(repo))
    assert r1.kind == "incremental" and len(r1.files) == 1
    pid, seg0 = (r1.point_id, repo / r1.files[0]) if which == "incr" else (sp.point_id, sp.files[0])
    raw = seg0.read_bytes()
    meta_len = struct.unpack_from("<I", raw, spec.SEGMENT_HEADER_SIZE + 172)[0]
    assert meta_len > 20
    flip(seg0, spec.SEGMENT_HEADER_SIZE + spec.HEADER_FIXED_SIZE + meta_len // 2)  # inside the metadata JSON

    listing = json.loads(ok("list", repo, "--json").stdout)
    [dmg] = listing["damaged"]
    assert dmg["point_id"] == pid and "damaged" in dmg["problem"], dmg
    assert seg0.relative_to(repo).as_posix() in dmg["files"]
    assert pid not in {row["point_id"] for ch in listing["chains"] for row in ch}
    assert listing["incomplete"] == []
    text = ok("list", repo)
    assert any(pid[:8] in line and "damaged" in line for line in text.stderr.splitlines()), text.stderr

    target = tmp_path / "out.img"
    line = one_line_error(ic("restore", f"{repo}::{pid[:8]}", target), 7)
    assert "damaged" in line and pid[:8] in line and "no chain matches" not in line, line
    assert not target.exists()
    if which == "split full":  # and what is built on it is not restored either
        line = one_line_error(ic("restore", f"{repo}::{r1.point_id[:8]}", target), 7)
        assert "damaged" in line, line
        assert not target.exists()
    v = ic("verify", repo)
    assert v.returncode == 7 and pid[:8] in v.stdout


def test_damaged_summary_is_only_a_notice(tmp_path: Path, repo: Path) -> None:
    vol = tmp_path / "vol.img"
    data = write_volume(vol, 2 * MIB, seed=61)
    r = backup(str(vol), str(repo))
    p = point_of(repo, r.point_id)
    ft = p.footer
    path, pos = file_pos(repo, p, ft.summary_offset + ft.summary_length // 2)
    flip(path, pos)

    rep = verify(Repository.open(str(repo)))
    [pr] = rep.points
    assert rep.ok and pr.ok and pr.problems == []
    assert any("summary" in n for n in pr.notices), pr.notices
    for target in (str(repo), f"{repo}::{r.point_id[:8]}"):
        v = ic("verify", target)
        assert v.returncode == 0, v.stdout + v.stderr
        notices = [ln for ln in v.stdout.splitlines() if "notice" in ln]
        assert any("summary" in ln for ln in notices), v.stdout
        assert re.search(rf"^ok\s+.*{re.escape(path.name)}", v.stdout, re.M), v.stdout
    listing = json.loads(ok("list", repo, "--json").stdout)
    assert [row["point_id"] for ch in listing["chains"] for row in ch] == [r.point_id]
    assert listing["damaged"] == []
    out = tmp_path / "out.img"
    ok("restore", f"{repo}::{r.point_id[:8]}", out)
    assert out.read_bytes() == data


@pytest.mark.parametrize("split", [False, True], ids=["single file", "split"])
def test_point_without_footer_is_incomplete_not_damaged(tmp_path: Path, repo: Path, split: bool) -> None:
    if split:
        sp = split_point(tmp_path, repo, 3 * MIB)
        pid, last = sp.point_id, sp.files[-1]
    else:
        vol = tmp_path / "vol.img"
        write_volume(vol, 2 * MIB, seed=71)
        r = backup(str(vol), str(repo))
        pid, last = r.point_id, repo / r.files[-1]
    os.truncate(last, last.stat().st_size - 100)
    listing = json.loads(ok("list", repo, "--json").stdout)
    assert listing["damaged"] == [] and listing["chains"] == []
    [inc] = listing["incomplete"]
    assert last.relative_to(repo).as_posix() in inc["files"] and "incomplete" in inc["problem"], inc
    assert pid[:8] in inc["problem"]
    text = ok("list", repo)
    assert "incomplete" in text.stderr and "damaged" not in text.stderr, text.stderr
    p = ic("restore", f"{repo}::{pid[:8]}", tmp_path / "out.img")
    assert p.returncode == 5 and "damaged" not in p.stderr, p.stderr  # not a point: nothing to address
    assert ic("verify", repo).returncode == 7


# == 5. segments are found by their headers ================================================================


@pytest.mark.parametrize("which", [0, 1, -1], ids=["segment 0", "segment 1", "footer segment"])
def test_copy_of_a_segment_elsewhere_is_an_ignored_copy(tmp_path: Path, repo: Path, which: int) -> None:
    sp = split_point(tmp_path, repo)
    src = sp.files[which]
    copy = repo / "elsewhere" / src.name
    copy.parent.mkdir()
    shutil.copyfile(src, copy)
    listing = ok("list", repo)
    notices = [ln for ln in listing.stderr.splitlines() if "ignored copy" in ln]
    assert len(notices) == 1, listing.stderr
    assert src.name in notices[0] and sp.point_id[:8] in notices[0], notices
    js = json.loads(ok("list", repo, "--json").stdout)
    assert [row["point_id"] for ch in js["chains"] for row in ch] == [sp.point_id]
    assert js["damaged"] == [] and js["incomplete"] == []
    assert restored(repo, sp.point_id, tmp_path / "out.img") == sp.data
    assert verify(Repository.open(str(repo))).ok


def test_swapped_segment_names_are_reported_as_misnamed(tmp_path: Path, repo: Path) -> None:
    sp = split_point(tmp_path, repo)
    s1, s2 = sp.files[1], sp.files[2]
    assert s1.name.endswith(".s001.icimg") and s2.name.endswith(".s002.icimg")
    aside = tmp_path / "aside"
    os.replace(s1, aside)
    os.replace(s2, s1)
    os.replace(aside, s2)
    listing = ok("list", repo)
    misnamed = [ln for ln in listing.stderr.splitlines() if "misnamed" in ln]
    for name in (s1.name, s2.name):
        assert any(name in ln for ln in misnamed), listing.stderr
    js = json.loads(ok("list", repo, "--json").stdout)
    assert [row["point_id"] for ch in js["chains"] for row in ch] == [sp.point_id]
    assert any("misnamed" in n for n in js["notices"]), js["notices"]
    p = point_of(repo, sp.point_id)
    assert [f.name.rpartition("/")[2] for f in p.segments[1:3]] == [s2.name, s1.name]  # by header
    assert restored(repo, sp.point_id, tmp_path / "out.img") == sp.data
    out = tmp_path / "cli.img"
    ok("restore", str(s1), out)  # addressed by a misnamed file, too
    assert out.read_bytes() == sp.data


# == 6. what is a temporary ===================================================================================


def test_only_the_exact_temporary_pattern_is_a_leftover(tmp_path: Path, repo: Path) -> None:
    sp = split_point(tmp_path, repo)
    folder = sp.files[0].parent
    leftover = folder / f"{sp.files[1].name}.tmp-0123abcd"
    lookalike = folder / "foo.tmp-xyz.icimg"
    shutil.copyfile(sp.files[1], leftover)
    shutil.copyfile(sp.files[1], lookalike)
    rel_left, rel_look = (p.relative_to(repo).as_posix() for p in (leftover, lookalike))
    js = json.loads(ok("list", repo, "--json").stdout)
    assert js["leftovers"] == [rel_left], js["leftovers"]
    assert [row["point_id"] for ch in js["chains"] for row in ch] == [sp.point_id]
    copies = [n for n in js["notices"] if "ignored copy" in n]
    assert len(copies) == 1 and rel_look in copies[0] and rel_left not in copies[0], js["notices"]
    cat = Repository.open(str(repo)).catalog()
    assert rel_look in cat.by_file and rel_left not in cat.by_file
    text = ok("list", repo)
    assert any("leftover" in ln and rel_left in ln for ln in text.stderr.splitlines()), text.stderr
    assert not any("leftover" in ln and rel_look in ln for ln in text.stderr.splitlines()), text.stderr
    assert restored(repo, sp.point_id, tmp_path / "out.img") == sp.data


# == 7. the chain's compression is its full point's ========================================================


def test_incremental_without_codec_takes_the_full_points_compression(tmp_path: Path, repo: Path) -> None:
    vol = tmp_path / "vol.img"
    v0 = write_volume(vol, 2 * MIB, seed=81, zero_fraction=0.0)
    text_block = (b"compressible text " * (BS // 18 + 1))[:BS]
    r0 = backup(str(vol), str(repo))
    v1 = v0[: 3 * BS] + text_block + v0[4 * BS :]
    vol.write_bytes(v1)
    r1 = backup(str(vol), str(repo), codec=CodecParams.parse("none"))
    v2 = v1[: 9 * BS] + text_block[::-1] + v1[10 * BS :]
    vol.write_bytes(v2)
    r2 = backup(str(vol), str(repo))
    store = Repository.open(str(repo)).store
    h0, h1, h2 = (point_of(repo, r.point_id).header for r in (r0, r1, r2))
    assert (h0.compression, h0.compression_level) == (spec.COMPRESSION_ZSTD, 3)
    assert h1.compression == spec.COMPRESSION_NONE
    assert (h2.compression, h2.compression_level) == (spec.COMPRESSION_ZSTD, 3)
    for r, codec in ((r1, spec.PAYLOAD_RAW), (r2, spec.PAYLOAD_ZSTD)):
        with PointReader(store, point_of(repo, r.point_id)) as rd:
            idx = rd.index()
        data = idx[idx["kind"] == spec.BLOCK_DATA]
        assert len(data) == 1 and int(data["codec"][0]) == codec, data
    info = json.loads(ok("info", f"{repo}::{r2.point_id[:8]}", "--json").stdout)
    assert info["compression"] == "zstd:3"
    assert restored(repo, r2.point_id, tmp_path / "out.img") == v2


# == 8. reports name the segment file that holds the damage ===================================================


def test_damage_in_a_later_segment_names_that_segment(tmp_path: Path, repo: Path) -> None:
    sp = split_point(tmp_path, repo)
    p = point_of(repo, sp.point_id)
    s2 = p.segments[2]
    assert s2.name.endswith(".s002.icimg")
    with PointReader(Repository.open(str(repo)).store, p) as r:
        idx = r.index()
    lo, hi = s2.seg.logical_offset, s2.data_end
    inside = [e for e in idx[idx["kind"] == spec.BLOCK_DATA] if lo <= int(e["offset"]) <= hi - int(e["length"])]
    assert inside
    e = inside[len(inside) // 2]
    block = int(e["block"])
    path, pos = file_pos(repo, p, int(e["offset"]) + int(e["length"]) // 2)
    assert path == repo / s2.name
    flip(path, pos)
    seg0 = p.segments[0].name

    rep = verify(Repository.open(str(repo)))
    [pr] = rep.points
    assert not pr.ok and pr.bad_blocks == [block]
    assert any(s2.name in t and str(block) in t for t in pr.problems), pr.problems
    assert not any(seg0 in t for t in pr.problems), pr.problems
    v = ic("verify", repo)
    assert v.returncode == 7
    problem_lines = [ln for ln in v.stdout.splitlines() if ln.startswith(" ") and "corrupt" in ln]
    assert problem_lines and all(s2.name in ln and seg0 not in ln for ln in problem_lines), v.stdout

    target = tmp_path / "out.img"
    res = open_point(f"{repo}::{sp.point_id[:8]}")
    with pytest.raises(IntegrityError) as exc:
        restore(res.repo, res.point, str(target))
    assert s2.name in str(exc.value) and seg0 not in str(exc.value) and f"block {block}" in str(exc.value)
    assert not target.exists()
    line = one_line_error(ic("restore", f"{repo}::{sp.point_id[:8]}", target), 7)
    assert s2.name in line and seg0 not in line, line
    assert not target.exists()


# == 9. list shows the tree ==================================================================================


def test_list_json_shows_links_children_and_tips_and_a_missing_parent(tmp_path: Path, repo: Path) -> None:
    vol = tmp_path / "vol.img"
    v = write_volume(vol, 2 * MIB, seed=91)
    ids, files = [], []
    for i in range(3):
        if i:
            v = edit(v, [i, 10 + i], seed=i)
            vol.write_bytes(v)
        r = backup(str(vol), str(repo))
        ids.append(r.point_id)
        files.append([repo / f for f in r.files])
    [rows] = json.loads(ok("list", repo, "--json").stdout)["chains"]
    assert [row["point_id"] for row in rows] == ids
    for row in rows:
        assert {"parent_id", "parent_state_digest", "state_digest", "children", "tip", "lineage_broken"} <= set(row)
    assert rows[0]["parent_id"] is None and rows[0]["parent_state_digest"] is None
    for parent, child in itertools.pairwise(rows):
        assert child["parent_id"] == parent["point_id"]
        assert child["parent_state_digest"] == parent["state_digest"]
        assert parent["children"] == [child["point_id"]] and parent["tip"] is False
    assert rows[2]["children"] == [] and rows[2]["tip"] is True
    assert [row["state_digest"] for row in rows] == [point_of(repo, i).footer.state_digest.hex() for i in ids]
    assert not any(row["lineage_broken"] for row in rows)
    assert "parent missing" not in ok("list", repo).stdout

    for f in files[1]:
        f.unlink()
    [rows] = json.loads(ok("list", repo, "--json").stdout)["chains"]
    by_id = {row["point_id"]: row for row in rows}
    assert set(by_id) == {ids[0], ids[2]}
    assert by_id[ids[2]]["lineage_broken"] is True and by_id[ids[2]]["parent_id"] == ids[1]
    assert by_id[ids[0]]["lineage_broken"] is False and by_id[ids[0]]["children"] == []
    env = {k: val for k, val in os.environ.items() if k not in ("COLUMNS", "LINES")}
    text = ic("list", repo, env=env)
    assert text.returncode == 0, text.stderr
    assert "parent missing" in text.stdout, text.stdout
    [line] = [ln for ln in text.stdout.splitlines() if re.match(rf"\s*2\s.*{ids[2][:8]}", ln)]  # the row of #2
    assert "parent missing" in line, text.stdout


# == 10. info output is never wrapped ========================================================================


def test_info_lines_are_not_wrapped_in_a_pipe(tmp_path: Path) -> None:
    deep = tmp_path / ("a-rather-long-folder-name-" * 3) / ("and-another-one-to-make-it-long-" * 2)
    deep.mkdir(parents=True)
    repo = deep / "repository"
    vol = deep / "volume-with-a-long-name-too.img"
    assert len(str(repo)) > 100
    data = os.urandom(3 * MIB)
    vol.write_bytes(data)
    backup(str(vol), str(repo), split_size=MIB, init=True)
    vol.write_bytes(data[:BS] + os.urandom(BS) + data[2 * BS :])
    backup(str(vol), str(repo))
    data = os.urandom(3 * MIB)  # nearly everything changes: the incremental is split too
    vol.write_bytes(data)
    backup(str(vol), str(repo))

    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    p = ic("info", f"{repo}::default", env=env)
    assert p.returncode == 0, p.stderr
    js = json.loads(ok("info", f"{repo}::default", "--json").stdout)
    assert len(js["files"]) >= 3 and js["parent_file"]
    assert "['" not in p.stdout and "']" not in p.stdout, p.stdout
    lines = p.stdout.splitlines()
    top = {}
    for ln in lines:
        if ln.startswith("  "):
            continue
        key, _, value = ln.partition(" ")
        assert key in js, f"a line that is no key of info (wrapped?): {ln!r}\n{p.stdout}"
        top[key] = value.strip()
    assert set(top) == set(js) - {"summary"} | ({"summary"} if "summary" in top else set())
    for key, value in js.items():
        if key == "summary":
            continue
        want = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
        if isinstance(value, int) and key.endswith(("_size", "_bytes")) and value >= 1024:
            want = f"{human(value)} ({value} bytes)"  # sizes for people, the exact count beside them
        assert top[key] == want, (key, top[key], want)
    assert top["source_path"] == str(vol)
    assert all(f in top["files"] for f in js["files"])
    for sk, sv in js["summary"].items():
        if sk == "snapshot":  # a record, shown in words on the "snapshot" line above
            assert sv["provider"] in top["snapshot"], (sv, top["snapshot"])
            continue
        want = f"{human(sv)} ({sv} bytes)" if isinstance(sv, int) and sk.endswith(("_size", "_bytes")) and sv >= 1024 \
            else str(sv)  # fmt: skip
        assert any(ln.split(None, 1) == [sk, want] for ln in lines if ln.startswith("  ")), (sk, p.stdout)


# == 11. EFBIG ================================================================================================

FSIZE_LIMIT = 3 * MIB


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (FSIZE_LIMIT, FSIZE_LIMIT))


def test_file_too_large_is_reported_as_a_notice(tmp_path: Path, repo: Path) -> None:
    vol = tmp_path / "vol.img"
    data = os.urandom(7 * MIB)
    vol.write_bytes(data)
    run = ic("backup", vol, repo, "--compression", "none", preexec_fn=_limit_file_size)
    assert run.returncode == 0, run.stderr
    assert "Traceback" not in run.stderr
    notices = [ln for ln in run.stderr.splitlines() if ln.startswith("notice:") and "refused to grow" in ln]
    # the writer remembers the limit after the first refusal and cuts later segments before it: one notice
    assert notices, run.stderr
    for ln in notices:
        assert "file too large" in ln and "new segment" in ln, ln
        m = re.search(r"refused to grow (\S+) past (\d+) bytes", ln)
        assert m, ln
        assert (repo / m.group(1)).is_file() and int(m.group(2)) <= FSIZE_LIMIT, ln
    files = sorted(repo.rglob("*.icimg"))
    assert len(files) >= 3 and all(f.stat().st_size <= FSIZE_LIMIT for f in files)
    assert files[0].relative_to(repo).as_posix() in notices[0]  # segment 0 met the limit first
    res = open_point(str(files[0]))
    restore(res.repo, res.point, str(tmp_path / "out.img"))
    assert (tmp_path / "out.img").read_bytes() == data


# == 12. read errors of the repository ========================================================================

_EIO_RESTORE = """
import errno, sys
import imagechain.stores.local as local
limit = int(sys.argv[1])
def pread(self, offset, length):
    if offset < limit:
        raise OSError(errno.EIO, "Input/output error")
    return self._orig(offset, length)
local._LocalReader._orig = local._LocalReader.pread
local._LocalReader.pread = pread
from imagechain.cli import main
sys.argv = ["imagechain", *sys.argv[2:]]
main()
"""


@pytest.mark.parametrize("where", ["index", "payloads"])
def test_read_error_of_the_repository_is_a_repository_error(
    tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    vol = tmp_path / "vol.img"
    write_volume(vol, 2 * MIB, seed=121)
    r = backup(str(vol), str(repo))
    p = point_of(repo, r.point_id)
    # "index": every read fails (the map proof, before the target is made); "payloads": only reads of the
    # payload area fail (after the target is created and being written)
    limit = 1 << 62 if where == "index" else spec.SEGMENT_HEADER_SIZE + p.footer.index_offset
    res = open_point(f"{repo}::{r.point_id[:8]}")
    target = tmp_path / "out.img"
    orig = _LocalReader.pread

    target_during_failure: list[bool] = []

    def pread(self: Any, offset: int, length: int) -> bytes:
        if offset < limit:
            # a new target is written under a temporary name beside it until it is complete
            target_during_failure.append(bool(list(tmp_path.glob("out.img.tmp-*"))) and not target.exists())
            raise OSError(errno.EIO, "Input/output error")
        return bytes(orig(self, offset, length))

    with monkeypatch.context() as m:
        m.setattr("imagechain.stores.local._LocalReader.pread", pread)
        with pytest.raises(RepositoryError) as exc:
            restore(res.repo, res.point, str(target))
    assert exc.value.exit_code == 4
    # "payloads": the read failed while the new target was being written, and the target went with it
    assert target_during_failure and target_during_failure[0] == (where == "payloads"), target_during_failure
    assert "Input/output error" in str(exc.value) and p.name.rpartition("/")[2] in str(exc.value), exc.value
    assert not target.exists() and not list(tmp_path.glob("out.img.tmp-*"))

    run = subprocess.run([sys.executable, "-c", _EIO_RESTORE, str(limit), "restore", f"{repo}::{r.point_id[:8]}",
                          str(target)], capture_output=True, text=True, env=dict(os.environ), timeout=120)  # fmt: skip
    line = one_line_error(run, 4)
    assert "Input/output error" in line, line
    assert not target.exists()
