"""Point-to-point and collective communication: the only module that imports torch.distributed.

Every message is a fixed-size int64 header followed by the payload. The
header carries the message kind, the task index it belongs to, the dtype and
the shape, so a receiver allocates exactly what arrives and can check that it
is the message its schedule expects. Sends are asynchronous (``isend``); the
sender keeps each tensor alive until its send completes.
"""

from __future__ import annotations

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
        """Queue ``t`` for ``dst`` without waiting for the transfer."""
        t = t.contiguous().to(self.device)
        h = self._header(kind, task, t)
        self._pending.append((dist.isend(h, dst), h))
        self._pending.append((dist.isend(t, dst), t))
        self.bytes_sent += h.numel() * 8 + t.numel() * t.element_size()
        self._reap()

    def recv(self, src: int, kind: int, task: int) -> torch.Tensor:
        """Receive the next message from ``src`` and check it is (kind, task)."""
        h = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
        dist.recv(h, src)
        got_kind, got_task, code, ndim = (int(v) for v in h[:4].tolist())
        if (got_kind, got_task) != (kind, task):
            raise CommError(
                f"rank {self.rank}: expected message kind {kind} for task {task} from rank {src}, "
                f"got kind {got_kind} for task {got_task}"
            )
        shape = [int(v) for v in h[4 : 4 + ndim].tolist()]
        t = torch.empty(shape, dtype=_DTYPES[code], device=self.device)
        dist.recv(t, src)
        return t

    def _reap(self) -> None:
        while self._pending and self._pending[0][0].is_completed():
            self._pending.popleft()

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
