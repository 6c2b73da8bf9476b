"""Admission control: how many requests decode at once, how many may wait, and refusing the rest at once."""

import asyncio
import contextlib

from splitspec.errors import ResourceExhausted


class Admission:
    """Up to `max_running` requests decode at once; up to `max_waiting` more wait for a slot in arrival order.
    Past both, a request gets RESOURCE_EXHAUSTED immediately instead of queueing without bound."""

    def __init__(self, max_running: int, max_waiting: int):
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.running = 0
        self.waiting = 0
        self._slots = asyncio.Semaphore(max_running)

    @contextlib.asynccontextmanager
    async def slot(self):
        if self.running + self.waiting >= self.max_running + self.max_waiting:
            raise ResourceExhausted(
                f"server is at its limit of {self.max_running} running and {self.max_waiting} waiting requests; "
                "retry later"
            )
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._slots.release()
