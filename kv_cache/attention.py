"""Attention over [selected committed frames + the frames always attended], and the attention
statistics the selection policies score frames with.

Shapes (all keys already rotated with the positions the caller chose):

* ``q``       ``[B, Fq * T, H, D]``: the current chunk's queries, ``Fq`` frames of ``T`` tokens;
* ``k_now``   ``[B, L, H, D]``: keys every query attends to (the current chunk, and in a
  staggered schedule the in-flight predecessors' current keys);
* ``k_hist``  ``[B, n, T, H, D]``: the committed frames in logical order;
* a :class:`Selection` names, per query frame and head, which of the ``n`` committed
  frames are attended (``None``: all of them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True, slots=True)
class Selection:
    idx: torch.Tensor
    """``[Fq, H, m]`` indices into the committed frames (logical order), ascending per row."""
    valid: torch.Tensor | None = None
    """``[Fq, H, m]`` which entries are real (heads with budgets below ``m`` are padded); None: all."""

    @property
    def budget(self) -> int:
        return self.idx.shape[-1]


def attend(q: torch.Tensor, k_now: torch.Tensor, v_now: torch.Tensor, k_hist: torch.Tensor | None,
           v_hist: torch.Tensor | None, selection: Selection | None = None) -> torch.Tensor:
    """Softmax attention; returns ``[B, Fq * T, H, D]``.

    Without a selection every query attends to all committed frames and
    ``k_now`` in one call. With one, each (query frame, head) gathers its own
    ``m`` frames, so the cost follows the budget, not the store.
    """
    if k_hist is None or k_hist.shape[1] == 0:
        return _sdpa(q, k_now, v_now)
    if selection is None:
        return _sdpa(q, torch.cat([k_hist.flatten(1, 2), k_now], 1), torch.cat([v_hist.flatten(1, 2), v_now], 1))
    b, n, t, h, d = k_hist.shape
    fq, m = selection.idx.shape[0], selection.budget
    heads = torch.arange(h, device=k_hist.device)[None, :, None]

    def gather(hist: torch.Tensor, now: torch.Tensor) -> torch.Tensor:
        sel = hist.permute(0, 3, 1, 2, 4)[:, heads, selection.idx]  # [B, Fq, H, m, T, D]
        now = now.permute(0, 2, 1, 3)[:, None].expand(b, fq, h, now.shape[1], d)
        return torch.cat([sel.flatten(3, 4), now], 3)

    keys, values = gather(k_hist, k_now), gather(v_hist, v_now)
    queries = q.view(b, fq, t, h, d).permute(0, 1, 3, 2, 4)  # [B, Fq, H, T, D]
    mask = None
    if selection.valid is not None:
        tok = selection.valid[..., None].expand(fq, h, m, t).flatten(2)
        always = torch.ones(fq, h, k_now.shape[1], dtype=torch.bool, device=tok.device)
        mask = torch.cat([tok, always], 2)[:, :, None]  # [Fq, H, 1, keys]
    if mask is not None:
        mask = mask.expand(fq, h, 1, keys.shape[3]).unsqueeze(0).expand(b, -1, -1, -1, -1).flatten(0, 1)
    # 4-D inputs: SDPA's CPU kernels fall back to a much slower path on 5-D ones
    out = F.scaled_dot_product_attention(queries.flatten(0, 1), keys.flatten(0, 1), values.flatten(0, 1),
                                         attn_mask=mask)
    return out.view(b, fq, h, t, d).permute(0, 1, 3, 2, 4).reshape(b, fq * t, h, d)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def sample_queries(q: torch.Tensor, frames: int, per_frame: int) -> torch.Tensor:
    """``per_frame`` evenly strided queries of each frame: ``[B, Fq, s, H, D]``."""
    b, _, h, d = q.shape
    q = q.view(b, frames, -1, h, d)
    t = q.shape[2]
    if per_frame >= t:
        return q
    idx = torch.linspace(0, t - 1, per_frame, device=q.device).round().long()
    return q[:, :, idx]


def history_mass(q_sample: torch.Tensor, k_hist: torch.Tensor, k_now: torch.Tensor) -> torch.Tensor:
    """Attention mass each committed frame receives: ``[Fq, H, n]``.

    For the sampled queries, the softmax over *all* keys (committed and
    ``k_now``) is summed over each committed frame's tokens, then averaged over
    the sampled queries and the batch rows (the CFG rows share one store).
    """
    scale = q_sample.shape[-1] ** -0.5
    qs = q_sample.float()
    hist = torch.einsum("bfshd,bnthd->bfhsnt", qs, k_hist.float()) * scale
    now = torch.einsum("bfshd,blhd->bfhsl", qs, k_now.float()) * scale
    lse = torch.logsumexp(torch.cat([hist.flatten(4), now], -1), -1)  # [B, Fq, H, s]
    mass = torch.exp(hist - lse[..., None, None]).sum(-1)  # [B, Fq, H, s, n]
    return mass.mean(dim=(0, 3))
