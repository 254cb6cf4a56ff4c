"""Generate a long video with the block-wise pipelined engine.

    python launch/gen.py --frames 129 --out outputs/short
    python launch/gen.py --nproc 2 --frames 1025
    torchrun --standalone --nproc-per-node 2 launch/gen.py --frames 1025

Each rank holds a contiguous slice of the DiT's layers; rank 0 also writes
the output (video.mp4, latents/, manifest.json) as blocks finish.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dualpar.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
