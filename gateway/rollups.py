"""Usage rollups: usage records summed per UTC hour and day, and what is read from them.

A window is rolled up once it has closed, by recomputing it from the usage records in
one GROUP BY and replacing all of its rows. Nothing is ever incremented, so a rerun
leaves the rows as they are. The overview API and the usage charts read rollups only.

Batched metering stamps a record before it commits it, which under load can be seconds
later, so a window can gain records after it was rolled up. Every run of
`usage_rollups_refresh_due` therefore recomputes the windows that closed within
`ROLLUP_LOOKBACK`. A record that lands later than that is only counted after an
explicit `usage_rollups_refresh` of its window.
"""

import logging
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta

import pygal
from django.db import connection, transaction
from django.db.models import Count, Max, Min, Q, Sum
from django.db.models.functions import Trunc, TruncDate
from django.utils import timezone
from django.utils.safestring import SafeString, mark_safe
from pygal.style import Style

from accounts.models import Account
from credits.money import ceil_div, format_usd_short
from gateway.models import AccessKey, UsageRecord, UsageRollup

logger = logging.getLogger(__name__)

Period = UsageRollup.Period
PERIOD_LENGTHS = {Period.HOUR: timedelta(hours=1), Period.DAY: timedelta(days=1)}
# Every run recomputes the windows that closed within this time: three hourly windows,
# and the last day for the first three hours after midnight UTC.
ROLLUP_LOOKBACK = timedelta(hours=3)
# A run catches up on at most this many windows of each period, oldest first, and the
# next run goes on from there. This bounds a first run over a long history.
WINDOWS_PER_RUN_MAX = 500
# PostgreSQL advisory lock that serialises refreshes, so two runs cannot both delete a
# window and then both insert it. SQLite already runs one writer at a time. The id is
# "tollroll" in ASCII.
REFRESH_LOCK_ID = 0x746F6C6C_726F6C6C
# Maximum range the overview reads at once, in UTC days (both ends included).
OVERVIEW_MAX_DAYS = {Period.DAY: 400, Period.HOUR: 31}

# Sums kept per rollup row, in the order the API lists them. Tokens are counts and
# `*_nanousd` are nano-dollars.
METRICS = (
    "request_count",
    "succeeded_count",
    "failed_count",
    "estimated_count",
    "input_tokens",
    "output_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "fee_nanousd",
    "model_cost_nanousd",
    "cost_nanousd",
)
RECORD_AGGREGATES = {
    "request_count": Count("id"),
    "succeeded_count": Count("id", filter=Q(status=UsageRecord.Status.SUCCEEDED)),
    "failed_count": Count(
        "id",
        filter=Q(status__in=[UsageRecord.Status.UPSTREAM_ERROR, UsageRecord.Status.FAILED]),
    ),
    "estimated_count": Count("id", filter=Q(usage_estimated=True)),
    **{
        name: Sum(name, default=0)
        for name in METRICS
        if name.endswith("_tokens") or name.endswith("_nanousd")
    },
}


class RollupError(ValueError):
    """A window that cannot be rolled up: unknown period, misaligned or still open."""


def window_floor(*, period: str, at: datetime) -> datetime:
    """Return the start of the UTC hour or day that contains `at`."""
    moment = at.astimezone(UTC)
    if period == Period.HOUR:
        return moment.replace(minute=0, second=0, microsecond=0)
    if period == Period.DAY:
        return moment.replace(hour=0, minute=0, second=0, microsecond=0)
    raise RollupError(f"Invalid period {period!r}: use hour or day.")


def _lock_refreshes() -> None:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(%s)", [REFRESH_LOCK_ID])


GROUP_KEY = ("account_id", "access_key_id", "provider", "model")


@dataclass(frozen=True)
class WindowRefresh:
    """Result of a window refresh: its row count, and whether its rows were rewritten."""

    rows: int
    changed: bool


def _sums(row) -> tuple:
    """Return a row's group and sums, to compare computed rows with stored ones."""
    return (
        tuple(getattr(row, name) for name in GROUP_KEY),
        tuple(getattr(row, name) for name in METRICS),
    )


def usage_rollups_refresh(*, period: str, window_start: datetime) -> WindowRefresh:
    """Recompute one closed window from the usage records and replace its rollup rows.

    The rows are deleted and written again in one transaction, and only when a sum
    differs, so a rerun over unchanged records writes nothing.
    Raises RollupError for an unknown period, a misaligned start or an open window.
    """
    if period not in PERIOD_LENGTHS:
        raise RollupError(f"Invalid period {period!r}: use hour or day.")
    if timezone.is_naive(window_start):
        raise RollupError("window_start has no time zone: pass an aware datetime.")
    start = window_start.astimezone(UTC)
    if window_floor(period=period, at=start) != start:
        raise RollupError(f"{start.isoformat()} is not the start of a UTC {period}.")
    end = start + PERIOD_LENGTHS[period]
    computed_at = timezone.now()
    if end > computed_at:
        raise RollupError(f"The {period} from {start.isoformat()} has not closed yet.")

    with transaction.atomic():
        _lock_refreshes()
        groups = (
            UsageRecord.objects.filter(created_at__gte=start, created_at__lt=end)
            .order_by()
            .values(*GROUP_KEY)
            .annotate(**RECORD_AGGREGATES)
        )
        rows = [
            UsageRollup(
                period=period,
                window_start=start,
                account_id=group["account_id"],
                access_key_id=group["access_key_id"],
                provider=group["provider"],
                model=group["model"],
                computed_at=computed_at,
                # PostgreSQL sums bigint columns as numeric; int() of that Decimal is exact.
                **{name: int(group[name]) for name in METRICS},
            )
            for group in groups
        ]
        stored = UsageRollup.objects.filter(period=period, window_start=start)
        # Groups are unique in a window, so a dict compares them regardless of order.
        if dict(map(_sums, stored)) == dict(map(_sums, rows)):
            return WindowRefresh(rows=len(rows), changed=False)
        stored.delete()
        UsageRollup.objects.bulk_create(rows)
    return WindowRefresh(rows=len(rows), changed=True)


def usage_rollup_windows_due(*, period: str, at: datetime) -> list[datetime]:
    """Return the closed windows to recompute at `at`, oldest first.

    They are the windows after the latest one rolled up and the windows that closed
    within ROLLUP_LOOKBACK, limited to those with records or rollups (an empty window
    needs no rows), and to WINDOWS_PER_RUN_MAX.
    """
    length = PERIOD_LENGTHS[period]
    closed_end = window_floor(period=period, at=at)
    lookback_start = window_floor(period=period, at=at - ROLLUP_LOOKBACK)
    latest = UsageRollup.objects.filter(period=period, window_start__lt=closed_end).aggregate(
        latest=Max("window_start")
    )["latest"]
    if latest is not None:
        first = min(latest + length, lookback_start)
    else:
        earliest = UsageRecord.objects.filter(created_at__lt=closed_end).aggregate(
            earliest=Min("created_at")
        )["earliest"]
        first = lookback_start if earliest is None else window_floor(period=period, at=earliest)
        first = min(first, lookback_start)
    record_windows = (
        UsageRecord.objects.filter(created_at__gte=first, created_at__lt=closed_end)
        .order_by()
        .annotate(window=Trunc("created_at", period, tzinfo=UTC))
        .values_list("window", flat=True)
        .distinct()
    )
    rollup_windows = (
        UsageRollup.objects.filter(
            period=period, window_start__gte=first, window_start__lt=closed_end
        )
        .order_by()
        .values_list("window_start", flat=True)
        .distinct()
    )
    windows = {window.astimezone(UTC) for window in [*record_windows, *rollup_windows]}
    return sorted(windows)[:WINDOWS_PER_RUN_MAX]


def usage_rollups_refresh_due(*, at: datetime) -> int:
    """Recompute the hourly and daily windows closed since the last run, plus the lookback.

    Idempotent: a rerun at the same `at` changes no row. An `at` later than now counts
    as now, so an open window is never rolled up. Returns the number of windows recomputed.
    """
    at = min(at, timezone.now())
    refreshed = changed = 0
    for period in PERIOD_LENGTHS:
        for window_start in usage_rollup_windows_due(period=period, at=at):
            changed += usage_rollups_refresh(period=period, window_start=window_start).changed
            refreshed += 1
    logger.info("Usage rollups recomputed %s windows, %s changed", refreshed, changed)
    return refreshed


def usage_rollups_complete_until(*, account: Account, period: str, at: datetime) -> datetime:
    """Return the time up to which the account's rollups of `period` contain all its records.

    That is the end of the last closed window, unless records of the account lie in
    closed windows after its latest rolled-up window (the refresh has not reached them
    yet): then the start of the first such window.
    """
    closed_end = window_floor(period=period, at=at)
    latest = UsageRollup.objects.filter(
        account=account, period=period, window_start__lt=closed_end
    ).aggregate(latest=Max("window_start"))["latest"]
    pending = UsageRecord.objects.filter(account=account, created_at__lt=closed_end)
    if latest is not None:
        pending = pending.filter(created_at__gte=latest + PERIOD_LENGTHS[period])
    first_pending = pending.aggregate(first=Min("created_at"))["first"]
    if first_pending is None:
        return closed_end
    return window_floor(period=period, at=first_pending)


# The overview: totals, per group and per window, read from rollups only.

GROUP_FIELDS = {
    "model": ("provider", "model"),
    "provider": ("provider",),
    "key": ("access_key_id",),
}


def _zero() -> dict[str, int]:
    return dict.fromkeys(METRICS, 0)


def _add(into: dict[str, int], row: dict) -> None:
    for name in METRICS:
        into[name] += int(row[name])


@dataclass
class OverviewGroup:
    """One group's sums: `group` identifies it ("openai:gpt-4o-mini", "openai", a key id)."""

    group: str
    label: str
    provider: str | None = None
    model: str | None = None
    access_key_id: int | None = None
    access_key_name: str | None = None
    totals: dict[str, int] = field(default_factory=_zero)


@dataclass
class OverviewWindow:
    window_start: datetime
    window_end: datetime
    totals: dict[str, int] = field(default_factory=_zero)
    groups: list[OverviewGroup] = field(default_factory=list)


@dataclass
class UsageOverview:
    period: str
    start: datetime
    end: datetime
    complete_until: datetime
    group_by: str | None
    access_key_id: int | None
    totals: dict[str, int]
    groups: list[OverviewGroup]
    series: list[OverviewWindow]


def _group_of(group_by: str, row: dict, keys: dict[int, AccessKey]) -> OverviewGroup:
    if group_by == "model":
        name = f"{row['provider']}:{row['model']}"
        return OverviewGroup(group=name, label=name, provider=row["provider"], model=row["model"])
    if group_by == "provider":
        provider = row["provider"]
        return OverviewGroup(group=provider, label=provider, provider=provider)
    key_id = row["access_key_id"]
    access_key = keys.get(key_id)
    if access_key is None:
        return OverviewGroup(group="none", label="No key")
    return OverviewGroup(
        group=str(key_id),
        label=f"{access_key.name} ({access_key.display})",
        access_key_id=key_id,
        access_key_name=access_key.name,
    )


def _by_cost(groups) -> list[OverviewGroup]:
    return sorted(groups, key=lambda group: (-group.totals["cost_nanousd"], group.label))


def usage_overview(
    *,
    account: Account,
    period: str,
    start: datetime,
    end: datetime,
    at: datetime,
    group_by: str | None = None,
    access_key: AccessKey | None = None,
) -> UsageOverview:
    """Sum the account's rollups over [start, end): totals, per group and per window.

    Only windows that end by `usage_rollups_complete_until` are listed; the series has
    one entry per such window, zeros included.
    """
    length = PERIOD_LENGTHS[period]
    complete_until = usage_rollups_complete_until(account=account, period=period, at=at)
    until = max(start, min(end, complete_until))
    rollups = UsageRollup.objects.filter(
        account=account, period=period, window_start__gte=start, window_start__lt=until
    )
    if access_key is not None:
        rollups = rollups.filter(access_key=access_key)
    group_fields = GROUP_FIELDS[group_by] if group_by else ()
    rows = (
        rollups.order_by()
        .values("window_start", *group_fields)
        .annotate(**{name: Sum(name) for name in METRICS})
    )
    keys: dict[int, AccessKey] = {}
    if group_by == "key":
        keys = {key.pk: key for key in AccessKey.objects.for_account(account)}

    windows: dict[datetime, OverviewWindow] = {}
    cursor = start
    while cursor < until:
        windows[cursor] = OverviewWindow(window_start=cursor, window_end=cursor + length)
        cursor += length
    totals = _zero()
    groups: dict[str, OverviewGroup] = {}
    window_groups: dict[tuple[datetime, str], OverviewGroup] = {}
    for row in rows:
        window = windows[row["window_start"].astimezone(UTC)]
        _add(totals, row)
        _add(window.totals, row)
        if group_by:
            group = _group_of(group_by, row, keys)
            _add(groups.setdefault(group.group, group).totals, row)
            in_window = window_groups.get((window.window_start, group.group))
            if in_window is None:
                in_window = _group_of(group_by, row, keys)
                window_groups[(window.window_start, group.group)] = in_window
                window.groups.append(in_window)
            _add(in_window.totals, row)
    for window in windows.values():
        window.groups = _by_cost(window.groups)
    return UsageOverview(
        period=period,
        start=start,
        end=end,
        complete_until=complete_until,
        group_by=group_by,
        access_key_id=access_key.pk if access_key else None,
        totals=totals,
        groups=_by_cost(groups.values()),
        series=list(windows.values()),
    )


# Usage charts: SVG drawn on the server with pygal, without JavaScript.


@dataclass(frozen=True)
class DailyUsage:
    day: date
    request_count: int
    cost_nanousd: int

    @property
    def cost_text(self) -> str:
        return usd_text(self.cost_nanousd)


def usage_daily_totals(*, account: Account, days: int, at: datetime) -> list[DailyUsage]:
    """Return requests and spend for each of the `days` UTC days up to the one holding `at`.

    Read from hourly rollups, so today counts its closed hours; a day without usage is
    listed with zeros.
    """
    today = window_floor(period=Period.DAY, at=at)
    first = today - timedelta(days=days - 1)
    sums = {
        row["day"]: row
        for row in UsageRollup.objects.filter(
            account=account, period=Period.HOUR, window_start__gte=first
        )
        .order_by()
        .annotate(day=TruncDate("window_start", tzinfo=UTC))
        .values("day")
        .annotate(request_count=Sum("request_count"), cost_nanousd=Sum("cost_nanousd"))
    }
    result = []
    for offset in range(days):
        day = (first + timedelta(days=offset)).date()
        row = sums.get(day, {"request_count": 0, "cost_nanousd": 0})
        result.append(
            DailyUsage(
                day=day,
                request_count=int(row["request_count"]),
                cost_nanousd=int(row["cost_nanousd"]),
            )
        )
    return result


def usd_text(nanousd: int) -> str:
    """Format nano-dollars for a chart or table: "$1.50", "$0.0000056"."""
    return f"${format_usd_short(nanousd)}"


def axis_ticks(maximum: int, *, minimum_step: int = 1, count: int = 4) -> list[int]:
    """Return round integer ticks from 0 to at least `maximum`, about `count` steps apart.

    A step is 1, 2 or 5 times `minimum_step` times a power of ten.
    """
    magnitude = minimum_step
    while True:
        for factor in (1, 2, 5):
            step = magnitude * factor
            if step * count >= maximum:
                top = max(step, ceil_div(maximum, step) * step)
                return list(range(0, top + step, step))
        magnitude *= 10


CHART_STYLE = Style(
    background="transparent",
    plot_background="transparent",
    foreground="#1d2330",
    foreground_strong="#1d2330",
    foreground_subtle="#dde2e8",
    colors=("#2454d6",),
    font_family='system-ui, -apple-system, "Segoe UI", Roboto, sans-serif',
    label_font_size=12,
    major_label_font_size=12,
    title_font_size=14,
)


def _accessible_svg(*, title: str, description: str, labels: list[str], values: list[str]):
    """Return a pygal XML filter: no script, a title and desc for screen readers, bar tips."""

    def apply(root):
        chart_id = root.get("id")
        for parent in list(root.iter()):
            for child in list(parent):
                if child.tag == "script" or (parent is root and child.tag == "title"):
                    parent.remove(child)
        title_node = root.makeelement("title", {"id": f"{chart_id}-title"})
        title_node.text = title
        desc_node = root.makeelement("desc", {"id": f"{chart_id}-desc"})
        desc_node.text = description
        root.insert(0, desc_node)
        root.insert(0, title_node)
        root.set("role", "img")
        root.set("aria-labelledby", f"{chart_id}-title {chart_id}-desc")
        root.set("style", "width: 100%; height: auto;")
        bars = [node for node in root.iter("g") if node.get("class") == "bar"]
        for bar, label, value in zip(bars, labels, values, strict=False):
            tip = bar.makeelement("title", {})
            tip.text = f"{label}: {value}"
            bar.insert(0, tip)
        return root

    return apply


def daily_bar_chart_svg(
    *,
    title: str,
    description: str,
    days: list[date],
    values: list[int],
    formatter,
    minimum_step: int = 1,
) -> SafeString:
    """Draw a bar per day as inline SVG without JavaScript.

    `values` are integers (counts or nano-dollars); ticks are integers too, so pygal's
    floating-point layout only ever places them and `formatter` prints exact amounts.
    """
    labels = [day.isoformat() for day in days]
    chart = pygal.Bar(
        style=CHART_STYLE,
        # Drawn for a half-width column; the SVG scales to its container.
        width=480,
        height=260,
        show_legend=False,
        disable_xml_declaration=True,
        js=[],
        margin=8,
        x_labels=[day.strftime("%b %d") for day in days],
        show_minor_x_labels=False,
        truncate_label=-1,
        x_labels_major_every=7,
        y_labels=axis_ticks(max(values, default=0), minimum_step=minimum_step),
        value_formatter=lambda value: formatter(int(value)),
        print_values=False,
    )
    chart.add_xml_filter(
        _accessible_svg(
            title=title,
            description=description,
            labels=labels,
            values=[formatter(value) for value in values],
        )
    )
    chart.add(title, values)
    # pygal builds the SVG with ElementTree, which escapes every text and attribute.
    return mark_safe(chart.render(is_unicode=True))


@dataclass(frozen=True)
class UsageCharts:
    rows: list[DailyUsage]
    spend_svg: SafeString
    requests_svg: SafeString
    complete_until: datetime
    total_requests: int
    total_cost_nanousd: int

    @property
    def total_cost_text(self) -> str:
        return usd_text(self.total_cost_nanousd)


def usage_charts(*, account: Account, days: int, at: datetime) -> UsageCharts:
    """Build the spend-per-day and requests-per-day charts of the last `days` UTC days."""
    rows = usage_daily_totals(account=account, days=days, at=at)
    complete_until = usage_rollups_complete_until(account=account, period=Period.HOUR, at=at)
    day_list = [row.day for row in rows]
    first, last = day_list[0].isoformat(), day_list[-1].isoformat()
    total_requests = sum(row.request_count for row in rows)
    total_cost = sum(row.cost_nanousd for row in rows)
    spend_svg = daily_bar_chart_svg(
        title="Spend per day (USD)",
        description=(
            f"Spend per UTC day from {first} to {last}: {usd_text(total_cost)} in total."
        ),
        days=day_list,
        values=[row.cost_nanousd for row in rows],
        formatter=usd_text,
        # One cent: smaller ticks would print as long strings of zeros.
        minimum_step=10_000_000,
    )
    requests_svg = daily_bar_chart_svg(
        title="Requests per day",
        description=f"Requests per UTC day from {first} to {last}: {total_requests} in total.",
        days=day_list,
        values=[row.request_count for row in rows],
        formatter=str,
    )
    return UsageCharts(
        rows=rows,
        spend_svg=spend_svg,
        requests_svg=requests_svg,
        complete_until=complete_until,
        total_requests=total_requests,
        total_cost_nanousd=total_cost,
    )
