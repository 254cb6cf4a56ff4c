"""Output on another rank (``output.decode_on`` last or extra): rank 0 hands finished blocks and
checkpoint states to :class:`RemoteWriter`, which sends them; the output rank's :class:`OutputServer`
receives them and drives the real :class:`~dualpar.output.writer.RunWriter` and checkpointer there.

The run directory has one owner, the output rank: it holds the lock, writes the latents, the video,
the manifest and the checkpoints (rank 0's engine state travels to it at each checkpoint and is
stored with the writer's own state in the same file, as on one rank)."""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors


def pack_state(meta: dict, tensors: dict[str, torch.Tensor]) -> bytes:
    """A part's ``(meta, tensors)`` as bytes (no pickle): the meta's JSON length, the JSON, safetensors."""
    head = json.dumps(meta).encode()
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return struct.pack("<Q", len(head)) + head + (save_safetensors(cpu) if cpu else b"")


def unpack_state(data: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8 : 8 + n])
    rest = data[8 + n :]
    return meta, (load_safetensors(rest) if rest else {})


class _Saved:
    """A part whose state was taken elsewhere (rank 0's engine), for the checkpointer."""

    def __init__(self, meta: dict, tensors: dict[str, torch.Tensor]):
        self.meta, self.tensors = meta, tensors

    def state_dict(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return self.meta, self.tensors


class RemoteWriter:
    """Rank 0's stand-in for the run writer when another rank owns the output: ``add_block`` sends."""

    def __init__(self, sender, first: int = 0):
        self.sender = sender
        self.trace = None
        self.next_block = first
        """The block the output rank expects next (markers take its place)."""

    def add_block(self, block_id: int, latents: torch.Tensor) -> int:
        self.sender.block(block_id, latents)
        self.next_block = block_id + 1
        return 0

    def checkpoint(self, state) -> None:
        """Send the engine's state at an iteration boundary; the output rank stores it with its own."""
        self.sender.checkpoint(self.next_block, pack_state(*state.state_dict()))

    def stop(self, signum: int) -> None:
        if self.next_block < len(self.sender.shapes):  # (a stop comes at a boundary with work left)
            self.sender.stop(self.next_block, signum)

    def flush(self) -> None:
        self.sender.flush()


class OutputServer:
    """The output rank's side: each message from rank 0 into ``writer`` (blocks) or a checkpoint
    (``make_checkpointer(engine_part)`` builds one around rank 0's state); a stop marker ends it.

    ``points`` (see :func:`dualpar.ring.output_points`), for an output rank that also runs layers:
    before each of its tasks, how many blocks and checkpoint markers rank 0 has sent by then;
    :meth:`before` takes exactly those, so the rank never waits for a message still to come."""

    def __init__(self, receiver, writer, make_checkpointer=None, points: dict | None = None):
        self.receiver, self.writer, self.make_checkpointer = receiver, writer, make_checkpointer
        self.points = points or {}
        self.stopped: int | None = None
        """The signal number of a stop rank 0 sent, else None."""
        self.blocks = 0
        self.checkpoints = 0

    def finished(self) -> bool:
        return self.stopped is not None or self.receiver.done()

    def _handle(self, msg) -> None:
        kind, b, payload = msg
        if kind == "block":
            self.writer.add_block(b, payload)
            self.blocks += 1
        elif kind == "checkpoint":
            if self.make_checkpointer is None:
                raise RuntimeError(f"rank 0 sent a checkpoint before block {b}, but this run takes none")
            self.make_checkpointer(_Saved(*unpack_state(payload))).save()
            self.checkpoints += 1
        else:
            self.stopped = payload

    def before(self, task) -> None:
        """Take what rank 0 sent before ``task``'s packet (the last rank, between its own tasks)."""
        blocks, marks = self.points.get(task.index, (0, 0))
        while not self.finished() and (self.blocks < blocks or self.checkpoints < marks):
            self._handle(self.receiver.next())

    def drain(self) -> None:
        """Take every message until the last block or a stop (waits for them)."""
        while not self.finished():
            self._handle(self.receiver.next())
