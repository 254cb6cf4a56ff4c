"""Timeline spans per rank, written as a Chrome trace (open in Perfetto or chrome://tracing),
and the busy/wait totals of :class:`ring.RunStats`, both on the device's own clock.

On CUDA a span is a pair of CUDA events recorded on the current stream, so it
measures when the GPU ran the work (and, around a stream wait on a receive,
how long the GPU stalled for it), not when the host queued it; events are
resolved once, at the end of the loop. On CPU spans use the host clock.

Tracing is off by default (``--trace``): a span costs a clock read (or two
events) and a small dict, and a run of N tasks makes a few spans per task, so
the trace grows with the video; it is for benchmarks and diagnosis.
"""

from __future__ import annotations

import json
import threading
import time
from contextlib import contextmanager

import torch


class Clock:
    """Marks on the device's timeline: CUDA events on CUDA, ``perf_counter`` on CPU."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"
        if self.cuda:
            torch.cuda.synchronize()
            self._origin_event = torch.cuda.Event(enable_timing=True)
            self._origin_event.record()
            torch.cuda.synchronize()
        self.origin = time.perf_counter()

    def mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def seconds(self, mark) -> float:
        """A mark as seconds on this clock's ``perf_counter`` scale (syncs on the event on CUDA)."""
        if not isinstance(mark, float):
            mark.synchronize()
            return self.origin + self._origin_event.elapsed_time(mark) / 1e3
        return mark


class Stopwatch:
    """Sums of intervals per name, timed on a :class:`Clock` and resolved at :meth:`total`."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self._open: dict[str, list] = {}

    @contextmanager
    def measure(self, name: str):
        start = self.clock.mark()
        try:
            yield
        finally:
            self._open.setdefault(name, []).append((start, self.clock.mark()))

    def total(self, name: str) -> float:
        return sum(self.clock.seconds(b) - self.clock.seconds(a) for a, b in self._open.get(name, ()))


class Trace:
    def __init__(self, rank: int, enabled: bool = False, device: torch.device | str = "cpu"):
        self.rank, self.enabled = rank, enabled
        self._raw: list[tuple] = []
        self._events: list[dict] = []
        self.clock = Clock(device) if enabled else None
        # Wall-clock origin so that ranks on one machine line up in the viewer.
        self._origin = time.time() - time.perf_counter()
        self._lock = threading.Lock()

    @property
    def events(self) -> list[dict]:
        """Resolved spans (resolving syncs with the device)."""
        with self._lock:
            raw, self._raw = self._raw, []
        for name, cat, tid, start, end, args in raw:
            s, e = self.clock.seconds(start), self.clock.seconds(end)
            self._events.append({"name": name, "cat": cat, "ph": "X", "pid": self.rank, "tid": tid,
                                 "ts": (self._origin + s) * 1e6, "dur": (e - s) * 1e6, "args": args})
        return self._events

    def clear(self) -> None:
        with self._lock:
            self._raw, self._events = [], []

    @contextmanager
    def span(self, name: str, cat: str, host: bool = False, **args):
        """Time the block as a span; ``host`` spans (file writes, host waits) use the host clock."""
        if not self.enabled:
            yield
            return
        start = time.perf_counter() if host else self.clock.mark()
        try:
            yield
        finally:
            end = time.perf_counter() if host else self.clock.mark()
            with self._lock:
                self._raw.append((name, cat, threading.current_thread().name, start, end, args))

    def to_json(self) -> bytes:
        return json.dumps(self.events).encode()


def chrome_trace(per_rank: list[list[dict]]) -> dict:
    """One trace from every rank's events, with readable process and thread names."""
    events = []
    for rank, evs in enumerate(per_rank):
        events.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}})
        events += evs
    return {"traceEvents": events, "displayTimeUnit": "ms"}
