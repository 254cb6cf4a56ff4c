"""Shared test helpers: the one way tests start ``launch/gen.py``.

:func:`gen` runs it and returns a ``CompletedProcess``. ``launcher="fork"``
(the default) asks a session-wide fork server (``tests/zygote.py``) that has
imported torch and diffusers once; ``"real"`` starts ``python gen.py`` (one
rank) or ``torchrun`` (several), as a user would, for the tests that are about
the launcher itself: signals, kills, exit codes, messages. :func:`start` is the
real launcher without waiting, for tests that interrupt a run.
"""

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(1)

GEN = os.path.join(ROOT, "launch", "gen.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="session")
def root():
    return ROOT


def command(n, args):
    """The real launcher's command line: ``python gen.py`` for one rank, torchrun for more."""
    cmd = [sys.executable]
    if n > 1:
        cmd += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n)]
    return cmd + [GEN, *map(str, args)]


def wait_for(pred, timeout, what):
    """Poll ``pred`` every 50 ms until it holds; AssertionError naming ``what`` after ``timeout`` s."""
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def start(n, args, env=None, **kw):
    """The real launcher, not waited for, in its own session (so a test can signal the whole group)."""
    return subprocess.Popen(command(n, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(ENV, **(env or {})), start_new_session=True, **kw)


class _Zygote:
    """The session's fork server, started on first use (its imports take a few seconds, once)."""

    def __init__(self):
        self.proc = None
        self.lock = threading.Lock()

    def run(self, n, args, env, timeout):
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "zygote.py")],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
                assert json.loads(self.proc.stdout.readline() or "{}").get("ready"), "fork server did not start"
            with tempfile.TemporaryDirectory(prefix="gen-logs-") as logs:
                req = {"argv": list(map(str, args)), "n": n, "env": env or {}, "logs": logs, "timeout": timeout}
                self.proc.stdin.write(json.dumps(req) + "\n")
                self.proc.stdin.flush()
                reply = json.loads(self.proc.stdout.readline() or '{"error": "fork server died"}')
                assert "error" not in reply, reply["error"]

                def read(kind):
                    return "".join(open(os.path.join(logs, f"rank{r}.{kind}")).read() for r in range(n))

                out, err = read("out"), read("err")
        codes = reply["codes"]
        if reply["timed_out"]:
            raise subprocess.TimeoutExpired(command(n, args), timeout, out, err)
        # torchrun's convention: a rank's own status for one rank, 1 when any of several failed
        code = codes[0] if n == 1 else (0 if not any(codes) else 1)
        return subprocess.CompletedProcess(command(n, args), code, out, err)

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


_ZYGOTE = _Zygote()


def pytest_sessionfinish(session, exitstatus):
    _ZYGOTE.close()


def gen(n, args, *, launcher="fork", expect=0, timeout=300, env=None):
    """``launch/gen.py args`` on ``n`` ranks; asserts the exit status is ``expect`` (None: any)."""
    if launcher == "fork":
        res = _ZYGOTE.run(n, args, env, timeout)
    elif launcher == "real":
        res = subprocess.run(command(n, args), capture_output=True, text=True, timeout=timeout,
                             env=dict(ENV, **(env or {})))
    else:
        raise ValueError(f"launcher must be fork or real, got {launcher!r}")
    if expect is not None:
        assert res.returncode == expect, f"exit {res.returncode}, expected {expect}:\n{res.stderr[-3000:]}"
    return res


# The slowest files first (measured on a clean clone, 2 cores): with ``pytest -n 3 --dist loadfile``
# the workers then finish together instead of one waiting on a long file picked up last.
SLOWEST_FIRST = ("test_benchmarks.py", "test_failures.py", "test_ray.py", "test_causal.py", "test_gpu_check.py",
                 "test_model_dir.py", "test_parallel.py", "test_gpu_options.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept otherwise
