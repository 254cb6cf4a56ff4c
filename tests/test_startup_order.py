"""The ring's point-to-point op order cannot deadlock under NCCL's lazy communicator creation.

gloo (which these CPU tests run on) has no start-up rule, so a real multi-rank
run here proves nothing about NCCL by itself. Instead, real 2-, 3- and 4-rank
runs of both modes record every op they make (``DUALPAR_P2P_LOG``), and the
recorded order is replayed under NCCL's rules:

* the first point-to-point op between two ranks on a group blocks until the
  peer's first op towards this rank on that group (the pair's communicator is
  made then, by both together);
* waiting for a receive blocks until the matching send has been posted, and
  (stricter than NCCL needs for small messages) waiting for a send blocks
  until the matching receive has been posted;
* a collective blocks until every rank has reached it.

Every wait is taken as blocking the host, also the stream waits that do not
on CUDA: a host that runs further ahead only reaches its first ops sooner.
The same logs with the start-up warm-up removed -- the op order before the
warm-up existed -- must deadlock, which shows the replay can fail.
"""

import json

import pytest

from test_parallel import launch


def replay(logs: list[list[dict]]) -> list[str] | None:
    """Run per-rank op logs under the rules above; None, or each stuck rank's op if they deadlock."""
    world = len(logs)
    pc = [0] * world
    inited: set = set()
    posted: dict = {}  # (src, dst, group, "send"|"recv") -> ops posted so far
    seq: dict = {}  # (rank, op id) -> (channel, n): the n-th op of its kind on its channel
    coll_arrived: dict = {}
    coll_count = [0] * world

    def channel(rank, op):
        src, dst = (rank, op["peer"]) if op["op"] == "send" else (op["peer"], rank)
        return src, dst, op["group"]

    def step(r) -> bool:
        op = logs[r][pc[r]]
        kind = op["op"]
        if kind in ("send", "recv"):
            pair = (min(r, op["peer"]), max(r, op["peer"]), op["group"])
            if pair not in inited:
                p = op["peer"]
                if pc[p] >= len(logs[p]):
                    return False
                peer_op = logs[p][pc[p]]
                if not (peer_op["op"] in ("send", "recv") and peer_op["peer"] == r and peer_op["group"] == op["group"]):
                    return False
                inited.add(pair)
            ch = channel(r, op)
            key = (*ch, kind)
            seq[(r, op["id"])] = (ch, posted.get(key, 0))
            posted[key] = posted.get(key, 0) + 1
        elif kind == "wait":
            ref = seq.get((r, op["ref"]))
            if ref is None:
                raise AssertionError(f"rank {r} waits for op {op['ref']} it never posted")
            ch, n = ref
            mine = logs[r][[o["id"] for o in logs[r]].index(op["ref"])]["op"]
            other = "recv" if mine == "send" else "send"
            if posted.get((*ch, other), 0) <= n:
                return False
        else:  # a collective
            k = coll_count[r]
            coll_arrived.setdefault(k, set()).add(r)
            if len(coll_arrived[k]) < world:
                return False
            coll_count[r] += 1
        pc[r] += 1
        return True

    while any(pc[r] < len(logs[r]) for r in range(world)):
        moved = False
        for r in range(world):
            while pc[r] < len(logs[r]) and step(r):
                moved = True
        if not moved:
            return [f"rank {r}: {logs[r][pc[r]]}" for r in range(world) if pc[r] < len(logs[r])]
    return None


def without_warm_up(log: list[dict]) -> list[dict]:
    """The same ops less the start-up ring (tagged task -1) and the waits on it."""
    warm = {o["id"] for o in log if o["op"] in ("send", "recv") and o["task"] == -1}
    return [o for o in log if o["id"] not in warm and not (o["op"] == "wait" and o["ref"] in warm)]


MODES = {
    "bidirectional": [],
    "causal": ["--mode", "causal", "--policy", "window", "--budget", "6", "--set", "causal.sink=1"],
}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("n", [2, 3, 4])
def test_recorded_order_does_not_deadlock_under_nccl_rules(root, tmp_path, n, mode):
    launch(root, n, tmp_path / "run", MODES[mode], env={"DUALPAR_P2P_LOG": str(tmp_path / "p2p")})
    logs = [json.loads((tmp_path / f"p2p.rank{r}.json").read_text()) for r in range(n)]
    assert all(any(o["op"] == "send" and o["task"] >= 0 for o in log) for log in logs)  # the ring really ran
    assert replay(logs) is None
    stuck = replay([without_warm_up(log) for log in logs])
    assert stuck is not None, "without the warm-up the ring should deadlock at start-up"
    # the cycle: rank 0 waits on its first receive from the last rank
    assert any(s.startswith("rank 0:") and "'pred'" in s for s in stuck), stuck


def test_replay_rules_on_hand_made_logs():
    def op(i, kind, peer=None, group="data", ref=None):
        return {"id": i, "op": kind, "peer": peer, "group": group, "task": 0, "ref": ref}

    # 0 sends to 1, 1 receives: fine; a receive nobody sends is stuck; a recv-recv pair is stuck at the wait.
    ok = [[op(1, "send", 1), op(2, "wait", 1, ref=1)], [op(1, "recv", 0), op(2, "wait", 0, ref=1)]]
    assert replay(ok) is None
    lonely = [[op(1, "recv", 1), op(2, "wait", 1, ref=1)], [op(1, "recv", 0), op(2, "wait", 0, ref=1)]]
    assert replay(lonely) is not None
    # first ops towards different peers in a cycle: 0 -> 2 first, 2 -> 1 first, 1 -> 0 first
    cyc = [[op(1, "recv", 2), op(2, "send", 1)], [op(1, "recv", 0), op(2, "send", 2)],
           [op(1, "recv", 1), op(2, "send", 0)]]
    assert replay(cyc) is not None
    coll = [[{"id": 1, "op": "broadcast", "peer": None, "group": "coll", "task": -1, "ref": None}], []]
    assert replay(coll) is not None
