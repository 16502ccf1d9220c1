"""Usage rollups: exact sums per window and group, reruns, late records and window edges.

`owner` and `outsider` come from tests/conftest.py: two accounts, each with one access key.
"""

import itertools
import re
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import pytest
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import RestrictedError
from django.test.utils import CaptureQueriesContext

from gateway import rollups, tasks
from gateway.models import AccessKey, UsageRecord, UsageRollup
from gateway.rollups import (
    METRICS,
    RollupError,
    WindowRefresh,
    usage_rollup_windows_due,
    usage_rollups_complete_until,
    usage_rollups_refresh,
    usage_rollups_refresh_due,
)
from gateway.services import access_key_create

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)
MICROSECOND = timedelta(microseconds=1)
# A Monday well in the past, so every window in these tests has closed.
MONDAY = datetime(2025, 3, 10, tzinfo=UTC)
_request_ids = itertools.count()


# Fixtures and helpers


@pytest.fixture
def second_key(owner) -> AccessKey:
    return access_key_create(account=owner.account, name="batch", scopes=["inference"]).access_key


def record(
    account,
    *,
    at: datetime,
    key: AccessKey | None = None,
    provider: str = "openai",
    model: str = "gpt-4o-mini",
    status: str = UsageRecord.Status.SUCCEEDED,
    estimated: bool = False,
    input_tokens: int = 0,
    output_tokens: int = 0,
    cache_read_tokens: int = 0,
    cache_write_tokens: int = 0,
    reasoning_tokens: int = 0,
    fee_nanousd: int = 0,
    model_cost_nanousd: int = 0,
) -> UsageRecord:
    """Write a usage record as metering does, with `cost = fee + model cost`."""
    return UsageRecord.objects.create(
        request_id=f"req_{next(_request_ids)}",
        account=account,
        access_key=key,
        provider=provider,
        model=model,
        surface="openai",
        key_source=UsageRecord.KeySource.BUILTIN,
        status=status,
        usage_estimated=estimated,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_tokens=cache_read_tokens,
        cache_write_tokens=cache_write_tokens,
        reasoning_tokens=reasoning_tokens,
        fee_nanousd=fee_nanousd,
        model_cost_nanousd=model_cost_nanousd,
        cost_nanousd=fee_nanousd + model_cost_nanousd,
        created_at=at,
    )


def rollup_rows(period: str, window_start: datetime | None = None) -> dict[tuple, dict]:
    """Return the rollups of a period as {(window, account, key, provider, model): sums}."""
    rows = UsageRollup.objects.filter(period=period)
    if window_start is not None:
        rows = rows.filter(window_start=window_start)
    return {
        (row.window_start, row.account_id, row.access_key_id, row.provider, row.model): {
            name: getattr(row, name) for name in METRICS
        }
        for row in rows
    }


def expected_rows(period: str, records) -> dict[tuple, dict]:
    """Sum records per window and group in Python, independently of the service."""
    sums: dict[tuple, dict] = defaultdict(lambda: dict.fromkeys(METRICS, 0))
    for item in records:
        at = item.created_at.astimezone(UTC)
        window = at.replace(minute=0, second=0, microsecond=0)
        if period == "day":
            window = window.replace(hour=0)
        row = sums[(window, item.account_id, item.access_key_id, item.provider, item.model)]
        row["request_count"] += 1
        row["succeeded_count"] += item.status == "succeeded"
        row["failed_count"] += item.status in ("upstream_error", "failed")
        row["estimated_count"] += item.usage_estimated
        for name in METRICS:
            if name.endswith("_tokens") or name.endswith("_nanousd"):
                row[name] += getattr(item, name)
    return dict(sums)


def varied_records(owner, outsider, second_key, *, start: datetime) -> list[UsageRecord]:
    """Write records of two accounts, three keys (and none), three models and every status."""
    keys = [owner.key.access_key, second_key, None]
    models = [("openai", "gpt-4o-mini"), ("anthropic", "claude-haiku-4-5"), ("my-vllm", "llama")]
    statuses = list(UsageRecord.Status)
    written = []
    for number in range(60):
        provider, model = models[number % 3]
        tenant = outsider if number % 7 == 0 else owner
        key = outsider.key.access_key if tenant is outsider else keys[number % 3]
        written.append(
            record(
                tenant.account,
                # Spread over about 50 hours, into three UTC days.
                at=start + timedelta(minutes=50 * number, seconds=number, microseconds=number),
                key=key,
                provider=provider,
                model=model,
                status=statuses[number % 4],
                estimated=number % 5 == 0,
                input_tokens=1000 + number,
                output_tokens=300 + 7 * number,
                cache_read_tokens=11 * number,
                cache_write_tokens=3 * number,
                reasoning_tokens=number,
                # Not round numbers: the sums must hold to the nano-dollar.
                fee_nanousd=65_003 + 17 * number,
                model_cost_nanousd=0 if number % 3 == 2 else 1_234_567 + 1_000_003 * number,
            )
        )
    return written


# Exactness


def test_refresh_sums_hour_per_group(owner, outsider, second_key):
    window = MONDAY + 9 * HOUR
    key = owner.key.access_key
    record(
        owner.account,
        at=window,
        key=key,
        input_tokens=1200,
        output_tokens=345,
        cache_read_tokens=100,
        cache_write_tokens=20,
        reasoning_tokens=45,
        fee_nanousd=83_250,
        model_cost_nanousd=417_000_001,
    )
    record(
        owner.account,
        at=window + 59 * timedelta(minutes=1),
        key=key,
        estimated=True,
        input_tokens=10,
        output_tokens=5,
        fee_nanousd=750,
        model_cost_nanousd=9,
    )
    record(
        owner.account,
        at=window + HOUR - MICROSECOND,
        key=key,
        status=UsageRecord.Status.UPSTREAM_ERROR,
    )
    record(owner.account, at=window + 30 * timedelta(minutes=1), key=key, model="gpt-4o")
    record(owner.account, at=window, key=second_key, status=UsageRecord.Status.ABORTED)
    record(outsider.account, at=window, key=outsider.key.access_key, fee_nanousd=5)
    # Outside the window on both sides.
    record(owner.account, at=window - MICROSECOND, key=key, fee_nanousd=1)
    record(owner.account, at=window + HOUR, key=key, fee_nanousd=2)

    refresh = usage_rollups_refresh(period="hour", window_start=window)

    assert refresh == WindowRefresh(rows=4, changed=True)
    zero = dict.fromkeys(METRICS, 0)
    assert rollup_rows("hour") == {
        (window, owner.account.pk, key.pk, "openai", "gpt-4o-mini"): {
            **zero,
            "request_count": 3,
            "succeeded_count": 2,
            "failed_count": 1,
            "estimated_count": 1,
            "input_tokens": 1210,
            "output_tokens": 350,
            "cache_read_tokens": 100,
            "cache_write_tokens": 20,
            "reasoning_tokens": 45,
            "fee_nanousd": 84_000,
            "model_cost_nanousd": 417_000_010,
            "cost_nanousd": 417_084_010,
        },
        (window, owner.account.pk, key.pk, "openai", "gpt-4o"): {
            **zero,
            "request_count": 1,
            "succeeded_count": 1,
        },
        (window, owner.account.pk, second_key.pk, "openai", "gpt-4o-mini"): {
            **zero,
            "request_count": 1,
        },
        (window, outsider.account.pk, outsider.key.access_key.pk, "openai", "gpt-4o-mini"): {
            **zero,
            "request_count": 1,
            "succeeded_count": 1,
            "fee_nanousd": 5,
            "cost_nanousd": 5,
        },
    }


def test_rollups_equal_records_per_group(owner, outsider, second_key):
    written = varied_records(owner, outsider, second_key, start=MONDAY + 21 * HOUR)

    # The first run covers the whole history: every closed hour and day with records.
    usage_rollups_refresh_due(at=MONDAY + 4 * DAY)

    assert rollup_rows("hour") == expected_rows("hour", written)
    assert rollup_rows("day") == expected_rows("day", written)
    assert len(rollup_rows("day")) > 9
    for period in ("hour", "day"):
        for name in METRICS:
            assert sum(row[name] for row in rollup_rows(period).values()) == sum(
                row[name] for row in expected_rows(period, written).values()
            )
    total_cost = sum(item.cost_nanousd for item in written)
    assert sum(row["cost_nanousd"] for row in rollup_rows("day").values()) == total_cost
    # Fees 3,930,270 plus model costs 1,209,386,160 nano-dollars.
    assert total_cost == 1_213_316_430


def test_refresh_groups_keyless_records(owner):
    window = MONDAY + 9 * HOUR
    record(owner.account, at=window, fee_nanousd=7)
    record(owner.account, at=window + HOUR / 2, fee_nanousd=8)

    usage_rollups_refresh(period="hour", window_start=window)
    usage_rollups_refresh(period="hour", window_start=window)

    rows = rollup_rows("hour")
    assert list(rows) == [(window, owner.account.pk, None, "openai", "gpt-4o-mini")]
    assert rows[(window, owner.account.pk, None, "openai", "gpt-4o-mini")]["fee_nanousd"] == 15


def test_refresh_uses_one_group_by(owner, second_key):
    for minute in range(0, 60, 10):
        record(owner.account, at=MONDAY + timedelta(minutes=minute), key=second_key)

    with CaptureQueriesContext(connection) as queries:
        usage_rollups_refresh(period="hour", window_start=MONDAY)

    reads = [query["sql"] for query in queries if "gateway_usagerecord" in query["sql"]]
    assert len(reads) == 1
    assert "GROUP BY" in reads[0]
    assert UsageRollup.objects.get().request_count == 6


def test_constraint_rejects_duplicate_keyless_group(owner):
    values = {
        "period": "hour",
        "window_start": MONDAY,
        "account": owner.account,
        "access_key": None,
        "provider": "openai",
        "model": "gpt-4o-mini",
    }
    UsageRollup.objects.create(**values)

    with pytest.raises(IntegrityError), transaction.atomic():
        UsageRollup.objects.create(**values)
    UsageRollup.objects.create(**{**values, "access_key": owner.key.access_key})

    assert UsageRollup.objects.count() == 2


# Reruns


def test_refresh_rerun_changes_nothing(owner, outsider, second_key):
    written = varied_records(owner, outsider, second_key, start=MONDAY)
    usage_rollups_refresh_due(at=MONDAY + 3 * DAY)
    before = list(UsageRollup.objects.order_by("pk").values())

    again = usage_rollups_refresh(period="hour", window_start=MONDAY + 2 * HOUR)
    windows = usage_rollups_refresh_due(at=MONDAY + 3 * DAY)

    assert again == WindowRefresh(rows=1, changed=False)
    # Nothing closed since the last run but the day the lookback still reaches.
    assert windows == 1
    assert list(UsageRollup.objects.order_by("pk").values()) == before
    assert rollup_rows("hour") == expected_rows("hour", written)


def test_refresh_rewrites_changed_window(owner):
    window = MONDAY + 9 * HOUR
    record(owner.account, at=window, fee_nanousd=100)
    usage_rollups_refresh(period="hour", window_start=window)
    first_id = UsageRollup.objects.get().pk

    record(owner.account, at=window + HOUR / 2, fee_nanousd=23)
    refresh = usage_rollups_refresh(period="hour", window_start=window)

    assert refresh == WindowRefresh(rows=1, changed=True)
    row = UsageRollup.objects.get()
    assert row.pk != first_id
    assert row.request_count == 2
    assert row.fee_nanousd == 123
    assert row.cost_nanousd == 123


def test_refresh_empties_window_without_records(owner):
    window = MONDAY + 9 * HOUR
    stale = record(owner.account, at=window, fee_nanousd=100)
    usage_rollups_refresh(period="hour", window_start=window)
    stale.delete()

    assert usage_rollups_refresh(period="hour", window_start=window) == WindowRefresh(
        rows=0, changed=True
    )
    assert UsageRollup.objects.count() == 0


# Windows due: catch-up, lookback, late records


def test_refresh_due_includes_late_record(owner):
    key = owner.key.access_key
    group = (MONDAY + 9 * HOUR, owner.account.pk, key.pk, "openai", "gpt-4o-mini")
    record(owner.account, at=MONDAY + 9 * HOUR + HOUR / 2, key=key, fee_nanousd=40)
    usage_rollups_refresh_due(at=MONDAY + 10 * HOUR + timedelta(seconds=1))
    assert rollup_rows("hour")[group]["fee_nanousd"] == 40

    # Batched metering committed this record after the run, stamped with 09:59:59.9.
    late = MONDAY + 10 * HOUR - timedelta(milliseconds=100)
    record(owner.account, at=late, key=key, fee_nanousd=2)
    usage_rollups_refresh_due(at=MONDAY + 10 * HOUR + 5 * timedelta(minutes=1))

    row = rollup_rows("hour")[group]
    assert row["request_count"] == 2
    assert row["fee_nanousd"] == 42
    assert row["cost_nanousd"] == 42


def test_refresh_due_lookback_windows(owner):
    for hour in range(24):
        record(owner.account, at=MONDAY + hour * HOUR, fee_nanousd=1)

    assert usage_rollup_windows_due(period="hour", at=MONDAY + DAY + 2 * HOUR) == [
        MONDAY + hour * HOUR for hour in range(24)
    ]
    usage_rollups_refresh_due(at=MONDAY + DAY + 2 * HOUR)

    assert usage_rollup_windows_due(period="hour", at=MONDAY + DAY + 2 * HOUR) == [
        MONDAY + 23 * HOUR
    ]
    assert usage_rollup_windows_due(period="day", at=MONDAY + DAY + 2 * HOUR) == [MONDAY]
    # At 03:00 the lookback reaches back to midnight only: nothing closed is left to redo.
    assert usage_rollup_windows_due(period="day", at=MONDAY + DAY + 3 * HOUR) == []
    assert usage_rollup_windows_due(period="hour", at=MONDAY + DAY + 3 * HOUR) == []
    assert (
        rollup_rows("day")[(MONDAY, owner.account.pk, None, "openai", "gpt-4o-mini")][
            "request_count"
        ]
        == 24
    )


def test_record_past_lookback_needs_explicit_refresh(owner):
    record(owner.account, at=MONDAY + 9 * HOUR, fee_nanousd=10)
    usage_rollups_refresh_due(at=MONDAY + 10 * HOUR)
    record(owner.account, at=MONDAY + 9 * HOUR + HOUR / 2, fee_nanousd=5)

    usage_rollups_refresh_due(at=MONDAY + 14 * HOUR)
    group = (MONDAY + 9 * HOUR, owner.account.pk, None, "openai", "gpt-4o-mini")
    assert rollup_rows("hour")[group]["fee_nanousd"] == 10

    tasks.usage_rollups_refresh.delay("hour", (MONDAY + 9 * HOUR).isoformat())
    assert rollup_rows("hour")[group]["fee_nanousd"] == 15


def test_refresh_due_catches_up_in_batches(owner, monkeypatch):
    monkeypatch.setattr(rollups, "WINDOWS_PER_RUN_MAX", 2)
    written = [
        record(owner.account, at=MONDAY + hour * 3 * HOUR, fee_nanousd=hour) for hour in range(5)
    ]
    at = MONDAY + 2 * DAY

    assert usage_rollups_refresh_due(at=at) == 3  # two hours and one day
    assert sorted(window for window, *_ in rollup_rows("hour")) == [MONDAY, MONDAY + 3 * HOUR]
    assert usage_rollups_refresh_due(at=at) == 2
    assert usage_rollups_refresh_due(at=at) == 1
    assert rollup_rows("hour") == expected_rows("hour", written)
    assert usage_rollups_refresh_due(at=at) == 0


def test_refresh_due_skips_open_window(owner):
    now = datetime.now(UTC)
    record(owner.account, at=now - timedelta(seconds=1), fee_nanousd=3)

    usage_rollups_refresh_due(at=now + DAY)

    open_hour = now.replace(minute=0, second=0, microsecond=0)
    assert [window for window, *_ in rollup_rows("hour")] in ([], [open_hour - HOUR])
    assert UsageRollup.objects.filter(window_start__gte=open_hour).count() == 0


# Window boundaries


def test_midnight_splits_day_windows(owner):
    before_midnight = record(owner.account, at=MONDAY + DAY - MICROSECOND, fee_nanousd=1)
    at_midnight = record(owner.account, at=MONDAY + DAY, fee_nanousd=20)

    usage_rollups_refresh_due(at=MONDAY + 3 * DAY)

    group = (owner.account.pk, None, "openai", "gpt-4o-mini")
    fees = {key: row["fee_nanousd"] for key, row in rollup_rows("day").items()}
    assert fees == {(MONDAY, *group): 1, (MONDAY + DAY, *group): 20}
    fees = {key: row["fee_nanousd"] for key, row in rollup_rows("hour").items()}
    assert fees == {(MONDAY + 23 * HOUR, *group): 1, (MONDAY + DAY, *group): 20}
    assert before_midnight.created_at.isoformat() == "2025-03-10T23:59:59.999999+00:00"
    assert at_midnight.created_at.isoformat() == "2025-03-11T00:00:00+00:00"


def test_windows_use_utc_not_display_zone(owner, settings):
    settings.TIME_ZONE = "America/New_York"
    record(owner.account, at=MONDAY + 3 * HOUR, fee_nanousd=9)

    usage_rollups_refresh(period="day", window_start=MONDAY)

    assert list(rollup_rows("day")) == [(MONDAY, owner.account.pk, None, "openai", "gpt-4o-mini")]


# Refusals


@pytest.mark.parametrize(
    ("period", "window_start", "message"),
    [
        ("week", MONDAY, "Invalid period 'week': use hour or day."),
        ("hour", MONDAY + timedelta(minutes=5), "2025-03-10T00:05:00+00:00 is not the start"),
        ("day", MONDAY + HOUR, "2025-03-10T01:00:00+00:00 is not the start of a UTC day."),
        (
            "hour",
            MONDAY.replace(tzinfo=None),
            "window_start has no time zone: pass an aware datetime.",
        ),
        (
            "day",
            datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0),
            "has not closed yet.",
        ),
    ],
)
def test_refresh_rejects_bad_window(owner, period, window_start, message):
    record(owner.account, at=MONDAY, fee_nanousd=1)
    record(owner.account, at=datetime.now(UTC), fee_nanousd=1)

    with pytest.raises(RollupError, match=re.escape(message)):
        usage_rollups_refresh(period=period, window_start=window_start)

    assert UsageRollup.objects.count() == 0


# Completeness, tasks, schedule, deletion


def test_complete_until_stops_at_pending_window(owner, outsider):
    record(owner.account, at=MONDAY + 9 * HOUR, fee_nanousd=1)
    usage_rollups_refresh(period="hour", window_start=MONDAY + 9 * HOUR)
    record(owner.account, at=MONDAY + 11 * HOUR + HOUR / 2, fee_nanousd=1)
    at = MONDAY + 14 * HOUR + timedelta(minutes=2)

    assert usage_rollups_complete_until(account=owner.account, period="hour", at=at) == (
        MONDAY + 11 * HOUR
    )
    assert usage_rollups_complete_until(account=outsider.account, period="hour", at=at) == (
        MONDAY + 14 * HOUR
    )
    assert usage_rollups_complete_until(account=owner.account, period="day", at=at) == MONDAY

    usage_rollups_refresh_due(at=at)

    assert usage_rollups_complete_until(account=owner.account, period="hour", at=at) == (
        MONDAY + 14 * HOUR
    )


def test_tasks_take_iso_strings(owner):
    record(owner.account, at=MONDAY + 9 * HOUR, fee_nanousd=31)

    assert tasks.usage_rollups_refresh.delay("hour", "2025-03-10T09:00:00+00:00").get() == 1
    # The hour is rolled up already; the day closed ten minutes before.
    assert tasks.usage_rollups_refresh_due.delay("2025-03-11T00:10:00+00:00").get() == 1
    assert tasks.usage_rollups_refresh_due.delay("2025-03-11T00:10:00+00:00").get() == 1

    assert {
        (row.period, row.window_start, row.fee_nanousd) for row in UsageRollup.objects.all()
    } == {
        ("hour", MONDAY + 9 * HOUR, 31),
        ("day", MONDAY, 31),
    }


def test_beat_runs_every_five_minutes():
    entry = settings.CELERY_BEAT_SCHEDULE["roll-up-usage"]

    assert entry["task"] == "gateway.tasks.usage_rollups_refresh_due"
    assert entry["schedule"].minute == set(range(0, 60, 5))
    assert tasks.usage_rollups_refresh_due.name == entry["task"]


def test_key_delete_restricted_by_rollups(owner):
    key = owner.key.access_key
    record(owner.account, at=MONDAY, key=key, fee_nanousd=1)
    usage_rollups_refresh(period="day", window_start=MONDAY)

    with pytest.raises(RestrictedError):
        key.delete()
    owner.account.delete()

    assert UsageRollup.objects.count() == 0
    assert AccessKey.objects.filter(pk=key.pk).count() == 0
