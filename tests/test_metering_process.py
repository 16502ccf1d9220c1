"""The metering process: a child of the server that writes charges."""

import os
import time

from gateway import metering
from gateway.metering import MeteringProcess, metering_process_start, metering_process_stop


def test_metering_process_niceness(settings):
    settings.GATEWAY_METERING_NICENESS = 7
    expected = os.getpriority(os.PRIO_PROCESS, 0) + 7
    process = MeteringProcess()
    try:
        deadline = time.monotonic() + 60
        # The child lowers its own priority once it has started.
        while os.getpriority(os.PRIO_PROCESS, process.pid) != expected:
            assert process.alive()
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        process.stop()
    assert not process.alive()


def test_no_metering_process_without_redis(settings):
    """Without Redis, balances and reservations live in the server's memory, out of a
    child process's reach."""
    settings.REDIS_URL = ""
    settings.GATEWAY_METERING_PROCESS = True

    metering_process_start()
    try:
        assert metering._process is None
    finally:
        metering_process_stop()
