"""The run directory: only a run's own files are ever removed, anything else is refused, and the
lock tells a live run from a dead one (also after kill -9)."""

import json
import os
import signal
import subprocess
import sys
import time

from dualpar import cli
from dualpar.output import rundir

BASE = ["--no-progress", "--no-decode", "--frames", "33", "--height", "32", "--width", "32", "--block", "4"]


def make_run(path, blocks=2):
    """A directory laid out as a run of ours (a manifest, a checkpoint, block latents, a temp file)."""
    (path / "latents").mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"status": "complete"}))
    (path / "checkpoint.safetensors").write_bytes(b"x")
    (path / ".manifest.json.abc123.tmp").write_bytes(b"x")
    for b in range(blocks):
        (path / rundir.block_file(b)).write_bytes(b"x")


def test_clear_removes_only_what_a_run_writes(tmp_path):
    run = tmp_path / "run"
    make_run(run)
    assert rundir.foreign(str(run)) == []
    rundir.clear(str(run))
    assert not run.joinpath("latents").exists() and os.listdir(run) == []
    make_run(run)
    (run / "latents" / "mine.npy").write_bytes(b"user")
    (run / "notes.txt").write_text("user")
    assert rundir.foreign(str(run)) == ["latents/mine.npy", "notes.txt"]
    rundir.clear(str(run))
    assert sorted(os.listdir(run)) == ["latents", "notes.txt"] and os.listdir(run / "latents") == ["mine.npy"]


def test_overwrite_refuses_a_directory_with_other_files(tmp_path, capsys):
    run = tmp_path / "run"
    make_run(run)
    (run / "latents" / "mine.npy").write_bytes(b"user")
    before = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    for extra in ([], ["--overwrite"]):
        code = cli.main([*BASE, "--out", str(run), *extra])
        err = capsys.readouterr().err
        assert code == 2 and "holds files that are not a run's (latents/mine.npy)" in err
    assert sorted(str(p.relative_to(run)) for p in run.rglob("*")) == before
    plain = tmp_path / "somewhere"
    plain.mkdir()
    (plain / "holiday.mp4").write_bytes(b"user")
    assert cli.main([*BASE, "--out", str(plain)]) == 2
    assert "holiday.mp4" in capsys.readouterr().err and (plain / "holiday.mp4").read_bytes() == b"user"


def test_a_live_run_is_neither_overwritten_nor_resumed(tmp_path, capsys):
    run = tmp_path / "run"
    make_run(run)
    lock = rundir.Lock(str(run)).acquire()
    try:
        assert rundir.holder(str(run)) == str(os.getpid())
        assert cli.main([*BASE, "--out", str(run), "--overwrite"]) == 2
        assert f"is in use by a running run (pid {os.getpid()})" in capsys.readouterr().err
        assert cli.main([*BASE, "--resume", str(run)]) == 2
        assert "the run is still going" in capsys.readouterr().err
    finally:
        lock.release()
    assert rundir.holder(str(run)) is None
    assert (run / "manifest.json").exists() and (run / "checkpoint.safetensors").exists()


def test_the_lock_of_a_killed_process_is_free(tmp_path):
    run = tmp_path / "run"
    code = (f"import sys, time; sys.path.insert(0, {os.path.dirname(os.path.dirname(cli.__file__))!r}); "
            f"from dualpar.output import rundir; rundir.Lock({str(run)!r}).acquire(); print('locked', flush=True); "
            "time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    assert rundir.holder(str(run)) == str(p.pid)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=10)
    t0 = time.time()
    while rundir.holder(str(run)) is not None and time.time() - t0 < 5:
        time.sleep(0.05)
    assert rundir.holder(str(run)) is None  # the kernel dropped it: a "running" manifest here is a dead run
