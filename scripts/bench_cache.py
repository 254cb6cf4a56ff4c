"""Timestep feature caching (``cache`` section), measured side by side in one run.

    python scripts/bench_cache.py                    # speed, memory and fidelity (about 15 min here)
    python scripts/bench_cache.py --quick --json /tmp/cache.json

* speed: the denoising loop (decode off, the real launcher, one CPU thread per rank) on 1 and 2 ranks,
  uncached and with ``taylor`` forecasts at ``cache.level`` model and stage for each interval, on the
  benchmarks' config; the speed-up is over the uncached run on as many ranks; the share of layer
  FLOPs skipped comes from the task list (the forecast tasks' layer work over all of it, FLOPs as
  ``simulate.flops_model`` counts them); memory is each rank's peak of the stage caches (neighbour
  K/V and forecast histories) from the runs' ``stats.json``, at two lengths;
* fidelity: every policy and interval at level model (taylor also at stage, and with the newer
  neighbour's K/V dropped instead of reused), one rank (N ranks compute the same, see
  tests/test_cache.py), on the trained ``tiny`` preset and on ``tiny-random``: relative L2 of the final
  latents and PSNR of the decoded frames against the uncached run of the same seed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "scripts")):
    if p not in sys.path:
        sys.path.insert(0, p)

import bench_speedup  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "tiny-random.yaml")
FIDELITY_POLICIES = (("reuse", 1), ("taylor", 1), ("taylor", 2), ("newton", 1), ("newton", 2))


def cache_args(policy: str, level: str, interval: int, order: int = 1, neighbour: str = "reuse") -> list[str]:
    if policy == "none":
        return []
    return ["--set", f"cache.policy={policy}", "--set", f"cache.level={level}", "--set", f"cache.interval={interval}",
            "--set", f"cache.order={order}", "--set", f"cache.neighbour={neighbour}"]


def skipped_flops(frames: int, interval: int, config: str = CONFIG) -> float:
    """Share of the layers' FLOPs in forecast tasks (the same at either level: both skip every layer)."""
    import numpy as np

    import simulate
    from dualpar import schedule as sch
    from dualpar.config import load_config
    from dualpar.models.tiny import TINY_TRANSFORMER

    cfg = load_config(config)
    cfg.video.frames = frames
    cfg.cache.policy, cfg.cache.interval = "taylor", interval
    steps, num_cat = cfg.sampling.steps, cfg.parallel.num_cat
    blocks = sch.split_blocks(cfg.video.latent_frames, cfg.parallel.block)
    tasks = sch.make_tasks(len(blocks), steps, cfg.cache.full_steps(steps))
    tpf = (cfg.video.height // 16) * (cfg.video.width // 16)
    dim = TINY_TRANSFORMER["num_attention_heads"] * TINY_TRANSFORMER["attention_head_dim"]
    coef = simulate.flops_model(dim, TINY_TRANSFORMER["ffn_dim"], 1.0, batch=1, text_len=32)["layer"]

    def flops(t):
        nq, nkv = simulate.task_tokens(t, blocks, num_cat, steps, tpf)
        return float(np.dot(coef, simulate.features(nq, nkv)))

    return sum(flops(t) for t in tasks if not t.full) / sum(flops(t) for t in tasks)


def latents_of(out: str):
    from safetensors.torch import load_file

    man = json.load(open(os.path.join(out, "manifest.json")))
    return [load_file(os.path.join(out, b["latents"]))["latents"] for b in man["blocks"]]


def rel_l2(a, b) -> float:
    return math.sqrt(sum(float(((x - y) ** 2).sum()) for x, y in zip(a, b))) / math.sqrt(
        sum(float((y ** 2).sum()) for y in b))


def run_speed(model_args: list[str], frames: int, ranks: list[int], cases: list[tuple], repeat: int,
              work: str) -> list[dict]:
    """Every case on every rank count, best loop of ``repeat`` (alternating), with the relative L2 of its
    latents against the uncached run of the same seed (the same on any rank count)."""
    best: dict[tuple, dict] = {}
    lat: dict[tuple, list] = {}
    for rep in range(repeat):
        for n in ranks:  # alternating, so a slow spell of this shared machine hits every case alike
            for policy, level, interval in cases:
                out = os.path.join(work, "run")
                s = bench_speedup.run_once(n, out, [*model_args, "--frames", str(frames),
                                                    *cache_args(policy, level, interval)])
                key = (n, policy, level, interval)
                print(f"  run {rep + 1}: {n} rank(s) {policy} {level} interval {interval}: loop {s['loop_s']:.2f} s",
                      flush=True)
                if rep == 0 and n == ranks[0]:
                    lat[(policy, level, interval)] = latents_of(out)
                if key not in best or s["loop_s"] < best[key]["loop_s"]:
                    best[key] = s
    rows = []
    for (n, policy, level, interval), s in best.items():
        base = best[(n, "none", "model", 1)]
        rows.append({"ranks": n, "policy": policy, "level": level if policy != "none" else "-", "interval": interval,
                     "loop_s": s["loop_s"], "speedup": base["loop_s"] / s["loop_s"],
                     "rel_l2": rel_l2(lat[(policy, level, interval)], lat[("none", "model", 1)]),
                     "idle": [1 - r["busy_s"] / r["loop_s"] for r in s["ranks"]],
                     "cache_mb": [r["feature_cache_peak_mb"] for r in s["ranks"]],
                     "added_mb": [r["feature_cache_peak_mb"] - b["feature_cache_peak_mb"]
                                  for r, b in zip(s["ranks"], base["ranks"])]})
    return rows


def speed_cases(intervals, levels=("model", "stage")) -> list[tuple]:
    return [("none", "model", 1)] + [("taylor", lvl, i) for lvl in levels for i in intervals]


def run_speed_section(frames, ranks, intervals, repeat, mem_frames, work) -> dict:
    model_args = ["--config", CONFIG]
    rows = run_speed(model_args, frames, ranks, speed_cases(intervals), repeat, work)
    for r in rows:
        r["flops_skipped"] = 0.0 if r["policy"] == "none" else skipped_flops(frames, r["interval"])
    # memory at other lengths, on the most ranks: bounded by the queue (min(steps, blocks) blocks), so
    # the same at every length whose queue fills, and never more
    n = max(ranks)
    memory = [dict(r, frames=frames) for r in rows if r["ranks"] == n and r["interval"] in (1, intervals[0])]
    for f in mem_frames:
        memory += [dict(r, frames=f) for r in run_speed(model_args, f, [n], speed_cases(intervals[:1]), 1, work)]
    memory.sort(key=lambda r: (r["frames"], r["level"]))
    return {"frames": frames, "config": os.path.relpath(CONFIG, ROOT), "repeat": repeat, "rows": rows,
            "memory": memory}


def run_matched(presets, frames, size, steps, ranks, intervals, repeat, work) -> list[dict]:
    """dualpar at the peer's settings (bench_cache_peer.py): taylor at level model, per preset."""
    out = []
    for preset in presets:
        args = ["--preset", preset, "--height", str(size), "--width", str(size), "--steps", str(steps)]
        rows = run_speed(args, frames, ranks, speed_cases(intervals, ("model",)), repeat, work)
        out.append({"preset": preset, "frames": frames, "size": size, "steps": steps, "rows": rows})
    return out


def run_fidelity(preset: str, frames: int, size: int, intervals: list[int], policies=FIDELITY_POLICIES) -> dict:
    import torch

    from dualpar.comm import Comm
    from dualpar.config import Config, apply_model_defaults
    from dualpar.engine import Engine
    from dualpar.models import loader
    from dualpar.output.decode import StreamingDecoder

    torch.set_num_threads(1)
    base_cfg = Config()
    base_cfg.model.preset = preset
    apply_model_defaults(base_cfg)
    base_cfg.video.frames, base_cfg.video.height, base_cfg.video.width = frames, size, size
    vae = loader.load_vae(base_cfg)

    def run(**cache):
        cfg = Config.from_dict(base_cfg.to_dict())
        for k, v in cache.items():
            setattr(cfg.cache, k, v)
        cfg.validate()
        eng = Engine(cfg, Comm())
        eng.set_prompt(cfg.sampling.prompt, cfg.sampling.negative_prompt)
        t0 = time.perf_counter()
        st = eng.generate(keep_latents=True)
        dec = StreamingDecoder(vae)
        with torch.no_grad():
            video = torch.cat([dec.decode_block(b) for b in st.blocks], dim=2).clamp(-1, 1)
        return st.blocks, video, time.perf_counter() - t0, st

    ref_lat, ref_vid, _, _ = run()
    ref_norm = math.sqrt(sum(float((b ** 2).sum()) for b in ref_lat))
    cases = [dict(policy=p, order=o, level="model", interval=i) for p, o in policies for i in intervals]
    cases += [dict(policy="taylor", order=1, level="stage", interval=i) for i in intervals]
    cases += [dict(policy="taylor", order=1, level="model", interval=intervals[0], neighbour="drop")]
    rows = []
    for case in cases:
        lat, vid, secs, st = run(**case)
        rel = math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(lat, ref_lat))) / ref_norm
        mse = float(((vid - ref_vid) ** 2).mean())
        psnr = 10 * math.log10(4.0 / max(mse, 1e-12))  # frames in [-1, 1]: peak-to-peak 2
        rows.append(dict(case, neighbour=case.get("neighbour", "reuse"), rel_l2=rel, psnr_db=psnr, seconds=secs))
        print(f"  {preset}: {case}: relative L2 {rel:.4f}, PSNR {psnr:.1f} dB", flush=True)
    return {"preset": preset, "frames": frames, "size": size, "steps": base_cfg.sampling.steps,
            "guidance": base_cfg.sampling.guidance, "rows": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=1025, help="speed runs: frames (benchmarks' config)")
    p.add_argument("--mem-frames", type=int, nargs="+", default=[129, 513], help="other lengths of the memory check")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--fid-frames", type=int, default=257, help="fidelity runs: frames at 96x96")
    p.add_argument("--fid-size", type=int, default=96)
    p.add_argument("--presets", nargs="+", default=["tiny", "tiny-random"])
    p.add_argument("--quick", action="store_true", help="tiny lengths, one repeat, one interval (a smoke run)")
    p.add_argument("--matched-frames", type=int, default=65,
                   help="runs at the peer's settings (scripts/bench_cache_peer.py): frames at 96x96, 10 steps")
    p.add_argument("--skip", nargs="+", default=[], choices=("speed", "fidelity", "matched"))
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args(argv)
    size, steps = 96, 10
    policies = FIDELITY_POLICIES
    if args.quick:  # a smoke run of every part: short videos, one repeat, one interval, the random preset
        args.frames, args.mem_frames, args.repeat, args.intervals = 33, [65], 1, [2]
        args.fid_frames, args.fid_size, args.matched_frames, size, steps = 33, 32, 33, 32, 6
        args.presets, policies, args.ranks = ["tiny-random"], (("taylor", 1),), [2]
        matched_ranks = [1]
    else:
        matched_ranks = args.ranks
    out = {"intervals": args.intervals}
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as work:
        if "speed" not in args.skip:
            out["speed"] = run_speed_section(args.frames, args.ranks, args.intervals, args.repeat, args.mem_frames,
                                             work)
            print(speed_table(out["speed"]) + "\n\n" + memory_table(out["speed"]), flush=True)
        if "matched" not in args.skip:
            out["matched"] = run_matched(args.presets, args.matched_frames, size, steps, matched_ranks, args.intervals,
                                         args.repeat, work)
        if "fidelity" not in args.skip:
            out["fidelity"] = [run_fidelity(pr, args.fid_frames, args.fid_size, args.intervals, policies)
                               for pr in args.presets]
            print(fidelity_table(out["fidelity"]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def speed_table(data: dict) -> str:
    lines = ["| ranks | policy | level | interval | loop s | speed-up | layer FLOPs skipped | relative L2 "
             "| idle per rank |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(data["rows"], key=lambda r: (r["ranks"], r["level"] != "-", r["level"], r["interval"])):
        idle = " / ".join(f"{x:.0%}" for x in r["idle"])
        lines.append(f"| {r['ranks']} | {r['policy']} | {r['level']} | {r['interval']} | {r['loop_s']:.2f} | "
                     f"{r['speedup']:.2f}x | {r['flops_skipped']:.0%} | {r['rel_l2']:.4f} | {idle} |")
    return "\n".join(lines)


def memory_table(data: dict) -> str:
    lines = ["| frames | ranks | policy | level | cache MB per rank | added by caching, MB per rank |",
             "|---|---|---|---|---|---|"]
    for r in data["memory"]:
        lines.append(f"| {r['frames']} | {r['ranks']} | {r['policy']} | {r['level']} | "
                     f"{' / '.join(f'{c:.2f}' for c in r['cache_mb'])} | {' / '.join(f'{a:+.2f}' for a in r['added_mb'])} |")
    return "\n".join(lines)


def fidelity_table(data: list[dict]) -> str:
    lines = ["| model | policy | order | level | neighbour K/V | interval | relative L2 | PSNR dB |",
             "|---|---|---|---|---|---|---|---|"]
    for d in data:
        for r in d["rows"]:
            order = r["order"] if r["policy"] != "reuse" else "-"
            lines.append(f"| {d['preset']} | {r['policy']} | {order} | {r['level']} | {r['neighbour']} | {r['interval']} | "
                         f"{r['rel_l2']:.4f} | {r['psnr_db']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
