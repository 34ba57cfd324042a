"""The SFTP store against a real OpenSSH server (tests/sshd.py, fixture sshd_server from conftest): the store
contract, ~/.ssh/config, host keys, logins, and connections that fail or drop in the middle of a transfer."""

from __future__ import annotations

import os
import random
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagechain.errors import CredentialsError, ImagechainError, NoSpaceError, RepositoryError, UsageError
from imagechain.stores import LocalStore, sftp_wire, temporary_of
from imagechain.stores import sftp as sftp_mod
from imagechain.stores.base import TEMP_MARK
from imagechain.stores.sftp import SftpStore, parse_url

from .sshd import SshServer, free_port, keygen

MiB = 1 << 20


@pytest.fixture
def env(sshd_server: SshServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SshServer:
    """The server, with a client side of its own: an empty home (no ~/.ssh), no agent, short retry pauses."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("SSH_AUTH_SOCK", "IMAGECHAIN_SSH_ACCEPT_NEW", "IMAGECHAIN_SSH_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("IMAGECHAIN_SSH_CONFIG", str(sshd_server.config))
    monkeypatch.setattr(sftp_mod, "RETRY_DELAY", 0.01)
    if not sshd_server.running:  # an earlier test stopped it and failed before starting it again
        sshd_server.start()
    return sshd_server


def new_store(srv: SshServer, url: str | None = None) -> SftpStore:
    s = SftpStore(url or srv.url(f"t-{secrets.token_hex(4)}"))
    s.make_root()
    return s


@pytest.fixture
def store(env: SshServer) -> Iterator[SftpStore]:
    s = new_store(env)
    yield s
    s.close()


def one_line(e: ImagechainError, *words: str) -> str:
    text = str(e)
    assert "\n" not in text and text.startswith("cannot"), text
    for w in words:
        assert w in text, (w, text)
    return text


def write(store: SftpStore, name: str, data: bytes) -> None:
    w = store.create(name)
    w.write(data)
    w.commit()


# -- urls --------------------------------------------------------------------------------------------------


def test_urls_are_canonical_and_checked() -> None:
    t = parse_url("sftp://Backup@NAS.example:2222//srv/./images/")
    assert (t.user, t.host, t.port, t.root, t.url) == ("Backup", "nas.example", 2222, "/srv/images",
                                                       "sftp://Backup@nas.example:2222/srv/images")  # fmt: skip
    assert parse_url("sftp://nas/~/repo").root == "repo" and parse_url("sftp://nas/~/repo").url == "sftp://nas/~/repo"
    assert parse_url("sftp://nas/~").root == "" and parse_url("sftp://nas/~/").url == "sftp://nas/~"
    assert parse_url("sftp://[::1]:22/a%20b").url == "sftp://[::1]:22/a%20b"
    for bad in ("sftp://nas", "sftp:///x", "sftp://nas:99999/x", "sftp://u:pw@nas/x", "sftp://nas/a/../b",
                "sftp://nas/~other/x", "http://nas/x"):  # fmt: skip
        with pytest.raises(UsageError):
            SftpStore(bad)


# -- the store contract ------------------------------------------------------------------------------------


def test_root_is_made_only_by_make_root(env: SshServer) -> None:
    s = SftpStore(env.url(f"t-{secrets.token_hex(4)}/deeper"))
    assert not s.root_exists()
    with pytest.raises(RepositoryError) as e:
        list(s.list())
    one_line(e.value, s.url, "not found")
    with pytest.raises(RepositoryError) as e:
        s.create("a/b")
    one_line(e.value, s.url, "not found")
    s.make_root()
    s.make_root()  # again: fine
    assert s.root_exists() and list(s.list()) == []


def test_commit_publishes_and_abort_leaves_nothing(store: SftpStore) -> None:
    data = os.urandom(3 * MiB + 12345)
    w = store.create("chain/seg.img")
    assert w.write(data[:100]) == 100 and w.write(memoryview(data)[100:]) == len(data) - 100
    assert w.tell() == len(data)
    w.flush()
    [tmp] = list(store.list())
    assert temporary_of(tmp.name) == "chain/seg.img" and TEMP_MARK in tmp.name and tmp.size == len(data)
    assert not store.exists("chain/seg.img")
    assert w.read_back(len(data) - 1000, 5000) == data[-1000:]
    w.commit()
    [entry] = list(store.list())
    assert (entry.name, entry.size) == ("chain/seg.img", len(data)) and entry.tag
    assert store.read("chain/seg.img", 0, len(data) + 10) == data

    w = store.create("chain/other.img")
    w.write(b"x" * MiB)
    w.abort()
    assert [e.name for e in store.list()] == ["chain/seg.img"]


def test_reads_of_ranges(store: SftpStore) -> None:
    data = os.urandom(2 * MiB + 777)
    write(store, "f.bin", data)
    step = 255 << 10  # OpenSSH's largest read: ranges across it are assembled from several replies
    r = store.open("f.bin")
    try:
        for off, n in ((0, 1), (5, step), (step - 3, 10), (1000, MiB + 5), (len(data) - 10, 100), (len(data), 10),
                       (len(data) + 5, 10), (0, len(data) + 1), (17, 0)):  # fmt: skip
            assert r.pread(off, n) == data[off : off + n], (off, n)
            assert store.read("f.bin", off, n) == data[off : off + n], (off, n)
    finally:
        r.close()
    assert store.size("f.bin") == len(data) and store.exists("f.bin") and not store.exists("nope")
    for op in (lambda: store.read("nope", 0, 1), lambda: store.open("nope"), lambda: store.size("nope")):
        with pytest.raises(FileNotFoundError):
            op()
    assert store.bytes_read > 0


def test_list_is_recursive_and_sorted_like_a_local_folder(store: SftpStore, tmp_path: Path) -> None:
    local = LocalStore(str(tmp_path / "local"))
    local.make_root()
    names = ["b/z.img", "b/a.img", "a.json", "b/c/d.img", "Z/x", "b/c/e.img.tmp-0123abcd", "b/c2/f", "c.lock"]
    for i, n in enumerate(names):
        write(store, n, b"y" * i)
        write(local, n, b"y" * i)
    got = [(e.name, e.size) for e in store.list()]
    assert got == [(e.name, e.size) for e in local.list()]
    for prefix in ("b", "b/", "b/c", "Z"):
        assert [(e.name, e.size) for e in store.list(prefix)] == [(e.name, e.size) for e in local.list(prefix)]
    assert list(store.list("missing")) == [] and list(store.list("b/missing/deeper")) == []


def test_delete_rename_replace(store: SftpStore) -> None:
    store.delete("missing")  # fine
    write(store, "a/one", b"1")
    store.rename("a/one", "b/c/two")
    assert not store.exists("a/one") and store.read("b/c/two", 0, 10) == b"1"
    store.replace("b/c/two", b"second")
    store.replace("new/three", b"3")
    assert store.read("b/c/two", 0, 100) == b"second" and store.read("new/three", 0, 9) == b"3"
    store.delete("b/c/two")
    assert [e.name for e in store.list()] == ["new/three"]
    with pytest.raises(RepositoryError):
        store.rename("gone", "elsewhere")


def test_create_exclusive(store: SftpStore) -> None:
    assert store.create_exclusive("locks/x.lock", b"mine")
    assert not store.create_exclusive("locks/x.lock", b"theirs")
    assert store.read("locks/x.lock", 0, 100) == b"mine"
    assert [e.name for e in store.list()] == ["locks/x.lock"]  # no temporaries left behind


def race(stores: list[SftpStore], name: str) -> list[bytes]:
    """Every store (twice each: two threads) creates name exclusively at the same moment; the winners."""
    barrier, won = threading.Barrier(2 * len(stores)), []

    def take(s: SftpStore, me: bytes) -> None:
        barrier.wait()
        if s.create_exclusive(name, me):
            won.append(me)

    threads = [threading.Thread(target=take, args=(s, f"{i}".encode())) for i, s in enumerate(stores * 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won


def test_create_exclusive_race_has_one_winner(store: SftpStore) -> None:
    other = SftpStore(store.url)  # another connection, as another machine would have
    try:
        for round_ in range(4):
            won = race([store, other], f"locks/r{round_}.lock")
            assert len(won) == 1 and store.read(f"locks/r{round_}.lock", 0, 10) == won[0]
        assert [e.name for e in store.list()] == [f"locks/r{i}.lock" for i in range(4)]  # no temporaries left
    finally:
        other.close()


def test_a_server_without_openssh_extensions(store: SftpStore) -> None:
    """Plain SFTP v3: no hard links (create_exclusive falls back to O_EXCL), no posix-rename, no fsync, no
    limits (32 KiB requests)."""
    c = store._connection()
    c.extensions.clear()
    c.max_read = c.max_write = sftp_wire.DEFAULT_IO
    data = os.urandom(300_000)
    write(store, "a/f", data)
    store.replace("a/f", data[::-1])
    assert store.read("a/f", 0, len(data) + 1) == data[::-1]
    assert store.open("a/f").pread(1000, 100_000) == data[::-1][1000:101_000]
    assert store.create_exclusive("l", b"1") and not store.create_exclusive("l", b"2")
    won = race([store], "m")
    assert len(won) == 1 and store.read("m", 0, 9) == won[0]
    assert [e.name for e in store.list()] == ["l", "m", "a/f"]
    assert store._connection() is c  # all of it on the stripped connection


def test_patch_changes_bytes_and_tag(store: SftpStore) -> None:
    write(store, "p.img", bytes(100_000))
    [before] = list(store.list())
    store.patch("p.img", 70_000, b"\x01" * 40_000)  # within the same second as the write, most likely
    assert store.read("p.img", 0, 200_000) == bytes(70_000) + b"\x01" * 30_000 + b"\x01" * 10_000
    [after] = list(store.list())
    assert after.size == 110_000 and after.tag != before.tag
    assert store.filesystem() == ""


def test_many_threads_read_through_one_store(store: SftpStore) -> None:
    data = os.urandom(6 * MiB)
    write(store, "shared.bin", data)
    reader = store.open("shared.bin")
    errors: list[str] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(15):
            off, n = rng.randrange(len(data)), rng.choice((1, 4096, 300_000, MiB))
            got = reader.pread(off, n) if rng.random() < 0.5 else store.read("shared.bin", off, n)
            if got != data[off : off + n]:
                errors.append(f"{off}+{n}")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    reader.close()
    assert not errors


def test_writers_in_parallel_threads_share_one_store(store: SftpStore) -> None:
    datas = {f"w/{i}.img": os.urandom(MiB + i * 1000) for i in range(4)}

    def put(name: str) -> None:
        w = store.create(name)
        view = memoryview(datas[name])
        while view:
            view = view[w.write(view[:70_000]) :]
        w.commit()

    threads = [threading.Thread(target=put, args=(n,)) for n in datas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {e.name: e.size for e in store.list()} == {n: len(d) for n, d in datas.items()}
    assert all(store.read(n, 0, len(d)) == d for n, d in datas.items())


# -- where to connect: ~/.ssh/config, urls, default keys ----------------------------------------------------


def test_home_relative_url(env: SshServer) -> None:
    folder = f"t-{secrets.token_hex(4)}"
    s = new_store(env, f"sftp://{env.alias}/~/{folder}/repo")
    try:
        write(s, "x", b"at home")
        assert (env.home / folder / "repo" / "x").read_bytes() == b"at home"
    finally:
        s.close()
        shutil.rmtree(env.home / folder, ignore_errors=True)


def test_url_user_and_port_override_the_config(env: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = env.write_config(tmp_path / "config", port=free_port(), user="nobody-here")
    monkeypatch.setenv("IMAGECHAIN_SSH_CONFIG", str(cfg))
    with pytest.raises(RepositoryError):
        SftpStore(env.url("x")).root_exists()  # the config's port: nothing listens there
    s = new_store(env, f"sftp://{env.user}@{env.alias}:{env.port}{env.root}/t-{secrets.token_hex(4)}")
    assert s.root_exists()
    s.close()


def test_default_key_and_known_hosts_without_config(env: SshServer, monkeypatch: pytest.MonkeyPatch) -> None:
    dot = Path(os.environ["HOME"]) / ".ssh"
    dot.mkdir(mode=0o700)
    shutil.copy(env.key, dot / "id_ed25519")
    env.write_known_hosts(dot / "known_hosts")
    monkeypatch.setenv("IMAGECHAIN_SSH_CONFIG", str(dot / "no-such-config"))
    s = new_store(env, f"sftp://{env.user}@127.0.0.1:{env.port}{env.root}/t-{secrets.token_hex(4)}")
    assert s.root_exists()
    s.close()


# -- host keys and logins ----------------------------------------------------------------------------------


def test_unknown_host_key_is_refused_unless_accepted(env: SshServer, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    known = tmp_path / "known_hosts"
    monkeypatch.setenv("IMAGECHAIN_SSH_CONFIG", str(env.write_config(tmp_path / "config", known_hosts=known)))
    with pytest.raises(CredentialsError) as e:
        SftpStore(env.url("x")).root_exists()
    assert e.value.exit_code == 11
    fp = subprocess.run(["ssh-keygen", "-l", "-f", f"{env.base}/ssh_host_ed25519_key.pub"], capture_output=True,
                        text=True, check=True).stdout.split()[1]  # fmt: skip
    one_line(e.value, env.key_name, "ssh-ed25519", fp, "IMAGECHAIN_SSH_ACCEPT_NEW=1", "unknown")
    assert not known.exists()

    monkeypatch.setenv("IMAGECHAIN_SSH_ACCEPT_NEW", "1")
    s = new_store(env)
    s.close()
    assert known.read_text().split() == [env.key_name, *env.host_key_line.split()[:2]]
    monkeypatch.delenv("IMAGECHAIN_SSH_ACCEPT_NEW")
    s = new_store(env)  # known now
    s.close()
    assert len(known.read_text().splitlines()) == 1


def test_changed_host_key_is_always_refused(env: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    known = tmp_path / "known_hosts"
    env.write_known_hosts(known, keygen(tmp_path / "impostor"))
    monkeypatch.setenv("IMAGECHAIN_SSH_CONFIG", str(env.write_config(tmp_path / "config", known_hosts=known)))
    monkeypatch.setenv("IMAGECHAIN_SSH_ACCEPT_NEW", "1")
    with pytest.raises(CredentialsError) as e:
        SftpStore(env.url("x")).root_exists()
    one_line(e.value, env.key_name, "CHANGED", "man-in-the-middle", "ssh-keygen -R")
    assert len(known.read_text().splitlines()) == 1


def test_wrong_key_is_refused(env: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keygen(tmp_path / "wrong")
    monkeypatch.setenv("IMAGECHAIN_SSH_CONFIG", str(env.write_config(tmp_path / "config", identity=tmp_path / "wrong")))
    with pytest.raises(CredentialsError) as e:
        SftpStore(env.url("x")).root_exists()
    one_line(e.value, env.url("x"), env.user, str(tmp_path / "wrong"), "refused")


# -- failures ----------------------------------------------------------------------------------------------


def test_unreachable_port_fails_quickly(env: SshServer) -> None:
    port = free_port()
    t0 = time.monotonic()
    with pytest.raises(RepositoryError) as e:
        SftpStore(f"sftp://{env.alias}:{port}/srv/x").read("a", 0, 1)
    assert time.monotonic() - t0 < 5
    one_line(e.value, f"sftp://{env.alias}:{port}/srv/x", "127.0.0.1", "refused")


def test_permission_denied(env: SshServer) -> None:
    denied = env.base / f"root-only-{secrets.token_hex(3)}"
    denied.mkdir(mode=0o755)  # root's: the login user may look, not write
    s = SftpStore(f"sftp://{env.alias}{denied}")
    try:
        assert s.root_exists() and list(s.list()) == []
        for op in (lambda: s.create("a/b"), lambda: s.create("c"), lambda: s.create_exclusive("d", b"1"),
                   lambda: s.replace("e", b"2")):  # fmt: skip
            with pytest.raises(RepositoryError) as e:
                op()
            one_line(e.value, s.url, "permission denied")
        with pytest.raises(RepositoryError) as e:
            SftpStore(f"sftp://{env.alias}{denied}/sub").make_root()
        one_line(e.value, "permission denied")
    finally:
        s.close()


def test_reads_survive_a_dropped_connection(store: SftpStore, env: SshServer) -> None:
    data = os.urandom(4 * MiB)
    write(store, "d.bin", data)
    r = store.open("d.bin")
    assert r.pread(0, MiB) == data[:MiB]
    assert env.drop_connections() >= 1
    assert r.pread(MiB, 2 * MiB) == data[MiB : 3 * MiB]  # reconnected, file reopened
    assert env.drop_connections() >= 1
    assert store.read("d.bin", 5, 100) == data[5:105] and store.size("d.bin") == len(data)
    assert env.drop_connections() >= 1
    assert [e.name for e in store.list()] == ["d.bin"]
    r.close()


def test_a_write_cut_off_fails_and_publishes_nothing(store: SftpStore, env: SshServer) -> None:
    w = store.create("cut.img")
    w.write(os.urandom(2 * MiB))
    w.flush()
    assert env.drop_connections() >= 1
    with pytest.raises(RepositoryError) as e:
        for _ in range(64):
            w.write(os.urandom(MiB))
        w.commit()
    one_line(e.value, "cut.img", store.url, "nothing was published")
    w.abort()  # quiet, and removes the temporary through a new connection
    assert [e.name for e in store.list()] == []


def test_server_down_then_back(store: SftpStore, env: SshServer) -> None:
    write(store, "f", b"data")
    env.stop()
    try:
        t0 = time.monotonic()
        with pytest.raises(RepositoryError) as e:
            store.read("f", 0, 4)
        assert time.monotonic() - t0 < 5
        one_line(e.value, store.url, "refused")
        with pytest.raises(RepositoryError):
            store.create("g")
    finally:
        env.start()
    assert store.read("f", 0, 4) == b"data"


def test_full_disk_is_no_space(env: SshServer) -> None:
    mnt = env.base / f"small-{secrets.token_hex(3)}"
    mnt.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=1m,uid={env.uid},mode=0755", "tmpfs", str(mnt)],
                       capture_output=True, text=True, check=False)  # fmt: skip
    if p.returncode:
        pytest.skip(f"cannot mount a small tmpfs: {p.stderr.strip()}")
    try:
        s = SftpStore(f"sftp://{env.alias}{mnt}")
        w = s.create("big.img")
        with pytest.raises(NoSpaceError) as e:
            w.write(os.urandom(3 * MiB))
            w.commit()
        assert e.value.exit_code == 10 and "\n" not in str(e.value) and s.url in str(e.value)
        w.abort()
        assert list(s.list()) == []
        s.close()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)
