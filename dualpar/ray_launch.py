"""Ray entry point: N actors in a placement group run the same per-rank :class:`~dualpar.job.Job`.

    python launch/ray_job.py --world-size 2 --frames 1025 --out /shared/run
    python launch/ray_job.py --world-size 8 --address auto --prompts prompts.txt --out /shared/batch

Rank 0's actor names the rendezvous address and a free port; every actor sets
the torchrun-style environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) and builds
the same engine as ``launch/gen.py`` (NCCL with one GPU per actor when the
cluster has GPUs, gloo on CPUs otherwise). The driver validates everything
before any actor starts, forwards the actors' logs, and fails the job with a
message naming the rank when an actor dies.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import sys
import time

from .cli import ConfigError, build_parser, check_output_dir, check_runtime, probe_output_dir, validated_config
from .progress import BatchProgress

OBJECT_STORE_BYTES = 128 * 2**20  # only small messages go through Ray: keep a local instance lean


def parse(argv):
    p = build_parser(local_launch=False)
    p.prog = "ray_job.py"
    p.description = "Run the engine as N Ray actors (same options as launch/gen.py)."
    p.add_argument("--world-size", type=int, required=True, help="number of ranks (actors)")
    p.add_argument("--address", help="Ray cluster to join ('auto' or host:port); default: start a local instance")
    p.add_argument("--prompts", help="file with one prompt per line: one video per prompt, model loaded once")
    return p.parse_args(argv)


def read_prompts(path: str, cfg, world: int) -> list[str]:
    """The prompts of a ``--prompts`` file (one per line; blank lines and ``#`` lines skipped), each
    checked as ``--prompt`` would be with ``cfg`` before anything starts."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(f"--prompts {path}: {e.strerror or e}") from None
    prompts = []
    for n, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ConfigError(f"--prompts {path} line {n}: not UTF-8 text") from None
        if not line or line.startswith("#"):
            continue
        video = copy.deepcopy(cfg)
        video.sampling.prompt = line
        try:
            video.validate(world_size=world)
        except ConfigError as e:
            raise ConfigError(f"--prompts {path} line {n}: {e}") from None
        prompts.append(line)
    if not prompts:
        raise ConfigError(f"--prompts {path}: no prompts in the file")
    return prompts


def plan_videos(cfg, prompts: list[str] | None) -> list[tuple[str, str]]:
    """(prompt, output directory) per video; several prompts go to numbered subdirectories."""
    if not prompts:
        return [(cfg.sampling.prompt, cfg.output.out)]
    return [(p, os.path.join(cfg.output.out, f"prompt-{i:03d}")) for i, p in enumerate(prompts)]


class RankActor:
    """One rank: joins the process group and keeps its engine for every video it is given."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def rendezvous(self, local: bool) -> tuple[str, int]:
        """Rank 0's address and a free port for the process group."""
        import ray

        host = "127.0.0.1" if local else ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            return host, s.getsockname()[1]

    def pid(self) -> int:
        return os.getpid()

    def run(self, cfg_dict: dict, addr: str, port: int, videos: list, options: dict) -> list[str]:
        from .job import Job
        from .config import Config

        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world), LOCAL_RANK="0",
                          LOCAL_WORLD_SIZE="1", MASTER_ADDR=addr, MASTER_PORT=str(port))
        cfg = Config.from_dict(cfg_dict)
        job = Job(cfg, device=options.get("device"), threads=options.get("threads"), trace=options.get("trace", False))
        done = []
        try:
            cfgs = []
            for prompt, out in videos:
                vcfg = copy.deepcopy(cfg)
                vcfg.sampling.prompt, vcfg.output.out = prompt, out
                cfgs.append(vcfg)
            job.prepare(cfgs)  # every prompt encoded with one load of the text encoder
            for vcfg in cfgs:
                out = vcfg.output.out
                code = job.generate(vcfg, resume_run=options.get("resume", False), overwrite=options.get("overwrite"))
                if code:
                    raise RuntimeError(f"rank {self.rank}: stopped with status {code}")
                done.append(out)
        except BaseException:
            job.close(abort=True)
            raise
        job.close()
        return done


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    n = args.world_size
    try:
        if n < 1:
            raise ConfigError(f"--world-size must be >= 1, got {n}")
        cfg = validated_config(args, n)
        prompts = read_prompts(args.prompts, cfg, n) if args.prompts else None
        if prompts and args.resume:
            raise ConfigError("--resume continues one run; it cannot be combined with --prompts")
        videos = plan_videos(cfg, prompts)
        if not args.resume:
            for _, out in videos:
                check_output_dir(out, args.overwrite)
        check_runtime(cfg, n, args.device)
        if not args.resume:
            for _, out in videos:
                probe_output_dir(out)
        try:
            import ray
        except ImportError:
            raise ConfigError("Ray is not installed: pip install -e '.[ray]'") from None
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg.output.out = os.path.abspath(cfg.output.out)
    videos = [(p, os.path.abspath(o)) for p, o in videos]
    return drive(ray, cfg, args, videos)


CONNECT_TIMEOUT_S = 10.0


def reachable(address: str) -> None:
    """ConnectionError within CONNECT_TIMEOUT_S unless something listens at a ``host:port`` address
    (``ray.init`` itself retries an unreachable one for minutes); ``auto`` is left to Ray."""
    host, colon, port = address.rpartition("://")[2].rpartition(":")
    if not colon or not port.isascii() or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ConnectionError(f"nothing answers at {host}:{port} ({e.strerror or e})") from None


def drive(ray, cfg, args, videos) -> int:
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    n, local = args.world_size, args.address is None
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # no colour codes in a log file
    try:
        if not local:
            reachable(args.address)
        if local:
            # Our own instance: Ray's start-up notices (a fresh token, "started a local instance")
            # are not the user's business; its errors still show.
            ray.init(num_cpus=max(n, os.cpu_count() or 1), include_dashboard=False,
                     object_store_memory=OBJECT_STORE_BYTES, log_to_driver=True, logging_level=logging.ERROR)
        else:
            ray.init(address=args.address, log_to_driver=True)
    except ConnectionError as e:
        print(f"error: cannot join the Ray cluster at {args.address}: {e} (a cluster with token authentication "
              "also needs RAY_AUTH_MODE=token and its token: see the README)", file=sys.stderr)
        return 1
    gpus = ray.cluster_resources().get("GPU", 0) >= n
    bundle = {"CPU": 1, "GPU": 1} if gpus else {"CPU": 1}
    pg = placement_group([bundle] * n, strategy="PACK")
    try:
        ray.get(pg.ready(), timeout=300)
    except ray.exceptions.GetTimeoutError:
        print(f"error: the cluster cannot place {n} actors of {bundle} within 300 s", file=sys.stderr)
        return 1
    Actor = ray.remote(num_cpus=1, num_gpus=1 if gpus else 0, max_restarts=0)(RankActor)
    actors = [
        Actor.options(scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r))
        .remote(r, n)
        for r in range(n)
    ]
    addr, port = ray.get(actors[0].rendezvous.remote(local))
    pids = ray.get([a.pid.remote() for a in actors])
    print("[driver] " + ", ".join(f"rank {r}: pid {p}" for r, p in enumerate(pids)), file=sys.stderr, flush=True)
    options = dict(device=args.device, threads=args.threads, resume=bool(args.resume), overwrite=args.overwrite,
                   trace=args.trace)
    actor_cfg = cfg.to_dict()
    actor_cfg["output"]["progress"] = False  # the driver draws the job's one bar
    runs = {actors[r].run.remote(actor_cfg, addr, port, videos, options): r for r in range(n)}
    print(f"[driver] {n} actors ({'GPU' if gpus else 'CPU'}), rendezvous {addr}:{port}, "
          f"{len(videos)} video(s)", file=sys.stderr, flush=True)
    progress = BatchProgress([out for _, out in videos], cfg.video.frames) if cfg.output.progress else None
    failed: str | None = None
    deadline = None
    pending = list(runs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=1.0)
        if progress is not None:
            progress.poll()
        for ref in ready:
            rank = runs[ref]
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as e:
                failed = failed or f"rank {rank}'s actor died ({type(e).__name__})"
            except ray.exceptions.RayTaskError as e:
                cause = str(e.cause) if getattr(e, "cause", None) is not None else str(e).splitlines()[-1]
                failed = failed or f"rank {rank} failed: {cause.splitlines()[0] if cause else type(e).__name__}"
        if failed and deadline is None:
            # Survivors notice the loss on their own (closed connection or timeout) and
            # record it in the manifest; give them that long, then stop them.
            deadline = time.time() + cfg.parallel.timeout_s + 30
        if deadline is not None and time.time() > deadline:
            break
    if progress is not None:
        progress.close()
    time.sleep(1.0)  # let the last forwarded log lines reach the driver
    for a in actors:
        ray.kill(a)
    remove_placement_group(pg)
    ray.shutdown()
    if failed:
        print(f"error: {failed}; what was written stays in {cfg.output.out}", file=sys.stderr)
        return 1
    for _, out in videos:
        print(f"[driver] done: {os.path.join(out, 'video.mp4' if cfg.output.decode else 'manifest.json')}",
              file=sys.stderr)
    return 0
