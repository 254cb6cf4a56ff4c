"""A rank's pipeline stage: its slice of layers and the per-layer feature caches it owns."""

from __future__ import annotations

import torch

from .models.wan import BlockShape, WanSlice
from .schedule import Task


class FeatureCache:
    """Per owned layer, the K/V of the first ``num_cat`` frames of the block processed last.

    Blocks run newest first, so when block ``b`` reaches a layer, the entry is
    block ``b+1``'s from moments earlier in the same iteration. Only the older
    neighbour uses an entry, once: :meth:`take` hands it over and forgets it,
    and the layer forward drops each layer's K/V as soon as it has attended to
    them, so at most one entry per layer is alive (constant in video length).
    """

    def __init__(self, num_layers: int):
        self._entries: list[tuple[int, int, tuple[torch.Tensor, torch.Tensor]] | None] = [None] * num_layers

    def take(self, iteration: int, block: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for i, e in enumerate(self._entries):
            if e is None or e[:2] != (iteration, block):
                have = None if e is None else e[:2]
                raise RuntimeError(f"feature cache of layer slot {i} holds {have}, need (iteration, block)={(iteration, block)}")
            out.append(e[2])
        self._entries = [None] * len(self._entries)
        return out

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                   for e in self._entries if e is not None for k, v in [e[2]])

    def put(self, iteration: int, block: int, kvs: list) -> None:
        for i, kv in enumerate(kvs):
            self._entries[i] = (iteration, block, kv)

    def clear(self) -> None:
        self._entries = [None] * len(self._entries)


class Stage:
    def __init__(self, model: WanSlice):
        self.model = model
        self.cache = FeatureCache(len(model.layers))

    def run(self, packet: torch.Tensor, task: Task, shape: BlockShape, out: torch.Tensor | None = None) -> torch.Tensor:
        """The owned layers on ``packet``; the result goes into ``out`` (a send buffer) when given."""
        extra = self.cache.take(task.iteration, task.newer) if shape.extra else None
        out, kept = self.model.forward_layers(packet, shape, extra, out=out)
        if shape.keep:
            self.cache.put(task.iteration, task.block, kept)
        return out
