"""Point-to-point and collective communication: the only module that imports torch.distributed.

Every message is a fixed-size int64 header followed by the payload. The
header carries the message kind, the task index it belongs to, the dtype and
the shape, so a receiver allocates exactly what arrives and can check that it
is the message its schedule expects. Sends are asynchronous (``isend``); the
sender keeps each tensor alive until its send completes.
"""

from __future__ import annotations

import math
import os
from collections import deque
from datetime import timedelta

import torch
import torch.distributed as dist

HEADER_LEN = 10  # kind, task, dtype, ndim, up to 6 dims
MAX_DIMS = HEADER_LEN - 4
KIND_PACKET = 1  # hidden states travelling forward along the layer pipeline
KIND_PRED = 2  # noise prediction travelling back from the last rank to rank 0
KIND_BCAST = 3

_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64]
_CODE = {d: i for i, d in enumerate(_DTYPES)}


class CommError(RuntimeError):
    """A peer sent something other than what the schedule expects."""


class Comm:
    """This rank's view of the process group (a 1-rank Comm needs no process group)."""

    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | str = "cpu"):
        self.rank, self.world = rank, world
        self.device = torch.device(device)
        self._pending: deque = deque()
        self.bytes_sent = 0
        self.send_window = 8
        """Sends kept in flight before the oldest is waited for (bounds buffered memory)."""

    @classmethod
    def from_env(cls, device: str | None = None, timeout_s: float = 600.0) -> "Comm":
        """Join the process group described by torchrun's environment (or run alone)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        if device is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if world > 1 and not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
        return cls(rank, world, dev)

    @property
    def prev(self) -> int:
        return (self.rank - 1) % self.world

    @property
    def next(self) -> int:
        return (self.rank + 1) % self.world

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.world - 1

    # -- point to point ----------------------------------------------------

    def _header(self, kind: int, task: int, t: torch.Tensor) -> torch.Tensor:
        if t.dim() > MAX_DIMS:
            raise ValueError(f"tensor of {t.dim()} dims does not fit the header")
        vals = [kind, task, _CODE[t.dtype], t.dim(), *t.shape] + [0] * (MAX_DIMS - t.dim())
        return torch.tensor(vals, dtype=torch.int64, device=self.device)

    def send(self, t: torch.Tensor, dst: int, kind: int, task: int) -> None:
        """Queue ``t`` for ``dst`` without waiting for the transfer.

        Header and payload travel as one byte message: one latency per hop.
        """
        t = t.contiguous().to(self.device)
        h = self._header(kind, task, t)
        msg = torch.cat([h.view(torch.uint8), t.view(-1).view(torch.uint8)])
        self._pending.append((dist.isend(msg, dst), msg))
        self.bytes_sent += msg.numel()
        self._reap()

    def inbox(self, src: int, expected, depth: int = 2) -> "Inbox":
        """Receive, in order, the messages ``expected`` from ``src`` (see :class:`Inbox`)."""
        return Inbox(self, src, expected, depth)

    def _reap(self) -> None:
        # A gloo send completes once the receiver has posted the matching receive,
        # and reports completion only through wait(): wait for the oldest sends
        # beyond the window. The engine keeps fewer tasks in flight than the
        # window, so the oldest has always been received already and this never
        # blocks for long (and never deadlocks the ring).
        while len(self._pending) > self.send_window:
            work, _ = self._pending.popleft()
            work.wait()

    def flush(self) -> None:
        """Wait until every queued send has completed."""
        while self._pending:
            work, _ = self._pending.popleft()
            work.wait()

    # -- collectives -------------------------------------------------------

    def broadcast(self, t: torch.Tensor | None, src: int = 0) -> torch.Tensor:
        """Give every rank ``src``'s tensor (others pass None)."""
        if self.world == 1:
            assert t is not None
            return t
        if self.rank == src:
            t = t.contiguous().to(self.device)
            h = self._header(KIND_BCAST, 0, t)
        else:
            h = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
        dist.broadcast(h, src)
        if self.rank != src:
            ndim = int(h[3])
            t = torch.empty([int(v) for v in h[4 : 4 + ndim].tolist()], dtype=_DTYPES[int(h[2])], device=self.device)
        dist.broadcast(t, src)
        return t

    def gather_floats(self, values: list[float]) -> list[list[float]]:
        """All ranks' float lists on every rank (small statistics)."""
        if self.world == 1:
            return [list(values)]
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t)
        return [o.tolist() for o in out]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        self.flush()
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


class Inbox:
    """The ordered stream of messages this rank expects from one peer.

    ``expected`` yields ``(kind, task, shape, dtype)`` per message: every rank
    derives the sequence from the schedule, so receives are posted ``depth``
    messages ahead and the transfer overlaps compute. Each arriving header is
    checked against what was expected: a mismatch means the ranks disagree on
    the schedule and is an error, never a silent reinterpretation.
    """

    def __init__(self, comm: Comm, src: int, expected, depth: int = 2):
        self.comm, self.src, self.depth = comm, src, max(1, depth)
        self._expected = iter(expected)
        self._posted: deque = deque()
        self._fill()

    def _fill(self) -> None:
        while len(self._posted) < self.depth:
            spec = next(self._expected, None)
            if spec is None:
                return
            kind, task, shape, dtype = spec
            nbytes = HEADER_LEN * 8 + math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            buf = torch.empty(nbytes, dtype=torch.uint8, device=self.comm.device)
            self._posted.append((dist.irecv(buf, self.src), buf, spec))

    def next(self) -> torch.Tensor:
        if not self._posted:
            raise CommError(f"rank {self.comm.rank}: no further message expected from rank {self.src}")
        work, buf, (kind, task, shape, dtype) = self._posted.popleft()
        work.wait()
        self._fill()
        h = buf[: HEADER_LEN * 8].view(torch.int64).tolist()
        got_kind, got_task, code, ndim = h[:4]
        got_shape = list(h[4 : 4 + ndim])
        if (got_kind, got_task, _DTYPES[code], got_shape) != (kind, task, dtype, list(shape)):
            raise CommError(
                f"rank {self.comm.rank}: expected from rank {self.src} message kind {kind} task {task} "
                f"{dtype} {list(shape)}, got kind {got_kind} task {got_task} {_DTYPES[code]} {got_shape}"
            )
        return buf[HEADER_LEN * 8 :].view(dtype).view(shape)
