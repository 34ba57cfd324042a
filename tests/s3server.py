"""A real S3-protocol server for the S3 store tests: moto's standalone server in its own process, one for
the whole session (fixture s3_server) with a fresh bucket per test (fixture s3_bucket), plus throwaway
servers for tests that need credentials enforced or a server that dies (MotoServer directly).

moto keeps everything in memory, accepts any credentials unless INITIAL_NO_AUTH_ACTION_COUNT is set in
its environment, and listens on 127.0.0.1 only."""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

START_TIMEOUT = 30.0


def moto_server_exe() -> str | None:
    here = Path(sys.executable).parent / "moto_server"
    return str(here) if here.exists() else shutil.which("moto_server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoServer:
    """One moto_server process. `env` is added to its environment (e.g. INITIAL_NO_AUTH_ACTION_COUNT)."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.env = env or {}
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = Path(tempfile.mkstemp(prefix="moto-", suffix=".log")[1])

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Started on a free port (again on another one if that port was taken meanwhile); ready once it
        accepts connections. Readiness is probed without a request: moto counts requests against
        INITIAL_NO_AUTH_ACTION_COUNT."""
        exe = moto_server_exe()
        if exe is None:
            raise RuntimeError("moto_server is not installed (pip install 'moto[server]')")
        for _ in range(3):
            self.port = free_port()
            with open(self._log, "wb") as log:
                self.proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(self.port)], stdout=log,
                                             stderr=subprocess.STDOUT, env={**os.environ, **self.env})  # fmt: skip
            if self._wait_ready():
                return
        raise RuntimeError(f"moto_server did not start: {self.log_tail()}")

    def _wait_ready(self) -> bool:
        assert self.proc is not None
        end = time.monotonic() + START_TIMEOUT
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                return False
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
            time.sleep(0.05)
        self.stop()
        return False

    def log_tail(self) -> str:
        try:
            return " | ".join(self._log.read_text(errors="replace").strip().splitlines()[-5:]) or "no output"
        except OSError:
            return "no log"

    def kill(self) -> None:
        """Gone at once, as a crash or a network cut would leave it: open connections break."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def close(self) -> None:
        self.stop()
        with contextlib.suppress(OSError):
            self._log.unlink()


@contextlib.contextmanager
def moto_server(env: dict[str, str] | None = None) -> Iterator[MotoServer]:
    """A server of its own for one test; skips the test when moto cannot start."""
    server = MotoServer(env)
    try:
        try:
            server.start()
        except (OSError, RuntimeError) as e:
            pytest.skip(f"moto_server cannot start: {e}")
        yield server
    finally:
        server.close()


def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, endpoint: str, key: str = "testing",
            secret: str = "testing") -> None:  # fmt: skip
    """The AWS environment of a test: this endpoint and these credentials, and nothing of the user's
    (~/.aws files, profiles, tokens, instance metadata)."""
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_REGION",
                "AWS_ENDPOINT_URL_S3", "AWS_CA_BUNDLE", "AWS_REQUEST_CHECKSUM_CALCULATION"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config-none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials-none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@functools.cache
def client(endpoint: str, key: str = "testing", secret: str = "testing", service: str = "s3") -> Any:
    """A plain boto3 client (upload_file and all), to act behind the store's back; made once per arguments:
    clients are thread-safe, and making one costs a tenth of a second."""
    import boto3
    import botocore.config

    return boto3.session.Session().client(
        service, endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=key, aws_secret_access_key=secret,
        config=botocore.config.Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))  # fmt: skip


def new_bucket(endpoint: str) -> str:
    name = f"ic-test-{secrets.token_hex(6)}"
    client(endpoint).create_bucket(Bucket=name)
    return name


def empty_bucket(endpoint: str, bucket: str) -> None:
    """Everything gone (moto holds it in memory): objects, unfinished uploads, the bucket."""
    c = client(endpoint)
    for page in c.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
        for u in page.get("Uploads", []):
            c.abort_multipart_upload(Bucket=bucket, Key=u["Key"], UploadId=u["UploadId"])
    for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for o in page.get("Contents", []):
            c.delete_object(Bucket=bucket, Key=o["Key"])
    c.delete_bucket(Bucket=bucket)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoServer]:
    """One moto server for the whole session, stopped at its end."""
    with moto_server() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[str]:
    """A fresh bucket on the session's server, with the AWS environment pointing there."""
    aws_env(monkeypatch, tmp_path, s3_server.endpoint)
    bucket = new_bucket(s3_server.endpoint)
    yield bucket
    with contextlib.suppress(Exception):  # a test may have removed it, or broken it on purpose
        empty_bucket(s3_server.endpoint, bucket)
