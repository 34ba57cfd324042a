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


def drop(required: bool = False) -> None:
    """Cold cache for the next step. Only root may drop it: others keep the page cache as it is, unless the
    benchmark cannot do without (required), where failing to drop it is an error."""
    os.sync()
    if required or os.geteuid() == 0:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
