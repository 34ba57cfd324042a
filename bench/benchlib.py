"""What the smaller benchmarks share: the imagechain command to time, and dropping the page cache."""

from __future__ import annotations

import contextlib
import mmap
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# the free page reporting of a virtio balloon: free blocks of at least this order go back to the host
PAGE_REPORTING_ORDER = Path("/sys/module/page_reporting/parameters/page_reporting_order")
ABOVE_ANY_ORDER = 11  # larger than the buddy allocator's largest block (order 10): no free block qualifies


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


@contextlib.contextmanager
def host_backed_memory() -> Iterator[dict[str, Any]]:
    """Free page reporting off for the run, put back as it was at the end.

    On a virtual machine whose balloon reports free pages (Firecracker, QEMU with free-page-reporting) the
    host takes back what the guest frees, and the guest pays a fault in the host for every page when it uses
    that memory again: whatever fills the page cache then runs slower the longer the machine was idle
    before. Measured on the 4 GiB volume's used data (2.3 GiB): a cold read took 1.45-1.68 s when started
    half a second after a large read freed its cache, 4.0-4.2 s after 15 s; with reporting off, 1.4-1.7 s
    either way. The steps of a benchmark would otherwise run in whichever regime the one before left."""
    info: dict[str, Any] = {}
    try:
        was = PAGE_REPORTING_ORDER.read_text().strip()
    except OSError:
        info["page_reporting"] = "absent"
        yield info
        return
    try:
        PAGE_REPORTING_ORDER.write_text(f"{ABOVE_ANY_ORDER}\n")
        info["page_reporting"] = f"off for the run (page_reporting_order {was} -> {ABOVE_ANY_ORDER})"
    except OSError as e:
        info["page_reporting"] = f"on: could not switch it off ({e.strerror})"
        was = ""
    try:
        yield info
    finally:
        if was:
            PAGE_REPORTING_ORDER.write_text(f"{was}\n")


def touch_memory(n: int) -> float:
    """Write to every page of n bytes of fresh memory and free it again, so that the host backs those pages
    before anything is timed (see host_backed_memory); returns the seconds it took."""
    t = time.perf_counter()
    page = mmap.PAGESIZE
    with mmap.mmap(-1, n) as m:
        for off in range(0, n, page):
            m[off] = 1
    return time.perf_counter() - t
