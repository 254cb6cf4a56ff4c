"""Ray entry point: M pipelines of N actors each run the same per-rank :class:`~dualpar.job.Job`.

    python launch/ray_job.py --world-size 2 --frames 1025 --out /shared/run
    python launch/ray_job.py --address auto --world-size 8 --replicas auto --prompts prompts.jsonl --out /shared/batch

A pipeline is N actors in a placement group of its own (packed on one node when it fits). Its
rank 0's actor names a rendezvous address and a free port; every actor sets the torchrun-style
environment (RANK, WORLD_SIZE, MASTER_ADDR, ...) and builds the same engine as ``launch/gen.py``
(NCCL with one GPU per actor when the cluster has GPUs, gloo on CPUs otherwise), once per model
and geometry, and keeps it for the next video.

The driver validates the whole batch before any actor starts (:mod:`batch`), then hands the next
video of one queue to whichever pipeline is free. When an actor dies (or a rank fails) the
pipeline is torn down and placed again, and its video goes back to the head of the queue: the
next pipeline to take it resumes it from its last checkpoint. A video that fails ``--attempts``
times is marked failed and the batch goes on. Running the same command again skips the videos
whose manifest says complete and resumes the others, so the driver itself may be killed.
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import socket
import sys
import time

from . import batch
from .cli import ConfigError, build_parser, check_output_dir, check_runtime, probe_output_dir, validated_config
from .output import rundir
from .progress import BatchProgress

OBJECT_STORE_BYTES = 128 * 2**20  # only small messages go through Ray: keep a local instance lean
PLACE_TIMEOUT_S = 300.0
"""How long the first pipeline may wait for the cluster to place its actors."""
PREPARE_AHEAD = 8
"""Prompts of the next videos encoded along with a video's own (one text-encoder load for several;
rank 0 keeps every encoded prompt on the host)."""
LOCK_WAIT_S = 60.0
"""How long a video's directory may stay locked by a process that is going away (a killed
pipeline's output rank, a stopped driver's actors) before the attempt counts as failed."""


def parse(argv):
    p = build_parser(local_launch=False)
    p.prog = "ray_job.py"
    p.description = "Run the engine as Ray actors: M pipelines of N ranks (same options as launch/gen.py)."
    p.add_argument("--world-size", type=int, required=True, help="ranks (actors) per pipeline")
    p.add_argument("--replicas", default="1",
                   help="independent pipelines, each --world-size actors in a placement group of its own, taking "
                        "videos from one queue; 'auto': as many as the cluster's GPUs (its CPUs when it has "
                        "none) hold (default 1)")
    p.add_argument("--attempts", type=int, default=3,
                   help="starts per video before it is marked failed; each retry resumes from the video's last "
                        "checkpoint on a rebuilt or another pipeline (default 3)")
    p.add_argument("--address", help="Ray cluster to join ('auto' or host:port); default: start a local instance")
    p.add_argument("--prompts", help="prompts file, one video per line: plain text, or JSON with prompt, seed, "
                                     "frames, out and any SECTION.KEY; the same command run again skips complete "
                                     "videos and resumes the others")
    return p.parse_args(argv)


def parse_replicas(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= 4096:
        raise ConfigError(f"--replicas must be a number of pipelines in [1, 4096] or 'auto', got {text!r}")
    return value


class RankActor:
    """One rank of one pipeline: joins its process group and keeps its engine for every video of
    the same model and geometry it is given."""

    def __init__(self, pipeline: int, rank: int, world: int):
        self.pipeline, self.rank, self.world = pipeline, rank, world
        self.job = None

    def __repr__(self) -> str:  # Ray's prefix of this actor's forwarded log lines
        return f"pipeline {self.pipeline} rank {self.rank}"

    def rendezvous(self, local: bool) -> tuple[str, int]:
        """Rank 0's address and a free port for the process group."""
        import ray

        host = "127.0.0.1" if local else ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            return host, s.getsockname()[1]

    def pid(self) -> int:
        return os.getpid()

    def video(self, cfg_dict: dict, join: tuple | None, upcoming: list[dict], options: dict) -> None:
        """Make one video. ``join``: ``(addr, port)`` when the pipeline's job is to be built (first
        video, or another model or geometry); None: the job stays. ``upcoming``: configs of this and
        the next videos, whose prompts rank 0 encodes with one text-encoder load when this one's is new."""
        from .config import Config
        from .job import Job

        cfg = Config.from_dict(cfg_dict)
        try:
            if join is not None:
                if self.job is not None:
                    self.job.close()
                    self.job = None
                addr, port = join
                os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world), LOCAL_RANK="0",
                                  LOCAL_WORLD_SIZE="1", MASTER_ADDR=addr, MASTER_PORT=str(port))
                self.job = Job(cfg, device=options.get("device"), threads=options.get("threads"),
                               trace=options.get("trace", False))
            self.job.prepare([Config.from_dict(d) for d in upcoming])
            code = self.job.generate(cfg, resume_run=options["resume"], overwrite=options["overwrite"])
            if code:
                raise RuntimeError(f"rank {self.rank}: stopped with status {code}")
        except BaseException:
            if self.job is not None:
                self.job.close(abort=True)
                self.job = None
            raise


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    n = args.world_size
    try:
        if n < 1:
            raise ConfigError(f"--world-size must be >= 1, got {n}")
        if not 1 <= args.attempts <= 100:
            raise ConfigError(f"--attempts must be in [1, 100], got {args.attempts}")
        replicas = parse_replicas(args.replicas)
        cfg = validated_config(args, n)
        root = ""
        if args.prompts:
            if args.resume:
                raise ConfigError("--resume continues one run; a batch (--prompts) resumes its unfinished videos "
                                  "when the same command runs again")
            root = cfg.output.out
            batch.check_root(root)
            videos = batch.read_prompts(args.prompts, cfg, n, root)
            starts = [batch.existing(v, args.overwrite) for v in videos]
        else:
            videos = [batch.Video(0, 0, cfg)]
            if not args.resume:
                check_output_dir(cfg.output.out, args.overwrite)
            starts = ["resume" if args.resume else "restart" if args.overwrite else "new"]
        firsts: dict[str, object] = {}
        for v in videos:
            firsts.setdefault(batch.job_key(v.cfg), v.cfg)
        for first in firsts.values():  # each model and geometry once
            check_runtime(first, n, args.device)
        held = wait_unlocked([v for v, s in zip(videos, starts) if s != "complete"], LOCK_WAIT_S / 2)
        if held:
            v, pid = held[0]
            raise ConfigError(f"{v.where()}: {v.out} is in use by a running run (pid {pid}); stop it first")
        if root:
            probe_output_dir(root)
        for v, s in zip(videos, starts):
            if s == "new":
                probe_output_dir(v.out)
        try:
            import ray
        except ImportError:
            raise ConfigError("Ray is not installed: pip install -e '.[ray]'") from None
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for v in videos:
        v.cfg.output.out = os.path.abspath(v.out)
    return drive(ray, args, videos, starts, os.path.abspath(root) if root else "", replicas)


def wait_unlocked(videos: list, timeout: float) -> list:
    """``(video, pid)`` for the videos whose directory a live process still holds after ``timeout``
    seconds (a stopped driver's actors take a moment to go)."""
    end = time.time() + timeout
    while True:
        held = [(v, pid) for v in videos if (pid := rundir.holder(v.out)) is not None]
        if not held or time.time() >= end:
            return held
        time.sleep(0.5)


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


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Pipeline:
    """One pipeline: N actors in a placement group of its own, making one video at a time. After a
    failure it is torn down and placed again (:meth:`rebuild`)."""

    def __init__(self, ray, index: int, world: int, gpus: bool, local: bool):
        self.ray, self.index, self.world, self.gpus, self.local = ray, index, world, gpus, local
        self.builds = 0
        self.video = None
        self._place()

    def _place(self) -> None:
        from ray.util.placement_group import placement_group

        bundle = {"CPU": 1, "GPU": 1} if self.gpus else {"CPU": 1}
        self.pg = placement_group([bundle] * self.world, strategy="PACK")
        self.ready_ref = self.pg.ready()
        self.actors, self.key, self.refs = None, None, {}
        self.builds += 1

    def placed(self) -> bool:
        """Whether the actors are up (creates them once the placement group is ready; never blocks long)."""
        if self.actors is not None:
            return True
        if not self.ray.wait([self.ready_ref], timeout=0)[0]:
            return False
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        Actor = self.ray.remote(num_cpus=1, num_gpus=1 if self.gpus else 0, max_restarts=0)(RankActor)
        self.actors = [Actor.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
            self.pg, placement_group_bundle_index=r)).remote(self.index, r, self.world) for r in range(self.world)]
        pids = self.ray.get([a.pid.remote() for a in self.actors])
        again = f" (placed again, build {self.builds})" if self.builds > 1 else ""
        say(f"[pipeline {self.index}] {self.world} actor(s) on {'GPU' if self.gpus else 'CPU'}{again}: "
            + ", ".join(f"rank {r}: pid {p}" for r, p in enumerate(pids)))
        return True

    def start(self, video: batch.Video, how: batch.Start, upcoming: list, options: dict) -> None:
        """Hand ``video`` to every rank; ``upcoming``: configs of it and the next videos of its model
        and geometry (their prompts are encoded with one text-encoder load)."""
        key = batch.job_key(video.cfg)
        join = None
        if key != self.key:
            addr, port = self.ray.get(self.actors[0].rendezvous.remote(self.local))
            join = (addr, port)
            self.key = key
        cfg = video.cfg.to_dict()
        cfg["output"]["progress"] = False  # the driver draws the batch's one bar
        run = dict(options, resume=how == "resume", overwrite=how == "restart")
        ahead = [c.to_dict() for c in upcoming]
        self.refs = {a.video.remote(cfg, join, ahead, run): r for r, a in enumerate(self.actors)}
        self.video, self.started, self.failure, self.deadline = video, time.time(), None, None

    def poll(self) -> tuple[bool, str] | None:
        """``(ok, reason)`` once the video has ended on every rank, else None. A failure gives the
        survivors a moment to record it in the manifest, then ends them."""
        ray = self.ray
        ready = ray.wait(list(self.refs), num_returns=len(self.refs), timeout=0)[0] if self.refs else []
        for ref in ready:
            rank = self.refs.pop(ref)
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError as e:
                self.failure = self.failure or f"rank {rank}'s actor died ({type(e).__name__})"
            except ray.exceptions.RayTaskError as e:
                cause = str(e.cause) if getattr(e, "cause", None) is not None else str(e).splitlines()[-1]
                self.failure = self.failure or f"rank {rank} failed: {cause.splitlines()[0] if cause else type(e).__name__}"
        if self.failure and self.deadline is None:
            self.deadline = time.time() + min(self.video.cfg.parallel.timeout_s + 30, 60)
        if self.refs and not (self.deadline is not None and time.time() > self.deadline):
            return None
        self.video = None
        return (self.failure is None), self.failure or ""

    def teardown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for a in self.actors or []:
            self.ray.kill(a)
        remove_placement_group(self.pg)
        self.actors = None

    def rebuild(self) -> None:
        self.teardown()
        self._place()


def auto_replicas(ray, world: int, gpus: bool) -> int:
    res = ray.cluster_resources()
    return int(res.get("GPU", 0) // world if gpus else res.get("CPU", 0) // world)


def drive(ray, args, videos: list, starts: list, root: str, replicas: int | str) -> int:
    n, local = args.world_size, args.address is None
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # no colour codes in a log file
    try:
        if not local:
            reachable(args.address)
        if local:
            # Our own instance: Ray's start-up notices (a fresh token, "started a local instance")
            # are not the user's business; its errors still show.
            cpus = max(n * replicas if isinstance(replicas, int) else n, os.cpu_count() or 1)
            ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES,
                     log_to_driver=True, logging_level=logging.ERROR)
        else:
            ray.init(address=args.address, log_to_driver=True)
    except ConnectionError as e:
        say(f"error: cannot join the Ray cluster at {args.address}: {e} (a cluster with token authentication "
            "also needs RAY_AUTH_MODE=token and its token: see the README)")
        return 1
    gpus = ray.cluster_resources().get("GPU", 0) >= n
    record = batch.Record(root, videos)
    queue = collections.deque()
    for v, how in zip(videos, starts):
        if how == "complete":
            record.skipped(v.index, v.cfg.video.frames)
            say(f"[driver] video {v.index} ({v.where()}): already complete in {v.out}; skipped")
        else:
            queue.append((v, how))
    record.save()
    m = auto_replicas(ray, n, gpus) if replicas == "auto" else replicas
    if m < 1:
        say(f"error: the cluster's {'GPUs' if gpus else 'CPUs'} cannot hold one pipeline of {n} rank(s)")
        ray.shutdown()
        return 1
    m = min(m, len(queue))  # a pipeline with nothing to do would only hold resources
    say(f"[driver] {len(queue)} of {len(videos)} video(s) to make on {m} pipeline(s) of {n} rank(s)"
        + (f"; batch.json in {root}" if root else "") if queue else "[driver] every video is complete already")
    options = dict(device=args.device, threads=args.threads, trace=args.trace)
    pipes: list[Pipeline] = []
    progress = None
    stopped: list[int] = []

    def on_signal(signum, frame):
        stopped.append(signum)
        raise KeyboardInterrupt

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        pipes = [Pipeline(ray, i, n, gpus, local) for i in range(m)]
        if videos[0].cfg.output.progress:
            progress = BatchProgress([v.out for v in videos], [v.cfg.video.frames for v in videos])
        run_queue(ray, pipes, queue, record, args.attempts, options, progress)
    except KeyboardInterrupt:
        name = signal.Signals(stopped[0]).name if stopped else "SIGINT"
        if progress is not None:
            progress.close()
            progress = None
        say(f"[driver] stopped by {name}; the same command again skips the complete videos and resumes the rest")
        return 128 + (stopped[0] if stopped else signal.SIGINT)
    except PlacementTimeout as e:
        say(f"error: {e}")
        return 1
    finally:
        for s, h in old_handlers.items():
            signal.signal(s, h)
        if progress is not None:
            progress.close()
        time.sleep(1.0)  # let the last forwarded log lines reach the driver
        for p in pipes:
            try:
                p.teardown()
            except Exception:  # the cluster is going away with us
                pass
        record.save()
        ray.shutdown()
    return report(videos, record, root)


class PlacementTimeout(RuntimeError):
    pass


def run_queue(ray, pipes: list[Pipeline], queue: collections.deque, record: batch.Record, attempts: int,
              options: dict, progress) -> None:
    """Hand the queue's videos to free pipelines until every video is complete or failed."""
    unplaced_since = time.time()
    held_since: dict[int, float] = {}
    while queue or any(p.video is not None for p in pipes):
        for p in pipes:
            if p.video is not None:
                video = p.video
                outcome = p.poll()
                if outcome is not None:
                    finished(p, video, *outcome, queue, record, attempts)
            if p.video is None and queue and p.placed():
                take(p, queue, record, options, held_since)
        if any(p.actors for p in pipes):
            unplaced_since = time.time()
        elif time.time() - unplaced_since > PLACE_TIMEOUT_S:
            raise PlacementTimeout(f"the cluster cannot place one pipeline of {pipes[0].world} actor(s) within "
                                   f"{PLACE_TIMEOUT_S:.0f} s")
        if progress is not None:
            progress.poll(record.counts(), {i for i, e in enumerate(record.entries) if e["status"] == "running"})
        refs = [r for p in pipes for r in p.refs]
        if refs:
            ray.wait(refs, num_returns=1, timeout=0.5)
        else:
            time.sleep(0.2)


def take(p: Pipeline, queue: collections.deque, record: batch.Record, options: dict, held_since: dict) -> None:
    """Start the first video of the queue whose directory is free on pipeline ``p``."""
    for _ in range(len(queue)):
        video, how = queue.popleft()
        pid = rundir.holder(video.out)
        if pid is None:
            break
        first = held_since.setdefault(video.index, time.time())
        if time.time() - first < LOCK_WAIT_S:
            queue.append((video, how))  # the process holding it is going away: try the others first
            continue
        held_since.pop(video.index)
        entry = record.entries[video.index]
        entry["attempts"] += 1
        record.update(video.index, status="failed", reason=f"{video.out} stays locked by pid {pid}")
        say(f"[driver] video {video.index} ({video.where()}): failed: {video.out} stays locked by pid {pid}")
        return
    else:
        return
    held_since.pop(video.index, None)
    entry = record.entries[video.index]
    if how is None:  # a retry: what the last attempt left decides
        try:
            how = batch.existing(video)
        except ConfigError as e:
            record.update(video.index, status="failed", reason=str(e))
            return
        if how == "complete":  # it failed after its last block was written
            record.update(video.index, status="complete", frames_written=video.cfg.video.frames, reason="")
            return
    key = batch.job_key(video.cfg)
    upcoming = [video.cfg] + [v.cfg for v, _ in queue if batch.job_key(v.cfg) == key][:PREPARE_AHEAD]
    entry["attempts"] += 1
    record.update(video.index, status="running", pipeline=p.index)
    verb = {"new": "started", "restart": "started again from the beginning", "resume": "resumed at its checkpoint"}
    say(f"[pipeline {p.index}] video {video.index} ({video.where()}) {verb[how]}, attempt {entry['attempts']}: "
        f"{video.cfg.sampling.prompt!r} -> {video.out}")
    p.start(video, how, upcoming, options)


def finished(p: Pipeline, video: batch.Video, ok: bool, reason: str, queue: collections.deque, record: batch.Record,
             attempts: int) -> None:
    entry = record.entries[video.index]
    wall = time.time() - p.started
    written = rundir.read_frames_made(video.out)
    left = attempts - entry["attempts"]
    status = "complete" if ok else "pending" if left > 0 else "failed"
    record.update(video.index, status=status, wall_s=round(entry["wall_s"] + wall, 2), frames_written=written,
                  reason="" if ok else reason)
    where = f"[pipeline {p.index}] video {video.index} ({video.where()})"
    if ok:
        say(f"{where} complete in {wall:.1f} s ({video.cfg.video.frames} frames)")
        return
    p.rebuild()  # a lost actor or a failed rank leaves no usable process group
    if status == "pending":
        queue.appendleft((video, None))  # the head of the queue: the next free pipeline takes it
        say(f"{where} failed after {wall:.1f} s: {reason}; {written} frames kept, {left} attempt(s) left; "
            "the pipeline is placed again")
    else:
        say(f"{where} failed after {entry['attempts']} attempt(s): {reason}")


def report(videos: list, record: batch.Record, root: str) -> int:
    """The batch's end: a table (several videos), where each video is, exit status 0 when all are complete."""
    failed = [e for e in record.entries if e["status"] != "complete"]
    if root:
        say("[driver] batch:\n" + record.table())
        say(f"[driver] {len(videos) - len(failed)} of {len(videos)} video(s) complete; {os.path.join(root, batch.BATCH_FILE)}")
    else:
        v = videos[0]
        if not failed:
            say(f"[driver] done: {os.path.join(v.out, rundir.VIDEO if v.cfg.output.decode else rundir.MANIFEST)}")
    for e in failed:
        say(f"error: {e['reason'] or 'not made'}; what was written stays in {e['out']}")
    return 1 if failed else 0
