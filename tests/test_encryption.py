"""Encrypted chains: passphrase and recipient modes through the CLI and the library. What must hold: the
right key restores bit for bit, also from files copied alone to a new folder; a wrong or missing key is
one line with exit code 11 and nothing written; no plaintext reaches the repository; any altered byte
of what a point's keys cover is found; the backing-up machine of a recipient-mode chain cannot decrypt
what it wrote; changing the passphrase survives kill -9 at any moment."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from imagechain.address import open_point
from imagechain.crypto import Passphrase, generate_identity, load_identity, load_recipient, open_slot, slots
from imagechain.engine.backup import backup
from imagechain.engine.restore import restore
from imagechain.engine.verify import verify
from imagechain.errors import CredentialsError, ImagechainError
from imagechain.format import spec
from imagechain.format.reader import PointFiles
from imagechain.keyring import Keyring, KeyStore
from imagechain.repository import Repository

from .conftest import error_lines, exe, need_tool

MiB = 1 << 20
PW = Passphrase(b"first passphrase")
PW2 = Passphrase(b"second passphrase")
MARKER = b"PLAINTEXT-MARKER-0xC0FFEE "


@pytest.fixture(autouse=True)
def _keystore(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGECHAIN_KEYSTORE", str(tmp_path / "keystore"))
    monkeypatch.delenv("IMAGECHAIN_PASSPHRASE", raising=False)


def volume(path: Path, seed: int, size: int = 3 * MiB) -> bytearray:
    """Random, zero and compressible text regions; the text carries a marker that must never be stored."""
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(size // 3) + bytes(size // 3))
    data += (MARKER * (size // len(MARKER) + 1))[: size - len(data)]
    path.write_bytes(data)
    return data


def ic(*args: object, env: dict[str, str] | None = None, stdin: int | None = subprocess.DEVNULL
       ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return subprocess.run([exe(), *map(str, args)], capture_output=True, text=True, timeout=120, stdin=stdin,
                          env={**os.environ, **(env or {})})  # fmt: skip


def points(repo: Path) -> list[PointFiles]:
    return sorted(Repository.open(str(repo)).catalog().points.values(), key=lambda p: p.header.sequence)


def test_passphrase_chain_through_the_cli(tmp_path: Path, repo: Path) -> None:
    vol = tmp_path / "vol.img"
    data = volume(vol, 1)
    pw = {"IMAGECHAIN_PASSPHRASE": "first passphrase"}
    full = ic("backup", vol, repo, "--encrypt", "--json", env=pw)
    assert full.returncode == 0, full.stderr
    assert "first passphrase" not in full.stdout + full.stderr
    data[MiB : MiB + 100] = os.urandom(100)
    vol.write_bytes(data)
    # an incremental needs the passphrase: without one (and no terminal to ask on) it says so
    no = ic("backup", vol, repo)
    assert no.returncode == 11 and error_lines(no.stderr)[0].startswith("imagechain: error: passphrase is needed")
    pwfile = tmp_path / "pw"
    pwfile.write_text("first passphrase\n")
    inc = ic("backup", vol, repo, "--passphrase-file", pwfile, "--json")
    assert inc.returncode == 0, inc.stderr
    assert json.loads(inc.stdout)["kind"] == "incremental" and json.loads(inc.stdout)["changed_blocks"] == 1

    # the wrong passphrase: one line, exit 11, nothing written
    out = tmp_path / "out.img"
    bad = ic("restore", f"{repo}::default", out, env={"IMAGECHAIN_PASSPHRASE": "wrong"})
    assert bad.returncode == 11 and "wrong passphrase" in bad.stderr and "Traceback" not in bad.stderr
    assert len(error_lines(bad.stderr)) == 1
    assert not out.exists() and not list(tmp_path.glob("out.img.tmp-*"))
    ok = ic("restore", f"{repo}::default", out, env=pw)
    assert ok.returncode == 0, ok.stderr
    assert out.read_bytes() == bytes(data)
    # no plaintext in any repository file (the marker fills a third of the volume, compressible)
    for f in repo.rglob("*"):
        if f.is_file():
            assert MARKER[:16] not in f.read_bytes(), f
    info = ic("info", f"{repo}::default")
    assert "aes-256-gcm, passphrase" in info.stdout and "sealed" in info.stdout
    ver = ic("verify", repo)
    assert ver.returncode == 0 and "structure, links and checksums only" in ver.stdout
    ver = ic("verify", repo, env=pw)
    assert ver.returncode == 0 and "blocks checked" in ver.stdout and "only" not in ver.stdout
    # a wrong key given does not pass for a full check: what could be checked is, then one line, exit 11
    ver = ic("verify", repo, env={"IMAGECHAIN_PASSPHRASE": "wrong"})
    assert ver.returncode == 11 and "0 problem(s)" in ver.stdout, ver.stderr
    assert error_lines(ver.stderr) == ["imagechain: error: the passphrase given opens none of the 1 encrypted "
                                       "chain(s) checked: their payloads were not checked (what could be checked "
                                       "without it is sound)"]  # fmt: skip
    ver = ic("verify", repo, "--json", env={"IMAGECHAIN_PASSPHRASE": "wrong"})
    assert ver.returncode == 11 and json.loads(ver.stdout)["opened_none"].startswith("the passphrase given")


def test_files_copied_alone_restore_with_the_passphrase_only(tmp_path: Path, repo: Path) -> None:
    vol = tmp_path / "vol.img"
    data = volume(vol, 2)
    backup(str(vol), str(repo), encrypt=PW)
    data[:4096] = os.urandom(4096)
    vol.write_bytes(data)
    backup(str(vol), str(repo), keyring=Keyring(PW))
    elsewhere = tmp_path / "usb"
    Repository.open(str(elsewhere), create=True)
    for i, f in enumerate(sorted(repo.rglob("*.icimg"))):
        shutil.copyfile(f, elsewhere / f"renamed-{i}.icimg")  # flat, renamed: identities link them
    os.environ["IMAGECHAIN_CACHE"] = str(tmp_path / "fresh-cache")  # no block map cached anywhere
    res = open_point(f"{elsewhere}::default")
    restore(res.repo, res.point, str(tmp_path / "out.img"), keyring=Keyring(PW))
    assert (tmp_path / "out.img").read_bytes() == bytes(data)
    with pytest.raises(CredentialsError):
        restore(res.repo, res.point, str(tmp_path / "out2.img"))
    assert not (tmp_path / "out2.img").exists()


def regions(p: PointFiles) -> dict[str, int]:
    """A file offset inside each part of an unsplit point's file."""
    h, ft = p.header, p.footer
    seg = spec.SEGMENT_HEADER_SIZE
    fixed_end = spec.HEADER_FIXED_SIZE
    meta_start = fixed_end + len(h.key_material)
    header_end = meta_start + h.pack().__len__() - meta_start
    return {
        "segment header": 20, "header fixed part": seg + 40, "key slot in use": seg + fixed_end + 60,
        "metadata": seg + meta_start + 5, "header MAC": seg + header_end - 3, "payload": seg + header_end + 10,
        "index frame": seg + ft.index_offset + ft.index_length // 2, "frame directory": seg + ft.directory_offset + 5,
        "summary": seg + ft.summary_offset + 3, "footer": seg + ft.logical_length - 100,
    }  # fmt: skip


def test_any_altered_byte_is_found(tmp_path: Path, repo: Path) -> None:
    vol = tmp_path / "vol.img"
    volume(vol, 3)
    backup(str(vol), str(repo), encrypt=PW)
    (p,) = points(repo)
    path = repo / p.name
    original = path.read_bytes()
    for what, at in regions(p).items():
        assert at < len(original)
        changed = bytearray(original)
        changed[at] ^= 0x40
        path.write_bytes(changed)
        out = tmp_path / "out.img"
        if what == "summary":  # statistics only, never read by a restore: verify reports it
            rep = verify(Repository.open(str(repo)), keyring=Keyring(PW))
            assert any("summary" in n for r in rep.points for n in r.notices), rep.as_dict()
        else:
            with pytest.raises(ImagechainError):  # finding the point may be what fails
                res = open_point(f"{repo}::default")
                restore(res.repo, res.point, str(out), keyring=Keyring(PW))
                pytest.fail(f"altered {what} (byte {at}) was not found")
            assert not out.exists(), what
        path.write_bytes(original)
    res = open_point(f"{repo}::default")
    restore(res.repo, res.point, str(tmp_path / "ok.img"), keyring=Keyring(PW))  # unaltered: fine


def test_recipient_mode_writer_cannot_read(tmp_path: Path, repo: Path) -> None:
    ident = tmp_path / "id.key"
    pub = generate_identity(str(ident))
    assert oct(ident.stat().st_mode & 0o777) == "0o600"
    vol = tmp_path / "vol.img"
    data = volume(vol, 4)
    backup(str(vol), str(repo), encrypt=load_recipient(pub))
    for step in range(2):  # incrementals from the key store alone: CBC without reading any payload
        data[step * MiB : step * MiB + 512] = os.urandom(512)
        vol.write_bytes(data)
        r = backup(str(vol), str(repo))
        assert r.kind == "incremental" and r.changed_blocks == 1

    store = KeyStore()
    chain_id = points(repo)[0].header.chain_id
    digest_key = store.get(chain_id)
    assert digest_key is not None
    assert oct(os.stat(store.folder).st_mode & 0o777) == "0o700"
    # with what the machine keeps (the digest key) the writer can follow the chain but not open a payload
    res = open_point(f"{repo}::default")
    with pytest.raises(CredentialsError, match="identity"):
        restore(res.repo, res.point, str(tmp_path / "out.img"))
    full = points(repo)[0]
    for slot in slots(full.header.key_material):
        assert open_slot(full.header.chain_id, full.header.point_id, slot, None, None) is None
    payload_at = spec.SEGMENT_HEADER_SIZE + len(full.header.pack())
    sealed = (repo / full.name).read_bytes()[payload_at : payload_at + 4096]
    for guess in (digest_key, *(k for k in _derived(digest_key, full))):
        with pytest.raises(InvalidTag):
            AESGCM(guess).decrypt((0).to_bytes(12, "little"), sealed, None)
    # the identity's holder reads everything
    ring = Keyring(identity=load_identity(str(ident)))
    res = open_point(f"{repo}::default")
    restore(res.repo, res.point, str(tmp_path / "out.img"), keyring=ring)
    assert (tmp_path / "out.img").read_bytes() == bytes(data)
    assert verify(Repository.open(str(repo)), keyring=ring).ok
    rep = verify(Repository.open(str(repo)))  # the writer: maps proven, payloads not
    assert rep.ok and any("payloads not checked" in n for n in rep.notices), rep.notices
    # the CLI: exit 11 without the identity, the file named
    cli = ic("restore", f"{repo}::default", tmp_path / "cli.img")
    assert cli.returncode == 11 and "--identity" in cli.stderr
    cli = ic("restore", f"{repo}::default", tmp_path / "cli.img", "--identity", ident)
    assert cli.returncode == 0 and (tmp_path / "cli.img").read_bytes() == bytes(data)


def _derived(digest_key: bytes, p: PointFiles) -> list[bytes]:
    from imagechain.crypto import PointKeys, _derive, header_mac_key

    keys = PointKeys(p.header.point_id, digest_key, None)
    return [header_mac_key(digest_key), _derive("index", digest_key, p.header.point_id.bytes), keys.digest(b"")]


def test_change_passphrase_survives_kill_9(tmp_path: Path, repo: Path) -> None:
    """kill -9 lands on each in-place write in turn (strace injects SIGKILL at the Nth pwrite of a run, so
    every moment between two writes is tried): afterwards one of the two passphrases opens every file, and
    running the command again finishes the job: only the new one opens anything, and the chain restores."""
    need_tool("strace")
    vol = tmp_path / "vol.img"
    data = volume(vol, 5, size=MiB)
    backup(str(vol), str(repo), encrypt=PW)
    for i in range(3):
        data[i * 4096 : i * 4096 + 10] = os.urandom(10)
        vol.write_bytes(data)
        backup(str(vol), str(repo), keyring=Keyring(PW))
    npoints = len(points(repo))
    env = {**os.environ, "IMAGECHAIN_PASSPHRASE": "first passphrase", "IMAGECHAIN_NEW_PASSPHRASE": "second passphrase"}
    pristine = tmp_path / "pristine"
    shutil.copytree(repo, pristine)
    for n in range(1, 2 * npoints + 1):  # every key slot write of a run: npoints sealed, npoints cleared
        shutil.rmtree(repo)
        shutil.copytree(pristine, repo)
        inject = ["strace", "-f", "-o", "/dev/null", "-e", "trace=pwrite64", "-e",
                  f"inject=pwrite64:signal=KILL:when={n}"]
        killed = subprocess.run([*inject, exe(), "key", "change-passphrase", f"{repo}::default"], env=env,
                                stdin=subprocess.DEVNULL, capture_output=True)  # fmt: skip
        assert killed.returncode != 0, f"the run was not killed at write {n}"
        pts = points(repo)
        old, new = [_opens(q, PW) for q in pts], [_opens(q, PW2) for q in pts]
        assert all(old) or all(new), (n, old, new)
        done = subprocess.run([exe(), "key", "change-passphrase", f"{repo}::default"], env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 0, (n, done.stderr)
        pts = points(repo)
        assert all(_opens(q, PW2) for q in pts) and not any(_opens(q, PW) for q in pts), n
    res = open_point(f"{repo}::default")
    restore(res.repo, res.point, str(tmp_path / "out.img"), keyring=Keyring(PW2))
    assert (tmp_path / "out.img").read_bytes() == bytes(data)


def _opens(p: PointFiles, pw: Passphrase) -> bool:
    h = p.header
    return any(open_slot(h.chain_id, h.point_id, s, pw, None) is not None for s in slots(h.key_material))


def test_mode_errors(tmp_path: Path, repo: Path) -> None:
    vol = tmp_path / "vol.img"
    volume(vol, 7, size=MiB)
    backup(str(vol), str(repo))
    cli = ic("backup", vol, repo, "--encrypt", env={"IMAGECHAIN_PASSPHRASE": "x"})
    assert cli.returncode == 2 and "not encrypted" in cli.stderr and "--full" in cli.stderr
    cli = ic("backup", vol, repo, "--full", "--encrypt", "--recipient", tmp_path / "nope.pub")
    assert cli.returncode == 2 and "choose one" in cli.stderr
    (tmp_path / "bad.pub").write_text("not a key\n")
    cli = ic("backup", vol, repo, "--full", "--recipient", tmp_path / "bad.pub")
    assert cli.returncode == 2 and "not an imagechain public key" in cli.stderr
    # a binary file given as a key (the passphrase file's neighbour, a disk image): one line, no traceback
    (tmp_path / "binary").write_bytes(bytes(range(256)) * 64)
    for opt, what in (("--recipient", "public key"), ("--identity", "secret identity")):
        cli = ic("backup", vol, repo, "--full", opt, tmp_path / "binary")
        assert cli.returncode == 2 and f"is not an imagechain {what}" in cli.stderr, cli.stderr
        assert len(error_lines(cli.stderr)) == 1 and "Traceback" not in cli.stderr


def test_recipient_key_store_unwritable_publishes_nothing(tmp_path: Path, repo: Path) -> None:
    """A machine that could not keep the chain's digest key could never continue the chain: the backup
    fails before anything is published."""
    pub = generate_identity(str(tmp_path / "id.key"))
    vol = tmp_path / "vol.img"
    volume(vol, 8, size=MiB)
    (tmp_path / "blocker").write_text("a file where the key store's folder would go")
    cli = ic("backup", vol, repo, "--recipient", pub, env={"IMAGECHAIN_KEYSTORE": str(tmp_path / "blocker" / "k")})
    assert cli.returncode == 2 and "key store" in cli.stderr and "Traceback" not in cli.stderr
    assert not list(repo.rglob("*.icimg"))
