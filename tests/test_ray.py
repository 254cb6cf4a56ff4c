"""Ray jobs: the same latents as launch/gen.py's ranks, several prompts per job, a dead actor fails the job cleanly."""

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
    causal = ["--mode", "causal", "--policy", "focused", "--budget", "4", "--set", "causal.sink=1", "--no-decode"]
    p = ray_job(root, cluster, [*causal, "--out", str(tmp_path / "ray")])
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    launch(root, 1, tmp_path / "one", causal)
    _, a = read_blocks(tmp_path / "ray")
    _, b = read_blocks(tmp_path / "one")
    assert len(a) == len(b) == 7  # 23 latent frames: chunks of 5, 3, 3, 3, 3, 3, 3
    assert all((x - y).abs().max().item() <= 1e-5 for x, y in zip(a, b))


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
    args = ["--frames", "161", "--set", "parallel.timeout_s=30", "--set", "output.queue_blocks=1", "--out", str(out)]
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
