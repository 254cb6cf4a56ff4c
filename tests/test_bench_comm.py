"""scripts/bench_comm.py measures what it claims: both comms run, today's builds no header and copies nothing."""

import json
import os
import subprocess
import sys


def test_bench_comm_quick(root, tmp_path):
    out = tmp_path / "comm.json"
    res = subprocess.run([sys.executable, os.path.join(root, "scripts", "bench_comm.py"), "--messages", "5",
                          "--ranks", "2", "--delay", "0.02", "--json", str(out)],
                         capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    before, now = data["before"], data["now"]
    payload = now["payload_bytes"]
    assert before["payload_bytes"] == payload > 100e6  # a real 1.3B packet
    assert now["messages_per_hop"] == 1 and now["wire_bytes_per_hop"] - payload <= 24
    assert now["host_built_per_hop"] == 0 and now["payload_copies_per_hop"] == 0
    assert now["payload_allocs_per_hop"] == 0 and now["recv_payload_allocs_per_hop"] == 0
    assert before["host_built_per_hop"] >= 1 and before["payload_copies_per_hop"] >= 1  # the earlier header + cat
    assert now["send_window_peak_bytes"] <= 3 * (payload + 24)  # SEND_SLOTS buffers, whatever the ring size
    assert before["send_window_peak_bytes"] > now["send_window_peak_bytes"]
    assert "| send window peak, MB |" in res.stdout
