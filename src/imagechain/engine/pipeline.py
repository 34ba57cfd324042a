"""Overlap I/O and CPU with bounded memory: a prefetching reader thread feeds a thread pool whose
results come back in order. hashing, compression and file I/O release the GIL, so threads suffice.

Both are generators whose threads stop when they are closed: callers close them in a `finally`, so no
thread outlives the operation (garbage collection would close them too, but at no known moment)."""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from ..limits import usable_cpus

T = TypeVar("T")
R = TypeVar("R")

_END = object()


def default_threads() -> int:
    """The CPUs this process may use (affinity and cgroup quota), not the machine's count."""
    return usable_cpus()


def prefetch(items: Iterable[T], depth: int, init: Callable[[], None] | None = None) -> Generator[T, None, None]:
    """Produce items in a background thread, at most `depth` ahead of the consumer; `init` runs first in
    that thread (its I/O and CPU priority)."""
    q: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def run() -> None:
        try:
            if init is not None:
                init()
            for it in items:
                while not stop.is_set():
                    try:
                        q.put(it, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(_END)
        except BaseException as e:
            q.put(e)

    t = threading.Thread(target=run, name="prefetch", daemon=True)
    t.start()
    try:
        while True:
            it = q.get()
            if it is _END:
                return
            if isinstance(it, BaseException):
                raise it
            yield it  # type: ignore[misc]
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.05)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int, depth: int,
                init: Callable[[], None] | None = None) -> Generator[R, None, None]:  # fmt: skip
    """fn over items in a pool, results in input order, at most `depth` in flight; `init` runs first in
    each worker thread."""
    with ThreadPoolExecutor(threads, thread_name_prefix="work", initializer=init) as pool:
        pending: deque[Future[R]] = deque()
        try:
            for it in items:
                pending.append(pool.submit(fn, it))
                if len(pending) >= depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()
