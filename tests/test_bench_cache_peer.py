"""The cache-dit peer benchmark runs end to end on a small case and reports sane rows."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("cache_dit")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_cache_peer_small(tmp_path):
    out = tmp_path / "peer.json"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "bench_cache_peer.py"), "--preset", "tiny-random",
           "--frames", "9", "--size", "32", "--steps", "6", "--repeat", "1", "--json", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["version"]
    rows = data["rows"]
    assert {r["model"] for r in rows} == {"tiny-random"}
    uncached = [r for r in rows if r["method"] == "uncached"]
    assert len(uncached) == 1 and uncached[0]["rel_l2"] == 0 and uncached[0]["computed_share"] == 1
    cached = [r for r in rows if r["method"] != "uncached"]
    assert any("TaylorSeer" in r["method"] for r in cached) and any("TaylorSeer" not in r["method"] for r in cached)
    for r in cached:
        assert 0 < r["computed_share"] <= 1, r
        assert r["seconds"] > 0 and r["speedup"] > 0, r
    # at 6 steps our plan (warm-up 2, interval 2, last 1) forecasts step 3: the mask rows skip it and it shows
    masked = [r for r in cached if r["method"].startswith("DBCache mask") and r["settings"].get("interval") == 2]
    assert masked and all(r["computed_share"] < 1 and r["rel_l2"] > 0 for r in masked), masked
    assert "| model | method | share of full steps |" in res.stdout
