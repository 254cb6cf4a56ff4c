"""Bad input: one clear line on stderr, exit status 2, no traceback, nothing started."""

import os
import subprocess
import sys

import pytest

from dualpar import cli

BASE = ["--no-progress", "--no-decode"]


def run_main(capsys, argv, env=None, monkeypatch=None):
    if env and monkeypatch:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
    code = cli.main(argv)
    err = capsys.readouterr().err
    return code, err


CASES = [
    (["--frames", "1000"], "4k+1"),
    (["--frames", "-3"], "4k+1"),
    (["--frames", "17"], "fewer than one block"),
    (["--block", "0"], "parallel.block must be >= 1"),
    (["--num-cat", "9"], "num_cat must be in [0, block=8]"),
    (["--num-cat", "-1"], "num_cat"),
    (["--height", "100"], "video.height 100 must be a positive multiple of 16"),
    (["--width", "0"], "video.width"),
    (["--steps", "0"], "sampling.steps"),
    (["--guidance", "-1"], "sampling.guidance"),
    (["--seed", "-5"], "sampling.seed"),
    (["--flow-shift", "0"], "sampling.flow_shift"),
    (["--scheduler", "ddim"], "sampling.scheduler"),
    (["--dtype", "fp8"], "model.dtype"),
    (["--fps", "0"], "video.fps"),
    (["--fps", "5000000"], "video.fps must be in [1, 240]"),
    (["--frames", "4000000001"], "past the longest supported video"),
    (["--height", "160000"], "video.height 160000 is past 4096 pixels"),
    (["--threads", "0"], "--threads"),
    (["--threads", str(2**40)], "--threads must be in [1, 1024]"),
    (["--device", "cuda:0"], "CUDA is not available"),
    (["--device", "banana"], "not a torch device"),
    (["--set", "video.frame=5"], "unknown key 'video.frame'"),
    (["--set", "vidoe.frames=5"], "unknown section 'vidoe'"),
    (["--set", "video.frames"], "SECTION.KEY=VALUE"),
    (["--set", "video.frames=lots"], "'video.frames' must be int"),
    (["--set", "parallel.timeout_s=0"], "parallel.timeout_s"),
    (["--set", "output.checkpoint_every=-1"], "checkpoint_every"),
    (["--set", "model.preset=huge"], "model.preset 'huge' is unknown"),
    (["--transformer-file", "x.safetensors"], "needs model.path"),
    (["--model", "/nonexistent/wan"], "/nonexistent/wan"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_option(capsys, tmp_path, argv, message):
    out = tmp_path / "out"
    code, err = run_main(capsys, BASE + argv + ["--out", str(out)])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not out.exists()


def write(tmp_path, text):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("text,message", [
    ("video:\n  fps2: 3\n", "unknown key 'video.fps2'"),
    ("video:\n  frames: many\n", "'video.frames' must be int"),
    ("video: [\n", "not valid YAML"),
    ("colour: red\n", "unknown section 'colour'"),
    ("- 1\n- 2\n", "expected a mapping"),
    ("sampling:\n  guidance: true\n", "'sampling.guidance' must be float"),
])
def test_bad_config_file(capsys, tmp_path, text, message):
    code, err = run_main(capsys, BASE + ["--config", write(tmp_path, text), "--out", str(tmp_path / "o")])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_missing_config_file(capsys, tmp_path):
    code, err = run_main(capsys, BASE + ["--config", str(tmp_path / "nope.yaml")])
    assert code == 2 and "cannot read config file" in err


def test_more_ranks_than_layers(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "9")
    monkeypatch.setenv("RANK", "0")
    code, err = run_main(capsys, BASE + ["--out", str(tmp_path / "o")])
    assert code == 2 and "9 ranks but the model has only 8 DiT layers" in err
    monkeypatch.setenv("RANK", "3")  # other ranks exit quietly: the message is printed once
    code, err = run_main(capsys, BASE + ["--out", str(tmp_path / "o")])
    assert code == 2 and err == ""


def test_output_dir_problems(capsys, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    code, err = run_main(capsys, BASE + ["--out", str(f / "sub")])
    assert code == 2 and "is a file, not a directory" in err
    code, err = run_main(capsys, BASE + ["--out", str(f)])
    assert code == 2 and "not a directory" in err
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text("{}")
    code, err = run_main(capsys, BASE + ["--out", str(run)])
    assert code == 2 and "already holds a run" in err and "--resume" in err
    assert (run / "manifest.json").read_text() == "{}"  # untouched


def test_resume_problems(capsys, tmp_path):
    code, err = run_main(capsys, BASE + ["--resume", str(tmp_path / "nothing")])
    assert code == 2 and "cannot read the run's manifest.json" in err
    run = tmp_path / "run"
    run.mkdir()
    from dualpar.config import Config

    import json

    cfg = Config()
    cfg.video.frames = 129
    cfg.output.decode = False
    (run / "manifest.json").write_text(json.dumps({"config": cfg.to_dict(), "status": "incomplete"}))
    code, err = run_main(capsys, BASE + ["--resume", str(run), "--frames", "257"])
    assert code == 2 and "video.frames: 129 -> 257" in err
    code, err = run_main(capsys, BASE + ["--resume", str(run)])
    assert code == 2 and "no checkpoint yet" in err


def test_through_the_launcher_no_traceback(root, tmp_path):
    # The real entry point, in a fresh process: one line, status 2, nothing written.
    res = subprocess.run([sys.executable, os.path.join(root, "launch", "gen.py"), "--frames", "1000",
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: --frames 1000 is not of the form 4k+1 (Wan's VAE); try 997 or 1001"]
    assert not (tmp_path / "o").exists()


def test_an_output_directory_nothing_can_be_written_to(capsys):
    # os.access says yes to root on /proc; only trying to write tells
    code, err = run_main(capsys, BASE + ["--out", "/proc/dualpar-run"])
    assert code == 2 and "--out /proc/dualpar-run is not writable" in err and len(err.strip().splitlines()) == 1
    assert not os.path.exists("/proc/dualpar-run")
