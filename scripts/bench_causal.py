"""Causal mode benchmarks: KV-cache policies at equal budgets, multi-rank speed-up, attention-kernel costs.

    python scripts/bench_causal.py                       # policies: tiny model, 513 frames at 128x128, budget 0.25
    python scripts/bench_causal.py --speedup --kernel    # ... and the two other parts (everything BENCHMARKS.md shows)
    python scripts/bench_causal.py --no-policies --kernel   # the attention-kernel micro-benchmark alone
    python scripts/bench_causal.py --budgets 0.25,0.5 --json out.json
    python scripts/bench_causal.py --quick --speedup --kernel   # small cases of every part, for tests (~1 min)

**Policies** (the default part; ``--no-policies`` leaves it out). In one
process (one CPU thread), with the same model, seed
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
tiny model they say nothing about visual quality. This part takes about
2 minutes on a quiet 2-core CPU machine, ``--quick`` a few seconds.

**Speed-up** (``--speedup``): the real launcher (``launch/gen.py --mode causal
--no-decode``; plain python for 1 rank, torchrun for more, one CPU thread per
rank) on one case (default 513 frames at 128x128, the ``window`` policy at the
first budget, guidance 1.0), for the ``sequential`` and the ``staggered``
schedule on 1 and 2 ranks; runs alternate and the best loop time of
``--repeat`` is kept. Reported: loop seconds, speed-up over the same schedule
on 1 rank, busy fraction per rank (from ``stats.json``), and whether the
latents of every rank count equal the 1-rank run's (they should: the layers
are split, the arithmetic is not changed). About 2 minutes.

**Attention kernel** (``--kernel``): random tensors through the real
``kv_cache`` code, called as ``CausalWan._self_attention`` calls it (absolute
RoPE: keys are cached rotated; sequential schedule: the chunk's own keys are
the only ones always attended). Per frame size, a store is filled by
committing ``--kernel-history`` frames (evictions by the policy's victim, as
the engine does), then a chunk of 3 query frames calls ``store.ordered()``,
``policy.select`` and ``attend``; each is timed (thread CPU time, minimum over
``--kernel-repeat`` calls) for ``full`` (every history frame) and ``window``,
``topk``, ``focused`` at 25% of the history. Default: frames of 96, 390 and
1560 tokens (128x192, 240x416 and 480x832 pixels; 1560 is Wan2.1-1.3B's 480p
frame), 64 history frames, 2 of Wan's 12 heads of dimension 128, float32,
batch 1. About half a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from dualpar.config import choices, resolve_budget  # noqa: E402

POLICIES = tuple(p for p in choices("causal.policy") if p != "full")  # the bounded ones, compared with full
DEFAULT = dict(frames=513, height=128, width=128)
QUICK = dict(frames=61, height=32, width=48)
# The speed-up part: the launcher on 1 and 2 ranks (each run 10-30 s on this 2-core machine).
SPEEDUP = dict(frames=513, height=128, width=128)
SPEEDUP_QUICK = dict(frames=61, height=32, width=48)
SCHEDULES = choices("causal.schedule")
# The kernel micro-benchmark: frame sizes in pixels (tokens per frame = (h/16) * (w/16): VAE 8x, patches 2x2).
KERNEL = dict(sizes="128x192,240x416,480x832", history=64, heads=2, head_dim=128, repeat=3)
KERNEL_QUICK = dict(sizes="64x64,96x128", history=16, heads=2, head_dim=128, repeat=1)
KERNEL_QUERY_FRAMES = 3  # one chunk
KERNEL_BUDGET = 0.25  # of the history
WAN_HEADS = 12  # Wan2.1-1.3B (14B: 40 heads of 128)


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

    def forward_layers(self, packet, shape, caches, out=None):
        timers.chunk = shape.start  # chunks are keyed by their first latent frame
        return forward(self, packet, shape, caches, out=out)

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


def policy_caption(data: dict) -> str:
    """What the policy table measured, from its JSON (``--json``'s top-level keys)."""
    lat, starts = data["latent_frames"], data["chunk_starts"]
    q0 = next(s for s in starts if s >= 0.75 * lat)
    return (f"{data['frames']} frames = {lat} latent frames in chunks of {data['chunk']}, "
            f"{data['height']}x{data['width']}, {data['steps']} denoising steps + 1 commit pass per chunk, "
            f"{data['schedule']} schedule, guidance {data['guidance']:g}, seed {data['seed']}, one CPU thread. Times are CPU time of that thread (little "
            f"affected by other load on the machine), the per-chunk minimum over {data['repeat']} generation"
            f"{'s' if data['repeat'] > 1 else ''} per policy ({max(data['repeat'], 2)} for full), means over the last "
            f"{data['steady_chunks']} chunks (steady state), summed over the chunk's passes and the {data['layers']} "
            f"layers; select, attend kernel and RoPE are parts of attention; denoise is everything between two "
            f"finished chunks. Budget = committed frames attended per query frame (window: {data['sink']} sink frames "
            f"+ the most recent budget - {data['sink']}); window's cache holds exactly the budget, while topk and "
            f"focused keep a pool of max(1.5 x budget, budget + sink) frames to choose from (cfg.causal.pool = 0), "
            f"which is their memory. Deviation = relative L2 error of each chunk's clean latents against the "
            f"full-cache run, mean over chunks (last quarter: chunks starting at latent frame {q0} or later), and the "
            f"largest absolute difference. {model_note(data)}")


def model_note(data: dict) -> str:
    model = (data.get("config") or {}).get("model", {})
    if model.get("path"):
        return f"The model is {model['path']}: deviations measure fidelity to the full cache."
    if model.get("preset", "tiny-random") == "tiny-random":
        return "The model is the random-weight tiny preset: deviations measure fidelity to the full cache, not visual quality."
    return (f"The model is the trained {model['preset']} preset (the same architecture and cost as tiny-random): "
            "deviations measure fidelity to the full cache.")


# -- speed-up over ranks ---------------------------------------------------------------------------


def read_latents(out: str) -> list[torch.Tensor]:
    """The clean latents of every chunk of a finished run in ``out`` (``latents/`` via the manifest)."""
    from safetensors.torch import load_file

    with open(os.path.join(out, "manifest.json")) as f:
        man = json.load(f)
    if man.get("status") != "complete":
        raise RuntimeError(f"{out}: the run is not complete ({man.get('status')})")
    return [load_file(os.path.join(out, b["latents"]))["latents"] for b in man["blocks"]]


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def run_speedup(gen_args: list[str], ranks: list[int], schedules: list[str], repeat: int, work: str) -> dict:
    """Every (schedule, rank count) ``repeat`` times through the launcher, alternating; the best loop of each.

    ``gen_args``: launch/gen.py's arguments shared by every run (config, size, policy, guidance).
    """
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import bench_speedup  # the launcher call of scripts/bench_speedup.py (python, or torchrun for n > 1)

    runs, best = [], {}
    for rep in range(repeat):
        for sched in schedules:
            for n in ranks:
                s = bench_speedup.run_once(n, os.path.join(work, f"{sched}-n{n}"),
                                           gen_args + ["--set", f"causal.schedule={sched}"])
                runs.append({"schedule": sched, "ranks": n, "repeat": rep, "loop_s": s["loop_s"]})
                print(f"  speed-up, run {rep + 1}: {sched}, {n} rank(s): loop {s['loop_s']:.2f} s", flush=True)
                if (sched, n) not in best or s["loop_s"] < best[(sched, n)]["loop_s"]:
                    best[(sched, n)] = s
    rows = []
    seq1 = best.get(("sequential", ranks[0]))
    for sched in schedules:
        ref = read_latents(os.path.join(work, f"{sched}-n{ranks[0]}"))
        base = best[(sched, ranks[0])]["loop_s"]
        for n in ranks:
            s = best[(sched, n)]
            latents = read_latents(os.path.join(work, f"{sched}-n{n}"))
            rows.append({
                "schedule": sched, "ranks": n, "loop_s": s["loop_s"], "total_s": s["total_s"],
                "speedup": base / s["loop_s"], "vs_sequential_1": seq1["loop_s"] / s["loop_s"] if seq1 else None,
                "busy": [r["busy_s"] / max(r["loop_s"], 1e-9) for r in s["ranks"]],
                "wait_s": [r["wait_s"] for r in s["ranks"]],
                "kv_cache_mb": [r["kv_cache_mb"] for r in s["ranks"]],
                "peak_rss_mb": [r["peak_rss_mb"] for r in s["ranks"]],
                "chunks": len(latents),
                # Against the first rank count's latents of the same schedule (None for that run itself).
                "latents_max_abs_vs_base": None if n == ranks[0] else max_abs_diff(latents, ref),
            })
    return {"ranks": ranks, "schedules": schedules, "repeat": repeat, "runs": runs, "results": rows}


def speedup_table(data: dict) -> str:
    base_n = data["ranks"][0]
    lines = [f"| schedule | ranks | loop s | speed-up vs {base_n} rank{'s' if base_n > 1 else ''} (same schedule) | "
             f"vs sequential on {base_n} | chunks/s | busy per rank | KV cache MB per rank | latents vs {base_n} "
             f"rank{'s' if base_n > 1 else ''} |", "|---|---|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        vs = "-" if r["vs_sequential_1"] is None else f"{r['vs_sequential_1']:.2f}x"
        d = r["latents_max_abs_vs_base"]
        same = "(reference)" if d is None else "identical" if d == 0.0 else f"max abs diff {d:.2e}"
        lines.append(f"| {r['schedule']} | {r['ranks']} | {r['loop_s']:.2f} | {r['speedup']:.2f}x | {vs} | "
                     f"{r['chunks'] / r['loop_s']:.2f} | {' / '.join(f'{b:.0%}' for b in r['busy'])} | "
                     f"{' / '.join(f'{m:.1f}' for m in r['kv_cache_mb'])} | {same} |")
    return "\n".join(lines)


def speedup_caption(data: dict) -> str:
    c = data["case"]
    steps = c["steps"]
    return (f"`launch/gen.py --mode causal --no-decode` on {c['frames']} frames ({c['latent_frames']} latent frames, "
            f"{c['chunks']} chunks of {c['chunk']}) at {c['height']}x{c['width']}, {c['layers']} layers split over the "
            f"ranks, {steps} steps + 1 commit pass per chunk, policy {c['policy']} at budget {c['budget']:g} "
            f"({c['budget_frames']} frames), guidance {c['guidance']:g}, one CPU thread per rank (1 rank: plain python; "
            f"more: torchrun). Sequential runs one chunk at a time, so its passes form one chain and only one rank "
            f"works at any moment; staggered lets a new chunk enter every iteration, up to {steps + 1} passes in "
            f"flight. Loop = the denoising loop of the slowest rank (stats.json), best of {data['repeat']} run"
            f"{'s' if data['repeat'] > 1 else ''} per row, runs alternating; busy = the rank's compute time over its "
            f"loop time. Latents: every chunk's clean latents against the {data['ranks'][0]}-rank run of the same "
            f"schedule (the two schedules compute different things: staggered chunks also attend to their in-flight "
            f"predecessors' current keys/values).")


# -- attention kernel ------------------------------------------------------------------------------


def parse_size(text: str) -> tuple[int, int]:
    h, sep, w = text.lower().partition("x")
    try:
        hh, ww = int(h), int(w)
    except ValueError:
        hh = ww = 0
    if not sep or hh < 16 or ww < 16 or hh % 16 or ww % 16:
        raise argparse.ArgumentTypeError(f"frame size {text!r}: HEIGHTxWIDTH in pixels, multiples of 16")
    return hh, ww


def run_kernel(sizes: list[tuple[int, int]], history: int, heads: int, head_dim: int, repeat: int, sink: int,
               pool: int, sample: int, diversity: float, seed: int = 0) -> dict:
    """Per frame size and policy: CPU ms of one ``store.ordered()``, ``policy.select`` and ``attend`` call."""
    from kv_cache import attend, make_policy

    fq = KERNEL_QUERY_FRAMES
    rows = []
    for h, w in sizes:
        t = (h // 16) * (w // 16)
        g = torch.Generator().manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=g)

        k_frames, v_frames = randn(history, 1, t, heads, head_dim), randn(history, 1, t, heads, head_dim)
        q, k_now, v_now = (randn(1, fq * t, heads, head_dim) for _ in range(3))
        full_total = None
        for name in ("full", *POLICIES):
            policy = make_policy(name, budget=KERNEL_BUDGET, total_frames=history, sink=sink, pool=pool,
                                 sample=sample, diversity=diversity)
            store = policy.new_store(history, batch=1, tokens=t, heads=heads, head_dim=head_dim)
            for f in range(history):
                store.commit(f, k_frames[f], v_frames[f], policy.victim)
            best = [float("inf")] * 3
            with torch.no_grad():
                for _ in range(repeat):
                    t0 = time.thread_time()
                    frames, k_hist, v_hist = store.ordered()
                    t1 = time.thread_time()
                    selection = policy.select(store, q, fq, k_hist, v_hist, k_now)
                    t2 = time.thread_time()
                    out = attend(q, k_now, v_now, k_hist, v_hist, selection)
                    t3 = time.thread_time()
                    best = [min(a, b) for a, b in zip(best, (t1 - t0, t2 - t1, t3 - t2))]
            assert out.shape == q.shape
            read, select, kernel = (1e3 * x for x in best)
            total = read + select + kernel
            if name == "full":
                full_total = total
            rows.append({
                "height": h, "width": w, "tokens": t, "policy": name, "store_frames": len(frames),
                # history frames each (query frame, head) attends to: the selection's width (focused pads its
                # per-head budgets to the widest) or the whole store
                "attended_frames": len(frames) if selection is None else selection.budget,
                "sample": policy.queries_per_frame(t),
                "read_ms": read, "select_ms": select, "attend_ms": kernel, "total_ms": total,
                "vs_full": total / full_total,
            })
            del store, k_hist, v_hist, selection, out
        print(f"  kernel: {h}x{w} ({t} tokens per frame) done", flush=True)
    return {"sizes": [f"{h}x{w}" for h, w in sizes], "history": history, "heads": heads, "head_dim": head_dim,
            "query_frames": fq, "budget": KERNEL_BUDGET, "budget_frames": resolve_budget(KERNEL_BUDGET, history),
            "sink": sink, "repeat": repeat, "wan_heads": WAN_HEADS, "results": rows}


def kernel_table(data: dict) -> str:
    lines = ["| frame (tokens) | policy | store frames | attended frames | store read ms | select ms | attend ms | "
             "total ms | total vs full | select / attend |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["results"]:
        share = "-" if r["policy"] in ("full", "window") else f"{r['select_ms'] / r['attend_ms']:.1%}"
        lines.append(f"| {r['height']}x{r['width']} ({r['tokens']}) | {r['policy']} | {r['store_frames']} | "
                     f"{r['attended_frames']} | {r['read_ms']:.2f} | {r['select_ms']:.2f} | {r['attend_ms']:.1f} | "
                     f"{r['total_ms']:.1f} | {r['vs_full']:.2f}x | {share} |")
    return "\n".join(lines)


def kernel_caption(data: dict) -> str:
    n, fq = data["history"], data["query_frames"]
    samples = sorted({(r["tokens"], r["sample"]) for r in data["results"] if r["sample"]})
    pools = sorted({r["store_frames"] for r in data["results"] if r["policy"] in ("topk", "focused")})
    return (f"Random tensors through the real `kv_cache` code, called as `CausalWan._self_attention` calls it "
            f"(absolute RoPE: cached keys are already rotated; sequential schedule: only the chunk's own keys are "
            f"always attended): a store filled by committing {n} history frames (evictions by the policy's victim), "
            f"then one chunk of {fq} query frames calls `store.ordered()` (store read: a view when the slots are in "
            f"order, a copy once a ring has wrapped), `policy.select` and `attend`. Budget {data['budget']:.0%} of the "
            f"history ({data['budget_frames']} frames) for window, topk and focused: window's store holds the "
            f"budget, {data['sink']} sink frames included; topk and focused choose from a pool of "
            f"{' / '.join(map(str, pools))} frames (max(1.5 x budget, budget + sink)), scoring with sampled queries "
            f"per query frame (" + ", ".join(f"{s} of {t}" for t, s in samples) + f" tokens); full attends to all "
            f"{n}. {data['heads']} heads of dimension {data['head_dim']}, float32, batch 1 (no CFG), one CPU thread; "
            f"CPU time per call, minimum over {data['repeat']} call{'s' if data['repeat'] > 1 else ''}. Wan2.1-1.3B "
            f"has {data['wan_heads']} such heads per layer (every time here grows about linearly with heads) and runs "
            f"these calls in each of its 30 layers per pass. Attended frames: per query frame and head (focused pads "
            f"its per-head budgets to the widest).")


# -- command line ----------------------------------------------------------------------------------


def parse_budgets(text: str) -> list[float]:
    out = []
    for part in text.split(","):
        b = float(part)
        if b <= 0 or (b >= 1 and b != int(b)):
            raise argparse.ArgumentTypeError(f"budget {part!r}: a fraction in (0, 1) or a whole number of frames")
        out.append(b)
    return out


def parse_list(kind, text: str) -> list:
    return [kind(x.strip()) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (default: the tiny preset)")
    p.add_argument("--quick", action="store_true", help=f"small cases for tests: policies and speed-up on "
                                                        f"{QUICK['frames']} frames at {QUICK['height']}x{QUICK['width']}, "
                                                        f"kernel at {KERNEL_QUICK['sizes']} with "
                                                        f"{KERNEL_QUICK['history']} history frames")
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
                        "at least twice, its first run being the reference); runs per row of the speed-up")
    p.add_argument("--no-policies", action="store_true", help="leave out the policy comparison")
    g = p.add_argument_group("speed-up over ranks")
    g.add_argument("--speedup", action="store_true", help="also time the launcher on 1 and 2 ranks per schedule")
    g.add_argument("--speedup-frames", type=int,
                   help=f"default {SPEEDUP['frames']} ({SPEEDUP_QUICK['frames']} with --quick)")
    g.add_argument("--speedup-size", type=parse_size, metavar="HxW",
                   help=f"default {SPEEDUP['height']}x{SPEEDUP['width']} ({SPEEDUP_QUICK['height']}x"
                        f"{SPEEDUP_QUICK['width']} with --quick)")
    g.add_argument("--speedup-policy", default="window", help="KV policy of the speed-up runs, at the first "
                                                               "budget (default: window)")
    g.add_argument("--speedup-ranks", type=lambda s: parse_list(int, s), default=[1, 2], metavar="N,N",
                   help="rank counts (default 1,2; the first is the speed-up's base)")
    g.add_argument("--schedules", type=lambda s: parse_list(str, s), default=list(SCHEDULES), metavar="LIST",
                   help="schedules of the speed-up (default: sequential,staggered)")
    g = p.add_argument_group("attention kernel")
    g.add_argument("--kernel", action="store_true", help="also run the attention-kernel micro-benchmark")
    g.add_argument("--kernel-sizes", type=lambda s: parse_list(parse_size, s), metavar="HxW,...",
                   help=f"frame sizes in pixels (default {KERNEL['sizes']}; {KERNEL_QUICK['sizes']} with --quick)")
    g.add_argument("--kernel-history", type=int, help=f"committed frames in the store (default {KERNEL['history']})")
    g.add_argument("--kernel-heads", type=int, help=f"attention heads (default {KERNEL['heads']} of Wan's {WAN_HEADS})")
    g.add_argument("--kernel-repeat", type=int, help=f"calls per measurement (default {KERNEL['repeat']})")
    p.add_argument("--json", help="write every raw figure here")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    from dualpar.cli import apply_sets
    from dualpar.config import Config, ConfigError, load_config
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
    kq = KERNEL_QUICK if args.quick else KERNEL
    kernel = dict(sizes=args.kernel_sizes or parse_list(parse_size, kq["sizes"]),
                  history=args.kernel_history or kq["history"], heads=args.kernel_heads or kq["heads"],
                  head_dim=kq["head_dim"], repeat=args.kernel_repeat or kq["repeat"])
    sq = SPEEDUP_QUICK if args.quick else SPEEDUP
    try:
        apply_sets(cfg, args.set)
        cfg.validate(1, loader.num_layers(cfg))
        for b in budgets:
            cfg.causal.budget = b
            cfg.validate(1, loader.num_layers(cfg))
        bad = [x for x in policies if x not in POLICIES]
        if bad:
            raise ConfigError(f"--policies: unknown {bad} (bounded policies: {', '.join(POLICIES)})")
        if args.repeat < 1:
            raise ConfigError(f"--repeat must be >= 1, got {args.repeat}")
        if args.no_policies and not (args.speedup or args.kernel):
            raise ConfigError("--no-policies leaves nothing to run: add --speedup and/or --kernel")
        sp = None
        if args.speedup:
            sp = Config.from_dict(cfg.to_dict(), source="--speedup")
            sp.video.frames = args.speedup_frames or sq["frames"]
            sp.video.height, sp.video.width = args.speedup_size or (sq["height"], sq["width"])
            sp.causal.policy, sp.causal.budget = args.speedup_policy, budgets[0]
            sp.output.save_latents = True
            sp.parallel.block = min(load_config(args.config).parallel.block, sp.video.latent_frames)
            sp.parallel.num_cat = min(sp.parallel.num_cat, sp.parallel.block)
            bad = [s for s in args.schedules if s not in SCHEDULES]
            if bad or not args.schedules:
                raise ConfigError(f"--schedules: expected some of {', '.join(SCHEDULES)}, got {args.schedules}")
            counts = args.speedup_ranks
            if not counts or min(counts) < 1 or len(set(counts)) < len(counts):
                raise ConfigError(f"--speedup-ranks: distinct rank counts >= 1, got {args.speedup_ranks}")
            for sched in args.schedules:
                sp.causal.schedule = sched
                for n in args.speedup_ranks:
                    sp.validate(n, loader.num_layers(sp))
        if args.kernel:
            if kernel["history"] < 4 or kernel["heads"] < 1 or kernel["repeat"] < 1:
                raise ConfigError("--kernel-history must be >= 4, --kernel-heads and --kernel-repeat >= 1")
            if resolve_budget(KERNEL_BUDGET, kernel["history"]) <= cfg.causal.sink:
                raise ConfigError(f"--kernel-history {kernel['history']}: {KERNEL_BUDGET:.0%} of it must exceed the "
                                  f"{cfg.causal.sink} sink frames (the window policy's budget includes them)")
    except ConfigError as e:
        print(f"bench_causal: {e}", file=sys.stderr)
        return 2

    t_start = time.perf_counter()
    out: dict = {}
    if not args.no_policies:
        out.update(run_policies(args, cfg, budgets, policies))
    if sp is not None:
        out["speedup"] = speedup_part(args, sp)
    if args.kernel:
        c = cfg.causal
        t0 = time.perf_counter()
        out["kernel"] = run_kernel(kernel["sizes"], kernel["history"], kernel["heads"], kernel["head_dim"],
                                   kernel["repeat"], c.sink, c.pool, c.sample, c.diversity, seed=cfg.sampling.seed)
        out["kernel"]["seconds"] = time.perf_counter() - t0
    total_s = time.perf_counter() - t_start

    if "results" in out:
        print()
        print(table(out["results"], out["results"][0]))
        print()
        print(policy_caption(out))
    if "speedup" in out:
        print()
        print(speedup_table(out["speedup"]))
        print()
        print(speedup_caption(out["speedup"]))
    if "kernel" in out:
        print()
        print(kernel_table(out["kernel"]))
        print()
        print(kernel_caption(out["kernel"]))
    print(f"\nWhole benchmark: {total_s:.0f} s.")
    if args.json:
        out["total_s"] = total_s
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def run_policies(args, cfg, budgets: list[float], policies: list[str]) -> dict:
    """The policy comparison on one in-process engine; its figures (the JSON's top-level keys)."""
    from dualpar.causal import CausalEngine
    from dualpar.comm import Comm

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
    n_chunks = len(engine.plan.blocks)
    out = {"frames": cfg.video.frames, "latent_frames": lat, "height": cfg.video.height, "width": cfg.video.width,
           "chunk": cfg.causal.chunk, "chunks": n_chunks, "chunk_starts": [b.start for b in engine.plan.blocks],
           "steps": len(cfg.causal.timestep_list()), "sink": cfg.causal.sink, "seed": cfg.sampling.seed,
           "layers": len(m.layers), "guidance": cfg.sampling.guidance, "schedule": cfg.causal.schedule,
           "budgets": budgets, "repeat": args.repeat, "steady_chunks": n_chunks - n_chunks // 2,
           "policies_s": time.perf_counter() - t_start, "config": cfg.to_dict(), "results": rows}
    del engine
    return out


def speedup_part(args, sp) -> dict:
    """The speed-up runs for the config ``sp`` (size, policy and budget set; the schedule varies)."""
    from dualpar.causal import CausalPlan
    from dualpar.models import loader

    gen_args = []
    if args.config:
        gen_args += ["--config", os.path.abspath(args.config)]
    gen_args += [a for item in args.set for a in ("--set", item)]
    c = sp.causal
    gen_args += ["--mode", "causal", "--frames", str(sp.video.frames), "--height", str(sp.video.height),
                 "--width", str(sp.video.width), "--guidance", "1", "--policy", c.policy, "--budget", f"{c.budget:g}",
                 "--seed", str(sp.sampling.seed), "--set", f"causal.chunk={c.chunk}", "--set", f"causal.sink={c.sink}",
                 "--set", f"parallel.block={sp.parallel.block}", "--set", f"parallel.num_cat={sp.parallel.num_cat}",
                 "--set", "output.save_latents=true"]
    layers = loader.num_layers(sp)
    plan = CausalPlan(sp, 1, layers)
    lat = sp.video.latent_frames
    print(f"bench_causal: speed-up of {sp.video.frames} frames at {sp.video.height}x{sp.video.width} on "
          f"{', '.join(map(str, args.speedup_ranks))} ranks, schedules {', '.join(args.schedules)}, "
          f"policy {c.policy} @ {c.budget:g}", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_causal-") as work:
        data = run_speedup(gen_args, args.speedup_ranks, args.schedules, args.repeat, work)
    data["case"] = {"frames": sp.video.frames, "latent_frames": lat, "height": sp.video.height, "width": sp.video.width,
                    "chunk": c.chunk, "chunks": len(plan.blocks), "steps": plan.steps, "layers": layers,
                    "policy": c.policy, "budget": c.budget,
                    "budget_frames": lat if c.policy == "full" else resolve_budget(c.budget, lat),
                    "guidance": 1.0, "sink": c.sink, "seed": sp.sampling.seed}
    data["seconds"] = time.perf_counter() - t0
    return data


if __name__ == "__main__":
    sys.exit(main())
