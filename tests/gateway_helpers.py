"""Helpers for tests that drive the gateway in the `server` process."""

import time

from gateway.models import UsageRecord


def wait_for_record(request_id: str, attempt: int = 1, timeout: float = 5.0) -> UsageRecord:
    """Return the usage record of an attempt, waiting for metering that runs after responses."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = UsageRecord.objects.filter(request_id=request_id, attempt=attempt).first()
        if record is not None:
            return record
        time.sleep(0.02)
    raise AssertionError(f"no usage record for {request_id} after {timeout} s")
