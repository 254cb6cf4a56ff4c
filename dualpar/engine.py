"""The per-rank loop: the schedule's tasks, through this rank's stage, over the ring.

Every rank walks the same task list (:func:`schedule.make_tasks`) in the same
order. Rank 0 builds each block's input, embeds it and runs its layers; each
following rank receives the packet, runs its layers and passes it on; the
last rank applies the head and CFG and sends the noise prediction back to
rank 0, which applies that block's scheduler step. Rank 0 only waits for a
prediction when the next input depends on it (``Task.needs``) or when
``2 x world`` tasks are already in flight around the ring. Finished blocks go
to the output writer on rank 0 as soon as they are clean.
"""

from __future__ import annotations

import copy
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
from .trace import Clock, Stopwatch, Trace


def log(rank: int, msg: str) -> None:
    print(f"[rank {rank}] {msg}", file=sys.stderr, flush=True)


@dataclass
class RunStats:
    wall_s: float = 0.0
    """Wall time of the denoising loop on this rank."""
    compute_s: float = 0.0
    """Time this rank's device spent in forward passes (and scheduler steps on rank 0); CUDA events on GPUs."""
    wait_s: float = 0.0
    """Time spent waiting for receives (on GPUs: the stream stalled on them, by CUDA events)."""
    tasks: int = 0
    bytes_sent: int = 0
    messages_sent: int = 0
    """Point-to-point messages this rank sent (one per hop: payload and device-written tag)."""
    send_buffer_bytes: int = 0
    """Bytes of this rank's reused send buffers (bounded: ``comm.SEND_SLOTS`` per link)."""
    stopped: bool = False
    """The run stopped early at an iteration boundary (a checkpoint was taken)."""
    peak_live_blocks: int = 0
    """Most block latents rank 0 held at once (queued blocks + context tail): bounded by ``steps + 1``."""
    cache_bytes: int = 0
    """Bytes held by this rank's KV caches (causal mode)."""
    blocks: list[torch.Tensor] = field(default_factory=list)
    """Finished block latents (rank 0, only when ``keep_latents``)."""

    def finish(self, comm: Comm, watch: Stopwatch, t0: float) -> "RunStats":
        """Fill in the totals at the end of the loop (resolves CUDA events: one sync)."""
        self.wall_s = time.perf_counter() - t0
        self.compute_s, self.wait_s = watch.total("compute"), watch.total("wait")
        self.bytes_sent, self.messages_sent = comm.bytes_sent, comm.messages_sent
        self.send_buffer_bytes = comm.send_bytes_held
        return self


def first_of_iteration(tasks, i: int) -> bool:
    """Task ``i`` of ``tasks`` starts an iteration (not the first task): where rank 0 may stop the run."""
    return i > 0 and tasks[i].iteration != tasks[i - 1].iteration


def relay(comm: Comm, trace: Trace, tasks, packet_shape, dtype, compute, name, pred_shape, patient=None) -> RunStats:
    """The loop of every rank but the first: receive each task's packet from the previous rank,
    ``compute(task, packet, out)`` on it into a send buffer ``out``, and pass it on (the last
    rank sends its prediction back to rank 0). A stop message from rank 0 ends the loop; it is
    passed on."""
    st, watch = RunStats(), Stopwatch(Clock(comm.device))
    inbox = comm.inbox(comm.prev, ((KIND_PACKET, t.index, packet_shape(t), dtype) for t in tasks))
    if comm.is_last:
        dst, kind, out_shape, out_dtype = 0, KIND_PRED, pred_shape, torch.float32
    else:
        dst, kind, out_shape, out_dtype = comm.next, KIND_PACKET, packet_shape, dtype
    comm.reserve(dst, kind, [out_shape(t) for t in tasks], out_dtype)
    t0 = time.perf_counter()
    for i, task in enumerate(tasks):
        with trace.span("recv", "wait", task=task.index), watch.measure("wait"):
            packet = inbox.next(patient=bool(patient and patient(task)), stop_possible=first_of_iteration(tasks, i))
        if packet is None:  # rank 0 stopped the run at this iteration boundary
            if not comm.is_last:
                comm.send_stop(comm.next, task.index, packet_shape(task), dtype)
            st.stopped = True
            break
        out = comm.send_buffer(dst, kind, out_shape(task), out_dtype, task.index)
        with trace.span(name(task), "compute", task=task.index, iteration=task.iteration), watch.measure("compute"):
            out = compute(task, packet, out)
        with trace.span("send", "send", task=task.index):
            comm.send(out, dst, kind, task.index)
        st.tasks += 1
    comm.flush()
    comm.check()
    return st.finish(comm, watch, t0)


class Returns:
    """Rank 0's end of the ring: predictions come back in task order and are applied in that order."""

    def __init__(self, comm: Comm, trace: Trace, tasks, start: int, pred_shape, apply, name, stats: RunStats,
                 watch: Stopwatch):
        self.trace, self.tasks, self.apply, self.name, self.st, self.watch = trace, tasks, apply, name, stats, watch
        self.applied = start - 1
        """Index of the last task whose prediction has been applied (earlier ones: before ``start``)."""
        self.inbox = None
        if comm.world > 1:
            expected = ((KIND_PRED, t.index, pred_shape(t), torch.float32) for t in tasks[start:])
            self.inbox = comm.inbox(comm.world - 1, expected)

    def drain(self, upto: int) -> None:
        """Receive and apply every prediction up to task index ``upto``."""
        while self.applied < upto:
            nxt = self.tasks[self.applied + 1]
            with self.trace.span("recv", "wait", task=nxt.index), self.watch.measure("wait"):
                pred = self.inbox.next()
            with self.trace.span(f"step {self.name(nxt)}", "scheduler", task=nxt.index), self.watch.measure("compute"):
                self.apply(nxt, pred)
            self.applied += 1


class Geometry:
    """What every rank derives identically in either mode: the blocks (or chunks) of the
    video, the layer split, the latent size and the CFG batch."""

    def __init__(self, cfg: Config, world: int, num_layers: int, block: int):
        self.cfg = cfg
        self.blocks = sch.split_blocks(cfg.video.latent_frames, block)
        self.layers = sch.split_layers(num_layers, world)
        self.lat_h = cfg.video.height // loader.VAE_SPATIAL
        self.lat_w = cfg.video.width // loader.VAE_SPATIAL
        self.batch = 2 if cfg.sampling.guidance > 1.0 else 1

    def block_of(self, task) -> int:
        return task.block

    def pred_shape(self, task, channels: int) -> tuple[int, ...]:
        return (1, channels, self.blocks[self.block_of(task)].frames, self.lat_h, self.lat_w)

    def frames_of_block(self, b: int) -> int:
        blk = self.blocks[b]
        return sch.pixel_frames(blk.start, blk.frames)


class Plan(Geometry):
    """The block-wise run's geometry and task list."""

    def __init__(self, cfg: Config, world: int, num_layers: int):
        super().__init__(cfg, world, num_layers, cfg.parallel.block)
        self.tasks = sch.make_tasks(len(self.blocks), cfg.sampling.steps)
        self.num_iterations = sch.num_iterations(len(self.blocks), cfg.sampling.steps)

    def shape(self, task: sch.Task) -> BlockShape:
        lay = sch.layout(task, self.blocks, self.cfg.parallel.num_cat, self.cfg.sampling.steps)
        return BlockShape(
            context=lay.context, own=lay.own, extra=lay.extra, keep=lay.keep, height=self.lat_h, width=self.lat_w
        )

    def packet_shape(self, task: sch.Task, model) -> tuple[int, ...]:
        s = self.shape(task)
        return (self.batch, s.frames * model.tokens_per_frame(self.lat_h, self.lat_w) + MOD_ROWS, model.dim)


class Engine:
    """One rank of a run. Build once (weights stay loaded), then :meth:`generate`."""

    def __init__(self, cfg: Config, comm: Comm, trace: Trace | None = None):
        self.cfg, self.comm = cfg, comm
        self.trace = trace or Trace(comm.rank, enabled=False)
        self.plan = Plan(cfg, comm.world, loader.num_layers(cfg))
        first, last = self.plan.layers[comm.rank]
        self.stage = Stage(loader.load_slice(cfg, first, last, comm.device))
        self.prompts = loader.PromptCache(cfg, comm.device) if comm.is_first else None
        # Tasks rank 0 may have in flight around the ring: enough to keep every stage
        # busy (each link holds up to comm.SEND_SLOTS sends and two receives posted ahead).
        self.in_flight = 2 * comm.world
        if cfg.model.compile != "off":
            self.precompile(cfg.model.compile)

    @torch.no_grad()
    def precompile(self, mode: str) -> None:
        """Compile the layer forward for every block shape of the run, on zeros, before the ring
        starts (so no compilation happens while peers wait under the ring's timeout)."""
        model, plan = self.stage.model, self.plan
        model.compile_layers(mode)
        t0 = time.perf_counter()
        text = torch.zeros(plan.batch, self.cfg.model.text_len, model.dim, dtype=model.dtype, device=model.device)
        model.set_text(text)
        shapes = list(dict.fromkeys(plan.shape(t) for t in plan.tasks))
        tpf = model.tokens_per_frame(plan.lat_h, plan.lat_w)
        for shape in shapes:
            packet = torch.zeros((plan.batch, shape.frames * tpf + MOD_ROWS, model.dim), dtype=model.dtype,
                                 device=model.device)
            extra = None
            if shape.extra:
                def zeros():  # distinct tensors: compiled graphs guard on aliasing
                    return torch.zeros(plan.batch, shape.extra * tpf, model.dim, dtype=model.dtype,
                                       device=model.device)

                extra = [(zeros(), zeros()) for _ in model.layers]
            model.forward_layers(packet, shape, extra)
        model._cross_kv = None
        log(self.comm.rank, f"compiled the layers ({mode}) for {len(shapes)} block shapes in "
                            f"{time.perf_counter() - t0:.1f} s")

    # -- prompt --------------------------------------------------------------

    @torch.no_grad()
    def set_prompt(self, prompt: str, negative: str) -> None:
        """Encode on rank 0 (once per text: see :class:`loader.PromptCache`) and give every rank the
        projected text context."""
        text = None
        if self.comm.is_first:
            states = self.prompts.states([prompt, negative] if self.plan.batch == 2 else [prompt])
            text = self.stage.model.text_context(states)
        text = self.comm.broadcast(text, src=0)
        self.stage.model.set_text(text.to(self.stage.model.device))

    # -- the loop --------------------------------------------------------------

    @torch.no_grad()
    def generate(self, writer=None, progress=None, keep_latents: bool = False, *, state: "DenoiseState | None" = None,
                 checkpoint=None, checkpoint_every: int = 0, should_stop=None) -> RunStats:
        """Run the plan's tasks from ``state.iteration`` (rank 0 passes the state; 0 = fresh).

        Rank 0 hands finished blocks to ``writer``. Every ``checkpoint_every``
        iterations, and when ``should_stop()`` turns true, rank 0 lets the ring
        drain at the iteration boundary and calls ``checkpoint(state)``; on a stop
        it first tells the other ranks to stop at that boundary.
        """
        if self.comm.is_first:
            state = state or DenoiseState(self.cfg, self.plan, self.stage.model.out_channels, self.comm.device)
            self.comm.broadcast_int(state.iteration)
            return self._run_first(state, writer, progress, keep_latents, checkpoint, checkpoint_every, should_stop)
        return self._run_other(self.comm.broadcast_int(None), checkpoint_every)

    def _run_other(self, start_iteration: int, checkpoint_every: int = 0) -> RunStats:
        plan, model, cfg = self.plan, self.stage.model, self.cfg
        self.stage.cache.clear()

        def compute(task, packet, out):
            shape = plan.shape(task)
            if self.comm.is_last:
                return model.head(self.stage.run(packet, task, shape), shape, cfg.sampling.guidance, out=out)
            return self.stage.run(packet, task, shape, out=out)

        def patient(task):  # rank 0 may be taking a checkpoint before the first task of this iteration
            return checkpoint_every and task.iteration % checkpoint_every == 0 and task.newer is None

        return relay(self.comm, self.trace, [t for t in plan.tasks if t.iteration >= start_iteration],
                     lambda t: plan.packet_shape(t, model), model.dtype, compute, self._name,
                     lambda t: plan.pred_shape(t, model.out_channels), patient)

    @staticmethod
    def _name(task) -> str:
        return f"b{task.block} s{task.step}"

    def _run_first(self, state, writer, progress, keep_latents, checkpoint, checkpoint_every, should_stop) -> RunStats:
        cfg, comm, plan, st = self.cfg, self.comm, self.plan, RunStats()
        watch = Stopwatch(Clock(comm.device))
        model = self.stage.model
        tasks = [t for t in plan.tasks if t.iteration >= state.iteration]
        base = tasks[0].index if tasks else len(plan.tasks)
        self.stage.cache.clear()
        if progress is not None:
            progress.resume_from(base, state.blocks_done, sum(plan.frames_of_block(b) for b in range(state.blocks_done)))

        def apply(task: sch.Task, pred: torch.Tensor) -> None:
            done = state.apply(task, pred)
            if done is not None:
                comm.check()  # nothing derived from a mismatched message reaches the output
                if writer is not None:
                    writer.add_block(task.block, done)
                if keep_latents:
                    st.blocks.append(done)
                if progress is not None:
                    progress.block_done(task.block, plan.frames_of_block(task.block))

        returns = Returns(comm, self.trace, plan.tasks, base, lambda t: plan.pred_shape(t, model.out_channels), apply,
                          self._name, st, watch)
        drain = returns.drain
        if comm.world > 1:
            comm.reserve(comm.next, KIND_PACKET, [plan.packet_shape(t, model) for t in tasks], model.dtype)

        t0 = time.perf_counter()
        for task in tasks:
            boundary = task.index > base and task.iteration != plan.tasks[task.index - 1].iteration
            stop = boundary and should_stop is not None and should_stop()
            if boundary and (stop or (checkpoint_every and task.iteration % checkpoint_every == 0)):
                drain(task.index - 1)  # the iteration is complete on rank 0
                state.iteration = task.iteration
                if stop and comm.world > 1:  # release the other ranks before the (slow) checkpoint
                    comm.send_stop(comm.next, task.index, plan.packet_shape(task, model), model.dtype)
                if checkpoint is not None:
                    checkpoint(state)
                if stop:
                    st.stopped = True
                    break
            shape = plan.shape(task)
            # Wait for the results this input depends on, and keep the ring's load bounded.
            drain(max(task.needs, task.index - self.in_flight))
            out = None if comm.world == 1 else comm.send_buffer(
                comm.next, KIND_PACKET, plan.packet_shape(task, model), model.dtype, task.index)
            with self.trace.span(self._name(task), "compute", task=task.index, iteration=task.iteration), \
                    watch.measure("compute"):
                x = state.input(task, shape.context)
                st.peak_live_blocks = max(st.peak_live_blocks, state.live_blocks())
                packet = model.embed(x, state.timesteps[task.step], plan.batch)
                packet = self.stage.run(packet, task, shape, out=out)
                if comm.world == 1:
                    pred = model.head(packet, shape, cfg.sampling.guidance)
            if comm.world == 1:
                with self.trace.span(f"step {self._name(task)}", "scheduler", task=task.index), \
                        watch.measure("compute"):
                    apply(task, pred)
                returns.applied = task.index
            else:
                with self.trace.span("send", "send", task=task.index):
                    comm.send(packet, comm.next, KIND_PACKET, task.index)
            st.tasks += 1
            if progress is not None:
                progress.task_done(task)
        if not st.stopped:
            drain(len(plan.tasks) - 1)
            state.iteration = plan.tasks[-1].iteration + 1
        comm.flush()
        return st.finish(comm, watch, t0)


class DenoiseState:
    """Rank 0's state between tasks, and all a checkpoint needs to continue a run.

    ``iteration`` is the next iteration to run; in-flight blocks' latents and
    scheduler states, the finished block whose tail is still context, and the
    noise pool (with its generator) are the rest.
    """

    def __init__(self, cfg: Config, plan: Plan, channels: int, device: torch.device | str = "cpu"):
        self.plan = plan
        self.device = torch.device(device)
        self.num_cat = cfg.parallel.num_cat
        self.template = loader.make_scheduler(cfg, self.device)
        self.timesteps = self.template.timesteps
        self.noise = NoisePool(block=cfg.parallel.block, num_cat=cfg.parallel.num_cat, channels=channels,
                               height=plan.lat_h, width=plan.lat_w, seed=cfg.sampling.seed)
        self.iteration = 0
        self.blocks_done = 0
        self.latents: dict[int, torch.Tensor] = {}
        self.scheds: dict[int, object] = {}
        self.tails: dict[int, torch.Tensor] = {}  # last num_cat frames of the latest finished block

    def live_blocks(self) -> int:
        return len(self.latents) + len(self.tails)

    def input(self, task: sch.Task, context: int) -> torch.Tensor:
        """The task's input latents: the older neighbour's last ``context`` frames, then the block's own."""
        b = task.block
        if task.step == 0:
            # Noise comes from a CPU generator (identical on any device), then lives where the model runs.
            self.latents[b] = self.noise.next_block(self.plan.blocks[b].frames).to(self.device)
            self.scheds[b] = copy.deepcopy(self.template)
        x = self.latents[b]
        if context:
            older = self.latents.get(task.older)
            older = older if older is not None else self.tails[task.older]
            x = torch.cat([older[:, :, older.shape[2] - context :], x], dim=2)
        return x

    def apply(self, task: sch.Task, pred: torch.Tensor) -> torch.Tensor | None:
        """Scheduler step for the task's block; returns its latents if it is now clean."""
        b = task.block
        self.latents[b] = self.scheds[b].step(pred, self.timesteps[task.step], self.latents[b], return_dict=False)[0]
        if not task.last_step:
            return None
        done = self.latents.pop(b)
        del self.scheds[b]
        self.tails[b] = done[:, :, done.shape[2] - self.num_cat :]
        self.tails.pop(b - 1, None)  # no block needs it any more
        self.blocks_done += 1
        return done

    # -- checkpoints -----------------------------------------------------------

    def to_checkpoint(self) -> tuple[dict, dict[str, torch.Tensor]]:
        from .resume import pack, scheduler_state

        tensors: dict[str, torch.Tensor] = {}
        meta = {
            "iteration": self.iteration,
            "blocks_done": self.blocks_done,
            "latents": pack({str(k): v for k, v in self.latents.items()}, "latents", tensors),
            "tails": pack({str(k): v for k, v in self.tails.items()}, "tails", tensors),
            "scheds": pack({str(k): scheduler_state(v) for k, v in self.scheds.items()}, "sched", tensors),
            "noise": pack(self.noise.state(), "noise", tensors),
        }
        return meta, tensors

    def load_checkpoint(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        from .resume import unpack

        dev = self.device
        self.iteration = meta["iteration"]
        self.blocks_done = meta["blocks_done"]
        self.latents = {int(k): v.to(dev) for k, v in unpack(meta["latents"], tensors).items()}
        self.tails = {int(k): v.to(dev) for k, v in unpack(meta["tails"], tensors).items()}
        self.scheds = {}
        for k, attrs in unpack(meta["scheds"], tensors).items():
            s = copy.deepcopy(self.template)
            for name, value in attrs.items():
                # scheduler tensors go back where the template keeps its own (sigmas stay on the CPU)
                ref = getattr(self.template, name, None)
                if isinstance(ref, torch.Tensor):
                    value = value.to(ref.device)
                elif isinstance(value, list):
                    value = [v.to(dev) if isinstance(v, torch.Tensor) else v for v in value]
                elif isinstance(value, torch.Tensor):
                    value = value.to(dev)
                setattr(s, name, value)
            self.scheds[int(k)] = s
        self.noise.load_state(unpack(meta["noise"], tensors))
