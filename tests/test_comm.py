"""The ring's messages between two real gloo processes: payload intact, tags checked, stops seen,
send memory bounded, and a message for the wrong task never used silently (also when tags are
compared on the device and read later, as on GPUs)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dualpar.comm import KIND_PACKET, SEND_SLOTS, Comm, CommError, message_bytes

SHAPES = [(2, 37, 8), (2, 53, 8), (2, 37, 8), (2, 53, 8), (2, 37, 8), (2, 53, 8)]


def _payload(task, shape):
    return torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape) + 1000 * task


def _worker(rank, port, case, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    comm = Comm(rank, 2, "cpu", timeout_s=30)
    comm.warm_up()
    comm.defer_checks = case.endswith("deferred")
    result = None
    try:
        if rank == 0:
            order = list(range(len(SHAPES)))
            if case.startswith("swap"):  # the sender disagrees on the schedule: tasks 2 and 4 swapped
                order[2], order[4] = order[4], order[2]
            comm.reserve(1, KIND_PACKET, SHAPES, torch.float32)
            held = 0
            for i, task in enumerate(order):
                if case.startswith("stop") and i == 3:
                    comm.send_stop(1, 3, SHAPES[3], torch.float32)
                    break
                buf = comm.send_buffer(1, KIND_PACKET, SHAPES[task], torch.float32, task)
                buf.copy_(_payload(task, SHAPES[task]))
                comm.send(buf, 1, KIND_PACKET, task)
                held = max(held, comm.send_bytes_held)
            comm.flush()
            result = {"held": held, "bytes": comm.bytes_sent, "messages": comm.messages_sent}
        else:
            inbox = comm.inbox(0, [(KIND_PACKET, t, s, torch.float32) for t, s in enumerate(SHAPES)])
            got = []
            try:
                for t, s in enumerate(SHAPES):
                    p = inbox.next(stop_possible=(t == 3))
                    if p is None:
                        got.append("stop")
                        break
                    got.append(bool(torch.equal(p, _payload(t, s))))
                comm.check()
                result = {"got": got}
            except CommError as e:
                result = {"got": got, "error": str(e)}
    finally:
        queue.put((rank, result))
        comm.close(abort=True)


def run(case):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, case, queue)) for r in range(2)]
    for p in procs:
        p.start()
    out = dict(queue.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    return out


def test_messages_arrive_intact_with_bounded_send_memory():
    out = run("plain")
    assert out[1] == {"got": [True] * len(SHAPES)}
    largest = max(message_bytes(s, torch.float32) for s in SHAPES)
    assert out[0]["held"] == SEND_SLOTS * largest  # reserved once, never more
    assert out[0]["messages"] == len(SHAPES)
    assert out[0]["bytes"] == sum(message_bytes(s, torch.float32) for s in SHAPES)


@pytest.mark.parametrize("case", ["swap", "swap-deferred"])
def test_a_message_for_another_task_is_detected(case):
    out = run(case)
    err = out[1].get("error", "")
    if case == "swap":  # read at once: the first wrong message is named and nothing after it is used
        assert "expected from rank 0 message kind 1 task 2" in err and "tagged task 4" in err, out
        assert out[1]["got"] == [True, True]
    else:  # compared on the device, read at the check: the run stops there, naming the peer
        assert "a message from rank 0 did not match the task" in err, out


def test_stop_message_is_seen_where_a_stop_may_come():
    for case in ("stop", "stop-deferred"):
        out = run(case)
        assert out[1] == {"got": [True, True, True, "stop"]}, (case, out)


def test_peer_errors_are_one_plain_line():
    from datetime import timedelta
    from types import SimpleNamespace

    me = SimpleNamespace(rank=1, timeout=timedelta(seconds=30))
    err = Comm.peer_error(me, 0, "recv", RuntimeError("\U0001f6a8 Connection closed by peer  [127.0.0.1]:4242\nmore"))
    assert str(err) == "rank 1: lost rank 0 (recv): Connection closed by peer [127.0.0.1]:4242"
    assert "nothing from rank 0 for 30 s" in str(Comm.peer_error(me, 0, "recv", RuntimeError("Timed out waiting")))


def test_stats_count_one_video_of_a_batch():
    import time
    from types import SimpleNamespace

    from dualpar.ring import RunStats
    from dualpar.trace import Clock, Stopwatch

    comm = SimpleNamespace(bytes_sent=1000, messages_sent=10, send_bytes_held=64)  # after a first video
    st = RunStats.begin(comm)
    comm.bytes_sent, comm.messages_sent = 1600, 13
    st.finish(comm, Stopwatch(Clock(torch.device("cpu"))), time.perf_counter())
    assert (st.bytes_sent, st.messages_sent, st.send_buffer_bytes) == (600, 3, 64)
