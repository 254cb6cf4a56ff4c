"""Ray jobs: the same latents as launch/gen.py's ranks, several prompts per job, a dead actor fails the job
cleanly; batches over several pipelines, with a killed actor or driver (issue 15)."""

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install -e '.[ray]'")

from conftest import wait_for  # noqa: E402
from test_parallel import ARGS, launch, read_blocks  # noqa: E402

# New local clusters require token auth; the tests bring their own token (nothing read from ~/.ray).
ENV = dict(os.environ, OMP_NUM_THREADS="1", RAY_AUTH_MODE="token")
ENV.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local Ray instance for these tests: 2 CPUs, no dashboard, a small object store, loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tmp_path_factory.mktemp("ray")
    start = ["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
             "--include-dashboard=false", "--object-store-memory=134217728", "--disable-usage-stats",
             f"--temp-dir={tmp}"]
    res = subprocess.run(start, capture_output=True, text=True, timeout=120, env=ENV)
    assert res.returncode == 0, res.stderr
    yield f"127.0.0.1:{port}"
    subprocess.run(["ray", "stop", "--force"], capture_output=True, timeout=120, env=ENV)


def ray_job(root, cluster, args, **kw):
    cmd = [sys.executable, os.path.join(root, "launch", "ray_job.py"), "--address", cluster, "--world-size", "2",
           *ARGS, *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, **kw)


def test_causal_mode_on_two_actors_equals_one_process(root, cluster, tmp_path):
    """Two causal videos of one engine, each with its own seed, equal to one process's runs of them."""
    causal = ["--mode", "causal", "--policy", "focused", "--budget", "4", "--set", "causal.sink=1", "--no-decode"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('a red fox running through snow\n{"prompt": "a red fox running through snow", "seed": 5}\n')
    p = ray_job(root, cluster, [*causal, "--prompts", str(prompts), "--out", str(tmp_path / "ray")])
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert err.count("[rank 0] layers [0, 4)") == 1  # one engine for both videos
    got = [read_blocks(tmp_path / "ray" / f"prompt-{i:03d}")[1] for i in range(2)]
    for i, seed in enumerate(("11", "5")):  # 11: ARGS's seed
        launch(root, 1, tmp_path / f"one-{i}", [*causal, "--seed", seed, "--prompt", "a red fox running through snow"])
        _, ref = read_blocks(tmp_path / f"one-{i}")
        assert len(got[i]) == len(ref) == 7  # 23 latent frames: chunks of 5, 3, 3, 3, 3, 3, 3
        assert all((x - y).abs().max().item() <= 1e-5 for x, y in zip(got[i], ref))
    assert (got[0][0] - got[1][0]).abs().max().item() > 0.1  # the seed made a difference


def test_prompt_file_two_videos_one_model_load_each_equal_to_torchrun(root, cluster, tmp_path):
    prompts = tmp_path / "prompts.txt"
    texts = ["a red fox running through snow", "a boat on a dark sea"]
    prompts.write_text(f"{texts[0]}\n\n# comment\n{texts[1]}\n")
    p = ray_job(root, cluster, ["--prompts", str(prompts), "--out", str(tmp_path / "batch")])
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    mans = [json.loads((tmp_path / "batch" / f"prompt-{i:03d}" / "manifest.json").read_text()) for i in range(2)]
    assert [m["status"] for m in mans] == ["complete", "complete"]
    assert [m["config"]["sampling"]["prompt"] for m in mans] == ["a red fox running through snow",
                                                                  "a boat on a dark sea"]
    assert all(m["frames_written"] == 89 for m in mans)
    # each actor built its slice of the model once, for both videos
    assert err.count("[rank 0] layers [0, 4)") == 1 and err.count("[rank 1] layers [4, 8)") == 1
    # and loaded the text encoder once for both prompts (and the shared negative prompt)
    assert err.count("[rank 0] text encoder loaded for 3 prompt(s)") == 1 and "text encoder loaded" in err
    # each video's stats count that video alone: same shapes, same bytes on the wire
    stats = [json.loads((tmp_path / "batch" / f"prompt-{i:03d}" / "stats.json").read_text()) for i in range(2)]
    sent = [[r["bytes_sent"] for r in s["ranks"]] for s in stats]
    assert sent[0] == sent[1] and min(sent[0]) > 0, sent
    # every video is exactly what launch/gen.py's ranks make of its prompt
    videos = [read_blocks(tmp_path / "batch" / f"prompt-{i:03d}")[1] for i in range(2)]
    for i, text in enumerate(texts):
        launch(root, 2, tmp_path / f"gen-{i}", ["--prompt", text])
        _, ref = read_blocks(tmp_path / f"gen-{i}")
        assert len(videos[i]) == len(ref) == 5 and all(torch.equal(x, y) for x, y in zip(videos[i], ref))
    assert not torch.equal(videos[0][0], videos[1][0])  # different prompts, different videos


def test_killing_an_actor_fails_the_job_cleanly(root, cluster, tmp_path):
    out = tmp_path / "run"
    # one block may wait for the writer: denoising cannot finish far ahead of what is on disk
    args = ["--frames", "161", "--set", "parallel.timeout_s=30", "--set", "output.queue_blocks=1", "--attempts", "1",
            "--out", str(out)]
    p = ray_job(root, cluster, args)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(p.stderr), daemon=True)
    reader.start()

    def manifest():
        try:
            return json.loads((out / "manifest.json").read_text())
        except (OSError, ValueError):
            return {}

    end = time.time() + 300
    while manifest().get("blocks_written", 0) < 2 and time.time() < end:
        time.sleep(0.05)
    pids = dict(re.findall(r"rank (\d+): pid (\d+)", "".join(lines)))
    os.kill(int(pids["1"]), signal.SIGKILL)
    t0 = time.time()
    p.wait(timeout=120)
    reader.join(timeout=10)
    err = "".join(lines)
    assert p.returncode == 1
    assert time.time() - t0 < 30 + 30 + 10
    assert "error: rank 1" in err, err[-2000:]
    man = manifest()
    assert man["status"] == "incomplete" and 2 <= man["blocks_written"] < man["blocks_total"]
    import av

    with av.open(str(out / "video.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) >= man["frames_written"] > 0


def test_a_batch_with_split_auto_rebalances_after_the_first_video(root, cluster, tmp_path):
    """Issue 14: the split changes after video 1 from its measured times; every video is still exactly
    what a fixed split makes of its prompt."""
    prompts = tmp_path / "prompts.txt"
    texts = ["a red circle bouncing right on a dark blue background", "a yellow square bouncing down on a black "
             "background", "a green triangle bouncing left on a grey background"]
    prompts.write_text("\n".join(texts) + "\n")
    prof = tmp_path / "profiles.json"
    p = ray_job(root, cluster, ["--prompts", str(prompts), "--out", str(tmp_path / "batch"), "--set",
                                "parallel.split=auto", "--set", f"parallel.profile={prof}",
                                # a one-block output queue: rank 0 waits for its VAE (what auto measures)
                                "--set", "output.queue_blocks=1"])
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert "no cost profile measured on this setup yet; the even split 4,4" in err, err[-3000:]
    changed = re.findall(r"split auto: measured busy ([0-9./]+) s per rank; .*; split 4,4 -> (\d+),(\d+) for the "
                         r"next video \(slowest stage ([0-9.]+) s -> ([0-9.]+) s predicted\)", err)
    assert changed, err[-3000:]
    stats = [json.loads((tmp_path / "batch" / f"prompt-{i:03d}" / "stats.json").read_text()) for i in range(3)]
    assert stats[0]["layers"] == [4, 4] and stats[1]["layers"] == [int(changed[0][1]), int(changed[0][2])] != [4, 4]
    # decoding (rank 0, CPU) costs more than a layer's share: layers moved off rank 0
    assert stats[1]["layers"][0] < 4
    # the rank whose slice changed loaded it again; latents never depend on the split
    for i, text in enumerate(texts):
        launch(root, 1, tmp_path / f"gen-{i}", ["--prompt", text])
        _, ref = read_blocks(tmp_path / f"gen-{i}")
        _, got = read_blocks(tmp_path / "batch" / f"prompt-{i:03d}")
        assert len(got) == len(ref) == 5 and all(torch.equal(x, y) for x, y in zip(got, ref)), i


# -- batches over several pipelines (issue 15) ------------------------------------------------------

_REFS = {}


def reference(root, tmp_path_factory, prompt, seed, frames=89):
    """The latents launch/gen.py (one rank) makes of ``prompt`` and ``seed``: the independent reference."""
    key = (prompt, seed, frames)
    if key not in _REFS:
        out = tmp_path_factory.mktemp("ref") / "run"
        launch(root, 1, out, ["--prompt", prompt, "--seed", str(seed), "--frames", str(frames)])
        _REFS[key] = read_blocks(out)[1]
    return _REFS[key]


def batch_job(root, cluster, args, world=1):
    cmd = [sys.executable, os.path.join(root, "launch", "ray_job.py"), "--address", cluster, "--world-size",
           str(world), *ARGS, *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
                            start_new_session=True)


def equal(got, ref):
    return len(got) == len(ref) and all(torch.equal(x, y) for x, y in zip(got, ref))


LINES = [{"prompt": "a red circle moving right on a dark blue background", "seed": 1},
         {"prompt": "a yellow square bouncing down on a black background", "seed": 2, "out": "square"},
         {"prompt": "a green triangle moving left on a grey background", "seed": 3},
         "a blue circle moving up on a white background"]


def write_lines(path, lines):
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))


def video_dirs(batch_dir, lines):
    return [batch_dir / (x["out"] if isinstance(x, dict) and "out" in x else f"prompt-{i:03d}")
            for i, x in enumerate(lines)]


def test_two_pipelines_share_a_batch_of_four_each_video_equal_to_gen_py(root, cluster, tmp_path, tmp_path_factory):
    prompts = tmp_path / "prompts.jsonl"
    write_lines(prompts, LINES)
    out = tmp_path / "batch"
    p = batch_job(root, cluster, ["--replicas", "auto", "--no-decode", "--prompts", str(prompts), "--out", str(out)])
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert "4 of 4 video(s) to make on 2 pipeline(s) of 1 rank(s)" in err, err[-3000:]  # auto: 2 CPUs, 1 rank each
    record = json.loads((out / "batch.json").read_text())
    assert record["counts"] == {"complete": 4, "running": 0, "failed": 0, "pending": 0}
    assert {e["pipeline"] for e in record["videos"]} == {0, 1}  # both pipelines did work
    assert all(e["attempts"] == 1 and e["frames_written"] == 89 and e["wall_s"] > 0 for e in record["videos"])
    # each pipeline built its engine once, for all the videos it made
    assert err.count("[rank 0] layers [0, 8)") == 2, err[-3000:]
    for x, d in zip(LINES, video_dirs(out, LINES)):
        prompt, seed = (x["prompt"], x["seed"]) if isinstance(x, dict) else (x, 11)  # 11: ARGS's seed
        assert equal(read_blocks(d)[1], reference(root, tmp_path_factory, prompt, seed)), d
    assert "[driver] batch:" in err and "[driver] 4 of 4 video(s) complete" in err, err[-3000:]


def read_json(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def start_batch(root, cluster, tmp_path, lines, args):
    """ray_job.py over a prompts file of ``lines`` into ``tmp_path/batch``: (process, batch dir, video dirs)."""
    prompts = tmp_path / "prompts.jsonl"
    write_lines(prompts, lines)
    out = tmp_path / "batch"
    return batch_job(root, cluster, [*args, "--prompts", str(prompts), "--out", str(out)]), out, video_dirs(out, lines)


SLOW = ["--frames", "257", "--set", "output.queue_blocks=1", "--set", "output.checkpoint_every=4",
        "--set", "parallel.timeout_s=20"]  # decoding on: a video takes seconds, with checkpoints on the way


def test_killing_a_pipelines_actor_mid_video_the_batch_completes_and_the_video_resumes(
        root, cluster, tmp_path, tmp_path_factory):
    lines = LINES[:2]
    p, out, dirs = start_batch(root, cluster, tmp_path, lines, [*SLOW, "--replicas", "2"])
    err_lines = []
    reader = threading.Thread(target=lambda: err_lines.extend(p.stderr), daemon=True)
    reader.start()
    wait_for(lambda: (dirs[0] / "checkpoint.safetensors").is_file()
             and read_json(dirs[0] / "manifest.json").get("blocks_written", 0) >= 2, 240, "video 0's checkpoint")
    err = "".join(err_lines)
    pipe = re.search(r"\[pipeline (\d+)\] video 0 \(line 1\) started", err).group(1)
    pid = re.search(rf"\[pipeline {pipe}\] 1 actor\(s\) on CPU: rank 0: pid (\d+)", err).group(1)
    before = {f.name: f.read_bytes() for f in (dirs[0] / "latents").iterdir() if f.suffix == ".safetensors"}
    os.kill(int(pid), signal.SIGKILL)
    p.wait(timeout=300)
    reader.join(timeout=10)
    err = "".join(err_lines)
    assert p.returncode == 0, err[-3000:]
    assert re.search(rf"\[pipeline {pipe}\] video 0 \(line 1\) failed after [0-9.]+ s: rank 0's actor died", err), \
        err[-3000:]
    assert "2 attempt(s) left" in err and "failed after 1 attempt(s)" not in err, err[-3000:]
    assert "video 0 (line 1) resumed at its checkpoint, attempt 2" in err, err[-3000:]
    assert f"[pipeline {pipe}] 1 actor(s) on CPU (placed again, build 2)" in err, err[-3000:]
    record = json.loads((out / "batch.json").read_text())
    assert [e["status"] for e in record["videos"]] == ["complete", "complete"]
    assert [e["attempts"] for e in record["videos"]] == [2, 1]
    # the interrupted video is exactly its uninterrupted run, and what it wrote before the kill is still there
    for x, d in zip(lines, dirs):
        assert equal(read_blocks(d)[1], reference(root, tmp_path_factory, x["prompt"], x["seed"], 257)), d
    man = json.loads((dirs[0] / "manifest.json").read_text())
    kept = {b["latents"].split("/")[-1] for b in man["blocks"]}
    assert before and set(before) <= kept
    from safetensors.torch import load, load_file

    assert all(torch.equal(load(data)["latents"], load_file(dirs[0] / "latents" / name)["latents"])
               for name, data in before.items())
    import av

    with av.open(str(dirs[0] / "video.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 257


def test_killing_the_driver_and_running_it_again_makes_only_the_unfinished_videos(
        root, cluster, tmp_path, tmp_path_factory):
    lines = LINES[:3]
    p, out, dirs = start_batch(root, cluster, tmp_path, lines, [*SLOW, "--replicas", "1"])
    wait_for(lambda: read_json(dirs[0] / "manifest.json").get("status") == "complete"
             and (dirs[1] / "checkpoint.safetensors").is_file(), 240, "video 0 done, video 1 checkpointed")
    first = read_json(dirs[0] / "manifest.json")
    os.killpg(p.pid, signal.SIGKILL)  # the driver, with nothing to clean up
    p.communicate(timeout=30)
    from dualpar.output import rundir

    # Ray ends a dead driver's actors: the run they held is unlocked
    wait_for(lambda: rundir.holder(str(dirs[1])) is None, 60, "the driver's actors to go")
    assert read_json(dirs[1] / "manifest.json").get("status") == "running"
    p = start_batch(root, cluster, tmp_path, lines, [*SLOW, "--replicas", "1"])[0]  # the same command again
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert "video 0 (line 1): already complete" in err and "video 0 (line 1) started" not in err, err[-3000:]
    assert "video 1 (line 2) resumed at its checkpoint" in err, err[-3000:]
    assert "video 2 (line 3) started, attempt 1" in err and "2 of 3 video(s) to make" in err, err[-3000:]
    assert read_json(dirs[0] / "manifest.json") == first  # not touched
    record = json.loads((out / "batch.json").read_text())
    assert [e["status"] for e in record["videos"]] == ["complete"] * 3
    for x, d in zip(lines, dirs):
        assert equal(read_blocks(d)[1], reference(root, tmp_path_factory, x["prompt"], x["seed"], 257)), d
