"""Shared fixtures: isolated caches, volume generators, loop devices, and the portability check that
every repository a test creates must pass (names valid on exFAT/FAT32/NTFS, no case clashes)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from imagechain.names import case_collisions, portability_problems

from .s3server import s3_bucket, s3_server  # noqa: F401 (fixtures: one S3 server per run, a bucket per test)
from .sshd import sshd_server  # noqa: F401 (fixture: one sshd per run)

REPOS: list[Path] = []


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGECHAIN_CACHE", str(tmp_path / "_cache"))
    monkeypatch.setenv("IMAGECHAIN_MACHINE_ID", "test-machine-0")


def use_zone(monkeypatch: pytest.MonkeyPatch, zone: str) -> Iterator[None]:
    """Local time in this zone for the test (TZ, tzset), put back afterwards."""
    if not os.path.exists(f"/usr/share/zoneinfo/{zone}"):
        pytest.skip(f"no time zone data for {zone} (/usr/share/zoneinfo, Debian's tzdata)")
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.fixture
def berlin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time with daylight saving: Europe/Berlin (back on 2026-10-25 03:00 -> 02:00, forward on
    2026-03-29 02:00 -> 03:00; summer time is UTC+2)."""
    yield from use_zone(monkeypatch, "Europe/Berlin")


@pytest.fixture
def utc_local(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time is UTC, whatever the machine's zone."""
    yield from use_zone(monkeypatch, "UTC")


def assert_portable(repo: Path) -> None:
    """Every file and folder in the repository has a name valid on every common OS and filesystem."""
    rels = []
    for dirpath, dirnames, filenames in os.walk(repo):
        for n in dirnames + filenames:
            full = Path(dirpath) / n
            assert not full.is_symlink(), f"symlink in repository: {full}"
            rels.append(full.relative_to(repo).as_posix())
    problems = {r: portability_problems(r) for r in rels}
    assert not {r: p for r, p in problems.items() if p}, problems
    assert not case_collisions(rels)


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Path]:
    """A repository (made as `imagechain init` makes it); checked for portable names after the test."""
    from imagechain.repository import Repository

    p = tmp_path / "repo"
    Repository.open(str(p), create=True)
    yield p
    if p.exists():
        assert_portable(p)


def write_volume(path: Path, size: int, seed: int = 0, zero_fraction: float = 0.3) -> bytes:
    """A volume image with random, compressible and zero regions; returns its content."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = bytearray(size)
    pos = 0
    while pos < size:
        n = min(size - pos, int(rng.integers(1, 300_000)))
        r = rng.random()
        if r < zero_fraction:
            pass
        elif r < 0.6:
            out[pos : pos + n] = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        else:
            out[pos : pos + n] = (bytes(rng.integers(32, 127, 64, dtype=np.uint8)) * (n // 64 + 1))[:n]
        pos += n
    path.write_bytes(out)
    return bytes(out)


def flip(path: Path, pos: int, mask: int = 0x5A) -> None:
    """Damage one byte of a file in place: what a bad sector or a stray write does."""
    with open(path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ mask]))


def restore_as_target_appears(address: str, target: Path) -> tuple[str, Path]:
    """Restore to a new file while another writer makes that file just before the restore publishes: the
    one-line error the restore raises, and the file the restored volume was kept as."""
    from imagechain.address import open_point
    from imagechain.engine import restore as engine
    from imagechain.errors import TargetError

    real = engine.Target.finish

    def finish(self: engine.Target) -> None:
        target.write_bytes(b"someone else's")
        real(self)

    res = open_point(address)
    with pytest.MonkeyPatch.context() as mp, pytest.raises(TargetError, match="appeared while restoring") as e:
        mp.setattr(engine.Target, "finish", finish)
        engine.restore(res.repo, res.point, str(target))
    assert target.read_bytes() == b"someone else's"
    (kept,) = target.parent.glob(f"{target.name}.restored-*")
    return str(e.value), kept


def error_lines(stderr: str) -> list[str]:
    """stderr without the notices a command may print on the way (e.g. "no filesystem recognised")."""
    return [line for line in stderr.strip().splitlines() if not line.startswith("notice: ")]


def exe() -> str:
    """The installed console script: the CLI tests run what a user runs."""
    here = Path(sys.executable).parent / "imagechain"
    if here.exists():
        return str(here)
    found = shutil.which("imagechain")
    if found is None:
        pytest.skip("the imagechain console script is not installed")
    return found


def need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices and mounts)")


def need_tool(*names: str) -> None:
    for n in names:
        if shutil.which(n) is None:
            pytest.skip(f"{n} is not installed (make test installs it with apt-get)")


@contextlib.contextmanager
def loop_device(image: Path) -> Iterator[str]:
    need_root()
    need_tool("losetup")
    dev = subprocess.run(["losetup", "-f", "--show", str(image)], check=True, capture_output=True,
                         text=True).stdout.strip()  # fmt: skip
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)
