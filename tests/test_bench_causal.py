"""scripts/bench_causal.py on its quick case: well-formed output, exact self-agreement of the full cache,
bounded policies holding less memory (no timing assertions)."""

import json
import os
import subprocess
import sys

BOUNDED = ("window", "topk", "focused")


def test_bench_causal_quick(root, tmp_path):
    out = tmp_path / "bench_causal.json"
    res = subprocess.run([sys.executable, os.path.join(root, "scripts", "bench_causal.py"), "--quick",
                          "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["frames"] == 61 and data["latent_frames"] == 16 and data["budgets"] == [0.25]
    assert data["schedule"] == "sequential" and data["guidance"] == 1.0
    rows = {r["policy"]: r for r in data["results"]}
    assert [r["policy"] for r in data["results"]] == ["full", *BOUNDED]

    full = rows["full"]
    dev = full["deviation"]
    # The reference and the timed full run are two separate runs: generation is deterministic.
    assert dev["rel_l2_mean"] == 0.0 and dev["rel_l2_last_quarter"] == 0.0 and dev["max_abs"] == 0.0
    assert all(x == 0.0 for x in dev["rel_l2_per_chunk"])
    assert full["cache_frames"] == 16 and full["budget_frames"] == 16

    for name in BOUNDED:
        r = rows[name]
        assert r["budget"] == 0.25 and r["budget_frames"] == 4
        assert 0 < r["cache_bytes"] < full["cache_bytes"], name
        assert r["cache_frames"] < full["cache_frames"]
        d = r["deviation"]
        assert len(d["rel_l2_per_chunk"]) == data["chunks"] == len(data["chunk_starts"])
        assert 0.0 < d["rel_l2_mean"] < 1.0 and d["max_abs"] > 0.0
        for key in ("attn_ms", "select_ms", "kernel_ms", "rope_ms", "denoise_ms"):
            assert r[key] >= 0.0
        assert len(r["per_chunk_s"]["attn"]) == data["chunks"]
        assert r["repeats"] == 2 and r["repeat_max_abs"] == 0.0
    # window keeps exactly the budget; topk/focused a pool of max(1.5 x budget, budget + sink)
    assert rows["window"]["cache_frames"] == 4
    assert rows["topk"]["cache_frames"] == rows["focused"]["cache_frames"] == max(6, 4 + data["sink"])
    assert rows["window"]["cache_bytes"] * 16 == full["cache_bytes"] * 4

    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("|")]
    assert len(lines) == 2 + 1 + len(BOUNDED)
    cols = lines[0].count("|")
    assert all(ln.count("|") == cols for ln in lines)
    assert set(lines[1]) <= set("|-")
    assert lines[2].startswith("| full | all | 16 |") and "| 1.00x |" in lines[2]
    for name, ln in zip(BOUNDED, lines[3:]):
        assert ln.startswith(f"| {name} | 0.25 = 4 |")
    assert "random-weight" in res.stdout and "not visual quality" in res.stdout
