"""Point-to-point and collective communication: the only module that imports torch.distributed.

Every message is a fixed-size int64 header followed by the payload. The
header carries the message kind, the task index it belongs to, the dtype and
the shape, so a receiver allocates exactly what arrives and can check that it
is the message its schedule expects. Sends are asynchronous (``isend``); the
sender keeps each tensor alive until its send is known to be complete.
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
KIND_STOP = 4  # rank 0 stopped the run at an iteration boundary: stop before this task

_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64]
_CODE = {d: i for i, d in enumerate(_DTYPES)}


class CommError(RuntimeError):
    """A peer sent something other than what the schedule expects."""


class PeerError(RuntimeError):
    """A peer failed, vanished or stayed silent past the timeout."""


def _gloo_on_loopback_when_local() -> None:
    """Keep gloo's sockets on the loopback interface for a single-machine run.

    Gloo otherwise binds to the address the host name resolves to, which may be
    reachable from the network. A user who sets GLOO_SOCKET_IFNAME (or runs
    across machines, with a non-loopback MASTER_ADDR) keeps full control.
    """
    import ipaddress
    import socket

    if "GLOO_SOCKET_IFNAME" in os.environ:
        return
    addr = os.environ.get("MASTER_ADDR", "localhost")
    try:
        local = addr == "localhost" or ipaddress.ip_address(addr).is_loopback
    except ValueError:
        local = False
    # every rank on this machine (torchrun's LOCAL_WORLD_SIZE) is as local as it gets
    local = local or os.environ.get("LOCAL_WORLD_SIZE") == os.environ.get("WORLD_SIZE")
    names = [n for _, n in socket.if_nameindex()]
    if local and "lo" in names:
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"


class Comm:
    """This rank's view of the process group (a 1-rank Comm needs no process group)."""

    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | str = "cpu", timeout_s: float = 120.0,
                 patient_timeout_s: float = 1800.0):
        self.rank, self.world = rank, world
        self.timeout = timedelta(seconds=timeout_s)
        """Longest wait for any one message while generating; past it the peer counts as failed."""
        self.patient_timeout = timedelta(seconds=max(timeout_s, patient_timeout_s))
        """Longest wait where the sender may be busy writing a checkpoint."""
        # Predictions (last rank -> rank 0) get their own group: with NCCL each group
        # pair has one stream, and with 2 ranks both ring directions would share it
        # and block each other.
        self._pred_group = dist.new_group([0, world - 1]) if world > 1 and dist.is_initialized() else None
        self.device = torch.device(device)
        self._pending: deque = deque()
        self.bytes_sent = 0
        self.send_window = 8
        """Sends kept in flight before the oldest is waited for (bounds buffered memory)."""

    @classmethod
    def from_env(cls, device: str | None = None, timeout_s: float = 120.0, startup_timeout_s: float = 1800.0) -> "Comm":
        """Join the process group described by torchrun's environment (or run alone).

        Collectives at start-up (rank 0 loading and running the text encoder while
        the others wait) may take ``startup_timeout_s``; every wait while
        generating is bounded by ``timeout_s``.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        if device is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if world > 1 and not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            if backend == "gloo":
                _gloo_on_loopback_when_local()
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timedelta(seconds=startup_timeout_s))
        return cls(rank, world, dev, timeout_s, startup_timeout_s)

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

    def group_for(self, kind: int):
        return self._pred_group if kind == KIND_PRED else None

    def send(self, t: torch.Tensor, dst: int, kind: int, task: int) -> None:
        """Queue ``t`` for ``dst`` without waiting for the transfer.

        Header and payload travel as one byte message: one latency per hop.
        """
        t = t.contiguous().to(self.device)
        h = self._header(kind, task, t)
        msg = torch.cat([h.view(torch.uint8), t.view(-1).view(torch.uint8)])
        try:
            work = dist.isend(msg, dst, group=self.group_for(kind))
        except Exception as e:  # the connection to a dead peer fails at once
            raise self.peer_error(dst, "send", e) from None
        self._pending.append((work, msg, dst))
        self.bytes_sent += msg.numel()
        self._reap()

    def peer_error(self, peer: int, what: str, e: Exception) -> "PeerError":
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "imed out" in msg or "imeout" in msg:
            return PeerError(f"rank {self.rank}: nothing from rank {peer} for {self.timeout.total_seconds():.0f} s "
                             f"({what}); it has failed or hangs")
        return PeerError(f"rank {self.rank}: lost rank {peer} ({what}): {msg}")

    def send_stop(self, dst: int, task: int, shape, dtype: torch.dtype) -> None:
        """Tell ``dst`` the run stops before ``task`` (sized like the packet it expects)."""
        self.send(torch.zeros(shape, dtype=dtype, device=self.device), dst, KIND_STOP, task)

    def wait(self, work, peer: int, what: str, patient: bool = False) -> None:
        """Wait for one transfer with ``peer``, turning failure or silence into a PeerError naming it."""
        try:
            work.wait(self.patient_timeout if patient else self.timeout)
        except Exception as e:  # gloo/nccl report a dead peer or a timeout as RuntimeError
            raise self.peer_error(peer, what, e) from None

    def inbox(self, src: int, expected, depth: int = 2) -> "Inbox":
        """Receive, in order, the messages ``expected`` from ``src`` (see :class:`Inbox`)."""
        return Inbox(self, src, expected, depth)

    def _reap(self) -> None:
        # Release finished sends (NCCL reports completion; gloo only through wait()),
        # then wait for the oldest beyond the window. A send completes once the
        # receiver has posted the matching receive; the engine keeps fewer tasks in
        # flight than the window, so the oldest has always been received already and
        # this never blocks for long (and never deadlocks the ring).
        while self._pending and self._pending[0][0].is_completed():
            self._pending.popleft()
        while len(self._pending) > self.send_window:
            work, _, dst = self._pending.popleft()
            self.wait(work, dst, "send")

    def flush(self) -> None:
        """Wait until every queued send has completed."""
        while self._pending:
            work, _, dst = self._pending.popleft()
            self.wait(work, dst, "send")

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

    def broadcast_int(self, value: int | None, src: int = 0) -> int:
        """``src``'s integer on every rank."""
        if self.world == 1:
            return int(value)
        t = torch.tensor([value if self.rank == src else 0], dtype=torch.int64, device=self.device)
        dist.broadcast(t, src)
        return int(t.item())

    def gather_floats(self, values: list[float]) -> list[list[float]]:
        """All ranks' float lists on every rank (small statistics)."""
        if self.world == 1:
            return [list(values)]
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t)
        return [o.tolist() for o in out]

    def gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's bytes, in rank order, on every rank (no pickle)."""
        if self.world == 1:
            return [data]
        n = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        sizes = [torch.empty_like(n) for _ in range(self.world)]
        dist.all_gather(sizes, n)
        width = max(int(s.item()) for s in sizes)
        buf = torch.zeros(width, dtype=torch.uint8, device=self.device)
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else buf[:0]
        out = [torch.empty_like(buf) for _ in range(self.world)]
        dist.all_gather(out, buf)
        return [o[: int(s.item())].cpu().numpy().tobytes() for o, s in zip(out, sizes)]

    def close(self, abort: bool = False) -> None:
        """Leave the process group; ``abort`` skips waiting for sends a failed peer will never take."""
        if not abort:
            self.flush()
        self._pending.clear()
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
            try:
                work = dist.irecv(buf, self.src, group=self.comm.group_for(kind))
            except Exception as e:
                raise self.comm.peer_error(self.src, f"receive for task {task}", e) from None
            self._posted.append((work, buf, spec))

    def next(self, patient: bool = False) -> torch.Tensor | None:
        """The next expected message's payload, or None if the sender stopped the run here.

        ``patient`` allows the long timeout: the sender may be writing a checkpoint.
        """
        if not self._posted:
            raise CommError(f"rank {self.comm.rank}: no further message expected from rank {self.src}")
        work, buf, (kind, task, shape, dtype) = self._posted.popleft()
        self.comm.wait(work, self.src, f"waiting for task {task}", patient)
        h = buf[: HEADER_LEN * 8].view(torch.int64).tolist()
        got_kind, got_task, code, ndim = h[:4]
        got_shape = list(h[4 : 4 + ndim])
        if got_kind == KIND_STOP and got_task == task:
            return None
        self._fill()
        if (got_kind, got_task, _DTYPES[code], got_shape) != (kind, task, dtype, list(shape)):
            raise CommError(
                f"rank {self.comm.rank}: expected from rank {self.src} message kind {kind} task {task} "
                f"{dtype} {list(shape)}, got kind {got_kind} task {got_task} {_DTYPES[code]} {got_shape}"
            )
        return buf[HEADER_LEN * 8 :].view(dtype).view(shape)
