"""The ring every mode runs on: geometry, run statistics, the loop of the ranks after the first,
the prediction return path, and ONE rank-0 loop over a mode object.

Every rank walks the same task list in the same order. Rank 0 builds each
task's input, embeds it and runs its layers; each following rank receives the
packet, runs its layers and passes it on; the last rank applies the head and
CFG and sends the prediction back to rank 0, which applies it in task order.
Rank 0 only waits for a prediction when the next input depends on it
(``Task.needs``) or when ``2 x world`` tasks are already in flight. The
bidirectional engine (:mod:`engine`) and the causal one (:mod:`causal`) differ
only in what a task's input, head and prediction step are (:class:`Mode`).
"""

from __future__ import annotations

import bisect
import sys
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch
from tqdm import tqdm

from . import schedule as sch
from .comm import KIND_PACKET, KIND_PRED, Comm
from .config import Config
from .models import loader
from .trace import Clock, Stopwatch, Trace


def log(rank: int, msg: str) -> None:
    """One line on stderr; tqdm.write puts it above rank 0's progress bar instead of glued to it."""
    tqdm.write(f"[rank {rank}] {msg}", file=sys.stderr)
    sys.stderr.flush()


@dataclass
class RunStats:
    wall_s: float = 0.0
    """Wall time of the denoising loop on this rank."""
    compute_s: float = 0.0
    """Time this rank's device spent in forward passes (and scheduler steps on rank 0); CUDA events on GPUs."""
    wait_s: float = 0.0
    """Time spent waiting for receives (on GPUs: the stream stalled on them, by CUDA events)."""
    tasks: int = 0
    bytes_sent: int = 0
    messages_sent: int = 0
    """Point-to-point messages this rank sent (one per hop: payload and device-written tag)."""
    send_buffer_bytes: int = 0
    """Bytes of this rank's reused send buffers (bounded: ``comm.SEND_SLOTS`` per link)."""
    stopped: bool = False
    """The run stopped early at an iteration boundary (a checkpoint was taken)."""
    peak_live_blocks: int = 0
    """Most block latents rank 0 held at once (queued blocks + context tail): bounded by ``steps + 1``."""
    cache_bytes: int = 0
    """Bytes held by this rank's KV caches (causal mode)."""
    layers_s: float = 0.0
    """Of ``compute_s``, the time in this rank's layers (the rest: embedding and scheduler steps on rank 0,
    the head on the last rank)."""
    forecasts: int = 0
    """Tasks whose prediction rank 0 forecast instead of sending them around the ring (``cache.level=model``)."""
    peak_cache_bytes: int = 0
    """Most bytes this rank's stage caches held at once (neighbour K/V and forecast histories), and on
    rank 0 its forecast history of predictions."""
    blocks: list[torch.Tensor] = field(default_factory=list)
    """Finished block latents (rank 0, only when ``keep_latents``)."""
    comm_base: tuple[int, int] = (0, 0)
    """The comm's bytes and messages sent before this video (a Ray job's actors make several)."""

    @classmethod
    def begin(cls, comm: Comm) -> "RunStats":
        """Stats of one video: the comm's counters (which run on across a batch of videos) count from here."""
        return cls(comm_base=(comm.bytes_sent, comm.messages_sent))

    def finish(self, comm: Comm, watch: Stopwatch, t0: float) -> "RunStats":
        """Fill in the totals at the end of the loop (resolves CUDA events: one sync)."""
        self.wall_s = time.perf_counter() - t0
        self.compute_s, self.wait_s = watch.total("compute"), watch.total("wait")
        self.layers_s = watch.total("layers")
        self.bytes_sent = comm.bytes_sent - self.comm_base[0]
        self.messages_sent = comm.messages_sent - self.comm_base[1]
        self.send_buffer_bytes = comm.send_bytes_held
        return self


def first_of_iteration(tasks, i: int) -> bool:
    """Task ``i`` of ``tasks`` starts an iteration (not the first task): where rank 0 may stop the run."""
    return i > 0 and tasks[i].iteration != tasks[i - 1].iteration


def drain_target(task, k: int, ring: list, in_flight: int) -> int:
    """The task index up to which rank 0 applies every prediction before it sends ring task ``task``
    (the ``k``-th of ``ring``): those its input needs, and enough to keep at most ``in_flight`` in flight."""
    return max(task.needs, ring[k - in_flight].index if k >= in_flight else -1)


def checkpoint_before(tasks, i: int, checkpoint_every: int) -> bool:
    """Rank 0 takes a checkpoint at the iteration boundary before task ``i`` of ``tasks``."""
    return bool(checkpoint_every) and first_of_iteration(tasks, i) and tasks[i].iteration % checkpoint_every == 0


def output_points(plan, tasks, on_ring, in_flight: int, checkpoint_every: int) -> dict[int, tuple[int, int]]:
    """For an output rank on the ring (``output.decode_on=last``): before each ring task (by index),
    how many finished blocks and checkpoint markers rank 0 has sent since ``tasks[0]``, so that rank
    waits for exactly those (rank 0 sent them before that task's packet, needing nothing more from
    the ring) and never for one still to come. Follows :func:`run_first`'s rules."""
    ring = [t for t in tasks if on_ring(t)]
    nth = {t.index: k for k, t in enumerate(ring)}
    ends = [t.index for t in plan.tasks if plan.finished_by(t) is not None]
    applied, blocks, marks, points = (tasks[0].index - 1 if tasks else -1), 0, 0, {}

    def apply_upto(j: int) -> None:
        nonlocal applied, blocks
        if j > applied:
            blocks += bisect.bisect_right(ends, j) - bisect.bisect_right(ends, applied)
            applied = j

    for i, task in enumerate(tasks):
        if checkpoint_before(tasks, i, checkpoint_every):
            apply_upto(task.index - 1)
            marks += 1
        if task.index in nth:
            apply_upto(drain_target(task, nth[task.index], ring, in_flight))
            points[task.index] = (blocks, marks)
    return points


def relay(comm: Comm, trace: Trace, tasks, packet_shape, dtype, compute, name, pred_shape, patient=None,
          between=None) -> RunStats:
    """The loop of every rank but the first: receive each task's packet from the previous rank,
    ``compute(task, packet, out, watch)`` on it into a send buffer ``out`` (timing its layers as
    ``watch.measure("layers")``), and pass it on (the last
    rank sends its prediction back to rank 0). A stop message from rank 0 ends the loop; it is
    passed on. ``between(task)``, if given, runs before each task (the output rank takes the blocks
    rank 0 sent before it)."""
    st, watch = RunStats.begin(comm), Stopwatch(Clock(comm.device))
    inbox = comm.inbox(comm.prev, ((KIND_PACKET, t.index, packet_shape(t), dtype) for t in tasks))
    if comm.is_last:
        dst, kind, out_shape, out_dtype = 0, KIND_PRED, pred_shape, torch.float32
    else:
        dst, kind, out_shape, out_dtype = comm.next, KIND_PACKET, packet_shape, dtype
    comm.reserve(dst, kind, [out_shape(t) for t in tasks], out_dtype)
    t0 = time.perf_counter()
    for i, task in enumerate(tasks):
        if between is not None:
            between(task)
        with trace.span("recv", "wait", task=task.index), watch.measure("wait"):
            packet = inbox.next(patient=bool(patient and patient(task)), stop_possible=first_of_iteration(tasks, i))
        if packet is None:  # rank 0 stopped the run at this iteration boundary
            if not comm.is_last:
                comm.send_stop(comm.next, task.index, packet_shape(task), dtype)
            st.stopped = True
            break
        out = comm.send_buffer(dst, kind, out_shape(task), out_dtype, task.index)
        with trace.span(name(task), "compute", task=task.index, iteration=task.iteration), watch.measure("compute"):
            out = compute(task, packet, out, watch)
        with trace.span("send", "send", task=task.index):
            comm.send(out, dst, kind, task.index)
        st.tasks += 1
    comm.flush()
    comm.check()
    return st.finish(comm, watch, t0)


class Returns:
    """Rank 0's end of the ring: predictions come back in task order and are applied in that order."""

    def __init__(self, comm: Comm, trace: Trace, tasks, start: int, pred_shape, apply, name, stats: RunStats,
                 watch: Stopwatch, on_ring=None, forecast=None):
        self.trace, self.tasks, self.apply, self.name, self.st, self.watch = trace, tasks, apply, name, stats, watch
        self.on_ring, self.forecast = on_ring or (lambda t: True), forecast
        self.applied = start - 1
        """Index of the last task whose prediction has been applied (earlier ones: before ``start``)."""
        self.inbox = None
        if comm.ring > 1:
            expected = ((KIND_PRED, t.index, pred_shape(t), torch.float32) for t in tasks[start:] if self.on_ring(t))
            self.inbox = comm.inbox(comm.ring - 1, expected)

    def drain(self, upto: int) -> None:
        """Receive (or, for a task off the ring, forecast) and apply every prediction up to task index ``upto``."""
        while self.applied < upto:
            nxt = self.tasks[self.applied + 1]
            if not self.on_ring(nxt):
                with self.trace.span(f"forecast {self.name(nxt)}", "scheduler", task=nxt.index), \
                        self.watch.measure("compute"):
                    self.apply(nxt, self.forecast(nxt))
                self.st.forecasts += 1
                self.applied += 1
                continue
            with self.trace.span("recv", "wait", task=nxt.index), self.watch.measure("wait"):
                pred = self.inbox.next()
            with self.trace.span(f"step {self.name(nxt)}", "scheduler", task=nxt.index), self.watch.measure("compute"):
                self.apply(nxt, pred)
            self.applied += 1


class Geometry:
    """What every rank derives identically in either mode: the blocks (or chunks) of the
    video, the layer split, the latent size and the CFG batch."""

    def __init__(self, cfg: Config, world: int, num_layers: int, block: int, counts: list[int] | None = None):
        self.cfg = cfg
        self.blocks = sch.split_blocks(cfg.video.latent_frames, block)
        self.num_layers, self.world = num_layers, world
        self.set_split(counts or cfg.parallel.layer_counts())
        self.lat_h = cfg.video.height // loader.VAE_SPATIAL
        self.lat_w = cfg.video.width // loader.VAE_SPATIAL
        self.batch = 2 if cfg.sampling.guidance > 1.0 else 1

    def set_split(self, counts: list[int] | None) -> None:
        """Layer counts per ring rank (None: the even split)."""
        self.layers = sch.split_layers(self.num_layers, self.world, counts)

    @property
    def counts(self) -> list[int]:
        return [b - a for a, b in self.layers]

    def block_of(self, task) -> int:
        return task.block

    def pred_shape(self, task, channels: int) -> tuple[int, ...]:
        return (1, channels, self.blocks[self.block_of(task)].frames, self.lat_h, self.lat_w)

    def on_ring(self, task) -> bool:
        """Whether the task goes around the ring (every task does, unless a mode forecasts some)."""
        return True

    def ring_tasks(self, start_iteration: int = 0) -> list:
        """The tasks the ranks after the first work on, from ``start_iteration``."""
        return [t for t in self.tasks if t.iteration >= start_iteration and self.on_ring(t)]

    def finished_by(self, task) -> int | None:
        """The block (chunk) whose clean latents rank 0 has once this task's prediction is applied."""
        return task.block if task.last_step else None

    def latent_shape(self, b: int, channels: int) -> tuple[int, ...]:
        """A finished block's clean latents: what rank 0 writes (or sends to the output rank)."""
        return (1, channels, self.blocks[b].frames, self.lat_h, self.lat_w)

    def frames_of_block(self, b: int) -> int:
        blk = self.blocks[b]
        return sch.pixel_frames(blk.start, blk.frames)


class Mode(Protocol):
    """What the rank-0 loop needs from an engine (bidirectional or causal)."""

    plan: Geometry
    stage: object  # .run(packet, task, shape, out=None)
    trace: Trace
    in_flight: int

    def packet_shape(self, task) -> tuple[int, ...]: ...
    def pred_shape(self, task) -> tuple[int, ...]: ...
    def packet_dtype(self) -> torch.dtype: ...
    def name(self, task) -> str: ...
    def on_ring(self, task) -> bool: ...
    def forecast(self, state, task) -> torch.Tensor: ...
    def before_task(self, task) -> None: ...
    def embed(self, state, task) -> torch.Tensor: ...
    def head(self, packet: torch.Tensor, task) -> torch.Tensor: ...


def run_first(mode: Mode, comm: Comm, state, tasks, base: int, writer=None, progress=None, keep_latents=False,
              checkpoint=None, checkpoint_every: int = 0, should_stop=None) -> RunStats:
    """Rank 0's loop: ``tasks`` (from index ``base`` of the plan) through the ring.

    ``state`` holds rank 0's latents (``apply(task, pred)`` returns a block's
    clean latents when it is done, ``live_blocks()``, ``iteration``). Finished
    blocks go to ``writer``. Every ``checkpoint_every`` iterations, and when
    ``should_stop()`` turns true, the ring drains at the iteration boundary and
    ``checkpoint(state)`` is called; on a stop the other ranks are told first.
    """
    plan, trace, st = mode.plan, mode.trace, RunStats.begin(comm)
    watch = Stopwatch(Clock(comm.device))

    def apply(task, pred: torch.Tensor) -> None:
        done = state.apply(task, pred)
        if done is not None:
            comm.check()  # nothing derived from a mismatched message reaches the output
            b = plan.block_of(task)
            if writer is not None:
                writer.add_block(b, done)
            if keep_latents:
                st.blocks.append(done)
            if progress is not None:
                progress.block_done(b, plan.frames_of_block(b))

    returns = Returns(comm, trace, plan.tasks, base, mode.pred_shape, apply, mode.name, st, watch,
                      mode.on_ring, lambda t: mode.forecast(state, t))
    drain = returns.drain
    ring = [t for t in tasks if mode.on_ring(t)]  # what the other ranks work on (forecasts stay here)
    nth = {t.index: k for k, t in enumerate(ring)}
    ring_index = [t.index for t in ring]
    if comm.ring > 1:
        comm.reserve(comm.next, KIND_PACKET, [mode.packet_shape(t) for t in ring], mode.packet_dtype())
    t0 = time.perf_counter()
    for i, task in enumerate(tasks):
        boundary = first_of_iteration(tasks, i)  # the tasks are consecutive from ``base``
        stop = boundary and should_stop is not None and should_stop()
        if boundary and (stop or checkpoint_before(tasks, i, checkpoint_every)):
            drain(task.index - 1)  # the iteration is complete on rank 0
            state.iteration = task.iteration
            k = bisect.bisect_left(ring_index, task.index)  # the next task the other ranks expect
            nxt = ring[k] if k < len(ring) else None
            if stop and comm.ring > 1 and nxt is not None:  # release the other ranks before the (slow) checkpoint
                comm.send_stop(comm.next, nxt.index, mode.packet_shape(nxt), mode.packet_dtype())
            if checkpoint is not None:
                checkpoint(state)
            if stop:
                st.stopped = True
                break
        if task.index not in nth:  # forecast here, applied in task order when a later wait reaches it
            if comm.ring == 1:
                drain(task.index)
            if progress is not None:
                progress.task_done(task)
            continue
        # Wait for the results this input depends on, and keep the ring's load bounded (in ring tasks:
        # forecasts do not load the ring).
        drain(drain_target(task, nth[task.index], ring, mode.in_flight))
        mode.before_task(task)
        out = None if comm.ring == 1 else comm.send_buffer(
            comm.next, KIND_PACKET, mode.packet_shape(task), mode.packet_dtype(), task.index)
        with trace.span(mode.name(task), "compute", task=task.index, iteration=task.iteration), \
                watch.measure("compute"):
            packet = mode.embed(state, task)
            st.peak_live_blocks = max(st.peak_live_blocks, state.live_blocks())
            with watch.measure("layers"):
                packet = mode.stage.run(packet, task, plan.shape(task), out=out)
            if comm.ring == 1:
                pred = mode.head(packet, task)
        if comm.ring == 1:
            with trace.span(f"step {mode.name(task)}", "scheduler", task=task.index), watch.measure("compute"):
                apply(task, pred)
            returns.applied = task.index
        else:
            with trace.span("send", "send", task=task.index):
                comm.send(packet, comm.next, KIND_PACKET, task.index)
        st.tasks += 1
        if progress is not None:
            progress.task_done(task)
    if not st.stopped:
        drain(len(plan.tasks) - 1)
        state.iteration = plan.tasks[-1].iteration + 1
    comm.flush()
    return st.finish(comm, watch, t0)
