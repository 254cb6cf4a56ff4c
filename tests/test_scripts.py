"""The benchmark scripts run on a small case and write well-formed output (no timing assertions)."""

import json
import os
import subprocess
import sys


def test_bench_small_case(root, tmp_path):
    out = tmp_path / "bench.json"
    res = subprocess.run([sys.executable, os.path.join(root, "scripts", "bench.py"), "--frames", "33",
                          "--json", str(out), "--keep", str(tmp_path / "runs"), "--trace",
                          "--config", os.path.join(root, "configs", "tiny.yaml")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    (row,) = data["results"]
    assert row["frames"] == 33
    for key in ("baseline", "blockwise_1", "pipelined_2"):
        s = row[key]
        assert s["loop_s"] > 0 and s["total_s"] >= s["loop_s"]
        assert all(r["peak_rss_mb"] > 0 and 0.0 <= r["idle"] <= 1.0 for r in s["ranks"])
    assert len(row["pipelined_2"]["ranks"]) == 2
    assert "| pipelined-2 | 33 |" in res.stdout
    assert (tmp_path / "runs" / "n2-33" / "trace.json").is_file()


def test_bench_speedup_small_case(root):
    res = subprocess.run([sys.executable, os.path.join(root, "scripts", "bench_speedup.py"), "--frames", "33",
                          "--repeat", "1"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [ln.split() for ln in res.stdout.splitlines() if ln.strip()[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "2"] and rows[0][2] == "1.00x"
    # the second run really had two ranks (one busy figure each), and its speed-up is the ratio of loops
    assert len(rows[0]) == 5 and len(rows[1]) == 6
    assert abs(float(rows[1][2].rstrip("x")) - float(rows[0][1]) / float(rows[1][1])) < 0.02


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_benchmarks_quick_writes_every_section(root, tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    script = os.path.join(root, "scripts", "benchmarks.py")
    res = subprocess.run([sys.executable, script, "--quick", "--out", str(out)], capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    md = out.read_text()
    assert md.startswith("# Benchmarks") and "python scripts/benchmarks.py" in md
    for header in ("| run | frames | loop s | end-to-end s |",  # length sweep
                   "| ranks | loop s | speed-up | frames/s |",  # 2 ranks over 1
                   "| run (2 ranks, decode off) | predicted loop s | measured loop s | error |",  # simulator
                   "| GPUs | model | ranks | block | wall s |",  # projection
                   "| policy | budget (frames) | cache frames |",  # causal: policies
                   "| schedule | ranks | loop s |",  # causal: speed-up
                   "| frame (tokens) | policy | store frames |"):  # causal: attention kernel
        assert header in md
    for frames in (33, 65):
        assert f"| pipelined-2 | {frames} |" in md
    plots = tmp_path / "docs" / "benchmarks"
    for name in ("time_per_frame.png", "memory.png", "trace.png"):
        data = (plots / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
        assert f"](docs/benchmarks/{name})" in md
    results = json.loads((plots / "results.json").read_text())
    assert {"meta", "sweep", "speedup", "simulator", "projection", "causal"} <= set(results)
    assert results["sweep"]["trace"]["spans"]
    # The causal section: its three tables, their rows, and a reading computed from them.
    causal = md[md.index("## Causal mode"):]
    rows = [ln for ln in causal.splitlines() if ln.startswith("| ")]
    for name in ("full", "window", "topk", "focused"):
        assert any(ln.startswith(f"| {name} | ") for ln in rows)
    assert [ln.split(" | ")[:2] for ln in rows if ln.startswith("| staggered |")] == [["| staggered", "1"],
                                                                                   ["| staggered", "2"]]
    c = results["causal"]
    assert len([ln for ln in rows if ln.split(" | ")[1] in ("full", "window", "topk", "focused")]) == \
        len(c["kernel"]["results"]) == 4 * len(c["kernel"]["sizes"])
    assert "Reading:" in causal and "On 2 ranks over 1" in causal and "Closest to the full cache" in causal
    # The markdown is a pure function of results.json.
    again = tmp_path / "again.md"
    res = subprocess.run([sys.executable, script, "--render-only", "--out", str(again), "--plots", str(plots)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert again.read_text() == md
