"""Stop signals: SIGINT (Ctrl-C), SIGTERM (systemd, kill) and SIGHUP (a closed terminal) all stop an
operation the same clean way: temporaries removed, the lock released, one true line, exit 128 + signal.

A few steps must not be cut in two (publishing a point's segments by renames, taking a lock): they run
inside `deferred()`, and a signal that arrives meanwhile takes effect when the step is done."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """A stop signal. A KeyboardInterrupt, so no `except Exception` swallows it. `what` says truthfully
    what the stop left behind; engines refine it as they unwind."""

    def __init__(self, signum: int = signal.SIGINT, what: str = "nothing was published") -> None:
        super().__init__(signum)
        self.signum, self.what = signum, what

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_pending: list[int] = []
_depth = [0]


def _handler(signum: int, _frame: object) -> None:
    if _depth[0]:
        _pending.append(signum)
        return
    raise Stopped(signum)


def install() -> None:
    """Route the stop signals to Stopped (main thread only, as Python delivers signals there)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s in STOP_SIGNALS:
        signal.signal(s, _handler)


def hold() -> None:
    """Ignore the stop signals for the rest of the process, once its outcome is decided and reported."""
    if threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold stop signals until the block is done; then the first of them is raised."""
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1
        if not _depth[0] and _pending:
            signum = _pending[0]
            _pending.clear()
            raise Stopped(signum)


def join_started(thread: threading.Thread, timeout: float | None = None) -> None:
    """Join a helper thread on the way out. A stop signal inside its Thread.start() may have left it never
    started, and join refuses such a thread ("cannot join thread before it is started", a traceback over the
    stop); one that starts late finds its stop already set and ends at once."""
    with contextlib.suppress(RuntimeError):
        thread.join(timeout)


def as_stopped(exc: KeyboardInterrupt) -> Stopped:
    """A plain KeyboardInterrupt (Python's own SIGINT handler) as a Stopped."""
    return exc if isinstance(exc, Stopped) else Stopped(signal.SIGINT)
