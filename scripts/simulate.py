"""Discrete-event model of the pipelined block-wise schedule: wall time and idle fraction per rank.

    python scripts/simulate.py --calibrate outputs/a/trace.json --config configs/tiny.yaml \\
        --frames 513 --block 4 --num-cat 2 --ranks 2

The model walks the same task list as the engine (dualpar.schedule.make_tasks):
each rank runs its tasks in order; a task starts on rank r when rank r is free
and the packet from rank r-1 has arrived (finish + latency + bytes/bandwidth);
rank 0 also waits, as the engine does, for the predictions its next input
needs (or when 2 x ranks tasks are in flight) and spends a scheduler step on
each. Compute per task and rank is ``a + b*Nq + c*Nq*Nkv`` per layer (Nq query
tokens, Nkv key tokens incl. the cached context) plus rank 0's embedding and
the last rank's head, fitted by least squares to the compute spans of one
traced run (``launch/gen.py --trace``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dualpar import schedule as sch  # noqa: E402


def task_tokens(task, blocks, num_cat, steps, tpf):
    lay = sch.layout(task, blocks, num_cat, steps)
    nq = (lay.context + lay.own) * tpf
    return nq, nq + lay.extra * tpf


def features(nq, nkv):
    return [1.0, nq, nq * nkv]


def calibrate(trace_path, plan_args):
    """Per-layer cost coefficients, per-rank fixed costs, scheduler-step cost, from one traced run."""
    blocks, tasks, num_cat, steps, tpf, layers = plan_args
    events = [e for e in json.load(open(trace_path))["traceEvents"] if e.get("ph") == "X"]
    by_index = {t.index: t for t in tasks}
    rows, ys = [], []
    for e in events:
        if e["cat"] != "compute":
            continue
        t = by_index[e["args"]["task"]]
        nq, nkv = task_tokens(t, blocks, num_cat, steps, tpf)
        n_layers = layers[e["pid"]][1] - layers[e["pid"]][0]
        # per-layer features scaled by the rank's layer count, plus one fixed term per rank
        row = [f * n_layers for f in features(nq, nkv)] + [1.0 if e["pid"] == r else 0.0 for r in range(len(layers))]
        rows.append(row)
        ys.append(e["dur"] / 1e6)
    coef, *_ = np.linalg.lstsq(np.array(rows), np.array(ys), rcond=None)
    sched = [e["dur"] / 1e6 for e in events if e["cat"] == "scheduler"]
    return {"layer": coef[:3].tolist(), "fixed": coef[3:].tolist(), "sched_s": float(np.median(sched))}


# Hop model of the calibrated (CPU, gloo) case; the fit absorbs what it misses.
HOP = dict(latency_s=1e-3, bandwidth=2e9, packet_bytes_per_token=1024)


def simulate(blocks, steps, num_cat, tpf, layers, model, latency_s=HOP["latency_s"], bandwidth=HOP["bandwidth"],
             packet_bytes_per_token=HOP["packet_bytes_per_token"]):
    """Predicted loop wall time and idle fraction per rank."""
    world = len(layers)
    tasks = sch.make_tasks(len(blocks), steps)
    in_flight = 2 * world
    free = [0.0] * world
    busy = [0.0] * world
    pred_at = {}  # task -> time its prediction reaches rank 0
    applied = -1

    def cost(rank, task):
        nq, nkv = task_tokens(task, blocks, num_cat, steps, tpf)
        n = layers[rank][1] - layers[rank][0]
        fixed = model["fixed"][rank] if rank < len(model["fixed"]) else 0.0
        return n * float(np.dot(model["layer"], features(nq, nkv))) + fixed

    def hop(task):
        nq, _ = task_tokens(task, blocks, num_cat, steps, tpf)
        return latency_s + nq * packet_bytes_per_token / bandwidth

    # Rank 0 drives the order; other ranks follow task by task.
    for task in tasks:
        need = max(task.needs, task.index - in_flight)
        while applied < need:
            j = applied + 1
            t = max(free[0], pred_at[j]) if world > 1 else free[0]
            free[0] = t + model["sched_s"]
            busy[0] += model["sched_s"]
            applied = j
        start = free[0]
        c = cost(0, task)
        free[0] = start + c
        busy[0] += c
        t_done = free[0]
        for r in range(1, world):
            arr = t_done + hop(task)
            start = max(free[r], arr)
            c = cost(r, task)
            free[r] = start + c
            busy[r] += c
            t_done = free[r]
        if world > 1:
            pred_at[task.index] = t_done + latency_s
        else:
            free[0] += model["sched_s"]
            busy[0] += model["sched_s"]
            applied = task.index
    while applied < len(tasks) - 1:
        j = applied + 1
        free[0] = max(free[0], pred_at[j]) + model["sched_s"]
        busy[0] += model["sched_s"]
        applied = j
    wall = max(free)
    return {"wall_s": wall, "idle": [1 - b / wall for b in busy]}


def plan_for(frames, block, num_cat, steps, ranks, num_layers, hw):
    latent = (frames - 1) // 4 + 1
    blocks = sch.split_blocks(latent, block)
    h, w = (hw, hw) if isinstance(hw, int) else hw
    tpf = (h // 8 // 2) * (w // 8 // 2)
    return blocks, sch.make_tasks(len(blocks), steps), num_cat, steps, tpf, sch.split_layers(num_layers, ranks)


# Assumptions of the projection (stated, not measured): sustained bf16 throughput
# as a fraction of the dense peak, and the link between neighbouring GPUs.
EFFICIENCY = 0.4
GPUS = {
    "8x RTX 4090, PCIe (no P2P, via host)": dict(short="RTX 4090", peak_flops=165e12, bandwidth=12e9,
                                                 latency_s=30e-6, link="PCIe through the host", mem_gb=24),
    "8x H100 SXM, NVLink": dict(short="H100", peak_flops=989e12, bandwidth=300e9, latency_s=10e-6,
                                link="NVLink", mem_gb=80),
}
MODELS = {
    "Wan2.1-1.3B 480x832": dict(layers=30, dim=1536, ffn=8960, hw=(480, 832), params=1.3e9),
    "Wan2.1-14B 720x1280": dict(layers=40, dim=5120, ffn=13824, hw=(720, 1280), params=14e9),
}
PROJECT_CASES = ((1, 8), (8, 4), (8, 8), (8, 16))  # (ranks, block); the first is the 1-GPU reference


def flops_model(dim, ffn, flops, batch=2, text_len=512):
    """Per-layer cost coefficients from FLOPs: projections and FFN per token, attention per token pair."""
    per_token = batch * (12 * dim * dim + 4 * dim * ffn + 4 * text_len * dim)
    per_pair = batch * 4 * dim
    return {"layer": [0.0, per_token / flops, per_pair / flops], "sched_s": 2e-3}


def _project_one(g, m, frames, steps, num_cat, ranks, block):
    blocks, tasks, nc, st, tpf, layers = plan_for(frames, block, num_cat, steps, ranks, m["layers"], m["hw"])
    model = dict(flops_model(m["dim"], m["ffn"], EFFICIENCY * g["peak_flops"]), fixed=[0.0] * ranks)
    bytes_per_token = 2 * m["dim"] * 2  # CFG rows, bf16
    out = simulate(blocks, st, nc, tpf, layers, model, latency_s=g["latency_s"], bandwidth=g["bandwidth"],
                   packet_bytes_per_token=bytes_per_token)
    n = max(b - a for a, b in layers)
    cache = n * 2 * num_cat * tpf * m["dim"] * 2 * 2  # K and V, CFG rows, bf16
    mem = (n * m["params"] / m["layers"] * 2 + cache) / 1e9
    # One steady-state hop against one stage's compute for the same task (the largest stage).
    task = tasks[len(tasks) // 2]
    nq, nkv = task_tokens(task, blocks, nc, st, tpf)
    packet = nq * bytes_per_token
    hop = {"packet_mb": packet / 1e6, "hop_s": g["latency_s"] + packet / g["bandwidth"],
           "stage_compute_s": n * float(np.dot(model["layer"], features(nq, nkv)))}
    return {"ranks": ranks, "block": block, "layers": [b - a for a, b in layers], "wall_s": out["wall_s"],
            "idle": out["idle"], "mem_gb": mem, "hop": hop}


def projection(frames=1025, steps=50, num_cat=8):
    """Projected wall time, idle and per-rank memory for the real models on 8 GPUs, plus balanced rank counts."""
    rows, balanced = [], []
    for gname, g in GPUS.items():
        for mname, m in MODELS.items():
            base = None
            for ranks, block in PROJECT_CASES:
                r = _project_one(g, m, frames, steps, num_cat, ranks, block)
                base = base or r["wall_s"]
                rows.append(dict(r, gpus=gname, model=mname, speedup=base / r["wall_s"]))
            # Rank counts next to 8 that divide the layer count, when 8 does not.
            ranks = PROJECT_CASES[-1][0]
            if m["layers"] % ranks:
                divisors = [d for d in range(2, m["layers"] + 1) if m["layers"] % d == 0]
                for d in (max(d for d in divisors if d < ranks), min(d for d in divisors if d > ranks)):
                    r = _project_one(g, m, frames, steps, num_cat, d, 8)
                    balanced.append(dict(r, gpus=gname, model=mname, speedup=base / r["wall_s"]))
    return {"frames": frames, "steps": steps, "num_cat": num_cat, "efficiency": EFFICIENCY, "gpus": GPUS,
            "models": MODELS, "rows": rows, "balanced": balanced}


def project(frames=1025, steps=50, num_cat=8):
    data = projection(frames, steps, num_cat)
    print(f"projection: {frames} frames, {steps} steps, num_cat {num_cat}, CFG, bf16\n")
    print("| GPUs | model | ranks | block | wall s | speed-up vs 1 GPU | max idle | weights+cache GB/rank |")
    print("|---|---|---|---|---|---|---|---|")
    for r in data["rows"]:
        print(f"| {r['gpus']} | {r['model']} | {r['ranks']} | {r['block']} | {r['wall_s']:.0f} | {r['speedup']:.2f}x | "
              f"{max(r['idle']):.0%} | {r['mem_gb']:.1f} |")
    print()
    for r in data["balanced"]:
        print(f"balanced: {r['gpus']}, {r['model']}: {r['ranks']} ranks, block {r['block']}: {r['wall_s']:.0f} s, "
              f"max idle {max(r['idle']):.0%}")
    return data


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--project", action="store_true", help="project Wan2.1 1.3B/14B at 1025 frames on 8 GPUs")
    p.add_argument("--calibrate", help="trace.json of a measured run (launch/gen.py --trace)")
    p.add_argument("--calib-frames", type=int)
    p.add_argument("--calib-block", type=int)
    p.add_argument("--calib-num-cat", type=int)
    p.add_argument("--calib-ranks", type=int)
    p.add_argument("--frames", type=int)
    p.add_argument("--block", type=int)
    p.add_argument("--num-cat", type=int)
    p.add_argument("--ranks", type=int)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hw", type=int, default=96, help="square frame size in pixels")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    if args.project:
        _write(args.json, project())
        return
    if args.calibrate is None:
        p.error("give --calibrate TRACE with the calibration and target settings, or --project")
    cal = plan_for(args.calib_frames, args.calib_block, args.calib_num_cat, args.steps, args.calib_ranks,
                   args.layers, args.hw)
    model = calibrate(args.calibrate, cal)
    blocks, _, num_cat, steps, tpf, layers = plan_for(args.frames, args.block, args.num_cat, args.steps, args.ranks,
                                                      args.layers, args.hw)
    # Fixed per-rank costs transfer by role: first rank, middle ranks (none fitted: 0), last rank.
    fixed = model["fixed"]
    model = dict(model, fixed=[fixed[0]] + [0.0] * (args.ranks - 2) + [fixed[-1]] if args.ranks > 1
                 else [fixed[0] + fixed[-1]])
    out = simulate(blocks, steps, num_cat, tpf, layers, model)
    result = {"model": model, "prediction": out, "hop": HOP}
    print(json.dumps(result))
    _write(args.json, result)


def _write(path, data):
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=1)


if __name__ == "__main__":
    main()
