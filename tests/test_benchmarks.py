"""The benchmark scripts on small cases, all from ONE ``scripts/benchmarks.py --quick`` run.

Every benchmark script (bench.py, bench_speedup.py, simulate.py, bench_causal.py,
bench_comm.py, bench_reject.py, quality.py, bench_cache.py, bench_cache_peer.py) runs inside that one run, exactly as a full regeneration of
BENCHMARKS.md runs them, and stores its figures in results.json; the tests
below check each script's figures there, then the markdown and plots made
from them. No timing assertions: only well-formed output and the exact
relations the scripts promise (ratios of what they measured, equalities of
latents, cache sizes).
"""

import json
import os
import subprocess
import sys

import pytest

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BOUNDED = ("window", "topk", "focused")


@pytest.fixture(scope="module")
def quick(root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("benchmarks")
    out, work = tmp / "BENCHMARKS.md", tmp / "work"
    res = subprocess.run([sys.executable, os.path.join(root, "scripts", "benchmarks.py"), "--quick", "--out",
                          str(out), "--keep", str(work)], capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    plots = tmp / "docs" / "benchmarks"
    return {"md": out.read_text(), "out": out, "plots": plots, "work": work, "stdout": res.stdout,
            "results": json.loads((plots / "results.json").read_text())}


def test_length_sweep(quick):
    """bench.py: the one-pass baseline, 1 rank and 2 ranks at each length, with per-rank figures and a trace."""
    data = quick["results"]["sweep"]
    assert [row["frames"] for row in data["results"]] == [33]  # --quick: one length
    for row in data["results"]:
        for key in ("baseline", "blockwise_1", "pipelined_2"):
            s = row[key]
            assert s["loop_s"] > 0 and s["total_s"] >= s["loop_s"], (row["frames"], key)
            assert all(r["peak_rss_mb"] > 0 and 0.0 <= r["idle"] <= 1.0 for r in s["ranks"])
        assert len(row["pipelined_2"]["ranks"]) == 2 and len(row["blockwise_1"]["ranks"]) == 1
        assert f"| pipelined-2 | {row['frames']} |" in quick["md"]
    assert (quick["work"] / "sweep" / "n2-33" / "trace.json").is_file()
    assert data["trace"]["spans"]


def test_speedup_is_the_ratio_of_the_measured_loops(quick):
    """bench_speedup.py: 1 and 2 ranks; the markdown's speed-up is the ratio of the two best loops."""
    data = quick["results"]["speedup"]
    assert data["ranks"] == [1, 2] and data["repeat"] == 1 and len(data["runs"]) == 2
    one, two = data["best"]
    assert len(one["ranks"]) == 1 and len(two["ranks"]) == 2  # the second run really had two ranks
    rows = [ln.split(" | ") for ln in quick["md"].splitlines() if ln.startswith("| 2 | ")]
    assert rows, "no 2-rank row in the speed-up table"
    shown = float(rows[0][2].rstrip("x"))
    assert abs(shown - one["loop_s"] / two["loop_s"]) < 0.01


def test_causal_policies(quick):
    """bench_causal.py's policies: the full cache agrees with itself exactly, bounded ones hold less."""
    data = quick["results"]["causal"]
    assert data["frames"] == 61 and data["latent_frames"] == 16 and data["budgets"] == [0.25]
    assert data["guidance"] == 1.0
    rows = {r["policy"]: r for r in data["results"]}
    assert [r["policy"] for r in data["results"]] == ["full", *BOUNDED]
    full = rows["full"]
    dev = full["deviation"]
    # the reference and the timed full run are two separate runs: generation is deterministic
    assert dev["rel_l2_mean"] == 0.0 and dev["rel_l2_last_quarter"] == 0.0 and dev["max_abs"] == 0.0
    assert all(x == 0.0 for x in dev["rel_l2_per_chunk"])
    assert full["cache_frames"] == 16 and full["budget_frames"] == 16
    for name in BOUNDED:
        r = rows[name]
        assert r["budget"] == 0.25 and r["budget_frames"] == 4
        assert 0 < r["cache_bytes"] < full["cache_bytes"], name
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
        assert r["repeats"] == data["repeat"]
        # generation is deterministic: repeats agree exactly (the full policy's check above holds for one)
        assert r["repeat_max_abs"] == (0.0 if r["repeats"] > 1 else None)
    # window keeps exactly the budget; topk/focused a pool of max(1.5 x budget, budget + sink)
    assert rows["window"]["cache_frames"] == 4
    assert rows["topk"]["cache_frames"] == rows["focused"]["cache_frames"] == max(6, 4 + data["sink"])
    assert rows["window"]["cache_bytes"] * 16 == full["cache_bytes"] * 4


def test_causal_speedup_and_kernel(quick):
    """bench_causal.py's launcher runs (2 ranks compute what 1 does) and its attention-kernel sweep."""
    sp = quick["results"]["causal"]["speedup"]
    assert sp["ranks"] == [1, 2] and sp["schedules"] == ["staggered"] and sp["repeat"] == 1
    case = sp["case"]
    assert case["frames"] == 61 and case["policy"] == "window" and case["budget_frames"] == 4 and case["chunks"] == 5
    rows = sp["results"]
    assert [(r["schedule"], r["ranks"]) for r in rows] == [("staggered", 1), ("staggered", 2)]
    for r in rows:
        assert r["loop_s"] > 0 and r["chunks"] == case["chunks"]
        assert len(r["busy"]) == len(r["kv_cache_mb"]) == r["ranks"] and all(0 <= b <= 1.05 for b in r["busy"])
        assert (r["latents_max_abs_vs_base"] is None) == (r["ranks"] == 1)
    assert rows[1]["latents_max_abs_vs_base"] <= 1e-5  # the 2-rank run computed what the 1-rank run did
    assert abs(rows[1]["speedup"] - rows[0]["loop_s"] / rows[1]["loop_s"]) < 1e-9
    assert abs(sum(rows[1]["kv_cache_mb"]) - rows[0]["kv_cache_mb"][0]) < 1e-6  # each rank: half the layers' caches

    k = quick["results"]["causal"]["kernel"]
    assert k["sizes"] == ["64x64", "96x128"] and k["history"] == 16 and k["budget_frames"] == 4
    assert [(r["tokens"], r["policy"]) for r in k["results"]] == [(t, p) for t in (16, 48) for p in ("full", *BOUNDED)]
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


def test_bounded_policies_end_to_end_section(quick):
    """bench_causal.py's policy comparison on the trained preset (at 480x832 in a full run): the reading's
    speed-up is the ratio of the measured per-chunk denoise times."""
    data = quick["results"]["causal_wan"]
    rows = data["results"]
    assert [r["policy"] for r in rows] == ["full", "focused"] and data["config"]["model"]["preset"] == "tiny"
    assert all(r["denoise_ms"] > 0 and r["attn_ms"] > 0 for r in rows)
    sec = quick["md"][quick["md"].index("### Bounded policies end to end at Wan's frame size"):]
    assert "The model is the trained tiny preset" in sec
    assert f"{rows[0]['denoise_ms'] / rows[1]['denoise_ms']:.2f}x the full cache's speed per chunk" in sec


def test_comm_counts(quick):
    """bench_comm.py: both comms ran; today's builds no header and copies nothing per hop."""
    data = quick["results"]["comm"]
    before, now = data["before"], data["now"]
    payload = now["payload_bytes"]
    assert before["payload_bytes"] == payload > 100e6  # a real 1.3B packet
    assert now["messages_per_hop"] == 1 and now["wire_bytes_per_hop"] - payload <= 24
    assert now["host_built_per_hop"] == 0 and now["payload_copies_per_hop"] == 0
    assert now["payload_allocs_per_hop"] == 0 and now["recv_payload_allocs_per_hop"] == 0
    assert before["host_built_per_hop"] >= 1 and before["payload_copies_per_hop"] >= 1  # the earlier header + cat
    assert now["send_window_peak_bytes"] <= 3 * (payload + 24)  # SEND_SLOTS buffers, whatever the ring size
    assert before["send_window_peak_bytes"] > now["send_window_peak_bytes"]
    assert "| sender's send-window peak, MB |" in quick["md"]


def test_bad_input_cases(quick):
    """bench_reject.py: every case ended with status 2 and one error line (the script checks both)."""
    data = quick["results"]["reject"]
    assert len(data["cases"]) == 5 and data["heavy_import_s"] > 0
    assert all(c["reject_s"] > 0 and c["message"].startswith("error: ") for c in data["cases"])
    assert "| bad input | rejected in s |" in quick["md"] and "## Bad input, turned away" in quick["md"]


def test_quality_suite(quick):
    """quality.py suite --quick: three settings generated and scored, each row the mean of its runs."""
    data = quick["results"]["quality"]
    assert [r["name"] for r in data["rows"]] == ["num_cat 4, shared noise (default)", "num_cat 0",
                                                 "causal, focused 24"]
    for r in data["rows"]:
        assert len(r["runs"]) == 1 and r["runs"][0]["frames"] == 33
        assert r["mean"]["colour_found"] == r["runs"][0]["colour_found"]
        assert 0 <= r["mean"]["colour_found"] <= 1 and 0 <= r["mean"]["shape_right"] <= r["mean"]["colour_found"]
    assert data["vae"]["clips"] == 2 and data["vae"]["psnr_db"] > 0
    assert "## Quality: the trained tiny preset" in quick["md"] and "| causal, focused 24 |" in quick["md"]


def test_feature_caching_section(quick):
    """bench_cache.py --quick (and the cache-dit peer when installed): the speed-ups are ratios of the
    measured loops, the uncached run is its own reference, the caches are what the runs' stats say."""
    data = quick["results"]["cache"]
    rows = {(r["ranks"], r["level"]): r for r in data["speed"]["rows"]}
    assert set(rows) == {(2, "-"), (2, "model"), (2, "stage")}
    base = rows[(2, "-")]
    assert base["rel_l2"] == 0.0 and base["speedup"] == 1.0 and base["flops_skipped"] == 0.0
    for level in ("model", "stage"):
        r = rows[(2, level)]
        assert abs(r["speedup"] - base["loop_s"] / r["loop_s"]) < 1e-9 and r["rel_l2"] > 0
        assert 0 < r["flops_skipped"] < 1 and len(r["idle"]) == len(r["cache_mb"]) == 2
        assert f"| 2 | taylor | {level} | 2 | {r['loop_s']:.2f} | {r['speedup']:.2f}x |" in quick["md"]
    assert sorted({m["frames"] for m in data["speed"]["memory"]}) == [33, 65]
    stage = [m for m in data["speed"]["memory"] if m["level"] == "stage"]
    assert all(a > 0 for m in stage for a in m["added_mb"])  # every rank holds its residual history
    fid = data["fidelity"][0]
    assert fid["preset"] == "tiny-random" and all(r["rel_l2"] > 0 and r["psnr_db"] > 0 for r in fid["rows"])
    assert "## Timestep feature caching" in quick["md"] and "### Projected on 8 GPUs" in quick["md"]
    proj = data["projection"]["rows"]
    assert all(r["speedup"] > 1 for r in proj if r["level"] != "none")  # skipped tasks shorten the schedule
    if "peer" in data:
        assert any(r["method"] == "uncached" and r["rel_l2"] == 0 for r in data["peer"]["rows"])
        assert "### The peer: cache-dit on diffusers' WanPipeline" in quick["md"]


def test_balanced_stages_section(quick):
    """bench_balance.py --quick: every case ran with the split it reports, the auto runs took their even
    run's profile, the ratios are of the measured loops, the simulator predicted each auto run."""
    data = quick["results"]["balance"]
    best = {r["case"]: r for r in data["best"]}
    assert set(best) == {"3 ranks, even", "3 ranks, auto", "2 ranks, even, decode first", "2 ranks, auto, decode first",
                         "2 ranks, even, decode last", "2 ranks, auto, decode last"}
    for name, r in best.items():
        assert sum(r["layers"]) == 8 and len(r["layers"]) == r["ranks"] and len(r["idle"]) == r["ranks"]
        assert r["decode_s"] > 0 and r["total_s"] >= r["loop_s"] > 0
        if "even" in name:
            assert r["layers"] == ([2, 3, 3] if r["ranks"] == 3 else [4, 4]) and "predicted_loop_s" not in r
        else:
            assert r["predicted_loop_s"] > 0
            even = best[name.replace("auto", "even")]
            assert f"{even['loop_s'] / r['loop_s']:.2f}x" in quick["md"]
    assert "## Balanced stages" in quick["md"] and "| Wan2.1-14B 720x1280 | 40% |" in quick["md"]
    rows = data["projection"]["rows"]
    assert {(r["decode_on"], r["split"]) for r in rows} == {(d, s) for d in ("first", "last", "extra")
                                                            for s in ("even", "auto")}
    for r in rows:  # auto is never slower than even at the same placement (the same model picks it)
        even = next(e for e in rows if e["model"] == r["model"] and e["vae_efficiency"] == r["vae_efficiency"]
                    and e["decode_on"] == r["decode_on"] and e["split"] == "even")
        assert r["wall_s"] <= even["wall_s"] * 1.001


def test_markdown_has_every_section_and_is_a_function_of_results(root, quick):
    md, plots, results = quick["md"], quick["plots"], quick["results"]
    assert md.startswith("# Benchmarks") and "python scripts/benchmarks.py" in md
    for header in ("| run | frames | loop s | end-to-end s |",  # length sweep
                   "| ranks | loop s | speed-up | frames/s |",  # 2 ranks over 1
                   "| run (2 ranks, decode off) | predicted loop s | measured loop s | error |",  # simulator
                   "| GPUs | model | ranks | block | wall s |",  # projection
                   "| policy | budget (frames) | cache frames |",  # causal: policies
                   "| schedule | ranks | loop s |",  # causal: speed-up
                   "| frame (tokens) | policy | store frames |"):  # causal: attention kernel
        assert header in md
    for name in ("time_per_frame.png", "memory.png", "trace.png"):
        data = (plots / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
        assert f"](docs/benchmarks/{name})" in md
    assert {"meta", "sweep", "speedup", "simulator", "projection", "causal", "causal_wan", "comm", "reject",
            "quality", "cache", "balance"} <= set(results)
    causal = md[md.index("## Causal mode"):]
    rows = [ln for ln in causal.splitlines() if ln.startswith("| ")]
    for name in ("full", *BOUNDED):
        assert any(ln.startswith(f"| {name} | ") for ln in rows)
    assert [ln.split(" | ")[:2] for ln in rows if ln.startswith("| staggered |")] == [["| staggered", "1"],
                                                                                   ["| staggered", "2"]]
    c = results["causal"]
    assert len([ln for ln in rows if ln.split(" | ")[1] in ("full", *BOUNDED)]) == \
        len(c["kernel"]["results"]) == 4 * len(c["kernel"]["sizes"])
    assert "Reading:" in causal and "On 2 ranks over 1" in causal and "Closest to the full cache" in causal
    # the markdown is a pure function of results.json
    again = quick["out"].parent / "again.md"  # beside the first: the same relative links
    res = subprocess.run([sys.executable, os.path.join(root, "scripts", "benchmarks.py"), "--render-only", "--out",
                          str(again), "--plots", str(plots)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert again.read_text() == md
