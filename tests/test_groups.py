"""Grouped payloads (format 1.5, codec 3): consecutive changed blocks stored in one zstd frame, read back
exactly through restore, verify, views and consolidation; damage in a group fails its blocks only; a group
is decoded once by each reader, not once per block."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zstandard

import imagechain.engine.backup as engine
import imagechain.engine.verify as verify_mod
import imagechain.payload as payload_mod
from imagechain.address import open_point
from imagechain.codec import CodecParams, decode_group
from imagechain.crypto import Passphrase
from imagechain.engine.backup import backup
from imagechain.engine.consolidate import consolidate
from imagechain.engine.restore import restore
from imagechain.engine.verify import verify
from imagechain.errors import IntegrityError
from imagechain.format import spec
from imagechain.format.reader import PointReader
from imagechain.keyring import Keyring
from imagechain.repository import Repository
from imagechain.view import PointView

from .conftest import flip as flip_byte

KiB, MiB = 1 << 10, 1 << 20
BS = 64 * KiB


def text(n: int, seed: int) -> bytes:
    """Bytes that repeat across blocks more than within one: lines drawn from a pool of 1000 (as files of
    one kind resemble each other), so a group compresses better than its blocks one by one."""
    rng = np.random.default_rng(seed)
    pool = [rng.integers(32, 127, 120, dtype=np.uint8).tobytes() + b"\n" for _ in range(1000)]
    return b"".join(pool[i] for i in rng.integers(0, len(pool), n // 121 + 1))[:n]


def volume(path: Path) -> bytes:
    """28 MiB: text, a zero gap, text, a chunk of random (incompressible) blocks, text, a short last block."""
    out = bytearray(28 * MiB - BS // 2)
    out[0 : 6 * MiB] = text(6 * MiB, 1)
    out[6 * MiB + 3 * BS : 16 * MiB] = text(16 * MiB - 6 * MiB - 3 * BS, 2)
    out[16 * MiB : 24 * MiB] = os.urandom(8 * MiB)
    out[24 * MiB :] = text(len(out) - 24 * MiB, 3)
    path.write_bytes(out)
    return bytes(out)


def index(repo: Path, sel: str = "", ring: Keyring | None = None) -> np.ndarray:
    res = open_point(f"{repo}::default{sel}")
    if ring is not None:
        ring.unlock_all([res.point])
    with PointReader(res.repo.store, res.point) as r:
        return r.index()


def groups_of(ent: np.ndarray) -> dict[int, np.ndarray]:
    g = ent[ent["codec"] == spec.PAYLOAD_ZSTD_GROUP]
    return {int(o): g[g["offset"] == o] for o in np.unique(g["offset"])}


def flip(repo: Path, files: list[str], offset: int) -> None:
    """Damage a byte of the point's first file, offset bytes into its payloads."""
    flip_byte(repo / files[0], spec.SEGMENT_HEADER_SIZE + offset, 0xFF)


def test_consecutive_blocks_are_grouped_and_restore_exactly(tmp_path: Path, repo: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    vol = tmp_path / "v.img"
    data = volume(vol)
    r = backup(str(vol), str(repo), cache_dir=None)
    ent = index(repo)
    groups = groups_of(ent)
    assert groups, "no group was written"
    per_chunk = engine.CHUNK_BYTES // BS
    for g in groups.values():
        blocks = g["block"].astype(np.int64)
        assert len(g) >= 2 and (g["length"] == g["length"][0]).all()
        assert (np.diff(blocks) == 1).all() and (g["member"] == blocks - blocks[0]).all()
        assert blocks[0] // per_chunk == blocks[-1] // per_chunk  # never across a chunk edge
    random_blocks = ent[(ent["block"] >= 16 * MiB // BS) & (ent["block"] < 24 * MiB // BS)]
    assert len(random_blocks) == 8 * MiB // BS
    assert (random_blocks["codec"] == spec.PAYLOAD_RAW).all()  # an incompressible chunk: raw, block by block
    assert int(ent["block"].max()) in groups_of(ent)[int(ent["offset"].max())]["block"]  # the short last block
    assert (ent[ent["kind"] == spec.BLOCK_ZERO]["block"] >= 6 * MiB // BS).all()
    out = tmp_path / "out.img"
    res = open_point(f"{repo}::default")
    restore(res.repo, res.point, str(out))
    assert out.read_bytes() == data
    assert verify(res.repo, res.point).ok
    for name in ("alone", "lz4"):
        Repository.open(str(tmp_path / name), create=True)
    lz4 = backup(str(vol), str(tmp_path / "lz4"), cache_dir=None, codec=CodecParams.parse("lz4"))
    assert lz4.stored_bytes and not groups_of(index(tmp_path / "lz4"))  # groups are zstd's
    # without groups the same volume stores more: what they are for
    monkeypatch.setattr(engine, "GROUP_BYTES", BS)
    alone = backup(str(vol), str(tmp_path / "alone"), cache_dir=None)
    assert not groups_of(index(tmp_path / "alone"))
    assert r.stored_bytes - 8 * MiB < (alone.stored_bytes - 8 * MiB) * 0.5, (r.stored_bytes, alone.stored_bytes)


@pytest.mark.parametrize("encrypted", [False, True])
def test_a_damaged_group_fails_its_own_blocks_only(tmp_path: Path, repo: Path, encrypted: bool) -> None:
    vol = tmp_path / "v.img"
    data = volume(vol)
    pw = Passphrase(b"groups") if encrypted else None
    ring = Keyring(pw)
    r = backup(str(vol), str(repo), cache_dir=None, encrypt=pw, keyring=ring)
    victim = next(iter(groups_of(index(repo, ring=ring)).values()))
    flip(repo, r.files, int(victim["offset"][0]) + int(victim["length"][0]) // 2)
    res = open_point(f"{repo}::default")
    report = verify(res.repo, res.point, keyring=ring)
    bad = sorted(b for p in report.points for b in p.bad_blocks)
    assert bad == sorted(victim["block"].tolist())
    bs = r.block_size
    first, last = int(victim["block"][0]), int(victim["block"][-1])
    with PointView(res.repo, res.point, cat=res.catalog, keyring=ring) as v:
        with pytest.raises(IntegrityError, match=f"block {last}"):
            v.read(last * bs, 10)
        outside = next(b for b in range(len(data) // bs) if not first <= b <= last)
        assert v.read(outside * bs, bs) == data[outside * bs : (outside + 1) * bs]
    with pytest.raises(IntegrityError, match="is corrupt"):
        restore(res.repo, res.point, str(tmp_path / "out.img"), keyring=ring)


def test_each_reader_decodes_a_group_once(tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Restore and verify decode each group once. A view's random read of a group decodes it only up to the
    block asked for; reading the group again (in sequence, or soon after) decodes all of it once."""
    vol = tmp_path / "v.img"
    data = volume(vol)
    backup(str(vol), str(repo), cache_dir=None)
    groups = groups_of(index(repo))
    calls: list[tuple[int, int | None]] = []
    real = payload_mod.decode_group

    def counting(payload: bytes | memoryview, upto: int | None = None) -> bytes:
        calls.append((len(payload), upto))
        return real(payload, upto)

    monkeypatch.setattr(payload_mod, "decode_group", counting)
    res = open_point(f"{repo}::default")
    restore(res.repo, res.point, str(tmp_path / "out.img"))
    assert sorted(calls) == sorted((int(g["length"][0]), None) for g in groups.values())
    calls.clear()
    assert verify(res.repo, res.point).ok
    assert sorted(calls) == sorted((int(g["length"][0]), None) for g in groups.values())
    calls.clear()
    monkeypatch.setattr(verify_mod, "READ_BYTES", 1)  # a batch per payload: none may cut a group in two
    assert verify(res.repo, res.point).ok
    assert sorted(calls) == sorted((int(g["length"][0]), None) for g in groups.values())
    g = max(groups.values(), key=len)
    blocks, size = g["block"].tolist(), int(g["length"][0])
    m = len(blocks) // 2
    with PointView(res.repo, res.point, cat=res.catalog) as v:
        calls.clear()
        assert v.read(blocks[m] * BS + 100, 4096) == data[blocks[m] * BS + 100 : blocks[m] * BS + 4196]
        assert calls == [(size, (m + 1) * BS)]  # random: up to the block's end only
        calls.clear()
        for b in blocks:  # the whole group, block by block
            assert v.read(b * BS, BS) == data[b * BS : (b + 1) * BS]
        mine = [u for n, u in calls if n == size]  # (read-ahead goes on into the next groups)
        assert len(mine) == 1 and (mine[0] is None or mine[0] >= len(blocks) * BS), calls  # whole, once


def test_restore_decodes_a_group_once_around_newer_blocks_and_window_edges(
        tmp_path: Path, repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """An incremental's blocks lie between the blocks of its parent's groups, and a partition's window
    starts where no group does: restore still decodes each group it needs once, and writes exactly."""
    vol = tmp_path / "v.img"
    data = bytearray(volume(vol))
    backup(str(vol), str(repo), cache_dir=None)
    g = max(groups_of(index(repo, "@0")).values(), key=len)
    first = int(g["block"][0])
    for k in (3, 4, 9, 10, 17, 18):  # pairs: groups of the incremental, between blocks of the full's group
        at = (first + k) * BS
        data[at : at + 10] = b"0123456789"
    vol.write_bytes(data)
    assert backup(str(vol), str(repo), cache_dir=None).changed_blocks == 6
    assert len(groups_of(index(repo, "@1"))) == 3
    calls: list[bytes] = []
    real = payload_mod.decode_group

    def counting(payload: bytes | memoryview, upto: int | None = None) -> bytes:
        calls.append(bytes(payload))
        return real(payload, upto)

    monkeypatch.setattr(payload_mod, "decode_group", counting)
    res = open_point(f"{repo}::default@latest")
    out = tmp_path / "out.img"
    restore(res.repo, res.point, str(out))
    assert out.read_bytes() == bytes(data)
    want = sorted(int(x["length"][0]) for sel in ("@0", "@1") for x in groups_of(index(repo, sel)).values())
    assert sorted(map(len, calls)) == want, (sorted(map(len, calls)), want)
    # a window that starts inside the first group and spans three: the pieces of a restore start at the
    # window, so they no longer start where groups do
    calls.clear()
    base, size = 50 * BS + 512, 12 * MiB
    part = tmp_path / "part.img"
    restore(res.repo, res.point, str(part), window=(base, size), threads=2)
    assert part.read_bytes() == bytes(data[base : base + size])
    assert calls and len(calls) == len(set(calls)), sorted(map(len, calls))


@pytest.mark.parametrize("encrypted", [False, True])
def test_a_group_changed_in_part_is_merged_once(tmp_path: Path, repo: Path, encrypted: bool) -> None:
    """An incremental replaces one block inside a group; consolidation copies the group once, with the
    replaced block's newer payload beside it, and every point reads back exactly."""
    vol = tmp_path / "v.img"
    data = bytearray(volume(vol))
    pw = Passphrase(b"groups") if encrypted else None
    ring = Keyring(pw)
    backup(str(vol), str(repo), cache_dir=None, encrypt=pw, keyring=ring)
    full = index(repo, "@0", ring)
    g = max(groups_of(full).values(), key=len)
    mid = int(g["block"][len(g) // 2])
    data[mid * BS + 10 : mid * BS + 20] = b"0123456789"
    vol.write_bytes(data)
    r1 = backup(str(vol), str(repo), cache_dir=None, keyring=ring)
    assert r1.changed_blocks == 1
    res = open_point(f"{repo}::default@1")
    m = consolidate(res.repo, res.point, cat=res.catalog, keyring=ring)
    merged = index(repo, "@latest", ring)
    mg = groups_of(merged)
    assert len(mg) == len(groups_of(full))  # each group copied once
    assert m.copied_payloads == len(np.unique(merged[merged["kind"] == spec.BLOCK_DATA]["offset"]))
    moved = next(x for x in mg.values() if mid - 1 in x["block"].tolist())
    assert mid not in moved["block"].tolist() and len(moved) == len(g) - 1
    assert (moved["member"] == moved["block"] - int(g["block"][0])).all()
    res = open_point(f"{repo}::default@latest")
    out = tmp_path / "out.img"
    restore(res.repo, res.point, str(out), keyring=ring)
    assert out.read_bytes() == bytes(data)


def test_a_group_that_claims_too_much_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(bytes(2 * MiB))
    assert decode_group(frame) == bytes(2 * MiB)
    monkeypatch.setattr(spec, "GROUP_MAX_BYTES", MiB)
    with pytest.raises(IntegrityError, match="declares"):
        decode_group(frame)
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(b"x" * 1000)
    with pytest.raises(IntegrityError):
        decode_group(no_size)
    with pytest.raises(IntegrityError):
        decode_group(b"not a zstd frame")


def test_a_view_proves_each_block_of_a_group_it_serves(tmp_path: Path, repo: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A read that brings a whole group hashes only what it asked for; the rest of the group is proven when
    it is read, and a block that fails then is refused like any other."""
    vol = tmp_path / "v.img"
    data = volume(vol)
    backup(str(vol), str(repo), cache_dir=None)
    g = max(groups_of(index(repo)).values(), key=len)
    first, other = int(g["block"][0]), int(g["block"][5])
    res = open_point(f"{repo}::default")
    proofs: list[int] = []
    real = payload_mod.BlockOpener.proves

    def failing(self: payload_mod.BlockOpener, raw: bytes, digest: bytes) -> bool:
        proofs.append(len(raw))
        return False

    with PointView(res.repo, res.point, cat=res.catalog) as v:
        for b in (first, first + 1):  # in sequence: the second read brings the rest of the group, unproven
            assert v.read(b * BS, BS) == data[b * BS : (b + 1) * BS]
        monkeypatch.setattr(payload_mod.BlockOpener, "proves", failing)
        with pytest.raises(IntegrityError, match=f"block {other} is corrupt"):
            v.read(other * BS, 100)
        assert proofs == [BS]
        monkeypatch.setattr(payload_mod.BlockOpener, "proves", real)
        with pytest.raises(IntegrityError):  # the failure is kept: the block is not served later either
            v.read(other * BS, 100)
        assert v.read((other + 1) * BS, 100) == data[(other + 1) * BS : (other + 1) * BS + 100]


def test_an_entry_that_names_no_block_of_its_group_is_refused() -> None:
    """A hostile or damaged index entry: a position past the group's end, or before the volume's start,
    is one IntegrityError, never a short or shifted block."""
    import blake3

    class Plain:  # a point without encryption (unit test: the opener needs only these two things)
        header = type("H", (), {"encrypted": False})()

        def keys(self) -> None:  # pragma: no cover - never asked for a plain point
            raise AssertionError

    blocks = [bytes([i]) * BS for i in range(3)]
    frame = zstandard.ZstdCompressor(write_content_size=True).compress(b"".join(blocks))
    opener = payload_mod.BlockOpener(None)  # a plain chain: digests are plain BLAKE3
    reader = Plain()
    ok = opener.open(reader, 11, spec.PAYLOAD_ZSTD_GROUP, 0, 1, 500, frame, BS, BS,  # type: ignore[arg-type]
                     blake3.blake3(blocks[1]).digest())
    assert ok == blocks[1]
    with pytest.raises(IntegrityError, match="holds no block at position 3"):
        opener.open(reader, 13, spec.PAYLOAD_ZSTD_GROUP, 0, 3, 500, frame, BS, BS, None)  # type: ignore[arg-type]
    with pytest.raises(IntegrityError, match="past the volume's start"):
        opener.open(reader, 1, spec.PAYLOAD_ZSTD_GROUP, 0, 2, 600, frame, BS, BS, None)  # type: ignore[arg-type]
    with pytest.raises(IntegrityError, match="digest mismatch"):
        opener.open(reader, 12, spec.PAYLOAD_ZSTD_GROUP, 0, 2, 700, frame, BS, BS,  # type: ignore[arg-type]
                    blake3.blake3(blocks[1]).digest())
