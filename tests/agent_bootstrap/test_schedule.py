from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from agent_bootstrap.schedule import Window, is_open, next_change

WEEKNIGHTS = Window(days=("mon", "tue", "wed", "thu", "fri"), start="22:00", end="08:00")
# 2030-01-07 is a Monday.
MON, TUE, FRI, SAT, SUN = (datetime(2030, 1, d) for d in (7, 8, 11, 12, 13))


def at(day: datetime, hhmm: str, zone: str = "UTC") -> datetime:
    h, m = map(int, hhmm.split(":"))
    return day.replace(hour=h, minute=m, tzinfo=ZoneInfo(zone))


@pytest.mark.parametrize(
    ("moment", "expected"),
    [
        (at(MON, "21:59"), False),
        (at(MON, "22:00"), True),  # the start is included
        (at(MON, "23:59"), True),
        (at(TUE, "00:00"), True),  # Monday's window, after midnight
        (at(TUE, "07:59"), True),
        (at(TUE, "08:00"), False),  # the end is not
        (at(TUE, "12:00"), False),
        (at(MON, "03:00"), False),  # Sunday night is not in the window
        (at(FRI, "23:00"), True),
        (at(SAT, "07:00"), True),  # Friday's window ends Saturday morning
        (at(SAT, "23:00"), False),
        (at(SUN, "23:00"), False),
    ],
)
def test_a_window_across_midnight_belongs_to_the_day_it_starts(
    moment: datetime, expected: bool
) -> None:
    assert is_open([WEEKNIGHTS], moment, "UTC") is expected


def test_a_daytime_window_and_days_of_week() -> None:
    weekend_days = Window(days=("sat", "sun"), start="09:00", end="17:00")
    assert is_open([weekend_days], at(SAT, "09:00"), "UTC")
    assert not is_open([weekend_days], at(SAT, "17:00"), "UTC")
    assert not is_open([weekend_days], at(MON, "12:00"), "UTC")
    assert is_open([WEEKNIGHTS, weekend_days], at(SUN, "12:00"), "UTC")


def test_start_equal_to_end_is_the_whole_day_and_no_windows_is_always() -> None:
    all_saturday = Window(days=("sat",), start="00:00", end="00:00")
    assert is_open([all_saturday], at(SAT, "00:00"), "UTC")
    assert is_open([all_saturday], at(SAT, "23:59"), "UTC")
    assert not is_open([all_saturday], at(SUN, "00:00"), "UTC")
    assert is_open([], at(TUE, "12:00"), "UTC")


def test_utc_versus_a_named_zone() -> None:
    # 03:30 UTC on Tuesday is 22:30 Monday in New York (EST, UTC-5).
    instant = at(TUE, "03:30")
    monday_evening = Window(days=("mon",), start="22:00", end="23:00")
    assert is_open([monday_evening], instant, "America/New_York")
    assert not is_open([monday_evening], instant, "UTC")
    assert not is_open([monday_evening], instant + timedelta(hours=5), "America/New_York")
    utc_only = Window(start="03:00", end="04:00")
    assert is_open([utc_only], instant, "UTC")
    assert not is_open([utc_only], instant, "America/New_York")


@pytest.fixture
def new_york_local_time(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_local_means_the_machine_zone(new_york_local_time: None) -> None:
    instant = at(TUE, "03:30")  # 22:30 Monday in New York
    monday_evening = Window(days=("mon",), start="22:00", end="23:00")
    assert is_open([monday_evening], instant, "local")
    assert not is_open([monday_evening], instant, "UTC")


def test_local_time_follows_daylight_saving(new_york_local_time: None) -> None:
    evening = Window(start="22:00", end="23:00")
    winter = datetime(2030, 1, 8, 3, 30, tzinfo=UTC)  # 22:30 EST
    summer = datetime(2030, 7, 9, 2, 30, tzinfo=UTC)  # 22:30 EDT
    assert is_open([evening], winter, "local") and is_open([evening], summer, "local")
    assert not is_open([evening], winter - timedelta(hours=1), "local")


def test_next_change() -> None:
    assert next_change([WEEKNIGHTS], at(MON, "12:00"), "UTC") == at(MON, "22:00")
    assert next_change([WEEKNIGHTS], at(MON, "23:00"), "UTC") == at(TUE, "08:00")
    assert next_change([], at(MON, "12:00"), "UTC") is None


def test_windows_are_validated() -> None:
    with pytest.raises(ValidationError):
        Window(start="25:00", end="08:00")
    with pytest.raises(ValidationError):
        Window(start="8am", end="09:00")
    with pytest.raises(ValidationError):
        Window(days=("mon", "mon"), start="08:00", end="09:00")
    with pytest.raises(ValidationError):
        Window(days=("funday",), start="08:00", end="09:00")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        Window(days=(), start="08:00", end="09:00")
    with pytest.raises(ValueError, match="aware"):
        is_open([WEEKNIGHTS], datetime(2030, 1, 7, 12, 0), "UTC")
    with pytest.raises(ValueError, match="unknown time zone"):
        is_open([WEEKNIGHTS], at(MON, "12:00"), "Mars/Olympus")
