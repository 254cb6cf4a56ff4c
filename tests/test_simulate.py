"""The schedule simulator: exact on cases with a known answer (no timing of this machine)."""

import importlib.util
import os

import pytest


@pytest.fixture(scope="module")
def sim(root):
    spec = importlib.util.spec_from_file_location("simulate", os.path.join(root, "scripts", "simulate.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_one_rank_is_the_sum_of_task_costs(sim):
    blocks, tasks, num_cat, steps, tpf, layers = sim.plan_for(129, 8, 4, 5, 1, 8, 96)
    model = {"layer": [1e-3, 0.0, 0.0], "fixed": [2e-3], "sched_s": 5e-4}
    out = sim.simulate(blocks, steps, num_cat, tpf, layers, model)
    expected = len(tasks) * (8 * 1e-3 + 2e-3 + 5e-4)
    assert out["wall_s"] == pytest.approx(expected) and out["idle"][0] == pytest.approx(0.0, abs=1e-9)


def test_two_balanced_ranks_approach_half_the_time(sim):
    model = {"layer": [1e-3, 0.0, 0.0], "fixed": [0.0, 0.0], "sched_s": 0.0}
    one = sim.simulate(*sim.plan_for(1025, 8, 4, 10, 1, 8, 96)[:1], 10, 4, 36, [(0, 8)],
                       {**model, "fixed": [0.0]}, latency_s=0.0)
    blocks, _, num_cat, steps, tpf, layers = sim.plan_for(1025, 8, 4, 10, 2, 8, 96)
    two = sim.simulate(blocks, steps, num_cat, tpf, layers, model, latency_s=0.0, bandwidth=float("inf"))
    assert 0.5 <= two["wall_s"] / one["wall_s"] < 0.56  # only the queue's ramp-up/down is lost


def test_projection_runs(root):
    import subprocess
    import sys

    res = subprocess.run([sys.executable, os.path.join(root, "scripts", "simulate.py"), "--project"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    rows = [ln for ln in res.stdout.splitlines() if ln.startswith("| 8x")]
    assert len(rows) == 16 and all("x |" in r for r in rows)
