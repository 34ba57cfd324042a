"""Remote repositories end to end, through the CLI a user runs, against a real OpenSSH sshd and a real
S3-protocol server on loopback: the remote-site scenario (a full backup made locally, its files carried
to the remote repository by a tool that knows nothing of imagechain, the chain continued there, every
point restored bit for bit), replication between every kind of store, and what goes wrong (unreachable,
refused, missing, locked, cut off mid-upload): one line, its exit code, nothing published or damaged."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import error_lines, exe, write_volume
from .s3server import aws_env, client, moto_server, new_bucket
from .sshd import SshServer

MiB = 1 << 20


def ic(*args: object, timeout: float = 300, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([exe(), *map(str, args)], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          timeout=timeout, **kw)  # fmt: skip


def ok(*args: object) -> subprocess.CompletedProcess[str]:
    r = ic(*args)
    assert r.returncode == 0, (args, r.stderr)
    return r


def one_line(r: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    lines = error_lines(r.stderr)
    assert r.returncode == code, (r.returncode, r.stderr)
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def sftp_env(sshd_server: SshServer, monkeypatch: pytest.MonkeyPatch) -> SshServer:
    monkeypatch.setenv("IMAGECHAIN_SSH_CONFIG", str(sshd_server.config))
    return sshd_server


def sftp_folder(srv: SshServer) -> tuple[str, Path]:
    """A new repository location on the SSH server: (url, the same folder seen from this machine)."""
    name = f"repo-{secrets.token_hex(4)}"
    return srv.url(name), srv.root / name


def change(vol: Path, data: bytearray, seed: int, pieces: int = 6) -> str:
    import random

    rng = random.Random(seed)
    for _ in range(pieces):
        at = rng.randrange(len(data) - 100_000)
        data[at : at + 100_000] = os.urandom(100_000)
    vol.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def upload_s3(local: Path, bucket: str, prefix: str) -> None:
    """The files of a local folder put into a bucket by plain S3 calls (as `aws s3 cp --recursive` would)."""
    c = client(os.environ["AWS_ENDPOINT_URL"])
    for f in sorted(local.rglob("*")):
        if f.is_file():
            c.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(local).as_posix()}")


def copy_sftp(local: Path, srv: SshServer, folder: Path) -> None:
    """The files of a local folder copied by OpenSSH's own scp client (it knows nothing of imagechain)."""
    subprocess.run(["scp", "-q", "-r", "-F", str(srv.config), "-o", "BatchMode=yes", str(local),
                    f"{srv.alias}:{folder}"], check=True, capture_output=True, timeout=120)  # fmt: skip


def restore_all(url: str, states: dict[int, str], tmp_path: Path) -> None:
    listed = json.loads(ok("list", url, "--json").stdout)
    seqs = sorted(p["sequence"] for chain in listed["chains"] for p in chain)
    assert seqs == sorted(states), (seqs, sorted(states))
    for seq in seqs:
        out = tmp_path / f"restored-{seq}.img"
        ok("restore", f"{url}::default@{seq}", out)
        assert hashlib.sha256(out.read_bytes()).hexdigest() == states[seq], seq
        out.unlink()


@pytest.mark.parametrize("kind", ["sftp", "s3"])
def test_a_chain_started_locally_continues_at_the_remote_site(kind: str, tmp_path: Path,
                                                             request: pytest.FixtureRequest) -> None:  # fmt: skip
    vol, local = tmp_path / "vol.img", tmp_path / "usb-disk"
    data = bytearray(write_volume(vol, 32 * MiB, seed=21, zero_fraction=0.2))
    states = {0: hashlib.sha256(data).hexdigest()}
    ok("backup", vol, local, "--init")
    if kind == "sftp":
        srv = request.getfixturevalue("sftp_env")
        url, there = sftp_folder(srv)
        copy_sftp(local, srv, there)
    else:
        bucket = request.getfixturevalue("s3_bucket")
        url = f"s3://{bucket}/site-b"
        upload_s3(local, bucket, "site-b")
    chain_bytes = sum(f.stat().st_size for f in local.rglob("*.icimg"))
    for seq in (1, 2):
        states[seq] = change(vol, data, seq)
        r = json.loads(ok("backup", vol, url, "--json").stdout)
        assert r["kind"] == "incremental" and r["sequence"] == seq
        # CBC against the chain's latest point without downloading payloads: headers, footers and indexes
        downloaded = r["repository_read_bytes"]
        print(f"{kind} incremental {seq}: downloaded {downloaded} bytes of a {chain_bytes}-byte chain "
              f"({100 * downloaded / chain_bytes:.3f}%)")
        assert 0 < downloaded < chain_bytes / 100
        chain_bytes += r["stored_bytes"]
    restore_all(url, states, tmp_path)
    assert "0 problems" in ok("verify", url).stdout or json.loads(ok("verify", url, "--json").stdout)["ok"]
    # without the block-map cache (another machine continuing the chain): the indexes, still no payloads
    states[3] = change(vol, data, 3)
    os.environ["IMAGECHAIN_CACHE"] = str(tmp_path / "other-machine-cache")
    try:
        r = json.loads(ok("backup", vol, url, "--json").stdout)
    finally:
        os.environ["IMAGECHAIN_CACHE"] = str(tmp_path / "_cache")
    print(f"{kind} incremental without the map cache: downloaded {r['repository_read_bytes']} bytes")
    assert r["repository_read_bytes"] < chain_bytes / 100
    restore_all(url, states, tmp_path)


def test_replicate_between_every_kind_of_store(tmp_path: Path, sftp_env: SshServer, s3_bucket: str) -> None:
    vol, first = tmp_path / "vol.img", tmp_path / "first"
    data = bytearray(write_volume(vol, 12 * MiB, seed=5))
    states = {0: hashlib.sha256(data).hexdigest()}
    ok("backup", vol, first, "--init")
    states[1] = change(vol, data, 1)
    ok("backup", vol, first)
    sftp_url, _there = sftp_folder(sftp_env)
    s3_url, last = f"s3://{s3_bucket}/replica", tmp_path / "last"
    hops = [(str(first), sftp_url), (sftp_url, s3_url), (s3_url, str(last)), (s3_url, f"file://{tmp_path}/viafile")]
    for src, dst in hops:
        r = json.loads(ok("replicate", src, dst, "--init", "--json").stdout)
        assert len(r["copied"]) == 2, (src, dst, r)
        again = json.loads(ok("replicate", src, dst, "--json").stdout)
        assert again["copied"] == [] and again["skipped"] == 2
    # the replica at the far end is a chain like any other: it continues and restores
    states[2] = change(vol, data, 2)
    ok("backup", vol, s3_url)
    r = json.loads(ok("replicate", s3_url, sftp_url, "--json").stdout)
    assert len(r["copied"]) == 1
    restore_all(sftp_url, states, tmp_path)
    restore_all(str(last), {k: v for k, v in states.items() if k < 2}, tmp_path)
    # what the source merges away, each replica retires in turn (a rename over SFTP, copy and delete on S3)
    ok("consolidate", f"{first}::default")
    for src, dst in [(str(first), sftp_url), (sftp_url, s3_url)]:
        r = json.loads(ok("replicate", src, dst, "--json").stdout)
        assert len(r["copied"]) == 1 and len(r["retired_files"]) == 2, (src, dst, r)
    restore_all(s3_url, {k: v for k, v in states.items() if k > 0}, tmp_path)  # @0 was merged into @1


# -- what goes wrong -------------------------------------------------------------------------------------


def test_sftp_failures_are_one_line_each(tmp_path: Path, sftp_env: SshServer) -> None:
    vol = tmp_path / "vol.img"
    write_volume(vol, 2 * MiB, seed=1)
    url, _there = sftp_folder(sftp_env)
    one_line(ic("list", url), 4, "repository not found", url)
    one_line(ic("list", "sftp://127.0.0.1:1/nowhere"), 4, "127.0.0.1")
    wrong = tmp_path / "wrong-key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong)], check=True)
    cfg = sftp_env.write_config(tmp_path / "wrong-config", identity=wrong)
    one_line(ic("backup", vol, url, "--init", env={**os.environ, "IMAGECHAIN_SSH_CONFIG": str(cfg)}), 11)
    unknown = sftp_env.write_config(tmp_path / "unknown-config", known_hosts=tmp_path / "empty-known-hosts")
    line = one_line(ic("list", url, env={**os.environ, "IMAGECHAIN_SSH_CONFIG": str(unknown)}), 11)
    assert "IMAGECHAIN_SSH_ACCEPT_NEW" in line
    denied = sftp_env.root.parent / f"root-only-{secrets.token_hex(3)}"
    denied.mkdir(mode=0o755)  # owned by root: the login user may not write there
    one_line(ic("init", f"sftp://{sftp_env.alias}{denied}/repo"), 4)
    assert not list(denied.iterdir())


def test_a_connection_cut_mid_upload_publishes_nothing(tmp_path: Path, sftp_env: SshServer) -> None:
    vol = tmp_path / "vol.img"
    data = bytearray(write_volume(vol, 8 * MiB, seed=2))
    url, there = sftp_folder(sftp_env)
    ok("backup", vol, url, "--init")
    before = sorted(p.relative_to(there).as_posix() for p in there.rglob("*.icimg"))
    states = {0: hashlib.sha256(data).hexdigest()}
    vol.write_bytes(os.urandom(len(data)))  # everything changed: a long upload
    p = subprocess.Popen([exe(), "backup", str(vol), url, "--max-write-rate", "2M"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 30
    while not list(there.rglob("*.tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(there.rglob("*.tmp-*")), "the upload never started"
    assert sftp_env.drop_connections() >= 1
    _out, err = p.communicate(timeout=60)
    assert p.returncode == 4 and len(error_lines(err)) == 1 and "Traceback" not in err, err
    assert sorted(q.relative_to(there).as_posix() for q in there.rglob("*.icimg")) == before
    vol.write_bytes(data)
    restore_all(url, states, tmp_path)
    ok("backup", vol, url)  # the next run clears the temporary and goes on
    assert not list(there.rglob("*.tmp-*"))


def test_s3_failures_are_one_line_each(tmp_path: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    vol = tmp_path / "vol.img"
    data = bytearray(write_volume(vol, 4 * MiB, seed=3))
    one_line(ic("list", f"s3://no-such-bucket-{secrets.token_hex(3)}/x"), 4, "bucket not found")
    one_line(ic("list", f"s3://{s3_bucket}/nothing-here"), 4, "repository not found")
    url = f"s3://{s3_bucket}/repo"
    ok("backup", vol, url, "--init")
    # a lock held by another machine: exit 9, nothing written
    from imagechain.repository import Repository

    repo = Repository.open(url)
    (p,) = repo.catalog().points.values()
    h = p.header
    name = repo.lock_name(h.host_id, h.source_id, "default")
    other = {"host": "beta", "machine": "other-machine", "boot_id": "b", "pidns": "x", "pid": 4321, "pid_start": "",
             "since": "2026-11-27T10:00:00+00:00", "what": "chain 'default'", "command": "imagechain backup",
             "refresh": 3, "refreshed_unix": time.time()}  # fmt: skip
    s3 = client(os.environ["AWS_ENDPOINT_URL"])
    s3.put_object(Bucket=s3_bucket, Key=f"repo/{name}", Body=json.dumps(other).encode())
    data[:1000] = os.urandom(1000)
    vol.write_bytes(data)
    one_line(ic("backup", vol, url), 9, "beta")
    assert len(Repository.open(url).catalog().points) == 1
    s3.delete_object(Bucket=s3_bucket, Key=f"repo/{name}")
    ok("backup", vol, url)
    # bad credentials: exit 11 (a server that checks them)
    with moto_server({"INITIAL_NO_AUTH_ACTION_COUNT": "0"}) as strict:
        monkeypatch.setenv("AWS_ENDPOINT_URL", strict.endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAREALKEY00000")
        one_line(ic("list", f"s3://{s3_bucket}/repo"), 11)


def test_s3_server_gone_mid_upload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    vol = tmp_path / "vol.img"
    vol.write_bytes(os.urandom(24 * MiB))
    with moto_server() as server:
        aws_env(monkeypatch, tmp_path, server.endpoint)
        monkeypatch.setenv("IMAGECHAIN_S3_MAX_ATTEMPTS", "2")
        bucket = new_bucket(server.endpoint)
        url = f"s3://{bucket}/repo"
        ok("init", url)
        p = subprocess.Popen([exe(), "backup", str(vol), url, "--max-write-rate", "4M"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)  # fmt: skip
        time.sleep(2.0)
        assert p.poll() is None, p.communicate()
        server.kill()
        _out, err = p.communicate(timeout=120)
        assert p.returncode == 4 and len(error_lines(err)) == 1 and "Traceback" not in err, err
        assert "127.0.0.1" in err or bucket in err


def test_stale_uploads_of_a_killed_writer_are_aborted_by_the_next_run(
        tmp_path: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("IMAGECHAIN_S3_PART_SIZE", str(5 * MiB))
    vol = tmp_path / "vol.img"
    vol.write_bytes(os.urandom(24 * MiB))
    url = f"s3://{s3_bucket}/repo"
    ok("init", url)
    p = subprocess.Popen([exe(), "backup", str(vol), url, "--max-write-rate", "4M"], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)  # fmt: skip
    s3 = client(os.environ["AWS_ENDPOINT_URL"])
    deadline = time.monotonic() + 30
    while not s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads"), "no multipart upload started"
    p.send_signal(signal.SIGKILL)
    p.wait()
    from imagechain.repository import Repository

    assert not Repository.open(url).catalog().points  # nothing published
    r = ic("backup", vol, url)
    assert r.returncode == 0 and "aborted 1 unfinished upload" in r.stderr, r.stderr
    assert not s3.list_multipart_uploads(Bucket=s3_bucket).get("Uploads")
    shutil.rmtree(tmp_path / "_cache", ignore_errors=True)


def test_a_reader_opened_before_a_consolidation_reads_on_from_retired(tmp_path: Path, s3_bucket: str) -> None:
    """On S3 an open file is no open file: once a consolidation moved it to retired/, the next ranged read
    of the old name fails, and the reader must find it there (as `restore` started before it would)."""
    from imagechain.address import open_point
    from imagechain.engine.consolidate import consolidate
    from imagechain.format.reader import PointReader
    from imagechain.repository import Repository

    vol = tmp_path / "vol.img"
    data = bytearray(write_volume(vol, 4 * MiB, seed=8))
    url = f"s3://{s3_bucket}/repo"
    ok("backup", vol, url, "--init")
    change(vol, data, 1)
    ok("backup", vol, url)
    repo = Repository.open(url)
    cat = repo.catalog()
    first = min(cat.points.values(), key=lambda p: p.header.sequence)
    with PointReader(repo.store, first) as r:
        head = r.read(0, 4096)  # opened now
        res = open_point(f"{url}::default")
        consolidate(res.repo, res.point, cat=res.catalog)
        assert first.point_id not in Repository.open(url).catalog().points
        assert r.read(0, 4096) == head and len(r.read(8192, 65536)) == 65536


def test_info_mount_and_export_read_a_remote_point(tmp_path: Path, s3_bucket: str) -> None:
    """Reading without restoring goes through the same addresses: `info`, a FUSE mount and a qcow2 export
    of a point that lives in S3."""
    from .conftest import need_root, need_tool
    from .test_mount import mounted

    need_root()
    need_tool("fusermount3", "qemu-img")
    vol = tmp_path / "vol.img"
    data = bytearray(write_volume(vol, 6 * MiB, seed=12))
    url = f"s3://{s3_bucket}/repo"
    ok("backup", vol, url, "--init")
    want = change(vol, data, 4)
    ok("backup", vol, url)
    info = json.loads(ok("info", f"{url}::default", "--json").stdout)
    assert info["sequence"] == 1 and info["kind"] == "incremental"
    with mounted(f"{url}::default", tmp_path / "mnt") as mnt:
        assert hashlib.sha256((mnt / "disk.img").read_bytes()).hexdigest() == want
    ok("export", f"{url}::default", tmp_path / "out.qcow2", "--format", "qcow2")
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(tmp_path / "out.qcow2"), str(tmp_path / "back.img")],
                   check=True)  # fmt: skip
    assert hashlib.sha256((tmp_path / "back.img").read_bytes()).hexdigest() == want
