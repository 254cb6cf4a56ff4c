"""Side-by-side benchmark over video lengths: diffusers' one-pass WanPipeline vs dualpar on 1 and N ranks.

    python scripts/bench.py                              # tiny model, 65..1025 frames, N = 2
    python scripts/bench.py --frames 65 129 --ranks 2 --json out.json

For every length, in one invocation on this machine, with the same model,
steps, prompt and noise seed:

  (a) ``baseline``: diffusers' WanPipeline denoising the whole video in one
      pass on one process, then one VAE decode (skipped, and marked so, once
      its projected time exceeds ``--baseline-cap-s``: it grows quadratically);
  (b) ``blockwise-1``: our block-wise schedule on 1 rank (launch/gen.py);
  (c) ``pipelined-N``: the pipelined engine on N ranks (torchrun + launch/gen.py).

Reported per run: denoising-loop and end-to-end wall time, time per output
frame, peak RSS per rank, bytes sent per rank and each rank's idle fraction.
Every process uses one CPU thread. ``--trace`` adds a Chrome trace per run.
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
sys.path.insert(0, ROOT)

from bench_speedup import run_once  # noqa: E402


def baseline_worker(frames: int, config: str | None) -> dict:
    """One process: WanPipeline over the whole video, then one-shot VAE decode."""
    import torch
    from diffusers import WanPipeline

    from dualpar.job import peak_rss_mb
    from dualpar.config import load_config
    from dualpar.models import loader

    torch.set_num_threads(1)
    cfg = load_config(config)
    cfg.video.frames = frames
    t0 = time.perf_counter()
    tok, te = loader.load_text_encoder(cfg)
    transformer = loader.load_transformer(cfg)
    vae = loader.load_vae(cfg)
    pipe = WanPipeline(tokenizer=tok, text_encoder=te, vae=vae, scheduler=loader.make_scheduler(cfg),
                       transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    embeds = loader.encode_prompts(tok, te, [cfg.sampling.prompt, cfg.sampling.negative_prompt], cfg.model.tokens)
    lat = cfg.video.latent_frames
    h, w = cfg.video.height // loader.VAE_SPATIAL, cfg.video.width // loader.VAE_SPATIAL
    noise = torch.randn(1, 16, lat, h, w, generator=torch.Generator().manual_seed(cfg.sampling.seed))
    t1 = time.perf_counter()
    latents = pipe(prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:], latents=noise,
                   height=cfg.video.height, width=cfg.video.width, num_frames=frames,
                   num_inference_steps=cfg.sampling.steps, guidance_scale=cfg.sampling.guidance,
                   output_type="latent").frames
    t2 = time.perf_counter()
    from dualpar.output.decode import StreamingDecoder

    video = StreamingDecoder(vae).decode_block(latents)  # one block = the whole video: a one-shot decode
    assert video.shape[2] == frames
    t3 = time.perf_counter()
    return {"loop_s": t2 - t1, "total_s": t3 - t0, "ranks": [{"rank": 0, "peak_rss_mb": peak_rss_mb(), "bytes_sent": 0,
                                                              "idle": 0.0}]}


def run_baseline(frames: int, config: str | None) -> dict:
    res = subprocess.run([sys.executable, __file__, "--worker", str(frames)] + (["--config", config] if config else []),
                         capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if res.returncode:
        sys.exit(f"baseline failed at {frames} frames:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_engine(n: int, frames: int, config: str | None, out: str, trace: bool) -> dict:
    extra = ["--frames", str(frames), "--set", "output.checkpoint_every=0"] + (["--config", config] if config else [])
    s = run_once(n, out, extra + (["--trace"] if trace else []), decode=True)
    for r in s["ranks"]:
        r["idle"] = 1.0 - r["busy_s"] / max(r["loop_s"], 1e-9)
    return s


def fmt_row(name: str, frames: int, s: dict | None, note: str = "") -> str:
    if s is None:
        return f"| {name} | {frames} | skipped{note} | | | | | |"
    rss = " / ".join(f"{r['peak_rss_mb']:.0f}" for r in s["ranks"])
    sent = " / ".join(f"{r['bytes_sent'] / 1e6:.1f}" for r in s["ranks"])
    idle = " / ".join(f"{r['idle']:.0%}" for r in s["ranks"])
    return (f"| {name} | {frames} | {s['loop_s']:.2f} | {s['total_s']:.2f} | {1e3 * s['loop_s'] / frames:.1f} | "
            f"{rss} | {sent} | {idle} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, nargs="+", default=[65, 129, 257, 513, 1025])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--config", default=None, help="config file (default: the tiny demo config)")
    p.add_argument("--baseline-cap-s", type=float, default=300.0,
                   help="skip the one-pass baseline once its projected loop time exceeds this")
    p.add_argument("--trace", action="store_true", help="keep a Chrome trace of each engine run (in --keep)")
    p.add_argument("--keep", help="directory for the runs' outputs (default: a temporary one)")
    p.add_argument("--json", help="write all figures here")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(baseline_worker(args.worker, args.config)))
        return
    from dualpar.config import load_config

    if load_config(args.config).model.transformer_file:  # the baseline runs diffusers' own model
        sys.exit("bench.py: the one-pass baseline runs a folder's own transformer; drop model.transformer_file")
    results = []
    tmp = tempfile.TemporaryDirectory()
    base_dir = args.keep or tmp.name
    last_base: tuple[int, float] | None = None
    print("| run | frames | loop s | end-to-end s | loop ms/frame | peak RSS MB per rank | MB sent per rank "
          "| idle per rank |\n|---|---|---|---|---|---|---|---|", flush=True)
    for frames in args.frames:
        # The one-pass attention is quadratic in length: project from the last measured length.
        projected = None if last_base is None else last_base[1] * (frames / last_base[0]) ** 2
        if projected is not None and projected > args.baseline_cap_s:
            base, note = None, f" (projected {projected:.0f} s > cap {args.baseline_cap_s:.0f} s)"
        else:
            base, note = run_baseline(frames, args.config), ""
            last_base = (frames, base["loop_s"])
        one = run_engine(1, frames, args.config, os.path.join(base_dir, f"n1-{frames}"), args.trace)
        par = run_engine(args.ranks, frames, args.config, os.path.join(base_dir, f"n{args.ranks}-{frames}"), args.trace)
        for name, s, n in (("baseline (diffusers, one pass)", base, note), ("blockwise-1", one, ""),
                           (f"pipelined-{args.ranks}", par, "")):
            print(fmt_row(name, frames, s, n), flush=True)
        results.append({"frames": frames, "baseline": base, "baseline_note": note.strip(" ()") or None,
                        "blockwise_1": one, f"pipelined_{args.ranks}": par})
    longest = max((r for r in results if r["baseline"]), key=lambda r: r["frames"], default=None)
    if longest:
        f = longest["frames"]
        print(f"\nat {f} frames (longest the baseline ran): baseline / pipelined-{args.ranks} loop time = "
              f"{longest['baseline']['loop_s'] / longest[f'pipelined_{args.ranks}']['loop_s']:.2f}x, "
              f"end to end {longest['baseline']['total_s'] / longest[f'pipelined_{args.ranks}']['total_s']:.2f}x")
    last = results[-1]
    print(f"at {last['frames']} frames: pipelined-{args.ranks} / blockwise-1 loop speed-up = "
          f"{last['blockwise_1']['loop_s'] / last[f'pipelined_{args.ranks}']['loop_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": os.uname().nodename, "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
                       "results": results}, fh, indent=2)


if __name__ == "__main__":
    main()
