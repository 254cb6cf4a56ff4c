"""Causal (autoregressive) generation: chunks of latent frames over the ring, with KV caches.

Each chunk is denoised in a few steps (e.g. Self-Forcing's [1000, 750, 500,
250] warped with shift 5) and then run once more on its clean latents at
t = 0, the *commit* pass, which writes its K/V into every layer's
:class:`kv_cache.KVStore`. Layers are split over ranks as in the
bidirectional mode; each rank keeps the caches of its own layers only. The
staggered schedule keeps up to ``steps + 1`` chunks in flight so the ring
stays busy; the sequential one runs one chunk at a time (see
:func:`schedule.make_causal_tasks`). Every pass, commits included, comes back
to rank 0 as a prediction (a commit's is dropped), so flow control is the same
as in :mod:`engine`.
"""

from __future__ import annotations

import torch

from kv_cache import make_policy
from . import schedule as sch
from .comm import Comm
from .config import Config, prompt_schedule
from .models import loader
from .models.causal_wan import CausalWan, ChunkShape, LayerCache
from .models.wan import MOD_ROWS
from .ring import Geometry, RunStats, relay, run_first
from .trace import Trace


def sigmas(cfg: Config) -> list[float]:
    """The run's noise levels: ``timesteps / 1000`` warped by the shift (descending)."""
    c = cfg.causal
    out = []
    for t in c.timestep_list():
        s = t / 1000.0
        out.append(c.shift * s / (1 + (c.shift - 1) * s))
    return out


def chunk_noise(seed: int, chunk: int, step: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Gaussian noise for ``chunk`` at ``step`` (step 0: its initial noise), from a CPU generator."""
    mixed = (seed * 6364136223846793005 + chunk * 1442695040888963407 + step * 2862933555777941757 + 1) % 2**63
    g = torch.Generator().manual_seed(mixed)
    return torch.randn(shape, generator=g, dtype=torch.float32)


class CausalPlan(Geometry):
    """The causal run's geometry and task list (its blocks are the chunks)."""

    def __init__(self, cfg: Config, world: int, num_layers: int, counts: list[int] | None = None):
        c = cfg.causal
        super().__init__(cfg, world, num_layers, c.chunk, counts)
        self.steps = len(c.timestep_list())
        self.tasks = sch.make_causal_tasks(len(self.blocks), self.steps, staggered=c.schedule == "staggered")
        self.num_iterations = self.tasks[-1].iteration + 1
        self.prompts = prompt_schedule(cfg.sampling.prompt, cfg.video.frames)
        # A chunk uses the last prompt that starts at or before its first output frame.
        self.prompt_of = []
        for blk in self.blocks:
            first_frame = sch.pixel_frames(0, blk.start)
            self.prompt_of.append(max(i for i, (start, _) in enumerate(self.prompts) if start <= first_frame))

    def shape(self, task: sch.CausalTask) -> ChunkShape:
        blk = self.blocks[task.chunk]
        return ChunkShape(start=blk.start, frames=blk.frames, height=self.lat_h, width=self.lat_w,
                          commit=task.commit, prompt=self.prompt_of[task.chunk], pending=task.pending)

    def oldest_prompt(self, task: sch.CausalTask) -> int:
        """The earliest prompt any chunk in flight at ``task`` still uses."""
        oldest = task.chunk if self.cfg.causal.schedule == "sequential" else max(0, task.iteration - self.steps)
        return self.prompt_of[oldest]

    def packet_shape(self, task: sch.CausalTask, dim: int, tokens_per_frame: int) -> tuple[int, ...]:
        f = self.blocks[task.chunk].frames
        return (self.batch, f * tokens_per_frame + MOD_ROWS * f, dim)

    def finished_by(self, task: sch.CausalTask) -> int | None:
        return task.chunk if not task.commit and task.step == self.steps - 1 else None

    def block_of(self, task: sch.CausalTask) -> int:
        return task.chunk


class CausalStage:
    """A rank's causal layers and the KV caches of those layers (one store per owned layer)."""

    def __init__(self, model: CausalWan):
        self.model = model
        self.caches: list[LayerCache] = []
        self._iteration = None
        self._heads: tuple[tuple, list | None] | None = None  # (model folder, budget source) -> the table read

    def reset(self, cfg: Config, batch: int, height: int, width: int) -> None:
        """Fresh, empty caches for a new video (memory is allocated here, once)."""
        m, c = self.model.m, cfg.causal
        total = cfg.video.latent_frames
        key = (cfg.model.folder, c.head_budget)
        if self._heads is None or self._heads[0] != key:  # read (and checked) once, not at every video
            self._heads = (key, loader.head_importance(cfg))
        table = self._heads[1]  # [layer][head] of the whole model, or None

        def policy(layer: int):
            weights = None if table is None else torch.tensor(table[layer])
            return make_policy(c.policy, budget=c.budget, total_frames=total, sink=c.sink, pool=c.pool,
                               sample=c.sample, diversity=c.diversity, head_weights=weights)

        shape = dict(batch=batch, tokens=m.tokens_per_frame(height, width), heads=m.heads, head_dim=m.dim // m.heads,
                     dtype=m.dtype, device=m.device)
        shared = policy(0) if table is None else None  # policies keep no per-layer state: one serves all
        self.caches = []
        for i in range(len(m.layers)):
            p = shared or policy(m.first + i)
            self.caches.append(LayerCache(p.new_store(total, **shape), p))
        self._iteration = None

    def cache_bytes(self) -> int:
        return sum(c.nbytes() for c in self.caches)

    def run(self, packet: torch.Tensor, task: sch.CausalTask, shape: ChunkShape, out=None) -> torch.Tensor:
        if task.iteration != self._iteration:  # in-flight K/V live for one iteration
            for c in self.caches:
                c.pending.clear()
            self._iteration = task.iteration
        return self.model.forward_layers(packet, shape, self.caches, out=out)


class CausalState:
    """Rank 0's latents between passes and the sampler."""

    def __init__(self, cfg: Config, plan: CausalPlan, channels: int, device: torch.device):
        self.cfg, self.plan, self.device = cfg, plan, device
        self.sigmas = sigmas(cfg)
        self.channels = channels
        self.noisy: dict[int, torch.Tensor] = {}
        self.clean: dict[int, torch.Tensor] = {}
        self.blocks_done = 0
        self.iteration = 0
        """The next iteration to run (causal runs take no checkpoints; kept for the ring's loop)."""

    def live_blocks(self) -> int:
        return len(self.noisy) + len(self.clean)

    def _noise(self, chunk: int, step: int) -> torch.Tensor:
        f = self.plan.blocks[chunk].frames
        shape = (1, self.channels, f, self.plan.lat_h, self.plan.lat_w)
        return chunk_noise(self.cfg.sampling.seed, chunk, step, shape).to(self.device)

    def input(self, task: sch.CausalTask) -> tuple[torch.Tensor, torch.Tensor]:
        """The pass's latents and per-frame timesteps."""
        f = self.plan.blocks[task.chunk].frames
        if task.commit:
            return self.clean.pop(task.chunk), torch.zeros(f, device=self.device)
        if task.step == 0:
            self.noisy[task.chunk] = self._noise(task.chunk, 0)
        t = torch.full((f,), self.sigmas[task.step] * 1000.0, device=self.device)
        return self.noisy[task.chunk], t

    def apply(self, task: sch.CausalTask, pred: torch.Tensor) -> torch.Tensor | None:
        """Sampler step for a denoising pass; returns the chunk's clean latents after its last step."""
        if task.commit:
            return None
        c, s = task.chunk, task.step
        x = self.noisy[c]
        sigma = self.sigmas[s]
        x0 = x - sigma * pred  # flow prediction: v = noise - x0
        if s + 1 < len(self.sigmas):
            nxt = self.sigmas[s + 1]
            if self.cfg.causal.sampler == "euler":
                self.noisy[c] = x + (nxt - sigma) * pred
            else:
                self.noisy[c] = (1 - nxt) * x0 + nxt * self._noise(c, s + 1)
            return None
        del self.noisy[c]
        self.clean[c] = x0
        self.blocks_done += 1
        return x0


class CausalEngine:
    """One rank of a causal run. Build once (weights stay loaded), then :meth:`generate`."""

    def __init__(self, cfg: Config, comm: Comm, trace: Trace | None = None, counts: list[int] | None = None):
        self.cfg, self.comm = cfg, comm
        self.trace = trace or Trace(comm.rank, enabled=False)
        self.plan = CausalPlan(cfg, comm.ring, loader.num_layers(cfg), counts)
        self.stage = self._load_stage()
        self.prompts = loader.PromptCache(cfg, comm.device) if comm.is_first else None
        self.in_flight = 2 * comm.ring

    def _load_stage(self) -> "CausalStage":
        first, last = self.plan.layers[self.comm.rank]
        return CausalStage(CausalWan(loader.load_slice(self.cfg, first, last, self.comm.device), rope=self.cfg.causal.rope))

    def resplit(self, counts: list[int]) -> None:
        """Take another layer split (every rank, between videos): reload this rank's slice if it changed."""
        old = self.plan.layers[self.comm.rank]
        self.plan.set_split(counts)
        if self.plan.layers[self.comm.rank] != old:
            self.stage = None
            self.stage = self._load_stage()

    @property
    def model(self):
        return self.stage.model.m

    @torch.no_grad()
    def set_prompt(self, prompt: str, negative: str) -> None:
        """Encode every prompt of the schedule on rank 0 (once per text); every rank gets their projected text."""
        plan, comm = self.plan, self.comm
        texts = None
        if comm.is_first:
            prompts = [text for _, text in prompt_schedule(prompt, self.cfg.video.frames)]
            states = self.prompts.states(prompts + [negative])
            ctx = self.model.text_context(states)  # [P + 1, S, dim]
            rows = [torch.stack([ctx[i], ctx[-1]]) if plan.batch == 2 else ctx[i : i + 1] for i in range(len(prompts))]
            texts = torch.stack(rows)
        texts = comm.broadcast(texts, src=0)
        self.stage.model.set_texts([t.to(self.model.device) for t in texts])

    def new_state(self, cfg: Config) -> "CausalState":
        """Rank 0's state at the start of a video of ``cfg`` (its seed; the job's geometry)."""
        return CausalState(cfg, self.plan, self.model.out_channels, self.comm.device)

    @torch.no_grad()
    def generate(self, writer=None, progress=None, keep_latents: bool = False, *, state=None, checkpoint=None,
                 checkpoint_every: int = 0, should_stop=None, between=None) -> RunStats:
        """Run every pass; rank 0 hands each chunk to ``writer`` once clean.

        ``should_stop()`` turning true stops the run at the next iteration
        boundary (causal runs take no checkpoints: ``checkpoint`` is unused; ``state``: rank 0's, fresh).
        """
        self.stage.reset(self.cfg, self.plan.batch, self.plan.lat_h, self.plan.lat_w)
        if self.comm.is_first:
            return self._run_first(state or self.new_state(self.cfg), writer, progress, keep_latents, should_stop)
        return self._run_other(between)

    def _run_other(self, between=None) -> RunStats:
        plan, cw = self.plan, self.stage.model

        def compute(task, packet, out, watch):
            shape = plan.shape(task)
            cw.release_prompts_before(plan.oldest_prompt(task))
            if self.comm.is_last:
                with watch.measure("layers"):
                    h = self.stage.run(packet, task, shape)
                return cw.head(h, shape, self.cfg.sampling.guidance, out=out)
            with watch.measure("layers"):
                return self.stage.run(packet, task, shape, out=out)

        st = relay(self.comm, self.trace, plan.tasks, self.packet_shape, self.packet_dtype(), compute, self.name,
                   self.pred_shape, between=between)
        st.cache_bytes = self.stage.cache_bytes()
        return st

    # -- the mode, as ring.run_first sees it -----------------------------------------

    def packet_shape(self, task) -> tuple[int, ...]:
        m = self.model
        return self.plan.packet_shape(task, m.dim, m.tokens_per_frame(self.plan.lat_h, self.plan.lat_w))

    def pred_shape(self, task) -> tuple[int, ...]:
        return self.plan.pred_shape(task, self.model.out_channels)

    def packet_dtype(self) -> torch.dtype:
        return self.model.dtype

    @staticmethod
    def name(task) -> str:
        return f"c{task.chunk} commit" if task.commit else f"c{task.chunk} s{task.step}"

    @staticmethod
    def on_ring(task) -> bool:
        return True  # causal mode forecasts nothing (cache.policy is refused there)

    def forecast(self, state, task) -> torch.Tensor:
        raise RuntimeError("causal mode has no forecast tasks")

    def before_task(self, task) -> None:
        self.stage.model.release_prompts_before(self.plan.oldest_prompt(task))

    def embed(self, state: "CausalState", task) -> torch.Tensor:
        x, t = state.input(task)
        return self.stage.model.embed(x, t, self.plan.batch)

    def head(self, packet: torch.Tensor, task) -> torch.Tensor:
        return self.stage.model.head(packet, self.plan.shape(task), self.cfg.sampling.guidance)

    def _run_first(self, state: "CausalState", writer, progress, keep_latents, should_stop) -> RunStats:
        st = run_first(self, self.comm, state, self.plan.tasks, 0, writer, progress, keep_latents,
                       should_stop=should_stop)
        st.cache_bytes = self.stage.cache_bytes()
        return st
