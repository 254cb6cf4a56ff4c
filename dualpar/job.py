"""One rank's job, driven alike by ``launch/gen.py`` (torchrun or python) and the Ray actors:
the engine loaded once, then one video per :meth:`Job.generate` (prompt, output, checkpoints,
signals, the summary)."""

from __future__ import annotations

import os
import time

from .config import PER_VIDEO, RESUMABLE_CHANGES, Config
from .output import rundir


def write_stats(out: str, stats: dict) -> None:
    """Timing of the run, for benchmarks: ``stats.json`` beside the manifest."""
    import json

    rundir.atomic_write(out, rundir.STATS, (json.dumps(stats, indent=2) + "\n").encode())


class Job:
    """One rank of a run: the engine loaded once, then one video per :meth:`generate` call.

    ``launch/gen.py`` (torchrun or python) and the Ray actors of
    ``launch/ray_job.py`` both drive this class: the same engine code either way.
    """

    def __init__(self, cfg: Config, *, device: str | None = None, threads: int | None = None, trace: bool = False):
        import torch

        from .causal import CausalEngine, CausalPlan
        from .comm import Comm
        from .engine import Engine, Plan
        from .models import loader
        from .ring import log
        from .trace import Trace

        torch.set_num_threads(threads or 1)
        self.cfg = cfg
        self.comm = Comm.from_env(device=device, timeout_s=cfg.parallel.timeout_s, backend=cfg.parallel.backend,
                                  join_timeout_s=cfg.parallel.join_timeout_s, decode_on=cfg.output.decode_on)
        self.rank = self.comm.rank
        if self.comm.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # the VAE's 3-D convolutions: fixed shapes per block
        self.stop_signal: list[int] = []
        self.trace = Trace(self.rank, enabled=trace, device=self.comm.device)
        self.causal = cfg.sampling.mode == "causal"
        # The plan alone (no weights) says what a split costs; the engine then loads its slice once.
        probe = (CausalPlan if self.causal else Plan)(cfg, self.comm.ring, loader.num_layers(cfg))
        counts = self._initial_split(probe)
        if not self.comm.on_ring:
            self.engine = OutputRank(cfg, self.comm, probe)
            what = f"decoding and writing {len(probe.blocks)} {'chunks' if self.causal else 'blocks'}"
            log(self.rank, f"no layers (output.decode_on=extra) on {self.comm.device}; {what}")
        else:
            if self.causal:
                self.engine = CausalEngine(cfg, self.comm, self.trace, counts)
                what = (f"{len(self.engine.plan.blocks)} chunks x {self.engine.plan.steps} steps + commit, "
                        f"{cfg.causal.schedule}, KV policy {cfg.causal.policy}")
                tdir = loader.transformer_dir(cfg)
                if tdir is not None and tdir.name != "transformer":
                    what += f", weights {tdir.name}/"
            else:
                self.engine = Engine(cfg, self.comm, self.trace, counts)
                what = f"{len(self.engine.plan.blocks)} blocks x {cfg.sampling.steps} steps"
            first, last = self.engine.plan.layers[self.rank]
            log(self.rank, f"layers [{first}, {last}) of {self.engine.plan.layers[-1][1]} on {self.comm.device}; {what}")
        self.vae = None

    # -- the layer split ---------------------------------------------------------

    def _profile_key(self) -> str:
        import torch

        from .balance import profile_key

        dev = self.comm.device
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
        return profile_key(self.cfg, name)

    def _work_units(self, plan) -> tuple[int, int]:
        """(tasks each ring rank computes, blocks written) in one video of this plan."""
        return len(plan.ring_tasks()), len(plan.blocks)

    def _initial_split(self, plan) -> list[int] | None:
        """``parallel.split=auto``: the best split under the profile stored for this setup (rank 0 reads
        it; every rank gets the counts); None for ``even`` or an explicit split (the config's)."""
        from .balance import ProfileStore, best_split, decode_rank
        from .ring import log

        cfg, comm = self.cfg, self.comm
        if cfg.parallel.split != "auto" or comm.ring == 1:
            return None
        counts = None
        if comm.is_first:
            profile = ProfileStore(cfg.parallel.profile or None).get(self._profile_key())
            tasks, blocks = self._work_units(plan)
            if profile is None:
                counts = plan.counts
                log(0, f"split auto: no cost profile measured on this setup yet; the even split "
                       f"{','.join(map(str, counts))} for now (this video measures one)")
            else:
                where = decode_rank(cfg.output.decode_on, comm.ring, cfg.output.decode)
                counts = best_split(plan.num_layers, comm.ring, profile, tasks, blocks, where)
                log(0, f"split auto: {','.join(map(str, counts))} from the profile of this setup "
                       f"({profile.describe(cfg.output.decode_on)})")
        return comm.broadcast_ints(counts, max_len=comm.ring + 1)

    def _rebalance(self, cfg: Config, per_rank: list[dict]) -> None:
        """After a video (every rank, same figures): store the measured profile and take the split it
        says is best for the next video, if that is clearly faster (:data:`balance.CHANGE`)."""
        from .balance import CHANGE, Profile, ProfileStore, best_split, decode_rank
        from .ring import log

        comm, plan = self.comm, self.engine.plan
        where = decode_rank(cfg.output.decode_on, comm.ring, cfg.output.decode)
        tasks, blocks = self._work_units(plan)
        done_tasks = int(per_rank[0]["tasks"])
        if done_tasks == 0:
            return
        profile = Profile.from_run(per_rank, plan.counts, done_tasks, blocks, where)
        if comm.is_first:
            store = ProfileStore(cfg.parallel.profile or None)
            try:
                store.put(self._profile_key(), profile)
            except OSError as e:  # the video is done; only the next run's starting split is lost
                log(0, f"split auto: cannot store the profile in {store.path}: {e.strerror or e}")
        now = plan.counts
        new = best_split(plan.num_layers, comm.ring, profile, tasks, blocks, where)
        slow_now = max(profile.loads(now, tasks, blocks, where))
        slow_new = max(profile.loads(new, tasks, blocks, where))
        busy = "/".join(f"{r['busy_s']:.1f}" for r in per_rank[:comm.ring])
        change = new != now and slow_new < (1 - CHANGE) * slow_now
        if comm.is_first:
            verdict = (f"split {','.join(map(str, now))} -> {','.join(map(str, new))} for the next video "
                       f"(slowest stage {slow_now:.1f} s -> {slow_new:.1f} s predicted)" if change else
                       f"split {','.join(map(str, now))} kept (best {','.join(map(str, new))}: slowest stage "
                       f"{slow_now:.1f} s -> {slow_new:.1f} s predicted)")
            log(0, f"split auto: measured busy {busy} s per rank; {profile.describe(cfg.output.decode_on)}; {verdict}")
        if change:
            self.engine.resplit(new)

    def prepare(self, cfgs: list[Config]) -> None:
        """Encode the prompts of every video the job will make with one text-encoder load (rank 0)."""
        prompts = self.engine.prompts
        if prompts is None:
            return
        from .config import prompt_schedule

        texts = []
        for c in cfgs:
            texts += [t for _, t in prompt_schedule(c.sampling.prompt, c.video.frames)]
            texts.append(c.sampling.negative_prompt)
        prompts.warm(texts)

    def install_signal_handlers(self) -> None:
        """SIGINT/SIGTERM: stop at the next iteration boundary; a second one stops at once."""
        import signal

        from .ring import log

        def on_signal(signum, frame):
            if self.stop_signal:
                raise KeyboardInterrupt
            self.stop_signal.append(signum)
            if self.rank == 0:
                log(0, f"{signal.Signals(signum).name}: stopping at the next iteration boundary (checkpoint, then exit)")

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)

    def generate(self, cfg: Config, *, resume_run: bool = False, overwrite: bool = False) -> int:
        """Make one video with ``cfg`` (same model and geometry as the job's; prompt and output may differ).

        Returns 0, or 128 + signal number when a signal stopped the run (a
        checkpoint was taken). Raises on failure after recording it in the manifest.
        """
        # The output rank (rank 0 unless output.decode_on says otherwise) holds the run directory's
        # lock while it writes there; any exit, kill -9 included, frees it, so a reader can tell a
        # dead run ("running" in the manifest, nobody holding the lock) from a live one.
        lock = rundir.Lock(cfg.output.out).acquire() if self.comm.is_output else None
        try:
            return self._generate(cfg, resume_run, overwrite)
        finally:
            if lock is not None:
                lock.release()

    def _open_writer(self, cfg: Config, resume_run: bool, overwrite: bool):
        """The output rank's run writer (new, or reopened at the checkpoint) and its checkpointer factory."""
        from . import checkpoint
        from .models import loader
        from .output.writer import RunWriter

        engine, comm, out = self.engine, self.comm, cfg.output.out
        if overwrite:
            rundir.clear(out)
        if cfg.output.decode and self.vae is None:
            self.vae = loader.load_vae(cfg, comm.device)
        common = dict(vae=self.vae if cfg.output.decode else None, background=True,
                      queue_blocks=cfg.output.queue_blocks, decode=cfg.output.decode,
                      save_latents=cfg.output.save_latents)
        if resume_run:
            saved = checkpoint.load_parts(out, ("writer",))
            writer = RunWriter.reopen(out, *saved["writer"], **common)
        else:
            writer = RunWriter(out, config=cfg.to_dict(), seed=cfg.sampling.seed,
                               blocks_total=len(engine.plan.blocks), frames_total=cfg.video.frames,
                               fps=cfg.video.fps, gop=engine.plan.frames_of_block(len(engine.plan.blocks) - 1),
                               **common)
        writer.trace = self.trace

        def make_checkpointer(engine_part):
            # The engine's state is copied at each save; the writer's thread writes the file once
            # the blocks queued before it are on disk, so denoising does not wait.
            return checkpoint.Checkpointer(out, {"engine": engine_part, "writer": writer},
                                           info={"config": cfg.to_dict(), "run_id": writer.manifest["created_at"]})

        return writer, make_checkpointer

    def _generate(self, cfg: Config, resume_run: bool, overwrite: bool) -> int:
        import signal

        from . import checkpoint
        from .comm import OutputReceiver, OutputSender, PeerError
        from .models import loader
        from .output.remote import OutputServer, RemoteWriter
        from .progress import Progress
        from .ring import log, output_points

        changed = self.cfg.differences(cfg, ignore=PER_VIDEO + RESUMABLE_CHANGES)
        if changed:
            raise ValueError(f"a job's videos share its model and geometry; cannot change {', '.join(changed)}")
        engine, comm, rank, out = self.engine, self.comm, self.rank, cfg.output.out
        t_start = time.perf_counter()
        self.trace.clear()
        writer = progress = state = take_checkpoint = server = remote = None
        frames_before = 0  # written by the run this one resumes
        blocks_before = 0
        resumable = cfg.resumable()
        channels = loader.latent_channels(cfg)
        shapes = [engine.plan.latent_shape(b, channels) for b in range(len(engine.plan.blocks))]
        try:
            engine.set_prompt(cfg.sampling.prompt, cfg.sampling.negative_prompt)
            start = 0
            if resume_run and (comm.is_first or comm.is_output):
                saved = checkpoint.read_meta(out)["engine"]
                blocks_before, start = saved["blocks_done"], saved["iteration"]
                frames_before = sum(engine.plan.frames_of_block(b) for b in range(blocks_before))
            if comm.is_output:
                writer, make_checkpointer = self._open_writer(cfg, resume_run, overwrite)
                if not comm.is_first:
                    points = None
                    if comm.on_ring:  # what rank 0 sent before each of this rank's tasks
                        plan = engine.plan
                        points = output_points(plan, [t for t in plan.tasks if t.iteration >= start],
                                               plan.on_ring, engine.in_flight,
                                               cfg.output.checkpoint_every if resumable else 0)
                    server = OutputServer(OutputReceiver(comm, shapes, first=blocks_before), writer,
                                          make_checkpointer if resumable else None, points)
            if comm.is_first:
                state = engine.new_state(cfg)  # the video's own seed
                if resume_run:
                    state.load_state_dict(*checkpoint.load_parts(out, ("engine",))["engine"])
                    log(0, f"resuming {out} at iteration {state.iteration} ({state.blocks_done} blocks, "
                           f"{frames_before} frames already written)")
                if not comm.is_output:
                    writer = remote = RemoteWriter(OutputSender(comm, shapes), first=blocks_before)
                    remote.trace = self.trace
                if resumable:
                    if remote is not None:
                        take_checkpoint = remote.checkpoint
                    else:
                        checkpointer = make_checkpointer(state)

                        def take_checkpoint(_state) -> None:  # the engine's state is one of the parts already
                            checkpointer.save()

                elif cfg.sampling.mode != "causal":
                    log(0, f"no checkpoints: feature caching at cache.level={cfg.cache.level} with cache.neighbour="
                           f"{cfg.cache.neighbour} keeps state on every rank (cache.level=model with "
                           f"cache.neighbour=drop takes them)")
                if cfg.output.progress:
                    progress = Progress(engine.plan)
            stats = engine.generate(writer=writer, progress=progress, state=state, checkpoint=take_checkpoint,
                                    checkpoint_every=cfg.output.checkpoint_every if resumable else 0,
                                    should_stop=lambda: bool(self.stop_signal),
                                    between=server.before if server is not None and comm.on_ring else None)
            if server is not None:  # the blocks (and the stop) rank 0 sent after this rank's last task
                t_drain = time.perf_counter()
                server.drain()
                writer.sync()
                waited = time.perf_counter() - t_drain
                if comm.on_ring:
                    stats.wait_s += waited
                else:  # the extra rank's whole loop: taking blocks, its writer thread decoding them
                    stats.wall_s, stats.compute_s, stats.wait_s = waited, writer.output_s, waited - writer.output_s
                stats.stopped = server.stopped is not None
            if progress is not None:
                progress.close()
            if stats.stopped:
                signum = (server.stopped if server is not None else None) or \
                    (self.stop_signal[0] if self.stop_signal else signal.SIGTERM)
                name = signal.Signals(signum).name
                if remote is not None:
                    remote.stop(signum)
                    remote.flush()
                if comm.is_output and not resumable:
                    writer.finish(complete=False, reason=f"stopped by {name}")
                elif comm.is_output:
                    writer.finish(complete=False, reason=f"stopped by {name}; continue with --resume {out}")
                if comm.is_first and not resumable:
                    log(0, f"stopped by {name}; what was finished so far is in {out} (this run cannot be resumed)")
                elif comm.is_first:
                    log(0, f"stopped by {name} at iteration {state.iteration}; checkpoint saved. "
                           f"Continue with: launch/gen.py --resume {out}")
                try:
                    comm.flush()
                except PeerError as e:  # a peer that already left cannot take the stop message
                    log(rank, str(e))
                return 128 + signum
            if remote is not None:
                remote.flush()
            if comm.is_output:
                man = writer.finish(complete=True)
                if man["status"] != "complete":  # never exit 0, never drop the checkpoint, for a partial run
                    raise RuntimeError(f"the run ended with {man['blocks_written']} of {man['blocks_total']} "
                                       f"blocks written ({man['reason']}); its checkpoint is kept")
                checkpoint.remove(out)  # a complete run needs no checkpoint (it can be GBs)
        except BaseException as e:
            if progress is not None:
                progress.close()
            if writer is not None and comm.is_output:
                reason = "interrupted" if isinstance(e, KeyboardInterrupt) else describe(e)
                try:
                    writer.finish(complete=False, reason=reason)
                except Exception as we:  # the writer's own failure is already in the manifest
                    log(rank, f"output writer: {we}")
            raise
        output_s = writer.output_s if comm.is_output else 0.0
        loop = comm.gather_floats([stats.wall_s, stats.compute_s, stats.wait_s, float(stats.bytes_sent), peak_rss_mb(),
                                   peak_cuda_mb(), float(stats.cache_bytes), float(stats.messages_sent),
                                   float(stats.send_buffer_bytes), float(stats.tasks), float(stats.forecasts),
                                   float(stats.peak_cache_bytes), stats.layers_s, output_s])
        per_rank = self._per_rank(loop)
        if self.trace.enabled:
            self._write_trace(out)
        if comm.is_output:
            write_stats(out, {"world_size": comm.world, "frames": cfg.video.frames,
                              "total_s": time.perf_counter() - t_start, "loop_s": max(r["loop_s"] for r in per_rank),
                              "layers": engine.plan.counts, "decode_on": cfg.output.decode_on, "ranks": per_rank})
        if rank == 0:
            self._summary(cfg, per_rank, time.perf_counter() - t_start, frames_before)
        if cfg.parallel.split == "auto" and comm.ring > 1:
            self._rebalance(cfg, per_rank)
        return 0

    @staticmethod
    def _per_rank(loop: list[list[float]]) -> list[dict]:
        return [
            {"rank": r, "loop_s": wall, "busy_s": comp, "wait_s": wait, "bytes_sent": int(sent),
             "messages_sent": int(msgs), "send_buffers_mb": sbuf / 2**20, "peak_rss_mb": rss, "peak_cuda_mb": cuda,
             "kv_cache_mb": kv / 2**20, "tasks": int(tasks), "forecasts": int(fc), "feature_cache_peak_mb": fcache / 2**20,
             "layers_s": layers, "output_s": output}
            for r, (wall, comp, wait, sent, rss, cuda, kv, msgs, sbuf, tasks, fc, fcache, layers, output)
            in enumerate(loop)
        ]

    def _write_trace(self, out: str) -> None:
        import json

        from .trace import chrome_trace

        per_rank = [json.loads(b) for b in self.comm.gather_bytes(self.trace.to_json())]
        if self.comm.is_output:
            rundir.atomic_write(out, rundir.TRACE, json.dumps(chrome_trace(per_rank)).encode())

    def _summary(self, cfg: Config, per_rank: list[dict], total: float, frames_before: int = 0) -> None:
        from .ring import log

        out, frames = cfg.output.out, cfg.video.frames
        made = frames - frames_before
        for r in per_rank:
            log(0, f"stats of rank {r['rank']}: busy {r['busy_s'] / max(r['loop_s'], 1e-9):.0%}, "
                   f"waiting {r['wait_s']:.1f} s, sent {r['bytes_sent'] / 1e6:.1f} MB, peak RSS {r['peak_rss_mb']:.0f} MB")
        if cfg.cache.policy != "none":
            c = cfg.cache
            where = ("rank 0 forecast them; they never entered the ring" if c.level == "model"
                     else "every rank forecast its own layers")
            full = cfg.cache.full_steps(cfg.sampling.steps)
            log(0, f"feature caching ({c.policy}, level {c.level}): {full.count(False)} of {len(full)} steps "
                   f"of every block forecast ({where}); caches peaked at "
                   f"{max(r['feature_cache_peak_mb'] for r in per_rank):.1f} MB on a rank")
        if cfg.sampling.mode == "causal":
            log(0, f"KV caches: {sum(r['kv_cache_mb'] for r in per_rank):.1f} MB over all ranks "
                   f"(policy {cfg.causal.policy})")
        of = f" of {frames} (the rest before the resume)" if frames_before else ""
        log(0, f"done: {made} frames{of} in {total:.1f} s ({made / total:.1f} frames/s end to end; "
               f"denoising loop {max(r['loop_s'] for r in per_rank):.1f} s) -> "
               f"{os.path.join(out, 'video.mp4' if cfg.output.decode else 'latents')}")

    def close(self, abort: bool = False) -> None:
        self.comm.close(abort=abort)


class OutputRank:
    """The engine of the extra rank (``output.decode_on=extra``): no layers; it joins the collectives
    the ring ranks make for each video, and :class:`~dualpar.output.remote.OutputServer` (driven by
    :class:`Job`) decodes and writes what rank 0 sends."""

    def __init__(self, cfg: Config, comm, plan):
        self.cfg, self.comm, self.plan = cfg, comm, plan
        self.prompts = None

    def set_prompt(self, prompt: str, negative: str) -> None:
        self.comm.broadcast(None, src=0)  # the text every stage receives; nothing here uses it

    def generate(self, *args, **kwargs):
        from .ring import RunStats

        if self.cfg.sampling.mode != "causal":
            self.comm.broadcast_int(None)  # the iteration rank 0 starts from
        return RunStats.begin(self.comm)

    def resplit(self, counts: list[int]) -> None:
        self.plan.set_split(counts)


def peak_rss_mb() -> float:
    """This process's peak resident host memory so far."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_cuda_mb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_initialized() else 0.0


def describe(e: BaseException) -> str:
    from .comm import CommError, PeerError

    return str(e) if isinstance(e, (PeerError, CommError)) else f"{type(e).__name__}: {e}"
