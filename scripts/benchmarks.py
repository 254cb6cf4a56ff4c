"""Regenerate BENCHMARKS.md: every benchmark of this project, side by side in one run on this machine.

    pip install -e '.[cpu,bench]'                         # matplotlib, for the plots
    python scripts/benchmarks.py                          # full run; writes BENCHMARKS.md and docs/benchmarks/
    python scripts/benchmarks.py --quick --out /tmp/b/BENCHMARKS.md   # smoke test: tiny lengths, one repeat
    python scripts/benchmarks.py --render-only            # markdown and plots again from docs/benchmarks/results.json
    python scripts/benchmarks.py --sections speedup       # re-run some sections, keep the others' results

Each section is a ``Section(key, run, render)``: ``run`` measures, usually by
calling one of the benchmark scripts with ``--json``, and returns its figures
(stored under ``key`` in results.json beside the plots); ``render`` turns the
stored figures into markdown (and plots). Adding a benchmark is one more
entry in ``SECTIONS`` (its full and quick parameters go in ``SETTINGS``).
Every number in the markdown comes from results.json.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import bench  # noqa: E402
import bench_causal  # noqa: E402
import bench_speedup  # noqa: E402
import simulate  # noqa: E402
from dualpar.output.rundir import atomic_write  # noqa: E402

DEFAULT_CONFIG = os.path.join("configs", "tiny-random.yaml")
RANKS = 2  # the pipelined runs; this machine has 2 cores
# DualParal's own claim (arXiv 2505.21070), quoted beside the projection, not measured here.
DUALPAR_HEADLINE = {"latency": 6.54, "memory": 1.48, "gpus": "8x RTX 4090"}

SETTINGS = {
    "full": dict(sweep_frames=[65, 129, 257, 513, 1025], speedup_frames=None, repeat=2,
                 sim_calib=dict(frames=257, block=8, num_cat=4), sim_target=dict(frames=513, block=4, num_cat=2),
                 causal_args=[], comm_args=[], quality_args=["--prompts", "1"],  # else the scripts' defaults
                 cache_args=[], peer_args=["--repeat", "4"], balance_args=[],
                 causal_wan_args=["--frames", "129", "--height", "480", "--width", "832", "--budgets", "8",
                                  "--policies", "window,focused", "--repeat", "1"]),
    # Smoke test of the whole pipeline: one short length, one repeat, a small simulator case; the causal
    # section on bench_causal.py's quick cases with one repeat and the staggered schedule only (2 launches).
    "quick": dict(sweep_frames=[33], speedup_frames=33, repeat=1,
                  sim_calib=dict(frames=65, block=8, num_cat=4), sim_target=dict(frames=33, block=4, num_cat=2),
                  causal_args=["--quick", "--schedules", "staggered"],
                  comm_args=["--messages", "5", "--ranks", "2", "--delay", "0.02"], quality_args=["--quick"],
                  cache_args=["--quick"], peer_args=["--preset", "tiny-random", "--frames", "9", "--size", "32",
                                                     "--steps", "6", "--repeat", "1"], balance_args=["--quick"],
                  causal_wan_args=["--quick", "--policies", "focused", "--repeat", "1"]),
}


@dataclass
class Ctx:
    settings: dict
    config: str  # path as given (relative to the repo when it lies inside)
    work: str  # scratch directory of the runs
    plots: str  # PNGs and results.json
    md_dir: str  # directory of the markdown, for relative links
    results: dict = field(default_factory=dict)

    def save_plot(self, fig, name: str, alt: str) -> str:
        """Write the figure as a PNG and return its markdown image link."""
        path = os.path.join(self.plots, name)
        fig.savefig(path, dpi=110, bbox_inches="tight", metadata={"Software": None})
        import matplotlib.pyplot as plt

        plt.close(fig)
        return f"![{alt}]({os.path.relpath(path, self.md_dir)})"


@dataclass
class Section:
    key: str
    run: Callable[[Ctx], dict] | None  # None: renders from other sections' figures
    render: Callable[[dict | None, Ctx], str]


def run_script(name: str, *args) -> None:
    cmd = [sys.executable, os.path.join(ROOT, "scripts", name), *map(str, args)]
    print(f"$ {shlex.join(['python', 'scripts/' + name, *map(str, args)])}", flush=True)
    res = subprocess.run(cmd, cwd=ROOT)
    if res.returncode:
        sys.exit(f"scripts/{name} failed (exit status {res.returncode})")


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def command(name: str, *args) -> str:
    """How a reader reproduces a section by hand (scratch paths left out)."""
    return shlex.join(["python", f"scripts/{name}", *map(str, args)])


# -- machine ---------------------------------------------------------------------------------


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ram = None
    try:
        with open("/proc/meminfo") as f:
            ram = next(int(ln.split()[1]) for ln in f if ln.startswith("MemTotal")) / 2**20
    except (OSError, StopIteration):
        pass
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    versions = {}
    for dist in ("torch", "diffusers", "transformers", "av"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gib": ram, "gpus": gpus, "os": platform.system(),
            "python": platform.python_version(), "versions": versions, "date": time.strftime("%Y-%m-%d")}


def model_info(config: str) -> dict:
    import torch

    from dualpar.config import load_config
    from dualpar.models import loader
    from dualpar.models.tiny import TINY_TRANSFORMER

    torch.set_num_threads(1)
    cfg = load_config(os.path.join(ROOT, config))
    info = {"path": cfg.model.path, "preset": cfg.model.preset, "layers": loader.num_layers(cfg),
            "height": cfg.video.height, "width": cfg.video.width, "frames": cfg.video.frames,
            "steps": cfg.sampling.steps, "scheduler": cfg.sampling.scheduler, "guidance": cfg.sampling.guidance,
            "block": cfg.parallel.block, "num_cat": cfg.parallel.num_cat, "dtype": cfg.model.dtype}
    if not cfg.model.path:
        info["width_dim"] = TINY_TRANSFORMER["num_attention_heads"] * TINY_TRANSFORMER["attention_head_dim"]
    return info


SCHEDULER_NAMES = {"unipc": "UniPC", "euler": "Euler"}


def render_header(ctx: Ctx) -> str:
    meta = ctx.results["meta"]
    m, md = meta["machine"], meta["model"]
    v = m["versions"]
    ram = f", {m['ram_gib']:.0f} GiB" if m["ram_gib"] else ""
    gpus = ", ".join(m["gpus"]) if m["gpus"] else "no GPU"
    if md["path"]:
        model = f"`{md['path']}` ({md['layers']} layers, {md['dtype']})"
    else:
        kind = "seeded random weights" if md["preset"] == "tiny-random" else "trained on the synthetic world"
        model = (f"the embedded `{md['preset']}` preset (Wan2.1 architecture, {md['layers']} layers, "
                 f"width {md['width_dim']}, {kind})")
    dates = sorted({d for d in meta["dates"].values()})
    minutes = sum(meta["durations"].values()) / 60
    out = ["# Benchmarks", "",
           "Everything below (tables, plots, the raw figures in "
           f"`{os.path.relpath(os.path.join(ctx.plots, 'results.json'), ctx.md_dir)}`) is regenerated by one "
           "command, in one run on one machine:", "",
           "```bash", "pip install -e '.[cpu,bench]' && python scripts/benchmarks.py", "```", "",
           f"({minutes:.0f} min for the run below; `--render-only` rewrites this file and the plots from "
           "results.json, `--sections KEY ...` re-runs only some sections.)", ""]
    if meta.get("quick"):
        out += ["**Quick mode** (`--quick`): short videos and one repeat, a smoke test of the script; "
                "these are not figures to quote.", ""]
    out += [f"Machine: {m['cpu']}, {m['cores']} cores{ram}, {gpus}; {m['os']}, Python {m['python']}, "
            f"torch {v['torch']}, diffusers {v['diffusers']}, transformers {v['transformers']}, PyAV {v['av']}. "
            f"Date: {dates[0] if len(dates) == 1 else dates[0] + ' to ' + dates[-1]}.",
            f"Model: {model}, {md['height']}x{md['width']}, {md['steps']} "
            f"{SCHEDULER_NAMES.get(md['scheduler'], md['scheduler'])} steps, guidance {md['guidance']:g}, "
            f"block {md['block']}, num_cat {md['num_cat']} (`{ctx.config}`). One CPU thread per process. "
            "Figures are single runs on a shared machine: read ratios, not absolute times."]
    return "\n".join(out)


# -- length sweep ----------------------------------------------------------------------------


def trace_excerpt(path: str, iterations: int = 3) -> dict:
    """A few consecutive iterations of a traced run, as spans relative to the window's start (ms).

    The window is the one holding the most writer-thread spans (decode, write),
    the most central among equals, so that every kind of span shows.
    """
    events = [e for e in read_json(path)["traceEvents"] if e.get("ph") == "X"]
    starts: dict[int, float] = {}
    for e in events:
        if e["cat"] == "compute" and e["pid"] == 0:
            it = e["args"]["iteration"]
            starts[it] = min(starts.get(it, e["ts"]), e["ts"])
    its = sorted(starts)
    loop_end = max(e["ts"] + e["dur"] for e in events if e["tid"] == "MainThread")
    n = min(iterations, len(its))

    def window(i):
        return starts[its[i]], (starts[its[i + n]] if i + n < len(its) else loop_end)

    def writer_spans(i):
        t0, t1 = window(i)
        return sum(1 for e in events if e["tid"] != "MainThread" and e["ts"] < t1 and e["ts"] + e["dur"] > t0)

    mid = (len(its) - n) / 2
    best = max(range(len(its) - n + 1), key=lambda i: (writer_spans(i), -abs(i - mid)))
    t0, t1 = window(best)
    spans = []
    for e in sorted(events, key=lambda e: e["ts"]):
        a, b = max(e["ts"], t0), min(e["ts"] + e["dur"], t1)
        if b > a:
            thread = {"MainThread": "", "RunWriter": " writer"}.get(e["tid"], f" {e['tid']}")
            row = f"rank {e['pid']}{thread}"
            spans.append({"row": row, "pid": e["pid"], "cat": e["cat"], "name": e["name"],
                          "start_ms": (a - t0) / 1e3, "dur_ms": (b - a) / 1e3})
    return {"first_iteration": its[best], "iterations": n, "length_ms": (t1 - t0) / 1e3, "spans": spans}


def run_sweep(ctx: Ctx) -> dict:
    s = ctx.settings
    out, keep = os.path.join(ctx.work, "sweep.json"), os.path.join(ctx.work, "sweep")
    args = ["--frames", *s["sweep_frames"], "--ranks", RANKS, "--config", ctx.config, "--trace"]
    run_script("bench.py", *args, "--keep", keep, "--json", out)
    data = read_json(out)
    longest = data["results"][-1]["frames"]
    data.update(ranks=RANKS, command=command("bench.py", *args),
                trace=dict(trace_excerpt(os.path.join(keep, f"n{RANKS}-{longest}", "trace.json")), frames=longest))
    return data


def _ms(s: dict, frames: int) -> float:
    return 1e3 * s["loop_s"] / frames


def plot_sweep(data: dict, ctx: Ctx) -> tuple[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, n = data["results"], data["ranks"]
    par = f"pipelined_{n}"
    series = [("baseline (diffusers, one pass)", "baseline", "tab:red"), ("blockwise-1", "blockwise_1", "tab:blue"),
              (f"pipelined-{n}", par, "tab:green")]
    frames = [r["frames"] for r in rows]

    def axes(ylabel, title):
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        ax.set_xscale("log", base=2)
        ax.set_xticks(frames, [str(f) for f in frames])
        ax.minorticks_off()
        ax.set_xlabel("output frames")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        return fig, ax

    fig, ax = axes("denoising loop, ms per output frame", "Time per frame")
    for label, key, color in series:
        pts = [(r["frames"], _ms(r[key], r["frames"])) for r in rows if r[key]]
        ax.plot(*zip(*pts), "o-", label=label, color=color)
    ax.set_ylim(bottom=0)
    ax.legend()
    time_link = ctx.save_plot(fig, "time_per_frame.png", "loop time per output frame vs frames")

    fig, ax = axes("peak RSS, MB", "Peak memory per process")
    for label, key, color in series:
        ranks = max((len(r[key]["ranks"]) for r in rows if r[key]), default=0)
        for rank, style in zip(range(ranks), ("o-", "s--", "^:")):
            pts = [(r["frames"], r[key]["ranks"][rank]["peak_rss_mb"]) for r in rows if r[key]]
            ax.plot(*zip(*pts), style, color=color, label=label + (f", rank {rank}" if ranks > 1 else ""))
    ax.set_ylim(bottom=0)
    ax.legend()
    mem_link = ctx.save_plot(fig, "memory.png", "peak RSS per rank vs frames")
    return time_link, mem_link


def render_sweep(data: dict, ctx: Ctx) -> str:
    rows, n = data["results"], data["ranks"]
    par = f"pipelined_{n}"
    cores = ctx.results["meta"]["machine"]["cores"]
    table = ["| run | frames | loop s | end-to-end s | loop ms/frame | peak RSS MB per rank | MB sent per rank "
             "| idle per rank |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = f" ({r['baseline_note']})" if r["baseline_note"] else ""
        table += [bench.fmt_row("baseline (diffusers, one pass)", r["frames"], r["baseline"], note),
                  bench.fmt_row("blockwise-1", r["frames"], r["blockwise_1"]),
                  bench.fmt_row(f"pipelined-{n}", r["frames"], r[par])]
    time_link, mem_link = plot_sweep(data, ctx)
    first, last = rows[0], rows[-1]
    f0, fl = first["frames"], last["frames"]
    bullets = []
    ran = [r for r in rows if r["baseline"]]
    if ran:
        lb = ran[-1]
        F, b, p = lb["frames"], lb["baseline"], lb[par]
        skipped = [r for r in rows if not r["baseline"]]
        above = f" (above it the baseline was skipped: {skipped[0]['baseline_note']})" if skipped else ""
        mem = b["ranks"][0]["peak_rss_mb"] / max(r["peak_rss_mb"] for r in p["ranks"])
        bullets.append(
            f"At {F} frames, the longest the baseline ran{above}, the one-pass baseline takes "
            f"**{b['loop_s'] / p['loop_s']:.1f}x** the {n}-rank engine's loop time "
            f"({b['total_s'] / p['total_s']:.1f}x end to end) and {mem:.1f}x the peak memory of its larger rank.")
        a0, a1 = _ms(first["baseline"], f0), _ms(b, F)
        bullets.append(
            f"Time per frame: the baseline's goes from {a0:.0f} ms at {f0} frames to {a1:.0f} ms at {F} "
            f"({a1 / a0:.1f}x; its attention spans the whole video, so its cost is quadratic in the length), "
            f"the block-wise engine's from {_ms(first['blockwise_1'], f0):.0f} to {_ms(last['blockwise_1'], fl):.0f} "
            f"ms on 1 rank and from {_ms(first[par], f0):.0f} to {_ms(last[par], fl):.0f} ms on {n} ranks "
            f"between {f0} and {fl} frames (constant work per block).")
    rss0 = [r[k]["ranks"][0]["peak_rss_mb"] for r in rows for k in ("blockwise_1", par)]
    rss_rest = [x["peak_rss_mb"] for r in rows for x in r[par]["ranks"][1:]]
    rss = f"Peak RSS of the block-wise runs from {f0} to {fl} frames: {min(rss0):.0f}-{max(rss0):.0f} MB on rank 0"
    if rss_rest:
        rss += f", {min(rss_rest):.0f}-{max(rss_rest):.0f} MB on the other rank{'s' if n > 2 else ''}"
    rss += " (rank 0 also runs the VAE decode and the MP4 writer on a background thread)"
    sp = ctx.results.get("speedup")
    if sp:
        one, two = sp["best"][0], sp["best"][-1]
        two_rss = " / ".join(f"{r['peak_rss_mb']:.0f}" for r in two["ranks"])
        rss += (f"; with decoding off (next section, {one['frames']} frames) rank 0 peaks at "
                f"{one['ranks'][0]['peak_rss_mb']:.0f} MB on 1 rank, and the ranks at {two_rss} MB on "
                f"{len(two['ranks'])}")
    bullets.append(rss + ".")
    sent = [r["bytes_sent"] for r in last[par]["ranks"]]
    if len(sent) > 1 and sent[-1]:
        bullets.append(
            f"The last rank sends only noise predictions back; rank 0 sends the packets (hidden states with context "
            f"frames, both CFG rows): {sent[0] / sent[-1]:.1f}x the bytes at {fl} frames.")
    return "\n".join([
        "## Length sweep, side by side", "",
        f"`{data['command']}` (one invocation; every run decodes and writes its video, so \"loop\" includes the "
        f"VAE decoding that runs beside denoising on the same {cores} cores):", "",
        *table, "",
        f"{time_link} {mem_link}", "",
        *(f"* {b}" for b in bullets)])


# -- speed-up --------------------------------------------------------------------------------


def run_speedup(ctx: Ctx) -> dict:
    s = ctx.settings
    out = os.path.join(ctx.work, "speedup.json")
    args = ["--ranks", 1, RANKS, "--repeat", s["repeat"], "--config", ctx.config]
    if s["speedup_frames"]:
        args += ["--frames", s["speedup_frames"]]
    run_script("bench_speedup.py", *args, "--json", out)
    return dict(read_json(out), command=command("bench_speedup.py", *args))


def render_speedup(data: dict, ctx: Ctx) -> str:
    best = data["best"]
    base = best[0]["loop_s"]
    cores = ctx.results["meta"]["machine"]["cores"]
    table = ["| ranks | loop s | speed-up | frames/s | busy per rank | peak RSS MB per rank |", "|---|---|---|---|---|---|"]
    for n, s in zip(data["ranks"], best):
        busy = " / ".join(f"{r['busy_s'] / r['loop_s']:.0%}" for r in s["ranks"])
        rss = " / ".join(f"{r['peak_rss_mb']:.0f}" for r in s["ranks"])
        table.append(f"| {n} | {s['loop_s']:.2f} | {base / s['loop_s']:.2f}x | {s['frames'] / s['loop_s']:.1f} | "
                     f"{busy} | {rss} |")
    n = data["ranks"][-1]
    out = [f"## {n} ranks over 1 rank, denoising loop alone", "",
           f"`{data['command']}` ({best[0]['frames']} frames, decode off, as the DualParal paper times it; "
           f"best of {data['repeat']} run{'s' if data['repeat'] > 1 else ''} per rank count, alternating; "
           f"the ceiling on {cores} cores is {min(n, cores)}.0x):", "", *table]
    sweep = ctx.results.get("sweep")
    if sweep:
        last = sweep["results"][-1]
        gain = last["blockwise_1"]["loop_s"] / last[f"pipelined_{sweep['ranks']}"]["loop_s"]
        out += ["", f"With decoding on (length sweep) the {sweep['ranks']}-rank loop gains {gain:.2f}x over 1 rank at "
                f"{last['frames']} frames, against {base / best[-1]['loop_s']:.2f}x here: on {cores} cores the "
                "VAE's work competes with both ranks."]
    return "\n".join(out)


# -- loading memory, timelines ---------------------------------------------------------------


def render_loading(_data, ctx: Ctx) -> str:
    return "## Loading memory\n\n`python scripts/bench_load_memory.py`: see README, \"Real checkpoints\"."


TRACE_COLORS = {"compute": "tab:blue", "scheduler": "tab:purple", "wait": "lightgray", "send": "tab:orange",
                "decode": "tab:green", "write": "tab:olive"}


def render_timelines(_data, ctx: Ctx) -> str:
    text = ("## Timelines\n\n`launch/gen.py --trace` writes `trace.json` (open in Perfetto): per rank, compute spans "
            "per block and step, receive waits, sends, rank 0's scheduler steps, and the writer thread's decode and "
            "write spans.")
    sweep = ctx.results.get("sweep")
    if not sweep or not sweep.get("trace"):
        return text
    tr = sweep["trace"]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = sorted({(s["pid"], s["row"]) for s in tr["spans"]})
    names = [r for _, r in rows]
    fig, ax = plt.subplots(figsize=(11, 0.6 + 0.55 * len(rows)))
    for y, name in enumerate(names):
        for cat, color in TRACE_COLORS.items():
            bars = [(s["start_ms"], s["dur_ms"]) for s in tr["spans"] if s["row"] == name and s["cat"] == cat]
            if bars:
                ax.broken_barh(bars, (y - 0.4, 0.8), facecolors=color, edgecolor="white", linewidth=0.3)
        for s in tr["spans"]:
            # Label the spans wide enough to hold their name (block and step of a compute span).
            if s["row"] == name and s["cat"] in ("compute", "decode") and s["dur_ms"] > tr["length_ms"] / 40:
                ax.text(s["start_ms"] + s["dur_ms"] / 2, y, s["name"].replace("decode ", ""), ha="center",
                        va="center", fontsize=6, color="white")
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.set_xlim(0, tr["length_ms"])
    ax.set_xlabel("ms")
    last = tr["first_iteration"] + tr["iterations"] - 1
    ax.set_title(f"{sweep['ranks']} ranks, {tr['frames']} frames: iterations {tr['first_iteration']}-{last}")
    cats = [c for c in TRACE_COLORS if any(s["cat"] == c for s in tr["spans"])]
    ax.legend(handles=[Patch(color=TRACE_COLORS[c], label=c) for c in cats], loc="upper center",
              bbox_to_anchor=(0.5, -0.35 if len(rows) < 4 else -0.2), ncol=len(cats), frameon=False)
    link = ctx.save_plot(fig, "trace.png", "trace excerpt")
    return "\n".join([text, "", f"Iterations {tr['first_iteration']}-{last} of the {sweep['ranks']}-rank run at "
                      f"{tr['frames']} frames in the length sweep (blocks `b`, steps `s`):", "", link])


# -- simulator -------------------------------------------------------------------------------


def _gen_args(ctx: Ctx, case: dict, absolute: bool = True) -> list[str]:
    config = os.path.join(ROOT, ctx.config) if absolute else ctx.config
    return ["--config", config, "--frames", str(case["frames"]), "--block", str(case["block"]),
            "--num-cat", str(case["num_cat"]), "--set", "output.checkpoint_every=0"]


def run_simulator(ctx: Ctx) -> dict:
    s, md = ctx.settings, ctx.results["meta"]["model"]
    if md["height"] != md["width"]:
        sys.exit("the simulator section needs square frames (scripts/simulate.py --hw)")
    calib, target = s["sim_calib"], s["sim_target"]
    calib_dir, target_dir = os.path.join(ctx.work, "sim-calib"), os.path.join(ctx.work, "sim-target")
    print(f"simulator: measuring {RANKS} ranks at {calib} (traced) and {target}", flush=True)
    measured = [bench_speedup.run_once(RANKS, calib_dir, _gen_args(ctx, calib) + ["--trace"])["loop_s"],
                bench_speedup.run_once(RANKS, target_dir, _gen_args(ctx, target))["loop_s"]]
    base = ["--calibrate", os.path.join(calib_dir, "trace.json"), "--calib-frames", calib["frames"],
            "--calib-block", calib["block"], "--calib-num-cat", calib["num_cat"], "--calib-ranks", RANKS,
            "--steps", md["steps"], "--layers", md["layers"], "--hw", md["height"]]
    predictions = []
    for i, case in enumerate((calib, target)):
        out = os.path.join(ctx.work, f"sim-{i}.json")
        run_script("simulate.py", *base, "--frames", case["frames"], "--block", case["block"],
                   "--num-cat", case["num_cat"], "--ranks", RANKS, "--json", out)
        predictions.append(read_json(out))
    cases = [dict(c, measured_loop_s=m, predicted_loop_s=p["prediction"]["wall_s"], predicted_idle=p["prediction"]["idle"])
             for c, m, p in zip((calib, target), measured, predictions)]
    gen = ["torchrun", "--standalone", "--nproc_per_node", str(RANKS), "launch/gen.py"]
    commands = [shlex.join(gen + _gen_args(ctx, calib, absolute=False) + ["--no-decode", "--trace", "--out", "A"]),
                command("simulate.py", *[a if a != base[1] else "A/trace.json" for a in base], "--frames",
                        target["frames"], "--block", target["block"], "--num-cat", target["num_cat"], "--ranks", RANKS)]
    return {"ranks": RANKS, "cases": cases, "hop": predictions[0]["hop"], "model": predictions[0]["model"],
            "commands": commands}


def render_simulator(data: dict, ctx: Ctx) -> str:
    calib, target = data["cases"]
    n = data["ranks"]

    def label(c):
        return f"{c['frames']} frames, block {c['block']}, num_cat {c['num_cat']}"

    table = [f"| run ({n} ranks, decode off) | predicted loop s | measured loop s | error |", "|---|---|---|---|"]
    for c, note in ((calib, " (the calibration run)"), (target, "")):
        err = c["predicted_loop_s"] / c["measured_loop_s"] - 1
        table.append(f"| {label(c)}{note} | {c['predicted_loop_s']:.2f} | {c['measured_loop_s']:.2f} | {err:+.1%} |")
    return "\n".join([
        "## Simulator: prediction vs measurement", "",
        "`scripts/simulate.py` replays the engine's task list as a discrete-event model (per-rank compute per task "
        "from a least-squares fit of one traced run's compute spans, rank 0's scheduler steps, the in-flight limit, "
        f"{data['hop']['latency_s'] * 1e3:g} ms per hop). Calibrated on a traced {n}-rank run of {label(calib)} "
        "(decode off), then asked for a different length and block size:", "",
        *table, "",
        "```", *(c.replace(" --calib-ranks", " \\\n    --calib-ranks") for c in data["commands"]), "```"])


# -- projection ------------------------------------------------------------------------------


def run_projection(ctx: Ctx) -> dict:
    out = os.path.join(ctx.work, "projection.json")
    run_script("simulate.py", "--project", "--json", out)
    return read_json(out)


def render_projection(data: dict, ctx: Ctx) -> str:
    rows, gpus, models = data["rows"], data["gpus"], data["models"]
    eff = data["efficiency"]
    table = ["| GPUs | model | ranks | block | wall s | speed-up vs 1 GPU | max idle | weights+cache GB/rank "
             "| total GB/rank |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        total = f"{r['memory']['total_gb']:.1f}" if "memory" in r else "-"
        table.append(f"| {r['gpus']} | {r['model']} | {r['ranks']} | {r['block']} | {r['wall_s']:.0f} | "
                     f"{r['speedup']:.2f}x | {max(r['idle']):.0%} | {r['mem_gb']:.1f} | {total} |")
    one = rows[0]
    multi = max(r["ranks"] for r in rows)
    peaks = "; ".join(f"{g['short']}: {eff * g['peak_flops'] / 1e12:.0f} TFLOPS" for g in gpus.values())
    links = " and ".join(f"{g['bandwidth'] / 1e9:.0f} GB/s with {g['latency_s'] * 1e6:.0f} us ({g['short']} over "
                         f"{g['link']})" for g in gpus.values())
    bullets = []
    # Communication: the worst hop against the compute of the stage it feeds, at block 8 on all ranks.
    main = [r for r in rows if r["ranks"] == multi and r["block"] == one["block"]]
    worst = max(main, key=lambda r: r["hop"]["hop_s"] / r["hop"]["stage_compute_s"])
    h = worst["hop"]
    share = h["hop_s"] / h["stage_compute_s"]
    bullets.append(
        f"Communication {'is not the limit' if share < 0.05 else 'matters'} (the largest share: a "
        f"{worst['model'].split()[0]} packet of ~{h['packet_mb']:.0f} MB takes ~{h['hop_s'] * 1e3:.0f} ms over "
        f"{gpus[worst['gpus']]['link']} against ~{h['stage_compute_s']:.1f} s of compute per stage, {share:.1%}); "
        "the rest of the loss is the queue's ramp-up and ramp-down and layer imbalance.")
    parts = []
    for mname, m in models.items():
        mrows = [r for r in main if r["model"] == mname]
        counts = sorted(set(mrows[0]["layers"]))
        if len(counts) == 1:
            parts.append(f"{mname.split()[0]}'s {m['layers']} layers split evenly over {multi}")
            continue
        few = max(i for r in mrows for c, i in zip(r["layers"], r["idle"]) if c == counts[0])
        text = (f"{m['layers']} layers on {multi} ranks split {'/'.join(map(str, counts[::-1]))}: the "
                f"{counts[0]}-layer ranks idle up to {few:.0%}")
        bal = [r for r in data["balanced"] if r["model"] == mname]
        if bal:
            alts = sorted({r["ranks"] for r in bal})
            per_gpu = "; ".join(
                f"{gpus[g]['short']}: " + ", ".join(f"{r['wall_s']:.0f} s at {r['ranks']} ranks"
                                                    for r in bal if r["gpus"] == g)
                for g in gpus)
            text += (f". For {mname.split()[0]}, " + " or ".join(f"{a} ranks ({m['layers'] // a} layers each)"
                                                                 for a in alts)
                     + f" balance ({per_gpu}; idle <= {max(max(r['idle']) for r in bal):.0%})")
        parts.append(text)
    bullets.append("; ".join(parts) + ".")
    by_block = {}
    for r in rows:
        if r["ranks"] == multi:
            by_block.setdefault((r["gpus"], r["model"]), {})[r["block"]] = r["wall_s"]
    blocks = sorted(next(iter(by_block.values())))
    big = [w[one["block"]] / w[blocks[-1]] - 1 for w in by_block.values()]
    small = [w[blocks[0]] / w[one["block"]] - 1 for w in by_block.values()]
    bullets.append(
        f"Recommendation: block {one['block']} (as the paper) or {blocks[-1]} ({min(big):.0%}-{max(big):.0%} faster, "
        f"{blocks[-1] // one['block']}x the activation memory per task; block {blocks[0]} is "
        f"{min(small):.0%}-{max(small):.0%} slower); a rank count that divides the layer count.")
    share_by_model = {mname: max(r["mem_gb"] for r in main if r["model"] == mname) for mname in models}
    bullets.append(
        f"DualParal's headline (up to {DUALPAR_HEADLINE['latency']}x lower latency and {DUALPAR_HEADLINE['memory']}x "
        f"lower memory on {DUALPAR_HEADLINE['gpus']}) is measured against sequence-parallel baselines, not against "
        "one GPU, so it is not the same ratio as the column above. The per-rank weight share here ("
        + ", ".join(f"{v:.1f} GB for {k.split()[0]}" for k, v in share_by_model.items())
        + " incl. the feature cache) is what each rank loads, where DualParal loads the whole model on every GPU ("
        + " / ".join(f"{m['params'] * 2 / 1e9:.1f} GB" for m in models.values()) + " in bf16).")
    return "\n".join([
        f"## Projection: Wan2.1 at {data['frames']} frames on {multi} GPUs", "",
        "`python scripts/simulate.py --project`: the same event model with per-layer cost from FLOPs (projections, "
        "FFN and cross-attention per token, self-attention per query/key pair, CFG batch 2). Assumptions, not "
        f"measurements: sustained bf16 throughput {eff:.0%} of the dense peak ({peaks}), neighbour links of {links}; "
        f"{data['steps']} UniPC steps, num_cat {data['num_cat']}. \"Speed-up\" is against one GPU running the same "
        f"block-wise schedule with block {one['block']}.", "",
        *table, "", *(f"* {b}" for b in bullets),
        *(["", "### Memory per rank", "", simulate.memory_markdown(data["memory"], data["frames"])]
          if "memory" in data else [])])


# -- causal mode -----------------------------------------------------------------------------


def run_causal(ctx: Ctx) -> dict:
    s = ctx.settings
    out = os.path.join(ctx.work, "causal.json")
    args = ["--config", ctx.config, "--speedup", "--kernel", "--repeat", s["repeat"], *s["causal_args"]]
    run_script("bench_causal.py", *args, "--json", out)
    return dict(read_json(out), command=command("bench_causal.py", *args))


def _list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def causal_reading(data: dict) -> list[str]:
    """A few sentences of reading, every figure taken from ``data`` (bench_causal.py's JSON)."""
    bullets = []
    rows = data.get("results", [])
    at = {}
    if rows:
        full = rows[0]
        b0 = data["budgets"][0]
        at = {r["policy"]: r for r in rows[1:] if r["budget"] == b0}
    if at:
        def mem(p):
            return at[p]["cache_bytes"] / full["cache_bytes"]

        def attn(p):
            return at[p]["attn_ms"] / full["attn_ms"]

        text = (f"At budget {b0:g} ({next(iter(at.values()))['budget_frames']} of {data['latent_frames']} latent "
                f"frames), against the full cache: ")
        parts = []
        if "window" in at:
            parts.append(f"window holds {mem('window'):.2f}x the memory and spends {attn('window'):.2f}x the "
                         f"attention time per chunk")
        def select_share(p):
            return at[p]["select_ms"] / at[p]["attn_ms"]

        scored = [p for p in ("topk", "focused") if p in at]
        if scored:
            parts.append(f"{' and '.join(scored)} hold {' / '.join(f'{mem(p):.2f}x' for p in scored)} (their pool of "
                         f"{at[scored[0]]['cache_frames']} frames) and spend "
                         f"{' / '.join(f'{attn(p):.2f}x' for p in scored)}, of which selection scoring is "
                         f"{' / '.join(f'{select_share(p):.0%}' for p in scored)}")
        bullets.append(text + "; ".join(parts) + ".")
        dev = sorted(at.values(), key=lambda r: r["deviation"]["rel_l2_mean"])
        late = min(at.values(), key=lambda r: r["deviation"]["rel_l2_last_quarter"])
        d0, d1 = dev[0]["deviation"], dev[-1]["deviation"]
        if late["policy"] == dev[0]["policy"]:
            late_text = f"{late['policy']} also deviates least over the last quarter"
        else:
            late_text = (f"over the last quarter alone {late['policy']} deviates least "
                         f"({late['deviation']['rel_l2_last_quarter']:.2e})")
        bullets.append(
            f"Closest to the full cache: {dev[0]['policy']} (relative L2 {d0['rel_l2_mean']:.2e} over all chunks, "
            f"{d0['rel_l2_last_quarter']:.2e} over the last quarter); farthest: {dev[-1]['policy']} "
            f"({d1['rel_l2_mean']:.2e} / {d1['rel_l2_last_quarter']:.2e}); {late_text}. With random weights these "
            "are fidelity figures, not quality.")
    sp = data.get("speedup")
    if sp:
        res = {(r["schedule"], r["ranks"]): r for r in sp["results"]}
        n0, n = sp["ranks"][0], sp["ranks"][-1]
        parts = []
        for sched in sp["schedules"]:
            r = res[(sched, n)]
            parts.append(f"{sched} {r['speedup']:.2f}x (busy {' / '.join(f'{b:.0%}' for b in r['busy'])})")
        text = f"On {n} ranks over {n0}, same schedule: {'; '.join(parts)}."
        if ("staggered", n) in res and res[("staggered", n)]["vs_sequential_1"] is not None:
            st1 = res.get(("staggered", n0))
            text += (f" Staggered on {n} ranks runs {res[('staggered', n)]['vs_sequential_1']:.2f}x the sequential "
                     f"schedule on {n0}")
            if st1:
                text += (f" (on {n0} rank{'s' if n0 > 1 else ''} the staggered loop takes "
                         f"{1 / st1['vs_sequential_1']:.2f}x the sequential one: its chunks also attend to their "
                         "in-flight predecessors' keys/values)")
            text += "."
        diffs = [r["latents_max_abs_vs_base"] for r in sp["results"] if r["latents_max_abs_vs_base"] is not None]
        if diffs:
            worst = max(diffs)
            text += (f" The latents on {n} ranks equal the {n0}-rank run's "
                     + ("exactly" if worst == 0.0 else f"to within {worst:.1e} (largest absolute difference)")
                     + f" for {_list(sp['schedules'])}.")
        bullets.append(text)
    k = data.get("kernel")
    if k:
        by = {(r["tokens"], r["policy"]): r for r in k["results"]}
        tokens = sorted({r["tokens"] for r in k["results"]})
        lo, hi = tokens[0], tokens[-1]
        scored = [p for p in ("topk", "focused") if (lo, p) in by]
        if scored and lo != hi:
            def share(t, p):
                return by[(t, p)]["select_ms"] / by[(t, p)]["attend_ms"]

            trend = "shrinks" if all(share(hi, p) < share(lo, p) for p in scored) else "does not shrink"
            text = (f"Selection scoring {trend} relative to attention as frames grow: select's time over the "
                    f"attention kernel's goes from {share(lo, scored[0]):.1%} at {lo} tokens per frame to "
                    f"{share(hi, scored[0]):.1%} at {hi} for {scored[0]}"
                    + "".join(f", from {share(lo, p):.1%} to {share(hi, p):.1%} for {p}" for p in scored[1:]) + ".")
            if (lo, "window") in by:
                def over(t, p):
                    return by[(t, p)]["total_ms"] / by[(t, "window")]["total_ms"]

                text += (f" Against the window at the same {k['budget_frames']}-frame budget (no scoring, one "
                         "attention over its store), the whole call (store read, select, gathered attention) costs "
                         + "; ".join(f"{p} {over(lo, p):.2f}x at {lo} and {over(hi, p):.2f}x at {hi}" for p in scored)
                         + f"; against the full cache over {k['history']} frames at {hi} tokens, "
                         + _list([f"{p} {by[(hi, p)]['vs_full']:.2f}x" for p in ("window", *scored)])
                         + f" (budget {k['budget']:.0%}).")
            bullets.append(text)
    return bullets


def render_causal(data: dict, ctx: Ctx) -> str:
    out = ["## Causal mode: KV-cache policies, schedules, attention kernel", "",
           f"`{data['command']}` (three parts, {data['total_s'] / 60:.0f} min in all).", ""]
    if "results" in data:
        out += ["### Policies at equal budgets", "",
                bench_causal.table(data["results"], data["results"][0]), "", bench_causal.policy_caption(data), ""]
    if "speedup" in data:
        out += ["### Speed-up over ranks", "",
                bench_causal.speedup_table(data["speedup"]), "", bench_causal.speedup_caption(data["speedup"]), ""]
    if "kernel" in data:
        out += ["### Attention kernel at Wan's frame sizes", "",
                bench_causal.kernel_table(data["kernel"]), "", bench_causal.kernel_caption(data["kernel"]), ""]
    reading = causal_reading(data)
    if reading:
        out += ["Reading:", "", *(f"* {b}" for b in reading)]
    return "\n".join(out).rstrip()


def run_causal_wan(ctx: Ctx) -> dict:
    out = os.path.join(ctx.work, "causal_wan.json")
    args = ctx.settings["causal_wan_args"]  # the script's default model: the trained tiny preset
    run_script("bench_causal.py", *args, "--json", out)
    return dict(read_json(out), command=command("bench_causal.py", *args))


def render_causal_wan(data: dict, ctx: Ctx) -> str:
    rows = data["results"]
    full = rows[0]
    out = ["### Bounded policies end to end at Wan's frame size", "",
           f"`{data['command']}` ({data['policies_s'] / 60:.0f} min).", "",
           bench_causal.table(rows, full), "", bench_causal.policy_caption(data), "", "Reading:", ""]
    for r in rows[1:]:
        out.append(f"* {r['policy']} at {r['budget_frames']} of {data['latent_frames']} latent frames: "
                   f"{full['denoise_ms'] / r['denoise_ms']:.2f}x the full cache's speed per chunk in the steady state "
                   f"(denoise {r['denoise_ms']:.0f} ms vs {full['denoise_ms']:.0f} ms of CPU time: every pass of the "
                   f"chunk, embedding to scheduler step; no VAE in this loop); attention "
                   f"{r['attn_ms'] / full['attn_ms']:.2f}x the full cache's time, "
                   f"{r['cache_bytes'] / full['cache_bytes']:.2f}x its memory.")
    out.append(f"* Attention is {full['attn_ms'] / full['denoise_ms']:.0%} of the full cache's chunk time here: the "
               f"{data['layers']} layers of this model are narrow (its MLPs cost little), so a bounded cache gains "
               f"almost its attention saving end to end. In Wan2.1-1.3B's wide layers attention is a smaller share "
               f"of a pass and the end-to-end gain correspondingly smaller (the attention-kernel table above has the "
               f"attention part alone at Wan's head size).")
    out.append(f"* Wall time of the whole generation (every chunk, the short early history included; a shared "
               f"machine): full {min(full['wall_s']):.1f} s, " + ", ".join(
                   f"{r['policy']} {min(r['wall_s']):.1f} s ({min(full['wall_s']) / min(r['wall_s']):.2f}x)"
                   for r in rows[1:]) + ".")
    return "\n".join(out)


# -- quality of the trained preset ----------------------------------------------------------


def run_quality(ctx: Ctx) -> dict:
    out = os.path.join(ctx.work, "quality.json")
    args = ctx.settings["quality_args"]
    run_script("quality.py", "suite", *args, "--json", out, "--keep", os.path.join(ctx.work, "quality"))
    data = read_json(out)
    training = os.path.join(ROOT, "dualpar", "models", "tiny_trained", "training.json")
    if os.path.exists(training):
        data["training"] = read_json(training)
    return data


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def _num(v, fmt=".2f") -> str:
    return "-" if v is None else format(v, fmt)


def render_quality(data: dict, ctx: Ctx) -> str:
    head = ["## Quality: the trained tiny preset", "",
            f"`{data['command']}` ({data['minutes']:.0f} min): {data['frames']}-frame videos at 96x96 of the trained "
            f"`tiny` preset on {data['ranks']} ranks, one per prompt and setting, scored by `scripts/quality.py` "
            "from the MP4 alone (a nearest-palette detector, see its docstring). Prompts: "
            + "; ".join(f"\"{p}\" (seed {i})" for i, p in enumerate(data["prompts"])) + ".", ""]
    table = ["| setting | colour found | shape right | background right | extra objects per frame | jumps "
             "| object size | step per frame | seam ratio, change | seam ratio, centroid step | s per video |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        m = r["mean"]
        secs = sum(x["seconds"] for x in r["runs"]) / len(r["runs"])
        table.append(f"| {r['name']} | {_pct(m['colour_found'])} | {_pct(m['shape_right'])} | "
                     f"{_pct(m['background_right'])} | {_num(m['extra_objects'])} | {_num(m['jumps'], '.1f')} | "
                     f"{_num(m.get('object_size'))} | {_num(m.get('median_step'), '.4f')} | "
                     f"{_num(m['seam_change'])} | {_num(m['seam_step'])} | {secs:.0f} |")
    v = data["vae"]
    notes = ["", "Columns: *colour found*, the share of frames (and prompted objects) where the object's colour is "
             "found; *shape right*, where it is found with the prompted shape; *jumps*, centroid steps over a tenth "
             "of the frame per video; *object size*, the median longer side of the prompted object's bounding box "
             "over the frame's side (the world's objects: 0.20-0.35; a smear across the frame: near 1); *step per "
             "frame*, its centroid's median step over the side (the world's speeds: 0.005-0.02); *seam ratio*, the mean change (of pixels, or of the object's centroid) into the "
             "first frame of a block (a chunk, in causal mode) over the same at the other latent-frame starts: 1.0 "
             f"is seamless. Causal rows: 8 Euler steps per chunk of 3, budget {data['budget']} frames, the "
             "causal fine-tune's weights (`transformer_causal/`) where the folder has them, except in the row "
             "marked *bidirectional weights* (`model.causal_weights=false`).", "",
             f"VAE reconstruction on {v['clips']} held-out {v['frames']}-frame clips at {v['size']}x{v['size']}: "
             f"**{v['psnr_db']:.1f} dB** PSNR (worst clip {v['psnr_min_db']:.1f} dB)."]
    t = data.get("training")
    if t and not t.get("partial"):
        notes += ["", "Training (`scripts/train_tiny.py`, on this machine's CPU; the README says how long): "
                  + ", ".join(f"{k} {n} steps" for k, n in t["steps"].items())
                  + f"; final flow-matching loss {t['dit_final_loss']:.3f}"
                  + (f" (the causal fine-tune's {t['dit_causal_final_loss']:.3f}, on noisy frames only)"
                     if "dit_causal_final_loss" in t else "")
                  + "; the VAE's PSNR at the end of "
                  f"training {t['vae_psnr_db']:.1f} dB (16 held-out clips of 17 frames: shorter clips than "
                  "above, whose later frames the VAE codes worse)."]
    for name, alt in (("training_losses.png", "training losses"), ("demo_strip.png", "frames of the demo")):
        if os.path.exists(os.path.join(ctx.plots, name)):
            notes += ["", f"![{alt}]({os.path.relpath(os.path.join(ctx.plots, name), ctx.md_dir)})"]
    return "\n".join(head + table + notes)


# -- timestep feature caching ---------------------------------------------------------------


def run_cache(ctx: Ctx) -> dict:
    out = os.path.join(ctx.work, "cache.json")
    args = ctx.settings["cache_args"]
    run_script("bench_cache.py", *args, "--json", out)
    data = dict(read_json(out), command=command("bench_cache.py", *args))
    try:
        import cache_dit  # noqa: F401
    except ImportError:
        print("cache-dit is not installed: the peer rows are left out (pip install -e '.[bench]')", flush=True)
    else:
        peer = os.path.join(ctx.work, "cache_peer.json")
        run_script("bench_cache_peer.py", *ctx.settings["peer_args"], "--json", peer)
        data["peer"] = dict(read_json(peer), command=command("bench_cache_peer.py", *ctx.settings["peer_args"]))
    data["projection"] = simulate.cache_projection()
    return data


def _nth(k: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(k, f"{k}th")


def render_cache(data: dict, ctx: Ctx) -> str:
    import bench_cache
    from dualpar.schedule import full_steps

    out = ["## Timestep feature caching", "",
           f"`{data['command']}`: the denoising loop with `cache.policy=taylor` (order 1) at both levels against "
           "the uncached run on as many ranks, measured side by side (decode off, one thread per rank, best of "
           f"{data['speed']['repeat']}), {data['speed']['frames']} frames of `{data['speed']['config']}`; *relative "
           "L2*: of the final latents against the uncached run's (the same on any rank count); *idle*: 1 - busy/loop "
           "per rank.", "", bench_cache.speed_table(data["speed"]), "",
           "Stage caches per rank (the neighbours' K/V and the forecast histories, peak MB from each run's "
           "`stats.json`) at several lengths: bounded by the queue (at most `steps` blocks), so the same at every length whose blocks fill it, and less at a length that does not.", "",
           bench_cache.memory_table(data["speed"]), ""]
    fid = data.get("fidelity") or []
    if fid:
        f0 = fid[0]
        out += ["### Fidelity per policy", "",
                f"One rank, {f0['frames']} frames at {f0['size']}x{f0['size']}, {f0['steps']} steps, each preset at "
                "its own guidance; relative L2 of the final latents and PSNR of the decoded frames against the "
                "uncached run of the same seed. *tiny* is the trained preset, *tiny-random* the random one.", "",
                bench_cache.fidelity_table(fid), ""]
    peer, matched = data.get("peer"), data.get("matched") or []
    if peer:
        out += ["### The peer: cache-dit on diffusers' WanPipeline", "",
                f"`{peer['command']}` (cache-dit {peer['version']}): the one-pass `WanPipeline` on the same models "
                "and settings, with DBCache (block 0 always computed, F1B0) forced to our plan's steps by a step mask, "
                "or by its own residual threshold, alone and with its TaylorSeer calibrator; beside it dualpar "
                "(`taylor`, level model) at the same frames, size and steps on 1 and 2 ranks.", "",
                "| model | method | share of full steps | speed-up over its own uncached run | relative L2 vs its own "
                "uncached run |", "|---|---|---|---|---|"]
        for r in peer["rows"]:
            if r["method"] == "uncached":
                continue
            knob = r["settings"].get("interval")
            label = (f"{r['method']}, every {_nth(knob)} step" if knob else
                     f"{r['method']}, threshold {r['settings'].get('residual_diff_threshold')}")
            out.append(f"| {r['model']} | {label} | {r['computed_share']:.2f} | {r['speedup']:.2f}x | {r['rel_l2']:.4f} |")
        for m in matched:
            for r in m["rows"]:
                if r["policy"] == "none":
                    continue
                share = sum(full_steps(m["steps"], 2, r["interval"], 1)) / m["steps"]  # the cache defaults' plan
                out.append(f"| {m['preset']} | dualpar taylor (model level), {r['ranks']} rank(s), every "
                           f"{_nth(r['interval'])} step | {share:.2f} | {r['speedup']:.2f}x | {r['rel_l2']:.4f} |")
        out.append("")
    proj = data.get("projection")
    if proj:
        out += ["### Projected on 8 GPUs", "", simulate.cache_markdown(proj), ""]
    return "\n".join(out).rstrip()


# -- ring messages and the GPU check ---------------------------------------------------------


def run_balance(ctx: Ctx) -> dict:
    out = os.path.join(ctx.work, "balance.json")
    args = ctx.settings["balance_args"]
    run_script("bench_balance.py", *args, "--json", out)
    return dict(read_json(out), command=command("bench_balance.py", *args), projection=simulate.balance_projection())


def render_balance(data: dict, ctx: Ctx) -> str:
    best = {r["case"]: r for r in data["best"]}
    table = ["| case | layers per rank | loop s | vs even | end to end s | launcher wall s | decoding s | "
             "simulator's loop s | idle per rank |", "|---|---|---|---|---|---|---|---|---|"]
    for r in data["best"]:
        even = best[r["case"].replace("auto", "even")]
        pred = (f"{r['predicted_loop_s']:.1f} ({r['predicted_loop_s'] / r['loop_s'] - 1:+.0%})"
                if "predicted_loop_s" in r else "-")
        table.append(f"| {r['case']} | {','.join(map(str, r['layers']))} | {r['loop_s']:.1f} | "
                     f"{even['loop_s'] / r['loop_s']:.2f}x | {r['total_s']:.1f} | {r['wall_s']:.1f} | {r['decode_s']:.1f} | "
                     f"{pred} | {' / '.join(f'{x:.0%}' for x in r['idle'])} |")
    return "\n".join([
        "## Balanced stages", "",
        f"`{data['command']}`: the real launcher with decoding on, {data['frames']} frames of the benchmarks' config, "
        f"best loop of {data['repeat']} alternating runs per case. *even* runs `parallel.split=auto` on an empty "
        "profile (the even split, measuring the profile); *auto* takes the split that profile gives. End to end: "
        "the run's own time (text encoder, loop, the last blocks' decoding); launcher wall: with torchrun and "
        "imports. Decoding s: the writer thread's decode-and-write time on the rank that decodes. Simulator's loop: "
        "the event model fitted on the even run's trace (each rank its own layer coefficients, and the writer "
        "thread behind its queue of 8 blocks at its traced time per block), predicting the auto run. "
        "Idle = 1 - busy / loop.", "",
        *table, "",
        f"Reading: here the writer thread needs {min(r['decode_s'] for r in data['best']):.0f}-"
        f"{max(r['decode_s'] for r in data['best']):.0f} s to decode and write a video whose loop takes "
        f"{min(r['loop_s'] for r in data['best']):.0f}-{max(r['loop_s'] for r in data['best']):.0f} s: the VAE, "
        "not a stage, sets the pace (its queue fills and the rank feeding it waits), on whichever rank it runs, and "
        "it takes one of the two cores every rank shares. So no split does better than the even one (the auto rows "
        "are within this machine's run-to-run noise of about 10%), and the simulator, which models the writer's "
        "queue, predicts as much. On GPUs the VAE is a small part of a stage's work: see the projection.", "",
        "### Projected on 8 GPUs", "", simulate.balance_markdown(data["projection"])])


def run_comm(ctx: Ctx) -> dict:
    out = os.path.join(ctx.work, "comm.json")
    run_script("bench_comm.py", *ctx.settings["comm_args"], "--json", out)
    return dict(read_json(out), args=ctx.settings["comm_args"])


def render_comm(data: dict, ctx: Ctx) -> str:
    b, n = data["before"], data["now"]
    mb = 1e6
    rows = [("messages per hop", b["messages_per_hop"], n["messages_per_hop"], "{:.0f}"),
            ("bytes on the wire beyond the payload", b["wire_bytes_per_hop"] - b["payload_bytes"],
             n["wire_bytes_per_hop"] - n["payload_bytes"], "{:.0f}"),
            ("tensors built from host data (a header)", b["host_built_per_hop"], n["host_built_per_hop"], "{:.0f}"),
            ("payload-sized copies in send", b["payload_copies_per_hop"], n["payload_copies_per_hop"], "{:.0f}"),
            ("payload-sized allocations in send", b["payload_allocs_per_hop"], n["payload_allocs_per_hop"], "{:.2f}"),
            ("payload-sized allocations in receive", b["recv_payload_allocs_per_hop"],
             n["recv_payload_allocs_per_hop"], "{:.2f}"),
            ("sender's send-window peak, MB", b["send_window_peak_bytes"] / mb, n["send_window_peak_bytes"] / mb,
             "{:.0f}"),
            ("sender's peak RSS, MB", b["peak_rss_mb"], n["peak_rss_mb"], "{:.0f}")]
    table = [f"| per hop | before ({data['rev']}) | now |", "|---|---|---|"]
    table += [f"| {label} | {fmt.format(x)} | {fmt.format(y)} |" for label, x, y, fmt in rows]
    shape = " x ".join(map(str, data["shape"]))
    return "\n".join([
        "## Ring messages at Wan2.1-1.3B packet size", "",
        f"`{command('bench_comm.py', *data.get('args', []))}`: two gloo processes on loopback; rank 0 sends "
        f"{data['messages']} packets of [{shape}] bf16 ({n['payload_bytes'] / mb:.0f} MB: CFG rows, 8 context + 8 "
        "own latent frames at 480x832, dim 1536) to a receiver that takes each slowly, so the sender's window "
        f"fills. \"Before\" is `dualpar/comm.py` at {data['rev']} (a host-built 80-byte header concatenated with the "
        f"payload, a send window of 2 x ranks + 1 messages, here for {data['ranks']} ranks), read from git and run "
        "side by side; \"now\" sends the payload from one of 3 reused send buffers the producer writes into, with a "
        "16-byte tag written on the device. Counts are taken inside the comm's own calls.", "", *table])


# -- bad input -------------------------------------------------------------------------------


def run_reject(ctx: Ctx) -> dict:
    out = os.path.join(ctx.work, "reject.json")
    args = ["--repeat", ctx.settings["repeat"]]
    run_script("bench_reject.py", *args, "--json", out)
    return dict(read_json(out), command=command("bench_reject.py", *args))


def render_reject(data: dict, ctx: Ctx) -> str:
    heavy = data["heavy_import_s"]
    table = ["| bad input | rejected in s | vs importing torch, diffusers, transformers |", "|---|---|---|"]
    for c in data["cases"]:
        argv = " ".join(c["argv"]).replace("|", "\\|")  # a '|' inside a markdown cell must be escaped
        table.append(f"| {c['case']} (`{argv}`) | {c['reject_s']:.2f} | {c['reject_s'] / heavy:.2f}x |")
    worst = max(c["reject_s"] for c in data["cases"])
    return "\n".join([
        "## Bad input, turned away", "",
        f"`{data['command']}`: each case is a fresh `python launch/gen.py` process that ends with exit status 2 and "
        f"one `error:` line, best of {data['repeat']}; beside it, a fresh process that only imports torch, diffusers "
        f"and transformers takes {heavy:.2f} s. Everything is validated before those imports, so the slowest case "
        f"here ({worst:.2f} s) is {heavy / worst:.0f}x quicker than the imports alone.", "", *table])


def render_gpu(_data, ctx: Ctx) -> str:
    path = os.path.join(ctx.plots, "gpu_check.json")
    head = ["## GPU", ""]
    if not os.path.exists(path):
        return "\n".join(head + [
            "Not measured yet: no session has had a GPU since the GPU path was built. `python scripts/gpu_check.py` "
            "measures it in one go (see the README's GPU section) and writes `gpu_check.json` and `gpu_check.md`; "
            "copy both to `docs/benchmarks/` and re-render (`python scripts/benchmarks.py --render-only`) to fill "
            "this section. Figures above are CPU measurements or projections."])
    md = os.path.join(ctx.plots, "gpu_check.md")
    body = open(md).read().strip() if os.path.exists(md) else "(gpu_check.md missing beside gpu_check.json)"
    return "\n".join(head + [body])


SECTIONS = [
    Section("sweep", run_sweep, render_sweep),
    Section("speedup", run_speedup, render_speedup),
    Section("loading", None, render_loading),
    Section("timelines", None, render_timelines),
    Section("simulator", run_simulator, render_simulator),
    Section("projection", run_projection, render_projection),
    Section("causal", run_causal, render_causal),
    Section("causal_wan", run_causal_wan, render_causal_wan),
    Section("comm", run_comm, render_comm),
    Section("reject", run_reject, render_reject),
    Section("quality", run_quality, render_quality),
    Section("cache", run_cache, render_cache),
    Section("balance", run_balance, render_balance),
    Section("gpu", None, render_gpu),
]


def render(ctx: Ctx, out: str) -> None:
    parts = [render_header(ctx)]
    for sec in SECTIONS:
        data = ctx.results.get(sec.key)
        if sec.run is None or data is not None:
            parts.append(sec.render(data, ctx))
    with open(out, "w") as f:
        f.write("\n\n".join(parts) + "\n")
    print(f"wrote {out} and the plots in {ctx.plots}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "BENCHMARKS.md"), help="markdown to write")
    p.add_argument("--plots", help="directory of the PNGs and results.json (default: docs/benchmarks beside --out)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="config of every run (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="short videos, one repeat, small simulator case")
    p.add_argument("--render-only", action="store_true", help="no runs: re-render from results.json")
    p.add_argument("--sections", nargs="+", choices=[s.key for s in SECTIONS if s.run],
                   help="run only these sections, keeping the others' figures from results.json")
    p.add_argument("--keep", help="keep the runs' outputs (videos, traces) here (default: a temporary directory)")
    args = p.parse_args()
    try:
        import matplotlib  # noqa: F401  (checked before any run: the plots come last)
    except ImportError:
        sys.exit("matplotlib is missing: pip install -e '.[cpu,bench]'")
    out = os.path.abspath(args.out)
    plots = os.path.abspath(args.plots or os.path.join(os.path.dirname(out), "docs", "benchmarks"))
    os.makedirs(plots, exist_ok=True)
    results_path = os.path.join(plots, "results.json")
    config = os.path.relpath(os.path.abspath(args.config), ROOT) if os.path.abspath(args.config).startswith(
        ROOT + os.sep) else os.path.abspath(args.config)
    tmp = tempfile.TemporaryDirectory(prefix="benchmarks-")
    work = os.path.abspath(args.keep) if args.keep else tmp.name
    os.makedirs(work, exist_ok=True)
    ctx = Ctx(SETTINGS["quick" if args.quick else "full"], config, work, plots, os.path.dirname(out))
    if args.render_only or args.sections:
        if not os.path.exists(results_path):
            sys.exit(f"no {results_path}: run without --render-only/--sections first")
        ctx.results = read_json(results_path)
        if args.sections and ctx.results["meta"].get("quick") != args.quick:
            sys.exit("--sections must use the same mode (--quick or not) as the results it joins")
    if not args.render_only:
        meta = ctx.results.setdefault("meta", {"dates": {}, "durations": {}})
        meta.update(machine=machine_info(), model=model_info(config), quick=args.quick, config=config)
        for sec in SECTIONS:
            if sec.run is None or (args.sections and sec.key not in args.sections):
                continue
            print(f"== {sec.key}", flush=True)
            t0 = time.perf_counter()
            ctx.results[sec.key] = sec.run(ctx)
            meta["durations"][sec.key] = time.perf_counter() - t0
            meta["dates"][sec.key] = time.strftime("%Y-%m-%d")
            # Saved (atomically) after every section, so a failure later keeps what was measured.
            atomic_write(plots, "results.json", json.dumps(ctx.results, indent=1).encode())
    ctx.config = ctx.results["meta"]["config"]
    render(ctx, out)
    tmp.cleanup()


if __name__ == "__main__":
    main()
