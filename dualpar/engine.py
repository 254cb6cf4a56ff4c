"""The per-rank loop: the schedule's tasks, through this rank's stage, over the ring.

Every rank walks the same task list (:func:`schedule.make_tasks`) in the same
order. Rank 0 builds each block's input, embeds it and runs its layers; each
following rank receives the packet, runs its layers and passes it on; the
last rank applies the head and CFG and sends the noise prediction back to
rank 0, which applies that block's scheduler step. Rank 0 only waits for a
prediction when the next input depends on it (``Task.needs``), so up to a
queue's worth of blocks is in flight around the ring. Finished blocks go to
the output writer on rank 0 as soon as they are clean.
"""

from __future__ import annotations

import copy
import gc
import sys
import time
from dataclasses import dataclass, field

import torch

from . import schedule as sch
from .comm import KIND_PACKET, KIND_PRED, Comm
from .config import Config
from .models import loader
from .models.wan import MOD_ROWS, BlockShape
from .noise import NoisePool
from .stage import Stage


def log(rank: int, msg: str) -> None:
    print(f"[rank {rank}] {msg}", file=sys.stderr, flush=True)


@dataclass
class RunStats:
    wall_s: float = 0.0
    """Wall time of the denoising loop on this rank."""
    compute_s: float = 0.0
    """Time spent in this rank's forward passes (and scheduler steps on rank 0)."""
    wait_s: float = 0.0
    """Time spent blocked on receives."""
    tasks: int = 0
    bytes_sent: int = 0
    peak_live_blocks: int = 0
    """Most block latents rank 0 held at once (queued blocks + context tail): bounded by ``steps + 1``."""
    blocks: list[torch.Tensor] = field(default_factory=list)
    """Finished block latents (rank 0, only when ``keep_latents``)."""


class Plan:
    """Everything about the run's geometry that every rank derives identically."""

    def __init__(self, cfg: Config, world: int, num_layers: int):
        self.cfg = cfg
        self.blocks = sch.split_blocks(cfg.video.latent_frames, cfg.parallel.block)
        self.tasks = sch.make_tasks(len(self.blocks), cfg.sampling.steps)
        self.layers = sch.split_layers(num_layers, world)
        self.lat_h = cfg.video.height // loader.VAE_SPATIAL
        self.lat_w = cfg.video.width // loader.VAE_SPATIAL
        self.batch = 2 if cfg.sampling.guidance > 1.0 else 1

    def shape(self, task: sch.Task) -> BlockShape:
        lay = sch.layout(task, self.blocks, self.cfg.parallel.num_cat, self.cfg.sampling.steps)
        return BlockShape(
            context=lay.context, own=lay.own, extra=lay.extra, keep=lay.keep, height=self.lat_h, width=self.lat_w
        )

    def packet_shape(self, task: sch.Task, dim: int) -> tuple[int, ...]:
        s = self.shape(task)
        tpf = (self.lat_h // 2) * (self.lat_w // 2)
        return (self.batch, s.frames * tpf + MOD_ROWS, dim)

    def pred_shape(self, task: sch.Task, channels: int) -> tuple[int, ...]:
        return (1, channels, self.blocks[task.block].frames, self.lat_h, self.lat_w)

    def frames_of_block(self, b: int) -> int:
        blk = self.blocks[b]
        return blk.frames * 4 - 3 if blk.start == 0 else blk.frames * 4


class Engine:
    """One rank of a run. Build once (weights stay loaded), then :meth:`generate`."""

    def __init__(self, cfg: Config, comm: Comm):
        self.cfg, self.comm = cfg, comm
        self.plan = Plan(cfg, comm.world, loader.num_layers(cfg))
        first, last = self.plan.layers[comm.rank]
        self.stage = Stage(loader.load_slice(cfg, first, last, comm.device))
        # Tasks rank 0 may have in flight around the ring: enough to keep every
        # stage busy, few enough that no link ever buffers more than the send window.
        self.in_flight = 2 * comm.world
        comm.send_window = self.in_flight + 1

    # -- prompt --------------------------------------------------------------

    @torch.no_grad()
    def set_prompt(self, prompt: str, negative: str) -> None:
        """Encode on rank 0 and give every rank the projected text context.

        The text encoder (UMT5-XXL is about 11 GB) is loaded on rank 0 only, for
        this prompt, and freed before denoising starts.
        """
        text = None
        if self.comm.is_first:
            prompts = [prompt, negative] if self.plan.batch == 2 else [prompt]
            tokenizer, encoder = loader.load_text_encoder(self.cfg, self.comm.device)
            states = loader.encode_prompts(tokenizer, encoder, prompts, self.cfg.model.text_len)
            del tokenizer, encoder
            gc.collect()
            if self.comm.device.type == "cuda":
                torch.cuda.empty_cache()
            text = self.stage.model.text_context(states)
        text = self.comm.broadcast(text, src=0)
        self.stage.model.set_text(text.to(self.stage.model.device))

    # -- the loop --------------------------------------------------------------

    @torch.no_grad()
    def generate(self, writer=None, progress=None, keep_latents: bool = False) -> RunStats:
        """Run every task of the plan; rank 0 hands finished blocks to ``writer``."""
        if self.comm.is_first:
            return self._run_first(writer, progress, keep_latents)
        return self._run_other()

    def _run_other(self) -> RunStats:
        comm, plan, st = self.comm, self.plan, RunStats()
        self.stage.cache.clear()
        model = self.stage.model
        inbox = comm.inbox(
            comm.prev,
            ((KIND_PACKET, t.index, plan.packet_shape(t, model.dim), model.dtype) for t in plan.tasks),
        )
        t0 = time.perf_counter()
        for task in plan.tasks:
            shape = plan.shape(task)
            tw = time.perf_counter()
            packet = inbox.next()
            tc = time.perf_counter()
            st.wait_s += tc - tw
            packet = self.stage.run(packet, task, shape)
            if comm.is_last:
                out = self.stage.model.head(packet, shape, self.cfg.sampling.guidance)
                st.compute_s += time.perf_counter() - tc
                comm.send(out, 0, KIND_PRED, task.index)
            else:
                st.compute_s += time.perf_counter() - tc
                comm.send(packet, comm.next, KIND_PACKET, task.index)
            st.tasks += 1
        comm.flush()
        st.wall_s = time.perf_counter() - t0
        st.bytes_sent = comm.bytes_sent
        return st

    def _run_first(self, writer, progress, keep_latents) -> RunStats:
        cfg, comm, plan, st = self.cfg, self.comm, self.plan, RunStats()
        model = self.stage.model
        num_cat = cfg.parallel.num_cat
        template = loader.make_scheduler(cfg)
        timesteps = template.timesteps
        noise = NoisePool(
            block=cfg.parallel.block,
            num_cat=num_cat,
            channels=model.out_channels,
            height=plan.lat_h,
            width=plan.lat_w,
            seed=cfg.sampling.seed,
        )
        latents: dict[int, torch.Tensor] = {}
        scheds: dict[int, object] = {}
        tails: dict[int, torch.Tensor] = {}  # last num_cat frames of finished blocks
        applied = -1
        self.stage.cache.clear()
        inbox = None
        if comm.world > 1:
            inbox = comm.inbox(
                comm.world - 1,
                ((KIND_PRED, t.index, plan.pred_shape(t, model.out_channels), torch.float32) for t in plan.tasks),
            )

        def apply(task: sch.Task, pred: torch.Tensor) -> None:
            b = task.block
            latents[b] = scheds[b].step(pred, timesteps[task.step], latents[b], return_dict=False)[0]
            if task.last_step:
                done = latents.pop(b)
                del scheds[b]
                tails[b] = done[:, :, done.shape[2] - num_cat :]
                tails.pop(b - 1, None)  # no block needs it any more
                if writer is not None:
                    writer.add_block(b, done)
                if keep_latents:
                    st.blocks.append(done)
                if progress is not None:
                    progress.block_done(b, plan.frames_of_block(b))

        t0 = time.perf_counter()
        for task in plan.tasks:
            shape = plan.shape(task)
            # Wait for the results this input depends on, and keep the ring's load bounded.
            while applied < max(task.needs, task.index - self.in_flight):
                nxt = plan.tasks[applied + 1]
                tw = time.perf_counter()
                pred = inbox.next()
                tc = time.perf_counter()
                st.wait_s += tc - tw
                apply(nxt, pred)
                st.compute_s += time.perf_counter() - tc
                applied += 1
            tc = time.perf_counter()
            b = task.block
            if task.step == 0:
                latents[b] = noise.next_block(plan.blocks[b].frames)
                scheds[b] = copy.deepcopy(template)
            x = latents[b]
            if shape.context:
                older = latents.get(task.older)
                older = older if older is not None else tails[task.older]
                x = torch.cat([older[:, :, older.shape[2] - shape.context :], x], dim=2)
            st.peak_live_blocks = max(st.peak_live_blocks, len(latents) + len(tails))
            packet = model.embed(x, timesteps[task.step], plan.batch)
            packet = self.stage.run(packet, task, shape)
            if comm.world == 1:
                pred = model.head(packet, shape, cfg.sampling.guidance)
                apply(task, pred)
                applied = task.index
            else:
                comm.send(packet, comm.next, KIND_PACKET, task.index)
            st.compute_s += time.perf_counter() - tc
            st.tasks += 1
            if progress is not None:
                progress.task_done(task)
        while applied < len(plan.tasks) - 1:
            nxt = plan.tasks[applied + 1]
            tw = time.perf_counter()
            pred = inbox.next()
            tc = time.perf_counter()
            st.wait_s += tc - tw
            apply(nxt, pred)
            st.compute_s += time.perf_counter() - tc
            applied += 1
        comm.flush()
        st.wall_s = time.perf_counter() - t0
        st.bytes_sent = comm.bytes_sent
        return st
