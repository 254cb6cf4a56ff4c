"""The serial reference of the block-wise schedule, written as plainly as possible.

Iteration ``i`` snapshots the state at the end of iteration ``i - 1``, then
computes every queued block from that snapshot, newest to oldest, with the
newer neighbour's K/V from the same iteration, and only then commits the new
latents. It uses no task list, no dependency tracking, no stage cache and no
communication, so the pipelined engine on N ranks can be checked against it.

With timestep feature caching (``cache``) a forecast step takes the block's
forecast noise prediction (``level=model``) or runs the embedding and head
around the whole model's forecast residual (``level=stage``: each rank's
stage forecasts its own, which sums to the same); an older block whose newer
neighbour's step was forecast attends to that neighbour's K/V from its last
computed step (``neighbour=reuse``) or to none (``drop``).
"""

from __future__ import annotations

import copy

import torch

from .config import Config
from .forecast import Forecaster
from .models import loader
from .models.wan import MOD_ROWS, BlockShape, WanSlice
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
                      seed=cfg.sampling.seed, shared=cfg.parallel.shared_noise)
    live: dict[int, torch.Tensor] = {}
    scheds: dict[int, object] = {}
    step: dict[int, int] = {}
    done: dict[int, torch.Tensor] = {}
    full = cfg.cache.full_steps(steps)
    sigmas = [float(t) / 1000.0 for t in template.timesteps]
    forecaster = None if all(full) else Forecaster.for_config(cfg.cache)
    stage_level = cfg.cache.level == "stage"
    kv: dict[int, list] = {}  # block -> K/V of its first num_cat frames at its latest computed step
    for it in range(nb + steps - 1):
        if it < nb:
            live[it] = noise.next_block(blocks[it].frames)
            scheds[it] = copy.deepcopy(template)
            step[it] = 0
        snap = {**{b: t.clone() for b, t in done.items()}, **{b: t.clone() for b, t in live.items()}}
        queued = sorted(live, reverse=True)
        new = {}
        for b in queued:
            s = step[b]
            x = snap[b]
            ctx = nc if b > 0 else 0
            if ctx:
                x = torch.cat([snap[b - 1][:, :, -nc:], x], dim=2)
            newer = b + 1 if (b + 1) in live else None  # its step this iteration was s - 1
            fresh = newer is not None and full[s - 1]
            shape = BlockShape(
                context=ctx,
                own=blocks[b].frames,
                extra=nc if newer is not None and (fresh or cfg.cache.neighbour == "reuse") else 0,
                keep=nc if (b - 1) in live else 0,
                height=h,
                width=w,
            )
            t = template.timesteps[s]
            if not full[s] and not stage_level:
                pred = forecaster.predict(b, s, sigmas[s])
            else:
                packet = model.embed(x, t, batch)
                n_tok = packet.shape[1] - MOD_ROWS  # token rows, then the time rows
                if full[s]:
                    out, kept = model.forward_layers(packet, shape, list(kv[newer]) if shape.extra else None)
                    if shape.keep:
                        kv[b] = kept
                    if stage_level and forecaster is not None:
                        forecaster.record(b, s, sigmas[s], out[:, :n_tok] - packet[:, :n_tok])
                else:
                    out = packet.clone()
                    out[:, :n_tok] += forecaster.predict(b, s, sigmas[s], dtype=packet.dtype)
                pred = model.head(out, shape, cfg.sampling.guidance)
            if full[s] and forecaster is not None and not stage_level:
                forecaster.record(b, s, sigmas[s], pred)
            new[b] = scheds[b].step(pred, t, snap[b], return_dict=False)[0]
        for b in queued:
            live[b] = new[b]
            step[b] += 1
            if step[b] == steps:
                done[b] = live.pop(b)
                kv.pop(b + 1, None)
                if forecaster is not None:
                    forecaster.drop(b)
    return [done[b] for b in range(nb)]


class _BlockCausal:
    """Wraps a Wan self-attention processor to apply a fixed boolean mask (True = may attend)."""

    def __init__(self, inner, mask: torch.Tensor):
        self.inner, self.mask = inner, mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self.inner(attn, hidden_states, encoder_hidden_states, self.mask, rotary_emb)


@torch.no_grad()
def causal_reference(cfg: Config, transformer, prompt_states: torch.Tensor) -> list[torch.Tensor]:
    """Either causal schedule computed without any KV cache: each iteration re-runs diffusers'
    own ``WanTransformer3DModel.forward`` over the whole video so far.

    The input is ``[clean latents of every finished chunk] + [every chunk in
    flight, at its current step]`` with per-token timesteps (0 for the clean
    ones), and every self-attention gets a block-causal mask (a chunk's tokens
    see their own chunk and earlier ones). Sequential: one chunk is in flight
    and the next enters when it is clean. Staggered: a new chunk enters every
    iteration, and a chunk that took its last step is clean from the next one.
    ``prompt_states`` are the text-encoder states [B, S, d] (B = 2 with
    guidance: cond, uncond). Returns each chunk's clean latents.
    """
    from .causal import chunk_noise, sigmas

    h, w = cfg.video.height // loader.VAE_SPATIAL, cfg.video.width // loader.VAE_SPATIAL
    chunks = split_blocks(cfg.video.latent_frames, cfg.causal.chunk)
    sig = sigmas(cfg)
    channels = transformer.config.in_channels
    p = transformer.config.patch_size
    tpf = (h // p[1]) * (w // p[2])
    batch = prompt_states.shape[0]
    staggered = cfg.causal.schedule == "staggered"
    inner = [blk.attn1.processor for blk in transformer.blocks]
    clean: list[torch.Tensor] = []
    flight: dict[int, tuple[torch.Tensor, int]] = {}  # chunk -> (latents, step)
    try:
        while len(clean) < len(chunks):
            nxt = len(clean) + len(flight)
            if nxt < len(chunks) and (staggered or not flight):
                shape = (1, channels, chunks[nxt].frames, h, w)
                flight[nxt] = (chunk_noise(cfg.sampling.seed, nxt, 0, shape), 0)
            order = sorted(flight)
            # chunk id of every token of [clean chunks + chunks in flight]
            ids = torch.cat([torch.full((b.frames * tpf,), i) for i, b in enumerate(chunks[: order[-1] + 1])])
            mask = (ids[None, :] <= ids[:, None])[None, None]
            for blk, proc in zip(transformer.blocks, inner):
                blk.attn1.set_processor(_BlockCausal(proc, mask))
            ts = [torch.zeros(x.shape[2] * tpf) for x in clean]
            ts += [torch.full((flight[c][0].shape[2] * tpf,), sig[flight[c][1]] * 1000.0) for c in order]
            video = torch.cat(clean + [flight[c][0] for c in order], dim=2)
            out = transformer(video.expand(batch, -1, -1, -1, -1), torch.cat(ts)[None].expand(batch, -1),
                              prompt_states, return_dict=False)[0].float()
            out = out[1:] + cfg.sampling.guidance * (out[:1] - out[1:]) if batch == 2 else out
            start = sum(x.shape[2] for x in clean)
            for c in order:
                x, s = flight[c]
                v = out[:, :, start : start + x.shape[2]]
                start += x.shape[2]
                sigma = sig[s]
                x0 = x - sigma * v
                if s + 1 == len(sig):
                    del flight[c]
                    clean.append(x0)
                elif cfg.causal.sampler == "euler":
                    flight[c] = (x + (sig[s + 1] - sigma) * v, s + 1)
                else:
                    noise = chunk_noise(cfg.sampling.seed, c, s + 1, x.shape)
                    flight[c] = ((1 - sig[s + 1]) * x0 + sig[s + 1] * noise, s + 1)
    finally:
        for blk, proc in zip(transformer.blocks, inner):
            blk.attn1.set_processor(proc)
    return clean
