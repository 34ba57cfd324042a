"""A repository in an S3 bucket (AWS, MinIO, Ceph RGW...): s3://bucket/prefix, name -> key prefix/name.

S3 objects appear whole and atomically at PutObject or CompleteMultipartUpload, so writers never make
temporaries: an open multipart upload plays that role, an interrupted one publishes nothing, and
`cleanup_uploads` aborts those left behind. Every upload carries a CRC32C for the server to check
(read_back is therefore None). Endpoint, region and credentials come from the usual AWS environment and
config files; a custom endpoint gets path-style addressing unless the config file chooses a style.
botocore is imported by the constructor only, so local repositories never pay for it."""

from __future__ import annotations

import base64
import contextlib
import errno
import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn
from urllib.parse import urlsplit

import crc32c

from ..errors import CredentialsError, ImagechainError, NoSpaceError, RepositoryError, UsageError
from ..sizes import env_number
from .base import AtomicWriter, RandomReader, Store, StoreEntry

MiB = 1 << 20
GiB = 1 << 30
PART_SIZE = 16 * MiB  # IMAGECHAIN_S3_PART_SIZE overrides it (bytes)
MIN_PART = 5 * MiB  # S3's smallest part, except the last
MAX_PART = 5 * GiB
MAX_PARTS = 10_000  # S3's most parts per upload: a writer's object holds at most MAX_PARTS x part size
UPLOAD_WORKERS = 4  # parts uploaded at once per writer; IMAGECHAIN_S3_UPLOAD_THREADS overrides it
MAX_ATTEMPTS = 5  # per request, botocore's standard retry mode; IMAGECHAIN_S3_MAX_ATTEMPTS overrides it
CONNECT_TIMEOUT = 10.0  # IMAGECHAIN_S3_CONNECT_TIMEOUT overrides it
READ_TIMEOUT = 60.0  # IMAGECHAIN_S3_READ_TIMEOUT overrides it
COPY_MAX = 5 * GiB  # the largest single CopyObject; larger objects are copied part by part
COPY_PART = 1 * GiB
PATCH_REWRITE_MAX = 32 * MiB  # patch rewrites objects up to this size whole, larger ones by part copies
STALE_UPLOAD = 24 * 3600.0
TOKEN_KEY = "imagechain-token"  # user metadata naming the create_exclusive call that made an object
CONFLICT_RETRIES = 4  # 409 ConditionalRequestConflict: another conditional write of the key is under way

_NOT_FOUND = frozenset({"NoSuchKey", "NotFound"})
_CREDENTIALS = frozenset({"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "ExpiredTokenException",
                          "InvalidToken", "TokenRefreshRequired", "InvalidClientTokenId"})  # fmt: skip
_DENIED = frozenset({"AccessDenied", "Forbidden", "AllAccessDisabled", "AccountProblem"})
_FULL = frozenset({"EntityTooLarge", "QuotaExceeded", "XMinioStorageFull", "XMinioAdminBucketQuotaExceeded"})
_BY_STATUS = {"403": "Forbidden", "404": "NotFound", "409": "Conflict", "412": "PreconditionFailed",
              "416": "InvalidRange"}  # fmt: skip  # HEAD answers carry no error code, only a status
_CREDENTIAL_ERRORS = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "ProfileNotFound",
                      "SSOError", "TokenRetrievalError", "NoAuthTokenError")  # fmt: skip
# what a failed operation could not do, for messages; anything else writes
_VERBS = {"get_object": "read", "head_object": "read", "list_objects_v2": "list", "delete_object": "delete",
          "copy_object": "copy", "upload_part_copy": "copy", "list_multipart_uploads": "list uploads in",
          "abort_multipart_upload": "abort the upload of", "create_bucket": "create the bucket of"}  # fmt: skip


def parse_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of s3://bucket/prefix; the prefix without empty components or edge slashes."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise UsageError(f"not an S3 url (s3://bucket/prefix): {url}")
    bucket = parts.netloc
    if not all(c.isalnum() or c in ".-_" for c in bucket):
        raise UsageError(f"invalid bucket name in {url}")
    comps = [c for c in parts.path.split("/") if c]
    if any(c in (".", "..") for c in comps):
        raise UsageError(f"'.' and '..' are not allowed in an S3 prefix: {url}")
    return bucket, "/".join(comps)


def _env_number(var: str, default: float, lo: float, hi: float) -> float:
    return env_number(var, default, lambda v: lo <= v <= hi, f"a number from {lo:g} to {hi:g}")


def _crc32c(data: bytes | bytearray) -> str:
    return base64.b64encode(crc32c.crc32c(data).to_bytes(4, "big")).decode()


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _aws_host(endpoint: str) -> bool:
    host = (urlsplit(endpoint).hostname or "").lower()
    return host.endswith((".amazonaws.com", ".amazonaws.com.cn", ".api.aws"))


def _split(start: int, end: int) -> list[tuple[int, int]]:
    """[start, end) as copy ranges of nearly equal size, none above COPY_PART and, when there are several,
    none below MIN_PART (S3's smallest part but the last)."""
    length = end - start
    if length <= 0:
        return []
    n = max(1, min(-(-length // COPY_PART), length // MIN_PART))
    cuts = [start + i * length // n for i in range(n + 1)]
    return list(itertools.pairwise(cuts))


class _Expected(Exception):
    """An S3 answer the caller handles itself (PreconditionFailed, InvalidRange...)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


@dataclass(frozen=True)
class _Copy:
    """A part made server-side from a range [start, end) of an existing object."""

    key: str
    etag: str
    start: int
    end: int


_Part = dict[str, Any]  # a CompleteMultipartUpload part: PartNumber, ETag, checksum
_Piece = bytes | _Copy


class _S3Writer(AtomicWriter):
    """Buffers one part at a time; full parts go to a small thread pool, at most `workers` in flight, so
    memory stays under (workers + 1) x part size. A file smaller than a part is one PutObject at commit."""

    def __init__(self, store: S3Store, name: str) -> None:
        self.name = name
        self._store = store
        self._key = store.key(name)
        self._part_size = store.part_size
        self._workers = store.workers
        self._buf = bytearray()
        self._pos = 0
        self._upload_id: str | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future[_Part]] = deque()
        self._parts: list[_Part] = []
        self._closed = False

    def write(self, data: bytes | memoryview) -> int:
        """Short only at S3's limit of MAX_PARTS parts (the caller goes on in a new segment)."""
        assert not self._closed, "write after commit or abort"
        view = memoryview(data).cast("B")
        view = view[: max(0, MAX_PARTS * self._part_size - self._pos)]
        done = 0
        while done < len(view):
            n = min(self._part_size - len(self._buf), len(view) - done)
            self._buf += view[done : done + n]
            done += n
            if len(self._buf) == self._part_size:
                self._ship()
        self._pos += done
        return done

    def _ship(self) -> None:
        part, self._buf = self._buf, bytearray()
        if self._upload_id is None:
            self._upload_id = self._store._start_upload(self.name, self._key)
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="s3-upload")
        while self._pending and (self._pending[0].done() or len(self._pending) >= self._workers):
            self._parts.append(self._pending.popleft().result())  # raises the first failed part's error
        number = len(self._parts) + len(self._pending) + 1
        assert self._pool is not None
        self._pending.append(self._pool.submit(self._store._upload_part, self.name, self._key, self._upload_id,
                                               number, part))  # fmt: skip

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        """Nothing to do: S3 keeps nothing durable before commit; parts are stored, but nothing can read
        them until CompleteMultipartUpload, and a failed commit means the whole file is written again."""

    def commit(self) -> None:
        assert not self._closed, "commit after commit or abort"
        if self._upload_id is None:
            self._store._put(self.name, self._buf)
        else:
            if self._buf:
                self._ship()
            while self._pending:
                self._parts.append(self._pending.popleft().result())
            self._store._complete(self.name, self._key, self._upload_id, self._parts)
        self._closed = True
        self._buf = bytearray()
        if self._pool is not None:
            self._pool.shutdown()

    def abort(self) -> None:
        """Waits for the parts in flight first: a part finishing after the abort would be stored again."""
        if self._closed:
            return
        self._closed = True
        self._buf = bytearray()
        for f in self._pending:
            f.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._pending.clear()
        if self._upload_id is not None:
            with contextlib.suppress(ImagechainError, OSError):
                self._store._call("abort_multipart_upload", self.name, Key=self._key, UploadId=self._upload_id)


class _S3Reader(RandomReader):
    """Ranged GETs pinned to the ETag seen at open: an object replaced meanwhile fails the read (as
    FileNotFoundError) instead of mixing two versions' bytes."""

    def __init__(self, store: S3Store, name: str, size: int, etag: str) -> None:
        self._store, self._name, self._size, self._etag = store, name, size, etag

    def pread(self, offset: int, length: int) -> bytes:
        length = min(length, self._size - offset)
        if length <= 0:
            return b""
        return self._store._get(self._name, offset, length, self._etag)

    def close(self) -> None:
        pass


class S3Store(Store):
    """An S3 bucket, or a folder-like prefix of one. One botocore client (thread-safe), made on first use."""

    remote = True

    def __init__(self, url: str) -> None:
        self.bucket, self.prefix = parse_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self._root = f"{self.prefix}/" if self.prefix else ""
        try:
            import botocore.config
            import botocore.exceptions
            import botocore.session
        except ImportError as e:
            raise UsageError(f"S3 repositories need boto3 ({url}): pip install boto3") from e
        self._bc = botocore
        x = botocore.exceptions
        self._boto_errors: tuple[type[Exception], ...] = (x.ClientError, x.BotoCoreError)
        self._net_errors: tuple[type[Exception], ...] = (x.HTTPClientError, x.ConnectionError, x.IncompleteReadError)
        self._cred_errors = tuple(getattr(x, n) for n in _CREDENTIAL_ERRORS if hasattr(x, n))
        self.part_size = int(_env_number("IMAGECHAIN_S3_PART_SIZE", PART_SIZE, MIN_PART, MAX_PART))
        self.workers = int(_env_number("IMAGECHAIN_S3_UPLOAD_THREADS", UPLOAD_WORKERS, 1, 64))
        self.attempts = int(_env_number("IMAGECHAIN_S3_MAX_ATTEMPTS", MAX_ATTEMPTS, 1, 100))
        self._timeouts = (_env_number("IMAGECHAIN_S3_CONNECT_TIMEOUT", CONNECT_TIMEOUT, 0.01, 3600),
                          _env_number("IMAGECHAIN_S3_READ_TIMEOUT", READ_TIMEOUT, 0.01, 3600))  # fmt: skip
        self._client_obj: Any = None
        self._client_lock = threading.Lock()

    # -- the client and its errors ------------------------------------------------------------------

    def _client(self) -> Any:
        if self._client_obj is not None:
            return self._client_obj
        with self._client_lock:
            if self._client_obj is None:
                self._client_obj = self._make_client()
            return self._client_obj

    def _make_client(self) -> Any:
        session = self._bc.session.Session()
        config = self._bc.config.Config(
            retries={"mode": "standard", "max_attempts": self.attempts},
            connect_timeout=self._timeouts[0], read_timeout=self._timeouts[1], tcp_keepalive=True,
            max_pool_connections=max(16, 2 * self.workers), user_agent_extra="imagechain")  # fmt: skip
        client = session.create_client("s3", config=config)
        s3_config = session.get_scoped_config().get("s3")
        chosen = isinstance(s3_config, dict) and s3_config.get("addressing_style")
        if not chosen and not _aws_host(client.meta.endpoint_url):  # MinIO, Ceph: bucket.host rarely resolves
            path_style = self._bc.config.Config(s3={"addressing_style": "path"})
            client = session.create_client("s3", config=config.merge(path_style))
        return client

    @property
    def endpoint(self) -> str:
        c = self._client_obj
        return str(c.meta.endpoint_url) if c is not None else "S3"

    def key(self, name: str) -> str:
        return self._root + name

    def _where(self, name: str | None) -> str:
        return f"{self.url}/{name}" if name else self.url

    def _call(self, op: str, name: str | None, expect: Collection[str] = (), **kw: Any) -> Any:
        """client.<op>(Bucket=..., **kw); errors become the project's, one line each; codes in expect
        are raised as _Expected for the caller to handle."""
        with self._mapped(op, name, expect):
            return getattr(self._client(), op)(Bucket=self.bucket, **kw)

    @contextlib.contextmanager
    def _mapped(self, op: str, name: str | None, expect: Collection[str] = ()) -> Iterator[None]:
        try:
            yield
        except self._boto_errors as e:
            code = self._code(e)
            if code in expect:
                raise _Expected(code) from e
            self._raise(e, op, name)

    def _code(self, e: Exception) -> str:
        response = getattr(e, "response", None)
        if not isinstance(response, dict):
            return ""
        code = response.get("Error", {}).get("Code") or response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return _BY_STATUS.get(str(code), str(code)) if code else ""

    def _raise(self, e: Exception, op: str, name: str | None) -> NoReturn:
        where, verb = self._where(name), _VERBS.get(op, "write")
        code = self._code(e)
        if code:
            msg = _one_line(getattr(e, "response", {}).get("Error", {}).get("Message") or "")
            detail = f"{code}: {msg}" if msg else code
            if code in _NOT_FOUND:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), where) from e
            if code == "NoSuchBucket":
                raise RepositoryError(f"bucket not found: {self.bucket} (for {self.url} at {self.endpoint})") from e
            if code in _CREDENTIALS:
                raise CredentialsError(f"S3 credentials refused by {self.endpoint} for {self.url}: {detail}") from e
            if code in _DENIED:
                raise RepositoryError(f"permission denied: cannot {verb} {where}: {detail}") from e
            if code in _FULL:
                raise NoSpaceError(f"repository full while writing {where}: {detail}") from e
            if code == "NoSuchUpload":
                raise RepositoryError(f"cannot {verb} {where}: its upload was aborted meanwhile ({detail})") from e
            tries = f" (after {self.attempts} attempts)" if code in ("SlowDown", "ServiceUnavailable") else ""
            raise RepositoryError(f"cannot {verb} {where}: {detail}{tries}") from e
        if isinstance(e, self._cred_errors):
            raise CredentialsError(f"no usable S3 credentials for {self.url}: {_one_line(e)}") from e
        if isinstance(e, self._net_errors):
            raise RepositoryError(f"cannot reach {self.endpoint} for {where} ({self.attempts} attempts): "
                                  f"{_one_line(e)}") from e  # fmt: skip
        raise RepositoryError(f"cannot {verb} {where}: {_one_line(e)}") from e

    # -- reading --------------------------------------------------------------------------------------

    def _head(self, name: str) -> tuple[int, str]:
        """(size, ETag). A HEAD refused with a bare 403 is asked again as a GET, whose answer says why
        (bad credentials or missing permission)."""
        try:
            r = self._call("head_object", name, expect=("Forbidden",), Key=self.key(name))
        except _Expected:
            with contextlib.suppress(_Expected):
                self._call("get_object", name, expect=("InvalidRange",), Key=self.key(name), Range="bytes=0-0")
            raise RepositoryError(f"permission denied: cannot read {self._where(name)}: 403 Forbidden") from None
        return int(r["ContentLength"]), str(r["ETag"])

    def _get(self, name: str, offset: int, length: int, etag: str | None = None) -> bytes:
        """One ranged GET; the body is fetched again when the connection breaks while it streams (botocore
        retries requests, not bodies)."""
        kw: dict[str, Any] = {"Key": self.key(name), "Range": f"bytes={offset}-{offset + length - 1}"}
        if etag:
            kw["IfMatch"] = etag
        for attempt in range(1, self.attempts + 1):
            try:
                r = self._call("get_object", name, expect=("InvalidRange", "PreconditionFailed"), **kw)
            except _Expected as e:
                if e.code == "InvalidRange":
                    return b""  # at or past the end
                raise FileNotFoundError(errno.ENOENT, "replaced since it was opened", self._where(name)) from None
            try:
                data = bytes(r["Body"].read())
            except self._net_errors as e:
                if attempt < self.attempts:
                    continue
                self._raise(e, "get_object", name)
            finally:
                r["Body"].close()
            if not r.get("ContentRange"):
                data = data[offset : offset + length]  # a server that ignored the Range
            return self.counted(data)
        raise AssertionError("unreachable")

    def open(self, name: str) -> RandomReader:
        size, etag = self._head(name)
        return _S3Reader(self, name, size, etag)

    def read(self, name: str, offset: int, length: int) -> bytes:
        return self._get(name, offset, length) if length > 0 else b""

    def size(self, name: str) -> int:
        return self._head(name)[0]

    def exists(self, name: str) -> bool:
        """False also when the bucket is missing (a HEAD cannot tell): see missing_root."""
        try:
            self._head(name)
        except FileNotFoundError:
            return False
        return True

    def list(self, prefix: str = "") -> Iterator[StoreEntry]:
        """The prefix is a folder: 'repo' lists repo/..., never repo2/...; folder markers are skipped."""
        folder = prefix.strip("/")
        base = self._root + (folder + "/" if folder else "")
        entries = []
        with self._mapped("list_objects_v2", prefix or None):
            for page in self._client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=base):
                for o in page.get("Contents", []):
                    if not o["Key"].endswith("/"):
                        entries.append(StoreEntry(o["Key"][len(self._root) :], int(o["Size"]), str(o["ETag"])))
        yield from sorted(entries, key=lambda e: e.name)

    def _probe(self) -> bool | None:
        """None when the bucket is missing, else whether anything lies below the prefix. Probed by listing
        (which the store needs anyway): unlike HEAD, a refusal then says why."""
        try:
            r = self._call("list_objects_v2", None, expect=("NoSuchBucket",), Prefix=self._root, MaxKeys=1)
        except _Expected:
            return None
        return bool(r.get("KeyCount") or r.get("Contents"))

    def bucket_exists(self) -> bool:
        return self._probe() is not None

    def root_exists(self) -> bool:
        """The bucket, and for a prefix at least one object below it (S3 has no empty folders)."""
        found = self._probe()
        return found is not None and (found or not self.prefix)

    def make_root(self) -> None:
        """Creates the bucket if missing (in the client's region on AWS; elsewhere where the server puts it);
        a prefix comes into being with its first object."""
        kw: dict[str, Any] = {}
        region = self._client().meta.region_name
        if region and region != "us-east-1" and _aws_host(self.endpoint):
            kw["CreateBucketConfiguration"] = {"LocationConstraint": region}
        with contextlib.suppress(_Expected):
            self._call("create_bucket", None, expect=("BucketAlreadyOwnedByYou",), **kw)

    def missing_root(self) -> str | None:
        if self.bucket_exists():
            return None
        return f"bucket not found: {self.bucket} (for {self.url} at {self.endpoint})"

    # -- writing --------------------------------------------------------------------------------------

    def create(self, name: str) -> AtomicWriter:
        return _S3Writer(self, name)

    def _put(self, name: str, data: bytes | bytearray, expect: Collection[str] = (), **kw: Any) -> None:
        self._call("put_object", name, expect, Key=self.key(name), Body=data, ChecksumAlgorithm="CRC32C",
                   ChecksumCRC32C=_crc32c(data), **kw)  # fmt: skip

    def _start_upload(self, name: str, key: str) -> str:
        return str(self._call("create_multipart_upload", name, Key=key, ChecksumAlgorithm="CRC32C")["UploadId"])

    def _upload_part(self, name: str, key: str, upload_id: str, number: int, data: bytes | bytearray) -> _Part:
        crc = _crc32c(data)
        r = self._call("upload_part", name, Key=key, UploadId=upload_id, PartNumber=number, Body=data,
                       ChecksumAlgorithm="CRC32C", ChecksumCRC32C=crc)  # fmt: skip
        return {"PartNumber": number, "ETag": r["ETag"], "ChecksumCRC32C": crc}

    def _copy_part(self, name: str, key: str, upload_id: str, number: int, src: _Copy) -> _Part:
        r = self._call("upload_part_copy", name, Key=key, UploadId=upload_id, PartNumber=number,
                       CopySource={"Bucket": self.bucket, "Key": src.key}, CopySourceIfMatch=src.etag,
                       CopySourceRange=f"bytes={src.start}-{src.end - 1}")["CopyPartResult"]  # fmt: skip
        part = {"PartNumber": number, "ETag": r["ETag"]}
        if r.get("ChecksumCRC32C"):
            part["ChecksumCRC32C"] = r["ChecksumCRC32C"]
        return part

    def _complete(self, name: str, key: str, upload_id: str, parts: Sequence[_Part]) -> None:
        parts = sorted(parts, key=lambda p: int(p["PartNumber"]))
        self._call("complete_multipart_upload", name, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})

    def _assemble(self, name: str, pieces: Sequence[_Piece]) -> None:
        """Publish name as the concatenation of pieces (new bytes, or ranges copied server-side) in one
        multipart upload: atomic, and nothing but the new bytes goes over the network."""
        key = self.key(name)
        upload_id = self._start_upload(name, key)
        try:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="s3-copy") as pool:
                futures = [pool.submit(self._piece, name, key, upload_id, i + 1, p) for i, p in enumerate(pieces)]
                parts = [f.result() for f in futures]
            self._complete(name, key, upload_id, parts)
        except BaseException:
            with contextlib.suppress(ImagechainError, OSError):
                self._call("abort_multipart_upload", name, Key=key, UploadId=upload_id)
            raise

    def _piece(self, name: str, key: str, upload_id: str, number: int, piece: _Piece) -> _Part:
        if isinstance(piece, _Copy):
            return self._copy_part(name, key, upload_id, number, piece)
        return self._upload_part(name, key, upload_id, number, piece)

    def delete(self, name: str) -> None:
        self._call("delete_object", name, Key=self.key(name))  # a missing key is no error on S3

    def rename(self, name: str, new_name: str) -> None:
        """A server-side copy (part by part beyond 5 GiB), then a delete: the new name appears atomically;
        a crash in between leaves both names, and renaming again finishes the job."""
        size, etag = self._existing(name, "rename")
        src = self.key(name)
        if size <= COPY_MAX:
            self._call("copy_object", new_name, Key=self.key(new_name), CopySourceIfMatch=etag,
                       CopySource={"Bucket": self.bucket, "Key": src})  # fmt: skip
        else:
            self._assemble(new_name, [_Copy(src, etag, a, b) for a, b in _split(0, size)])
        self.delete(name)

    def _existing(self, name: str, verb: str) -> tuple[int, str]:
        """(size, ETag) of a file an operation changes; missing, it is the repository's error (as locally)."""
        try:
            return self._head(name)
        except FileNotFoundError as e:
            raise RepositoryError(f"cannot {verb} {self._where(name)}: it does not exist") from e

    def create_exclusive(self, name: str, data: bytes) -> bool:
        """A conditional PutObject (If-None-Match: *) tagged with a token of this call: refused, it still
        counts as ours when the object bears our token (a retried request whose first attempt succeeded
        meets its own object). Equal content would not do: two racers may well send the same bytes."""
        token = os.urandom(16).hex()
        for attempt in range(CONFLICT_RETRIES):
            try:
                self._put(name, data, expect=("PreconditionFailed", "Conflict", "ConditionalRequestConflict"),
                          IfNoneMatch="*", Metadata={TOKEN_KEY: token})  # fmt: skip
                return True
            except _Expected as e:
                if e.code == "PreconditionFailed":
                    break
                time.sleep(0.05 * (attempt + 1))
        return self._token_of(name) == token

    def _token_of(self, name: str) -> str | None:
        try:
            r = self._call("head_object", name, expect=("NotFound",), Key=self.key(name))
        except _Expected:
            return None
        return str(r.get("Metadata", {}).get(TOKEN_KEY, "")) or None

    def replace(self, name: str, data: bytes) -> None:
        self._put(name, data)  # S3 replaces an object atomically

    def patch(self, name: str, offset: int, data: bytes) -> None:
        """S3 cannot write in place: a small object is rewritten whole; a larger one is rebuilt by a
        multipart upload of server-side copies around one part of new bytes (at least 5 MiB, S3's
        smallest part), so a key slot in a 100 GiB segment costs a 5 MiB upload. Both are atomic; reads
        pinned to the old ETag (open readers) fail rather than mix versions."""
        size, etag = self._existing(name, "patch")
        if offset > size:
            raise RepositoryError(f"cannot patch {self._where(name)}: offset {offset} is past its end ({size})")
        end = offset + len(data)
        new_size = max(size, end)
        if new_size <= PATCH_REWRITE_MAX:
            self._put(name, self._window(name, etag, size, 0, new_size, offset, data))
            return
        a = 0 if offset < MIN_PART else offset  # a copied head part must be at least MIN_PART
        b = min(new_size, max(end, a + MIN_PART))  # so must the new part, unless it is the last
        key = self.key(name)
        pieces: list[_Piece] = [_Copy(key, etag, s, e) for s, e in _split(0, a)]
        pieces.append(self._window(name, etag, size, a, b, offset, data))
        pieces += [_Copy(key, etag, s, e) for s, e in _split(b, size)]
        self._assemble(name, pieces)

    def _window(self, name: str, etag: str, size: int, a: int, b: int, offset: int, data: bytes) -> bytes:
        """Bytes [a, b) of the object as patched."""
        buf = bytearray(self._get(name, a, min(b, size) - a, etag) if a < min(b, size) else b"")
        buf.extend(bytes(b - a - len(buf)))
        buf[offset - a : offset - a + len(data)] = data
        return bytes(buf)

    def abort_uploads(self, prefix: str) -> int:
        """Abort every unfinished upload below prefix (a folder, as in list): the caller holds the locks of
        every chain there, so these are of writers that died. Returns how many."""
        return self._abort_uploads(prefix, None)

    def cleanup_uploads(self, older_than_s: float = STALE_UPLOAD) -> int:
        """Abort the multipart uploads under the store's prefix begun more than older_than_s ago (writers
        that died or lost their connection): their parts cost storage until then. Returns how many."""
        return self._abort_uploads("", older_than_s)

    def _abort_uploads(self, prefix: str, older_than_s: float | None) -> int:
        folder = prefix.strip("/")
        base = self._root + (folder + "/" if folder else "")
        cutoff = datetime.now(UTC) - timedelta(seconds=older_than_s or 0)
        stale: list[_Part] = []
        with self._mapped("list_multipart_uploads", prefix or None):
            uploads = self._client().get_paginator("list_multipart_uploads")
            for page in uploads.paginate(Bucket=self.bucket, Prefix=base):
                stale += [u for u in page.get("Uploads", []) if older_than_s is None or u["Initiated"] <= cutoff]
        for u in stale:
            with contextlib.suppress(_Expected):
                self._call("abort_multipart_upload", u["Key"][len(self._root) :], expect=("NoSuchUpload",),
                           Key=u["Key"], UploadId=u["UploadId"])  # fmt: skip
        return len(stale)

    def filesystem(self) -> str:
        return ""


__all__ = ["S3Store", "parse_url"]
