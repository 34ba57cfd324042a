import os
from pathlib import Path

from imagechain.address import open_point
from imagechain.engine.backup import backup
from imagechain.engine.restore import restore

from .conftest import write_volume


def test_full_then_incremental_roundtrip(tmp_path: Path, repo: Path) -> None:
    vol = tmp_path / "vol.img"
    first = write_volume(vol, 3 << 20, seed=1)
    r0 = backup(str(vol), str(repo))
    assert r0.kind == "full"
    data = bytearray(first)
    data[70_000:80_000] = b"y" * 10_000
    vol.write_bytes(data)
    r1 = backup(str(vol), str(repo))
    assert r1.kind == "incremental" and r1.changed_blocks == 1
    for sel, want in (("@0", first), ("@latest", bytes(data))):
        res = open_point(f"{repo}::default{sel}")
        out = tmp_path / f"out{sel[1:]}.img"
        restore(res.repo, res.point, str(out))
        assert out.read_bytes() == want


def test_index_of_many_frames_is_read_whole(tmp_path: Path, repo: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Indexes are written as several zstd frames; reading back must take all of them (found by the
    benchmark: 16 KiB blocks on 2 GiB gave two frames, and restore saw only the first)."""
    import imagechain.engine.backup as engine
    import imagechain.format.writer as writer

    monkeypatch.setattr(writer, "INDEX_FRAME_ENTRIES", 7)
    monkeypatch.setattr(engine, "CHUNK_BYTES", 64 << 10)  # 16 blocks a chunk: a frame every chunk
    vol = tmp_path / "vol.img"
    first = write_volume(vol, 1 << 20, seed=5, zero_fraction=0.1)
    backup(str(vol), str(repo), block_size=4096, cache_dir=None)
    data = bytearray(first)
    data[5000:300000] = bytes(range(256)) * ((300000 - 5000) // 256) + bytes((300000 - 5000) % 256)
    vol.write_bytes(data)
    r1 = backup(str(vol), str(repo), cache_dir=None)  # parent map rebuilt from the multi-frame index
    assert r1.kind == "incremental" and 0 < r1.changed_blocks <= 75
    for sel, want in (("@0", first), ("@1", bytes(data))):
        res = open_point(f"{repo}::default{sel}")
        out = tmp_path / f"out{sel[1:]}.img"
        restore(res.repo, res.point, str(out))
        assert out.read_bytes() == want


def test_verify_reads_each_index_a_bounded_number_of_times(tmp_path: Path, repo: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Verifying a chain in order proves each map from its parent's: index reads grow linearly with
    the chain, not quadratically (a year of dailies would otherwise re-read the full index 365 times)."""
    from imagechain.engine.verify import verify
    from imagechain.format.reader import PointReader
    from imagechain.repository import Repository

    vol = tmp_path / "vol.img"
    data = bytearray(write_volume(vol, 1 << 20, seed=9))
    n = 8
    for i in range(n):
        data[i * 70_000 : i * 70_000 + 10] = b"changed %d" % i
        vol.write_bytes(data)
        backup(str(vol), str(repo))
    reads = []
    original = PointReader.iter_index

    def counting(self: PointReader, *args):  # type: ignore[no-untyped-def]
        reads.append(self.files.point_id)
        return original(self, *args)

    monkeypatch.setattr(PointReader, "iter_index", counting)
    report = verify(Repository.open(str(repo)))
    assert report.ok and len(report.points) == n
    assert len(reads) == 2 * n  # once for the payload check, once for the map proof


def test_reused_read_buffers_never_leak_into_stored_blocks(tmp_path: Path, repo: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Chunk buffers are read into again once their chunk is done; a stored block that still pointed into
    one (an incompressible block is stored as it was read) would come back with a later chunk's bytes. Small
    chunks and a slow writer make many chunks pass through few buffers while payloads wait to be written."""
    import os
    import time

    import imagechain.engine.backup as engine
    from imagechain.format.writer import ImageWriter

    monkeypatch.setattr(engine, "CHUNK_BYTES", 256 << 10)
    real = ImageWriter.append_payloads

    def slow(self, payloads):  # type: ignore[no-untyped-def]
        time.sleep(0.002)
        return real(self, payloads)

    monkeypatch.setattr(ImageWriter, "append_payloads", slow)
    vol = tmp_path / "vol.img"
    data = bytearray(os.urandom(24 << 20))  # incompressible: every block stored raw
    data[5 << 20 : 6 << 20] = bytes(1 << 20)
    vol.write_bytes(data)
    r0 = backup(str(vol), str(repo))
    data[300_000:300_100] = b"x" * 100
    vol.write_bytes(data)
    backup(str(vol), str(repo))
    assert r0.stored_bytes >= 23 << 20  # raw, as read
    for sel in ("@0", "@latest"):
        res = open_point(f"{repo}::default{sel}")
        out = tmp_path / f"out{sel[1:]}.img"
        restore(res.repo, res.point, str(out))
    assert (tmp_path / "outlatest.img").read_bytes() == bytes(data)


def test_zero_blocks_are_found_exactly(tmp_path: Path, repo: Path) -> None:
    """Zero detection looks at a block's first and last words before scanning it whole: blocks that are
    zero there but not in between, or that hold a single non-zero byte anywhere, must stay DATA; only
    all-zero blocks become ZERO (not stored), and every block restores as it was."""
    from imagechain.format.reader import PointReader

    bs = 64 << 10
    data = bytearray(os.urandom(64 * bs))
    zero = [3, 4, 10, 63]
    for b in zero:
        data[b * bs : (b + 1) * bs] = bytes(bs)
    near = {20: bs // 2, 21: 8, 22: bs - 9, 23: 0, 24: bs - 1}  # block: offset of its one non-zero byte
    for b, off in near.items():
        data[b * bs : (b + 1) * bs] = bytes(bs)
        data[b * bs + off] = 1
    data[30 * bs : 31 * bs] = bytes(bs)
    data[30 * bs + 100 : 30 * bs + 200] = b"z" * 100  # zero first and last words, data in between
    vol = tmp_path / "vol.img"
    vol.write_bytes(data)
    r = backup(str(vol), str(repo), block_size=bs)
    res = open_point(f"{repo}::default@latest")
    with PointReader(res.repo.store, res.point) as pr:
        assert pr.summary()["zero_blocks"] == len(zero)
    assert r.stored_bytes < len(data) - (len(zero) - 1) * bs
    out = tmp_path / "out.img"
    restore(res.repo, res.point, str(out))
    assert out.read_bytes() == bytes(data)
