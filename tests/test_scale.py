"""Scale: a sparse image of 64 GiB apparent size holding a few MiB of data backs up, verifies and restores
in time that follows the data, with memory bounded whatever the apparent size (bench/scale.py runs the
same at 1 TiB and 4 TiB and records the figures)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import exe

GiB = 1 << 30
APPARENT = 64 * GiB
RSS_LIMIT_KIB = 500 * 1024

MEASURE = """
import resource, subprocess, sys
p = subprocess.run(sys.argv[1:], capture_output=True, text=True)
sys.stderr.write(p.stderr)
sys.stdout.write(p.stdout)
print("MAXRSS", resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(p.returncode)
"""


def run_measured(*args: object) -> tuple[str, int]:
    """Run the CLI in a fresh parent, so the peak RSS is this command's alone (KiB)."""
    p = subprocess.run([sys.executable, "-c", MEASURE, exe(), *map(str, args)], capture_output=True, text=True,
                       timeout=600, env=dict(os.environ))  # fmt: skip
    assert p.returncode == 0 and "Traceback" not in p.stderr, f"{args}: {p.stdout}\n{p.stderr}"
    rss = int(p.stdout.strip().splitlines()[-1].split()[1])
    return p.stdout, rss


def data_extents(path: Path) -> list[tuple[int, int]]:
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos = os.fstat(fd).st_size, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return out


def same_content(a: Path, b: Path) -> None:
    """Equal files, compared where either holds data (both read as zeros elsewhere)."""
    assert a.stat().st_size == b.stat().st_size
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, end in data_extents(a) + data_extents(b):
            for pos in range(start, end, 64 << 20):
                n = min(64 << 20, end - pos)
                assert os.pread(fa.fileno(), n, pos) == os.pread(fb.fileno(), n, pos), f"differ in {pos}..{pos + n}"


@pytest.mark.slow
def test_sparse_64_gib_image_backs_up_and_restores_in_bounded_memory(tmp_path: Path) -> None:
    vol, repo, out = tmp_path / "big.img", tmp_path / "repo", tmp_path / "restored.img"
    regions = [0, 3 * GiB + 12345, 17 * GiB, 40 * GiB - 5 * (1 << 20), APPARENT - (3 << 20)]
    with open(vol, "wb") as f:
        f.truncate(APPARENT)
        for at in regions:
            f.seek(at)
            f.write(os.urandom(2 << 20))
    _, rss_full = run_measured("backup", vol, repo, "--init", "--json")
    with open(vol, "r+b") as f:
        f.seek(17 * GiB + 4096)
        f.write(os.urandom(300_000))
        f.seek(50 * GiB)
        f.write(os.urandom(100_000))
    text, rss_incr = run_measured("backup", vol, repo)
    assert text.startswith("incremental"), text
    _, rss_verify = run_measured("verify", repo)
    _, rss_restore = run_measured("restore", f"{repo}::default", out)
    same_content(vol, out)
    assert out.stat().st_blocks * 512 < 64 << 20, "the restored file is not sparse"
    for what, rss in (("full", rss_full), ("incremental", rss_incr), ("verify", rss_verify),
                      ("restore", rss_restore)):  # fmt: skip
        assert rss < RSS_LIMIT_KIB, f"{what}: peak RSS {rss // 1024} MiB"
    stored = sum(f.stat().st_size for f in repo.rglob("*.icimg"))
    assert stored < 64 << 20, f"{stored} bytes stored for ~11 MiB of data"
