#!/usr/bin/env python
"""Write a complete diffusers-format Wan2.1 text-to-video folder with random weights.

By default it is the ``tiny-random`` preset (same seed, same weights), with
the transformer split into several safetensors shards plus an index, as real
checkpoints are. ``--layers``, ``--dim``, ``--heads``, ``--ffn-dim`` or
``--target-mb`` make a bigger transformer of the same architecture (e.g. a few
hundred MB for loading benchmarks); the VAE and text encoder stay tiny.

    python scripts/make_tiny_checkpoint.py OUT_DIR [--layers N] [--dim D] [--heads H]
        [--ffn-dim F] [--target-mb M] [--max-shard-size 1MB] [--dtype float32] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(ROOT))

from dualpar.models.tiny import TINY_TRANSFORMER, tiny_components, tiny_transformer  # noqa: E402

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def transformer_config(
    *, layers: int | None = None, dim: int | None = None, heads: int | None = None, ffn_dim: int | None = None
) -> dict:
    """The tiny preset's transformer config with the given sizes changed.

    Without ``heads``, a changed ``dim`` uses heads of 128 channels (Wan's own
    head size); without ``ffn_dim``, a changed ``dim`` keeps the preset's 4x ratio.
    """
    cfg = dict(TINY_TRANSFORMER)
    if dim is not None:
        heads = heads or max(1, dim // 128)
        ffn_dim = ffn_dim or 4 * dim
    elif heads is not None:
        dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    if heads is not None:
        if dim % heads or (dim // heads) % 2:
            raise ValueError(f"dim {dim} must split into {heads} heads of an even size")
        cfg["num_attention_heads"], cfg["attention_head_dim"] = heads, dim // heads
    if ffn_dim is not None:
        cfg["ffn_dim"] = ffn_dim
    if layers is not None:
        if layers < 1:
            raise ValueError("layers must be >= 1")
        cfg["num_layers"] = layers
    return cfg


def _param_count(cfg: dict) -> int:
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):  # sizes only: no memory, no init time
        model = WanTransformer3DModel(**cfg)
    return sum(p.numel() for p in model.parameters())


def layers_for_size(cfg: dict, target_mb: float, dtype: torch.dtype) -> int:
    """How many layers bring the transformer closest to ``target_mb`` megabytes (at least 1)."""
    one = _param_count(dict(cfg, num_layers=1))
    per_layer = _param_count(dict(cfg, num_layers=2)) - one
    itemsize = torch.empty((), dtype=dtype).element_size()
    rest = (one - per_layer) * itemsize
    return max(1, round((target_mb * 1e6 - rest) / (per_layer * itemsize)))


def make_tiny_checkpoint(
    out_dir: str | Path,
    *,
    seed: int = 0,
    layers: int | None = None,
    dim: int | None = None,
    heads: int | None = None,
    ffn_dim: int | None = None,
    target_mb: float | None = None,
    max_shard_size: str | int = "1MB",
    dtype: str = "float32",
    overwrite: bool = False,
) -> dict:
    """Save a WanPipeline folder to ``out_dir``; return a summary (config, files and sizes).

    With no size option the transformer is exactly the tiny preset's for ``seed``.
    ``target_mb`` picks the number of layers (so it excludes ``layers``).
    """
    from diffusers import UniPCMultistepScheduler, WanPipeline

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty (pass overwrite=True / --overwrite)")
    if target_mb is not None and layers is not None:
        raise ValueError("give either layers or target_mb, not both")
    torch_dtype = _DTYPES[dtype]

    resized = any(v is not None for v in (layers, dim, heads, ffn_dim, target_mb))
    parts = tiny_components(seed, transformer=not resized)
    if resized:
        cfg = transformer_config(layers=layers, dim=dim, heads=heads, ffn_dim=ffn_dim)
        if target_mb is not None:
            cfg["num_layers"] = layers_for_size(cfg, target_mb, torch_dtype)
        parts["transformer"] = tiny_transformer(seed, cfg)
    if torch_dtype != torch.float32:
        parts["transformer"].to(torch_dtype)

    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )
    pipe = WanPipeline(
        tokenizer=parts["tokenizer"],
        text_encoder=parts["text_encoder"],
        vae=parts["vae"],
        scheduler=scheduler,
        transformer=parts["transformer"],
    )
    pipe.save_pretrained(out, max_shard_size=max_shard_size)

    files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    shards = [f for f in files if f.startswith("transformer/") and f.endswith(".safetensors")]
    return {
        "out_dir": str(out),
        "transformer_config": dict(parts["transformer"].config),
        "transformer_bytes": sum(files[f] for f in shards),
        "transformer_shards": shards,
        "files": files,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--seed", type=int, default=0, help="weights seed (tiny preset: the same weights)")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--layers", type=int, help="number of transformer layers")
    size.add_argument("--target-mb", type=float, help="choose the layer count for about this transformer size")
    ap.add_argument("--dim", type=int, help="transformer width (heads of 128 unless --heads)")
    ap.add_argument("--heads", type=int, help="attention heads")
    ap.add_argument("--ffn-dim", type=int, help="feed-forward width (default 4 x dim)")
    ap.add_argument("--max-shard-size", default="1MB", help="largest transformer shard, e.g. 200KB, 50MB")
    ap.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="dtype of the saved transformer")
    ap.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT_DIR")
    args = ap.parse_args(argv)
    try:
        info = make_tiny_checkpoint(
            args.out_dir,
            seed=args.seed,
            layers=args.layers,
            dim=args.dim,
            heads=args.heads,
            ffn_dim=args.ffn_dim,
            target_mb=args.target_mb,
            max_shard_size=args.max_shard_size,
            dtype=args.dtype,
            overwrite=args.overwrite,
        )
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cfg = info["transformer_config"]
    for name, nbytes in info["files"].items():
        print(f"{nbytes:>14,d}  {name}")
    print(
        f"wrote {info['out_dir']}: transformer {cfg['num_layers']} layers, "
        f"dim {cfg['num_attention_heads'] * cfg['attention_head_dim']} ({cfg['num_attention_heads']} heads), "
        f"ffn {cfg['ffn_dim']}, {info['transformer_bytes'] / 1e6:.1f} MB in {len(info['transformer_shards'])} shard(s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
