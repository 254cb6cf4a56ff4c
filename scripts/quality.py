#!/usr/bin/env python
"""Quality of videos of the synthetic world (the trained ``tiny`` preset's): does the video show
what its prompt asks for, does the object move continuously, do block boundaries show?

    python scripts/quality.py score RUN_DIR [RUN_DIR ...] [--json OUT]
    python scripts/quality.py vae [--clips 16]             # the preset VAE's reconstruction PSNR
    python scripts/quality.py strip RUN_DIR --png OUT [--count 8]
    python scripts/quality.py suite [--frames 1025] [--prompts 3] [--json docs/benchmarks/quality.json]
    python scripts/quality.py rescore SUITE_JSON            # the kept runs again, under today's measures

``score`` reads a run directory (its ``video.mp4`` and the config in its manifest) and measures:

* **adherence**: per frame, the share of prompted objects whose colour a simple detector finds
  (each pixel to its nearest palette colour, ``synthetic_world.detect``), and of those with the
  prompted shape too (told apart by how much of its bounding box a shape fills); the share of
  frames with the prompted background; objects found that the prompt did not ask for;
* **trajectory**: each prompted object's centroid per frame; its median step, the share of
  frames it is found in a row, and jumps (steps over a tenth of the frame); its size (the longer
  side of its bounding box over the frame's side: the world's objects are 0.20-0.35, a smear
  across the frame is near 1);
* **seams**: the mean absolute change between consecutive frames where a new block (chunk, in
  causal mode) starts, over the same at the other latent-frame starts (where Wan's VAE starts
  a new group of 4 frames, so both sides have the VAE's own grouping); 1.0 is seamless. The
  same ratio for the centroid's step.

``suite`` generates the runs the README's quality table lists (num_cat 4 vs 0, shared noise
on vs off, causal mode with the full cache and the window, topk and focused policies at one
budget, focused with its head budgets from attention shares and from the calibration of
``calibrate_heads.py``) for a few prompts, scores them and writes the JSON that
``benchmarks.py`` renders.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(HERE), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)

from synthetic_world import BACKGROUNDS, COLOURS, SHAPES, detect  # noqa: E402

JUMP = 0.1
"""A centroid step longer than this fraction of the frame's side is a jump."""
SUITE_PROMPTS = (
    "a red circle bouncing right on a dark blue background",
    "a yellow square bouncing down on a black background",
    "a green triangle bouncing left and a white circle bouncing up on a grey background",
)
CAUSAL = ["--mode", "causal", "--set", "causal.timesteps=1000,875,750,625,500,375,250,125",
          "--set", "causal.sampler=euler", "--set", "causal.shift=3.0"]
"""Causal mode for a model that is not distilled to few steps: 8 Euler steps per chunk."""
BUDGET = "24"
SUITE = (
    ("num_cat 4, shared noise (default)", []),
    ("num_cat 0", ["--num-cat", "0"]),
    ("shared noise off", ["--set", "parallel.shared_noise=false"]),
    ("causal, full cache", CAUSAL + ["--policy", "full"]),
    ("causal, full cache, bidirectional weights", CAUSAL + ["--policy", "full", "--set", "model.causal_weights=false"]),
    (f"causal, window {BUDGET}", CAUSAL + ["--policy", "window", "--budget", BUDGET]),
    (f"causal, topk {BUDGET}", CAUSAL + ["--policy", "topk", "--budget", BUDGET]),
    (f"causal, focused {BUDGET}", CAUSAL + ["--policy", "focused", "--budget", BUDGET]),
    (f"causal, focused {BUDGET}, calibrated heads", CAUSAL + ["--policy", "focused", "--budget", BUDGET,
                                                             "--set", "causal.head_budget=calibrated"]),
)
QUICK = ("num_cat 4, shared noise (default)", "num_cat 0", f"causal, focused {BUDGET}")
"""The settings of ``suite --quick``."""


def parse_prompt(prompt: str) -> tuple[list[tuple[str, str]], str | None]:
    """The (colour, shape) pairs and the background a synthetic-world prompt names."""
    colours = "|".join(map(re.escape, COLOURS))
    shapes = "|".join(map(re.escape, SHAPES))
    things = re.findall(rf"\b({colours}) ({shapes})\b", prompt)
    bgs = sorted(BACKGROUNDS, key=len, reverse=True)  # "dark blue" before "blue"
    m = re.search(r"on an? (" + "|".join(map(re.escape, bgs)) + r") background", prompt)
    return things, (m.group(1) if m else None)


def read_frames(path: str) -> np.ndarray:
    """Every frame of an MP4 as uint8 RGB ``[F, H, W, 3]``."""
    import av

    with av.open(path) as box:
        return np.stack([f.to_ndarray(format="rgb24") for f in box.decode(video=0)])


def starts(latent_frames: int, block: int) -> list[int]:
    """First latent frame of every block after the first (schedule.split_blocks' layout)."""
    from dualpar.schedule import split_blocks

    return [b.start for b in split_blocks(latent_frames, block)[1:]]


def score_video(frames: np.ndarray, prompt: str, block_starts: list[int]) -> dict:
    """The measures of the module docstring for one video and its prompt."""
    things, background = parse_prompt(prompt)
    f, h, w, _ = frames.shape
    found = [detect(fr, background) for fr in frames]
    if background:
        names = list(COLOURS) + list(BACKGROUNDS)
        palette = np.array([COLOURS.get(n) or BACKGROUNDS[n] for n in names], dtype=np.float32)
        bg_ok = []
        for fr in frames[::8]:
            near = ((fr[:, :, None].astype(np.float32) - palette) ** 2).sum(-1).argmin(-1)
            counts = np.bincount(near.ravel(), minlength=len(names))[len(COLOURS):]
            bg_ok.append(list(BACKGROUNDS)[int(counts.argmax())] == background)
    colour_ok = np.array([[c in fd for c, _ in things] for fd in found], dtype=bool)
    shape_ok = np.array([[c in fd and fd[c].shape == s for c, s in things] for fd in found], dtype=bool)
    wanted = {c for c, _ in things}
    extra = np.mean([len(set(fd) - wanted) for fd in found])

    # frame-to-frame change; transition i goes from frame i to i + 1
    diff = np.abs(np.diff(frames.astype(np.float32), axis=0)).mean(axis=(1, 2, 3))
    latent_frames = (f - 1) // 4 + 1
    latent_starts = [4 * k - 4 for k in range(1, latent_frames)]  # transition into latent k's first frame
    seam_t = {4 * s - 4 for s in block_starts}
    inner_t = [t for t in latent_starts if t not in seam_t]
    seam_t = sorted(seam_t)

    def ratio(values: np.ndarray) -> float | None:
        a = values[seam_t][np.isfinite(values[seam_t])] if seam_t else np.array([])
        b = values[inner_t][np.isfinite(values[inner_t])] if inner_t else np.array([])
        if not len(a) or not len(b) or b.mean() == 0:
            return None
        return float(a.mean() / b.mean())

    side = min(h, w)
    tracks = []
    steps_all = np.full((len(things), f - 1), np.nan)
    for i, (c, _) in enumerate(things):
        xy = np.array([[fd[c].x, fd[c].y] if c in fd else [np.nan, np.nan] for fd in found])
        step = np.linalg.norm(np.diff(xy, axis=0), axis=1) / side
        steps_all[i] = step
        ok = np.isfinite(step)
        tracks.append({"colour": c, "found_share": float(np.isfinite(xy[:, 0]).mean()),
                       "median_step": float(np.median(step[ok])) if ok.any() else None,
                       "jumps": int((step[ok] > JUMP).sum()),
                       "path": [[round(float(v), 1) for v in p] if np.isfinite(p[0]) else None for p in xy[::16]]})
    spans = [fd[c].span / side for fd in found for c, _ in things if c in fd]
    moving = [t["median_step"] for t in tracks if t["median_step"] is not None]
    with warnings.catch_warnings():  # a frame where no prompted object is found gives NaN, as it should
        warnings.simplefilter("ignore", RuntimeWarning)
        step_mean = np.nanmean(steps_all, axis=0) if len(things) else np.full(f - 1, np.nan)
    return {
        "prompt": prompt, "frames": int(f),
        "colour_found": float(colour_ok.mean()) if things else None,
        "shape_right": float(shape_ok.mean()) if things else None,
        "background_right": float(np.mean(bg_ok)) if background else None,
        "extra_objects": float(extra),
        "jumps": int(sum(t["jumps"] for t in tracks)),
        "object_size": float(np.median(spans)) if spans else None,
        "median_step": float(np.mean(moving)) if moving else None,
        "seam_change": ratio(diff),
        "seam_step": ratio(step_mean),
        "mean_change": float(diff.mean()),
        "tracks": tracks,
    }


def score_run(run: str) -> dict:
    """Score a run directory from its video and the config in its manifest."""
    manifest = json.loads(Path(run, "manifest.json").read_text())
    cfg = manifest["config"]
    if manifest.get("status") != "complete":
        raise SystemExit(f"{run}: the run is not complete (status {manifest.get('status')})")
    frames = read_frames(str(Path(run, "video.mp4")))
    causal = cfg["sampling"]["mode"] == "causal"
    block = cfg["causal"]["chunk"] if causal else cfg["parallel"]["block"]
    out = score_video(frames, cfg["sampling"]["prompt"], starts((frames.shape[0] - 1) // 4 + 1, block))
    out["run"] = str(run)
    return out


def vae_psnr(clips: int, preset: str = "tiny", size: int = 96, frames: int = 33) -> dict:
    """Reconstruction PSNR of the preset's VAE on held-out clips (a seed training never used)."""
    import torch

    from dualpar.config import Config
    from dualpar.models import loader
    from synthetic_world import render, sample_scene

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    cfg = Config()
    cfg.model.preset = preset
    vae = loader.load_vae(cfg)
    rng = np.random.default_rng([2026, 12])
    vals = []
    with torch.no_grad():
        for _ in range(clips):
            video = render(sample_scene(rng), frames, size, size)
            x = torch.from_numpy(video).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
            y = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
            rec = ((y[0].permute(1, 2, 3, 0) * 0.5 + 0.5).clamp(0, 1) * 255).round().numpy()
            mse = float(((rec - video.astype(np.float64)) ** 2).mean())
            vals.append(10 * np.log10(255.0 ** 2 / max(mse, 1e-9)))
    return {"preset": preset, "clips": clips, "frames": frames, "size": size, "psnr_db": float(np.mean(vals)),
            "psnr_min_db": float(np.min(vals))}


def strip(run: str, png: str, count: int, scale: int = 2) -> None:
    """``count`` evenly spaced frames of a run's video side by side, with their frame numbers."""
    from PIL import Image, ImageDraw

    frames = read_frames(str(Path(run, "video.mp4")))
    idx = np.linspace(0, len(frames) - 1, count).round().astype(int)
    h, w = frames.shape[1] * scale, frames.shape[2] * scale
    pad = 14
    img = Image.new("RGB", (count * (w + 4) - 4, h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for j, i in enumerate(idx):
        tile = Image.fromarray(frames[i]).resize((w, h), Image.NEAREST)
        img.paste(tile, (j * (w + 4), pad))
        draw.text((j * (w + 4) + 2, 1), f"frame {i}", fill=(0, 0, 0))
    img.save(png)


MEASURES = ("colour_found", "shape_right", "background_right", "extra_objects", "jumps", "object_size",
            "median_step", "seam_change", "seam_step", "mean_change")
"""What a suite row reports: the mean over its prompts' runs."""


def row_mean(scores: list[dict]) -> dict:
    vals = {k: [s[k] for s in scores if s.get(k) is not None] for k in MEASURES}
    return {k: float(np.mean(v)) if v else None for k, v in vals.items()}


def rescore(path: str) -> dict:
    """A suite's JSON with every run scored again from its kept directory (``suite --keep``): the
    same videos under the current measures; each run's generation time is kept."""
    data = json.loads(Path(path).read_text())
    for row in data["rows"]:
        runs = []
        for old in row["runs"]:
            if not Path(old["run"], "manifest.json").is_file():
                raise SystemExit(f"error: {old['run']} is gone: rescore needs the runs kept (suite --keep)")
            runs.append(dict(score_run(old["run"]), seconds=old["seconds"]))
        row["runs"], row["mean"] = runs, row_mean(runs)
    return data


def run_suite(args) -> dict:
    """Generate, score, and collect the suite's runs (see the module docstring)."""
    work = Path(args.keep or Path(os.environ.get("TMPDIR", "/tmp")) / f"quality-{os.getpid()}")
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    t_start = time.time()
    prompts = SUITE_PROMPTS[:args.prompts]
    # --quick: a smoke test of the whole path (short, one prompt, three settings)
    suite = [row for row in SUITE if row[0] in QUICK] if args.quick else SUITE
    for name, extra in suite:
        scores = []
        for j, prompt in enumerate(prompts):
            out = work / f"{len(rows)}-{j}"
            cmd = [sys.executable, str(ROOT / "launch" / "gen.py"), "--nproc", str(args.ranks),
                   "--frames", str(args.frames), "--prompt", prompt, "--seed", str(j), "--out", str(out),
                   "--overwrite", "--no-progress", *extra]
            print(f"$ {' '.join(cmd[1:])}", flush=True)
            t0 = time.time()
            res = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if res.returncode:
                raise SystemExit(f"quality suite: run failed ({res.returncode}):\n{res.stderr[-2000:]}")
            s = score_run(str(out))
            s["seconds"] = round(time.time() - t0, 1)
            scores.append(s)
        mean = row_mean(scores)
        rows.append({"name": name, "args": extra, "mean": mean, "runs": scores})
        print(f"{name}: {json.dumps(mean)}", flush=True)
    command = "python scripts/quality.py suite" + (" --quick" if args.quick else "") + (
        f" --frames {args.frames}" if args.frames != 1025 and not args.quick else "") + (
        f" --prompts {args.prompts}" if args.prompts != 3 and not args.quick else "")
    return {"frames": args.frames, "ranks": args.ranks, "quick": args.quick, "prompts": list(prompts),
            "budget": BUDGET, "rows": rows, "vae": vae_psnr(args.clips, frames=9 if args.quick else 33),
            "minutes": round((time.time() - t_start) / 60, 1), "date": time.strftime("%Y-%m-%d"), "command": command}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("score", help="score run directories")
    a.add_argument("runs", nargs="+")
    a.add_argument("--json", help="write the scores here")
    a = sub.add_parser("vae", help="reconstruction PSNR of the trained preset's VAE")
    a.add_argument("--clips", type=int, default=16)
    a = sub.add_parser("rescore", help="score a suite's kept runs again (its JSON, rewritten in place)")
    a.add_argument("json")
    a = sub.add_parser("strip", help="a PNG of evenly spaced frames of a run")
    a.add_argument("run")
    a.add_argument("--png", required=True)
    a.add_argument("--count", type=int, default=8)
    a = sub.add_parser("suite", help="generate and score the quality table's runs")
    a.add_argument("--frames", type=int, default=1025)
    a.add_argument("--prompts", type=int, default=3, choices=range(1, len(SUITE_PROMPTS) + 1))
    a.add_argument("--ranks", type=int, default=2)
    a.add_argument("--clips", type=int, default=16, help="held-out clips of the VAE's PSNR")
    a.add_argument("--keep", help="keep the runs here (default: a scratch directory)")
    a.add_argument("--quick", action="store_true", help="33 frames, one prompt, three settings, 2 VAE clips")
    a.add_argument("--json", default=str(ROOT / "docs" / "benchmarks" / "quality.json"))
    args = ap.parse_args(argv)
    if args.cmd == "score":
        for r in args.runs:
            if not Path(r, "manifest.json").is_file():
                print(f"error: {r} is not a run directory (no manifest.json)", file=sys.stderr)
                return 2
        out = [score_run(r) for r in args.runs]
        text = json.dumps(out, indent=1)
        if args.json:
            Path(args.json).write_text(text + "\n")
        for s in out:
            print(json.dumps({k: v for k, v in s.items() if k != "tracks"}))
    elif args.cmd == "rescore":
        Path(args.json).write_text(json.dumps(rescore(args.json), indent=1) + "\n")
        print(f"wrote {args.json}")
    elif args.cmd == "vae":
        print(json.dumps(vae_psnr(args.clips)))
    elif args.cmd == "strip":
        strip(args.run, args.png, args.count)
        print(f"wrote {args.png}")
    else:
        if args.quick:
            args.frames, args.prompts, args.clips = 33, 1, 2
        data = run_suite(args)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
