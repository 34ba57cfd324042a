"""The S3 store against a real S3-protocol server process (moto_server): what a writer publishes and when,
reads, listings, the lock primitives under races, patching, and every failure as one line of the project's
own errors (missing bucket, refused credentials, no permission, an unreachable or vanishing endpoint)."""

from __future__ import annotations

import base64
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import crc32c
import pytest

from imagechain.errors import CredentialsError, NoSpaceError, RepositoryError
from imagechain.repository import Repository
from imagechain.stores import s3 as s3mod
from imagechain.stores.s3 import S3Store, parse_url

from . import s3server
from .s3server import MotoServer, aws_env, client, free_port, moto_server, new_bucket

s3_server = s3server.s3_server  # the session's server (fixture)
s3_bucket = s3server.s3_bucket  # a fresh bucket on it, the AWS environment pointing there (fixture)

MiB = 1 << 20
pytestmark = pytest.mark.timeout(120)


def data_of(n: int, seed: int = 1) -> bytes:
    """Incompressible-looking bytes that differ at every offset (a misplaced range cannot go unnoticed)."""
    return bytes((i * 7 + seed + (i >> 13)) & 0xFF for i in range(n))


def big(n: int) -> bytes:
    return os.urandom(n)


@pytest.fixture
def store(s3_bucket: str) -> S3Store:
    return S3Store(f"s3://{s3_bucket}/repo")


def uploads(endpoint: str, bucket: str) -> list[str]:
    return sorted(u["Key"] for u in client(endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def one_line(e: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(e.value)
    assert "\n" not in text and "Traceback" not in text
    return text


# -- urls --------------------------------------------------------------------------------------------


def test_url_parsing() -> None:
    assert parse_url("s3://bkt") == ("bkt", "")
    assert parse_url("s3://bkt/") == ("bkt", "")
    assert parse_url("S3://bkt//a/b/") == ("bkt", "a/b")
    for bad in ("http://bkt/x", "s3:///x", "s3://bkt/a/../b", "s3://bkt/x?y=1", "s3://b k t/x"):
        with pytest.raises(Exception, match=r"S3|bucket|not allowed"):
            parse_url(bad)
    assert S3Store("s3://bkt//a/b/").url == "s3://bkt/a/b"
    assert S3Store("s3://bkt").filesystem() == ""


# -- writing -----------------------------------------------------------------------------------------


def test_small_file_is_one_put_visible_at_commit(store: S3Store, s3_server: MotoServer) -> None:
    w = store.create("a/b.bin")
    assert w.write(b"hello ") == 6 and w.write(memoryview(b"world")) == 5
    w.flush()
    assert w.tell() == 11 and w.read_back(0, 5) is None
    assert list(store.list()) == [] and not store.exists("a/b.bin")
    assert uploads(s3_server.endpoint, store.bucket) == []  # below one part: no multipart upload at all
    w.commit()
    assert store.read("a/b.bin", 0, 100) == b"hello world"
    assert [(e.name, e.size) for e in store.list()] == [("a/b.bin", 11)]
    head = client(s3_server.endpoint).head_object(Bucket=store.bucket, Key="repo/a/b.bin", ChecksumMode="ENABLED")
    assert head["ChecksumCRC32C"] == base64.b64encode(crc32c.crc32c(b"hello world").to_bytes(4, "big")).decode()


def test_empty_file(store: S3Store) -> None:
    w = store.create("empty")
    w.commit()
    assert store.size("empty") == 0 and store.read("empty", 0, 10) == b""
    assert store.open("empty").pread(0, 10) == b""


def test_multipart_parallel_parts_visible_only_at_commit(store: S3Store, s3_server: MotoServer,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("IMAGECHAIN_S3_PART_SIZE", str(5 * MiB))
    store = S3Store(store.url)
    data = big(23 * MiB + 12345)
    in_flight, peak = [0], [0]
    lock = threading.Lock()
    real = store._upload_part

    def counting(*a: object) -> dict[str, object]:
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        try:
            time.sleep(0.2)  # long enough that parts overlap
            return real(*a)  # type: ignore[arg-type]
        finally:
            with lock:
                in_flight[0] -= 1

    monkeypatch.setattr(store, "_upload_part", counting)
    w = store.create("big.bin")
    view = memoryview(data)
    for i in range(0, len(data), 3 * MiB + 17):  # writes straddling part boundaries
        assert w.write(view[i : i + 3 * MiB + 17]) == len(view[i : i + 3 * MiB + 17])
    assert w.tell() == len(data)
    assert list(store.list()) == [] and not store.exists("big.bin")
    assert uploads(s3_server.endpoint, store.bucket) == ["repo/big.bin"]
    w.commit()
    assert 2 <= peak[0] <= store.workers
    assert uploads(s3_server.endpoint, store.bucket) == []
    assert store.size("big.bin") == len(data)
    assert store.read("big.bin", 0, len(data)) == data


def test_write_is_short_at_the_part_limit(store: S3Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGECHAIN_S3_PART_SIZE", str(5 * MiB))
    monkeypatch.setattr(s3mod, "MAX_PARTS", 2)  # 10 000 parts of 16 MiB on S3: 156 GiB per file
    store = S3Store(store.url)
    data = big(12 * MiB)
    w = store.create("full.bin")
    assert w.write(data) == 10 * MiB and w.write(b"more") == 0  # the caller goes on in a new segment
    w.commit()
    assert store.read("full.bin", 0, 12 * MiB) == data[: 10 * MiB]


def test_abort_publishes_nothing_and_aborts_the_upload(store: S3Store, s3_server: MotoServer,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("IMAGECHAIN_S3_PART_SIZE", str(5 * MiB))
    store = S3Store(store.url)
    w = store.create("x.bin")
    w.write(big(11 * MiB))
    assert uploads(s3_server.endpoint, store.bucket) == ["repo/x.bin"]
    w.abort()
    w.abort()  # twice is fine
    assert uploads(s3_server.endpoint, store.bucket) == []
    assert list(store.list()) == []
    small = store.create("y.bin")
    small.write(b"abc")
    small.abort()
    assert list(store.list()) == []


def test_cleanup_uploads_aborts_stale_ones(store: S3Store, s3_server: MotoServer,
                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setenv("IMAGECHAIN_S3_PART_SIZE", str(5 * MiB))
    store = S3Store(store.url)
    w = store.create("died.bin")  # a writer that never commits nor aborts (its process was killed)
    w.write(big(6 * MiB))
    other = client(s3_server.endpoint).create_multipart_upload(Bucket=store.bucket, Key="elsewhere/x")
    # moto dates every upload 2010-11-10T20:48:33Z: a threshold reaching further back spares it
    moto_age = (datetime.now(UTC) - datetime(2010, 11, 10, 20, 48, 33, tzinfo=UTC)).total_seconds()
    assert store.cleanup_uploads(older_than_s=moto_age + 3600) == 0
    assert uploads(s3_server.endpoint, store.bucket) == ["elsewhere/x", "repo/died.bin"]
    assert store.cleanup_uploads() == 1  # only below the store's prefix
    assert uploads(s3_server.endpoint, store.bucket) == ["elsewhere/x"]
    assert list(store.list()) == []
    client(s3_server.endpoint).abort_multipart_upload(Bucket=store.bucket, Key="elsewhere/x",
                                                      UploadId=other["UploadId"])  # fmt: skip
    w.abort()  # joins its threads; its upload is gone already: no error


def test_abort_uploads_below_a_folder(store: S3Store, s3_server: MotoServer) -> None:
    c = client(s3_server.endpoint)
    for key in ("repo/h/c1/a", "repo/h/c1/b", "repo/h/c10/a", "repo/x"):
        c.create_multipart_upload(Bucket=store.bucket, Key=key)
    assert store.abort_uploads("h/c1") == 2  # not h/c10: a prefix is a folder
    assert uploads(s3_server.endpoint, store.bucket) == ["repo/h/c10/a", "repo/x"]
    assert store.abort_uploads("") == 2 and uploads(s3_server.endpoint, store.bucket) == []


# -- reading -----------------------------------------------------------------------------------------


def test_ranged_reads(store: S3Store) -> None:
    data = data_of(10_000)
    store.replace("f", data)
    assert store.read("f", 0, 10) == data[:10]
    assert store.read("f", 9_990, 100) == data[9_990:]  # fewer only at the end
    assert store.read("f", 10_000, 5) == b"" and store.read("f", 20_000, 5) == b""
    assert store.read("f", 5, 0) == b""
    r = store.open("f")
    assert r.pread(1234, 4321) == data[1234:5555]
    assert r.pread(9_999, 10) == data[9_999:] and r.pread(10_000, 10) == b""
    r.close()
    assert store.size("f") == 10_000 and store.exists("f") and not store.exists("g")
    for call in (lambda: store.read("g", 0, 1), lambda: store.size("g"), lambda: store.open("g")):
        with pytest.raises(FileNotFoundError):
            call()


def test_open_reader_refuses_a_replaced_object(store: S3Store) -> None:
    store.replace("f", b"one" * 100)
    r = store.open("f")
    store.replace("f", b"two" * 100)
    with pytest.raises(FileNotFoundError, match="replaced"):
        r.pread(0, 3)


def test_concurrent_readers(store: S3Store) -> None:
    data = big(3 * MiB)
    store.replace("f", data)
    r = store.open("f")

    def check(i: int) -> None:
        off = (i * 104_729) % len(data)
        length = 1 + (i * 7919) % (256 << 10)
        assert r.pread(off, length) == data[off : off + length]
        assert store.read("f", off, length) == data[off : off + length]

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(check, range(64)))
    assert store.bytes_read >= 64


def test_list_recursive_sorted_with_prefix_boundary(s3_bucket: str, s3_server: MotoServer) -> None:
    store, beside = S3Store(f"s3://{s3_bucket}/repo"), S3Store(f"s3://{s3_bucket}/repo2")
    for name, size in (("b/x", 3), ("a", 1), ("b/c/d", 5), ("bb", 2)):
        store.replace(name, b"z" * size)
    beside.replace("other", b"q")
    client(s3_server.endpoint).put_object(Bucket=s3_bucket, Key="repo/folder/", Body=b"")  # a console's folder marker
    assert [(e.name, e.size) for e in store.list()] == [("a", 1), ("b/c/d", 5), ("b/x", 3), ("bb", 2)]
    assert all(e.tag for e in store.list())
    assert [e.name for e in store.list("b")] == ["b/c/d", "b/x"]
    assert [e.name for e in store.list("b/")] == ["b/c/d", "b/x"]
    assert list(store.list("missing")) == [] and list(store.list("a")) == []
    assert [e.name for e in beside.list()] == ["other"]
    whole = S3Store(f"s3://{s3_bucket}")
    assert [e.name for e in whole.list()] == ["repo/a", "repo/b/c/d", "repo/b/x", "repo/bb", "repo2/other"]


def test_delete_rename_replace(store: S3Store, monkeypatch: pytest.MonkeyPatch) -> None:
    store.replace("f", b"1")
    store.replace("f", b"22")
    assert store.read("f", 0, 10) == b"22"
    store.rename("f", "sub/g")
    assert not store.exists("f") and store.read("sub/g", 0, 10) == b"22"
    with pytest.raises(RepositoryError, match="does not exist"):
        store.rename("f", "h")
    store.delete("sub/g")
    store.delete("sub/g")  # missing is fine
    assert list(store.list()) == []
    monkeypatch.setattr(s3mod, "COPY_MAX", 4 * MiB)  # take the part-by-part copy of objects beyond 5 GiB
    monkeypatch.setattr(s3mod, "COPY_PART", 5 * MiB)
    data = big(12 * MiB + 3)
    store.replace("large", data)
    store.rename("large", "retired/large")
    assert store.read("retired/large", 0, len(data)) == data and not store.exists("large")


# -- locks -------------------------------------------------------------------------------------------


def test_create_exclusive(store: S3Store) -> None:
    assert store.create_exclusive("locks/x.lock", b"mine")
    assert not store.create_exclusive("locks/x.lock", b"theirs")
    assert store.read("locks/x.lock", 0, 100) == b"mine"
    assert not store.create_exclusive("locks/x.lock", b"mine")  # the same bytes are not the same writer


def test_create_exclusive_retry_meeting_its_own_object(store: S3Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first attempt succeeds but its answer is lost; botocore's retry then meets PreconditionFailed."""
    real = store._call

    def lost_answer(op: str, *a: Any, **kw: Any) -> Any:
        if op == "put_object" and kw.get("IfNoneMatch"):
            real(op, *a, **kw)
        return real(op, *a, **kw)

    monkeypatch.setattr(store, "_call", lost_answer)
    assert store.create_exclusive("locks/y.lock", b"mine")
    assert not store.create_exclusive("locks/y.lock", b"mine")


def test_create_exclusive_race_has_one_winner(store: S3Store) -> None:
    rounds, racers = 30, 6
    for i in range(rounds):
        barrier = threading.Barrier(racers)

        def race(n: int, i: int = i, barrier: threading.Barrier = barrier) -> bool:
            barrier.wait()
            return store.create_exclusive(f"locks/r{i}.lock", f"racer {n}".encode())

        with ThreadPoolExecutor(racers) as pool:
            won = list(pool.map(race, range(racers)))
        assert won.count(True) == 1, (i, won)
        assert store.read(f"locks/r{i}.lock", 0, 100) == f"racer {won.index(True)}".encode()


# -- patch -------------------------------------------------------------------------------------------


def test_patch_small_object_rewritten(store: S3Store) -> None:
    data = bytearray(data_of(4096))
    store.replace("p", bytes(data))
    store.patch("p", 100, b"X" * 10)
    data[100:110] = b"X" * 10
    store.patch("p", 4090, b"Y" * 10)  # growing at the end is allowed (as pwrite does)
    data[4090:] = b"Y" * 10
    assert store.read("p", 0, 10_000) == bytes(data)
    with pytest.raises(RepositoryError, match="past its end"):
        store.patch("p", 5000, b"Z")
    with pytest.raises(RepositoryError, match="does not exist"):
        store.patch("nope", 0, b"Z")


@pytest.mark.parametrize("offset", [100, 7 * MiB, 12 * MiB - 8, 12 * MiB - 3])
def test_patch_large_object_by_part_copies(store: S3Store, monkeypatch: pytest.MonkeyPatch, offset: int) -> None:
    monkeypatch.setattr(s3mod, "PATCH_REWRITE_MAX", 1 * MiB)
    monkeypatch.setattr(s3mod, "COPY_PART", 5 * MiB)  # several copied parts on either side
    data = bytearray(big(12 * MiB))
    store.replace("seg", bytes(data))
    sent = []
    real = store._upload_part

    def spy(name: str, key: str, upload_id: str, number: int, part: bytes) -> dict[str, object]:
        sent.append(len(part))
        return real(name, key, upload_id, number, part)

    monkeypatch.setattr(store, "_upload_part", spy)
    store.patch("seg", offset, b"K" * 8)
    data[offset : offset + 8] = b"K" * 8
    assert store.size("seg") == len(data)
    assert store.read("seg", 0, len(data)) == bytes(data)
    assert len(sent) == 1 and sent[0] <= 5 * MiB + 8  # only one part of new bytes went over the network


# -- failures ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "status", "kind", "text"), [
    ("NoSuchKey", 404, FileNotFoundError, "No such file"),
    ("NoSuchBucket", 404, RepositoryError, "bucket not found: bkt"),
    ("AccessDenied", 403, RepositoryError, "permission denied: cannot write s3://bkt/p/f"),
    ("ExpiredToken", 400, CredentialsError, "S3 credentials refused"),
    ("EntityTooLarge", 400, NoSpaceError, "repository full while writing s3://bkt/p/f"),
    ("QuotaExceeded", 403, NoSpaceError, "repository full"),
    ("SlowDown", 503, RepositoryError, "SlowDown: Please reduce your request rate. .after 5 attempts"),
    ("", 500, RepositoryError, "cannot write s3://bkt/p/f: 500"),
])  # fmt: skip
def test_error_mapping(code: str, status: int, kind: type[Exception], text: str) -> None:
    """Codes moto never answers (quotas, expired tokens, throttling) map like the ones the tests provoke."""
    from botocore.exceptions import ClientError

    store = S3Store("s3://bkt/p")
    msg = "Please reduce\nyour request rate." if code == "SlowDown" else "x"
    err = ClientError({"Error": {"Code": code, "Message": msg}, "ResponseMetadata": {"HTTPStatusCode": status}},
                      "PutObject")  # fmt: skip
    with pytest.raises(kind, match=text) as e:
        store._raise(err, "put_object", "f")
    one_line(e)


def test_missing_bucket(s3_server: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    aws_env(monkeypatch, tmp_path, s3_server.endpoint)
    store = S3Store("s3://ic-no-such-bucket/repo")
    assert not store.bucket_exists() and not store.root_exists()
    with pytest.raises(RepositoryError, match="bucket not found: ic-no-such-bucket") as e:
        Repository.open("s3://ic-no-such-bucket/repo")  # the line Store.missing_root gives
    assert "s3://ic-no-such-bucket/repo" in one_line(e)
    for call in (lambda: list(store.list()), lambda: store.replace("x", b"1"), lambda: store.read("x", 0, 1)):
        with pytest.raises(RepositoryError, match="bucket not found") as e:
            call()
        one_line(e)
    store.make_root()  # imagechain init makes the bucket
    store.make_root()  # and finds it made
    assert store.bucket_exists() and list(store.list()) == []
    assert not store.root_exists()  # an empty prefix is no folder on S3...
    store.replace("imagechain.json", b"{}")
    assert store.root_exists() and S3Store("s3://ic-no-such-bucket").root_exists()  # ...a bucket always is


def operations(store: S3Store) -> list[Callable[[], object]]:
    """A listing, a write, a HEAD (whose refusals carry no reason) and the bucket probe."""
    return [
        store.bucket_exists,
        lambda: list(store.list()),
        lambda: store.replace("x", b"1"),
        lambda: store.exists("x"),
    ]


def test_refused_credentials_and_permissions(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with moto_server({"INITIAL_NO_AUTH_ACTION_COUNT": "3"}) as server:  # the first three requests are free
        iam = client(server.endpoint, service="iam")
        iam.create_user(UserName="nobody")
        key = iam.create_access_key(UserName="nobody")["AccessKey"]
        bucket = new_bucket(server.endpoint)
        url = f"s3://{bucket}/repo"
        cases: list[tuple[str, str, type[Exception], str]] = [
            ("AKIAUNKNOWN", "x", CredentialsError, "InvalidAccessKeyId"),
            (key["AccessKeyId"], "wrong", CredentialsError, "SignatureDoesNotMatch"),
            (key["AccessKeyId"], key["SecretAccessKey"], RepositoryError, "permission denied"),  # no policy
        ]
        for access, secret, kind, what in cases:
            aws_env(monkeypatch, tmp_path, server.endpoint, access, secret)
            for op in operations(S3Store(url)):
                with pytest.raises(kind, match=what) as e:
                    op()
                assert url in one_line(e) and e.value.exit_code == (11 if kind is CredentialsError else 4)


def test_no_credentials(s3_bucket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(CredentialsError, match="no usable S3 credentials for s3://") as e:
        S3Store(f"s3://{s3_bucket}").replace("x", b"1")
    one_line(e)


def test_unreachable_endpoint_fails_fast(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    aws_env(monkeypatch, tmp_path, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("IMAGECHAIN_S3_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("IMAGECHAIN_S3_CONNECT_TIMEOUT", "2")
    store = S3Store("s3://bkt/repo")
    t0 = time.monotonic()
    for call in (lambda: store.read("x", 0, 1), lambda: list(store.list()), store.bucket_exists):
        with pytest.raises(RepositoryError, match=r"cannot reach http://127\.0\.0\.1") as e:
            call()
        assert "s3://bkt/repo" in one_line(e)
    assert time.monotonic() - t0 < 10


def test_server_gone_mid_upload(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with moto_server() as server:
        aws_env(monkeypatch, tmp_path, server.endpoint)
        monkeypatch.setenv("IMAGECHAIN_S3_MAX_ATTEMPTS", "2")
        monkeypatch.setenv("IMAGECHAIN_S3_CONNECT_TIMEOUT", "1")
        monkeypatch.setenv("IMAGECHAIN_S3_READ_TIMEOUT", "3")
        monkeypatch.setenv("IMAGECHAIN_S3_PART_SIZE", str(5 * MiB))
        store = S3Store(f"s3://{new_bucket(server.endpoint)}/repo")
        w = store.create("cut.bin")
        w.write(big(11 * MiB))  # two parts on their way
        server.kill()
        t0 = time.monotonic()
        with pytest.raises(RepositoryError, match="cannot reach") as e:
            for _ in range(8):
                w.write(big(5 * MiB))
            w.commit()
        assert "s3://" in one_line(e)
        w.abort()  # the server is gone: abort still returns quietly
        assert time.monotonic() - t0 < 30
