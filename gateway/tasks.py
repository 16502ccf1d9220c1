from datetime import datetime

from celery import shared_task
from django.utils import timezone

from gateway import rollups


@shared_task
def usage_rollups_refresh(period: str, window_start: str) -> int:
    """Recompute one closed window (`window_start` in ISO 8601); return its row count."""
    refresh = rollups.usage_rollups_refresh(
        period=period, window_start=datetime.fromisoformat(window_start)
    )
    return refresh.rows


@shared_task
def usage_rollups_refresh_due(at: str | None = None) -> int:
    """Recompute the windows closed since the last run, and the lookback. Beat runs it.

    `at` (ISO 8601) defaults to now. A rerun changes no row.
    """
    moment = datetime.fromisoformat(at) if at else timezone.now()
    return rollups.usage_rollups_refresh_due(at=moment)
