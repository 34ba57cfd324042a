"""The catalog cache (unit level, a local folder posing as a remote store that counts its reads): a warm
scan reads no file at all, a rewritten or damaged file is read again, and deleting the cache loses nothing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagechain.chain import scan
from imagechain.engine.backup import backup
from imagechain.stores import LocalStore, StoreEntry

from .conftest import write_volume

MiB = 1 << 20


class CountingRemote(LocalStore):
    """A local folder that scans like a remote store: tags from mtimes, every read counted."""

    remote = True

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.url = "test://" + self.root
        self.reads = 0

    def list(self, prefix: str = "") -> Iterator[StoreEntry]:
        for e in super().list(prefix):
            st = os.stat(self.path(e.name))
            yield StoreEntry(e.name, e.size, str(st.st_mtime_ns))

    def read(self, name: str, offset: int, length: int) -> bytes:
        self.reads += 1
        return super().read(name, offset, length)


@pytest.fixture
def chain_repo(tmp_path: Path, repo: Path) -> Path:
    vol = tmp_path / "vol.img"
    data = bytearray(write_volume(vol, 2 * MiB, seed=4))
    for i in range(4):
        data[i * 1000 : i * 1000 + 10] = os.urandom(10)
        vol.write_bytes(data)
        backup(str(vol), str(repo), cache_dir=None)
    return repo


def test_a_warm_scan_reads_nothing_and_sees_what_a_cold_one_sees(chain_repo: Path) -> None:
    store = CountingRemote(str(chain_repo))
    cold = scan(store)
    assert store.reads >= 2 * 4  # head and tail of each file
    store.reads = 0
    warm = scan(store)
    assert store.reads == 0
    assert set(warm.points) == set(cold.points) and len(warm.points) == 4
    for pid, p in cold.points.items():
        q = warm.points[pid]
        assert (q.header, q.footer, [s.name for s in q.segments]) == (p.header, p.footer, [s.name for s in p.segments])
    assert cold.generations().keys() == warm.generations().keys()
    from imagechain.format.reader import PointReader

    for p in warm.points.values():  # what `list` shows of each point comes from the cache too, proven
        with PointReader(store, p) as r:
            assert r.summary()["volume_size"] == 2 * MiB
    assert store.reads == 0
    (any_point, *_rest) = warm.points.values()
    any_point.segments[-1].summary_raw = b"x" * len(any_point.segments[-1].summary_raw or b"")
    any_point._summary = None
    with PointReader(store, any_point) as r, pytest.raises(Exception, match="summary checksum"):
        r.summary()  # cached bytes are checked against the footer like read ones


def test_a_rewritten_file_is_read_again_and_a_damaged_one_never_cached(chain_repo: Path) -> None:
    store = CountingRemote(str(chain_repo))
    scan(store)
    files = sorted(chain_repo.rglob("*.icimg"))
    # the same size, new bytes in the footer: the tag (mtime) changes, the cache must not answer for it
    raw = bytearray(files[-1].read_bytes())
    raw[-20] ^= 0xFF
    files[-1].write_bytes(raw)
    store.reads = 0
    cat = scan(store)
    assert store.reads == 2 and len(cat.points) == 3 and (cat.damaged or cat.problems)  # that file alone, damaged
    store.reads = 0
    scan(store)
    assert store.reads == 2  # damaged files are read every time: a repair shows at once
    raw[-20] ^= 0xFF
    files[-1].write_bytes(raw)
    assert len(scan(store).points) == 4


def test_deleting_the_cache_loses_nothing_and_deleted_files_leave_it(
        chain_repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("IMAGECHAIN_CATALOG_CACHE", str(tmp_path / "catalog"))
    store = CountingRemote(str(chain_repo))
    first = scan(store)
    for f in (tmp_path / "catalog").iterdir():
        f.unlink()
    store.reads = 0
    again = scan(store)
    assert store.reads > 0 and set(again.points) == set(first.points)
    newest = max(first.points.values(), key=lambda p: p.header.sequence)
    for s in newest.segments:
        os.unlink(chain_repo / s.name)
    assert newest.point_id not in scan(store).points
    import sqlite3

    (db,) = (tmp_path / "catalog").glob("*.sqlite")
    names = {n for (n,) in sqlite3.connect(db).execute("SELECT name FROM files")}
    assert names and not names & {s.name for s in newest.segments}
