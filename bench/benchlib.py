"""What the smaller benchmarks share: the imagechain command to time, and dropping the page cache."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def ic() -> str:
    """The installed console script beside this Python (what a user runs), else the one on PATH."""
    here = Path(sys.executable).parent / "imagechain"
    return str(here) if here.exists() else shutil.which("imagechain") or "imagechain"


def drop() -> None:
    """Cold cache for the next step (root only; otherwise the page cache stays as it is)."""
    os.sync()
    if os.geteuid() == 0:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
