"""--trace writes one Chrome trace with every rank's compute, wait, send, decode and write spans."""

import json

from test_parallel import launch


def test_two_rank_trace_is_well_formed(root, tmp_path):
    launch(root, 2, tmp_path / "run", ["--trace"], decode=True)
    trace = json.loads((tmp_path / "run" / "trace.json").read_text())
    events = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    names = {e["args"]["name"] for e in trace["traceEvents"] if e["ph"] == "M"}
    assert names == {"rank 0", "rank 1"}
    cats = {(e["pid"], e["cat"]) for e in events}
    assert {(0, "compute"), (0, "scheduler"), (0, "send"), (0, "wait"), (0, "decode"), (0, "write"),
            (1, "compute"), (1, "send"), (1, "wait")} <= cats
    # one compute span per task and rank: 5 blocks x 4 steps
    for rank in (0, 1):
        assert sum(1 for e in events if e["pid"] == rank and e["cat"] == "compute") == 20
    assert all(e["dur"] >= 0 and e["ts"] > 0 for e in events)
