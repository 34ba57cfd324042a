"""A filesystem's file-size limit (EFBIG) splits a point into segments instead of failing the backup.

RLIMIT_FSIZE makes the kernel answer EFBIG exactly as a filesystem with a small file limit does
(Python ignores SIGXFSZ, so the process sees the error)."""

from __future__ import annotations

import os
import resource
import subprocess
from pathlib import Path

from imagechain.address import open_point
from imagechain.engine.restore import restore

from .conftest import exe

LIMIT = 3 << 20


def _limit_file_size() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def test_file_too_large_continues_in_a_new_segment(tmp_path: Path, repo: Path) -> None:
    vol = tmp_path / "vol.img"
    data = os.urandom(10 << 20)  # incompressible: the point is about as large as the volume
    vol.write_bytes(data)
    env = {**os.environ, "IMAGECHAIN_CACHE": str(tmp_path / "cache")}
    run = subprocess.run([exe(), "backup", str(vol), str(repo), "--compression", "none"], env=env,
                         preexec_fn=_limit_file_size, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    files = sorted(p for p in repo.rglob("*.icimg"))
    assert len(files) >= 4, files
    assert all(p.stat().st_size <= LIMIT for p in files)
    assert not [p for p in repo.rglob("*") if ".tmp-" in p.name]
    res = open_point(str(files[-1]))
    assert len(res.point.segments) == len(files)
    out = tmp_path / "out.img"
    restore(res.repo, res.point, str(out))
    assert out.read_bytes() == data
    # the next backup of the chain is an ordinary incremental
    vol.write_bytes(data[:4096] + b"\1" * 4096 + data[8192:])
    run = subprocess.run([exe(), "backup", str(vol), str(repo), "--json"], env=env,
                         preexec_fn=_limit_file_size, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert '"kind": "incremental"' in run.stdout and '"changed_blocks": 1' in run.stdout
