"""Command line of ``launch/gen.py``: parse, validate (before anything heavy), run one :class:`~dualpar.job.Job`,
or start ``--nproc`` local ranks of it.

Validation runs in two phases so that bad input costs no heavy import: first
everything torch is not needed for (options, config file, prompts, launcher
environment, output directory), then what needs torch or the model folder
(the model, the layer split, the attention kernel, ``--device``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from .config import RESUMABLE_CHANGES, Config, ConfigError, check_text, choices, load_config, model_defaults
from .output import rundir

# flag -> (config key, type, help); each flag overrides the config file.
_FLAGS = {
    "frames": ("video.frames", int, "output frames, 4k+1 (1025 = 257 latent frames)"),
    "height": ("video.height", int, "frame height in pixels (multiple of 16)"),
    "width": ("video.width", int, "frame width in pixels (multiple of 16)"),
    "fps": ("video.fps", int, "frame rate of the MP4"),
    "prompt": ("sampling.prompt", str,
               "text prompt; causal mode also takes a schedule 'text | FRAME: text | ...' (\\| is a literal |)"),
    "negative_prompt": ("sampling.negative_prompt", str, "negative prompt for guidance"),
    "steps": ("sampling.steps", int, "denoising steps per block"),
    "scheduler": ("sampling.scheduler", str, "denoising scheduler"),
    "flow_shift": ("sampling.flow_shift", float, "flow-matching timestep shift"),
    "guidance": ("sampling.guidance", float, "classifier-free guidance scale (<= 1: off)"),
    "seed": ("sampling.seed", int, "noise seed"),
    "mode": ("sampling.mode", str, "bidirectional (block-wise DualParal) or causal (chunks with KV caches)"),
    "block": ("parallel.block", int, "latent frames per block"),
    "num_cat": ("parallel.num_cat", int, "context latent frames per neighbour"),
    "cache": ("cache.policy", str, "timestep feature caching: forecast some denoising steps instead of computing them"),
    "cache_level": ("cache.level", str, "feature caching: forecast the whole prediction on rank 0, or each stage's residual"),
    "cache_interval": ("cache.interval", int, "feature caching: compute every N-th step after the warm-up"),
    "chunk": ("causal.chunk", int, "causal mode: latent frames per chunk"),
    "policy": ("causal.policy", str, "causal mode: which committed frames each query frame attends to"),
    "budget": ("causal.budget", float, "causal mode: frames attended per query frame (< 1: fraction of the video)"),
    "preset": ("model.preset", str, "built-in model when --model is not given: tiny (trained on coloured shapes) "
               "or tiny-random (seeded random weights)"),
    "model": ("model.path", str, "local diffusers-format Wan2.1 T2V folder (default: the preset)"),
    "transformer_file": ("model.transformer_file", str, "transformer weights in original Wan naming, replacing the folder's"),
    "dtype": ("model.dtype", str, "compute dtype of the transformer"),
    "out": ("output.out", str, "output directory (default: outputs/run-DATE-TIME)"),
}


def _default(key: str) -> str:
    """``; default X`` for --help, from the config dataclasses (long or empty texts left out)."""
    section, _, name = key.partition(".")
    value = getattr(getattr(Config(), section), name)
    if value == "" or (isinstance(value, str) and len(value) > 40):
        return ""
    return f"; default {value}"


def reports_errors() -> bool:
    """Whether this process prints bad input: rank 0, or a process no launcher started (every rank
    finds the same problem; one line is enough)."""
    return os.environ.get("RANK", "0") == "0"


class _Parser(argparse.ArgumentParser):
    """argparse with the project's bad-input rule: one line ``error: ...`` on stderr (rank 0), exit 2."""

    def error(self, message: str):
        if reports_errors():
            print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser(local_launch: bool = True) -> argparse.ArgumentParser:
    """The options of ``launch/gen.py`` (``local_launch``: with ``--nproc``; Ray's driver has its own)."""
    p = _Parser(
        prog="gen.py",
        description="Block-wise pipelined long-video generation (DualParal) over frame blocks and DiT layers.",
    )
    p.add_argument("--config", help="YAML config file (sections: model, video, sampling, parallel, causal, cache, output)")
    for flag, (key, typ, help_) in _FLAGS.items():
        allowed = choices(key)
        # The allowed values are shown, not enforced here: validation names the config key for
        # flags and config files alike.
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, type=typ,
                       metavar="{" + ",".join(allowed) + "}" if allowed else None,
                       help=f"{help_} [{key}{_default(key)}]")
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
    if local_launch:
        p.add_argument("--nproc", type=int, metavar="N",
                       help="start N ranks on this machine (torch's elastic launcher, as torchrun --standalone "
                            "--nproc-per-node N does); default: one rank, or the ranks a launcher started")
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
    """The run's config: ``base`` (default: the defaults, then the model folder's own defaults), the
    config file, ``--set`` items, then flags."""
    cfg = _from_args(args, base)
    if base is None:  # a resumed run's base already holds what its model's defaults gave
        defaults, source = model_defaults(cfg.model)
        if defaults:
            start = Config()
            start.update(defaults, source=source)
            cfg = _from_args(args, start)
    return cfg


def _from_args(args: argparse.Namespace, base: Config | None) -> Config:
    cfg = load_config(args.config, Config.from_dict(base.to_dict()) if base is not None else None)
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
    """Refuse to mix two runs in one directory, to touch anything that is not a run's, or to take over
    a live run (reads only: :func:`probe_output_dir` writes)."""
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


def probe_output_dir(path: str) -> None:
    """Create ``path`` and write a file there, the last check before a run starts: refuse to start
    when the directory cannot be written."""
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


def check_device(name: str, backend: str = "auto", local_ranks: int | None = None) -> str:
    """The device this rank uses for ``--device name`` (bare ``cuda`` means ``cuda:LOCAL_RANK``);
    ``local_ranks``: the ranks on this machine (default: the launcher's LOCAL_WORLD_SIZE)."""
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
    if local_ranks is None:
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
    if not base.resumable():
        raise ConfigError(f"--resume {args.resume}: runs with feature caching at cache.level=stage or with "
                          "cache.neighbour=reuse take no checkpoints (every rank's caches would have to be in them) "
                          "and cannot be resumed; cache.level=model with cache.neighbour=drop can")
    if args.out is not None and os.path.abspath(args.out) != os.path.abspath(args.resume):
        raise ConfigError("--resume continues the run in its own directory; drop --out")
    cfg = config_from_args(args, Config.from_dict(manifest["config"]))
    diff = base.differences(cfg, ignore=RESUMABLE_CHANGES)
    if diff:
        raise ConfigError(f"--resume {args.resume}: options differ from the run being resumed ({'; '.join(diff)})")
    cfg.output.out = args.resume
    problem = checkpoint_problem(args.resume, manifest)
    if problem:
        raise ConfigError(f"--resume {args.resume}: {problem}")
    return cfg


def checkpoint_problem(out: str, manifest: dict) -> str | None:
    """Why the checkpoint in the run directory ``out`` cannot continue the run ``manifest`` describes
    (None: it can). Reads the checkpoint's JSON part only."""
    from . import checkpoint, schedule

    if not os.path.isfile(os.path.join(out, checkpoint.FILE)):
        return "no checkpoint yet (the run stopped before its first one); start it again instead"
    try:
        meta = checkpoint.read_meta(out)
    except checkpoint.ResumeError as e:
        return str(e).removeprefix(f"--resume {out}: ")
    if meta.get("run_id") != manifest.get("created_at"):
        return f"{checkpoint.FILE} belongs to another run than manifest.json"
    base = Config.from_dict(manifest["config"])
    blocks = len(schedule.split_blocks(base.video.latent_frames, base.parallel.block))
    last = schedule.num_iterations(blocks, base.sampling.steps)
    it = (meta.get("engine") or {}).get("iteration")
    if not isinstance(it, int) or not 0 < it < last:
        return (f"{checkpoint.FILE} says iteration {it!r}, not in [1, {last}) for this run; the file is damaged "
                "or was edited")
    diff = base.differences(Config.from_dict(meta["config"]), ignore=RESUMABLE_CHANGES)
    if diff:
        return f"the checkpoint's config differs from the manifest's ({'; '.join(diff)})"
    return None


def validated_config(args: argparse.Namespace, world: int) -> Config:
    """The run's config from the command line (or the run being resumed), checked as far as it can be
    without torch or the model folder (those checks: :func:`check_runtime`)."""
    if args.resume and args.overwrite:
        raise ConfigError("--resume continues the run in DIR; --overwrite would delete it first. Drop --overwrite")
    cfg = config_for_resume(args) if args.resume else config_from_args(args)
    cfg.validate(world_size=world)
    check_text(cfg.sampling.negative_prompt, "sampling.negative_prompt")
    if args.threads is not None and not 1 <= args.threads <= 1024:
        raise ConfigError(f"--threads must be in [1, 1024], got {args.threads}")
    if not cfg.output.out:
        cfg.output.out = os.path.join("outputs", time.strftime("run-%Y%m%d-%H%M%S"))
    # One spelling of the directory from here on ("a/x/../run" is "a/run"), for every check and file.
    cfg.output.out = os.path.normpath(cfg.output.out)
    return cfg


def check_runtime(cfg: Config, world: int, device: str | None) -> None:
    """The checks that need torch or the model folder, once :func:`validated_config` has passed: the
    model, how many ranks its layers split over, the attention kernel on ``device``."""
    from .models.loader import check_model, head_importance, num_layers

    check_model(cfg)
    cfg.validate(world_size=world, num_layers=num_layers(cfg))
    head_importance(cfg)
    from .comm import default_device
    from .models import attention

    attention.check(cfg.model.attention, (device or default_device(cfg.parallel.backend)).split(":")[0])


def _env_int(env, name: str, default: int) -> int:
    try:
        return int(env.get(name, default))
    except ValueError:
        raise ConfigError(f"{name}={env[name]!r} in the environment is not an integer") from None


def launch_plan(nproc: int | None, env) -> tuple[int, int, bool]:
    """``(rank, world, start_ranks)`` for this process: ``start_ranks`` when it is to start ``--nproc``
    ranks itself. A world of several ranks needs a launcher's environment (torchrun, ``--nproc``,
    Ray's actors): without MASTER_ADDR and MASTER_PORT, torch.distributed would fail or wait long."""
    world, rank = _env_int(env, "WORLD_SIZE", 1), _env_int(env, "RANK", 0)
    if nproc is not None and not 1 <= nproc <= 1024:
        raise ConfigError(f"--nproc must be in [1, 1024], got {nproc}")
    if "WORLD_SIZE" not in env:
        return 0, nproc or 1, bool(nproc and nproc > 1)
    if nproc is not None and nproc != world:
        raise ConfigError(f"--nproc {nproc} starts its own ranks, but a launcher already started {world} "
                          "(WORLD_SIZE); drop --nproc or the launcher")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if world > 1 and missing:
        raise ConfigError(f"WORLD_SIZE={world} but no launcher set up the ranks ({' and '.join(missing)} unset): "
                          f"start them with --nproc {world} (or torchrun --nproc-per-node {world}) instead of "
                          "setting WORLD_SIZE by hand")
    return rank, world, False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        rank, world, start_ranks = launch_plan(args.nproc, os.environ)
        cfg = validated_config(args, world)
        if rank == 0 and not args.resume:
            check_output_dir(cfg.output.out, args.overwrite)
        # From here on torch is imported.
        if args.device is not None:
            args.device = check_device(args.device, cfg.parallel.backend, local_ranks=world if start_ranks else None)
        check_runtime(cfg, world, args.device)
        if rank == 0 and not args.resume:
            probe_output_dir(cfg.output.out)
    except ConfigError as e:
        if reports_errors():
            print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0 and not start_ranks:
        for line in warnings_for(cfg):
            print(f"warning: {line}", file=sys.stderr)
    if start_ranks:
        return start_local_ranks(args.nproc, sys.argv[1:] if argv is None else argv)
    return run(cfg, args)


def warnings_for(cfg: Config) -> list[str]:
    """Valid settings that are probably not what the user meant (the run goes on)."""
    found = []
    s = cfg.sampling
    if s.mode == "causal" and s.guidance > 1 and cfg.model.transformer_file:
        found.append(f"causal mode with --guidance {s.guidance:g} and a --transformer-file: distilled causal "
                     "checkpoints (Self-Forcing, CausVid) run without guidance; pass --guidance 1 unless "
                     "yours was trained with it")
    return found


def start_local_ranks(nproc: int, argv: list[str]) -> int:
    """Run this command line as ``nproc`` ranks on this machine through torch's elastic launcher,
    as ``torchrun --standalone --nproc-per-node nproc`` does, and wait for them. Each rank sees
    ``--nproc`` with the launcher's WORLD_SIZE and runs as one rank. Returns 0 when every rank
    succeeded, else the first failed rank's exit status (128 + N for signal N), or 128 + N when
    signal N stopped the launcher."""
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The launcher's own INFO/WARNING lines would bury the ranks' output; its errors stay.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", "gen.py")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    try:
        elastic_launch(config, sys.executable)(script, *argv)
    except ChildFailedError as e:
        code = e.get_first_failure()[1].exitcode
        return code if code > 0 else 128 - code
    except SignalException as e:  # the launcher passed the signal on to the ranks, which stopped
        return 128 + e.sigval
    return 0


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
