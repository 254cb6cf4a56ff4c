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
    "prompt": ("sampling.prompt", str, "text prompt"),
    "negative_prompt": ("sampling.negative_prompt", str, "negative prompt for guidance"),
    "steps": ("sampling.steps", int, "denoising steps per block"),
    "scheduler": ("sampling.scheduler", str, "unipc or euler"),
    "flow_shift": ("sampling.flow_shift", float, "flow-matching timestep shift"),
    "guidance": ("sampling.guidance", float, "classifier-free guidance scale (<= 1: off)"),
    "seed": ("sampling.seed", int, "noise seed"),
    "block": ("parallel.block", int, "latent frames per block"),
    "num_cat": ("parallel.num_cat", int, "context latent frames per neighbour"),
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
    p.add_argument("--config", help="YAML config file (sections: model, video, sampling, parallel, output)")
    for flag, (key, typ, help_) in _FLAGS.items():
        p.add_argument("--" + flag.replace("_", "-"), dest=flag, type=typ, help=f"{help_} [{key}]")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config key (YAML value syntax), repeatable")
    p.add_argument("--no-decode", action="store_true", help="skip VAE decode and MP4; write latents and manifest")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--device", help="torch device for this rank (default: cuda:LOCAL_RANK if available, else cpu)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per rank (default 1: ranks share the cores)")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    import yaml

    cfg = load_config(args.config)
    for item in args.set:
        key, eq, raw = item.partition("=")
        if not eq:
            raise ConfigError(f"--set expects SECTION.KEY=VALUE, got '{item}'")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"--set {key}: cannot parse value '{raw}'") from None
        cfg.set(key.strip(), value, source="--set")
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
    """Refuse to mix two runs in one directory, or to start when it cannot be written."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"--out {path} exists and is not a directory")
    if os.path.exists(os.path.join(path, "manifest.json")) and not overwrite:
        raise ConfigError(f"--out {path} already holds a run (manifest.json); choose another --out or pass --overwrite")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent) or "."
    if not os.access(parent, os.W_OK):
        raise ConfigError(f"--out {path} is not writable")


def clear_run(path: str) -> None:
    """Remove a previous run's files (only those the engine writes) from ``path``."""
    import shutil

    for name in ("manifest.json", "video.mp4", "stats.json"):
        p = os.path.join(path, name)
        if os.path.isfile(p):
            os.remove(p)
    shutil.rmtree(os.path.join(path, "latents"), ignore_errors=True)


def write_stats(out: str, stats: dict) -> None:
    """Timing of the run, for benchmarks: ``stats.json`` beside the manifest."""
    import json

    from .output import atomic_write

    atomic_write(out, "stats.json", (json.dumps(stats, indent=2) + "\n").encode())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        cfg = config_from_args(args)
        from .models.loader import check_model, num_layers

        cfg.validate(world_size=world)
        check_model(cfg)
        cfg.validate(world_size=world, num_layers=num_layers(cfg))
        if args.threads is not None and args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        if not cfg.output.out:
            cfg.output.out = os.path.join("outputs", time.strftime("run-%Y%m%d-%H%M%S"))
        if rank == 0:
            check_output_dir(cfg.output.out, args.overwrite)
    except ConfigError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    return run(cfg, args)


def run(cfg: Config, args: argparse.Namespace) -> int:
    import torch

    from .comm import Comm
    from .engine import Engine, log
    from .progress import Progress

    torch.set_num_threads(args.threads or 1)
    comm = Comm.from_env(device=args.device)
    rank = comm.rank
    t_start = time.perf_counter()
    engine = Engine(cfg, comm)
    engine.set_prompt(cfg.sampling.prompt, cfg.sampling.negative_prompt)
    first, last = engine.plan.layers[rank]
    log(rank, f"layers [{first}, {last}) of {engine.plan.layers[-1][1]} on {comm.device}; "
              f"{len(engine.plan.blocks)} blocks x {cfg.sampling.steps} steps")
    writer = progress = None
    if comm.is_first:
        if args.overwrite:
            clear_run(cfg.output.out)
        from .output import RunWriter
        from .models import loader

        writer = RunWriter(
            cfg.output.out,
            vae=loader.load_vae(cfg, comm.device) if cfg.output.decode else None,
            config=cfg.to_dict(),
            seed=cfg.sampling.seed,
            blocks_total=len(engine.plan.blocks),
            frames_total=cfg.video.frames,
            fps=cfg.video.fps,
            gop=engine.plan.frames_of_block(len(engine.plan.blocks) - 1),
            save_latents=cfg.output.save_latents,
            decode=cfg.output.decode,
            background=True,
            queue_blocks=cfg.output.queue_blocks,
        )
        if cfg.output.progress:
            progress = Progress(engine.plan)
    try:
        stats = engine.generate(writer=writer, progress=progress)
        if writer is not None:
            writer.finish(complete=True)
    except BaseException as e:
        if writer is not None:
            writer.finish(complete=False, reason=f"{type(e).__name__}: {e}")
        raise
    finally:
        if progress is not None:
            progress.close()
    loop = comm.gather_floats([stats.wall_s, stats.compute_s, stats.wait_s, float(stats.bytes_sent)])
    comm.close()
    if rank == 0:
        total = time.perf_counter() - t_start
        loop_s = max(r[0] for r in loop)
        frames = cfg.video.frames
        per_rank = [
            {"rank": r, "loop_s": wall, "busy_s": comp, "wait_s": wait, "bytes_sent": int(sent)}
            for r, (wall, comp, wait, sent) in enumerate(loop)
        ]
        for r in per_rank:
            log(0, f"rank {r['rank']}: busy {r['busy_s'] / max(r['loop_s'], 1e-9):.0%}, "
                   f"waiting {r['wait_s']:.1f} s, sent {r['bytes_sent'] / 1e6:.1f} MB")
        write_stats(cfg.output.out, {"world_size": comm.world, "frames": frames, "total_s": total,
                                     "loop_s": loop_s, "ranks": per_rank})
        log(0, f"done: {frames} frames in {total:.1f} s ({frames / total:.1f} frames/s end to end; "
               f"denoising loop {loop_s:.1f} s) -> {os.path.join(cfg.output.out, 'video.mp4' if cfg.output.decode else 'latents')}")
    return 0
