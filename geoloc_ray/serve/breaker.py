"""Skip a component whose replica is gone until it answers again, so degraded answers stay fast.

When an expert's (or shard's) replica dies, Serve holds new calls until it has restarted it; without this every
search would wait the full timeout during the restart. A component that timed out or whose actor died is marked
down: searches leave it out at once (degraded), while a background probe calls it until it answers.
An error raised by the component's own code does not mark it down: the replica is alive and answers fast.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("ray.serve")


def is_unavailable(exc: BaseException) -> bool:
    """A timeout or a dead / unreachable replica, as opposed to an exception raised in user code."""
    from ray.exceptions import RayTaskError

    return not isinstance(exc, RayTaskError)


class Breaker:
    def __init__(self, probe_every_s: float = 0.5):
        self.probe_every_s = probe_every_s
        self.down: set[str] = set()
        self._probes: set[asyncio.Task] = set()  # strong references: a bare task may be garbage-collected

    def is_down(self, name: str) -> bool:
        return name in self.down

    def trip(self, name: str, probe: Callable[[], Awaitable]) -> None:
        """Mark `name` down and probe it in the background until `probe()` (which bounds its own wait) returns."""
        if name in self.down:
            return
        self.down.add(name)
        log.warning("%s did not answer: leaving it out of searches until it does", name)
        task = asyncio.get_running_loop().create_task(self._probe(name, probe))
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def _probe(self, name: str, probe: Callable[[], Awaitable]) -> None:
        while True:
            try:
                await probe()
            except Exception:  # noqa: BLE001 - still down: try again shortly
                await asyncio.sleep(self.probe_every_s)
                continue
            self.down.discard(name)
            log.info("%s answers again", name)
            return
