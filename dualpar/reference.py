"""The serial reference of the block-wise schedule, written as plainly as possible.

Iteration ``i`` snapshots the state at the end of iteration ``i - 1``, then
computes every queued block from that snapshot, newest to oldest, with the
newer neighbour's K/V from the same iteration, and only then commits the new
latents. It uses no task list, no dependency tracking, no stage cache and no
communication, so the pipelined engine on N ranks can be checked against it.
"""

from __future__ import annotations

import copy

import torch

from .config import Config
from .models import loader
from .models.wan import BlockShape, WanSlice
from .noise import NoisePool
from .schedule import split_blocks


@torch.no_grad()
def serial_reference(cfg: Config, model: WanSlice, text: torch.Tensor) -> list[torch.Tensor]:
    """Latents of every block, [1, C, frames, H, W] each, for a full (all-layer) ``model``.

    ``text`` is the projected text context [B, S, dim] (B = 2 with guidance).
    """
    assert model.has_embed and model.has_head, "the reference runs the whole model"
    nc, steps = cfg.parallel.num_cat, cfg.sampling.steps
    h, w = cfg.video.height // loader.VAE_SPATIAL, cfg.video.width // loader.VAE_SPATIAL
    blocks = split_blocks(cfg.video.latent_frames, cfg.parallel.block)
    nb = len(blocks)
    batch = text.shape[0]
    model.set_text(text)
    template = loader.make_scheduler(cfg)
    noise = NoisePool(block=cfg.parallel.block, num_cat=nc, channels=model.out_channels, height=h, width=w,
                      seed=cfg.sampling.seed)
    live: dict[int, torch.Tensor] = {}
    scheds: dict[int, object] = {}
    step: dict[int, int] = {}
    done: dict[int, torch.Tensor] = {}
    for it in range(nb + steps - 1):
        if it < nb:
            live[it] = noise.next_block(blocks[it].frames)
            scheds[it] = copy.deepcopy(template)
            step[it] = 0
        snap = {**{b: t.clone() for b, t in done.items()}, **{b: t.clone() for b, t in live.items()}}
        queued = sorted(live, reverse=True)
        newer_kv = None
        new = {}
        for b in queued:
            x = snap[b]
            ctx = nc if b > 0 else 0
            if ctx:
                x = torch.cat([snap[b - 1][:, :, -nc:], x], dim=2)
            shape = BlockShape(
                context=ctx,
                own=blocks[b].frames,
                extra=nc if (b + 1) in live else 0,
                keep=nc if (b - 1) in live else 0,
                height=h,
                width=w,
            )
            t = template.timesteps[step[b]]
            packet = model.embed(x, t, batch)
            packet, kept = model.forward_layers(packet, shape, newer_kv if shape.extra else None)
            pred = model.head(packet, shape, cfg.sampling.guidance)
            new[b] = scheds[b].step(pred, t, snap[b], return_dict=False)[0]
            newer_kv = kept
        for b in queued:
            live[b] = new[b]
            step[b] += 1
            if step[b] == steps:
                done[b] = live.pop(b)
    return [done[b] for b in range(nb)]
