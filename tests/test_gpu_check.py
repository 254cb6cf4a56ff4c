"""scripts/gpu_check.py in its CPU mode (``--device cpu --quick``): the same checks as on a GPU, at tiny
shapes, so the script cannot rot between the runs on a GPU machine."""

import json
import os
import subprocess
import sys

import pytest

SECTIONS = ("versions", "tiny", "two_ranks_one_gpu", "wan13b", "wan14b_layer", "vae", "projection")


def _run(root, out, *extra, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    return subprocess.run([sys.executable, os.path.join(root, "scripts", "gpu_check.py"), "--device", "cpu",
                           "--quick", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def quick(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    res = _run(root, out)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-3000:]
    data = json.loads((out / "gpu_check.json").read_text())
    return data, (out / "gpu_check.md").read_text(), res.stdout


def test_every_section_ran_without_error(quick):
    data, _, _ = quick
    assert data["status"] == "passed" and data["failed"] == []
    assert data["device"] == "cpu" and data["quick"] is True
    for name in SECTIONS:
        sec = data["sections"][name]
        assert "error" not in sec, (name, sec.get("error"), sec.get("traceback"))
        assert sec["elapsed_s"] >= 0
        assert all(c["pass"] for c in sec.get("checks", {}).values()), (name, sec["checks"])


def test_versions(quick):
    v = quick[0]["sections"]["versions"]
    assert v["torch"] and v["diffusers"] != "missing"
    assert v["attention"]["native"] == "ok"
    assert v["attention"]["flash"] != "ok"  # needs CUDA: the reason is recorded


def test_tiny_runs_and_cpu_comparison(quick):
    t = quick[0]["sections"]["tiny"]
    runs = {(r["mode"], r["dtype"]): r for r in t["runs"]}
    assert set(runs) == {(m, d) for m in ("bidirectional", "causal") for d in ("float32", "bfloat16")}
    for r in runs.values():
        assert r["wall_s"] > 0
        assert r["mp4_frames"] == r["frames"] == r["frames_total"] == t["geometry"]["frames"]
    for mode in ("bidirectional", "causal"):
        c = t["checks"][f"fp32 cpu vs cpu, {mode}"]
        assert c["value"] <= 1e-4 and c["pass"]
        assert t["info"][f"bf16 vs fp32, {mode}"] > 0  # bf16 really ran in bf16


def test_two_ranks_equal_one_rank(quick):
    s = quick[0]["sections"]["two_ranks_one_gpu"]
    assert [r["mode"] for r in s["runs"]] == ["bidirectional", "causal"]
    assert all(r["world_size"] == 2 for r in s["runs"])
    for mode in ("bidirectional", "causal"):
        c = s["checks"][f"2 ranks vs 1 rank, {mode}"]
        assert c["value"] <= 1e-5 and c["pass"]


def test_stage_times(quick):
    w = quick[0]["sections"]["wan13b"]
    assert [r["shape"] for r in w["shapes"]] == ["first block", "steady block", "no neighbour K/V"]
    for r in w["shapes"]:
        assert r["block_step_s"] > 0 and r["per_layer_s"] > 0 and all(x > 0 for x in r["times_s"])
        assert r["sync_debug"] == "n/a on cpu"  # set_sync_debug_mode is a CUDA check
        assert r["nkv"] == r["nq"] + r["extra"] * w["tokens_per_frame"]
    assert w["cfg_serial"]["block_step_s"] > 0 and w["cfg_serial"]["time_ratio"] > 0
    assert w["embed_s"] > 0 and w["head_s"] > 0 and w["sched_step_s"] > 0
    assert any("scaled_dot_product" in k for k in w["attention"]["kernels"]), w["attention"]
    l14 = quick[0]["sections"]["wan14b_layer"]
    assert l14["layer"]["per_layer_s"] > 0 and l14["rank_layers"] == 5
    assert l14["rank_time_s"] == pytest.approx(5 * l14["layer"]["per_layer_s"])


def test_vae_blocks(quick):
    v = quick[0]["sections"]["vae"]
    assert len(v["sizes"]) == 2
    for r in v["sizes"]:
        assert r["block_s"] > 0 and r["block_frames"] == 4 * r["block_latent_frames"]


def test_projection(quick):
    p = quick[0]["sections"]["projection"]
    assert "not a multi-GPU measurement" in p["note"]
    one, eight = p["rows"]
    assert one["ranks"] == 1 and eight["ranks"] == 8
    assert eight["speedup"] > 1 and p["speedup"] == eight["speedup"]
    assert all(c >= 0 for c in p["calibration"]["layer"])
    assert 0 <= eight["max_idle"] < 1


def test_markdown_has_every_section(quick):
    _, md, stdout = quick
    assert md.startswith("# GPU check")
    for i, name in enumerate(SECTIONS, 1):
        assert f"## {i}. {name}:" in md, name
    assert "not a multi-GPU measurement" in md
    assert "start 1. versions" in stdout and "done in" in stdout  # progress lines


def test_a_failing_section_is_recorded_and_fails_the_run(root, tmp_path):
    # The projection needs section 4's stage times: alone it fails, and says so, and the exit status is 1.
    res = _run(root, tmp_path, "--only", "versions,projection", timeout=120)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-2000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["failed"] == ["projection"] and data["status"] == "failed"
    assert "wan13b" in data["sections"]["projection"]["error"]
    assert "error" not in data["sections"]["versions"]
    assert "**error**" in (tmp_path / "gpu_check.md").read_text()
