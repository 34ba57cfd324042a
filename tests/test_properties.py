"""Property-based tests of whole chains: random edits of a small volume, a backup after every step,
and every point restored bit-exact at the end.

Every example builds its own volume, repository and cache in a fresh temporary folder (pytest's
function-scoped fixtures are shared by all examples of one test). The expected number of changed
blocks is computed here from the bytes before and after each step, independently of the engine:
a block is unchanged when its bytes (the real bytes only, for a last partial block) are equal, or
when it is all zero in both volumes; blocks past the parent's last block are always new."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from imagechain.address import open_point
from imagechain.crypto import Passphrase
from imagechain.engine.backup import BackupResult, backup
from imagechain.engine.restore import restore
from imagechain.fsprobe import PROBE_BYTES, probe
from imagechain.keyring import Keyring
from imagechain.repository import MARKER

from .conftest import assert_portable, write_volume

MAX_SIZE = 2 << 20
BLOCK_SIZES = (4 << 10, 8 << 10, 64 << 10)
FILLS = ("random", "text", "zero", "ones")

SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture]}
PASSPHRASE = Passphrase(b"property test passphrase")

# Hundreds of backups and restores, each publishing with fsync: in memory where the machine offers it,
# so the run time measures the engine rather than the disk's flush latency.
SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def scratch() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="ic-prop-", dir=SCRATCH)


# -- the model: what a volume looks like after each operation ----------------------------------------


def payload(fill: str, n: int, seed: int) -> bytes:
    if fill == "random":
        return random.Random(seed).randbytes(n)
    if fill == "text":
        unit = bytes(32 + (seed >> s) % 95 for s in range(0, 61, 3))
        return (unit * (n // len(unit) + 1))[:n]
    if fill == "ones":
        return b"\xff" * n
    return bytes(n)


lengths = st.one_of(st.integers(1, 64), st.integers(1, 4 << 10), st.integers(1, 300_000))
# a place in the volume: (position in 1/1024ths of its length, byte offset from there)
places = st.tuples(st.integers(0, 1024), st.one_of(st.just(0), st.integers(0, 8191)))
sizes = st.one_of(st.integers(1, 3 << 16), st.integers(1 << 20, MAX_SIZE), st.integers(1, MAX_SIZE))
seeds = st.integers(0, 2**32 - 1)

ops = st.one_of(
    st.tuples(st.just("write"), places, lengths, st.sampled_from(FILLS), seeds, st.booleans()),
    st.tuples(st.just("zero"), places, lengths),
    st.tuples(st.just("grow"), lengths, st.sampled_from(FILLS), seeds),
    st.tuples(st.just("shrink"), places),
    st.tuples(st.just("revert"), st.integers(0, 100)),
    st.just(("noop",)),
)


def at(place: tuple[int, int], n: int) -> int:
    """The offset a place stands for in a volume of n bytes (0..n)."""
    return min(n, place[0] * n // 1024 + place[1])


def apply(data: bytes, op: tuple, history: list[bytes]) -> bytes:
    """The volume after op: writes may extend it (never past MAX_SIZE); it never becomes empty."""
    buf = bytearray(data)
    kind = op[0]
    if kind == "write":
        _, place, ln, fill, seed, aligned = op
        off = at(place, len(buf))
        if aligned:  # whole blocks of the smallest block size: exercises exact block boundaries
            off -= off % 4096
            ln = max(4096, ln - ln % 4096)
        ln = min(ln, MAX_SIZE - off)
        buf[off : off + ln] = payload(fill, ln, seed)
    elif kind == "zero":
        _, place, ln = op
        off = min(at(place, len(buf)), len(buf) - 1)
        ln = min(ln, len(buf) - off)
        buf[off : off + ln] = bytes(ln)
    elif kind == "grow":
        _, ln, fill, seed = op
        buf += payload(fill, min(ln, MAX_SIZE - len(buf)), seed)
    elif kind == "shrink":
        del buf[max(1, at(op[1], len(buf) - 1)) :]
    elif kind == "revert":  # back to an earlier state: blocks reappear that the parent no longer has
        return history[op[1] % len(history)]
    return bytes(buf)


def nblocks(size: int, bs: int) -> int:
    return -(-size // bs)


def is_zero(b: bytes) -> bool:
    return not b.strip(b"\0")


def expected_changes(old: bytes, new: bytes, bs: int) -> tuple[int, int]:
    """(changed blocks, changed bytes) of an incremental of `new` over a parent that holds `old`."""
    count = nbytes = 0
    n_old = nblocks(len(old), bs)
    for i in range(nblocks(len(new), bs)):
        nb = new[i * bs : (i + 1) * bs]
        if i < n_old:
            ob = old[i * bs : (i + 1) * bs]
            if ob == nb or (is_zero(ob) and is_zero(nb)):
                continue
        count += 1
        nbytes += len(nb)
    return count, nbytes


def data_blocks(data: bytes, bs: int) -> int:
    return sum(not is_zero(data[i * bs : (i + 1) * bs]) for i in range(nblocks(len(data), bs)))


def differing_blocks(current: bytes, want: bytes, bs: int) -> tuple[int, int, int]:
    """(blocks, bytes, non-zero blocks) a delta restore of `want` must write onto a target holding
    `current`: the target is cut or zero-extended to the point's size, then every block whose bytes
    differ is written; the non-zero ones among them come from the repository."""
    size = len(want)
    cur = current[:size].ljust(size, b"\0")
    diff = [want[i * bs : (i + 1) * bs] for i in range(nblocks(size, bs))
            if cur[i * bs : (i + 1) * bs] != want[i * bs : (i + 1) * bs]]  # fmt: skip
    return len(diff), sum(map(len, diff)), sum(not is_zero(b) for b in diff)


def unrecognisable(data: bytes) -> bool:
    """The volume must not look like a filesystem or partition table: its identity (and with it the
    chain it belongs to) would then follow that UUID instead of the file's path."""
    return probe(data[:PROBE_BYTES]) is None


# -- helpers around the library ---------------------------------------------------------------------


def initial_volume(vol: Path, size: int, seed: int, noisy: bool = False) -> bytes:
    """Random, compressible and zero regions; or all random (incompressible: makes split points)."""
    if not noisy:
        return write_volume(vol, size, seed)
    data = random.Random(seed).randbytes(size)
    vol.write_bytes(data)
    return data


def check_result(r: BackupResult, prev: bytes | None, data: bytes, bs: int, seq: int) -> None:
    assert r.sequence == seq
    assert r.block_size == bs
    assert r.volume_size == len(data) == r.read_bytes
    if prev is None:
        assert r.kind == "full"
        assert (r.changed_blocks, r.changed_bytes) == (nblocks(len(data), bs), len(data))
    else:
        assert r.kind == "incremental"
        assert (r.changed_blocks, r.changed_bytes) == expected_changes(prev, data, bs)
    assert r.files and all(not f.startswith("/") for f in r.files)


def restore_to(address: str, out: Path, want: bytes, bs: int, keyring: Keyring | None = None) -> str:
    """Restore a point to a new file, check it bit for bit; returns the point id."""
    res = open_point(address)
    rr = restore(res.repo, res.point, str(out), keyring=keyring)
    got = out.read_bytes()
    assert len(got) == len(want), f"{address}: restored {len(got)} bytes, the volume had {len(want)}"
    assert got == want, f"{address}: restored volume differs from the volume at that step"
    assert rr.volume_size == len(want)
    assert rr.checked_blocks == data_blocks(want, bs)
    out.unlink()
    return str(res.point.point_id)


def repo_files(repo: Path) -> dict[str, str]:
    """Every file of the repository except locks, with a digest of its content."""
    out = {}
    for p in repo.rglob("*"):
        rel = p.relative_to(repo).as_posix()
        if p.is_file() and not rel.startswith("locks/"):
            out[rel] = hashlib.blake2b(p.read_bytes(), digest_size=16).hexdigest()
    return out


cache_modes = st.sampled_from(["env", "own", "none"])


def cache_arg(mode: str, tmp: Path) -> str | None:
    return {"env": "", "own": str(tmp / "cache"), "none": None}[mode]


# -- (a) the plain chain ----------------------------------------------------------------------------


@settings(max_examples=60, **SETTINGS)
@given(
    size=sizes,
    seed=seeds,
    bs=st.sampled_from(BLOCK_SIZES),
    steps=st.lists(ops, min_size=1, max_size=7),
    cache=cache_modes,
    threads=st.sampled_from([None, 1, 3]),
    encrypted=st.booleans(),
)
def test_chain_restores_every_step(size: int, seed: int, bs: int, steps: list, cache: str,
                                   threads: int | None, encrypted: bool) -> None:  # fmt: skip
    """Encrypted chains (a passphrase) too: the same volumes, the same restores."""
    ring = Keyring(PASSPHRASE) if encrypted else None
    with scratch() as td:
        tmp = Path(td)
        vol, repo = tmp / "vol.img", tmp / "repo"
        history = [write_volume(vol, size, seed)]
        for op in steps:
            history.append(apply(history[-1], op, history))
        assume(all(map(unrecognisable, history)))

        results: list[BackupResult] = []
        for i, data in enumerate(history):
            vol.write_bytes(data)
            r = backup(str(vol), str(repo), init=True, block_size=bs if i == 0 else None,
                       cache_dir=cache_arg(cache, tmp), threads=threads,
                       encrypt=PASSPHRASE if encrypted and i == 0 else None, keyring=ring)  # fmt: skip
            check_result(r, history[i - 1] if i else None, data, bs, i)
            results.append(r)
        assert len({r.chain_id for r in results}) == 1
        assert len({r.point_id for r in results}) == len(results)
        # the state digest is a function of the volume's content (and block size) alone
        for i, j in itertools.combinations(range(len(history)), 2):
            assert (results[i].state_digest == results[j].state_digest) == (history[i] == history[j])

        for i, want in enumerate(history):
            pid = restore_to(f"{repo}::default@{i}", tmp / f"out{i}.img", want, bs, ring)
            assert pid == results[i].point_id
        assert restore_to(f"{repo}::default@latest", tmp / "last.img", history[-1], bs, ring) == results[-1].point_id
        assert restore_to(f"{repo}::default@full", tmp / "first.img", history[0], bs, ring) == results[0].point_id
        back = len(history) - 1
        assert restore_to(f"{repo}::default@-{back}", tmp / "back.img", history[0], bs, ring) == results[0].point_id
        assert_portable(repo)


# -- (b) the chain's files moved and renamed between steps -------------------------------------------

name_chars = st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-. ")
file_names = st.text(name_chars, min_size=1, max_size=30).filter(
    lambda s: ".tmp-" not in s and s.strip(" ") == s and s not in (".", "..")
)
subfolders = st.sampled_from(["", "moved", "old/backups", "Archive 2024", "x/y/z"])
moves = st.tuples(
    st.booleans(),  # move the whole repository to a new folder
    st.lists(st.tuples(st.integers(0, 1000), subfolders, st.one_of(st.none(), file_names)), max_size=4),
)


def move_files(repo: Path, plan: list[tuple[int, str, str | None]], rng_tag: int) -> None:
    """Move image files of the repository into other subfolders and/or give them other names."""
    for k, (pick, folder, name) in enumerate(plan):
        files = sorted(p for p in repo.rglob("*") if p.is_file() and p.name != MARKER
                       and p.relative_to(repo).parts[0] != "locks")  # fmt: skip
        if not files:
            return
        src = files[pick % len(files)]
        dest_dir = repo / folder if folder else src.parent
        dest_dir.mkdir(parents=True, exist_ok=True)
        dest = dest_dir / (name or src.name)
        while dest.exists() and dest != src:
            dest = dest_dir / f"{dest.name}_{rng_tag}_{k}"
        if dest != src:
            shutil.move(src, dest)


@settings(max_examples=60, **SETTINGS)
@given(
    size=st.one_of(st.integers(MAX_SIZE * 5 // 8, MAX_SIZE), sizes),  # large enough to split, often
    seed=seeds,
    bs=st.sampled_from(BLOCK_SIZES),
    split=st.sampled_from([None, 1 << 20]),
    noisy=st.booleans(),
    steps=st.lists(st.tuples(ops, moves), min_size=1, max_size=6),
    cache=cache_modes,
)
def test_chain_survives_moves_and_renames(size: int, seed: int, bs: int, split: int | None, noisy: bool,
                                          steps: list, cache: str) -> None:  # fmt: skip
    with scratch() as td:
        tmp = Path(td)
        vol, repo = tmp / "vol.img", tmp / "repos" / "r0"
        history = [initial_volume(vol, size, seed, noisy)]
        for op, _ in steps:
            history.append(apply(history[-1], op, history))
        assume(all(map(unrecognisable, history)))

        r = backup(str(vol), str(repo), init=True, block_size=bs, split_size=split, cache_dir=cache_arg(cache, tmp))
        check_result(r, None, history[0], bs, 0)
        chain_id, ids = r.chain_id, [r.point_id]
        for i, (_, (move_repo, plan)) in enumerate(steps, start=1):
            if move_repo:
                new = tmp / "repos" / f"r{i}" / "deeper"
                new.parent.mkdir(parents=True)
                shutil.move(str(repo), str(new))
                repo = new
            move_files(repo, plan, i)
            vol.write_bytes(history[i])
            r = backup(str(vol), str(repo), init=True, cache_dir=cache_arg(cache, tmp))
            assert r.chain_id == chain_id  # the moved files are still the chain this backup continues
            check_result(r, history[i - 1], history[i], bs, i)
            ids.append(r.point_id)
            assert not any("removed" in n for n in r.notices), r.notices

        final = tmp / "elsewhere" / "repo"  # and once more after the last backup
        final.parent.mkdir()
        shutil.move(str(repo), str(final))
        repo = final
        catalog = open_point(f"{repo}::default").catalog
        assert not catalog.problems and not catalog.leftovers
        assert len(catalog.points) == len(history)
        event(f"split into segments: {any(len(p.segments) > 1 for p in catalog.points.values())}")
        event(f"renamed files: {any('-incr-' not in n and '-full-' not in n for n in catalog.by_file)}")
        for i, want in enumerate(history):
            assert restore_to(f"{repo}::default@{i}", tmp / f"out{i}.img", want, bs) == ids[i]
        # every image file, whatever it is called now and wherever it lies, names its own point
        for name, pid in catalog.by_file.items():
            res = open_point(str(repo / name))
            assert res.point.point_id == pid


# -- (c) two chains of one source, interleaved -------------------------------------------------------

CHAINS = ("daily", "weekly")
WHO = {"none": [], "daily": ["daily"], "weekly": ["weekly"], "both": ["daily", "weekly"],
       "both-reversed": ["weekly", "daily"]}  # fmt: skip


@settings(max_examples=40, **SETTINGS)
@given(
    size=sizes,
    seed=seeds,
    bs_daily=st.sampled_from(BLOCK_SIZES),
    bs_weekly=st.sampled_from(BLOCK_SIZES),
    first=st.sampled_from(sorted(WHO)),
    steps=st.lists(st.tuples(ops, st.sampled_from(sorted(WHO))), min_size=1, max_size=8),
    cache=cache_modes,
)
def test_two_chains_interleaved(size: int, seed: int, bs_daily: int, bs_weekly: int, first: str, steps: list,
                                cache: str) -> None:  # fmt: skip
    bs = {"daily": bs_daily, "weekly": bs_weekly}
    with scratch() as td:
        tmp = Path(td)
        vol, repo = tmp / "vol.img", tmp / "repo"
        history = [write_volume(vol, size, seed)]
        for op, _ in steps:
            history.append(apply(history[-1], op, history))
        assume(all(map(unrecognisable, history)))
        plan = [first] + [who for _, who in steps]

        points: dict[str, list[tuple[int, str]]] = {c: [] for c in CHAINS}  # chain -> [(step, point id)]
        chain_ids: dict[str, str] = {}
        for i, data in enumerate(history):
            vol.write_bytes(data)
            for name in WHO[plan[i]]:
                before = repo_files(repo) if repo.exists() else {}
                mine = points[name]
                prev = history[mine[-1][0]] if mine else None
                r = backup(str(vol), str(repo), init=True, chain=name, block_size=None if mine else bs[name],
                           cache_dir=cache_arg(cache, tmp))  # fmt: skip
                # changes are counted against this chain's own last point, whatever the other one did
                check_result(r, prev, data, bs[name], len(mine))
                assert r.chain == name
                assert chain_ids.setdefault(name, r.chain_id) == r.chain_id
                after = repo_files(repo)
                assert {k: after.get(k) for k in before} == before, "a backup changed files already stored"
                assert set(after) - set(before) - {MARKER} == set(r.files)
                mine.append((i, r.point_id))
        if len(chain_ids) == 2:
            assert chain_ids["daily"] != chain_ids["weekly"]

        for name in CHAINS:
            for seq, (step, pid) in enumerate(points[name]):
                got = restore_to(f"{repo}::{name}@{seq}", tmp / f"{name}{seq}.img", history[step], bs[name])
                assert got == pid
        if repo.exists():
            assert_portable(repo)


# -- (d) delta restore -------------------------------------------------------------------------------


@settings(max_examples=50, **SETTINGS)
@given(
    size=sizes,
    seed=seeds,
    bs=st.sampled_from(BLOCK_SIZES),
    steps=st.lists(ops, min_size=1, max_size=6),
    picks=st.lists(st.tuples(st.integers(0, 100), st.none() | st.integers(0, 100)), min_size=1, max_size=3),
    cache=cache_modes,
)
def test_delta_restore_writes_only_differing_blocks(size: int, seed: int, bs: int, steps: list, picks: list,
                                                    cache: str) -> None:  # fmt: skip
    with scratch() as td:
        tmp = Path(td)
        vol, repo = tmp / "vol.img", tmp / "repo"
        history = [write_volume(vol, size, seed)]
        for op in steps:
            history.append(apply(history[-1], op, history))
        assume(all(map(unrecognisable, history)))
        for i, data in enumerate(history):
            vol.write_bytes(data)
            r = backup(str(vol), str(repo), init=True, block_size=bs if i == 0 else None,
                       cache_dir=cache_arg(cache, tmp))  # fmt: skip
            check_result(r, history[i - 1] if i else None, data, bs, i)

        target = tmp / "target.img"
        for pick, base in picks:
            k = pick % len(history)
            # onto a copy of the current volume, or onto an older state of it
            current = history[-1] if base is None else history[base % len(history)]
            target.write_bytes(current)
            res = open_point(f"{repo}::default@{k}")
            rr = restore(res.repo, res.point, str(target), delta=True)
            assert target.read_bytes() == history[k]
            assert rr.delta
            blocks, nbytes, from_repo = differing_blocks(current, history[k], bs)
            assert (rr.written_blocks, rr.written_bytes) == (blocks, nbytes)
            # every block taken from the repository was checked against its digest
            assert from_repo <= rr.checked_blocks <= data_blocks(history[k], bs)
            # a second delta restore finds nothing left to write
            again = restore(res.repo, res.point, str(target), delta=True)
            assert (again.written_blocks, again.written_bytes) == (0, 0)
            assert target.read_bytes() == history[k]
        assert os.path.exists(vol) and vol.read_bytes() == history[-1]  # the source was never touched


# -- (e) trees, across every boundary: chunks, index frames, map windows -------------------------------


@settings(max_examples=40, **SETTINGS)
@given(
    size=sizes,
    seed=seeds,
    bs=st.sampled_from(BLOCK_SIZES),
    steps=st.lists(st.tuples(st.integers(0, 1000), ops), min_size=1, max_size=6),
    chunk_blocks=st.integers(1, 5),
    frame_entries=st.integers(1, 7),
    window=st.integers(1, 9),
)
def test_trees_restore_across_chunk_frame_and_window_boundaries(size: int, seed: int, bs: int, steps: list,
                                                                chunk_blocks: int, frame_entries: int,
                                                                window: int) -> None:  # fmt: skip
    """Each step continues a random earlier point (a fork whenever it is not the newest), with the
    pipeline's chunks, the index frames and the map windows all a few blocks long."""
    from unittest import mock

    from imagechain import chain as chain_mod
    from imagechain.engine import backup as backup_mod
    from imagechain.engine.verify import verify
    from imagechain.format import writer
    from imagechain.repository import Repository

    with (scratch() as td, mock.patch.object(backup_mod, "CHUNK_BYTES", chunk_blocks * bs),
          mock.patch.object(writer, "INDEX_FRAME_ENTRIES", frame_entries),
          mock.patch.object(chain_mod, "WINDOW_BLOCKS", window)):  # fmt: skip
        tmp = Path(td)
        vol, repo = tmp / "vol.img", tmp / "repo"
        history = [write_volume(vol, size, seed)]
        r = backup(str(vol), str(repo), init=True, block_size=bs, cache_dir=None)
        points = [r.point_id]
        parents: list[int | None] = [None]
        for pick, op in steps:
            base = pick % len(history)
            data = apply(history[base], op, history)
            assume(unrecognisable(data))
            vol.write_bytes(data)
            r = backup(str(vol), str(repo), init=True, parent=points[base][:13],
                       cache_dir=None if pick % 2 else str(tmp / "c"))  # fmt: skip
            assert r.parent_id == points[base] and r.kind == "incremental"
            history.append(data)
            points.append(r.point_id)
            parents.append(base)
        assume(unrecognisable(history[0]))
        cat = Repository.open(str(repo)).catalog()
        (gen,) = cat.generations().values()
        leaves = {i for i in range(len(points)) if i not in parents}
        assert {str(t.point_id) for t in cat.tips(gen)} == {points[i] for i in leaves}
        for i, want in enumerate(history):
            assert restore_to(f"{repo}::{points[i][:13]}", tmp / f"out{i}.img", want, bs) == points[i]
            if parents[i] is not None:  # @-1 walks this point's own lineage
                assert str(open_point(f"{repo}::{points[i][:13]}@-1").point.point_id) == points[parents[i]]
        rep = verify(Repository.open(str(repo)))
        assert rep.ok, [p.problems for p in rep.points]
        assert bool([n for n in rep.notices if "forks at" in n]) == (len(leaves) > 1)
