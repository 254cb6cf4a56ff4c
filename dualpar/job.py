"""One rank's job, driven alike by ``launch/gen.py`` (torchrun or python) and the Ray actors:
the engine loaded once, then one video per :meth:`Job.generate` (prompt, output, checkpoints,
signals, the summary)."""

from __future__ import annotations

import os
import time

from .config import RESUMABLE_CHANGES, Config
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

        from .comm import Comm
        from .engine import Engine
        from .ring import log
        from .trace import Trace

        torch.set_num_threads(threads or 1)
        self.cfg = cfg
        self.comm = Comm.from_env(device=device, timeout_s=cfg.parallel.timeout_s, backend=cfg.parallel.backend,
                                  join_timeout_s=cfg.parallel.join_timeout_s)
        self.rank = self.comm.rank
        if self.comm.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # the VAE's 3-D convolutions: fixed shapes per block
        self.stop_signal: list[int] = []
        self.trace = Trace(self.rank, enabled=trace, device=self.comm.device)
        self.causal = cfg.sampling.mode == "causal"
        if self.causal:
            from .causal import CausalEngine

            self.engine = CausalEngine(cfg, self.comm, self.trace)
            what = (f"{len(self.engine.plan.blocks)} chunks x {self.engine.plan.steps} steps + commit, "
                    f"{cfg.causal.schedule}, KV policy {cfg.causal.policy}")
        else:
            self.engine = Engine(cfg, self.comm, self.trace)
            what = f"{len(self.engine.plan.blocks)} blocks x {cfg.sampling.steps} steps"
        first, last = self.engine.plan.layers[self.rank]
        log(self.rank, f"layers [{first}, {last}) of {self.engine.plan.layers[-1][1]} on {self.comm.device}; {what}")
        self.vae = None

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
        # Rank 0 holds the run directory's lock while it writes there; any exit, kill -9 included,
        # frees it, so a reader can tell a dead run ("running" in the manifest, nobody holding
        # the lock) from a live one.
        lock = rundir.Lock(cfg.output.out).acquire() if self.comm.is_first else None
        try:
            return self._generate(cfg, resume_run, overwrite)
        finally:
            if lock is not None:
                lock.release()

    def _generate(self, cfg: Config, resume_run: bool, overwrite: bool) -> int:
        import signal

        from . import checkpoint
        from .comm import PeerError
        from .engine import DenoiseState
        from .models import loader
        from .output.writer import RunWriter
        from .progress import Progress
        from .ring import log

        changed = self.cfg.differences(cfg, ignore=("sampling.prompt", "output.out") + RESUMABLE_CHANGES)
        if changed:
            raise ValueError(f"a job's videos share its model and geometry; cannot change {', '.join(changed)}")
        engine, comm, rank, out = self.engine, self.comm, self.rank, cfg.output.out
        t_start = time.perf_counter()
        self.trace.clear()
        writer = progress = state = take_checkpoint = None
        frames_before = 0  # written by the run this one resumes
        try:
            engine.set_prompt(cfg.sampling.prompt, cfg.sampling.negative_prompt)
            if comm.is_first:
                if overwrite:
                    rundir.clear(out)
                if cfg.output.decode and self.vae is None:
                    self.vae = loader.load_vae(cfg, comm.device)
                common = dict(vae=self.vae if cfg.output.decode else None, background=True,
                              queue_blocks=cfg.output.queue_blocks, decode=cfg.output.decode,
                              save_latents=cfg.output.save_latents)
                if not self.causal:
                    state = DenoiseState(cfg, engine.plan, engine.stage.model.out_channels, comm.device)
                if resume_run:
                    saved = checkpoint.load_parts(out, ("engine", "writer"))
                    state.load_state_dict(*saved["engine"])
                    writer = RunWriter.reopen(out, *saved["writer"], **common)
                    frames_before = sum(engine.plan.frames_of_block(b) for b in range(state.blocks_done))
                    log(0, f"resuming {out} at iteration {state.iteration} ({state.blocks_done} blocks, "
                           f"{frames_before} frames already written)")
                else:
                    writer = RunWriter(out, config=cfg.to_dict(), seed=cfg.sampling.seed,
                                       blocks_total=len(engine.plan.blocks), frames_total=cfg.video.frames,
                                       fps=cfg.video.fps, gop=engine.plan.frames_of_block(len(engine.plan.blocks) - 1),
                                       **common)
                if cfg.resumable():
                    # The engine's state is copied at each save; the writer's thread writes the file
                    # once the blocks queued before it are on disk, so denoising does not wait.
                    checkpointer = checkpoint.Checkpointer(
                        out, {"engine": state, "writer": writer},
                        info={"config": cfg.to_dict(), "run_id": writer.manifest["created_at"]})

                    def take_checkpoint(_state) -> None:  # the engine's state is one of the parts already
                        checkpointer.save()

                elif cfg.sampling.mode != "causal":
                    log(0, f"no checkpoints: feature caching at cache.level={cfg.cache.level} with cache.neighbour="
                           f"{cfg.cache.neighbour} keeps state on every rank (cache.level=model with "
                           f"cache.neighbour=drop takes them)")
                writer.trace = self.trace
                if cfg.output.progress:
                    progress = Progress(engine.plan)
            stats = engine.generate(writer=writer, progress=progress, state=state, checkpoint=take_checkpoint,
                                    checkpoint_every=cfg.output.checkpoint_every if cfg.resumable() else 0,
                                    should_stop=lambda: bool(self.stop_signal))
            if progress is not None:
                progress.close()
            if stats.stopped:
                signum = self.stop_signal[0] if self.stop_signal else signal.SIGTERM
                name = signal.Signals(signum).name
                if writer is not None and not cfg.resumable():
                    writer.finish(complete=False, reason=f"stopped by {name}")
                    log(0, f"stopped by {name}; what was finished so far is in {out} (this run cannot be resumed)")
                elif writer is not None:
                    writer.finish(complete=False, reason=f"stopped by {name}; continue with --resume {out}")
                    log(0, f"stopped by {name} at iteration {state.iteration}; checkpoint saved. "
                           f"Continue with: launch/gen.py --resume {out}")
                try:
                    comm.flush()
                except PeerError as e:  # a peer that already left cannot take the stop message
                    log(rank, str(e))
                return 128 + signum
            if writer is not None:
                man = writer.finish(complete=True)
                if man["status"] != "complete":  # never exit 0, never drop the checkpoint, for a partial run
                    raise RuntimeError(f"the run ended with {man['blocks_written']} of {man['blocks_total']} "
                                       f"blocks written ({man['reason']}); its checkpoint is kept")
                checkpoint.remove(out)  # a complete run needs no checkpoint (it can be GBs)
        except BaseException as e:
            if progress is not None:
                progress.close()
            if writer is not None:
                reason = "interrupted" if isinstance(e, KeyboardInterrupt) else describe(e)
                try:
                    writer.finish(complete=False, reason=reason)
                except Exception as we:  # the writer's own failure is already in the manifest
                    log(rank, f"output writer: {we}")
            raise
        loop = comm.gather_floats([stats.wall_s, stats.compute_s, stats.wait_s, float(stats.bytes_sent), peak_rss_mb(),
                                   peak_cuda_mb(), float(stats.cache_bytes), float(stats.messages_sent),
                                   float(stats.send_buffer_bytes), float(stats.tasks), float(stats.forecasts),
                                   float(stats.peak_cache_bytes)])
        if self.trace.enabled:
            self._write_trace(out)
        if rank == 0:
            self._summary(cfg, loop, time.perf_counter() - t_start, frames_before)
        return 0

    def _write_trace(self, out: str) -> None:
        import json

        from .trace import chrome_trace

        per_rank = [json.loads(b) for b in self.comm.gather_bytes(self.trace.to_json())]
        if self.rank == 0:
            rundir.atomic_write(out, rundir.TRACE, json.dumps(chrome_trace(per_rank)).encode())

    def _summary(self, cfg: Config, loop: list[list[float]], total: float, frames_before: int = 0) -> None:
        from .ring import log

        out, frames = cfg.output.out, cfg.video.frames
        made = frames - frames_before
        per_rank = [
            {"rank": r, "loop_s": wall, "busy_s": comp, "wait_s": wait, "bytes_sent": int(sent),
             "messages_sent": int(msgs), "send_buffers_mb": sbuf / 2**20, "peak_rss_mb": rss, "peak_cuda_mb": cuda,
             "kv_cache_mb": kv / 2**20, "tasks": int(tasks), "forecasts": int(fc), "feature_cache_peak_mb": fcache / 2**20}
            for r, (wall, comp, wait, sent, rss, cuda, kv, msgs, sbuf, tasks, fc, fcache) in enumerate(loop)
        ]
        for r in per_rank:
            log(0, f"stats of rank {r['rank']}: busy {r['busy_s'] / max(r['loop_s'], 1e-9):.0%}, "
                   f"waiting {r['wait_s']:.1f} s, sent {r['bytes_sent'] / 1e6:.1f} MB, peak RSS {r['peak_rss_mb']:.0f} MB")
        write_stats(out, {"world_size": self.comm.world, "frames": frames, "total_s": total,
                          "loop_s": max(r["loop_s"] for r in per_rank), "ranks": per_rank})
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
