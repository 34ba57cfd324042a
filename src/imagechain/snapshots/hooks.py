"""User commands run around a snapshot: --pre-snapshot (quiesce an application) and --post-snapshot
(let it go on), each bounded by a timeout.

A hook runs through /bin/sh in a session of its own, so a timeout or a stop signal ends the hook and
everything it started; its output goes to our stderr (stdout stays clean for --json). It learns what is
being done from the environment: IMAGECHAIN_HOOK (pre-snapshot, post-snapshot), IMAGECHAIN_SOURCE,
IMAGECHAIN_CHAIN, IMAGECHAIN_SNAPSHOT (the provider), IMAGECHAIN_MOUNTPOINTS (newline-separated) and,
for the post hook, IMAGECHAIN_STATUS (captured, or failed when the snapshot was not taken)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field

from ..errors import SnapshotError

DEFAULT_TIMEOUT_S = 300.0
KILL_GRACE_S = 5.0


@dataclass
class Hooks:
    pre: str | None = None
    post: str | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    env: dict[str, str] = field(default_factory=dict)  # IMAGECHAIN_* values of this backup

    def run(self, which: str, command: str, extra: dict[str, str] | None = None) -> float:
        """Run one hook to its end; SnapshotError when it fails or outlasts the timeout. Returns seconds."""
        env = {**os.environ, **self.env, "IMAGECHAIN_HOOK": which, **(extra or {})}
        t0 = time.monotonic()
        try:
            p = subprocess.Popen(["/bin/sh", "-c", command], env=env, stdin=subprocess.DEVNULL,
                                 stdout=2, stderr=2, start_new_session=True)
        except OSError as e:
            raise SnapshotError(f"cannot run the {which} hook: {e.strerror}") from e
        try:
            code = p.wait(self.timeout_s or None)
        except subprocess.TimeoutExpired:
            _end(p)
            raise SnapshotError(f"the {which} hook did not finish within {self.timeout_s:g} s and was stopped "
                                f"(--hook-timeout)") from None  # fmt: skip
        except BaseException:  # a stop signal: the hook and what it started end with us
            _end(p)
            raise
        if code:
            why = f"was killed by signal {-code}" if code < 0 else f"failed with exit code {code}"
            raise SnapshotError(f"the {which} hook {why}: {command}")
        return time.monotonic() - t0


def _end(p: subprocess.Popen[bytes]) -> None:
    """Stop a hook's whole process group: TERM, then KILL after a grace period."""
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(grace)
            return
        except subprocess.TimeoutExpired:
            continue
