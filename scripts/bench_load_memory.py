"""Per-rank host memory while loading a transformer split over N ranks.

    python scripts/bench_load_memory.py                   # ~300 MB bf16 checkpoint, N = 1 and 2
    python scripts/bench_load_memory.py --model PATH --ranks 1 2 4

Makes (or takes) a diffusers-format checkpoint, then starts N processes at
once, each loading its own layer range exactly as ``launch/gen.py`` does, and
reports per rank the resident memory after imports, the peak during loading
(VmHWM) and the growth, against the rank's share of the transformer's bytes.
Runs for different N come from the same checkpoint in one invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def worker(model: str, rank: int, world: int, dtype: str) -> None:
    import torch

    from dualpar.config import Config
    from dualpar.models import loader, weights
    from dualpar.schedule import split_layers

    torch.set_num_threads(1)
    cfg = Config()
    cfg.model.path, cfg.model.dtype = model, dtype
    first, last = split_layers(loader.num_layers(cfg), world)[rank]
    before = _status_kb("VmRSS")
    part = loader.load_slice(cfg, first, last, torch.device("cpu"))
    peak = _status_kb("VmHWM")
    owned = sum(p.numel() * p.element_size() for p in part.parameters())
    print(json.dumps({"rank": rank, "layers": [first, last], "rss_before_mb": before / 1024,
                      "peak_mb": peak / 1024, "growth_mb": (peak - before) / 1024, "owned_mb": owned / 2**20}))
    del weights


def transformer_mb(model: str) -> float:
    tdir = os.path.join(model, "transformer")
    return sum(os.path.getsize(os.path.join(tdir, f)) for f in os.listdir(tdir) if f.endswith(".safetensors")) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="diffusers-format folder (default: make a random one)")
    p.add_argument("--target-mb", type=float, default=300)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--worker", nargs=3, metavar=("MODEL", "RANK", "WORLD"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), int(args.worker[2]), args.dtype)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = os.path.join(tmp, "wan-random")
            subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "make_tiny_checkpoint.py"), model,
                            "--dim", "1024", "--heads", "8", "--target-mb", str(args.target_mb),
                            "--dtype", "bfloat16", "--max-shard-size", "50MB"], check=True, capture_output=True)
        total = transformer_mb(model)
        print(f"transformer: {total:.0f} MB of safetensors in {model}\n")
        print(f"{'N':>2} {'rank':>4} {'layers':>8} {'share MB':>8} {'after imports':>13} {'peak':>7} "
              f"{'growth':>7} {'growth - share':>14}")
        for n in args.ranks:
            procs = [subprocess.Popen([sys.executable, __file__, "--dtype", args.dtype, "--worker", model, str(r), str(n)],
                                      stdout=subprocess.PIPE, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
                     for r in range(n)]
            for proc in procs:
                out, _ = proc.communicate()
                if proc.returncode:
                    sys.exit(f"worker failed (N={n})")
                r = json.loads(out.strip().splitlines()[-1])
                print(f"{n:>2} {r['rank']:>4} {str(tuple(r['layers'])):>8} {r['owned_mb']:8.0f} "
                      f"{r['rss_before_mb']:11.0f} MB {r['peak_mb']:4.0f} MB {r['growth_mb']:4.0f} MB "
                      f"{r['growth_mb'] - r['owned_mb']:11.0f} MB")


if __name__ == "__main__":
    main()
