"""Generate a long video as a Ray job: N actors running the same engine as launch/gen.py.

    python launch/ray_job.py --world-size 2 --frames 1025 --out outputs/ray
    ray job submit --working-dir . -- python launch/ray_job.py --address auto --world-size 8 ...
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dualpar.ray_launch import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
