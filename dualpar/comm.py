"""Point-to-point and collective communication: the only module that imports torch.distributed.

Messages on the hot path carry only their payload, followed by a 16-byte tag
(the task index and a check word) that the sender writes on the device: no
header is built on the host and nothing is read back per hop. Every rank
derives from the schedule which message comes next, its shape and dtype, so

* receives are posted ahead into buffers allocated once, at the largest size
  the task list needs (a ring of ``depth + 1`` per peer);
* sends go from a bounded window of reused send buffers (``SEND_SLOTS``),
  which producers write into directly (``send_buffer``), so a packet is never
  copied to be sent and a rank never buffers more than ``SEND_SLOTS`` packets;
* a message that is not the task it was received for is detected by its tag:
  on the host at once on CPU, on the device (folded into a flag, read at the
  next host sync) on CUDA, before anything derived from it is written.

NCCL creates the communicator of a rank pair lazily, at the first
point-to-point op between the two, and that creation blocks until the peer
makes its first op towards this rank. :meth:`Comm.warm_up` therefore sends one
tiny message around the ring, in ring order, on each group, before any
receive is posted ahead; without it a ring deadlocks at start-up.
``DUALPAR_P2P_LOG=PREFIX`` records every op (``PREFIX.rank<R>.json``) so a
test can replay the order under that rule.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from datetime import timedelta

import torch
import torch.distributed as dist

KIND_PACKET = 1  # hidden states travelling forward along the layer pipeline
KIND_PRED = 2  # noise prediction travelling back from the last rank to rank 0
KIND_STOP = 4  # rank 0 stopped the run at an iteration boundary: stop before this task
KIND_BLOCK = 5  # a finished block's clean latents, rank 0 -> the output rank (output.decode_on last/extra)
KIND_CHECKPOINT = 6  # rank 0 -> the output rank, in a block's place: a checkpoint's state follows
KIND_STATE = 7  # a checkpoint's engine state (its length, then its bytes), on a group of its own
TAG_BYTES = 16  # int64 task index, int64 check word
_CHECK = 0x5DA1_7A6E_0000_0000  # check word = _CHECK + kind * 2**24 + (task mod 2**24)
SEND_SLOTS = 3
"""Reused send buffers per link: one being filled, one or two in flight."""


class CommError(RuntimeError):
    """A peer sent something other than what the schedule expects."""


class PeerError(RuntimeError):
    """A peer failed, vanished or stayed silent past the timeout."""


def _check_word(kind: int, task: int) -> int:
    return _CHECK + kind * 2**24 + task % 2**24


def _padded(nbytes: int) -> int:
    return (nbytes + 7) // 8 * 8  # the tag is read as int64: keep it aligned


def message_bytes(shape, dtype: torch.dtype) -> int:
    """Bytes on the wire for one message of ``shape``/``dtype`` (payload, padding, tag)."""
    return _padded(payload_bytes(shape, dtype)) + TAG_BYTES


def payload_bytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


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


def _join(rank: int, world: int, timeout_s: float):
    """The rendezvous store, made as ``env://`` makes it (rank 0 hosts it, or torchrun's agent does),
    but failing in ``timeout_s`` with a clear message when not every rank joins."""
    addr, port = os.environ.get("MASTER_ADDR", "localhost"), int(os.environ.get("MASTER_PORT", "29500"))
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    try:
        return dist.TCPStore(addr, port, world_size=world, is_master=rank == 0 and not agent,
                             timeout=timedelta(seconds=timeout_s), multi_tenant=not agent)
    except Exception as e:  # DistStoreError, or a refused or unresolvable address
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CommError(f"rank {rank}: not all {world} ranks joined at {addr}:{port} within {timeout_s:.0f} s "
                        f"(parallel.join_timeout_s); start every rank, e.g. launch/gen.py --nproc {world} "
                        f"({why[:200]})") from None


def default_device(backend: str = "auto") -> str:
    """``cuda:LOCAL_RANK`` when CUDA is there (all ranks share GPUs round-robin under gloo), else ``cpu``."""
    if not torch.cuda.is_available():
        return "cpu"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return f"cuda:{local % torch.cuda.device_count() if backend == 'gloo' else local}"


class _Link:
    """A ring of reused byte buffers for one direction of one link, sized for the largest message."""

    def __init__(self, slots: int, nbytes: int, device: torch.device, pinned: bool):
        self.bufs = [torch.empty(nbytes, dtype=torch.uint8, device=device, pin_memory=pinned) for _ in range(slots)]
        self.works: list = [None] * slots
        self.next = 0

    def nbytes(self) -> int:
        return sum(b.numel() for b in self.bufs)


class Comm:
    """This rank's view of the process group (a 1-rank Comm needs no process group)."""

    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | str = "cpu", timeout_s: float = 120.0,
                 patient_timeout_s: float = 1800.0, decode_on: str = "first"):
        self.rank, self.world = rank, world
        self.ring = world - 1 if decode_on == "extra" and world > 1 else world
        """Ranks on the layer pipeline: the world, or all but its last rank when that one only decodes."""
        self.output_rank = {"first": 0, "last": self.ring - 1, "extra": self.ring}[decode_on] if world > 1 else 0
        """The rank that decodes and writes the run's output (``output.decode_on``)."""
        self.device = torch.device(device)
        self.timeout = timedelta(seconds=timeout_s)
        """Longest wait for any one message while generating; past it the peer counts as failed."""
        self.patient_timeout = timedelta(seconds=max(timeout_s, patient_timeout_s))
        """Longest wait where the sender may be busy writing a checkpoint."""
        grouped = world > 1 and dist.is_initialized()
        self.backend = dist.get_backend() if grouped else None
        # gloo moves host memory: CUDA tensors are staged through pinned host buffers
        # (several ranks on one GPU, for checks); NCCL moves device memory.
        self.wire = torch.device("cpu") if self.backend == "gloo" else self.device
        self.staged = self.wire != self.device
        # Predictions (last rank -> rank 0) get their own group: with NCCL each group
        # pair has one stream, and with 2 ranks both ring directions would share it
        # and block each other.
        self._pred_group = dist.new_group([0, self.ring - 1]) if grouped and self.ring > 1 else None
        # Finished blocks (and checkpoint markers) towards the output rank, and checkpoint states, each on
        # a group of their own: their messages never queue behind (or in front of) the ring's.
        remote = grouped and self.output_rank != 0
        self._out_group = dist.new_group([0, self.output_rank]) if remote else None
        self._state_group = dist.new_group([0, self.output_rank]) if remote else None
        self._links: dict[tuple[int, int], _Link] = {}
        self.bytes_sent = 0
        self.messages_sent = 0
        self._device_checks: list = []  # the inboxes whose tags are compared on the device
        # Host reads of a few bytes (tags, flags) go through a stream of their own, so they wait
        # for the transfer they read, not for all the compute queued on the current stream.
        self._side = torch.cuda.Stream(self.wire) if self.wire.type == "cuda" else None
        # Any mismatch seen on the device so far; folded into every tag this rank sends, so a bad
        # message upstream spoils the tags downstream and reaches rank 0 before it writes anything.
        self._any = torch.zeros((), dtype=torch.bool, device=self.wire)
        self.defer_checks = self._side is not None
        """Compare tags on the device and read the result later (CUDA); on CPU tags are read at once."""
        self.oplog: list | None = [] if os.environ.get("DUALPAR_P2P_LOG") else None
        self._ops = 0
        self._closed = False

    @classmethod
    def from_env(cls, device: str | None = None, timeout_s: float = 120.0, startup_timeout_s: float = 1800.0,
                 backend: str = "auto", warm_up: bool = True, join_timeout_s: float = 300.0,
                 decode_on: str = "first") -> "Comm":
        """Join the process group described by torchrun's environment (or run alone).

        Collectives at start-up (rank 0 loading and running the text encoder while
        the others wait) may take ``startup_timeout_s``; every wait while
        generating is bounded by ``timeout_s``; every rank must have joined
        within ``join_timeout_s``. ``backend`` ``auto`` is NCCL on
        CUDA and gloo on CPU; ``gloo`` on CUDA lets several ranks share a GPU.
        """
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        dev = torch.device(device or default_device(backend))
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if world > 1 and not dist.is_initialized():
            name = ("nccl" if dev.type == "cuda" else "gloo") if backend == "auto" else backend
            if name == "gloo":
                _gloo_on_loopback_when_local()
            store = _join(rank, world, join_timeout_s)
            store.set_timeout(timedelta(seconds=startup_timeout_s))
            dist.init_process_group(name, store=store, rank=rank, world_size=world,
                                    timeout=timedelta(seconds=startup_timeout_s))
        comm = cls(rank, world, dev, timeout_s, startup_timeout_s, decode_on)
        if warm_up:
            comm.warm_up()
        return comm

    @property
    def send_bytes_held(self) -> int:
        """Bytes of this rank's send buffers (bounded by ``SEND_SLOTS`` per link)."""
        return sum(link.nbytes() for key, link in self._links.items() if key[0] == "send")

    @property
    def prev(self) -> int:
        return (self.rank - 1) % self.ring

    @property
    def next(self) -> int:
        return (self.rank + 1) % self.ring

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        """The last rank of the layer pipeline (it runs the head)."""
        return self.rank == self.ring - 1

    @property
    def on_ring(self) -> bool:
        return self.rank < self.ring

    @property
    def is_output(self) -> bool:
        """This rank decodes and writes the run's output."""
        return self.rank == self.output_rank

    def group_for(self, kind: int):
        if kind == KIND_PRED:
            return self._pred_group
        if kind in (KIND_BLOCK, KIND_CHECKPOINT):
            return self._out_group
        return self._state_group if kind == KIND_STATE else None

    # -- op log (for the start-up order test) -----------------------------------

    def _log(self, op: str, peer: int | None = None, kind: int = 0, task: int = -1, ref: int | None = None) -> int:
        self._ops += 1
        if self.oplog is not None:
            group = "coll" if peer is None else {KIND_PRED: "pred", KIND_BLOCK: "out", KIND_CHECKPOINT: "out",
                                                 KIND_STATE: "state"}.get(kind, "data")
            self.oplog.append({"id": self._ops, "op": op, "peer": peer, "group": group, "task": task, "ref": ref})
        return self._ops

    def _write_oplog(self) -> None:
        prefix = os.environ.get("DUALPAR_P2P_LOG")
        if self.oplog is not None and prefix:
            with open(f"{prefix}.rank{self.rank}.json", "w") as f:
                json.dump(self.oplog, f)

    # -- start-up ---------------------------------------------------------------

    def warm_up(self) -> None:
        """One tiny message around the ring on each group, in ring order.

        NCCL makes a rank pair's communicator at the pair's first op, and blocks
        until the peer's first op towards this rank: done here, in ring order
        (0 -> 1 -> ... -> last on the data group, then last -> 0 on the
        prediction group), no rank can be blocked by a receive posted ahead.
        """
        if self.world == 1:
            return
        t = torch.zeros(1, dtype=torch.int64, device=self.wire)
        if self.on_ring and self.ring > 1:
            if not self.is_first:
                self._blocking("recv", t, self.prev, KIND_PACKET)
            if not self.is_last:
                self._blocking("send", t, self.next, KIND_PACKET)
            if self.is_last:
                self._blocking("send", t, 0, KIND_PRED)
            if self.is_first:
                self._blocking("recv", t, self.ring - 1, KIND_PRED)
        if self.output_rank != 0:  # then rank 0 -> the output rank, on both of its groups
            for kind in (KIND_BLOCK, KIND_STATE):
                if self.is_first:
                    self._blocking("send", t, self.output_rank, kind)
                elif self.is_output:
                    self._blocking("recv", t, 0, kind)

    def _blocking(self, op: str, t: torch.Tensor, peer: int, kind: int, what: str = "start-up") -> None:
        fn = dist.isend if op == "send" else dist.irecv
        oid = self._log(op, peer, kind, -1)
        try:
            work = fn(t, peer, group=self.group_for(kind))
        except Exception as e:
            raise self.peer_error(peer, f"{what} {op}", e) from None
        self.wait(work, peer, f"{what} {op}", patient=True, ref=oid)

    # -- point to point ----------------------------------------------------

    def _link(self, key: tuple[int, int], slots: int, nbytes: int) -> _Link:
        link = self._links.get(key)
        if link is None or link.bufs[0].numel() < nbytes or len(link.bufs) != slots:
            if link is not None:  # a larger message than reserved: its old buffers may still be in flight
                for w in link.works:
                    if w is not None:
                        self.wait(w[0], key[1], "send", ref=w[1])
            link = _Link(slots, nbytes, self.wire, pinned=self.staged)
            self._links[key] = link
        return link

    def reserve(self, dst: int, kind: int, shapes, dtype: torch.dtype) -> None:
        """Allocate the send buffers towards ``dst`` once, for the largest of ``shapes``."""
        nbytes = max((message_bytes(s, dtype) for s in shapes), default=0)
        if nbytes:
            self._link(("send", dst, kind), SEND_SLOTS, nbytes)

    def send_buffer(self, dst: int, kind: int, shape, dtype: torch.dtype, task: int = -1) -> torch.Tensor:
        """A payload view of the next free send buffer towards ``dst`` (waits for its previous send).

        Write the message into it, then :meth:`send` it. On a staged (gloo on
        CUDA) link the view is a fresh device tensor, copied to pinned memory at send.
        """
        if self.staged:  # the producer writes on the GPU; send() copies it into pinned memory
            return torch.empty(shape, dtype=dtype, device=self.device)
        link = self._acquire(dst, kind, message_bytes(shape, dtype))
        n = payload_bytes(shape, dtype)
        return link.bufs[link.next][:n].view(dtype).view(shape)

    def _acquire(self, dst: int, kind: int, nbytes: int) -> _Link:
        """The link towards ``dst`` with its next buffer free (bounded window: the oldest send must be done)."""
        link = self._link(("send", dst, kind), SEND_SLOTS, nbytes)
        i = link.next
        if link.works[i] is not None:
            self.wait(link.works[i][0], dst, "send", ref=link.works[i][1])
            link.works[i] = None
        return link

    def send(self, t: torch.Tensor, dst: int, kind: int, task: int) -> None:
        """Send ``t`` (ideally the view :meth:`send_buffer` gave) to ``dst`` without waiting for the transfer."""
        link = self._links.get(("send", dst, kind))
        own = (link is not None and not self.staged and t.is_contiguous()
               and t.data_ptr() == link.bufs[link.next].data_ptr())
        if not own:  # anything else (and everything on a staged link) is copied into the next send buffer
            link = self._acquire(dst, kind, message_bytes(tuple(t.shape), t.dtype))
            link.bufs[link.next][: t.numel() * t.element_size()].view(t.dtype).view(t.shape).copy_(t)
        self._send_tagged(t.numel() * t.element_size(), dst, kind, task, kind)

    def send_stop(self, dst: int, task: int, shape, dtype: torch.dtype, kind: int = KIND_PACKET) -> None:
        """Tell ``dst`` the run stops before ``task`` (a message sized like the one it expects)."""
        self._acquire(dst, kind, message_bytes(shape, dtype))
        self._send_tagged(payload_bytes(shape, dtype), dst, kind, task, KIND_STOP)

    def _send_tagged(self, n: int, dst: int, kind: int, task: int, tag_kind: int) -> None:
        link = self._links[("send", dst, kind)]
        i = link.next
        msg = link.bufs[i][: _padded(n) + TAG_BYTES]
        tag = msg[_padded(n):].view(torch.int64)
        tag[0].fill_(task)  # written on the device: no header built on the host
        tag[1].fill_(_check_word(tag_kind, task))
        if self.defer_checks:
            tag[1].add_(self._any.to(torch.int64) << 40)  # spoiled when anything upstream was wrong
        oid = self._log("send", dst, kind, task)
        try:
            work = dist.isend(msg, dst, group=self.group_for(kind))
        except Exception as e:  # the connection to a dead peer fails at once
            raise self.peer_error(dst, "send", e) from None
        link.works[i] = (work, oid)
        link.next = (i + 1) % len(link.bufs)
        self.bytes_sent += msg.numel()
        self.messages_sent += 1

    def peer_error(self, peer: int, what: str, e: Exception | None = None) -> "PeerError":
        msg = (str(e).splitlines()[0] if str(e) else type(e).__name__) if e is not None else "timed out"
        # the backend's words go into a one-line message and the manifest: plain ASCII (gloo adds emoji)
        msg = " ".join("".join(ch for ch in msg if ch.isascii() and ch.isprintable()).split()) or type(e).__name__
        if "imed out" in msg or "imeout" in msg:
            return PeerError(f"rank {self.rank}: nothing from rank {peer} for {self.timeout.total_seconds():.0f} s "
                             f"({what}); it has failed or hangs")
        return PeerError(f"rank {self.rank}: lost rank {peer} ({what}): {msg}")

    def wait(self, work, peer: int, what: str, patient: bool = False, ref: int | None = None) -> None:
        """Block the host until one transfer with ``peer`` is done; failure or silence -> PeerError.

        gloo's ``wait(timeout)`` enforces the timeout itself; NCCL's does not
        block the host, so its completion is polled against the deadline.
        """
        self._log("wait", peer, 0, -1, ref)
        limit = self.patient_timeout if patient else self.timeout
        try:
            if self.backend == "nccl":
                deadline = time.monotonic() + limit.total_seconds()
                pause = 1e-5
                while not work.is_completed():
                    if time.monotonic() > deadline:
                        raise self.peer_error(peer, what)
                    time.sleep(pause)
                    pause = min(pause * 2, 1e-3)
                work.wait()
            else:
                work.wait(limit)
        except PeerError:
            raise
        except Exception as e:  # gloo/nccl report a dead peer or a timeout as RuntimeError
            raise self.peer_error(peer, what, e) from None

    def inbox(self, src: int, expected, depth: int = 2) -> "Inbox":
        """Receive, in order, the messages ``expected`` from ``src`` (see :class:`Inbox`)."""
        return Inbox(self, src, list(expected), depth)

    def flush(self) -> None:
        """Wait until every send has completed."""
        for (what, dst, _), link in self._links.items():
            if what != "send":
                continue
            for i, w in enumerate(link.works):
                if w is not None:
                    self.wait(w[0], dst, "send", ref=w[1])
                    link.works[i] = None

    def check(self) -> None:
        """Raise if any message received so far did not match its task (a host sync on CUDA)."""
        bad = [box.src for box in self._device_checks if box.mismatched()]
        if bad:
            src = ", ".join(str(s) for s in bad)
            raise CommError(f"rank {self.rank}: a message from rank {src} did not match the task it was received "
                            "for (the ranks disagree on the schedule, here or upstream); nothing derived from it "
                            "is written")

    # -- collectives -------------------------------------------------------

    def broadcast(self, t: torch.Tensor | None, src: int = 0) -> torch.Tensor:
        """Give every rank ``src``'s tensor (others pass None); shape and dtype travel first."""
        if self.world == 1:
            assert t is not None
            return t
        codes = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64]
        if self.rank == src:
            t = t.contiguous()
            meta = [codes.index(t.dtype), t.dim(), *t.shape]
        else:
            meta = None
        meta = self.broadcast_ints(meta, src)
        if self.rank != src:
            t = torch.empty(meta[2:], dtype=codes[meta[0]], device=self.device)
        wire = t.to(self.wire)
        self._log("broadcast")
        dist.broadcast(wire, src)
        return wire.to(self.device) if self.staged else wire

    def broadcast_ints(self, values: list[int] | None, src: int = 0, max_len: int = 16) -> list[int]:
        """``src``'s short integer list on every rank (start-up only: a host round trip)."""
        if self.world == 1:
            return list(values)
        t = torch.zeros(max_len + 1, dtype=torch.int64)
        if self.rank == src:
            t[0] = len(values)
            t[1 : 1 + len(values)] = torch.tensor(values, dtype=torch.int64)
        t = t.to(self.wire)
        self._log("broadcast")
        dist.broadcast(t, src)
        t = t.cpu()
        return t[1 : 1 + int(t[0])].tolist()

    def broadcast_int(self, value: int | None, src: int = 0) -> int:
        """``src``'s integer on every rank."""
        return self.broadcast_ints([int(value)] if self.rank == src else None, src)[0]

    def gather_floats(self, values: list[float]) -> list[list[float]]:
        """All ranks' float lists on every rank (small statistics)."""
        if self.world == 1:
            return [list(values)]
        t = torch.tensor(values, dtype=torch.float64, device=self.wire)
        out = [torch.empty_like(t) for _ in range(self.world)]
        self._log("all_gather")
        dist.all_gather(out, t)
        return [o.tolist() for o in out]

    def gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's bytes, in rank order, on every rank (no pickle)."""
        if self.world == 1:
            return [data]
        n = torch.tensor([len(data)], dtype=torch.int64, device=self.wire)
        sizes = [torch.empty_like(n) for _ in range(self.world)]
        self._log("all_gather")
        dist.all_gather(sizes, n)
        width = max(int(s.item()) for s in sizes)
        buf = torch.zeros(width, dtype=torch.uint8, device=self.wire)
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.wire) if data else buf[:0]
        out = [torch.empty_like(buf) for _ in range(self.world)]
        self._log("all_gather")
        dist.all_gather(out, buf)
        return [o[: int(s.item())].cpu().numpy().tobytes() for o, s in zip(out, sizes)]

    def close(self, abort: bool = False) -> None:
        """Leave the process group.

        A clean end waits for the last sends and destroys the group. ``abort``
        (a stop, a failure) aborts it instead: receives posted ahead that no
        peer will match, and sends a dead peer will never take, are dropped
        rather than waited for (destroying would wait for them under NCCL).
        """
        if self._closed:
            return
        self._closed = True
        self._write_oplog()
        grouped = self.world > 1 and dist.is_initialized()
        if not abort:
            self.flush()
        self._links.clear()
        if not grouped:
            return
        if abort:
            abort_group = getattr(dist.distributed_c10d, "_abort_process_group", None)
            if abort_group is not None:
                abort_group()
                print(f"[rank {self.rank}] process group aborted", file=sys.stderr, flush=True)
                return
        dist.destroy_process_group()


class Inbox:
    """The ordered stream of messages this rank expects from one peer.

    ``expected`` lists ``(kind, task, shape, dtype)`` per message: every rank
    derives the sequence from the schedule, so receives are posted ``depth``
    messages ahead, into a ring of ``depth + 1`` buffers allocated once at the
    largest expected size, and the transfer overlaps compute. Each message's
    tag is checked against what was expected: a mismatch means the ranks
    disagree on the schedule and is an error, never a silent reinterpretation.
    """

    def __init__(self, comm: Comm, src: int, expected: list, depth: int = 2):
        self.comm, self.src, self.depth = comm, src, max(1, depth)
        self._expected = iter(expected)
        self._posted: deque = deque()
        nbytes = max((message_bytes(shape, dtype) for _, _, shape, dtype in expected), default=0)
        self._link = _Link(self.depth + 1, nbytes, comm.wire, pinned=comm.staged) if nbytes else None
        self._mismatch = torch.zeros((), dtype=torch.bool, device=comm.wire)
        self._checked = None  # event after the latest device-side comparison (CUDA)
        comm._device_checks.append(self)
        self._fill()

    def nbytes(self) -> int:
        return self._link.nbytes() if self._link else 0

    def mismatched(self) -> bool:
        """Whether any tag compared on the device so far was wrong (waits for the latest comparison only)."""
        if self._checked is None:
            return bool(self._mismatch)  # CPU: nothing is pending
        self._checked.synchronize()
        with torch.cuda.stream(self.comm._side):
            return bool(self._mismatch)

    def _fill(self) -> None:
        while len(self._posted) < self.depth:
            spec = next(self._expected, None)
            if spec is None:
                return
            kind, task, shape, dtype = spec
            link = self._link
            buf = link.bufs[link.next][: message_bytes(shape, dtype)]
            link.next = (link.next + 1) % len(link.bufs)
            oid = self.comm._log("recv", self.src, kind, task)
            try:
                work = dist.irecv(buf, self.src, group=self.comm.group_for(kind))
            except Exception as e:
                raise self.comm.peer_error(self.src, f"receive for task {task}", e) from None
            self._posted.append((work, buf, spec, oid))

    def next(self, patient: bool = False, stop_possible: bool = False) -> torch.Tensor | None:
        """The next expected message's payload, or None if the sender stopped the run here.

        ``patient`` allows the long timeout (the sender may be writing a
        checkpoint). The tag is read on the host on CPU, and on CUDA only where
        a stop may arrive (``stop_possible``); elsewhere it is compared on the device.
        """
        comm = self.comm
        if not self._posted:
            raise CommError(f"rank {comm.rank}: no further message expected from rank {self.src}")
        work, buf, (kind, task, shape, dtype), oid = self._posted.popleft()
        n = payload_bytes(shape, dtype)
        tag = buf[_padded(n):].view(torch.int64)
        host = not comm.defer_checks or stop_possible
        if host:
            comm.wait(work, self.src, f"waiting for task {task}", patient, ref=oid)
            if comm._side is not None:  # the receive is complete: read its tag without draining the stream
                with torch.cuda.stream(comm._side):
                    got_task, got_check = tag.tolist()
            else:
                got_task, got_check = tag.tolist()
            if got_task == task and got_check == _check_word(KIND_STOP, task):
                return None
            if (got_task, got_check) != (task, _check_word(kind, task)):
                raise CommError(f"rank {comm.rank}: expected from rank {self.src} message kind {kind} task {task} "
                                f"{dtype} {list(shape)}, got a message tagged task {got_task} "
                                f"(check word {got_check:#x}, expected {_check_word(kind, task):#x})")
        else:
            comm._log("wait", self.src, 0, -1, oid)
            work.wait()  # NCCL: the current stream waits for the receive; the host does not
            bad = (tag[0] != task) | (tag[1] != _check_word(kind, task))
            self._mismatch.logical_or_(bad)
            comm._any.logical_or_(bad)
            if comm._side is not None:
                self._checked = torch.cuda.Event()
                self._checked.record()
        payload = buf[:n].view(dtype).view(shape)
        if comm.staged:
            payload = payload.to(comm.device)
        self._fill()
        return payload


class OutputSender:
    """Rank 0's end of the output channel (``output.decode_on`` last or extra): each finished block's
    clean latents, in order, to the output rank; in a block's place, a checkpoint marker (the
    engine's state follows on the state group) or a stop marker.

    Markers are sized like the block the output rank expects next and tagged with its index, so the
    receive posted for that block takes them, as the ring's stop message does."""

    def __init__(self, comm: Comm, shapes: list[tuple[int, ...]]):
        self.comm, self.shapes, self.dst = comm, shapes, comm.output_rank
        comm.reserve(self.dst, KIND_BLOCK, shapes, torch.float32)
        self._pending: list = []  # state sends in flight: (work, tensor)

    def block(self, b: int, latents: torch.Tensor) -> None:
        self.comm.send(latents.to(torch.float32).contiguous(), self.dst, KIND_BLOCK, b)

    def _marker(self, next_block: int, mark: int, value: float = 0.0) -> None:
        """A message in block ``next_block``'s place, tagged ``mark``, carrying ``value``."""
        comm, shape = self.comm, self.shapes[next_block]
        link = comm._acquire(self.dst, KIND_BLOCK, message_bytes(shape, torch.float32))
        link.bufs[link.next][:8].view(torch.float64).fill_(value)
        comm._send_tagged(payload_bytes(shape, torch.float32), self.dst, KIND_BLOCK, next_block, mark)

    def checkpoint(self, next_block: int, data: bytes) -> None:
        """A checkpoint before block ``next_block``: the marker, then ``data`` (the engine's state)."""
        comm = self.comm
        self._marker(next_block, KIND_CHECKPOINT)
        size = torch.tensor([len(data)], dtype=torch.int64, device=comm.wire)
        body = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(comm.wire)
        for t in (size, body):  # not waited for here: the output rank takes them between its own tasks
            oid = comm._log("send", self.dst, KIND_STATE, next_block)
            try:
                work = dist.isend(t, self.dst, group=comm._state_group)
            except Exception as e:
                raise comm.peer_error(self.dst, "checkpoint send", e) from None
            self._pending.append((work, t, oid))
            comm.bytes_sent += t.numel() * t.element_size()
            comm.messages_sent += 1

    def stop(self, next_block: int, signum: int) -> None:
        """The run stops before block ``next_block`` (``signum``: the signal that stopped it)."""
        self._marker(next_block, KIND_STOP, float(signum))

    def flush(self) -> None:
        for work, _, oid in self._pending:
            self.comm.wait(work, self.dst, "checkpoint send", patient=True, ref=oid)
        self._pending.clear()


class OutputReceiver:
    """The output rank's end of the output channel: :meth:`next` gives ``("block", b, latents)``,
    ``("checkpoint", b, state bytes)`` or ``("stop", b, signal number)``, for the blocks ``shapes``
    lists, in order. (It waits: gloo cannot tell whether a receive is complete without waiting for
    it, so the output rank on the ring waits only for messages it knows were sent.)"""

    def __init__(self, comm: Comm, shapes: list[tuple[int, ...]], first: int = 0):
        self.comm, self.shapes, self.src = comm, shapes, 0
        self.expected = first
        """The block expected next."""
        nbytes = max(message_bytes(s, torch.float32) for s in shapes)
        self._buf = torch.empty(nbytes, dtype=torch.uint8, device=comm.wire)
        self._work = None
        self._post()

    def done(self) -> bool:
        return self.expected >= len(self.shapes)

    def _post(self) -> None:
        if self.done() or self._work is not None:
            return
        shape = self.shapes[self.expected]
        self._oid = self.comm._log("recv", self.src, KIND_BLOCK, self.expected)
        try:
            self._work = dist.irecv(self._buf[: message_bytes(shape, torch.float32)], self.src,
                                    group=self.comm._out_group)
        except Exception as e:
            raise self.comm.peer_error(self.src, f"receive for block {self.expected}", e) from None

    def next(self):
        comm, b = self.comm, self.expected
        if self._work is None:
            raise CommError(f"rank {comm.rank}: no further block expected from rank 0")
        comm.wait(self._work, self.src, f"waiting for block {b}", patient=True, ref=self._oid)
        self._work = None
        shape = self.shapes[b]
        n = payload_bytes(shape, torch.float32)
        got_task, got_check = self._buf[_padded(n): _padded(n) + TAG_BYTES].view(torch.int64).tolist()
        if got_task != b:
            raise CommError(f"rank {comm.rank}: expected block {b} from rank 0, got a message tagged {got_task}")
        if got_check == _check_word(KIND_STOP, b):
            return "stop", b, int(self._buf[:8].view(torch.float64).item())
        if got_check == _check_word(KIND_CHECKPOINT, b):
            size = torch.zeros(1, dtype=torch.int64, device=comm.wire)
            comm._blocking("recv", size, self.src, KIND_STATE, "checkpoint")
            body = torch.empty(int(size.item()), dtype=torch.uint8, device=comm.wire)
            comm._blocking("recv", body, self.src, KIND_STATE, "checkpoint")
            self._post()
            return "checkpoint", b, body.cpu().numpy().tobytes()
        if got_check != _check_word(KIND_BLOCK, b):
            raise CommError(f"rank {comm.rank}: block {b} from rank 0 has check word {got_check:#x}")
        latents = self._buf[:n].view(torch.float32).view(shape).to(comm.device, copy=True)
        self.expected += 1
        self._post()
        return "block", b, latents
