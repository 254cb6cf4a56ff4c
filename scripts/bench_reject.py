"""How fast bad input is turned away: ``launch/gen.py`` with a bad option, side by side with the imports it avoids.

    python scripts/bench_reject.py --repeat 3 --json out.json

Each case is one fresh ``python launch/gen.py ...`` process that must end with
exit status 2 and one ``error:`` line; its wall time (best of ``--repeat``) is
set beside the time a fresh process takes just to import torch, diffusers and
transformers (what a rank imports before it can build a model). Validation
runs before those imports, so the ratio is what a typo costs now against what
it would cost if it were found after them.
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
GEN = os.path.join(ROOT, "launch", "gen.py")

CASES = [
    ("frames not 4k+1", ["--frames", "1000"]),
    ("prompt schedule outside causal mode", ["--prompt", "a | 13: b"]),
    ("fps out of range", ["--set", "video.fps=0"]),
    ("non-finite guidance", ["--guidance", "nan"]),
    ("unknown scheduler", ["--scheduler", "ddim"]),
]
HEAVY = "import torch, diffusers, transformers"


def timed(cmd: list[str], expect: int) -> tuple[float, str]:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    wall = time.perf_counter() - t0
    if res.returncode != expect:
        sys.exit(f"{cmd[1:]}: exit {res.returncode}, expected {expect}:\n{res.stderr[-2000:]}")
    return wall, res.stderr.strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3, help="runs per case; the best is kept (default 3)")
    p.add_argument("--json", help="write the figures here")
    args = p.parse_args()
    heavy = min(timed([sys.executable, "-c", HEAVY], 0)[0] for _ in range(args.repeat))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, argv in CASES:
            out = os.path.join(tmp, "never")
            runs = [timed([sys.executable, GEN, *argv, "--out", out], 2) for _ in range(args.repeat)]
            lines = runs[0][1].splitlines()
            if len(lines) != 1 or not lines[0].startswith("error: ") or os.path.exists(out):
                sys.exit(f"{name}: expected one error line and nothing created, got {runs[0][1]!r}")
            rows.append({"case": name, "argv": argv, "reject_s": min(w for w, _ in runs), "message": lines[0]})
    print(f"heavy imports alone ({HEAVY}): {heavy:.2f} s\n")
    print("| bad input | rejected in s | vs the heavy imports |")
    print("|---|---|---|")
    for r in rows:
        argv = " ".join(r["argv"]).replace("|", "\\|")  # a '|' inside a markdown cell must be escaped
        print(f"| {r['case']} (`{argv}`) | {r['reject_s']:.2f} | {r['reject_s'] / heavy:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"repeat": args.repeat, "heavy_import_s": heavy, "cases": rows}, f, indent=2)


if __name__ == "__main__":
    main()
