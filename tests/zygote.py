"""A fork server for the tests: imports the heavy stack once, then forks ranks of ``launch/gen.py``.

A real ``launch/gen.py`` process spends most of a small test run importing
torch, diffusers and transformers, and every rank pays it again. This server
pays it once per test session: it imports everything ``gen.py`` would, then
for each request forks ``n`` children that set torchrun's environment (RANK,
WORLD_SIZE, MASTER_ADDR, ...) and call :func:`dualpar.cli.main` with the
request's arguments, which is all ``launch/gen.py`` does. The server itself
never runs a job, so each child starts from the state a fresh process would
have after its imports. Real launchers (torchrun, ``python gen.py``) stay in
the tests that are about the launcher: signals, kills, exit codes.

Protocol: one JSON request per line on stdin
``{"argv": [...], "n": N, "env": {...}, "logs": DIR, "timeout": S}``, one JSON
reply per line on stdout ``{"codes": [...], "timed_out": bool}``. Each rank's
stdout and stderr go to ``DIR/rank{R}.out`` and ``DIR/rank{R}.err``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Everything a gen.py run imports, so the children find it in memory.
import torch  # noqa: E402

torch.set_num_threads(1)  # before any op: no OpenMP pool exists to be broken by fork

import av  # noqa: E402,F401
import diffusers  # noqa: E402,F401
import safetensors.torch  # noqa: E402,F401
import transformers  # noqa: E402,F401

import dualpar.cli  # noqa: E402
import dualpar.job  # noqa: E402,F401
from dualpar.models import loader  # noqa: E402,F401

import diffusers.models.autoencoders.autoencoder_kl_wan  # noqa: E402,F401
import diffusers.models.transformers.transformer_wan  # noqa: E402,F401

# A rank imports these lazily; importing them here only moves the time.
for mod in ("dualpar.engine", "dualpar.causal", "dualpar.comm", "dualpar.ring"):
    __import__(mod)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, n: int, port: int, req: dict) -> None:
    """In the forked rank: torchrun's environment, the logs as fds 1 and 2, then gen.py's main."""
    code = 1
    try:
        os.setpgid(0, 0)  # its own group: a timeout kills the rank and anything it started
        os.environ.update(req.get("env", {}))
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(n), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(n),
                          GROUP_RANK="0", ROLE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                          TORCHELASTIC_RUN_ID="zygote")
        if n == 1:
            for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                        "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
                os.environ.pop(key, None)  # one rank runs as `python gen.py` does
        for fd, suffix in ((1, "out"), (2, "err")):
            f = os.open(os.path.join(req["logs"], f"rank{rank}.{suffix}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                        0o644)
            os.dup2(f, fd)
            os.close(f)
        os.chdir(req.get("cwd") or ROOT)
        sys.argv = [os.path.join(ROOT, "launch", "gen.py"), *req["argv"]]
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        code = dualpar.cli.main(req["argv"])
    except SystemExit as e:  # argparse errors
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code or 0)


def _run(req: dict) -> dict:
    n = int(req["n"])
    port = _free_port()
    pids = []
    for rank in range(n):
        pid = os.fork()
        if pid == 0:
            _child(rank, n, port, req)
        pids.append(pid)
    codes: dict[int, int] = {}
    deadline = time.monotonic() + float(req.get("timeout", 300))
    failed_at = None
    timed_out = False
    while len(codes) < n:
        for i, pid in enumerate(pids):
            if i in codes:
                continue
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                codes[i] = os.waitstatus_to_exitcode(status)
                if codes[i] != 0 and failed_at is None:
                    failed_at = time.monotonic()
        now = time.monotonic()
        # like torchrun: once a rank failed, the others get a moment, then are stopped
        if now > deadline or (failed_at is not None and now > failed_at + 30):
            timed_out = now > deadline
            for i, pid in enumerate(pids):
                if i not in codes:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    codes[i] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        time.sleep(0.01)
    return {"codes": [codes[i] for i in range(n)], "timed_out": timed_out}


def main() -> None:
    out = os.fdopen(os.dup(1), "w")
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # stray prints must not corrupt the protocol
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            reply = _run(json.loads(line))
        except Exception as e:  # noqa: BLE001 - reported to the test, which fails with it
            reply = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
