"""Chunk-by-chunk causal forward passes over a :class:`WanSlice` (CausVid / Self-Forcing style).

A chunk of latent frames is run through the slice's layers with block-causal
attention: its queries attend to the chunk itself, to the frames that are
always attended (in a staggered schedule, the in-flight older chunks' current
K/V) and to the committed frames a :mod:`kv_cache` policy selects. A chunk's
"commit" pass (clean latents at t = 0) writes its K/V into each layer's store.

Choices made explicit:

* RoPE. ``rope="absolute"`` uses each frame's position in the video (what
  Self-Forcing and LongLive compute; Wan's table has 1024 temporal
  positions) and caches keys *rotated*, so the history is never rotated
  again. ``rope="rebase"`` caches keys unrotated (after ``norm_k``) and
  rotates them at every use, shifting every position by ``end - 1024`` once
  the chunk's end passes the table and clamping at 0, so rollouts can go on
  past the table (relative distances inside the last 1024 frames are kept).
* Timesteps are per frame: the packet carries one time embedding and six
  modulation rows per latent frame (diffusers' per-token timestep path).
* Cross-attention K/V are computed once per prompt and dropped when no chunk
  in flight uses that prompt any more.

Packet between ranks: ``[B, F * tokens + 7 * F, dim]``, the hidden states
followed by 7 rows per frame (time embedding, then six modulation vectors).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from kv_cache import KVStore, Policy, attend
from ..config import RopeMode, choices
from .wan import MOD_ROWS, WanSlice, apply_rope, block_forward, guided


@dataclass(frozen=True, slots=True)
class ChunkShape:
    start: int
    """Logical index of the chunk's first latent frame."""
    frames: int
    """Latent frames in the chunk."""
    height: int
    width: int
    commit: bool = False
    """This pass commits the chunk's K/V to the stores (clean latents at t = 0)."""
    prompt: int = 0
    """Index of the prompt this chunk is generated with."""
    pending: bool = False
    """Younger chunks of the same iteration attend to this pass's K/V (staggered schedule)."""

    @property
    def frame_ids(self) -> list[int]:
        return list(range(self.start, self.start + self.frames))


class LayerCache:
    """One layer's KV state for causal generation: the committed store and the in-flight K/V.

    ``pending`` holds, for the current iteration of a staggered schedule, the
    current (not yet clean) K/V of older chunks still being denoised: always
    attended, never selected from, never committed.
    """

    def __init__(self, store: KVStore, policy: Policy):
        self.store, self.policy = store, policy
        self.pending: list[tuple[list[int], torch.Tensor, torch.Tensor]] = []

    def nbytes(self) -> int:
        return self.store.nbytes()


class CausalWan:
    """Causal passes over the layers of ``model`` (a :class:`WanSlice`); one per rank."""

    def __init__(self, model: WanSlice, rope: RopeMode = "absolute"):
        if rope not in choices("causal.rope"):
            raise ValueError(f"rope must be one of {choices('causal.rope')}, got {rope!r}")
        self.m = model
        self.rope = rope
        self.table = model.rope.max_seq_len
        t_dim, h_dim, w_dim = model.rope.t_dim, model.rope.h_dim, model.rope.w_dim
        cos = model.rope.freqs_cos.split([t_dim, h_dim, w_dim], dim=1)
        sin = model.rope.freqs_sin.split([t_dim, h_dim, w_dim], dim=1)
        self._t = (cos[0], sin[0])  # float64, as diffusers' own RoPE tables
        self._hw_tables = (cos[1:], sin[1:])
        self._hw: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._texts: dict[int, torch.Tensor] = {}
        self._cross: dict[int, list] = {}

    # -- prompts ---------------------------------------------------------------

    def set_texts(self, texts: list[torch.Tensor]) -> None:
        """The projected text context of every prompt of the run, [B, S, dim] each."""
        self._texts = dict(enumerate(texts))
        self._cross.clear()

    def _cross_kv(self, prompt: int):
        if prompt not in self._cross:
            self._cross[prompt] = self.m.cross_kv(self._texts[prompt].to(self.m.device))
        return self._cross[prompt]

    def release_prompts_before(self, prompt: int) -> None:
        """Drop the cross-attention K/V of prompts no chunk in flight uses any more."""
        for p in [p for p in self._cross if p < prompt]:
            del self._cross[p]

    # -- positions -------------------------------------------------------------

    def positions(self, frames: list[int], end: int) -> list[int]:
        """RoPE positions of logical ``frames`` when the newest attending frame ends at ``end``."""
        if self.rope == "absolute":
            if end > self.table:
                raise ValueError(f"latent frame {end - 1} is past RoPE's {self.table} positions; use rope 'rebase'")
            return frames
        shift = max(0, end - self.table)
        return [max(f - shift, 0) for f in frames]

    def _rotate(self, x: torch.Tensor, positions: list[int], height: int, width: int) -> torch.Tensor:
        """Rotate ``x`` [B, len(positions) * T, H, D] (frames in order) with Wan's 3-D RoPE."""
        ph, pw = self.m.patch_size[1:]
        hh, ww = height // ph, width // pw
        if (hh, ww) not in self._hw:  # the spatial part of every frame's rotation: [T, h_dim + w_dim]
            def grid(th, tw):
                return torch.cat([th[:hh].view(hh, 1, -1).expand(hh, ww, -1),
                                  tw[:ww].view(1, ww, -1).expand(hh, ww, -1)], -1).reshape(hh * ww, -1)

            (ch, cw), (sh, sw) = self._hw_tables
            self._hw[hh, ww] = (grid(ch, cw), grid(sh, sw))
        pos = torch.tensor(positions, dtype=torch.long, device=self._t[0].device)
        n, t = len(positions), hh * ww

        def table(temporal, spatial):  # [1, n * T, 1, D]
            per_frame = temporal[pos].view(n, 1, -1).expand(n, t, -1)
            return torch.cat([per_frame, spatial.view(1, t, -1).expand(n, t, -1)], -1).reshape(1, n * t, 1, -1)

        cos, sin = table(self._t[0], self._hw[hh, ww][0]), table(self._t[1], self._hw[hh, ww][1])
        return apply_rope(x, cos.to(x.device), sin.to(x.device))

    # -- rank 0: embedding -----------------------------------------------------

    def embed(self, latents: torch.Tensor, timesteps: torch.Tensor, batch: int) -> torch.Tensor:
        """Patch-embed a chunk [1, C, F, H, W] with per-frame ``timesteps`` [F]: a packet."""
        m = self.m
        frames = latents.shape[2]
        x = latents.to(m.device, m.dtype).expand(batch, -1, -1, -1, -1)
        x = m.patch_embedding(x).flatten(2).transpose(1, 2)
        temb, tproj = self.frame_conditioning(timesteps.reshape(frames))
        mod = torch.cat([temb[:, None], tproj], 1).flatten(0, 1)  # [F * 7, dim]
        return torch.cat([x, mod[None].expand(batch, -1, -1)], dim=1).contiguous()

    def frame_conditioning(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Time embeddings [N, dim] and modulation rows [N, 6, dim] of ``timesteps`` [N] (one per frame)."""
        ce = self.m.condition_embedder
        t = ce.timesteps_proj(timesteps.to(self.m.device))
        tdtype = next(iter(ce.time_embedder.parameters())).dtype
        if t.dtype != tdtype:
            t = t.to(tdtype)
        temb = ce.time_embedder(t).to(self.m.dtype)
        return temb, ce.time_proj(ce.act_fn(temb)).unflatten(1, (6, -1))

    # -- every rank: layers ----------------------------------------------------

    def forward_layers(self, packet: torch.Tensor, shape: ChunkShape, caches: list[LayerCache], out=None) -> torch.Tensor:
        m = self.m
        tpf = m.tokens_per_frame(shape.height, shape.width)
        n_tok = shape.frames * tpf
        x, mod = packet[:, :n_tok], packet[:, n_tok:]
        b = x.shape[0]
        tproj = mod.view(b, shape.frames, MOD_ROWS, -1)[:, :, 1:]  # [B, F, 6, dim]
        cross = self._cross_kv(shape.prompt)
        for i, blk in enumerate(m.layers):
            step = partial(self._self_attention, cache=caches[i], shape=shape, tpf=tpf)
            x, _ = block_forward(blk, x, tproj, cross[i], step, m.attention)
        return torch.cat([x, mod], dim=1, out=out)

    def _self_attention(self, a, h, cache: LayerCache, shape: ChunkShape, tpf: int):
        """Block-causal self-attention of a chunk (the causal step of :func:`block_forward`); the chunk's
        K/V go to ``cache`` (committed or pending), so nothing else is handed back: ``(out, None)``."""
        q = a.norm_q(a.to_q(h)).unflatten(2, (a.heads, -1))
        k = a.norm_k(a.to_k(h)).unflatten(2, (a.heads, -1))
        v = a.to_v(h).unflatten(2, (a.heads, -1))
        own = shape.frame_ids
        end = own[-1] + 1
        hw = (shape.height, shape.width)
        absolute = self.rope == "absolute"
        q_r = self._rotate(q, self.positions(own, end), *hw)
        if absolute:  # keys are kept rotated: the history is never rotated again
            k = self._rotate(k, own, *hw)
        k_now = torch.cat([pk for _, pk, _ in cache.pending] + [k], 1)
        v_now = torch.cat([pv for _, _, pv in cache.pending] + [v], 1)
        k_now_r = k_now
        if not absolute:
            pend_frames = [fr for frames, _, _ in cache.pending for fr in frames]
            k_now_r = self._rotate(k_now, self.positions(pend_frames + own, end), *hw)
        hist_frames, k_hist, v_hist = cache.store.ordered()
        selection, k_hist_r = None, None
        if hist_frames:
            k_hist_r = k_hist
            if not absolute:
                k_hist_r = self._rotate(k_hist.flatten(1, 2), self.positions(hist_frames, end), *hw).view(k_hist.shape)
            selection = cache.policy.select(cache.store, q_r, shape.frames, k_hist_r, v_hist, k_now_r)
        out = attend(q_r, k_now_r, v_now, k_hist_r, v_hist if hist_frames else None, selection)
        out = out.flatten(2, 3).type_as(q)
        if shape.commit:
            for j, fr in enumerate(own):
                sl = slice(j * tpf, (j + 1) * tpf)
                cache.store.commit(fr, k[:, sl], v[:, sl], cache.policy.victim)
        elif shape.pending:
            cache.pending.append((own, k, v))
        return a.to_out[1](a.to_out[0](out)), None

    # -- last rank: head -------------------------------------------------------

    def head(self, packet: torch.Tensor, shape: ChunkShape, guidance: float, out=None) -> torch.Tensor:
        """Output head per frame and CFG: the chunk's flow prediction [1, C, F, H, W] in float32."""
        n_tok = shape.frames * self.m.tokens_per_frame(shape.height, shape.width)
        b = packet.shape[0]
        temb = packet[:, n_tok:].view(b, shape.frames, MOD_ROWS, -1)[:, :, 0]  # [B, F, dim]
        return guided(self.frame_head(packet[:, :n_tok], temb, shape.height, shape.width), guidance, out)

    def frame_head(self, x: torch.Tensor, temb: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Output norm (modulated per frame by ``temb`` [B, F, dim]), projection and unpatchify of the
        hidden states ``x`` [B, F * tokens, dim]: the flow prediction of every row [B, C, F, H, W], float32."""
        m = self.m
        b, frames = temb.shape[:2]
        tpf, n_tok = x.shape[1] // frames, x.shape[1]
        shift, scale = (m.scale_shift_table[:, None] + temb[:, :, None]).chunk(2, dim=2)  # [B, F, 1, dim]
        x = (m.norm_out(x.float()).view(b, frames, tpf, -1) * (1 + scale) + shift).view(b, n_tok, -1).type_as(x)
        x = m.proj_out(x)
        pt, ph, pw = m.patch_size
        x = x.reshape(b, frames // pt, height // ph, width // pw, pt, ph, pw, -1)
        return x.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3).float()
