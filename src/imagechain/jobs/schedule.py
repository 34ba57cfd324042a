"""When a job runs: a cron expression (croniter), or a friendly form that stands for one.

Friendly forms: `hourly` (at :00), `hourly :MM`, `daily` (00:00), `daily HH:MM`, `weekly` (Sunday 00:00),
`weekly DAY HH:MM` (DAY: mon..sun), `monthly` (the 1st, 00:00), `monthly D HH:MM`. Times are read on the
machine's local wall clock, as cron reads them: a daily job runs once a day at its hour in summer and in
winter. A time the clock skips when it goes forward runs as much later as the clock jumped (02:30 at
03:30); a time it passes twice when it goes back runs once, the first time."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from croniter import croniter

DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_FULL_DAYS = ("sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday")
_TIME = r"([01]?\d|2[0-3]):([0-5]\d)"


@dataclass(frozen=True)
class Schedule:
    text: str  # as written
    cron: str  # the cron expression it stands for

    def next_after(self, ts: float) -> float:
        """The first scheduled moment strictly after ts (seconds since the epoch).

        croniter is given the naive wall-clock time, never an aware one: with the fixed offset of
        `astimezone()` it went on in summer time after the clocks went back (a daily 02:30 ran at 01:30 and
        again at 02:30 the next day), and with a real zone it ran a daily job twice in the repeated hour."""
        after = croniter(self.cron, datetime.fromtimestamp(ts))
        while True:
            # naive timestamp(): a skipped time maps past the jump, a repeated one to its first pass, which
            # may lie before ts when ts is in the second pass (then the next slot is meant)
            at = after.get_next(datetime).timestamp()
            if at > ts:
                return at


# cron's own nicknames, as crontab(5) defines them
_NICKNAMES = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@weekly": "0 0 * * 0",
              "@monthly": "0 0 1 * *", "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *"}  # fmt: skip


def parse(text: str) -> Schedule:
    """A schedule; ValueError saying what is wrong."""
    t = " ".join(text.lower().split())
    m = re.fullmatch(r"hourly(?: :([0-5]\d))?", t)
    if m:
        return Schedule(text, f"{int(m.group(1) or 0)} * * * *")
    m = re.fullmatch(rf"daily(?: {_TIME})?", t)
    if m:
        return Schedule(text, f"{int(m.group(2) or 0)} {int(m.group(1) or 0)} * * *")
    m = re.fullmatch(rf"weekly(?: ([a-z]+) {_TIME})?", t)
    if m:
        day = m.group(1) or "sun"
        if day not in DAYS and day not in _FULL_DAYS:
            raise ValueError(f"unknown day {m.group(1)!r} (mon, tue, wed, thu, fri, sat, sun)")
        return Schedule(text, f"{int(m.group(3) or 0)} {int(m.group(2) or 0)} * * {DAYS.index(day[:3])}")
    m = re.fullmatch(rf"monthly(?: (\d{{1,2}}) {_TIME})?", t)
    if m:
        day_of_month = int(m.group(1) or 1)
        if not 1 <= day_of_month <= 28:
            raise ValueError("a monthly day must be 1 to 28 (every month has it)")
        return Schedule(text, f"{int(m.group(3) or 0)} {int(m.group(2) or 0)} {day_of_month} * *")
    if t in _NICKNAMES:
        return Schedule(text, _NICKNAMES[t])
    if t == "@reboot":
        raise ValueError("'@reboot' is no schedule here: the agent runs a job missed while it was down once when "
                         "it starts")  # fmt: skip
    if t.split(" ")[0] in ("hourly", "daily", "weekly", "monthly"):
        raise ValueError(f"{text!r}: write e.g. 'hourly', 'hourly :15', 'daily 02:00', 'weekly sun 03:00', "
                         f"'monthly 1 04:00'")  # fmt: skip
    if len(t.split(" ")) != 5 or not croniter.is_valid(t):
        raise ValueError(f"{text!r} is neither a cron expression (5 fields: minute hour day month weekday) "
                         f"nor 'hourly', 'daily HH:MM', 'weekly DAY HH:MM', 'monthly D HH:MM'")  # fmt: skip
    return Schedule(text, t)
