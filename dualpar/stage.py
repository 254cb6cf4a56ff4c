"""A rank's pipeline stage: its slice of layers and the caches it owns (the neighbours' K/V and,
with ``cache.level=stage``, its layers' residual history for forecasting)."""

from __future__ import annotations

import torch

from .forecast import Forecaster
from .models.wan import BlockShape, WanSlice
from .schedule import Task, last_full_step


class FeatureCache:
    """Per block, the K/V (one pair per owned layer) of its first ``num_cat`` frames at its latest
    computed step, for its older neighbour.

    Blocks run newest first, so when block ``b`` reaches a layer, block ``b+1``'s entry is from
    moments earlier in the same iteration. Without forecasting the older neighbour uses an entry
    once: :meth:`take` hands it over and forgets it, so at most one entry is alive. With forecasting
    (``retain``) a block whose step was forecast has no fresh K/V, and its older neighbour may reuse
    the entry of the block's last computed step: entries stay until :meth:`release` (when the older
    neighbour leaves the queue), so at most one per queued block is alive (the queue holds at most
    ``steps`` blocks: constant in video length).
    """

    def __init__(self, num_layers: int, retain: bool = False):
        self.num_layers, self.retain = num_layers, retain
        self._entries: dict[int, tuple[int, list[tuple[torch.Tensor, torch.Tensor]]]] = {}

    def take(self, iteration: int, block: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Block ``block``'s entry, which must have been put in ``iteration``."""
        e = self._entries.get(block)
        if e is None or e[0] != iteration:
            have = None if e is None else (e[0], block)
            raise RuntimeError(f"feature cache holds {have} for block {block}, need (iteration, block)={(iteration, block)}")
        if not self.retain:
            del self._entries[block]
        return list(e[1])  # the layer forward releases each layer's pair from this list as it goes

    def put(self, iteration: int, block: int, kvs: list) -> None:
        self._entries[block] = (iteration, list(kvs))

    def release(self, block: int) -> None:
        self._entries.pop(block, None)

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                   for _, kvs in self._entries.values() for k, v in kvs)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()


class Stage:
    """One rank's layers. ``full``: per denoising step, whether it is computed (see
    :func:`schedule.full_steps`); ``sigmas``: the steps' noise levels; ``forecast``: the forecaster
    of this stage's residual (``cache.level=stage``), or None."""

    def __init__(self, model: WanSlice, full: list[bool] | None = None, sigmas: list[float] | None = None,
                 forecast: Forecaster | None = None):
        self.model = model
        self.full, self.sigmas, self.forecast = full, sigmas, forecast
        self.cache = FeatureCache(len(model.layers), retain=full is not None and not all(full))
        self.peak_bytes = 0
        """Most bytes the caches held at once since the last :meth:`reset`."""

    def reset(self) -> None:
        """Forget every block (a new video)."""
        self.cache.clear()
        if self.forecast is not None:
            self.forecast.clear()
        self.peak_bytes = 0

    def nbytes(self) -> int:
        """Bytes this stage's caches hold now."""
        return self.cache.nbytes() + (self.forecast.nbytes() if self.forecast is not None else 0)

    def run(self, packet: torch.Tensor, task: Task, shape: BlockShape, out: torch.Tensor | None = None) -> torch.Tensor:
        """The owned layers on ``packet``; the result goes into ``out`` (a send buffer) when given."""
        n_tok = shape.frames * self.model.tokens_per_frame(shape.height, shape.width)  # then the time rows
        if not task.full:  # a forecast step of this stage: the input plus the forecast residual
            res = self.forecast.predict(task.block, task.step, self.sigmas[task.step], dtype=packet.dtype)
            out = packet.clone() if out is None else out.copy_(packet)
            out[:, :n_tok] += res
        else:
            extra = self.cache.take(self._newer_iteration(task), task.newer) if shape.extra else None
            out, kept = self.model.forward_layers(packet, shape, extra, out=out)
            if shape.keep:
                self.cache.put(task.iteration, task.block, kept)
            if self.forecast is not None:
                self.forecast.record(task.block, task.step, self.sigmas[task.step], out[:, :n_tok] - packet[:, :n_tok])
        self.peak_bytes = max(self.peak_bytes, self.nbytes())
        if task.last_step:
            self.cache.release(task.block + 1)  # its only reader has left
            if self.forecast is not None:
                self.forecast.drop(task.block)
        return out

    def _newer_iteration(self, task: Task) -> int:
        """The iteration in which the newer neighbour's K/V this task attends to were put: this one,
        or, when the neighbour's step now was forecast, that of its last computed step."""
        if self.full is None:
            return task.iteration
        return task.newer + last_full_step(self.full, task.step - 1)
