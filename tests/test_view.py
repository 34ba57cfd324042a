"""PointView: random access to any byte of any point through its chain, reading only the index frames
that cover what is read; damaged blocks refused one by one; a repository that fails for a moment is
tried again."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from imagechain.address import open_point
from imagechain.engine.backup import backup
from imagechain.errors import IntegrityError, RepositoryError
from imagechain.format import spec
from imagechain.format.reader import PointReader
from imagechain.view import PointView

from .conftest import flip, write_volume

MiB = 1 << 20


def test_every_point_reads_back_at_random_offsets(tmp_path: Path, repo: Path) -> None:
    vol = tmp_path / "v.img"
    states = [bytearray(write_volume(vol, 24 * MiB, seed=3))]
    backup(str(vol), str(repo), cache_dir=None)
    rng = random.Random(5)
    for _ in range(2):
        data = bytearray(states[-1])
        for _ in range(40):
            at = rng.randrange(len(data) - 9000)
            data[at : at + 9000] = os.urandom(9000)
        vol.write_bytes(data)
        states.append(data)
        backup(str(vol), str(repo), cache_dir=None)
    for seq, data in enumerate(states):
        res = open_point(f"{repo}::default@{seq}")
        with PointView(res.repo, res.point, cat=res.catalog) as v:
            assert v.size == len(data)
            for _ in range(300):
                at, n = rng.randrange(len(data)), rng.randrange(1, 200_000)
                assert v.read(at, n) == bytes(data[at : at + n]), (seq, at, n)
            assert v.read(len(data) - 10, 100) == bytes(data[-10:])  # clipped at the end
            assert v.read(len(data), 10) == b""
            whole = b"".join(v.read(o, 1 << 20) for o in range(0, len(data), 1 << 20))  # sequential: read-ahead
            assert whole == bytes(data)
            ext = v.extents(0, len(data))
            assert sum(e.length for e in ext) == len(data) and ext[0].offset == 0
            for e in ext:
                if e.kind != spec.BLOCK_DATA:
                    assert not any(data[e.offset : e.offset + e.length]), e


def test_a_read_touches_only_the_index_frames_that_cover_it(tmp_path: Path, repo: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A point with many index frames (4 KiB blocks of random data): reading one block near the end
    decodes one frame per point, not the whole map (a multi-TiB chain opens in index reads of what is
    looked at)."""
    vol = tmp_path / "v.img"
    data = os.urandom(160 * MiB)  # 40960 DATA blocks of 4 KiB: three index frames of 16384 entries
    vol.write_bytes(data)
    backup(str(vol), str(repo), block_size=4096, cache_dir=None)
    res = open_point(f"{repo}::default")
    with PointReader(res.repo.store, res.point) as r:
        d = r.directory()
        assert d is not None and len(d) >= 3
    frames: list[int] = []
    real = PointReader.iter_index

    def counting(self: PointReader, from_block: int = 0):  # type: ignore[no-untyped-def]
        for frame in real(self, from_block):
            frames.append(len(frame))
            yield frame

    monkeypatch.setattr(PointReader, "iter_index", counting)
    with PointView(res.repo, res.point, cat=res.catalog) as v:
        at = len(data) - 5000
        assert v.read(at, 100) == data[at : at + 100]
    assert len(frames) == 1, frames  # the last frame only


def test_a_damaged_block_is_refused_and_its_neighbours_are_served(tmp_path: Path, repo: Path) -> None:
    vol = tmp_path / "v.img"
    data = os.urandom(4 * MiB)
    vol.write_bytes(data)
    r = backup(str(vol), str(repo), cache_dir=None)
    res = open_point(f"{repo}::default")
    with PointReader(res.repo.store, res.point) as pr:
        ent = pr.index()
    victim = ent[ent["kind"] == spec.BLOCK_DATA][10]
    path = repo / r.files[0]
    # one byte in the middle of block 10's payload
    flip(path, spec.SEGMENT_HEADER_SIZE + int(victim["offset"]) + int(victim["length"]) // 2, 0xFF)
    bs = r.block_size
    seen: list[str] = []
    with PointView(res.repo, res.point, cat=res.catalog, on_error=seen.append) as v:
        b = int(victim["block"])
        with pytest.raises(IntegrityError, match=f"block {b}"):
            v.read(b * bs + 100, 10)
        assert v.read((b - 1) * bs, bs) == data[(b - 1) * bs : b * bs]
        assert v.read((b + 1) * bs, bs) == data[(b + 1) * bs : (b + 2) * bs]
        with pytest.raises(IntegrityError):
            v.read(0, len(data))  # a range that covers it fails as a whole: no wrong bytes, no holes
    assert seen and all(f"block {b}" in m for m in seen)


def test_a_repository_that_fails_for_a_moment_is_tried_again(tmp_path: Path, repo: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    vol = tmp_path / "v.img"
    data = os.urandom(2 * MiB)
    vol.write_bytes(data)
    backup(str(vol), str(repo), cache_dir=None)
    res = open_point(f"{repo}::default")
    real = PointReader.read
    failing = {"on": True}

    def flaky(self: PointReader, offset: int, length: int) -> bytes:
        if failing["on"] and offset > 4096:  # payloads (the header and index are read at open)
            raise RepositoryError("cannot read the file: Input/output error")
        return real(self, offset, length)

    with PointView(res.repo, res.point, cat=res.catalog) as v:
        v.extents(0, len(data))  # the map window is resolved while the disk works
        monkeypatch.setattr(PointReader, "read", flaky)
        with pytest.raises(RepositoryError):
            v.read(1 << 20, 100)
        failing["on"] = False  # the disk is back: the same read works, nothing stale was kept
        assert v.read(1 << 20, 100) == data[1 << 20 : (1 << 20) + 100]
