"""A contiguous slice of a diffusers ``WanTransformer3DModel`` that can attend to extra context.

:class:`WanSlice` keeps layers ``[first, last)`` of the transformer, plus the
patch and condition embedding when ``first == 0`` and the output head when
``last`` is the final layer. Its layers run :func:`block_forward`, diffusers'
``WanTransformerBlock.forward`` with a pluggable self-attention step (the causal
mode, :mod:`.causal_wan`, plugs in its KV-cache step). The bidirectional step
adds two things block-wise denoising needs at every self-attention layer:

* extra keys/values appended to the block's own (the newer neighbour's first
  frames, from the stage's feature cache), and
* the K/V of a chosen token range returned, to be cached for the older neighbour.

Keys are cached after ``norm_k`` (a per-token RMS norm) but *before* RoPE, and
rotated where they are used: the extra frames take the temporal positions that
follow the consumer's own input frames, which is where they lie in the video.

Between ranks a block travels as one "packet" tensor ``[B, tokens + 7, dim]``:
its hidden states followed by the time embedding and the six modulation rows,
so no rank but the first needs the condition embedder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch import nn

from ..schedule import Layout

MOD_ROWS = 7  # temb + 6 modulation vectors appended to the hidden states


@dataclass(frozen=True, slots=True)
class BlockShape(Layout):
    """Geometry of one block's forward pass (identical on every rank): the task's frame layout
    and the latent frame size."""

    height: int
    """Latent height."""
    width: int
    """Latent width."""


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate interleaved channel pairs of ``x`` [B, L, H, D] (Wan's real-valued RoPE), into ``out`` if given."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    if out is None:
        out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanSlice(nn.Module):
    def __init__(self, model, first: int, last: int):
        super().__init__()
        cfg = model.config
        n = len(model.blocks)
        if not 0 <= first < last <= n:
            raise ValueError(f"bad layer range [{first}, {last}) of {n}")
        if cfg.image_dim is not None or cfg.added_kv_proj_dim is not None:
            raise ValueError("only text-to-video Wan models are supported (no image conditioning)")
        self.first, self.last, self.num_layers = first, last, n
        self.patch_size = tuple(cfg.patch_size)
        self.heads = cfg.num_attention_heads
        self.dim = cfg.num_attention_heads * cfg.attention_head_dim
        self.out_channels = cfg.out_channels or cfg.in_channels
        self.rope = model.rope  # no parameters: every rank rebuilds positions locally
        self.layers = nn.ModuleList(model.blocks[i] for i in range(first, last))
        self.has_embed = first == 0
        self.has_head = last == n
        if self.has_embed:
            self.patch_embedding = model.patch_embedding
            self.condition_embedder = model.condition_embedder
        if self.has_head:
            self.norm_out = model.norm_out
            self.proj_out = model.proj_out
            self.scale_shift_table = model.scale_shift_table
        self._rope_cache: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._cross_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.attention = None
        """diffusers attention backend of the layers (None: the dispatcher's default, torch SDPA)."""
        self.cfg_serial = False
        """Run the CFG rows through each layer one after the other (less activation memory)."""
        self._compiled_layer = None

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].attn1.to_q.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.layers[0].attn1.to_q.weight.device

    def tokens_per_frame(self, height: int, width: int) -> int:
        return (height // self.patch_size[1]) * (width // self.patch_size[2])

    # -- rank 0: embeddings ------------------------------------------------

    def text_context(self, prompt_embeds: torch.Tensor) -> torch.Tensor:
        """Project text-encoder states [B, S, text_dim] to the model width (once per prompt)."""
        return self.condition_embedder.text_embedder(prompt_embeds.to(self.device, self.dtype))

    def embed(self, latents: torch.Tensor, timestep: torch.Tensor, batch: int) -> torch.Tensor:
        """Patch-embed ``latents`` [1, C, F, H, W] and append the time conditioning: a packet."""
        x = latents.to(self.device, self.dtype).expand(batch, -1, -1, -1, -1)
        x = self.patch_embedding(x).flatten(2).transpose(1, 2)
        ce = self.condition_embedder
        t = ce.timesteps_proj(timestep.reshape(1).expand(batch).to(self.device))
        tdtype = next(iter(ce.time_embedder.parameters())).dtype
        if t.dtype != tdtype:
            t = t.to(tdtype)
        temb = ce.time_embedder(t).to(self.dtype)
        tproj = ce.time_proj(ce.act_fn(temb)).unflatten(1, (6, -1))
        return torch.cat([x, temb[:, None], tproj], dim=1).contiguous()

    # -- every rank: layers ------------------------------------------------

    def set_text(self, text: torch.Tensor) -> None:
        """Cache each owned layer's cross-attention K/V: they depend only on the prompt."""
        self._cross_kv = self.cross_kv(text)

    def cross_kv(self, text: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each owned layer's cross-attention K/V for a projected text context [B, S, dim]."""
        kv = []
        for blk in self.layers:
            a = blk.attn2
            k = a.norm_k(a.to_k(text)).unflatten(2, (a.heads, -1))
            v = a.to_v(text).unflatten(2, (a.heads, -1))
            kv.append((k, v))
        return kv

    def _rope(self, frames: int, height: int, width: int):
        key = (frames, height, width)
        if key not in self._rope_cache:
            dummy = torch.empty(1, 1, frames, height, width, device="meta")
            cos, sin = self.rope(dummy)
            self._rope_cache[key] = (cos.to(self.device), sin.to(self.device))
        return self._rope_cache[key]

    def forward_layers(self, packet: torch.Tensor, shape: BlockShape, extra_kv=None, out=None):
        """Run the owned layers on a packet.

        ``extra_kv`` is a list, per owned layer, of (k, v) [B, tokens, dim] to
        append (or None); each layer's entry is released as soon as the layer
        has used it. Returns the new packet (written into ``out`` when given,
        e.g. a send buffer) and, per owned layer, the K/V of the ``shape.keep``
        leading own frames (or None when nothing is kept).
        """
        if self._cross_kv is None:
            raise RuntimeError("set_text() must be called before forward_layers()")
        tpf = self.tokens_per_frame(shape.height, shape.width)
        n_tok = shape.frames * tpf
        x, mod = packet[:, :n_tok], packet[:, n_tok:]
        tproj = mod[:, 1:]
        cos, sin = self._rope(shape.frames + shape.extra, shape.height, shape.width)
        rope_q = (cos[:, :n_tok], sin[:, :n_tok])
        rope_k = (cos, sin)
        keep = slice(shape.context * tpf, (shape.context + shape.keep) * tpf) if shape.keep else None
        kept = []
        layer = self._compiled_layer or self._layer
        for i, blk in enumerate(self.layers):
            extra = None
            if extra_kv is not None:
                extra, extra_kv[i] = extra_kv[i], None  # freed once this layer has attended to it
            if self.cfg_serial and x.shape[0] == 2:
                x, kv = self._rows_one_by_one(layer, blk, x, self._cross_kv[i], tproj, rope_q, rope_k, extra, keep)
            else:
                x, kv = layer(blk, x, self._cross_kv[i], tproj, rope_q, rope_k, extra, keep)
            del extra
            kept.append(kv)
        return torch.cat([x, mod], dim=1, out=out), kept

    @staticmethod
    def _rows_one_by_one(layer, blk, x, cross_kv, tproj, rope_q, rope_k, extra, keep):
        # CFG rows through the layer one at a time: the layer's transients are for one row.
        out = torch.empty_like(x)
        kvs = []
        for r in range(x.shape[0]):
            row = slice(r, r + 1)
            ex = (extra[0][row], extra[1][row]) if extra is not None else None
            y, kv = layer(blk, x[row], (cross_kv[0][row], cross_kv[1][row]), tproj[row], rope_q, rope_k, ex, keep)
            out[row] = y
            del y
            kvs.append(kv)
        kv = (torch.cat([a for a, _ in kvs]), torch.cat([b for _, b in kvs])) if keep is not None else None
        return out, kv

    def compile_layers(self, mode: str) -> None:
        """``torch.compile`` the per-layer forward (``inductor`` or ``aot_eager``); shapes are static."""
        import torch._dynamo

        # one graph per block shape of the run (a handful): do not fall back to eager after 8
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self._compiled_layer = torch.compile(self._layer, backend=mode, dynamic=False)

    def _layer(self, blk, x, cross_kv, tproj, rope_q, rope_k, extra, keep):
        # One modulation run: every token of the block shares the block's timestep.
        step = partial(self._self_attention, rope_q=rope_q, rope_k=rope_k, extra=extra, keep=keep)
        return block_forward(blk, x, tproj[:, None], cross_kv, step, self.attention)

    def _self_attention(self, a, h, rope_q, rope_k, extra, keep):
        """Self-attention over the block's own K/V plus the ``extra`` neighbour K/V (the bidirectional
        step of :func:`block_forward`); returns ``(out, kept)``: ``kept`` the K/V of the ``keep`` tokens."""
        q = a.norm_q(a.to_q(h))
        k = a.norm_k(a.to_k(h))
        k_keep = k[:, keep].clone() if keep is not None else None
        q = apply_rope(q.unflatten(2, (a.heads, -1)), *rope_q)
        if extra is None:
            k = apply_rope(k.unflatten(2, (a.heads, -1)), *rope_k)
            v = a.to_v(h)
            kv = (k_keep, v[:, keep].clone()) if keep is not None else None
            v = v.unflatten(2, (a.heads, -1))
        else:
            # Own and neighbour K/V are written straight into one buffer each (rotated keys,
            # projected values): no concatenated copy of the whole K or V.
            n, e = k.shape[1], extra[0].shape[1]
            cos, sin = rope_k
            kk = torch.empty(k.shape[0], n + e, a.heads, k.shape[2] // a.heads, dtype=k.dtype, device=k.device)
            apply_rope(k.unflatten(2, (a.heads, -1)), cos[:, :n], sin[:, :n], out=kk[:, :n])
            del k
            apply_rope(extra[0].unflatten(2, (a.heads, -1)), cos[:, n:], sin[:, n:], out=kk[:, n:])
            k = kk
            v = torch.empty(h.shape[0], n + e, extra[1].shape[2], dtype=extra[1].dtype, device=h.device)
            for r in range(h.shape[0]):  # one GEMM per row lands in a contiguous slice of the buffer
                if a.to_v.bias is None:
                    torch.mm(h[r], a.to_v.weight.t(), out=v[r, :n])
                else:
                    torch.addmm(a.to_v.bias, h[r], a.to_v.weight.t(), out=v[r, :n])
            v[:, n:] = extra[1]
            kv = (k_keep, v[:, keep].clone()) if keep is not None else None
            v = v.unflatten(2, (a.heads, -1))
        out = dispatch_attention_fn(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, backend=self.attention)
        out = out.flatten(2, 3).type_as(q)
        return a.to_out[1](a.to_out[0](out)), kv

    # -- last rank: head ---------------------------------------------------

    def head(self, packet: torch.Tensor, shape: BlockShape, guidance: float, out=None) -> torch.Tensor:
        """Output norm, projection, unpatchify and CFG; returns the noise prediction of
        the block's own frames [1, C, own, H, W] in float32 (written into ``out`` when given)."""
        tpf = self.tokens_per_frame(shape.height, shape.width)
        n_tok = shape.frames * tpf
        x, temb = packet[:, :n_tok], packet[:, n_tok]
        x = x[:, shape.context * tpf :]  # drop the leading context frames
        shift, scale = (self.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        x = (self.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = self.proj_out(x)
        pt, ph, pw = self.patch_size
        b = x.shape[0]
        x = x.reshape(b, shape.own // pt, shape.height // ph, shape.width // pw, pt, ph, pw, -1)
        x = x.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return guided(x.float(), guidance, out)


def block_forward(blk, x: torch.Tensor, tproj: torch.Tensor, cross_kv, self_attention: Callable, backend=None):
    """One Wan transformer block ``blk`` on ``x`` [B, L, dim]; returns ``(x, aux)``.

    Mirrors diffusers' ``WanTransformerBlock.forward`` (wan2.1 path: fp32 norms
    and modulation) except for self-attention, which is the caller's
    ``self_attention(blk.attn1, h) -> (out [B, L, dim], aux)``: how its keys and
    values are formed and attended is all that differs between the modes.
    ``tproj`` [B, R, 6, dim] holds the six modulation rows of ``R`` equal runs
    of tokens (one run: one timestep for the block; one run per frame: per-frame
    timesteps). ``cross_kv`` is the layer's text K/V, ``backend`` the
    cross-attention kernel (None: torch SDPA).
    """
    b, runs = x.shape[0], tproj.shape[1]
    shift, scale, gate, c_shift, c_scale, c_gate = (blk.scale_shift_table[:, None] + tproj.float()).chunk(6, dim=2)

    def per_run(h):  # token rows grouped by run, so each run's [B, R, 1, dim] rows broadcast over its tokens
        return h.view(b, runs, -1, h.shape[-1])

    def modulate(h, sc, sh):
        return (per_run(h) * (1 + sc) + sh).view(h.shape)

    def gated(h, g):
        return (per_run(h) * g).view(h.shape)

    h = modulate(blk.norm1(x.float()), scale, shift).type_as(x)
    attn, aux = self_attention(blk.attn1, h)
    x = (x.float() + gated(attn, gate)).type_as(x)
    h = blk.norm2(x.float()).type_as(x)
    x = x + cross_attention(blk.attn2, h, cross_kv, backend)
    h = modulate(blk.norm3(x.float()), c_scale, c_shift).type_as(x)
    x = (x.float() + gated(blk.ffn(h).float(), c_gate)).type_as(x)
    return x, aux


def cross_attention(a, h: torch.Tensor, cross_kv, backend=None) -> torch.Tensor:
    """Attention of ``h`` [B, L, dim] to the prompt's cached K/V (see :meth:`WanSlice.cross_kv`)."""
    q = a.norm_q(a.to_q(h)).unflatten(2, (a.heads, -1))
    out = dispatch_attention_fn(q, cross_kv[0], cross_kv[1], attn_mask=None, dropout_p=0.0, is_causal=False,
                                backend=backend)
    out = out.flatten(2, 3).type_as(q)
    return a.to_out[1](a.to_out[0](out))


def guided(x: torch.Tensor, guidance: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """CFG over rows [cond, uncond] (one row: as is), into ``out`` when given."""
    pred = x[1:] + guidance * (x[:1] - x[1:]) if x.shape[0] == 2 else x
    if out is None:
        return pred
    return out.copy_(pred)
