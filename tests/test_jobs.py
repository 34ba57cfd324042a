"""Jobs and the scheduler agent: the job file and what it refuses, schedules, and the agent driven by an
injected clock (days of schedules in seconds; every run a real `imagechain jobs run` process doing a real
backup): two schedules on one source make two independent chains that each restore bit for bit, a
failing job leaves the others be, a missed slot is caught up once, runs on one chain never overlap;
then a real agent process stopped by SIGTERM mid-backup and reloaded by SIGHUP, notifications, and the
`jobs` commands."""

from __future__ import annotations

import hashlib
import http.server
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import pytest

from imagechain.errors import UsageError
from imagechain.jobs.agent import Agent
from imagechain.jobs.config import load
from imagechain.jobs.history import History
from imagechain.jobs.schedule import parse
from imagechain.repository import Repository

from .conftest import error_lines, exe, write_volume

MiB = 1 << 20


def at(text: str) -> float:
    """A local time as a unix timestamp (the agent's clock)."""
    return datetime.fromisoformat(text).astimezone().timestamp()


def write_config(path: Path, body: str, history: Path) -> Path:
    path.write_text(f'[agent]\nhistory = "{history}"\nmax_parallel = 2\nstop_timeout = "30s"\n\n{body}')
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def restore_digests(repo: Path, chain: str, tmp_path: Path) -> list[str]:
    """The sha256 of every point of the chain, restored, oldest first."""
    r = Repository.open(str(repo))
    cat = r.catalog()
    from imagechain.engine.restore import restore

    out = []
    points = sorted((p for p in cat.points.values() if p.header.metadata.get("chain") == chain),
                    key=lambda p: p.header.sequence)  # fmt: skip
    for p in points:
        dest = tmp_path / "restored.img"
        restore(r, p, str(dest), cat=cat)
        out.append(digest(dest))
        dest.unlink()
    return out


class Clock:
    def __init__(self, start: str) -> None:
        self.now = at(start)

    def __call__(self) -> float:
        return self.now

    def set(self, text: str) -> float:
        self.now = at(text)
        return self.now


# -- the job file --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "words"), [
    ('[jobs.a]\nrepository = "/r"\nschedule = "daily"\n', ["job 'a'", "source is missing"]),
    ('[jobs.a]\nsource = "/s"\nrepository = "/r"\nschedule = "daily 25:00"\n', ["job 'a'", "schedule"]),
    ('[jobs.a]\nsource = "/s"\nrepository = "/r"\nshedule = "daily"\n', ["job 'a'", "unknown key(s) shedule"]),
    ('[jobs.a]\nsource = "/s"\nrepository = "/r"\nschedule = "daily"\npassphrase = "x"\n',
     ["job 'a'", "passphrase", "never goes into the job file"]),
    ('[jobs.a]\nsource = "/s"\nrepository = "/r"\nschedule = "daily"\nretention = { last = -1 }\n',
     ["job 'a'", "retention", "last"]),
    ('[jobs.a]\nsource = "/s"\nrepository = "/r"\nschedule = "daily"\nretention = { keep_last = 2 }\n',
     ["job 'a': retention: unknown key(s) keep_last (known: daily, hourly, last, monthly, weekly)"]),
    ('[jobs.a]\nsource = "/s"\nrepository = "/r"\nschedule = "daily"\nencryption = "passphrase"\n',
     ["job 'a'", "encryption", "passphrase_file"]),
    ('[jobs.a]\nsource = "/s"\nrepository = "/r"\nschedule = "daily"\nsnapshot = "zfs"\n', ["job 'a'", "snapshot"]),
    ('[jobs.a]\nsource = "/s"\nrepository = "/r"\nschedule = "daily"\nmax_read_rate = "fast"\n',
     ["job 'a'", "max_read_rate"]),
    ('[jobs.a]\nsource = "/s"\nrepository = "/r"\nschedule = "daily"\nnotify = { webhook = "ftp://x" }\n',
     ["job 'a'", "notify", "webhook"]),
    ('[agent]\nmax_parallel = 0\n[jobs.a]\nsource = "/s"\nrepository = "/r"\nschedule = "daily"\n',
     ["[agent]", "max_parallel"]),
    ('[jobs.a\nsource = "/s"\n', ["not valid TOML"]),
    ("", ["no jobs"]),
])  # fmt: skip
def test_config_errors_name_the_job_and_the_key(tmp_path: Path, body: str, words: list[str]) -> None:
    f = tmp_path / "jobs.toml"
    f.write_text(body)
    with pytest.raises(UsageError) as ei:
        load(str(f))
    msg = str(ei.value)
    assert str(f) in msg and "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    cli = subprocess.run([exe(), "jobs", "list", "--config", str(f)], capture_output=True, text=True)
    assert cli.returncode == 2 and len(error_lines(cli.stderr)) == 1 and "Traceback" not in cli.stderr


def test_a_job_file_that_is_not_utf8(tmp_path: Path) -> None:
    """A path written in Latin-1 into the job file: tomllib let the decoder's UnicodeDecodeError through,
    and `jobs list` and the agent died with a traceback."""
    f = tmp_path / "jobs.toml"
    f.write_bytes(b'[jobs.a]\nsource = "/srv/M\xe4rz.img"\nrepository = "/r"\nschedule = "daily"\n')
    with pytest.raises(UsageError, match=r"is not valid TOML: it is not UTF-8 \(byte 25: invalid continuation byte\)"):
        load(str(f))
    cli = subprocess.run([exe(), "jobs", "list", "--config", str(f)], capture_output=True, text=True)
    assert cli.returncode == 2 and len(error_lines(cli.stderr)) == 1 and "Traceback" not in cli.stderr


def test_a_full_job_file_reads_and_maps_to_the_engine(tmp_path: Path) -> None:
    f = write_config(tmp_path / "jobs.toml", '''
[notify]
command = "cat > /dev/null"
[jobs.nightly]
source = "/dev/vg0/data"
repository = "sftp://vault/srv/ic"
schedule = "daily 02:00"
full_every = "30d"
retention = { last = 7, daily = 14, weekly = 8, monthly = 12 }
snapshot = "fsfreeze"
max_freeze = "20s"
pre_snapshot = "sync"
compression = "zstd:3"
encryption = "passphrase"
passphrase_file = "/etc/imagechain/nightly.pass"
replicate_to = "s3://offsite/ic"
io_priority = "idle"
cpu_priority = 19
max_read_rate = "100M/s"
notify = { webhook = "https://hooks.example/ic", on_success = true }
''', tmp_path / "h.sqlite")  # fmt: skip
    job = load(str(f)).jobs["nightly"]
    assert job.chain == "nightly" and job.schedule.cron == "0 2 * * *" and job.full_every_s == 30 * 86400
    assert job.retention is not None and (job.retention.last, job.retention.monthly) == (7, 12)
    assert job.snapshot.mode == "fsfreeze" and job.snapshot.max_freeze_s == 20 and job.snapshot.pre == "sync"
    assert job.limits.io_priority == "idle" and job.limits.max_read_rate == 100 * MiB
    assert job.notify.command == "cat > /dev/null" and job.notify.webhook and job.notify.on_success


def test_schedules() -> None:
    assert [parse(t).cron for t in ("hourly", "hourly :15", "daily", "daily 2:30", "weekly sun 03:00",
                                    "weekly friday 23:59", "monthly 1 04:00", "*/10 * * * *")] == [
        "0 * * * *", "15 * * * *", "0 0 * * *", "30 2 * * *", "0 3 * * 0", "59 23 * * 5", "0 4 1 * *",
        "*/10 * * * *"]  # fmt: skip
    nxt = datetime.fromtimestamp(parse("weekly sun 03:00").next_after(datetime(2026, 11, 27, 12).timestamp()))
    assert (nxt.weekday(), nxt.hour, nxt.day) == (6, 3, 29)
    for bad in ("weekly xyz 03:00", "monthly 31 01:00", "every day", "1 2 3", "@often"):
        with pytest.raises(ValueError):
            parse(bad)
    # cron's nicknames
    assert [parse(t).cron for t in ("@hourly", "@daily", "@Midnight", "@weekly", "@monthly", "@yearly")] == [
        "0 * * * *", "0 0 * * *", "0 0 * * *", "0 0 * * 0", "0 0 1 * *", "0 0 1 1 *"]  # fmt: skip
    with pytest.raises(ValueError, match="runs a job missed while it was down"):
        parse("@reboot")


def _slots(schedule: str, start: datetime, n: int) -> list[str]:
    """The next n slots after a local time, as local times with their offsets."""
    out, t = [], start.timestamp()
    for _ in range(n):
        t = parse(schedule).next_after(t)
        out.append(datetime.fromtimestamp(t).astimezone().isoformat(timespec="minutes"))
    return out


def test_schedules_follow_the_wall_clock_across_daylight_saving(berlin: None) -> None:
    # clocks go back: once a day at 02:30 in summer time, then in winter time (the aware datetime croniter
    # was given kept summer time's offset: 01:30 on the 26th and 02:30 again the same day)
    assert _slots("daily 02:30", datetime(2026, 10, 24, 2, 30), 3) == [
        "2026-10-25T02:30+02:00", "2026-10-26T02:30+01:00", "2026-10-27T02:30+01:00"]  # fmt: skip
    # the doubled hour runs once, the first time
    assert _slots("hourly", datetime(2026, 10, 25, 0, 30), 4) == [
        "2026-10-25T01:00+02:00", "2026-10-25T02:00+02:00", "2026-10-25T03:00+01:00",
        "2026-10-25T04:00+01:00"]  # fmt: skip
    # started inside the second pass of the doubled hour: its 02:45 came an hour ago, so the next is 03:00
    second_pass = datetime(2026, 10, 25, 2, 15, fold=1)
    assert _slots("*/15 * * * *", second_pass, 2) == ["2026-10-25T03:00+01:00", "2026-10-25T03:15+01:00"]
    # clocks go forward: the skipped 02:30 runs an hour later, then 02:30 again
    assert _slots("daily 02:30", datetime(2026, 3, 28, 2, 30), 3) == [
        "2026-03-29T03:30+02:00", "2026-03-30T02:30+02:00", "2026-03-31T02:30+02:00"]  # fmt: skip
    assert _slots("weekly sun 01:30", datetime(2026, 3, 22, 12), 2) == [
        "2026-03-29T01:30+01:00", "2026-04-05T01:30+02:00"]  # fmt: skip


# -- the agent, on an injected clock ----------------------------------------------------------------------


def test_two_schedules_on_one_source_make_two_independent_chains(tmp_path: Path) -> None:
    vol = tmp_path / "vol.img"
    data = bytearray(write_volume(vol, 4 * MiB, seed=31))
    local, usb = tmp_path / "local", tmp_path / "usb"
    f = write_config(tmp_path / "jobs.toml", f'''
[jobs.hourly]
source = "{vol}"
repository = "{local}"
schedule = "hourly"
init = true
[jobs.nightly]
source = "{vol}"
repository = "{usb}"
schedule = "daily 02:00"
init = true
''', tmp_path / "history.sqlite")  # fmt: skip
    clock = Clock("2026-11-27T00:30")
    agent = Agent(str(f), clock=clock, log=lambda _l: None)
    assert agent.step() == []
    states: dict[str, list[str]] = {"hourly": [], "nightly": []}
    for hour in (1, 2, 3):
        data[hour * 100_000 : hour * 100_000 + 5000] = os.urandom(5000)
        vol.write_bytes(data)
        started = agent.step(clock.set(f"2026-11-27T0{hour}:00"))
        agent.wait(120)
        assert sorted(started) == (["hourly", "nightly"] if hour == 2 else ["hourly"]), started
        for name in started:
            states[name].append(digest(vol))
    assert [code for _n, code in agent.finished] == [0, 0, 0, 0]
    assert restore_digests(local, "hourly", tmp_path) == states["hourly"]
    assert restore_digests(usb, "nightly", tmp_path) == states["nightly"]
    with History(str(tmp_path / "history.sqlite")) as h:
        runs = h.runs()
        assert {r["result"] for r in runs} == {"ok"} and len(runs) == 4
        hourly = h.runs("hourly")
        assert [r["kind"] for r in reversed(hourly)] == ["full", "incremental", "incremental"]
        assert all(r["bytes_read"] and r["bytes_stored"] is not None for r in runs)


def test_a_failing_job_does_not_block_others_and_a_missed_slot_runs_once(tmp_path: Path) -> None:
    vol = tmp_path / "vol.img"
    write_volume(vol, 2 * MiB, seed=32)
    repo = tmp_path / "repo"
    f = write_config(tmp_path / "jobs.toml", f'''
[jobs.broken]
source = "{tmp_path / 'no-such-disk'}"
repository = "{repo}"
schedule = "hourly"
init = true
[jobs.good]
source = "{vol}"
repository = "{repo}"
schedule = "hourly"
init = true
''', tmp_path / "history.sqlite")  # fmt: skip
    clock = Clock("2026-11-27T00:59")
    agent = Agent(str(f), clock=clock, log=lambda _l: None)
    assert sorted(agent.step(clock.set("2026-11-27T01:00"))) == ["broken", "good"]
    agent.wait(120)
    assert dict(agent.finished) == {"broken": 3, "good": 0}
    with History(str(tmp_path / "history.sqlite")) as h:
        broken = h.last("broken")
        assert broken is not None and broken["result"] == "failed" and "no-such-disk" in broken["error"]
    # the machine was down from 01:05 to 05:30: a new agent runs each job once for what it missed
    later = Agent(str(f), clock=Clock("2026-11-27T05:30"), log=lambda _l: None)
    assert sorted(later.step()) == ["broken", "good"]
    later.wait(120)
    assert later.step(at("2026-11-27T05:31")) == []  # not once per missed hour
    assert later.next["good"] == at("2026-11-27T06:00")
    with History(str(tmp_path / "history.sqlite")) as h:
        assert [r["scheduled"] for r in h.runs("good")] == [at("2026-11-27T02:00"), at("2026-11-27T01:00")]
    assert sorted(later.step(at("2026-11-27T06:00"))) == ["broken", "good"]
    later.wait(120)


def test_runs_on_one_chain_never_overlap(tmp_path: Path) -> None:
    vol = tmp_path / "vol.img"
    vol.write_bytes(os.urandom(12 * MiB))
    repo = tmp_path / "repo"
    f = write_config(tmp_path / "jobs.toml", f'''
[jobs.often]
source = "{vol}"
repository = "{repo}"
chain = "shared"
schedule = "*/5 * * * *"
init = true
max_read_rate = "3M"
[jobs.same-chain]
source = "{vol}"
repository = "{repo}"
chain = "shared"
schedule = "hourly"
init = true
[jobs.other-chain]
source = "{vol}"
repository = "{repo}"
chain = "other"
schedule = "hourly"
init = true
''', tmp_path / "history.sqlite")  # fmt: skip
    clock = Clock("2026-11-27T00:58")
    agent = Agent(str(f), clock=clock, log=lambda _l: None)
    # at 01:00 all three are due: the two on chain "shared" do not start together
    first = agent.step(clock.set("2026-11-27T01:00"))
    assert sorted(first) == ["often", "other-chain"], first
    assert agent.step(clock.set("2026-11-27T01:05")) == []  # often is still running: no second run of it
    agent.wait(120)
    assert sorted(agent.step(clock.set("2026-11-27T01:06"))) == ["same-chain"]  # its turn, now the chain is free
    agent.wait(120)
    assert agent.step(clock.set("2026-11-27T01:07")) == ["often"]  # its 01:05 slot, once
    agent.wait(120)
    assert all(code == 0 for _n, code in agent.finished), agent.finished
    with History(str(tmp_path / "history.sqlite")) as h:
        runs = sorted(h.runs(), key=lambda r: r["started"])
        for a, b in itertools.pairwise(runs):  # runs of chain "shared" one after another
            if {a["job"], b["job"]} <= {"often", "same-chain"}:
                assert a["ended"] <= b["started"], (a, b)


# -- a real agent process -----------------------------------------------------------------------------------


def seed_history(path: Path, job: str, slot: float) -> None:
    """A run on schedule long ago, so that the job is due (a catch-up) the moment an agent starts."""
    with History(str(path)) as h:
        rid = h.start(job, slot)
        h.finish(rid, "ok")


def test_sigterm_during_a_backup_aborts_it_cleanly(tmp_path: Path) -> None:
    vol = tmp_path / "vol.img"
    vol.write_bytes(os.urandom(24 * MiB))
    repo = tmp_path / "repo"
    hist = tmp_path / "history.sqlite"
    f = write_config(tmp_path / "jobs.toml", f'''
[jobs.slow]
source = "{vol}"
repository = "{repo}"
schedule = "hourly"
init = true
max_read_rate = "2M"
''', hist)  # fmt: skip
    seed_history(hist, "slow", time.time() - 2 * 86400)
    agent = subprocess.Popen([exe(), "agent", "--config", str(f)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not list(tmp_path.rglob("*.tmp-*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert list(tmp_path.rglob("*.tmp-*")), "the backup never started writing"
    agent.send_signal(signal.SIGTERM)
    _out, err = agent.communicate(timeout=60)
    assert agent.returncode == 143, err
    assert "stopping (SIGTERM)" in err and "job slow ended: exit 143" in err, err
    with History(str(hist)) as h:
        last = h.last("slow")
    assert last is not None and last["result"] == "aborted" and last["exit_code"] == 143
    assert not Repository.open(str(repo)).catalog().points and not list(repo.rglob("*.tmp-*"))


def test_sighup_reloads_and_a_bad_file_is_refused(tmp_path: Path) -> None:
    vol = tmp_path / "vol.img"
    write_volume(vol, MiB, seed=3)
    hist = tmp_path / "history.sqlite"
    job = f'[jobs.a]\nsource = "{vol}"\nrepository = "{tmp_path / "repo"}"\nschedule = "daily 03:00"\ninit = true\n'
    f = write_config(tmp_path / "jobs.toml", job, hist)
    agent = subprocess.Popen([exe(), "agent", "--config", str(f)], stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.5)
        write_config(f, job + job.replace("[jobs.a]", "[jobs.b]"), hist)
        agent.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        f.write_text(f.read_text() + "\n[jobs.c]\nsource = 1\n")
        agent.send_signal(signal.SIGHUP)
        time.sleep(1.0)
    finally:
        agent.send_signal(signal.SIGTERM)
        _out, err = agent.communicate(timeout=30)
    assert agent.returncode == 143
    assert "running 1 job(s)" in err and "reloaded" in err and "2 job(s)" in err, err
    assert "reload refused, the jobs go on as they were" in err and "job 'c'" in err, err


# -- notifications and the jobs commands -------------------------------------------------------------------


class _Hook(http.server.BaseHTTPRequestHandler):
    posts: ClassVar[list[dict[str, Any]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.posts.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_a: object) -> None:
        pass


def test_notifications_history_and_jobs_commands(tmp_path: Path) -> None:
    vol = tmp_path / "vol.img"
    write_volume(vol, 2 * MiB, seed=5)
    server = http.server.HTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hook = f"http://127.0.0.1:{server.server_port}/imagechain"
    told = tmp_path / "told.json"
    f = write_config(tmp_path / "jobs.toml", f'''
[notify]
command = "cat > {told}; echo \\"$IMAGECHAIN_JOB $IMAGECHAIN_RESULT\\" >> {tmp_path / 'lines'}"
webhook = "{hook}"
[jobs.good]
source = "{vol}"
repository = "{tmp_path / 'repo'}"
schedule = "daily 02:00"
init = true
full_every = "1s"
[jobs.bad]
source = "{vol}"
repository = "{tmp_path / 'not-a-repo'}"
schedule = "daily 02:00"
[jobs.loud]
source = "{vol}"
repository = "{tmp_path / 'repo'}"
chain = "loud"
schedule = "weekly"
notify = {{ on_success = true, webhook = "http://127.0.0.1:1/nobody" }}
''', tmp_path / "history.sqlite")  # fmt: skip
    try:
        ok = subprocess.run([exe(), "jobs", "run", "good", "--config", str(f), "--json"], capture_output=True,
                            text=True)  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout)["kind"] == "full" and not told.exists() and not _Hook.posts  # no news
        time.sleep(1.1)
        again = subprocess.run([exe(), "jobs", "run", "good", "--config", str(f), "--json"], capture_output=True,
                               text=True)  # fmt: skip
        assert json.loads(again.stdout)["kind"] == "full" and json.loads(again.stdout)["backup"]["full_because"]
        bad = subprocess.run([exe(), "jobs", "run", "bad", "--config", str(f)], capture_output=True, text=True)
        assert bad.returncode == 4 and "job bad failed" in bad.stderr and len(error_lines(bad.stderr)) == 1
        sent = json.loads(told.read_text())
        assert sent["job"] == "bad" and sent["result"] == "failed" and "not-a-repo" in sent["error"]
        assert (tmp_path / "lines").read_text() == "bad failed\n"
        assert [p["job"] for p in _Hook.posts] == ["bad"] and _Hook.posts[0]["exit_code"] == 4
        loud = subprocess.run([exe(), "jobs", "run", "loud", "--config", str(f)], capture_output=True, text=True)
        assert loud.returncode == 0 and "notice: webhook http://127.0.0.1:1/nobody not reached" in loud.stderr
        assert (tmp_path / "lines").read_text() == "bad failed\nloud ok\n"
    finally:
        server.shutdown()
    listed = json.loads(subprocess.run([exe(), "jobs", "list", "--config", str(f), "--json"], capture_output=True,
                                       text=True, check=True).stdout)  # fmt: skip
    by = {r["job"]: r for r in listed}
    assert by["good"]["last_result"] == "ok" and by["bad"]["last_result"] == "failed"
    assert by["good"]["next_run"] > time.time() and by["good"]["cron"] == "0 2 * * *"
    hist = json.loads(subprocess.run([exe(), "jobs", "history", "--config", str(f), "--json"], capture_output=True,
                                     text=True, check=True).stdout)  # fmt: skip
    assert [r["job"] for r in hist] == ["loud", "bad", "good", "good"]
    assert hist[0]["detail"]["notify_problems"] and hist[1]["exit_code"] == 4 and hist[3]["bytes_read"] > 0
    text = subprocess.run([exe(), "jobs", "history", "good", "--config", str(f)], capture_output=True, text=True)
    assert text.returncode == 0 and text.stdout.count("good: ok") == 2
    one = subprocess.run([exe(), "jobs", "history", "--config", str(f), "--json", "--limit", "1"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert [r["job"] for r in json.loads(one.stdout)] == ["loud"]
    for bad in ("0", str(1 << 70)):  # past SQLite's integers: an OverflowError traceback
        r = subprocess.run([exe(), "jobs", "history", "--config", str(f), "--limit", bad], capture_output=True,
                           text=True)  # fmt: skip
        assert r.returncode == 2 and "Traceback" not in r.stderr and "--limit" in r.stderr, r.stderr


def test_the_agent_runs_jobs_as_python_dash_m(tmp_path: Path) -> None:
    """The agent starts runs with `python -m imagechain`: that entry point exists and behaves as the script."""
    r = subprocess.run([sys.executable, "-m", "imagechain", "jobs", "run", "x", "--config", str(tmp_path / "none")],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and "no job file" in r.stderr


def test_the_systemd_units_verify(tmp_path: Path) -> None:
    """contrib/systemd's agent unit and the timer alternative are units systemd accepts."""
    import shutil

    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    here = Path(__file__).resolve().parent.parent / "contrib" / "systemd"
    names = {"imagechain-agent.service": "imagechain-agent.service",
             "imagechain-job@.service": "imagechain-job@nightly.service",
             "imagechain-job@.timer": "imagechain-job@nightly.timer"}  # fmt: skip
    for src, dst in names.items():  # the binary where the units expect it, on this machine
        (tmp_path / dst).write_text((here / src).read_text().replace("/usr/local/bin/imagechain", exe()))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", *(str(tmp_path / d) for d in names.values())],
                       capture_output=True, text=True, env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})  # fmt: skip
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def test_a_run_whose_process_vanished_shows_as_interrupted(tmp_path: Path) -> None:
    with History(str(tmp_path / "h.sqlite")) as h:
        mine = h.start("alive", None)  # this process: still running
        gone = h.start("killed", None)
        h.db.execute("UPDATE runs SET pid = ? WHERE id = ?", (2**22 + 4321, gone))  # above pid_max: no such process
        reused = h.start("reused", None)
        h.db.execute("UPDATE runs SET pid_start = '1' WHERE id = ?", (reused,))  # our pid, another start time
        by = {r["job"]: r["result"] for r in h.runs()}
        assert by == {"alive": "running", "killed": "interrupted", "reused": "interrupted"}
        h.finish(mine, "ok")
        assert h.last("alive")["result"] == "ok"  # type: ignore[index]
