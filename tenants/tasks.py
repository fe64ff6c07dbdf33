"""Celery tasks of the tenants app; each only calls a service."""
from datetime import UTC, datetime, timedelta

from celery import shared_task

from tenants.services import roll_up_usage


@shared_task
def roll_up_recent_usage() -> int:
    """Recompute today's and yesterday's daily usage (late events still land in yesterday)."""
    today = datetime.now(UTC).date()
    return roll_up_usage(day=today - timedelta(days=1)) + roll_up_usage(day=today)
