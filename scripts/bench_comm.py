"""Per-hop cost of the ring's messages at Wan2.1-1.3B packet size: today's comm against an earlier one.

    python scripts/bench_comm.py                  # vs the comm before payload-only messages
    python scripts/bench_comm.py --before REV --messages 24 --json out.json

Two gloo processes on loopback; rank 0 sends ``--messages`` packets of a
1.3B block at 480x832 (CFG rows, block 8 + context 8 latent frames, 1560
tokens per frame, dim 1536, bf16: 153 MB) to rank 1, which takes them slowly,
so the sender's window fills as it would behind a busy stage. Both modules
are driven the way their engines drive them: the earlier one gets a freshly
computed tensor per hop (its engine's ``torch.cat`` output), today's a send
buffer the producer writes into. Measured per hop, inside the comm's own
calls only: messages, bytes on the wire, tensors built from host data (a
header), payload-sized allocations and copies; and the sender's peak of bytes
held by sends in flight, and its peak RSS. The earlier module is read from git
(``git show REV:dualpar/comm.py``), so both run side by side in one go.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BEFORE = "86c002a"  # the last commit with the header + payload messages and a 2 x world + 1 send window
SHAPE = (2, 16 * 1560 + 7, 1536)  # CFG rows, (8 context + 8 own) frames x 1560 tokens + 7 rows, dim
DTYPE = torch.bfloat16
KIND_PACKET = 1


class Count(TorchDispatchMode):
    """Counts, inside a block, tensors built from host data and payload-sized allocations/copies."""

    def __init__(self, payload_bytes: int):
        super().__init__()
        self.big = payload_bytes // 2
        self.host_built = self.big_alloc = self.big_copy = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__
        if name.startswith("lift_fresh") or name.startswith("scalar_tensor"):
            self.host_built += 1
        if isinstance(out, torch.Tensor):
            tensors = [out]
        elif isinstance(out, (tuple, list)):
            tensors = [o for o in out if isinstance(o, torch.Tensor)]
        else:
            tensors = []
        for t in tensors:
            if t.numel() * t.element_size() >= self.big:
                if name.startswith(("empty", "cat", "clone", "new_empty", "zeros")):
                    self.big_alloc += 1
                if name.startswith(("cat", "clone", "copy_")):
                    self.big_copy += 1
        return out


def load_module(rev: str | None):
    if rev is None:
        from dualpar import comm

        return comm
    src = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:dualpar/comm.py"], capture_output=True, text=True,
                         check=True).stdout
    path = os.path.join(tempfile.mkdtemp(), "comm_before.py")
    with open(path, "w") as f:
        f.write(src)
    spec = importlib.util.spec_from_file_location("comm_before", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def worker(rank, port, rev, messages, world_emulated, delay_s, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mod = load_module(rev)
    comm = mod.Comm(rank, 2, "cpu", timeout_s=300)
    if hasattr(comm, "warm_up"):
        comm.warm_up()
    payload = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).to(DTYPE)
    nbytes = payload.numel() * payload.element_size()
    counter = Count(nbytes)
    tasks = list(range(messages))
    if rank == 0:
        new = hasattr(comm, "send_buffer")
        if not new:
            comm.send_window = 2 * world_emulated + 1  # what the earlier engine set for that many ranks
        held_peak = 0
        if new:  # the engines reserve the send buffers once, from the task list, before the loop
            comm.reserve(1, KIND_PACKET, [SHAPE], DTYPE)
        t0 = time.perf_counter()
        for task in tasks:
            if new:
                with counter:
                    buf = comm.send_buffer(1, KIND_PACKET, SHAPE, DTYPE, task)
                buf.copy_(payload)  # the producer writing its output (engine: torch.cat(..., out=buf))
                with counter:
                    comm.send(buf, 1, KIND_PACKET, task)
                held = comm.send_bytes_held
            else:
                out = payload.clone()  # the producer's fresh output (engine: torch.cat)
                with counter:
                    comm.send(out, 1, KIND_PACKET, task)
                del out
                held = sum(m.numel() * m.element_size() for _, m, _ in comm._pending)
            held_peak = max(held_peak, held)
        comm.flush()
        elapsed = time.perf_counter() - t0
        res = {"messages_per_hop": (getattr(comm, "messages_sent", messages)) / messages,
               "wire_bytes_per_hop": comm.bytes_sent / messages, "payload_bytes": nbytes,
               "host_built_per_hop": counter.host_built / messages,
               "payload_allocs_per_hop": counter.big_alloc / messages,
               "payload_copies_per_hop": counter.big_copy / messages,
               "send_window_peak_bytes": held_peak, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               "send_s": elapsed}
        with open(result_path, "w") as f:
            json.dump(res, f)
    else:
        inbox = comm.inbox(0, [(KIND_PACKET, t, SHAPE, DTYPE) for t in tasks])
        recv_count = Count(nbytes)
        for task in tasks:
            time.sleep(delay_s)  # a busy stage
            with recv_count:
                got = inbox.next()
            assert got is not None and got.shape == SHAPE and torch.equal(got[0, :4, :4], payload[0, :4, :4])
        with open(result_path + ".recv", "w") as f:
            json.dump({"recv_payload_allocs_per_hop": recv_count.big_alloc / messages,
                       "recv_host_reads": recv_count.host_built}, f)
    dist.barrier()
    dist.destroy_process_group()


def run(rev, messages, world_emulated, delay_s) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = os.path.join(tempfile.mkdtemp(), "res.json")
    mp.spawn(worker, args=(port, rev, messages, world_emulated, delay_s, path), nprocs=2, join=True)
    res = json.load(open(path))
    res.update(json.load(open(path + ".recv")))
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", default=BEFORE, help="git revision of the earlier dualpar/comm.py")
    p.add_argument("--messages", type=int, default=24)
    p.add_argument("--ranks", type=int, default=8, help="ring size whose send window the earlier engine used")
    p.add_argument("--delay", type=float, default=0.15, help="seconds the receiver spends per message")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    before = run(args.before, args.messages, args.ranks, args.delay)
    now = run(None, args.messages, args.ranks, args.delay)
    mb = 1e6
    print(f"packet {SHAPE} {str(DTYPE).split('.')[-1]}: {now['payload_bytes'] / mb:.1f} MB payload; "
          f"{args.messages} messages, receiver {args.delay * 1e3:.0f} ms per message; earlier window for "
          f"{args.ranks} ranks\n")
    rows = [("messages per hop", "messages_per_hop", "{:.0f}"),
            ("bytes on the wire per hop beyond the payload", None, "{:.0f}"),
            ("tensors built from host data per hop (header)", "host_built_per_hop", "{:.0f}"),
            ("payload-sized allocations in send per hop", "payload_allocs_per_hop", "{:.0f}"),
            ("payload-sized copies in send per hop", "payload_copies_per_hop", "{:.0f}"),
            ("payload-sized allocations in receive per hop", "recv_payload_allocs_per_hop", "{:.0f}"),
            ("send window peak, MB", "send_window_peak_bytes", "{:.0f}"),
            ("sender peak RSS, MB", "peak_rss_mb", "{:.0f}")]
    print(f"| per hop | before ({args.before}) | now | now / before |")
    print("|---|---|---|---|")
    for label, key, fmt in rows:
        if key is None:
            b = before["wire_bytes_per_hop"] - before["payload_bytes"]
            n = now["wire_bytes_per_hop"] - now["payload_bytes"]
        else:
            b, n = before[key], now[key]
        if key == "send_window_peak_bytes":
            b, n = b / mb, n / mb
        ratio = f"{n / b:.2f}x" if b else "-"
        print(f"| {label} | {fmt.format(b)} | {fmt.format(n)} | {ratio} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"before": before, "now": now, "rev": args.before, "shape": SHAPE,
                       "messages": args.messages, "ranks": args.ranks}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
