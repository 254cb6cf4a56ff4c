"""Command line of ``launch/gen.py``: parse, validate (before anything heavy), run one :class:`~dualpar.job.Job`."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from .config import RESUMABLE_CHANGES, Config, ConfigError, load_config
from .output import rundir

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


def check_output_dir(path: str, overwrite: bool) -> None:
    """Refuse to mix two runs in one directory, to touch anything that is not a run's, to take over
    a live run, or to start when the directory cannot be written."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--out {path} exists and is not a directory")
    pid = rundir.holder(path)
    if pid is not None:
        raise ConfigError(f"--out {path} is in use by a running run (pid {pid})")
    others = rundir.foreign(path)
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise ConfigError(f"--out {path} holds files that are not a run's ({shown}); nothing is overwritten "
                          "there: choose an empty or new directory")
    if os.path.exists(os.path.join(path, rundir.MANIFEST)) and not overwrite:
        raise ConfigError(f"--out {path} already holds a run ({rundir.MANIFEST}); continue it with --resume {path}, "
                          "choose another --out, or pass --overwrite")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ConfigError(f"--out {path}: {parent} is a file, not a directory")
    # Try it: os.access says yes to root even where nothing can be written (e.g. /proc).
    created = not os.path.exists(path)
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".dualpar-probe-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        if created and os.path.isdir(path):
            os.rmdir(path)
        raise ConfigError(f"--out {path} is not writable ({e.strerror or e})") from None


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


def config_for_resume(args: argparse.Namespace) -> Config:
    """The interrupted run's config (its manifest), with any options given now checked against it."""
    import json

    from . import checkpoint

    pid = rundir.holder(args.resume)
    if pid is not None:
        raise ConfigError(f"--resume {args.resume}: the run is still going (pid {pid}); stop it first (SIGTERM "
                          "stops it at the next iteration boundary with a checkpoint)")
    man_path = os.path.join(args.resume, rundir.MANIFEST)
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
    if not os.path.isfile(os.path.join(args.resume, checkpoint.FILE)):
        raise ConfigError(f"--resume {args.resume}: no checkpoint yet (the run stopped before its first one); "
                          "start it again instead")
    try:
        meta = checkpoint.read_meta(args.resume)
    except checkpoint.ResumeError as e:
        raise ConfigError(str(e)) from None
    if meta.get("run_id") != manifest.get("created_at"):
        raise ConfigError(f"--resume {args.resume}: {checkpoint.FILE} belongs to another run than manifest.json")
    from . import schedule

    blocks = len(schedule.split_blocks(cfg.video.latent_frames, cfg.parallel.block))
    last = schedule.num_iterations(blocks, cfg.sampling.steps)
    it = (meta.get("engine") or {}).get("iteration")
    if not isinstance(it, int) or not 0 < it < last:
        raise ConfigError(f"--resume {args.resume}: {checkpoint.FILE} says iteration {it!r}, not in [1, {last}) "
                          "for this run; the file is damaged or was edited")
    diff = base.differences(Config.from_dict(meta["config"]), ignore=RESUMABLE_CHANGES)
    if diff:
        raise ConfigError(f"--resume {args.resume}: the checkpoint's config differs from the manifest's ({'; '.join(diff)})")
    return cfg


def validated_config(args: argparse.Namespace, world: int) -> Config:
    """The run's config from the command line (or the run being resumed), fully checked; no model is built."""
    from .models.loader import check_model, num_layers

    if args.resume and args.overwrite:
        raise ConfigError("--resume continues the run in DIR; --overwrite would delete it first. Drop --overwrite")
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
    # One spelling of the directory from here on ("a/x/../run" is "a/run"), for every check and file.
    cfg.output.out = os.path.normpath(cfg.output.out)
    return cfg


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = validated_config(args, world)
        if args.threads is not None and not 1 <= args.threads <= 1024:
            raise ConfigError(f"--threads must be in [1, 1024], got {args.threads}")
        if args.device is not None:
            args.device = check_device(args.device, cfg.parallel.backend)
        if rank == 0 and not args.resume:
            check_output_dir(cfg.output.out, args.overwrite)
    except ConfigError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    return run(cfg, args)


def run(cfg: Config, args: argparse.Namespace) -> int:
    """The torchrun / python entry: one job, one video; failures end the process."""
    from .comm import CommError, PeerError
    from .job import Job, describe
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
