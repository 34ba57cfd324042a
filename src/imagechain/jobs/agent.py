"""The scheduler agent: runs each job when its schedule says, each run in a process of its own
(`imagechain jobs run NAME`), so that a run that fails or crashes leaves the agent and the other jobs be.

- Never two runs on one chain (jobs with the same repository, source and chain) at once; runs on
  different chains, of one source or not, go side by side up to `max_parallel`.
- A slot that came while a run of the same job was still going is not stacked: the job runs once more
  when it is free. After downtime, a job whose slot passed runs once, not once per missed slot.
- When a job last ran comes from the history (the slot each run was for), so a restarted agent
  knows what it missed; a job that never ran waits for its first slot.
- SIGTERM/SIGINT: the runs get the signal, abort as `imagechain backup` does (nothing half-published),
  and the agent exits with 128 + the signal once they have (after `stop_timeout` they are killed).
- SIGHUP: the job file is read again; a file with errors is refused and the jobs go on as they were.

The clock is injectable, so tests drive days of schedules in moments."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from ..errors import ImagechainError
from .config import Config, Job, load
from .history import History


@dataclass
class Running:
    job: Job
    slot: float
    proc: subprocess.Popen[bytes]


def local(ts: float) -> datetime:
    return datetime.fromtimestamp(ts).astimezone()


def next_slot(job: Job, history: History, now: float) -> float:
    """When the job runs next: its first slot after the one it last ran for; a slot already passed means
    now (a catch-up); a job that never ran on schedule waits for its first slot from now."""
    last = history.last_slot(job.name)
    if last is None:
        return job.schedule.next_after(now)
    return job.schedule.next_after(last)


def job_command(config: Config, job: Job, slot: float) -> list[str]:
    return [sys.executable, "-m", "imagechain", "jobs", "run", job.name, "--config", config.path, "--slot", repr(slot)]


class Agent:
    def __init__(self, config_path: str | None = None, *, clock: Callable[[], float] = time.time,
                 log: Callable[[str], None] | None = None,
                 command: Callable[[Config, Job, float], list[str]] = job_command) -> None:  # fmt: skip
        self.config_path = config_path
        self.clock, self.command = clock, command
        self.log = log or (lambda line: print(f"imagechain agent: {line}", file=sys.stderr, flush=True))
        self.config = load(config_path)
        self.running: dict[str, Running] = {}
        self.next: dict[str, float] = {}
        self.finished: list[tuple[str, int]] = []  # (job, exit code) of runs that ended, oldest first
        self._plan(self.config)

    def _plan(self, config: Config) -> None:
        now = self.clock()
        with History(config.history) as h:
            old = self.config.jobs
            fresh: dict[str, float] = {}
            for name, job in config.jobs.items():
                if not job.enabled:
                    continue
                keep = name in self.next and name in old and old[name].schedule == job.schedule
                fresh[name] = self.next[name] if keep else next_slot(job, h, now)
        self.next = fresh

    def reload(self) -> bool:
        try:
            config = load(self.config_path)
        except ImagechainError as e:
            self.log(f"reload refused, the jobs go on as they were: {e}")
            return False
        self._plan(config)
        self.config = config
        self.log(f"reloaded {config.path}: {len(config.jobs)} job(s)")
        return True

    def due(self, now: float) -> list[Job]:
        """Jobs whose slot has come, that may start now (oldest slot first)."""
        busy = {r.job.chain_key for r in self.running.values()}
        out = []
        for name, when in sorted(self.next.items(), key=lambda kv: kv[1]):
            job = self.config.jobs[name]
            if when <= now and name not in self.running and job.chain_key not in busy:
                out.append(job)
                busy.add(job.chain_key)
        return out

    def reap(self) -> None:
        for name, r in list(self.running.items()):
            code = r.proc.poll()
            if code is not None:
                del self.running[name]
                self.finished = [*self.finished[-99:], (name, code)]
                self.log(f"job {name} ended: {'ok' if code == 0 else f'exit {code}'}")

    def step(self, now: float | None = None) -> list[str]:
        """Reap ended runs and start the ones that are due, within max_parallel. Returns the jobs started."""
        now = self.clock() if now is None else now
        self.reap()
        started = []
        for job in self.due(now):
            if len(self.running) >= self.config.max_parallel:
                break
            slot = self.next[job.name]
            self.next[job.name] = job.schedule.next_after(max(slot, now))  # missed: once
            try:
                proc = subprocess.Popen(self.command(self.config, job, slot), stdin=subprocess.DEVNULL)
            except OSError as e:
                self.log(f"job {job.name} could not start: {e.strerror or e}")
                continue
            self.running[job.name] = Running(job, slot, proc)
            started.append(job.name)
            self.log(f"job {job.name} started (slot {local(slot).isoformat(timespec='minutes')}, pid {proc.pid})")
        return started

    def wait(self, timeout: float | None = None) -> None:
        """Until every run has ended (tests; the stop)."""
        end = None if timeout is None else time.monotonic() + timeout
        for r in list(self.running.values()):
            left = None if end is None else max(0.0, end - time.monotonic())
            try:
                r.proc.wait(left)
            except subprocess.TimeoutExpired:
                break
        self.reap()

    def stop(self, signum: int) -> None:
        """Pass the stop to every run, give them stop_timeout to abort cleanly, then kill what is left."""
        for r in self.running.values():
            if r.proc.poll() is None:
                r.proc.send_signal(signum)
        self.wait(self.config.stop_timeout_s)
        for r in list(self.running.values()):
            self.log(f"job {r.job.name} did not stop within {self.config.stop_timeout_s:g} s: killed")
            r.proc.kill()
            r.proc.wait()
        self.reap()

    def run_forever(self, poll: float = 1.0) -> int:
        """The agent's life: until SIGTERM or SIGINT (returns 128 + it); SIGHUP reloads."""
        flags: dict[str, int] = {}

        def on_stop(signum: int, _frame: object) -> None:
            flags["stop"] = signum

        def on_hup(_signum: int, _frame: object) -> None:
            flags["reload"] = 1

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_stop)
        signal.signal(signal.SIGHUP, on_hup)
        self.log(f"running {len(self.next)} job(s) from {self.config.path} (pid {os.getpid()})")
        while "stop" not in flags:
            if flags.pop("reload", None):
                self.reload()
            self.step()
            nearest = min(self.next.values(), default=self.clock() + 3600)
            until = time.monotonic() + max(0.05, min(poll if self.running else 60.0, nearest - self.clock()))
            while "stop" not in flags and "reload" not in flags and time.monotonic() < until:
                time.sleep(min(0.2, max(0.0, until - time.monotonic())))  # a signal is seen within 0.2 s
        signum = flags["stop"]
        self.log(f"stopping ({signal.Signals(signum).name}): {len(self.running)} run(s) to abort")
        self.stop(signum)
        return 128 + signum
