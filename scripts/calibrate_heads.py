#!/usr/bin/env python
"""Measure how much each attention head's view of the history matters, once per model, for Focused
Forcing's head budgets (``causal.head_budget=calibrated``).

For every (layer, head) it generates the same short causal video with that one head's committed
history hidden (it attends to the current chunk only, :class:`kv_cache.policy.HeadMask`) and
measures how far the result moves from the unmasked video: the relative L2 distance of the latents
of every chunk that has a history. A head whose history can be hidden at no cost needs few frames.
The table goes to ``head_importance.json`` in the model folder, where the engine reads it.

    python scripts/calibrate_heads.py [--model DIR] [--frames 49] [--prompt TEXT] [--out FILE]

Without ``--model`` it calibrates the trained ``tiny`` preset (its folder ships with the package).
The heads measured are those causal mode runs: the folder's ``transformer_causal/`` where it has one.
The causal settings are the quality suite's (``quality.py``: 8 Euler steps per chunk of 3).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(HERE), str(ROOT)):
    if p not in sys.path:
        sys.path.insert(0, p)


def calibrate(cfg, progress: bool = True) -> dict:
    """The importance table [layer][head] of ``cfg``'s model for its causal settings, and how it was made."""
    import torch
    from tqdm import tqdm

    from dualpar.causal import CausalEngine
    from dualpar.models import loader
    from dualpar.comm import Comm
    from kv_cache.policy import HeadMask

    t0 = time.perf_counter()
    engine = CausalEngine(cfg, Comm.from_env())
    engine.set_prompt(cfg.sampling.prompt, cfg.sampling.negative_prompt)
    base = [b.clone() for b in engine.generate(keep_latents=True).blocks]
    if len(base) < 2:
        raise SystemExit("calibrate_heads: the video must have at least 2 chunks (raise --frames)")
    norm = torch.sqrt(sum((b.double() ** 2).sum() for b in base[1:]))
    stage, m = engine.stage, engine.model
    layers, heads = len(m.layers), m.heads
    reset = stage.reset
    table = [[0.0] * heads for _ in range(layers)]
    with tqdm(total=layers * heads, desc="heads", disable=not progress, dynamic_ncols=True) as bar:
        for layer in range(layers):
            for head in range(heads):
                def masked_reset(*args, layer=layer, head=head, **kw):
                    reset(*args, **kw)
                    stage.caches[layer].policy = HeadMask(head)  # the store stays the full one
                stage.reset = masked_reset
                got = engine.generate(keep_latents=True).blocks
                dist = torch.sqrt(sum(((g.double() - b.double()) ** 2).sum() for g, b in zip(got[1:], base[1:])))
                table[layer][head] = float(dist / norm)
                bar.update(1)
    stage.reset = reset
    return {"importance": table, "layers": layers, "heads": heads,
            "method": "relative L2 change of the latents of every chunk with a history when one head's history "
                      "is hidden (the full cache otherwise)",
            "frames": cfg.video.frames, "height": cfg.video.height, "width": cfg.video.width,
            "prompt": cfg.sampling.prompt, "seed": cfg.sampling.seed, "guidance": cfg.sampling.guidance,
            "timesteps": cfg.causal.timesteps, "sampler": cfg.causal.sampler, "chunk": cfg.causal.chunk,
            "weights": loader.transformer_dir(cfg).name,
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="", help="model folder (default: the trained tiny preset's)")
    ap.add_argument("--frames", type=int, default=49)
    ap.add_argument("--height", type=int, default=96)
    ap.add_argument("--width", type=int, default=96)
    ap.add_argument("--prompt", default="a green triangle bouncing left and a white circle bouncing up on a grey "
                                        "background")
    ap.add_argument("--out", help="where to write the table (default: head_importance.json in the model folder)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    from dualpar.config import HEAD_IMPORTANCE, Config, ConfigError, model_defaults
    from quality import CAUSAL

    cfg = Config()
    cfg.model.path = args.model
    try:
        defaults, source = model_defaults(cfg.model)  # e.g. the trained preset's guidance
        cfg.update(defaults, source=source)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg.video.frames, cfg.video.height, cfg.video.width = args.frames, args.height, args.width
    cfg.sampling.prompt, cfg.sampling.mode = args.prompt, "causal"
    for item in CAUSAL:  # the suite's "--set causal.key=value" items
        if "=" in item:
            k, v = item.split("=", 1)
            cfg.set(k, float(v) if k == "causal.shift" else v)
    try:
        cfg.validate()
        from dualpar.models.loader import check_model

        check_model(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not cfg.model.folder:
        print("error: calibrate a model folder (--model DIR, or the trained tiny preset)", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(cfg.model.folder) / HEAD_IMPORTANCE
    import torch

    torch.set_num_threads(args.threads)
    data = calibrate(cfg, progress=not args.no_progress)
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {out} ({data['layers']} layers x {data['heads']} heads, {data['seconds']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
