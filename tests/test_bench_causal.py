"""scripts/bench_causal.py on its quick cases: well-formed output, exact self-agreement of the full cache,
bounded policies holding less memory; the speed-up and kernel parts' tables (no timing assertions)."""

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
        # the timers are hooked: every part was measured, and the parts fit inside attention
        for key in ("attn_ms", "kernel_ms", "rope_ms", "denoise_ms"):
            assert r[key] > 0.0, (name, key)
        if name != "window":  # window attends to its whole store: nothing to score
            assert r["select_ms"] > 0.0, name
        assert r["select_ms"] + r["kernel_ms"] + r["rope_ms"] <= r["attn_ms"] < r["denoise_ms"], name
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


def test_bench_causal_speedup_and_kernel_quick(root, tmp_path):
    """The two other parts alone (--no-policies): the launcher on 1 and 2 ranks per schedule, the kernel sweep."""
    out = tmp_path / "bench_causal.json"
    res = subprocess.run([sys.executable, os.path.join(root, "scripts", "bench_causal.py"), "--quick", "--no-policies",
                          "--speedup", "--kernel", "--repeat", "1", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert "results" not in data and {"speedup", "kernel"} <= set(data)

    sp = data["speedup"]
    assert sp["ranks"] == [1, 2] and sp["schedules"] == ["sequential", "staggered"] and sp["repeat"] == 1
    assert len(sp["runs"]) == 4 and all(r["loop_s"] > 0 for r in sp["runs"])
    case = sp["case"]
    assert case["frames"] == 61 and case["latent_frames"] == 16 and case["policy"] == "window"
    assert case["budget_frames"] == 4 and case["chunks"] == 5
    rows = sp["results"]
    assert [(r["schedule"], r["ranks"]) for r in rows] == [("sequential", 1), ("sequential", 2),
                                                          ("staggered", 1), ("staggered", 2)]
    for r in rows:
        assert r["loop_s"] > 0 and r["speedup"] > 0 and r["vs_sequential_1"] > 0
        assert len(r["busy"]) == len(r["kv_cache_mb"]) == r["ranks"] and all(0 <= b <= 1.05 for b in r["busy"])
        assert r["chunks"] == case["chunks"]
        assert (r["latents_max_abs_vs_base"] is None) == (r["ranks"] == 1)
        if r["ranks"] == 2:  # the 2-rank run computed what the 1-rank run did
            assert r["latents_max_abs_vs_base"] <= 1e-5, r
    base = {r["schedule"]: r["loop_s"] for r in rows if r["ranks"] == 1}
    for r in rows:
        assert abs(r["speedup"] - base[r["schedule"]] / r["loop_s"]) < 1e-9
        assert abs(r["vs_sequential_1"] - base["sequential"] / r["loop_s"]) < 1e-9
    # each rank of 2 holds the caches of its half of the layers
    assert abs(sum(rows[1]["kv_cache_mb"]) - rows[0]["kv_cache_mb"][0]) < 1e-6

    k = data["kernel"]
    assert k["sizes"] == ["64x64", "96x128"] and k["history"] == 16 and k["query_frames"] == 3
    assert k["budget_frames"] == 4
    assert [(r["tokens"], r["policy"]) for r in k["results"]] == [
        (t, p) for t in (16, 48) for p in ("full", *BOUNDED)]
    for r in k["results"]:
        assert min(r["read_ms"], r["select_ms"], r["attend_ms"]) >= 0 and r["total_ms"] > 0
        full_ms = next(f["total_ms"] for f in k["results"] if f["tokens"] == r["tokens"] and f["policy"] == "full")
        assert abs(r["vs_full"] - r["total_ms"] / full_ms) < 1e-9
        if r["policy"] == "full":
            assert r["store_frames"] == r["attended_frames"] == 16
        elif r["policy"] == "window":
            assert r["store_frames"] == r["attended_frames"] == 4
        else:  # a pool of max(1.5 x 4, 4 + 3 sinks) = 7 frames, 4 chosen per query frame and head
            assert r["store_frames"] == 7 and r["attended_frames"] == 4 and r["sample"] == 4

    tables = []
    for ln in res.stdout.splitlines():
        if ln.startswith("|"):
            if not tables or not prev.startswith("|"):
                tables.append([])
            tables[-1].append(ln)
        prev = ln
    assert len(tables) == 2
    speed, kern = tables
    assert speed[0].startswith("| schedule | ranks | loop s |") and len(speed) == 2 + 4
    assert kern[0].startswith("| frame (tokens) | policy |") and len(kern) == 2 + 8
    for t in tables:
        assert all(ln.count("|") == t[0].count("|") for ln in t) and set(t[1]) <= set("|-")
    assert speed[2].startswith("| sequential | 1 |") and speed[5].startswith("| staggered | 2 |")
    assert "(reference)" in speed[2] and kern[2].startswith("| 64x64 (16) | full | 16 | 16 |")
