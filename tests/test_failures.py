"""Dead ranks, signals and resume: nothing hangs, nothing written is lost, a resumed run is exact."""

import json
import os
import shutil
import signal
import time

import av
import pytest
from safetensors.torch import load_file

from conftest import gen, start, wait_for

# 41 latent frames in blocks of 4 (10 blocks), 4 steps: long enough to interrupt. One block may
# wait for the writer, so denoising cannot finish far ahead of what is on disk.
ARGS = ["--frames", "161", "--height", "32", "--width", "48", "--block", "4", "--num-cat", "2", "--steps", "4",
        "--set", "model.text_len=32", "--set", "output.checkpoint_every=2", "--set", "parallel.timeout_s=30",
        "--set", "output.queue_blocks=1", "--seed", "5", "--no-progress"]


def start_run(n, out, extra=()):
    """The real launcher (the signal and kill tests are about it), not waited for."""
    return start(n, [*ARGS, "--out", str(out), *extra])


def run(n, extra, timeout=300):
    """A run to its end (resumes, refusals): forked, exit status returned, not asserted."""
    return gen(n, [*ARGS, *extra], expect=None, timeout=timeout)


def manifest(out):
    try:
        return json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def rank_pid(out, rank):
    """PID of the worker of this run with the given RANK (read from /proc)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if str(out).encode() in cmd and b"launch/gen.py" in b" ".join(cmd) and f"RANK={rank}".encode() in env:
            if not any(b"torch.distributed.run" in c for c in cmd):
                return int(pid)
    return None


def decoded_frames(path):
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def latents(out):
    man = manifest(out)
    return [load_file(out / b["latents"])["latents"] for b in man["blocks"]]


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A 1-rank run stopped by SIGTERM once it has written a checkpoint (resumable, incomplete)."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    p = start_run(1, out)
    wait_for(lambda: (out / "checkpoint.safetensors").is_file(), 300, "a checkpoint")
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=120)
    assert manifest(out)["status"] == "incomplete"
    return out


def stopped_after_a_checkpoint(stopped, out):
    """A copy of the stopped run for one test to change (copied files keep their times)."""
    shutil.copytree(stopped, out)
    return out


@pytest.fixture(scope="module")
def uninterrupted(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    gen(1, [*ARGS, "--out", str(out), "--no-decode"], timeout=600)
    return latents(out)


@pytest.mark.parametrize("n,victim", [(2, 1), (3, 1), (3, 2)])
def test_sigkill_of_a_rank_ends_the_run_cleanly(root, tmp_path, n, victim):
    out = tmp_path / "run"
    p = start_run(n, out)
    wait_for(lambda: (manifest(out) or {}).get("blocks_written", 0) >= 2, 300, "two blocks")
    wait_for(lambda: rank_pid(out, victim) is not None, 30, "the victim's pid")
    os.kill(rank_pid(out, victim), signal.SIGKILL)
    t0 = time.time()
    _, err = p.communicate(timeout=90)
    assert p.returncode != 0
    assert time.time() - t0 < 60  # well inside the 120 s default timeout (30 s set here)
    wait_for(lambda: all(rank_pid(out, r) is None for r in range(n)), 10, "every rank gone")
    man = manifest(out)
    assert man["status"] == "incomplete" and man["reason"], man
    assert 2 <= man["blocks_written"] < man["blocks_total"]
    assert decoded_frames(out / "video.mp4") >= man["frames_written"] > 0
    assert "rank" in man["reason"] or "SIGTERM" in man["reason"]
    # every survivor aborted its process group (destroying it would wait for receives posted ahead)
    for r in set(range(n)) - {victim}:
        assert f"[rank {r}] process group aborted" in err, err[-3000:]


def test_kill_then_resume_equals_uninterrupted(root, tmp_path, uninterrupted):
    out = tmp_path / "run"
    p = start_run(2, out)
    wait_for(lambda: (out / "checkpoint.safetensors").is_file(), 300, "a checkpoint")
    # The whole job, launcher included: nothing gets to clean up.
    pids = [rank_pid(out, r) for r in range(2)]
    for pid in [p.pid] + [q for q in pids if q]:
        os.kill(pid, signal.SIGKILL)
    p.communicate(timeout=30)
    assert manifest(out)["status"] == "running"  # killed mid-run
    from dualpar.output import rundir

    assert rundir.holder(str(out)) is None  # ... and nobody holds its lock: a dead run, not a live one
    # Resume on a different number of ranks: the checkpoint is rank-count independent.
    res = run(3, ["--resume", str(out)], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    man = manifest(out)
    assert man["status"] == "complete" and man["blocks_written"] == man["blocks_total"] == 10
    assert decoded_frames(out / "video.mp4") == 161
    got = latents(out)
    diff = max((a - b).abs().max().item() for a, b in zip(got, uninterrupted))
    assert len(got) == len(uninterrupted) and diff <= 1e-5, diff


@pytest.mark.parametrize("n,where", [(1, "first"), (2, "first"), (2, "last"), (3, "extra")])
def test_sigterm_finalizes_and_resumes(root, tmp_path, uninterrupted, n, where):
    # decode_on last/extra: the output rank writes the checkpoint, with rank 0's state sent to it
    out = tmp_path / "run"
    p = start_run(n, out, ["--set", f"output.decode_on={where}"])
    wait_for(lambda: (manifest(out) or {}).get("blocks_written", 0) >= 2, 300, "two blocks")
    p.send_signal(signal.SIGTERM)  # to the launcher (torchrun forwards it) or the single process
    t0 = time.time()
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0 and time.time() - t0 < 30  # inside parallel.timeout_s
    if n > 1:  # receives posted ahead stay unmatched after a stop: the group is aborted, not destroyed
        assert all(f"[rank {r}] process group aborted" in err for r in range(n)), err[-3000:]
    man = manifest(out)
    assert man["status"] == "incomplete" and "SIGTERM" in man["reason"] and "--resume" in man["reason"], man
    assert decoded_frames(out / "video.mp4") == man["frames_written"] > 0  # finalized: exactly what it says
    assert (out / "checkpoint.safetensors").is_file()
    res = run(n, ["--resume", str(out)], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    man = manifest(out)
    assert man["status"] == "complete" and man["frames_written"] == man["frames_total"] == 161
    assert decoded_frames(out / "video.mp4") == 161
    got = latents(out)
    assert max((a - b).abs().max().item() for a, b in zip(got, uninterrupted)) <= 1e-5


def test_stale_checkpoint_of_another_run_is_refused(stopped, tmp_path):
    # A checkpoint left in the directory by an earlier run must never be continued
    # under a new run's manifest: refused in one line, before anything is loaded.
    out = stopped_after_a_checkpoint(stopped, tmp_path / "run")
    man = manifest(out)
    man["created_at"] = "another run"
    (out / "manifest.json").write_text(json.dumps(man))
    res = run(1, ["--resume", str(out)], timeout=120)
    assert res.returncode == 2 and "belongs to another run" in res.stderr and "Traceback" not in res.stderr


def test_sigterm_stops_a_causal_run_cleanly(root, tmp_path):
    out = tmp_path / "causal"
    p = start_run(2, out, ["--mode", "causal", "--policy", "window", "--budget", "4"])
    wait_for(lambda: (manifest(out) or {}).get("blocks_written", 0) >= 2, 300, "two chunks")
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode != 0
    assert all(f"[rank {r}] process group aborted" in err for r in range(2)), err[-3000:]
    man = manifest(out)
    assert man["status"] == "incomplete" and "SIGTERM" in man["reason"] and "--resume" not in man["reason"], man
    assert decoded_frames(out / "video.mp4") == man["frames_written"] > 0
    assert man["blocks_written"] < man["blocks_total"] == 13
    assert not (out / "checkpoint.safetensors").exists()


def test_resume_refuses_overwrite_and_a_damaged_checkpoint_keeping_everything(stopped, tmp_path):
    from dualpar import checkpoint

    out = stopped_after_a_checkpoint(stopped, tmp_path / "run")
    before = {f.name: f.stat().st_mtime_ns for f in out.rglob("*") if f.is_file()}
    # --overwrite with --resume would delete the very run being resumed: refused, nothing touched
    res = run(1, ["--resume", str(out), "--overwrite"], timeout=120)
    assert res.returncode == 2 and "--overwrite would delete it" in res.stderr and "Traceback" not in res.stderr
    assert {f.name: f.stat().st_mtime_ns for f in out.rglob("*") if f.is_file()} == before
    # a checkpoint whose iteration is impossible for the run: refused before anything runs, and kept
    meta, tensors = checkpoint.load(out)
    # the FORMAT 1 layout, key by key, so that checkpoints of earlier runs still resume
    assert list(meta) == ["engine", "writer", "config", "run_id"]
    assert list(meta["engine"]) == ["iteration", "blocks_done", "latents", "tails", "scheds", "noise"]
    assert list(meta["writer"]) == ["blocks_written", "frames_written", "latent_frames_written", "video_bytes", "gop",
                                    "mp4", "decoder"]
    assert {"noise.pool", "noise.gen"} <= tensors.keys()
    assert {k.split(".")[0] for k in tensors} <= {"latents", "tails", "sched", "noise", "writer"}
    meta["engine"]["iteration"] = 10**6
    checkpoint.save(out, meta, tensors)
    res = run(1, ["--resume", str(out)], timeout=120)
    assert res.returncode == 2 and "iteration 1000000" in res.stderr and "Traceback" not in res.stderr
    assert (out / "checkpoint.safetensors").is_file() and manifest(out)["status"] == "incomplete"


def test_out_is_resolved_once(root, tmp_path):
    out = tmp_path / "base" / "nowhere" / ".." / "run"  # where the files land: base/run
    res = run(1, ["--out", str(out), "--no-decode"], timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    real = tmp_path / "base" / "run"
    assert manifest(real)["status"] == "complete" and not (real / "checkpoint.safetensors").exists()
    again = run(1, ["--out", str(real), "--no-decode"], timeout=120)
    assert again.returncode == 2 and "already holds a run" in again.stderr and "Traceback" not in again.stderr
    again = run(1, ["--out", str(out), "--no-decode"], timeout=120)
    assert again.returncode == 2 and "already holds a run" in again.stderr
