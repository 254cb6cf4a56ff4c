"""Balanced stages (``parallel.split``, ``output.decode_on``), measured side by side in one run.

    python scripts/bench_balance.py                      # 1025 frames, about 20 minutes here
    python scripts/bench_balance.py --quick --json /tmp/balance.json

Every case runs the real launcher (torchrun + ``launch/gen.py``, one CPU thread per rank) with
decoding on, on the benchmarks' config (tiny-random, 8 layers):

* 3 ranks, decoding on rank 0: ``even`` (with ``--trace``; as ``parallel.split=auto`` with an empty
  profile file it runs the even split and stores the profile it measured) against ``auto`` (the split
  that profile gives);
* 2 ranks: the even split with decoding on the first rank and on the last, and ``auto`` for each
  (each from the profile its even run measured);
* the simulator's prediction of each ``auto`` run's loop, from its even run's trace: the fit of
  ``simulate.calibrate(per_rank=True)`` (each rank its own layer coefficients: the writer thread's
  decoding slows the rank it shares cores with) and the writer itself, its traced time per block
  behind its queue of 8 blocks, where the rank waits when the queue is full (``simulate``'s
  ``decode=(rank, s, queue)``). ``--repredict`` computes them again from a kept run.

Cases alternate and the best loop of ``--repeat`` is kept (the machine is shared and noisy); the auto
runs reuse the profile of the first even run of their case. Reported per case: the split, the
denoising loop (the slowest rank's), the run's end-to-end time (``stats.json``'s ``total_s``:
loading the text encoder, the loop, the last blocks' decoding), the wall time of the launcher, idle
per rank (1 - busy / loop) and the decoding rank's decode-and-write seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for p in (ROOT, os.path.join(ROOT, "scripts")):
    if p not in sys.path:
        sys.path.insert(0, p)

CONFIG = os.path.join(ROOT, "configs", "tiny-random.yaml")


def run(n: int, out: str, extra: list[str]) -> tuple[dict, float, str]:
    """``launch/gen.py`` on ``n`` ranks with decoding on: (stats.json, launcher wall seconds, stderr)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
           os.path.join(ROOT, "launch", "gen.py"), "--no-progress", "--overwrite", "--out", out, *extra]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        sys.exit(f"run failed ({' '.join(extra)}):\n{res.stderr[-3000:]}")
    with open(os.path.join(out, "stats.json")) as f:
        return json.load(f), wall, res.stderr


def predict(trace: str, stats: dict, cfg_args: dict, counts: list[int], decode_rank: int) -> dict:
    """The simulator's loop time for ``counts``, calibrated on the even run (its trace and its loop)."""
    import simulate
    from dualpar import schedule as sch

    frames, block, num_cat, steps, hw = (cfg_args[k] for k in ("frames", "block", "num_cat", "steps", "hw"))
    even = stats["layers"]
    cal = simulate.plan_for(frames, block, num_cat, steps, len(even), sum(even), hw)
    cal = cal[:5] + (sch.split_layers(sum(even), len(even), even),)
    model = simulate.calibrate(trace, cal, per_rank=True)
    blocks, _, nc, st, tpf, _ = simulate.plan_for(frames, block, num_cat, steps, len(counts), sum(counts), hw)

    # The decoding runs on the writer thread, behind a queue of output.queue_blocks (8) blocks: its
    # traced spans give its time per block; the ranks' spans it slowed give each rank its own layer
    # coefficients.
    events = json.load(open(trace))["traceEvents"]
    spans = [e["dur"] / 1e6 for e in events if e.get("ph") == "X" and e.get("cat") == "decode"]
    decode = (decode_rank, sum(spans) / max(len(spans), 1), 8)

    def loop(c):
        return simulate.simulate(blocks, st, nc, tpf, sch.split_layers(sum(c), len(c), c), model,
                                 decode=decode)["wall_s"]

    raw, raw_even = loop(counts), loop(even)
    return {"predicted_loop_s": raw, "predicted_even_loop_s": raw_even}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=1025)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="89 frames at 32x48, one repeat (for tests)")
    p.add_argument("--json", help="write every run and the summary here")
    p.add_argument("--keep", help="keep the runs (videos, traces, profiles) here instead of a temporary directory")
    p.add_argument("--repredict", action="store_true",
                   help="no runs: the simulator's predictions again from --json's runs and the traces in --keep")
    args = p.parse_args()
    from dualpar import schedule as sch
    from dualpar.config import load_config

    cfg = load_config(CONFIG)
    base = ["--config", CONFIG, "--frames", str(args.frames)]
    if args.quick:
        args.frames, args.repeat = 89, 1
        base = ["--config", CONFIG, "--frames", "89", "--height", "32", "--width", "48", "--block", "4", "--num-cat",
                "2", "--steps", "4", "--set", "model.text_len=32"]
        cfg.video.height, cfg.video.width, cfg.parallel.block, cfg.parallel.num_cat, cfg.sampling.steps = 32, 48, 4, 2, 4
    geom = dict(frames=args.frames, block=cfg.parallel.block, num_cat=cfg.parallel.num_cat, steps=cfg.sampling.steps,
                hw=(cfg.video.height, cfg.video.width))
    # (name, ranks, decode_on, auto?) ; each auto case takes the profile of its even case
    cases = [("3 ranks, even", 3, "first", False), ("3 ranks, auto", 3, "first", True),
             ("2 ranks, even, decode first", 2, "first", False), ("2 ranks, auto, decode first", 2, "first", True),
             ("2 ranks, even, decode last", 2, "last", False), ("2 ranks, auto, decode last", 2, "last", True)]
    if args.repredict:
        if not (args.json and args.keep):
            p.error("--repredict needs --json (the earlier run's figures) and --keep (its traces)")
        with open(args.json) as f:
            data = json.load(f)
        best = {r["case"]: r for r in data["best"]}
        even_split = {n: [b - a for a, b in sch.split_layers(8, n)] for n in (2, 3)}
        for name, n, where, auto in cases:
            if auto:
                trace = os.path.join(args.keep, f"trace-{n}-{where}.json")
                best[name].update(predict(trace, {"layers": even_split[n]}, geom, best[name]["layers"],
                                          0 if where == "first" else n - 1))
        report(cases, best, data["runs"], args)
        return
    best: dict[str, dict] = {}
    runs = []
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or scratch
        os.makedirs(tmp, exist_ok=True)
        for rep in range(args.repeat):
            for name, n, where, auto in cases:
                key = f"{n}-{where}"
                prof = os.path.join(tmp, f"profile-{key}.json")
                extra = [*base, "--set", f"output.decode_on={where}"]
                if not auto:  # split=auto on an empty profile file: the even split, and the profile it measured
                    if rep == 0:
                        extra += ["--set", "parallel.split=auto", "--set", f"parallel.profile={prof}", "--trace"]
                else:
                    extra += ["--set", "parallel.split=auto", "--set", f"parallel.profile={prof}.use"]
                    with open(prof) as f, open(prof + ".use", "w") as g:  # never updated by the auto runs
                        g.write(f.read())
                out = os.path.join(tmp, name.replace(" ", "_").replace(",", ""))
                stats, wall, err = run(n, out, extra)
                if not auto and rep == 0:
                    best.setdefault(name, {})["trace"] = os.path.join(tmp, f"trace-{key}.json")
                    best[name]["calib"] = stats
                    os.replace(os.path.join(out, "trace.json"), best[name]["trace"])
                row = dict(case=name, ranks=n, decode_on=where, split="auto" if auto else "even", layers=stats["layers"],
                           loop_s=stats["loop_s"], total_s=stats["total_s"], wall_s=wall,
                           idle=[1 - r["busy_s"] / max(r["loop_s"], 1e-9) for r in stats["ranks"]],
                           decode_s=max(r["output_s"] for r in stats["ranks"]))
                runs.append(row)
                print(f"  run {rep + 1}: {name}: split {','.join(map(str, row['layers']))}, loop {row['loop_s']:.1f} s, "
                      f"end to end {row['total_s']:.1f} s", flush=True)
                if "loop_s" not in best.get(name, {}) or row["loop_s"] < best[name]["loop_s"]:
                    best.setdefault(name, {}).update(row)
        for name, n, where, auto in cases:
            if auto:
                even = best[name.replace("auto", "even")]
                best[name].update(predict(even["trace"], even["calib"], geom, best[name]["layers"],
                                          0 if where == "first" else n - 1))
    report(cases, best, runs, args)


def report(cases, best, runs, args) -> None:
    print(f"\n{'case':<30} {'split':>6} {'loop s':>7} {'vs even':>7} {'end to end s':>12} {'wall s':>7} "
          f"{'decode s':>8} {'predicted loop':>14}  idle per rank")
    summary = []
    for name, n, where, auto in cases:
        r = best[name]
        even = best[name.replace("auto", "even")]
        pred = (f"{r['predicted_loop_s']:.1f} ({r['predicted_loop_s'] / r['loop_s'] - 1:+.0%})"
                if "predicted_loop_s" in r else "-")
        print(f"{name:<30} {','.join(map(str, r['layers'])):>6} {r['loop_s']:7.1f} {even['loop_s'] / r['loop_s']:6.2f}x "
              f"{r['total_s']:12.1f} {r['wall_s']:7.1f} {r['decode_s']:8.1f} {pred:>14}  "
              + " ".join(f"{x:.0%}" for x in r["idle"]))
        summary.append({k: v for k, v in r.items() if k not in ("trace", "calib")})
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"config": CONFIG, "frames": args.frames, "repeat": args.repeat, "runs": runs,
                       "best": summary, "date": time.strftime("%Y-%m-%d")}, fh, indent=2)


if __name__ == "__main__":
    main()
