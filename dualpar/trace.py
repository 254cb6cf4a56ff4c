"""Timeline spans per rank, written as a Chrome trace (open in Perfetto or chrome://tracing).

Off by default (``--trace``): a span costs a clock read and a small dict, and
a run of N tasks makes a few spans per task, so the trace grows with the
video; it is for benchmarks and diagnosis, not for production runs.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager


class Trace:
    def __init__(self, rank: int, enabled: bool = False):
        self.rank, self.enabled = rank, enabled
        self.events: list[dict] = []
        # Wall-clock origin so that ranks on one machine line up in the viewer.
        self._origin = time.time() - time.perf_counter()
        self._lock = threading.Lock()

    @contextmanager
    def span(self, name: str, cat: str, **args):
        if not self.enabled:
            yield
            return
        start = time.perf_counter()
        try:
            yield
        finally:
            end = time.perf_counter()
            event = {"name": name, "cat": cat, "ph": "X", "pid": self.rank, "tid": threading.current_thread().name,
                     "ts": (self._origin + start) * 1e6, "dur": (end - start) * 1e6, "args": args}
            with self._lock:
                self.events.append(event)

    def to_json(self) -> bytes:
        return json.dumps(self.events).encode()


def chrome_trace(per_rank: list[list[dict]]) -> dict:
    """One trace from every rank's events, with readable process and thread names."""
    events = []
    for rank, evs in enumerate(per_rank):
        events.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}})
        events += evs
    return {"traceEvents": events, "displayTimeUnit": "ms"}
