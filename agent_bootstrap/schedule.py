"""When the provider lends its GPU: `[[schedule]]` windows of `provider.toml`.

A window has days of the week and a start and end time (`"22:00"` to `"08:00"`). When the
end is earlier than the start the window crosses midnight and belongs to the day it starts
on: `days = ["fri"]`, 22:00–08:00 is open from Friday 22:00 to Saturday 08:00. A window
whose start equals its end is open all day on its days. No windows: always open. The start
is included, the end is not.

Times are wall-clock times in the config's `timezone`: `"local"` (the machine's zone, with
its daylight-saving rules at each instant), `"UTC"`, or an IANA name (`"Europe/Berlin"`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, time, timedelta
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator

Day = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
DAYS: tuple[Day, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
LOCAL = "local"


class Window(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    days: tuple[Day, ...] = Field(default=DAYS, min_length=1)
    start: time
    end: time

    @field_validator("days")
    @classmethod
    def _unique_days(cls, days: tuple[Day, ...]) -> tuple[Day, ...]:
        if len(set(days)) != len(days):
            raise ValueError("a day is listed twice")
        return days

    @field_validator("start", "end", mode="before")
    @classmethod
    def _hh_mm(cls, value: object) -> object:
        if isinstance(value, str):
            try:
                return datetime.strptime(value, "%H:%M").time()
            except ValueError:
                raise ValueError(f"{value!r} is not a time of day as HH:MM") from None
        return value

    @field_serializer("start", "end")
    def _as_text(self, value: time) -> str:
        return value.strftime("%H:%M")

    @property
    def crosses_midnight(self) -> bool:
        return self.end < self.start

    def is_open(self, local: datetime) -> bool:
        """Whether `local` (a wall-clock time in the schedule's zone) is in this window."""
        day = DAYS[local.weekday()]
        previous = DAYS[(local.weekday() - 1) % 7]
        now = local.time().replace(tzinfo=None)
        if self.start == self.end:
            return day in self.days
        if not self.crosses_midnight:
            return day in self.days and self.start <= now < self.end
        # Crossing midnight: the evening part on its own days, the morning part the day after.
        return (day in self.days and now >= self.start) or (
            previous in self.days and now < self.end
        )


def resolve_zone(name: str) -> ZoneInfo | None:
    """The zone of a config `timezone`; None means the machine's local time."""
    if name == LOCAL:
        return None
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {name!r}: use 'local', 'UTC' or an IANA name"
        ) from None


def wall_clock(at: datetime, timezone: str = LOCAL) -> datetime:
    """`at` (an aware datetime) as a wall-clock time in `timezone`."""
    if at.tzinfo is None:
        raise ValueError("schedules need an aware datetime (with a time zone)")
    zone = resolve_zone(timezone)
    return at.astimezone() if zone is None else at.astimezone(zone)


def is_open(windows: Sequence[Window], at: datetime, timezone: str = LOCAL) -> bool:
    """Whether the schedule lends the GPU at instant `at`."""
    if not windows:
        return True
    local = wall_clock(at, timezone)
    return any(w.is_open(local) for w in windows)


def next_change(
    windows: Sequence[Window], at: datetime, timezone: str = LOCAL, horizon_days: int = 8
) -> datetime | None:
    """The next minute at which `is_open` changes (for `darkgpu status`), or None."""
    if not windows:
        return None
    state = is_open(windows, at, timezone)
    probe = at.replace(second=0, microsecond=0) + timedelta(minutes=1)
    for _ in range(horizon_days * 24 * 60):
        if is_open(windows, probe, timezone) != state:
            return probe
        probe += timedelta(minutes=1)
    return None
