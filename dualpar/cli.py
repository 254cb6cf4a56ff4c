"""Command line of ``launch/gen.py``: parse, validate (before anything heavy), run, summarize."""

from __future__ import annotations

import argparse
import os
import sys
import time

from .config import Config, ConfigError, load_config

# flag -> (config key, type); each flag overrides the config file.
_FLAGS = {
    "frames": ("video.frames", int, "output frames, 4k+1 (1025 = 257 latent frames)"),
    "height": ("video.height", int, "frame height in pixels (multiple of 16)"),
    "width": ("video.width", int, "frame width in pixels (multiple of 16)"),
    "fps": ("video.fps", int, "frame rate of the MP4"),
    "prompt": ("sampling.prompt", str, "text prompt; causal mode also takes a schedule 'text | FRAME: text | ...'"),
    "negative_prompt": ("sampling.negative_prompt", str, "negative prompt for guidance"),
    "steps": ("sampling.steps", int, "denoising steps per block"),
    "scheduler": ("sampling.scheduler", str, "unipc or euler"),
    "flow_shift": ("sampling.flow_shift", float, "flow-matching timestep shift"),
    "guidance": ("sampling.guidance", float, "classifier-free guidance scale (<= 1: off)"),
    "seed": ("sampling.seed", int, "noise seed"),
    "mode": ("sampling.mode", str, "bidirectional (block-wise DualParal) or causal (chunks with KV caches)"),
    "block": ("parallel.block", int, "latent frames per block"),
    "num_cat": ("parallel.num_cat", int, "context latent frames per neighbour"),
    "chunk": ("causal.chunk", int, "causal mode: latent frames per chunk"),
    "policy": ("causal.policy", str, "causal mode: KV selection (full, window, topk, focused)"),
    "budget": ("causal.budget", float, "causal mode: frames attended per query frame (< 1: fraction of the video)"),
    "model": ("model.path", str, "local diffusers-format Wan2.1 T2V folder (default: the tiny preset)"),
    "transformer_file": ("model.transformer_file", str, "transformer weights in original Wan naming, replacing the folder's"),
    "dtype": ("model.dtype", str, "float32, bfloat16 or float16"),
    "out": ("output.out", str, "output directory"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gen.py",
        description="Block-wise pipelined long-video generation (DualParal) over frame blocks and DiT layers.",
    )
    p.add_argument("--config", help="YAML config file (sections: model, video, sampling, parallel, causal, output)")
    for flag, (key, typ, help_) in _FLAGS.items():
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, type=typ, help=f"{help_} [{key}]")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config key (YAML value syntax), repeatable")
    p.add_argument("--no-decode", action="store_true", help="skip VAE decode and MP4; write latents and manifest")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--resume", metavar="DIR", help="continue the interrupted run in DIR from its last checkpoint")
    p.add_argument("--device", help="torch device for this rank (default: cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--trace", action="store_true", help="write trace.json (Chrome trace of every rank's timeline)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per rank (default 1: ranks share the cores)")
    return p


def apply_sets(cfg: Config, items: list[str]) -> None:
    """Apply ``--set SECTION.KEY=VALUE`` overrides (values in YAML syntax)."""
    import yaml

    for item in items:
        key, eq, raw = item.partition("=")
        if not eq:
            raise ConfigError(f"--set expects SECTION.KEY=VALUE, got '{item}'")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: cannot parse value '{raw}'") from None
        cfg.set(key.strip(), value, source="--set")


def config_from_args(args: argparse.Namespace, base: Config | None = None) -> Config:
    cfg = load_config(args.config, base)
    apply_sets(cfg, args.set)
    for flag, (key, _, _) in _FLAGS.items():
        val = getattr(args, flag)
        if val is not None:
            cfg.set(key, val, source="--" + flag.replace("_", "-"))
    if args.no_decode:
        cfg.output.decode = False
    if args.no_progress:
        cfg.output.progress = False
    return cfg


# Keys that may change when a run is resumed: they do not change what is computed.
RESUMABLE_CHANGES = ("output.out", "output.progress", "output.queue_blocks", "output.checkpoint_every",
                     "parallel.timeout_s")


def check_output_dir(path: str, overwrite: bool) -> None:
    """Refuse to mix two runs in one directory, or to start when it cannot be written."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--out {path} exists and is not a directory")
    if os.path.exists(os.path.join(path, "manifest.json")) and not overwrite:
        raise ConfigError(f"--out {path} already holds a run (manifest.json); continue it with --resume {path}, "
                          "choose another --out, or pass --overwrite")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"--out {path}: {parent} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--out {path} is not writable")


def check_device(name: str, backend: str = "auto") -> str:
    """The device this rank uses for ``--device name`` (bare ``cuda`` means ``cuda:LOCAL_RANK``)."""
    import torch

    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: only cpu and cuda are supported")
    if dev.type == "cpu":
        return "cpu"
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: CUDA is not available on this machine")
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    shared = backend == "gloo"  # gloo stages through host memory: ranks may share a GPU
    if dev.index is not None and local_ranks > 1 and not shared:
        raise ConfigError(f"--device {name}: {local_ranks} ranks on this machine cannot share one GPU under NCCL; "
                          "use --device cuda (each rank takes cuda:LOCAL_RANK), or parallel.backend=gloo for checks")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    index = dev.index if dev.index is not None else (local % torch.cuda.device_count() if shared else local)
    if index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    return f"cuda:{index}"


def clear_run(path: str) -> None:
    """Remove a previous run's files (only those the engine writes) from ``path``."""
    import shutil

    for name in ("manifest.json", "video.mp4", "stats.json", "trace.json", "checkpoint.safetensors"):
        p = os.path.join(path, name)
        if os.path.isfile(p):
            os.remove(p)
    shutil.rmtree(os.path.join(path, "latents"), ignore_errors=True)


def write_stats(out: str, stats: dict) -> None:
    """Timing of the run, for benchmarks: ``stats.json`` beside the manifest."""
    import json

    from .output import atomic_write

    atomic_write(out, "stats.json", (json.dumps(stats, indent=2) + "\n").encode())


def config_for_resume(args: argparse.Namespace) -> Config:
    """The interrupted run's config (its manifest), with any options given now checked against it."""
    import json

    from . import resume

    man_path = os.path.join(args.resume, "manifest.json")
    try:
        with open(man_path) as f:
            manifest = json.load(f)
        base = Config.from_dict(manifest["config"], source=man_path)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"--resume {args.resume}: cannot read the run's manifest.json ({e})") from None
    if manifest.get("status") == "complete":
        raise ConfigError(f"--resume {args.resume}: the run is already complete")
    if base.sampling.mode == "causal":
        raise ConfigError(f"--resume {args.resume}: causal runs take no checkpoints and cannot be resumed")
    if args.out is not None and os.path.abspath(args.out) != os.path.abspath(args.resume):
        raise ConfigError("--resume continues the run in its own directory; drop --out")
    cfg = config_from_args(args, Config.from_dict(manifest["config"]))
    diff = base.differences(cfg, ignore=RESUMABLE_CHANGES)
    if diff:
        raise ConfigError(f"--resume {args.resume}: options differ from the run being resumed ({'; '.join(diff)})")
    cfg.output.out = args.resume
    if not os.path.isfile(os.path.join(args.resume, resume.FILE)):
        raise ConfigError(f"--resume {args.resume}: no checkpoint yet (the run stopped before its first one); "
                          "start it again instead")
    try:
        meta = resume.read_meta(args.resume)
    except resume.ResumeError as e:
        raise ConfigError(str(e)) from None
    if meta.get("run_id") != manifest.get("created_at"):
        raise ConfigError(f"--resume {args.resume}: {resume.FILE} belongs to another run than manifest.json")
    diff = base.differences(Config.from_dict(meta["config"]), ignore=RESUMABLE_CHANGES)
    if diff:
        raise ConfigError(f"--resume {args.resume}: the checkpoint's config differs from the manifest's ({'; '.join(diff)})")
    return cfg


def validated_config(args: argparse.Namespace, world: int) -> Config:
    """The run's config from the command line (or the run being resumed), fully checked; no model is built."""
    from .models.loader import check_model, num_layers

    cfg = config_for_resume(args) if args.resume else config_from_args(args)
    cfg.validate(world_size=world)
    check_model(cfg)
    cfg.validate(world_size=world, num_layers=num_layers(cfg))
    from .comm import default_device
    from .models import attention

    device = getattr(args, "device", None) or default_device(cfg.parallel.backend)
    attention.check(cfg.model.attention, device.split(":")[0])
    if not cfg.output.out:
        cfg.output.out = os.path.join("outputs", time.strftime("run-%Y%m%d-%H%M%S"))
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = validated_config(args, world)
        if args.threads is not None and args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        if args.device is not None:
            args.device = check_device(args.device, cfg.parallel.backend)
        if rank == 0 and not args.resume:
            check_output_dir(cfg.output.out, args.overwrite)
    except ConfigError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    return run(cfg, args)


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
        self.comm = Comm.from_env(device=device, timeout_s=cfg.parallel.timeout_s, backend=cfg.parallel.backend)
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
        import signal

        from . import resume
        from .comm import PeerError
        from .engine import DenoiseState
        from .ring import log
        from .models import loader
        from .output import RunWriter
        from .progress import Progress

        changed = self.cfg.differences(cfg, ignore=("sampling.prompt", "output.out") + RESUMABLE_CHANGES)
        if changed:
            raise ValueError(f"a job's videos share its model and geometry; cannot change {', '.join(changed)}")
        engine, comm, rank, out = self.engine, self.comm, self.rank, cfg.output.out
        t_start = time.perf_counter()
        self.trace.clear()
        writer = progress = state = checkpoint = None
        try:
            engine.set_prompt(cfg.sampling.prompt, cfg.sampling.negative_prompt)
            if comm.is_first:
                if overwrite:
                    clear_run(out)
                if cfg.output.decode and self.vae is None:
                    self.vae = loader.load_vae(cfg, comm.device)
                common = dict(vae=self.vae if cfg.output.decode else None, background=True,
                              queue_blocks=cfg.output.queue_blocks, decode=cfg.output.decode,
                              save_latents=cfg.output.save_latents)
                if not self.causal:
                    state = DenoiseState(cfg, engine.plan, engine.stage.model.out_channels, comm.device)
                if resume_run:
                    meta, tensors = resume.load(out)
                    state.load_checkpoint(meta["engine"], tensors)
                    wt = {k[len("writer."):]: v for k, v in tensors.items() if k.startswith("writer.")}
                    writer = RunWriter.resume(out, state=meta["writer"], tensors=wt, **common)
                    log(0, f"resuming {out} at iteration {state.iteration} ({state.blocks_done} blocks already written)")
                else:
                    writer = RunWriter(out, config=cfg.to_dict(), seed=cfg.sampling.seed,
                                       blocks_total=len(engine.plan.blocks), frames_total=cfg.video.frames,
                                       fps=cfg.video.fps, gop=engine.plan.frames_of_block(len(engine.plan.blocks) - 1),
                                       **common)

                def save_checkpoint(st) -> None:
                    # The engine's state is copied now; the file is written by the writer's thread
                    # once the blocks queued before it are on disk, so denoising does not wait.
                    emeta, etensors = st.to_checkpoint()
                    etensors = {k: v.detach().to("cpu", copy=True) for k, v in etensors.items()}

                    def save(wmeta, wtensors) -> None:
                        tensors = {**etensors, **{f"writer.{k}": v for k, v in wtensors.items()}}
                        resume.save(out, {"engine": emeta, "writer": wmeta, "config": cfg.to_dict(),
                                          "run_id": writer.manifest["created_at"]}, tensors)

                    writer.checkpoint(save)

                checkpoint = None if self.causal else save_checkpoint
                writer.trace = self.trace
                if cfg.output.progress:
                    progress = Progress(engine.plan)
            stats = engine.generate(writer=writer, progress=progress, state=state, checkpoint=checkpoint,
                                    checkpoint_every=cfg.output.checkpoint_every,
                                    should_stop=lambda: bool(self.stop_signal))
            if progress is not None:
                progress.close()
            if stats.stopped:
                signum = self.stop_signal[0] if self.stop_signal else signal.SIGTERM
                name = signal.Signals(signum).name
                if writer is not None and self.causal:
                    writer.finish(complete=False, reason=f"stopped by {name}")
                    log(0, f"stopped by {name}; the chunks finished so far are in {out}")
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
                writer.finish(complete=True)
                resume.remove(out)  # a complete run needs no checkpoint (it can be GBs)
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
                                   float(stats.send_buffer_bytes)])
        if self.trace.enabled:
            self._write_trace(out)
        if rank == 0:
            self._summary(cfg, loop, time.perf_counter() - t_start)
        return 0

    def _write_trace(self, out: str) -> None:
        import json

        from .output import atomic_write
        from .trace import chrome_trace

        per_rank = [json.loads(b) for b in self.comm.gather_bytes(self.trace.to_json())]
        if self.rank == 0:
            atomic_write(out, "trace.json", json.dumps(chrome_trace(per_rank)).encode())

    def _summary(self, cfg: Config, loop: list[list[float]], total: float) -> None:
        from .ring import log

        out, frames = cfg.output.out, cfg.video.frames
        per_rank = [
            {"rank": r, "loop_s": wall, "busy_s": comp, "wait_s": wait, "bytes_sent": int(sent),
             "messages_sent": int(msgs), "send_buffers_mb": sbuf / 2**20, "peak_rss_mb": rss, "peak_cuda_mb": cuda,
             "kv_cache_mb": kv / 2**20}
            for r, (wall, comp, wait, sent, rss, cuda, kv, msgs, sbuf) in enumerate(loop)
        ]
        for r in per_rank:
            log(0, f"rank {r['rank']}: busy {r['busy_s'] / max(r['loop_s'], 1e-9):.0%}, "
                   f"waiting {r['wait_s']:.1f} s, sent {r['bytes_sent'] / 1e6:.1f} MB, peak RSS {r['peak_rss_mb']:.0f} MB")
        write_stats(out, {"world_size": self.comm.world, "frames": frames, "total_s": total,
                          "loop_s": max(r["loop_s"] for r in per_rank), "ranks": per_rank})
        if cfg.sampling.mode == "causal":
            log(0, f"KV caches: {sum(r['kv_cache_mb'] for r in per_rank):.1f} MB over all ranks "
                   f"(policy {cfg.causal.policy})")
        log(0, f"done: {frames} frames in {total:.1f} s ({frames / total:.1f} frames/s end to end; "
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


def run(cfg: Config, args: argparse.Namespace) -> int:
    """The torchrun / python entry: one job, one video; failures end the process."""
    from .comm import CommError, PeerError
    from .ring import log

    job = None
    rank = int(os.environ.get("RANK", "0"))
    try:
        job = Job(cfg, device=args.device, threads=args.threads, trace=args.trace)
        job.install_signal_handlers()
        code = job.generate(cfg, resume_run=bool(args.resume), overwrite=args.overwrite)
    except BaseException as e:
        log(rank, f"error: {'interrupted' if isinstance(e, KeyboardInterrupt) else describe(e)}"
                  + (f"; what was written stays in {cfg.output.out}" if rank == 0 else ""))
        if not isinstance(e, (PeerError, CommError, KeyboardInterrupt)):
            import traceback

            traceback.print_exc()
        if job is not None:
            try:  # drop what a lost peer will never match; never wait for it
                job.close(abort=True)
            except Exception as ce:
                log(rank, f"process group abort: {ce}")
        sys.stderr.flush()
        os._exit(1)  # peers may be gone: do not wait for them in process-group teardown
    try:
        # After a stop, receives posted ahead stay unmatched: abort the group rather than wait for them.
        job.close(abort=code != 0)
    except PeerError as e:
        log(rank, str(e))
    return code
