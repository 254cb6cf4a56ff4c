"""The bidirectional (block-wise DualParal) mode: its plan, its engine and rank 0's state.

The task list is :func:`schedule.make_tasks`: every queued block gets one
denoising step per iteration, newest first. A task's input is the block's
latents after its older neighbour's last ``num_cat`` frames; its prediction is
applied with the block's own scheduler. The loops themselves are :mod:`ring`'s.

With timestep feature caching (``cache``), some steps are forecast: at
``cache.level=model`` rank 0 forecasts the block's prediction and the task
never enters the ring; at ``stage`` it flows as usual and every stage
forecasts its own residual (:class:`stage.Stage`).
"""

from __future__ import annotations

import copy
import dataclasses
import time

import torch

from . import schedule as sch
from .comm import Comm
from .config import Config, prompt_schedule
from .forecast import Forecaster
from .models import loader
from .models.wan import MOD_ROWS, BlockShape
from .noise import NoisePool
from .ring import Geometry, RunStats, log, relay, run_first
from .stage import Stage
from .trace import Trace


class Plan(Geometry):
    """The block-wise run's geometry and task list."""

    def __init__(self, cfg: Config, world: int, num_layers: int, counts: list[int] | None = None):
        super().__init__(cfg, world, num_layers, cfg.parallel.block, counts)
        self.full = cfg.cache.full_steps(cfg.sampling.steps)
        """Per denoising step: computed (True) or forecast."""
        self.tasks = sch.make_tasks(len(self.blocks), cfg.sampling.steps, self.full)
        self.num_iterations = sch.num_iterations(len(self.blocks), cfg.sampling.steps)
        self.sigmas = [float(t) / 1000.0 for t in loader.make_scheduler(cfg).timesteps]
        """Each step's noise level (what ``newton`` forecasts in)."""
        self.model_level = not all(self.full) and cfg.cache.level == "model"

    def on_ring(self, task: sch.Task) -> bool:
        """Whether the task goes around the ring (a forecast of the whole model does not)."""
        return task.full or not self.model_level

    def shape(self, task: sch.Task) -> BlockShape:
        lay = sch.layout(task, self.blocks, self.cfg.parallel.num_cat, self.cfg.sampling.steps)
        if lay.extra and self.cfg.cache.neighbour == "drop" and not self.full[task.step - 1]:
            lay = dataclasses.replace(lay, extra=0)  # the newer neighbour's step was forecast: no fresh K/V
        return BlockShape(**dataclasses.asdict(lay), height=self.lat_h, width=self.lat_w)

    def packet_shape(self, task: sch.Task, model) -> tuple[int, ...]:
        s = self.shape(task)
        return (self.batch, s.frames * model.tokens_per_frame(self.lat_h, self.lat_w) + MOD_ROWS, model.dim)


class Engine:
    """One rank of a run. Build once (weights stay loaded), then :meth:`generate`."""

    def __init__(self, cfg: Config, comm: Comm, trace: Trace | None = None, counts: list[int] | None = None):
        self.cfg, self.comm = cfg, comm
        self.trace = trace or Trace(comm.rank, enabled=False)
        self.plan = Plan(cfg, comm.ring, loader.num_layers(cfg), counts)
        self.stage = self._load_stage()
        self.prompts = loader.PromptCache(cfg, comm.device) if comm.is_first else None
        # Tasks rank 0 may have in flight around the ring: enough to keep every stage
        # busy (each link holds up to comm.SEND_SLOTS sends and two receives posted ahead).
        self.in_flight = 2 * comm.ring
        if cfg.model.compile != "off":
            self.precompile(cfg.model.compile)

    def _load_stage(self) -> Stage:
        cfg, plan = self.cfg, self.plan
        first, last = plan.layers[self.comm.rank]
        stage_forecast = None if all(plan.full) or cfg.cache.level != "stage" else Forecaster.for_config(cfg.cache)
        return Stage(loader.load_slice(cfg, first, last, self.comm.device), full=plan.full, sigmas=plan.sigmas,
                     forecast=stage_forecast)

    def resplit(self, counts: list[int]) -> None:
        """Take another layer split (every rank, between videos): reload this rank's slice if it changed."""
        old = self.plan.layers[self.comm.rank]
        self.plan.set_split(counts)
        if self.plan.layers[self.comm.rank] != old:  # the next video's set_prompt gives it the text
            self.stage = None  # the old slice goes before the new one loads
            self.stage = self._load_stage()
            if self.cfg.model.compile != "off":
                self.precompile(self.cfg.model.compile)

    @torch.no_grad()
    def precompile(self, mode: str) -> None:
        """Compile the layer forward for every block shape of the run, on zeros, before the ring
        starts (so no compilation happens while peers wait under the ring's timeout)."""
        model, plan = self.stage.model, self.plan
        model.compile_layers(mode)
        t0 = time.perf_counter()
        text = torch.zeros(plan.batch, self.cfg.model.tokens, model.dim, dtype=model.dtype, device=model.device)
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
            prompt = prompt_schedule(prompt, self.cfg.video.frames, causal=False)[0][1]  # '\|' is a literal '|'
            states = self.prompts.states([prompt, negative] if self.plan.batch == 2 else [prompt])
            text = self.stage.model.text_context(states)
        text = self.comm.broadcast(text, src=0)
        self.stage.model.set_text(text.to(self.stage.model.device))

    def new_state(self, cfg: Config) -> "DenoiseState":
        """Rank 0's state at the start of a video of ``cfg`` (its seed; the job's geometry)."""
        return DenoiseState(cfg, self.plan, self.stage.model.out_channels, self.comm.device)

    # -- the loop --------------------------------------------------------------

    @torch.no_grad()
    def generate(self, writer=None, progress=None, keep_latents: bool = False, *, state: "DenoiseState | None" = None,
                 checkpoint=None, checkpoint_every: int = 0, should_stop=None, between=None) -> RunStats:
        """Run the plan's tasks from ``state.iteration`` (rank 0 passes the state; 0 = fresh).

        Rank 0 hands finished blocks to ``writer``. Every ``checkpoint_every``
        iterations, and when ``should_stop()`` turns true, rank 0 lets the ring
        drain at the iteration boundary and calls ``checkpoint(state)``; on a stop
        it first tells the other ranks to stop at that boundary. ``between(task)`` runs before each
        of the other ranks' tasks (the last rank, when it writes the output, takes the blocks rank 0
        sent before that task).
        """
        if self.comm.is_first:
            state = state or self.new_state(self.cfg)
            self.comm.broadcast_int(state.iteration)
            return self._run_first(state, writer, progress, keep_latents, checkpoint, checkpoint_every, should_stop)
        return self._run_other(self.comm.broadcast_int(None), checkpoint_every, between)

    def _run_other(self, start_iteration: int, checkpoint_every: int = 0, between=None) -> RunStats:
        plan, model, cfg = self.plan, self.stage.model, self.cfg
        self.stage.reset()
        tasks = plan.ring_tasks(start_iteration)

        def compute(task, packet, out, watch):
            shape = plan.shape(task)
            if self.comm.is_last:
                with watch.measure("layers"):
                    h = self.stage.run(packet, task, shape)
                return model.head(h, shape, cfg.sampling.guidance, out=out)
            with watch.measure("layers"):
                return self.stage.run(packet, task, shape, out=out)

        # rank 0 may be taking a checkpoint at an iteration boundary before this task: the first task
        # of an iteration, or the first after iterations whose tasks were all forecast
        after = {t.index: prev for prev, t in zip([start_iteration - 1] + [t.iteration for t in tasks], tasks)}

        def patient(task):
            return checkpoint_every and any(i % checkpoint_every == 0
                                            for i in range(after[task.index] + 1, task.iteration + 1))

        st = relay(self.comm, self.trace, tasks, self.packet_shape, self.packet_dtype(), compute, self.name,
                   self.pred_shape, patient, between)
        st.peak_cache_bytes = self.stage.peak_bytes
        return st

    # -- the mode, as ring.run_first sees it -----------------------------------------

    def packet_shape(self, task) -> tuple[int, ...]:
        return self.plan.packet_shape(task, self.stage.model)

    def pred_shape(self, task) -> tuple[int, ...]:
        return self.plan.pred_shape(task, self.stage.model.out_channels)

    def packet_dtype(self) -> torch.dtype:
        return self.stage.model.dtype

    @staticmethod
    def name(task) -> str:
        return f"b{task.block} s{task.step}"

    def before_task(self, task) -> None:
        pass

    def on_ring(self, task) -> bool:
        return self.plan.on_ring(task)

    def forecast(self, state: "DenoiseState", task) -> torch.Tensor:
        return state.forecast_pred(task)

    def embed(self, state: "DenoiseState", task) -> torch.Tensor:
        x = state.input(task, self.plan.shape(task).context)
        return self.stage.model.embed(x, state.timesteps[task.step], self.plan.batch)

    def head(self, packet: torch.Tensor, task) -> torch.Tensor:
        return self.stage.model.head(packet, self.plan.shape(task), self.cfg.sampling.guidance)

    def _run_first(self, state, writer, progress, keep_latents, checkpoint, checkpoint_every, should_stop) -> RunStats:
        plan = self.plan
        tasks = [t for t in plan.tasks if t.iteration >= state.iteration]
        base = tasks[0].index if tasks else len(plan.tasks)
        self.stage.reset()
        if progress is not None:
            progress.resume_from(base, state.blocks_done, sum(plan.frames_of_block(b) for b in range(state.blocks_done)))
        st = run_first(self, self.comm, state, tasks, base, writer, progress, keep_latents, checkpoint,
                       checkpoint_every, should_stop)
        st.peak_cache_bytes = self.stage.peak_bytes + state.peak_forecast_bytes
        return st


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
                               height=plan.lat_h, width=plan.lat_w, seed=cfg.sampling.seed,
                               shared=cfg.parallel.shared_noise)
        self.iteration = 0
        self.blocks_done = 0
        self.latents: dict[int, torch.Tensor] = {}
        self.scheds: dict[int, object] = {}
        self.tails: dict[int, torch.Tensor] = {}  # last num_cat frames of the latest finished block
        # cache.level=model: the blocks' computed predictions, to forecast the others from
        self.forecast = Forecaster.for_config(cfg.cache) if plan.model_level else None
        self.peak_forecast_bytes = 0

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

    def forecast_pred(self, task: sch.Task) -> torch.Tensor:
        """The block's prediction at a forecast step (``cache.level=model``), from its computed ones."""
        return self.forecast.predict(task.block, task.step, self.plan.sigmas[task.step])

    def apply(self, task: sch.Task, pred: torch.Tensor) -> torch.Tensor | None:
        """Scheduler step for the task's block; returns its latents if it is now clean."""
        b = task.block
        if self.forecast is not None and task.full:
            self.forecast.record(b, task.step, self.plan.sigmas[task.step], pred)
            self.peak_forecast_bytes = max(self.peak_forecast_bytes, self.forecast.nbytes())
        self.latents[b] = self.scheds[b].step(pred, self.timesteps[task.step], self.latents[b], return_dict=False)[0]
        if not task.last_step:
            return None
        done = self.latents.pop(b)
        del self.scheds[b]
        if self.forecast is not None:
            self.forecast.drop(b)
        self.tails[b] = done[:, :, done.shape[2] - self.num_cat :]
        self.tails.pop(b - 1, None)  # no block needs it any more
        self.blocks_done += 1
        return done

    # -- checkpoints -----------------------------------------------------------

    def state_dict(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """What :meth:`load_state_dict` needs to continue the run from this iteration boundary."""
        from .checkpoint import pack, scheduler_state

        _, noise = self.noise.state_dict()  # tensors only; packed below, as FORMAT 1 files hold them
        tensors: dict[str, torch.Tensor] = {}
        meta = {
            "iteration": self.iteration,
            "blocks_done": self.blocks_done,
            "latents": pack({str(k): v for k, v in self.latents.items()}, "latents", tensors),
            "tails": pack({str(k): v for k, v in self.tails.items()}, "tails", tensors),
            "scheds": pack({str(k): scheduler_state(v) for k, v in self.scheds.items()}, "sched", tensors),
            "noise": pack(noise, "noise", tensors),
        }
        if self.forecast is not None:
            meta["forecast"] = pack(self.forecast.state(), "forecast", tensors)
        return meta, tensors

    def load_state_dict(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Continue from a :meth:`state_dict` (of a run with the same config, on any number of ranks)."""
        from .checkpoint import unpack

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
        self.noise.load_state_dict({}, unpack(meta["noise"], tensors))
        if self.forecast is not None:
            self.forecast.load(unpack(meta.get("forecast", {"dict": {}}), tensors), dev)
