"""KV-cache policies of the causal mode at equal budgets: attention time, cache memory, deviation from the full cache.

    python scripts/bench_causal.py                       # tiny model, 513 frames at 128x128, budget 0.25
    python scripts/bench_causal.py --budgets 0.25,0.5 --json out.json
    python scripts/bench_causal.py --quick               # 61 frames at 32x48, for tests (< 1 min)

In one invocation on one process (one CPU thread), with the same model, seed
and prompt, the sequential causal schedule (one chunk at a time: all steps,
then the commit pass at t = 0) and no classifier-free guidance (guidance 1.0,
as the distilled causal models run), this generates the video once with the
``full`` policy and then, for every budget, with ``window`` (sliding window +
sink), ``topk`` (attention top-k) and ``focused`` (Focused Forcing). Every
policy runs ``--repeat`` times (default 2; per-chunk times are the minimum over
the repeats), the full policy at least twice: its first run is the reference
the others are compared with, and its deviation from that reference checks
that generation is deterministic (it must be exactly 0).

Measured per run, by wrapping methods from this script (the engine is not
modified for it):

* self-attention time per chunk: ``CausalWan._self_attention`` (q/k/v
  projections, RoPE of the chunk and of the history, selection, attention,
  commit, output projection), summed over the chunk's passes and layers; of
  it, ``policy.select`` (the selection scoring), ``attend`` (the attention
  kernel) and ``CausalWan._rotate`` (RoPE) separately;
* denoising time per chunk: the time between two consecutive finished chunks
  (the previous chunk's commit pass plus this chunk's denoising passes);
* cache memory: bytes of every layer's KV store (allocated once, bounded by
  the policy's capacity);
* deviation of each chunk's clean latents from the full-cache reference:
  relative L2 error ``||x - x_full|| / ||x_full||`` (mean over chunks, and over
  the chunks of the video's last quarter) and the largest absolute difference.

Times are the CPU time of the one thread doing the work (so other processes
on the machine disturb them less; the JSON also has wall times), the minimum
over the repeats per chunk, then the mean over the last half of the chunks
(steady state: the history is long and, for bounded policies, the store is
full). Deviations measure fidelity to the full cache; with the random-weight
tiny model they say nothing about visual quality. The default run takes about
3 minutes on a quiet 2-core CPU machine, ``--quick`` a few seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

POLICIES = ("window", "topk", "focused")
DEFAULT = dict(frames=513, height=128, width=128)
QUICK = dict(frames=61, height=32, width=48)


class Timers:
    """Seconds per (what, chunk), filled by the wrappers installed by :func:`instrument`."""

    def __init__(self):
        self.chunk = None
        self.s: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))

    def reset(self):
        self.chunk = None
        self.s.clear()

    def per_chunk(self, what: str, chunks: list[int]) -> list[float]:
        return [self.s[what].get(c, 0.0) for c in chunks]


def instrument(timers: Timers) -> None:
    """Wrap the causal model's attention path and every policy's ``select`` with timers.

    The timers read the thread's CPU time: torch runs single-threaded here, so
    this is the work done, unaffected by other processes sharing the cores.
    """
    import kv_cache.policy as kp
    import kv_cache.store as ks
    from dualpar.models import causal_wan as cw

    def timed(fn, what):
        def wrapper(*a, **kw):
            t0 = time.thread_time()
            try:
                return fn(*a, **kw)
            finally:
                timers.s[what][timers.chunk] += time.thread_time() - t0
        wrapper.__wrapped__ = fn
        return wrapper

    forward = cw.CausalWan.forward_layers

    def forward_layers(self, packet, shape, caches):
        timers.chunk = shape.start  # chunks are keyed by their first latent frame
        return forward(self, packet, shape, caches)

    cw.CausalWan.forward_layers = timed(forward_layers, "layers")
    cw.CausalWan._self_attention = timed(cw.CausalWan._self_attention, "attn")
    cw.CausalWan._rotate = timed(cw.CausalWan._rotate, "rope")
    cw.attend = timed(cw.attend, "kernel")  # the name causal_wan calls
    ks.KVStore.ordered = timed(ks.KVStore.ordered, "ordered")
    seen = set()
    for name in dir(kp):
        cls = getattr(kp, name)
        if isinstance(cls, type) and issubclass(cls, kp.Policy):
            for klass in cls.__mro__:
                if "select" in klass.__dict__ and klass not in seen:
                    seen.add(klass)
                    klass.select = timed(klass.__dict__["select"], "select")


class ChunkClock:
    """A writer recording when each chunk comes out clean (thread CPU time and wall time)."""

    def __init__(self):
        self.t0 = (time.thread_time(), time.perf_counter())
        self.done: list[tuple[float, float]] = []

    def add_block(self, index, latents) -> None:
        self.done.append((time.thread_time(), time.perf_counter()))

    def per_chunk(self, wall: bool = False) -> list[float]:
        stamps = [s[wall] for s in [self.t0] + self.done]
        return [b - a for a, b in zip(stamps, stamps[1:])]


def deviation(blocks: list[torch.Tensor], ref: list[torch.Tensor], starts: list[int], total: int) -> dict:
    rel = [float((x - r).norm() / r.norm().clamp_min(1e-30)) for x, r in zip(blocks, ref)]
    mad = [float((x - r).abs().max()) for x, r in zip(blocks, ref)]
    late = [i for i, s in enumerate(starts) if s >= 0.75 * total]
    return {"rel_l2_mean": sum(rel) / len(rel), "rel_l2_last_quarter": sum(rel[i] for i in late) / len(late),
            "max_abs": max(mad), "max_abs_last_quarter": max(mad[i] for i in late),
            "rel_l2_per_chunk": rel, "max_abs_per_chunk": mad}


def mean(xs):
    return sum(xs) / len(xs) if xs else 0.0


KINDS = ("attn", "select", "kernel", "rope", "ordered", "layers")


def run_once(engine, timers: Timers) -> tuple[dict, list[torch.Tensor], float, int]:
    """One generation: per-chunk CPU seconds by kind, clean latents per chunk, wall seconds, cache bytes."""
    starts = [b.start for b in engine.plan.blocks]
    timers.reset()
    clock = ChunkClock()
    t0 = time.perf_counter()
    stats = engine.generate(writer=clock, keep_latents=True)
    wall = time.perf_counter() - t0
    if len(stats.blocks) != len(starts):
        raise RuntimeError("the run did not finish every chunk")
    cpu = {k: timers.per_chunk(k, starts) for k in KINDS}
    cpu["denoise"] = clock.per_chunk()
    cpu["denoise_wall"] = clock.per_chunk(wall=True)
    return cpu, [b.clone() for b in stats.blocks], wall, stats.cache_bytes


def run(engine, cfg, policy: str, budget: float, timers: Timers, repeat: int, ref=None, done=None):
    """``repeat`` generations with one policy: per-chunk times are the minimum over the repeats.

    ``done``: an earlier run of the same policy (``run_once``'s result) counted as the first repeat.
    Deviations are measured on the first repeat (against ``ref``, or against ``done`` when ``ref`` is
    None); ``repeat_max_abs`` is the largest difference between repeats (generation is deterministic: 0).
    """
    from kv_cache.policy import resolve_budget

    cfg.causal.policy = policy
    cfg.causal.budget = budget
    total = cfg.video.latent_frames
    starts = [b.start for b in engine.plan.blocks]
    runs = [done] if done is not None else []
    while len(runs) < max(repeat, 1):
        runs.append(run_once(engine, timers))
    cpu = {k: [min(r[0][k][i] for r in runs) for i in range(len(starts))] for k in runs[0][0]}
    first = runs[0][1]
    again = [r[1] for r in runs[1:]]
    steady = list(range(len(starts) // 2, len(starts)))  # the last half of the chunks
    late = [i for i, s in enumerate(starts) if s >= 0.75 * total]  # the video's last quarter

    def steady_ms(xs):
        return 1e3 * mean([xs[i] for i in steady])

    store = engine.stage.caches[0].store
    row = {
        "policy": policy,
        "budget": None if policy == "full" else budget,
        "budget_frames": total if policy == "full" else resolve_budget(budget, total),
        "cache_frames": store.capacity,
        "sink": store.sink,
        "cache_bytes": runs[0][3],
        "repeats": len(runs),
        "wall_s": [r[2] for r in runs],
        **{f"{k}_ms": steady_ms(v) for k, v in cpu.items()},
        "attn_ms_all": 1e3 * mean(cpu["attn"]), "denoise_ms_all": 1e3 * mean(cpu["denoise"]),
        "attn_ms_last_quarter": 1e3 * mean([cpu["attn"][i] for i in late]),
        "kernel_ms_last_quarter": 1e3 * mean([cpu["kernel"][i] for i in late]),
        "per_chunk_s": cpu,
        "repeat_max_abs": max((float((a - b).abs().max()) for blocks in again for a, b in zip(blocks, first)),
                              default=None),
    }
    if ref is not None:
        row["deviation"] = deviation(first, ref, starts, total)
    elif again:  # the reference policy against its own repeat
        row["deviation"] = deviation(again[0], first, starts, total)
    return row, runs[0]


def table(rows: list[dict], full: dict) -> str:
    head = ("| policy | budget (frames) | cache frames | cache MB | cache vs full | attention ms/chunk | "
            "attention vs full | select ms/chunk | attend kernel ms/chunk | RoPE ms/chunk | denoise ms/chunk | "
            "rel. L2 vs full (all / last quarter) | max abs diff (all / last quarter) |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        d = r["deviation"]
        budget = ("all" if r["policy"] == "full" else str(r["budget_frames"]) if r["budget"] >= 1
                  else f"{r['budget']:g} = {r['budget_frames']}")
        lines.append(
            f"| {r['policy']} | {budget} | {r['cache_frames']} | {r['cache_bytes'] / 2**20:.1f} | "
            f"{r['cache_bytes'] / full['cache_bytes']:.2f}x | {r['attn_ms']:.1f} | "
            f"{r['attn_ms'] / full['attn_ms']:.2f}x | {r['select_ms']:.1f} | {r['kernel_ms']:.1f} | "
            f"{r['rope_ms']:.1f} | {r['denoise_ms']:.0f} | {d['rel_l2_mean']:.2e} / {d['rel_l2_last_quarter']:.2e} | "
            f"{d['max_abs']:.2e} / {d['max_abs_last_quarter']:.2e} |")
    return "\n".join(lines)


def parse_budgets(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        b = float(part)
        if b <= 0 or (b >= 1 and b != int(b)):
            raise argparse.ArgumentTypeError(f"budget {part!r}: a fraction in (0, 1) or a whole number of frames")
        out.append(b)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (default: the tiny preset)")
    p.add_argument("--quick", action="store_true", help=f"small case for tests: {QUICK['frames']} frames at "
                                                        f"{QUICK['height']}x{QUICK['width']}")
    p.add_argument("--frames", type=int, help=f"output frames, 4k+1 (default {DEFAULT['frames']})")
    p.add_argument("--height", type=int, help=f"default {DEFAULT['height']}")
    p.add_argument("--width", type=int, help=f"default {DEFAULT['width']}")
    p.add_argument("--budget", type=parse_budgets, help="one budget (alias of --budgets)")
    p.add_argument("--budgets", type=parse_budgets, default=None,
                   help="comma-separated budgets: fractions of the video's latent frames (< 1) or frames (default 0.25)")
    p.add_argument("--policies", default=",".join(POLICIES), help="bounded policies to compare with full")
    p.add_argument("--chunk", type=int, help="latent frames per chunk (default: the config's, 3)")
    p.add_argument("--sink", type=int, help="sink frames (default: the config's, 3)")
    p.add_argument("--seed", type=int, help="noise seed (default: the config's)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config key (YAML value syntax), after this script's settings; repeatable")
    p.add_argument("--repeat", type=int, default=2,
                   help="generations per policy; per-chunk times are the minimum over them (default 2; full runs "
                        "at least twice, its first run being the reference)")
    p.add_argument("--json", help="write every raw figure here")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    import yaml

    from dualpar.causal import CausalEngine
    from dualpar.comm import Comm
    from dualpar.config import ConfigError, load_config
    from dualpar.models import loader

    size = QUICK if args.quick else DEFAULT
    cfg = load_config(args.config)
    cfg.video.frames = args.frames or size["frames"]
    cfg.video.height = args.height or size["height"]
    cfg.video.width = args.width or size["width"]
    cfg.sampling.mode = "causal"
    cfg.sampling.guidance = 1.0
    cfg.causal.schedule = "sequential"
    cfg.output.decode = False
    for key in ("chunk", "sink", "seed"):
        val = getattr(args, key)
        if val is not None:
            setattr(cfg.causal if key != "seed" else cfg.sampling, key, val)
    cfg.parallel.block = min(cfg.parallel.block, cfg.video.latent_frames)  # not used in causal mode
    cfg.parallel.num_cat = min(cfg.parallel.num_cat, cfg.parallel.block)
    budgets = args.budgets or args.budget or [0.25]
    policies = [x.strip() for x in args.policies.split(",") if x.strip()]
    try:
        for item in args.set:
            key, eq, raw = item.partition("=")
            if not eq:
                raise ConfigError(f"--set expects SECTION.KEY=VALUE, got '{item}'")
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                raise ConfigError(f"--set {key}: cannot parse value '{raw}'") from None
            cfg.set(key.strip(), value, source="--set")
        cfg.validate(1, loader.num_layers(cfg))
        for b in budgets:
            cfg.causal.budget = b
            cfg.validate(1, loader.num_layers(cfg))
        bad = [x for x in policies if x not in POLICIES]
        if bad:
            raise ConfigError(f"--policies: unknown {bad} (bounded policies: {', '.join(POLICIES)})")
        if args.repeat < 1:
            raise ConfigError(f"--repeat must be >= 1, got {args.repeat}")
    except ConfigError as e:
        print(f"bench_causal: {e}", file=sys.stderr)
        return 2

    timers = Timers()
    instrument(timers)
    t_start = time.perf_counter()
    comm = Comm.from_env()
    engine = CausalEngine(cfg, comm)
    engine.set_prompt(cfg.sampling.prompt, cfg.sampling.negative_prompt)
    lat = cfg.video.latent_frames
    m = engine.model
    print(f"bench_causal: {cfg.video.frames} frames ({lat} latent, {len(engine.plan.blocks)} chunks of "
          f"{cfg.causal.chunk}) at {cfg.video.height}x{cfg.video.width} ({m.tokens_per_frame(engine.plan.lat_h, engine.plan.lat_w)} "
          f"tokens per latent frame), {len(engine.plan.tasks) // len(engine.plan.blocks)} passes per chunk, "
          f"{len(m.layers)} layers, sink {cfg.causal.sink}, 1 thread", flush=True)

    cfg.causal.policy = "full"
    warm = run_once(engine, timers)  # the reference, and the full policy's first repeat
    ref = warm[1]
    full, _ = run(engine, cfg, "full", 0.25, timers, max(args.repeat, 2), done=warm)
    print(f"  full: {' + '.join(f'{w:.1f}' for w in full['wall_s'])} s", flush=True)
    rows = [full]
    for b in budgets:
        for pol in policies:
            row, _ = run(engine, cfg, pol, b, timers, args.repeat, ref)
            rows.append(row)
            print(f"  {pol} @ {b:g}: {' + '.join(f'{w:.1f}' for w in row['wall_s'])} s", flush=True)
    total_s = time.perf_counter() - t_start

    print()
    print(table(rows, full))
    print()
    q0 = next(b.start for b in engine.plan.blocks if b.start >= 0.75 * lat)
    print(f"{cfg.video.frames} frames = {lat} latent frames in chunks of {cfg.causal.chunk}, "
          f"{cfg.video.height}x{cfg.video.width}, {len(cfg.causal.timestep_list())} denoising steps + 1 commit pass per chunk, "
          f"{cfg.causal.schedule} schedule, guidance {cfg.sampling.guidance:g}, seed {cfg.sampling.seed}, one CPU "
          f"thread. Times are CPU time of that thread (little affected by other load on the machine), the "
          f"per-chunk minimum over {args.repeat} generations per policy ({max(args.repeat, 2)} for full), means over the "
          f"last {len(engine.plan.blocks) - len(engine.plan.blocks) // 2} chunks (steady state), summed over the "
          f"chunk's passes and the {len(m.layers)} layers; select, attend kernel and RoPE are parts of attention; "
          f"denoise is everything between two finished chunks. "
          f"Budget = committed frames attended per query frame (window: {cfg.causal.sink} sink frames + the most "
          f"recent budget - {cfg.causal.sink}); window's cache holds exactly the budget, while topk and focused keep "
          f"a pool of max(1.5 x budget, budget + sink) frames to choose from (cfg.causal.pool = 0), which is their "
          f"memory. Deviation = relative L2 error of each chunk's clean latents against the full-cache run, mean "
          f"over chunks (last quarter: chunks starting at latent frame {q0} or later), and the largest absolute "
          f"difference. The model is the random-weight tiny preset: deviations measure fidelity to the full cache, "
          f"not visual quality. Whole benchmark: {total_s:.0f} s.")
    if args.json:
        out = {"frames": cfg.video.frames, "latent_frames": lat, "height": cfg.video.height, "width": cfg.video.width,
               "chunk": cfg.causal.chunk, "chunks": len(engine.plan.blocks), "chunk_starts": [b.start for b in engine.plan.blocks],
               "steps": len(cfg.causal.timestep_list()), "sink": cfg.causal.sink, "seed": cfg.sampling.seed,
               "layers": len(m.layers), "guidance": cfg.sampling.guidance, "schedule": cfg.causal.schedule,
               "budgets": budgets, "repeat": args.repeat, "steady_chunks": len(engine.plan.blocks) - len(engine.plan.blocks) // 2,
               "total_s": total_s, "config": cfg.to_dict(), "results": rows}
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
