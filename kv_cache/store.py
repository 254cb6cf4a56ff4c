"""Committed K/V of one attention layer, kept by frame in a fixed set of physical slots."""

from __future__ import annotations

import torch


class KVStore:
    """A ring of ``capacity`` frame slots with a logical-frame index map.

    Each slot holds one latent frame's keys and values, ``[batch, tokens, heads,
    head_dim]`` each, as the model hands them (rotated at fixed positions, or
    unrotated for a reader that picks positions at attention time). A frame's logical index (its position in the video) is kept apart
    from its slot: committing into a full store evicts one frame and reuses its
    slot, nothing is ever shifted. The first ``sink`` frames committed are
    pinned and never evicted.

    ``score`` is one float per slot for the selection policy's own use (e.g.
    the attention a frame received lately); the store only resets it.
    """

    def __init__(self, capacity: int, *, batch: int, tokens: int, heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", sink: int = 0):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1 frame, got {capacity}")
        if not 0 <= sink < capacity:
            raise ValueError(f"sink frames ({sink}) must be fewer than the capacity ({capacity})")
        shape = (batch, capacity, tokens, heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity, self.sink = capacity, sink
        self.frame_in_slot = [-1] * capacity  # -1: free
        self.slot_of: dict[int, int] = {}
        self.score = torch.zeros(capacity, dtype=torch.float32, device=device)
        self.sinks: list[int] = []
        self.committed = 0  # frames ever committed (including evicted ones)

    # -- reading -----------------------------------------------------------

    def __len__(self) -> int:
        return len(self.slot_of)

    @property
    def full(self) -> bool:
        return len(self.slot_of) == self.capacity

    def frames(self) -> list[int]:
        """Logical indices of the stored frames, oldest first."""
        return sorted(self.slot_of)

    def slots(self) -> list[int]:
        """Physical slots of the stored frames, in logical order."""
        return [self.slot_of[f] for f in self.frames()]

    def ordered(self) -> tuple[list[int], torch.Tensor, torch.Tensor]:
        """``(frames, k, v)`` of every stored frame in logical order; k, v ``[B, n, tokens, H, D]``."""
        frames = self.frames()
        n = len(frames)
        if self.frame_in_slot[:n] == frames:  # slots 0..n-1 hold the frames in order: views, no copy
            return frames, self.k[:, :n], self.v[:, :n]
        idx = torch.tensor([self.slot_of[f] for f in frames], dtype=torch.long, device=self.k.device)
        return frames, self.k.index_select(1, idx), self.v.index_select(1, idx)

    def nbytes(self) -> int:
        """Memory held by the slots (allocated once: bounded by ``capacity``)."""
        return self.k.numel() * self.k.element_size() * 2

    # -- writing -----------------------------------------------------------

    def commit(self, frame: int, k: torch.Tensor, v: torch.Tensor, victim=None) -> int | None:
        """Store one frame's K/V ``[B, tokens, H, D]``; returns the evicted frame, if any.

        When the store is full, ``victim(store)`` names the logical frame to
        drop (default: the oldest frame that is not a sink).
        """
        if frame in self.slot_of:
            raise ValueError(f"frame {frame} is already committed")
        evicted = None
        if self.full:
            evicted = victim(self) if victim is not None else self.oldest_evictable()
            if evicted in self.sinks or evicted not in self.slot_of:
                raise ValueError(f"cannot evict frame {evicted}: it is a sink or not stored")
            self.evict(evicted)
        slot = self.frame_in_slot.index(-1)
        self.k[:, slot] = k
        self.v[:, slot] = v
        self.frame_in_slot[slot] = frame
        self.slot_of[frame] = slot
        self.score[slot] = float("inf")  # not yet scored: never the first to go
        if len(self.sinks) < self.sink:
            self.sinks.append(frame)
        self.committed += 1
        return evicted

    def evict(self, frame: int) -> None:
        slot = self.slot_of.pop(frame)
        self.frame_in_slot[slot] = -1
        self.score[slot] = 0.0

    def oldest_evictable(self) -> int:
        for f in self.frames():
            if f not in self.sinks:
                return f
        raise ValueError("every stored frame is a sink")

    def clear(self) -> None:
        self.frame_in_slot = [-1] * self.capacity
        self.slot_of.clear()
        self.sinks.clear()
        self.score.zero_()
        self.committed = 0
