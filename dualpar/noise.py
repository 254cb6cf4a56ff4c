"""Shared noise initialization (DualParal).

One pool of ``block + num_cat`` noise frames is drawn once from the run's
seed. For every new block the pool becomes ``[its last num_cat frames] +
[a random permutation of the other frames]`` and the block takes the pool's
last ``block`` frames. Re-using the same noise frames keeps the global
temporal dynamics consistent at no cost. Everything derives from one seeded
generator, so any rank that builds the pool gets the same noise.
"""

from __future__ import annotations

import torch


class NoisePool:
    def __init__(self, *, block: int, num_cat: int, channels: int, height: int, width: int, seed: int,
                 shared: bool = True):
        self.block = block
        self.shared = shared  # False: every block draws fresh noise (the ablation of the shared pool)
        self.num_cat = num_cat
        self.gen = torch.Generator().manual_seed(seed)
        self.pool = torch.randn(1, channels, block + num_cat, height, width, generator=self.gen)

    def next_block(self, frames: int) -> torch.Tensor:
        """Noise for the next block of ``frames`` latent frames, shape [1, C, frames, H, W] (float32).

        Only the first block may be longer than ``block`` (it takes the video's
        leftover frames): it takes as much of the pool as fits, and the rest is
        drawn fresh from the same generator.
        """
        if not self.shared:
            return torch.randn(1, self.pool.shape[1], frames, *self.pool.shape[3:], generator=self.gen)
        size = self.pool.shape[2]
        keep = self.pool[:, :, size - self.num_cat :]
        rest = self.pool[:, :, : size - self.num_cat]
        perm = torch.randperm(rest.shape[2], generator=self.gen)
        self.pool = torch.cat([keep, rest[:, :, perm]], dim=2)
        take = min(frames, size)
        out = self.pool[:, :, size - take :]
        if frames > size:
            extra = torch.randn(1, out.shape[1], frames - size, *out.shape[3:], generator=self.gen)
            out = torch.cat([extra, out], dim=2)
        return out.clone()

    def state_dict(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """The pool and its generator's state (all tensors: no metadata), for :meth:`load_state_dict`."""
        return {}, {"pool": self.pool.clone(), "gen": self.gen.get_state()}

    def load_state_dict(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Continue drawing exactly where the pool that gave ``state_dict()`` stopped."""
        self.pool = tensors["pool"].clone()
        self.gen.set_state(tensors["gen"])
