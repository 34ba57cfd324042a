"""Consolidating encrypted chains: payloads are copied still sealed (byte for byte), the merged point
carries the data keys they were sealed with, and everything keeps working that works on any encrypted
point: restore, verify, the next incremental, a merge of merged points, `key change-passphrase`, and
recipient mode (where merging needs the identity, and the backing-up machine still writes incrementals)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import subprocess
import uuid
from pathlib import Path

import numpy as np
import pytest

from imagechain.address import open_point
from imagechain.chain import MapStream
from imagechain.crypto import Passphrase, generate_identity, load_identity, load_recipient
from imagechain.engine.backup import backup
from imagechain.engine.consolidate import consolidate
from imagechain.engine.prune import Policy, prune
from imagechain.engine.restore import PayloadSource, restore
from imagechain.engine.verify import verify
from imagechain.errors import CredentialsError
from imagechain.format import spec
from imagechain.format.reader import PointFiles
from imagechain.keyring import KEY_TABLE, Keyring, KeyStore
from imagechain.repository import Repository

from .conftest import error_lines, exe, write_volume

MiB = 1 << 20
PW, PW2 = Passphrase(b"merge me"), Passphrase(b"merged, renamed")


@pytest.fixture(autouse=True)
def _keystore(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGECHAIN_KEYSTORE", str(tmp_path / "keystore"))
    monkeypatch.delenv("IMAGECHAIN_PASSPHRASE", raising=False)


def chain(tmp_path: Path, repo: Path, n: int, encrypt: object, ring: Keyring) -> tuple[Path, dict[int, str]]:
    vol = tmp_path / "vol.img"
    data = bytearray(write_volume(vol, 6 * MiB, seed=11))
    rng = random.Random(3)
    states = {}
    for seq in range(n):
        if seq:
            for _ in range(10):
                at = rng.randrange(len(data) - 70000)
                data[at : at + 70000] = os.urandom(70000)
            vol.write_bytes(data)
        r = backup(str(vol), str(repo), encrypt=encrypt if seq == 0 else None, keyring=ring,  # type: ignore[arg-type]
                   cache_dir=None)  # fmt: skip
        assert r.sequence == seq
        states[seq] = hashlib.sha256(data).hexdigest()
    return vol, states


def restore_all(tmp_path: Path, repo: Path, states: dict[int, str], ring: Keyring) -> set[int]:
    r = Repository.open(str(repo))
    cat = r.catalog()
    for p in cat.points.values():
        out = tmp_path / "out.img"
        restore(r, p, str(out), cat=cat, keyring=ring)
        assert hashlib.sha256(out.read_bytes()).hexdigest() == states[p.header.sequence], p.header.sequence
        out.unlink()
    assert verify(r, keyring=ring).ok  # every payload of every point decrypted and checked
    return {p.header.sequence for p in cat.points.values()}


def sealed_payloads(repo: Path, run: list[PointFiles], ring: Keyring) -> dict[int, bytes]:
    """The stored (sealed) payload of every block the run's overlay names, as the files hold them."""
    r = Repository.open(str(repo))
    ring.unlock_all(run, need_data=False)
    out: dict[int, bytes] = {}
    source = PayloadSource(r, run)
    with MapStream(r.store, run, locations=True) as ms, contextlib.closing(source):
        for bm in ms.overlay_windows():
            blocks = np.flatnonzero(bm.kind == spec.BLOCK_DATA) + bm.start
            out.update(zip(blocks.tolist(), source.fetch(bm, blocks), strict=True))
    return out


def test_passphrase_chain_merges_restores_continues_and_changes_passphrase(tmp_path: Path, repo: Path) -> None:
    ring = Keyring(PW)
    vol, states = chain(tmp_path, repo, 5, PW, ring)
    res = open_point(f"{repo}::default@2")
    before = sealed_payloads(repo, res.catalog.lineage(res.point), ring)
    # without the passphrase: one clear error, nothing changed
    with pytest.raises(CredentialsError, match="passphrase"):
        consolidate(res.repo, res.point, cat=res.catalog, keyring=Keyring())
    assert len(Repository.open(str(repo)).catalog().points) == 5
    m = consolidate(res.repo, res.point, cat=res.catalog, keyring=ring)
    assert m.kind == "full" and len(m.replaced) == 3
    cat = Repository.open(str(repo)).catalog()
    merged = cat.points[uuid.UUID(m.point_id)]
    assert merged.header.encrypted and KEY_TABLE in merged.header.metadata
    assert sealed_payloads(repo, [merged], ring) == before  # copied as sealed, not decrypted and resealed
    assert restore_all(tmp_path, repo, states, ring) == {2, 3, 4}

    # a merge of the merged point with the next two: key tables carry over
    res = open_point(f"{repo}::default@4")
    m2 = consolidate(res.repo, res.point, cat=res.catalog, keyring=ring)
    assert len(m2.replaced) == 3 and restore_all(tmp_path, repo, states, ring) == {4}
    # the chain goes on from the merged point
    data = bytearray(vol.read_bytes())
    data[:5000] = os.urandom(5000)
    vol.write_bytes(data)
    nxt = backup(str(vol), str(repo), keyring=ring, cache_dir=None)
    assert nxt.kind == "incremental" and nxt.sequence == 5 and nxt.changed_blocks == 1
    states[5] = hashlib.sha256(data).hexdigest()

    # key change-passphrase rewrites only the slots: the key tables stay sealed under the same data keys
    env = {**os.environ, "IMAGECHAIN_PASSPHRASE": PW.secret.decode(), "IMAGECHAIN_NEW_PASSPHRASE": PW2.secret.decode()}
    ch = subprocess.run([exe(), "key", "change-passphrase", f"{repo}::default"], env=env, capture_output=True,
                        text=True, stdin=subprocess.DEVNULL)  # fmt: skip
    assert ch.returncode == 0, ch.stderr
    assert restore_all(tmp_path, repo, states, Keyring(PW2)) == {4, 5}
    with pytest.raises(CredentialsError, match="wrong passphrase"):
        restore_all(tmp_path, repo, states, Keyring(PW))


def test_a_payload_moved_between_sealers_does_not_decrypt(tmp_path: Path, repo: Path) -> None:
    """The key field cannot be pointed at another key to pass a payload off as another point's: the
    associated data names the sealing point, and the index frames are sealed anyway."""
    from imagechain.crypto import PointKeys

    ring = Keyring(PW)
    chain(tmp_path, repo, 3, PW, ring)
    res = open_point(f"{repo}::default")
    consolidate(res.repo, res.point, cat=res.catalog, keyring=ring)
    cat = Repository.open(str(repo)).catalog()
    (m,) = cat.points.values()
    keys = ring.unlock(m)
    assert isinstance(keys, PointKeys) and len(keys.inherited) == 3
    bm_rows = sealed_payloads(repo, [m], ring)
    with MapStream(Repository.open(str(repo)).store, [m], locations=True) as ms:
        bm = next(iter(ms.overlay_windows()))
    assert bm.key is not None and bm.codec is not None
    blk = int(np.flatnonzero(bm.kind == spec.BLOCK_DATA)[0])
    right = int(bm.key[blk])
    assert right >= 1
    keys.open_payload(blk, int(bm.codec[blk]), bm_rows[blk], right)  # opens with its own sealer's key
    for wrong in {0, *range(1, 4)} - {right}:
        with pytest.raises(Exception, match="does not decrypt"):
            keys.open_payload(blk, int(bm.codec[blk]), bm_rows[blk], wrong)
    with pytest.raises(Exception, match="does not hold"):
        keys.open_payload(blk, int(bm.codec[blk]), bm_rows[blk], 9)


def test_recipient_mode_needs_the_identity_and_the_writer_goes_on(tmp_path: Path, repo: Path) -> None:
    ident = tmp_path / "id.key"
    pub = load_recipient(generate_identity(str(ident)))
    writer = Keyring()  # the backing-up machine: its key store holds the digest key only
    vol, states = chain(tmp_path, repo, 4, pub, writer)
    assert KeyStore().get(Repository.open(str(repo)).catalog().points.popitem()[1].header.chain_id) is not None
    cli = subprocess.run([exe(), "consolidate", f"{repo}::default@2"], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL)  # fmt: skip
    assert cli.returncode == 11 and "--identity" in cli.stderr and len(error_lines(cli.stderr)) == 1, cli.stderr
    assert len(Repository.open(str(repo)).catalog().points) == 4
    pr = subprocess.run([exe(), "prune", str(repo), "--keep-last", "1"], capture_output=True, text=True,
                        stdin=subprocess.DEVNULL)  # fmt: skip
    assert pr.returncode == 0 and "skipped the encrypted chain" in pr.stderr and "--identity" in pr.stderr
    cli = subprocess.run([exe(), "consolidate", f"{repo}::default@2", "--identity", str(ident)], capture_output=True,
                         text=True, stdin=subprocess.DEVNULL)  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    # the writer continues the chain from the merged point with its digest key alone
    data = bytearray(vol.read_bytes())
    data[-3000:] = os.urandom(3000)
    vol.write_bytes(data)
    nxt = backup(str(vol), str(repo), keyring=Keyring(), cache_dir=None)
    assert nxt.kind == "incremental" and nxt.changed_blocks == 1
    states[4] = hashlib.sha256(data).hexdigest()
    assert restore_all(tmp_path, repo, states, Keyring(identity=load_identity(str(ident)))) == {2, 3, 4}


def test_prune_with_the_passphrase_merges_encrypted_chains(tmp_path: Path, repo: Path) -> None:
    ring = Keyring(PW)
    _vol, states = chain(tmp_path, repo, 5, PW, ring)
    r = Repository.open(str(repo))
    cat = r.catalog()
    gens = list(cat.generations().values())
    skipped = prune(r, gens, Policy(last=2), cat=cat, keyring=Keyring())
    assert skipped.merges == [] and any("passphrase" in n for n in skipped.notices)
    cat = r.catalog()
    done = prune(r, list(cat.generations().values()), Policy(last=2), cat=cat, keyring=ring)
    assert len(done.merges) == 1 and [p.header.sequence for p in done.merges[0].remove] == [0, 1, 2]
    assert restore_all(tmp_path, repo, states, ring) == {3, 4}
