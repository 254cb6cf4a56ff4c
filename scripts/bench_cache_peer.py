"""The peer: cache-dit's DBCache (alone and with its TaylorSeer calibrator) on diffusers' WanPipeline.

    python scripts/bench_cache_peer.py                      # both presets, 65 frames at 96x96, 10 steps
    python scripts/bench_cache_peer.py --preset tiny-random --frames 9 --size 32 --steps 4 --repeat 1 --json out.json

For a side-by-side with our own timestep feature caching (the ``cache``
section), this runs the one-pass diffusers ``WanPipeline`` on our tiny models
(the trained ``tiny`` preset: guidance 1, one transformer call per step; the
``tiny-random`` one: guidance 5, a conditional and an unconditional call per
step), in one process on one CPU thread, with the same seed, noise and prompt,
``output_type="latent"`` (no VAE decode), and:

* ``uncached``: the plain pipeline, the reference of its model's other rows;
* ``DBCache mask``: cache-dit's DBCache (F1B0: block 0 always runs, a cached
  step adds the last computed residual of blocks 1..N-1) with a fixed step
  mask, the one our ``cache`` config computes for ``warmup`` 2, ``last`` 1 and
  ``interval`` 2, 3, 4 (``dualpar.schedule.full_steps``), built with
  ``cache_dit.steps_mask`` and forced with the ``static`` policy, so both
  sides skip exactly the same steps;
* ``DBCache rdt``: DBCache's own dynamic rule, a step is cached when block 0's
  residual changed by less than ``residual_diff_threshold`` (relative L1); a
  threshold that never skips is reported as such, with the smallest change
  seen (at 10 steps neither tiny model ever skips at cache-dit's default 0.08);
* the same settings with ``+ TaylorSeer`` (``TaylorSeerCalibratorConfig``):
  a cached step extrapolates the residual instead of repeating it.

cache-dit patches the pipeline class's ``__call__`` and the transformer's
``forward``; every cached run enables it just before and disables it right
after (``cache_dit.disable_cache``), and the uncached run, repeated every
round and once after all cached runs, must come out bit-identical each time:
nothing leaked between runs. Per row: the best pipeline-call time of ``--repeat``
(runs alternate between settings, since this machine is shared and noisy), the
share of transformer calls fully computed (from cache-dit's own stats), the
speed-up over the model's uncached time and the relative L2 of the final
latents to the uncached ones, ||a - b|| / ||b||.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# cache-dit reads its log level once, at import: keep its per-call INFO lines out of the table
os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")

import torch

WARMUP, LAST = 2, 1  # our cache config's defaults, so the masks match what our side computes


def mask_for(steps: int, interval: int) -> list[int]:
    """Our step plan for ``interval``, as cache-dit's own ``steps_mask`` builds it from run lengths."""
    import cache_dit

    from dualpar.schedule import full_steps

    ours = [int(f) for f in full_steps(steps, WARMUP, interval, LAST)]
    runs: list[list[int]] = [[], []]  # compute bins, cache bins, alternating from a compute run
    for i, m in enumerate(ours):
        if i == 0 or m != ours[i - 1]:
            runs[1 - m].append(0)
        runs[1 - m][-1] += 1
    mask = cache_dit.steps_mask(compute_bins=runs[0], cache_bins=runs[1], total_steps=steps)
    assert mask == ours, (mask, ours)
    return mask


def settings_for(steps: int, intervals: list[int], thresholds: list[float], order: int) -> list[dict]:
    """Every row of one model: uncached first, then each cache setting without and with TaylorSeer."""
    base = [{"method": "uncached", "settings": {}}]
    for k in intervals:
        mask = mask_for(steps, k)
        base.append({"method": "DBCache mask", "settings": {"interval": k, "mask": "".join(map(str, mask))},
                     "mask": mask})
    for t in thresholds:
        base.append({"method": "DBCache rdt", "settings": {"residual_diff_threshold": t}, "threshold": t})
    rows = base[:1]
    for taylor in (False, True):
        for s in base[1:]:
            r = dict(s, settings=dict(s["settings"]))
            if taylor:
                r["method"] += f" + TaylorSeer O{order}"
                r["settings"]["taylorseer_order"] = order
            rows.append(r)
    return rows


def enable(pipe, row: dict, steps: int, cfg_rows: bool, order: int) -> None:
    import cache_dit

    common = {
        "Fn_compute_blocks": 1,  # the cheapest probe: a cached step still runs block 0 (and embed / head)
        "Bn_compute_blocks": 0,
        "max_warmup_steps": WARMUP,
        "num_inference_steps": steps,
        # Wan is registered as separate-CFG (two calls a step); at guidance 1 there is one call a
        # step, and leaving it on would make cache-dit count every other call as the CFG branch
        "enable_separate_cfg": cfg_rows,
    }
    if "mask" in row:
        cache = cache_dit.DBCacheConfig(**common, steps_computation_mask=row["mask"],
                                        steps_computation_policy="static")  # 0 = always cached
    else:
        cache = cache_dit.DBCacheConfig(**common, residual_diff_threshold=row["threshold"])
    taylor = "taylorseer_order" in row["settings"]
    calib = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=order) if taylor else None
    cache_dit.enable_cache(pipe, cache_config=cache, calibrator_config=calib)


def cache_stats(pipe) -> dict:
    """cache-dit's record of the last call: calls, cached steps per branch, block-0 residual diffs."""
    import cache_dit

    s = cache_dit.summary(pipe, logging=False)[0]
    diffs = [v for d in (s.residual_diffs, s.cfg_residual_diffs) for v in d.values() if v >= 0]
    return {"calls": s.accumulated_transformer_executed_steps, "cached": list(s.cached_steps),
            "cfg_cached": list(s.cfg_cached_steps), "min_diff": min(diffs) if diffs else None}


def run_model(preset: str, args) -> tuple[list[dict], list[str]]:
    import cache_dit
    from diffusers import WanPipeline

    from dualpar.config import Config, apply_model_defaults
    from dualpar.models import loader

    cfg = Config()
    cfg.model.preset = preset
    apply_model_defaults(cfg)  # trained: guidance 1, empty negative prompt; random: Wan's guidance 5
    cfg.video.frames, cfg.video.height, cfg.video.width = args.frames, args.size, args.size
    cfg.sampling.steps = args.steps
    tok, te = loader.load_text_encoder(cfg)
    pipe = WanPipeline(tokenizer=tok, text_encoder=te, vae=loader.load_vae(cfg),
                       scheduler=loader.make_scheduler(cfg), transformer=loader.load_transformer(cfg))
    pipe.set_progress_bar_config(disable=True)
    embeds = loader.encode_prompts(tok, te, [cfg.sampling.prompt, cfg.sampling.negative_prompt], cfg.model.tokens)
    lat_frames = (args.frames - 1) // 4 + 1
    noise = torch.randn(1, 16, lat_frames, args.size // 8, args.size // 8,
                        generator=torch.Generator().manual_seed(cfg.sampling.seed))
    guidance = cfg.sampling.guidance
    cfg_rows = guidance > 1.0  # WanPipeline's own test for its second (unconditional) call

    def call() -> tuple[torch.Tensor, float]:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = pipe(prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:], latents=noise.clone(),
                       height=args.size, width=args.size, num_frames=args.frames,
                       num_inference_steps=args.steps, guidance_scale=guidance, output_type="latent").frames
        return out, time.perf_counter() - t0

    rows = settings_for(args.steps, args.intervals, args.thresholds, args.order)
    ref = None
    for rep in range(args.repeat):
        for r in rows:
            if r["method"] == "uncached":
                out, sec = call()
                if ref is None:
                    ref = out
                elif not torch.equal(out, ref):  # a hook or class patch survived a disable_cache
                    sys.exit(f"error: {preset}: the uncached run changed between repeats (a cache-dit hook survived)")
                r["stats"] = {"calls": args.steps * (2 if cfg_rows else 1), "cached": [], "cfg_cached": []}
            else:
                enable(pipe, r, args.steps, cfg_rows, args.order)
                try:
                    out, sec = call()
                    r["stats"] = cache_stats(pipe)
                finally:
                    cache_dit.disable_cache(pipe)
            r["seconds"] = min(sec, r.get("seconds", float("inf")))
            r["out"] = out
            print(f"  {preset} run {rep + 1}: {r['method']} {_brief(r['settings'])}: {sec:.2f} s", flush=True)
    # the uncached pipeline once more, after every cached run: it must not have moved
    out, sec = call()
    if not torch.equal(out, ref):
        sys.exit(f"error: {preset}: the uncached run changed after the cached ones (a cache-dit hook survived)")
    rows[0]["seconds"] = min(sec, rows[0]["seconds"])

    notes = []
    base = rows[0]["seconds"]
    out_rows = []
    for r in rows:
        st = r["stats"]
        calls = st["calls"]
        share = 1 - (len(st["cached"]) + len(st["cfg_cached"])) / calls if calls else None
        rel = ((r["out"] - ref).norm() / ref.norm()).item()
        out_rows.append({"model": preset, "method": r["method"], "settings": r["settings"],
                         "computed_share": share, "seconds": r["seconds"], "speedup": base / r["seconds"],
                         "rel_l2": rel, "cached_steps": st["cached"], "cfg_cached_steps": st["cfg_cached"],
                         "transformer_calls": calls})
        if "threshold" in r and share == 1.0:
            md = st.get("min_diff")
            notes.append(f"{preset}: {r['method']} at residual_diff_threshold {r['threshold']} never cached a step "
                         f"(smallest block-0 residual change seen after warm-up: "
                         f"{'n/a' if md is None else f'{md:.3f}'})")
    return out_rows, notes


def _brief(settings: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in settings.items()) or "-"


def _label(row: dict) -> str:
    """The table's method cell: the method and its one knob (the TaylorSeer order is in the name)."""
    s = row["settings"]
    if "interval" in s:
        nth = {1: "", 2: "2nd ", 3: "3rd "}.get(s["interval"], f"{s['interval']}th ")
        return f"{row['method']}, every {nth}step ({s['mask']})"
    if "residual_diff_threshold" in s:
        return f"{row['method']} {s['residual_diff_threshold']}"
    return row["method"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["tiny", "tiny-random"], nargs="+", default=["tiny", "tiny-random"],
                   help="models, one after the other (default: both)")
    p.add_argument("--frames", type=int, default=65)
    p.add_argument("--size", type=int, default=96, help="height and width (a multiple of 16)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeat", type=int, default=2, help="runs per setting; the best time is kept")
    p.add_argument("--intervals", type=int, nargs="+", default=[2, 3, 4],
                   help="step masks: our plan computing every k-th step after a warm-up of 2, and the last")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.08, 0.16, 0.32],
                   help="DBCache residual_diff_threshold values (0.08: cache-dit's default)")
    p.add_argument("--order", type=int, choices=[1, 2], default=1, help="TaylorSeer order")
    p.add_argument("--json", help="write the settings and every row here")
    args = p.parse_args()
    if args.size % 16 or (args.frames - 1) % 4:
        p.error("--size must be a multiple of 16 and --frames one more than a multiple of 4")
    try:
        import cache_dit
    except ImportError:
        print("error: cache-dit is not installed: pip install cache-dit==1.5.3", file=sys.stderr)
        sys.exit(2)
    torch.set_num_threads(1)  # one core, as the other benchmarks, and the machine is shared

    t0 = time.perf_counter()
    rows, notes = [], []
    for preset in args.preset:
        r, n = run_model(preset, args)
        rows += r
        notes += n
    total = time.perf_counter() - t0

    print("\n| model | method | share of full steps | speed-up over its own uncached run "
          "| relative L2 vs its own uncached run |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {_label(r)} | {r['computed_share']:.2f} | {r['speedup']:.2f}x ({r['seconds']:.2f} s) "
              f"| {r['rel_l2']:.4f} |")
    for n in notes:
        print(f"\nnote: {n}")
    print(f"\ncache-dit {cache_dit.__version__}; {args.frames} frames at {args.size}x{args.size}, {args.steps} steps, "
          f"best of {args.repeat}; {total:.0f} s in all")
    if args.json:
        settings = {k: getattr(args, k) for k in ("preset", "frames", "size", "steps", "repeat", "intervals",
                                                  "thresholds", "order")}
        settings.update(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=WARMUP, last=LAST,
                        threads=1, total_seconds=total, notes=notes)
        with open(args.json, "w") as fh:
            json.dump({"version": cache_dit.__version__, "settings": settings, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
