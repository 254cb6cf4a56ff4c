"""Which committed frames each query frame attends to, per head, and which frame a full store drops.

A policy fixes the store's capacity (memory is bounded by it, not by video
length), chooses per (query frame, head) a subset of the stored frames at every
forward pass (:meth:`Policy.select`), and names the victim when a commit finds
the store full (:meth:`Policy.victim`). ``select`` returning ``None`` means
"every stored frame": that path is the plain attention of the full cache, so a
policy whose budget covers everything computes exactly what the full policy does.

Budgets count latent frames attended per query frame, committed history only
(the current chunk is always attended).
"""

from __future__ import annotations

import math
from typing import get_args

import torch

from dualpar.config import PolicyName, resolve_budget  # declared there: validated before torch is imported
from .attention import Selection, history_mass, sample_queries
from .store import KVStore


class Policy:
    name = "base"
    sink = 0
    """Frames pinned in the store (the first ones committed)."""

    def capacity(self, total_frames: int) -> int:
        """Store slots for a video of ``total_frames`` latent frames."""
        raise NotImplementedError

    def select(self, store: KVStore, q: torch.Tensor, frames: int, k_hist: torch.Tensor, v_hist: torch.Tensor,
               k_now: torch.Tensor) -> Selection | None:
        """The frames each query frame and head attends to; ``q`` is ``[B, frames * T, H, D]``."""
        return None

    def victim(self, store: KVStore) -> int:
        """The logical frame to evict from a full store (never a sink)."""
        return store.oldest_evictable()

    def queries_per_frame(self, tokens_per_frame: int) -> int:
        """Queries per frame sampled to score history (0: the policy does not score)."""
        return 0

    def new_store(self, total_frames: int, **shape) -> KVStore:
        """An empty store sized for this policy (``shape``: batch, tokens, heads, head_dim, dtype, device)."""
        cap = self.capacity(total_frames)
        return KVStore(cap, sink=min(self.sink, cap - 1), **shape)


class Full(Policy):
    """Every committed frame, for every query frame and head: exact block-causal attention."""

    name = "full"

    def capacity(self, total_frames: int) -> int:
        return max(total_frames, 1)

    def victim(self, store: KVStore) -> int:
        raise RuntimeError("the full policy's store holds the whole video and never evicts")


class WindowSink(Policy):
    """The ``sink`` first frames plus the most recent ``window`` frames (LongLive, StreamDiffusionV2).

    The store holds exactly these frames, so selection is "all" and eviction
    drops the oldest non-sink frame: a ring buffer.
    """

    name = "window"

    def __init__(self, window: int, sink: int = 0):
        if window < 1 or sink < 0:
            raise ValueError(f"window must be >= 1 and sink >= 0, got {window}, {sink}")
        self.window, self.sink = window, sink

    def capacity(self, total_frames: int) -> int:
        return min(self.window + self.sink, max(total_frames, 1))


class _Scored(Policy):
    """Shared by the content-aware policies: a pool of ``pool`` frames, scored by attention mass.

    Every selection writes each stored frame's mean attention mass (over query
    frames and heads) into ``store.score``; a full pool evicts the lowest-scored
    non-sink frame. Frames not yet scored are never evicted first.
    """

    def __init__(self, budget: int, pool: int | None = None, sink: int = 0, sample: int = 0):
        if budget < 1:
            raise ValueError(f"budget must be >= 1 frame, got {budget}")
        self.budget, self.sink, self.sample = budget, sink, sample
        self.pool = max(pool if pool is not None else math.ceil(1.5 * budget), budget + sink)

    def capacity(self, total_frames: int) -> int:
        return min(self.pool, max(total_frames, 1))

    def victim(self, store: KVStore) -> int:
        best, best_score = None, None
        for f in store.frames():
            if f in store.sinks:
                continue
            s = float(store.score[store.slot_of[f]])
            if best is None or s < best_score:
                best, best_score = f, s
        if best is None:
            raise ValueError("every stored frame is a sink")
        return best

    def queries_per_frame(self, tokens_per_frame: int) -> int:
        return self.sample or auto_sample(tokens_per_frame)

    def _mass(self, store, q, frames, k_hist, k_now) -> torch.Tensor:
        per_frame = self.queries_per_frame(q.shape[1] // frames)
        mass = history_mass(sample_queries(q, frames, per_frame), k_hist, k_now)  # [Fq, H, n]
        slots = torch.tensor(store.slots(), dtype=torch.long, device=store.score.device)
        store.score[slots] = mass.mean(dim=(0, 1)).to(store.score.device)
        return mass


class TopK(_Scored):
    """Per query frame and head, the ``budget`` committed frames with the most attention mass."""

    name = "topk"

    def select(self, store, q, frames, k_hist, v_hist, k_now):
        n = k_hist.shape[1]
        if n <= self.budget:
            return None
        mass = self._mass(store, q, frames, k_hist, k_now)
        idx = mass.topk(self.budget, dim=-1).indices.sort(dim=-1).values
        return Selection(idx)


class FocusedForcing(_Scored):
    """Content-aware per-frame selection (Focused Forcing, arXiv 2605.18346), as implemented here.

    For each generated (query) frame and head, frames are chosen greedily by
    ``(1 - diversity) * relevance - diversity * redundancy``:

    * relevance: the attention mass a frame receives from ``sample`` evenly
      strided queries of that query frame (0: :func:`auto_sample`) (softmax over all keys), scaled so the
      most attended frame scores 1. It is recomputed at every forward pass, so
      it follows the query frame's temporal distance and the denoising step.
    * redundancy: the largest cosine similarity between the frame's descriptor
      and those already chosen for this (query frame, head); a descriptor is the
      mean value vector of the frame's tokens for that head (values carry
      content without positional rotation).

    Head budgets: more frames to more important heads. ``head_weights`` (one
    per head of this layer) are the paper's way: an explicit importance
    estimate measured once per model (``scripts/calibrate_heads.py`` masks one
    head's history at a time and measures how far the output moves). Without
    them, a head's importance is the share of its sampled attention that goes
    to committed history at all -- a free by-product of the relevance pass,
    the attention-pattern proxy the paper argues against. Either way the total
    ``budget x heads`` is split in proportion, every head keeping at least
    ``ceil(budget / 4)``.

    Where the paper is silent we also chose: one selection per forward pass and
    layer (not cached across steps), sinks pinned in the pool but not forced
    into the selection, eviction by mean attention mass (as :class:`TopK`).
    """

    name = "focused"

    def __init__(self, budget: int, pool: int | None = None, sink: int = 0, sample: int = 0,
                 diversity: float = 0.3, head_weights: torch.Tensor | None = None):
        super().__init__(budget, pool, sink, sample)
        if not 0.0 <= diversity < 1.0:
            raise ValueError(f"diversity must be in [0, 1), got {diversity}")
        if head_weights is not None and (head_weights.ndim != 1 or not bool((head_weights >= 0).all())):
            raise ValueError("head_weights must be one non-negative weight per head")
        self.diversity = diversity
        self.head_weights = None if head_weights is None else head_weights.detach().double().cpu()

    def head_budgets(self, importance: torch.Tensor, n: int) -> torch.Tensor:
        """Split ``budget * heads`` frames over heads in proportion to ``importance`` [H]."""
        h = importance.shape[0]
        floor = min(n, math.ceil(self.budget / 4))
        total = min(self.budget, n) * h
        w = importance.double().clamp_min(0) + 1e-12
        budgets = torch.full((h,), floor, dtype=torch.long)
        left = total - floor * h
        while left > 0:  # proportional shares, largest remainders first, capped at n
            room = budgets < n
            if not room.any():
                break
            share = w * room / (w * room).sum() * left
            add = torch.minimum(share.floor().long(), n - budgets)
            frac = torch.where(budgets + add < n, share - share.floor(), torch.full_like(share, -1.0))
            for i in torch.argsort(frac, descending=True)[: left - int(add.sum())]:
                if frac[i] >= 0:
                    add[i] += 1
            budgets += add
            left -= int(add.sum())
        return budgets

    def select(self, store, q, frames, k_hist, v_hist, k_now):
        n = k_hist.shape[1]
        if n <= self.budget:
            return None
        mass = self._mass(store, q, frames, k_hist, k_now)  # [Fq, H, n]
        fq, h, _ = mass.shape
        if self.head_weights is not None and self.head_weights.shape[0] != h:
            raise ValueError(f"{self.head_weights.shape[0]} head weights for a layer of {h} heads")
        importance = self.head_weights if self.head_weights is not None else mass.sum(-1).mean(0).cpu()
        budgets = self.head_budgets(importance, n).to(mass.device)  # [H]
        relevance = mass / mass.amax(-1, keepdim=True).clamp_min(1e-12)
        desc = torch.nn.functional.normalize(v_hist.float().mean(dim=(0, 2)), dim=-1)  # [n, H, D]
        sim = torch.einsum("ahd,bhd->hab", desc, desc)  # [H, n, n]
        chosen = torch.zeros(fq, h, n, dtype=torch.bool, device=mass.device)
        redundancy = torch.zeros(fq, h, n, device=mass.device)
        hidx = torch.arange(h, device=mass.device)[None, :].expand(fq, h)
        for t in range(int(budgets.max())):
            score = (1 - self.diversity) * relevance - self.diversity * redundancy
            score = score.masked_fill(chosen, float("-inf"))
            pick = score.argmax(-1)  # [Fq, H]
            active = (budgets > t)[None, :].expand(fq, h)
            chosen[active.nonzero(as_tuple=True) + (pick[active],)] = True
            new = sim[hidx, pick]  # [Fq, H, n]
            redundancy = torch.where(active[..., None], torch.maximum(redundancy, new), redundancy)
        m = int(budgets.max())
        key = (~chosen).long() * n + torch.arange(n, device=mass.device)  # chosen first, ascending
        idx = key.argsort(-1)[..., :m]
        valid = chosen.gather(-1, idx)
        return Selection(idx, None if bool(valid.all()) else valid)


class HeadMask(Full):
    """The full cache with one head's history hidden (it attends to the current chunk only): the
    probe of the head-importance calibration, not a policy to generate with."""

    name = "head-mask"

    def __init__(self, head: int):
        self.head = head

    def select(self, store, q, frames, k_hist, v_hist, k_now):
        fq, h, n = frames, q.shape[2], k_hist.shape[1]
        idx = torch.arange(n, device=q.device).expand(fq, h, n)
        valid = torch.ones(fq, h, n, dtype=torch.bool, device=q.device)
        valid[:, self.head] = False
        return Selection(idx, valid)


def auto_sample(tokens_per_frame: int) -> int:
    """Queries per frame that score history by default: about 1.5% of a frame's tokens, at least 4
    (24 of Wan's 1560 tokens at 480p), so scoring stays a small fraction of the attention itself."""
    return max(4, tokens_per_frame // 64)


def make_policy(name: PolicyName, *, budget: float, total_frames: int, sink: int = 0, pool: int = 0,
                sample: int = 0, diversity: float = 0.3, head_weights: torch.Tensor | None = None) -> Policy:
    """A policy by name; ``budget`` in frames or as a fraction of ``total_frames`` (ignored by ``full``);
    ``head_weights``: calibrated head importances of the layer (``focused`` only)."""
    if name == "full":
        return Full()
    frames = resolve_budget(budget, total_frames)
    pool = pool or None
    if name == "window":
        if frames <= sink:
            raise ValueError(f"a window budget of {frames} frames leaves no room beside {sink} sink frames")
        return WindowSink(window=frames - sink, sink=sink)
    if name == "topk":
        return TopK(frames, pool, sink, sample)
    if name == "focused":
        return FocusedForcing(frames, pool, sink, sample, diversity, head_weights)
    raise ValueError(f"unknown policy '{name}' (known: {', '.join(get_args(PolicyName))})")
