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
    (["--set", "parallel.join_timeout_s=0"], "parallel.join_timeout_s must be in [1, 86400]"),
    (["--set", "parallel.split=3,5"], "parallel.split gives 2 layer counts for 1 rank(s)"),
    (["--set", "parallel.split=4,x"], "parallel.split must be 'even', 'auto' or a layer count >= 1 per rank"),
    (["--set", "parallel.split=0,8"], "parallel.split must be 'even', 'auto' or a layer count >= 1 per rank"),
    (["--set", "output.checkpoint_every=-1"], "checkpoint_every"),
    (["--set", "model.preset=huge"], "model.preset 'huge' is unknown"),
    (["--transformer-file", "x.safetensors"], "needs model.path"),
    (["--model", "/nonexistent/wan"], "/nonexistent/wan"),
    # bad choices name the allowed values
    (["--scheduler", "ddim"], "sampling.scheduler must be one of ('unipc', 'euler'), got 'ddim'"),
    (["--mode", "causal", "--policy", "lru"], "causal.policy must be one of ('full', 'window', 'topk', 'focused')"),
    (["--mode", "causal", "--set", "causal.rope=alibi"], "causal.rope must be one of ('absolute', 'rebase')"),
    (["--mode", "causal", "--set", "causal.sampler=ddim"], "causal.sampler must be one of ('reinject', 'euler')"),
    (["--set", "model.compile=jit"], "model.compile must be one of ('off', 'inductor', 'aot_eager')"),
    (["--set", "parallel.backend=mpi"], "parallel.backend must be one of ('auto', 'nccl', 'gloo')"),
    (["--mode", "causal", "--budget", "nan"], "causal.budget must be a finite number, got nan"),
]

# Every float config key, with its flag where it has one: NaN and infinities are rejected by name.
FLOAT_KEYS = {
    "sampling.flow_shift": "--flow-shift",
    "sampling.guidance": "--guidance",
    "parallel.timeout_s": None,
    "parallel.join_timeout_s": None,
    "causal.shift": None,
    "causal.budget": "--budget",
    "causal.diversity": None,
}
for _key, _flag in FLOAT_KEYS.items():
    for _yaml, _text in ((".nan", "nan"), (".inf", "inf"), ("-.inf", "-inf")):
        CASES.append((["--set", f"{_key}={_yaml}"], f"{_key} must be a finite number, got {_text}"))
        if _flag:  # --flag=-inf: a separate "-inf" would be read as an option
            CASES.append(([f"{_flag}={_text}"], f"{_key} must be a finite number, got {_text}"))


def test_every_float_key_is_checked_for_non_finite_values():
    from dualpar.config import Config

    floats = {f"{sec}.{key}" for sec, values in Config().to_dict().items()
              for key, value in values.items() if isinstance(value, float)}
    assert floats == set(FLOAT_KEYS)


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
    ("video: [\n", "not valid YAML at line 2, column 1"),
    ("video:\n\tframes: 3\n", "not valid YAML at line 2, column 1: found character '\\t'"),
    ("colour: red\n", "unknown section 'colour'"),
    ("- 1\n- 2\n", "expected a mapping"),
    ("sampling:\n  guidance: true\n", "'sampling.guidance' must be float"),
])
def test_bad_config_file(capsys, tmp_path, text, message):
    code, err = run_main(capsys, BASE + ["--config", write(tmp_path, text), "--out", str(tmp_path / "o")])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_causal_guidance_with_a_distilled_checkpoint_warns():
    from dualpar.cli import warnings_for
    from dualpar.config import Config

    def cfg(mode, guidance, transformer_file):
        c = Config()
        c.sampling.mode, c.sampling.guidance, c.model.transformer_file = mode, guidance, transformer_file
        return c

    (line,) = warnings_for(cfg("causal", 5.0, "sf.pt"))
    assert "--guidance 5" in line and "--guidance 1" in line
    assert warnings_for(cfg("causal", 1.0, "sf.pt")) == []
    assert warnings_for(cfg("causal", 5.0, "")) == [] and warnings_for(cfg("bidirectional", 5.0, "sf.pt")) == []


def test_missing_config_file(capsys, tmp_path):
    code, err = run_main(capsys, BASE + ["--config", str(tmp_path / "nope.yaml")])
    assert code == 2 and "cannot read config file" in err


def test_more_ranks_than_layers(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "9")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")  # as a launcher would
    monkeypatch.setenv("MASTER_PORT", "29500")
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


# Prompts and text: schedules are causal mode's, frame numbers plain digits, text is text.
TEXT_CASES = [
    (["--mode", "causal", "--frames", "49", "--prompt", "a | ²: b"], "expected 'FRAME: text'"),
    (["--mode", "causal", "--frames", "49", "--prompt", "a | \u0663: b"], "expected 'FRAME: text'"),
    (["--mode", "causal", "--frames", "49", "--prompt", "a | 1_0: b"], "expected 'FRAME: text'"),
    (["--prompt", "a | 13: b"], "needs --mode causal; write \\| for a literal '|'"),
    (["--prompt", "fish | chips"], "needs --mode causal"),
    (["--prompt", "nul\x00byte"], "sampling.prompt holds the control character '\\x00'"),
    (["--prompt", "undecodable \udcff byte"], "sampling.prompt is not valid UTF-8 text"),
    (["--negative-prompt", "bell\x07"], "sampling.negative_prompt holds the control character"),
    (["--mode", "causal", "--frames", "5"], "fewer than one chunk of 3; use at least 9 frames or a smaller --chunk"),
    (["--frames", "abc"], "argument --frames: invalid int value: 'abc'"),
    (["--nproc", "0"], "--nproc must be in [1, 1024]"),
]


@pytest.mark.parametrize("argv,message", TEXT_CASES, ids=[" ".join(c[0]) for c in TEXT_CASES])
def test_bad_prompt_or_text(capsys, tmp_path, argv, message):
    out = tmp_path / "out"
    try:
        code = cli.main(BASE + argv + ["--out", str(out)])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert not out.exists()


@pytest.mark.parametrize("data,message", [
    (b"video:\n  fps: \xff\xfe\n", "is not UTF-8 text (byte 14"),
    (b"\x00\x01\x02binary", "not valid YAML"),
    (b'sampling:\n  prompt: "a\\x07b"\n', "sampling.prompt holds the control character"),
])
def test_config_file_that_is_not_text(capsys, tmp_path, data, message):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(data)
    code, err = run_main(capsys, BASE + ["--config", str(path), "--out", str(tmp_path / "o")])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_prompt_schedule_escapes_and_digits():
    from dualpar.config import prompt_schedule

    assert prompt_schedule(r"salt \| pepper | 13: oil \| vinegar", 49) == [(0, "salt | pepper"), (13, "oil | vinegar")]
    assert prompt_schedule(r"salt \| pepper", 49, causal=False) == [(0, "salt | pepper")]
    assert prompt_schedule("  plain  ", 49, causal=False) == [(0, "  plain  ")]  # as given, unstripped
    assert prompt_schedule("a | 013: b", 49) == [(0, "a"), (13, "b")]


def test_causal_mode_counts_chunks_not_blocks():
    # 25 frames = 7 latent frames: fewer than a block of 8, but chunks of 3 fit
    args = cli.build_parser().parse_args(BASE + ["--mode", "causal", "--frames", "25", "--out", "/tmp/unused"])
    assert cli.validated_config(args, 1).video.latent_frames == 7


@pytest.mark.parametrize("env,message", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 but no launcher set up the ranks (MASTER_ADDR and MASTER_PORT unset): "
                          "start them with --nproc 2"),
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, "(MASTER_PORT unset)"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' in the environment is not an integer"),
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1", "RANK": "0", "--nproc": "4"},
     "--nproc 4 starts its own ranks, but a launcher already started 2"),
])
def test_several_ranks_need_a_launcher(capsys, monkeypatch, tmp_path, env, message):
    for k in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    extra = ["--nproc", env.pop("--nproc")] if "--nproc" in env else []
    code, err = run_main(capsys, BASE + extra + ["--out", str(tmp_path / "o")], env, monkeypatch)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [
    ["--frames", "1000"],
    ["--prompt", "a | b"],
    ["--set", "video.fps=0"],
    ["--config", "BINARY"],
    ["--nproc", "2", "--steps", "0"],
])
def test_bad_input_imports_nothing_heavy(root, tmp_path, argv):
    # Bad input is found before torch, diffusers or transformers are imported (seconds, not a model load).
    if "BINARY" in argv:
        (tmp_path / "bin.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xd8")
        argv = ["--config", str(tmp_path / "bin.yaml")]
    res = subprocess.run([sys.executable, "-X", "importtime", os.path.join(root, "launch", "gen.py"), *argv,
                          "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    lines = res.stderr.splitlines()
    imported = {ln.rsplit("|", 1)[-1].strip() for ln in lines if ln.startswith("import time:")}
    assert "dualpar.config" in imported  # -X importtime did report
    assert not imported & {"torch", "diffusers", "transformers"}, sorted(imported & {"torch", "diffusers"})
    errors = [ln for ln in lines if not ln.startswith("import time:")]
    assert res.returncode == 2 and len(errors) == 1 and errors[0].startswith("error: "), res.stderr[-2000:]
    assert not (tmp_path / "o").exists()


def test_ray_prompt_file_is_checked_line_by_line(capsys, tmp_path):
    from dualpar import ray_launch

    def bad(data):
        path = tmp_path / "prompts.txt"
        path.write_bytes(data)
        code = ray_launch.main(BASE + ["--world-size", "2", "--prompts", str(path), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists(), err
        return err

    assert "prompts.txt line 4: a prompt schedule ('text | FRAME: text') needs --mode causal" in bad(
        b"# comments and blank lines are skipped\n\na fox\nfish | chips\n")
    assert "line 2: not UTF-8 text" in bad(b"a fox\n\xff\xfe\n")
    assert "line 1: sampling.prompt holds the control character" in bad(b"\x00\x01\n")
    assert "no prompts in the file" in bad(b"# only a comment\n")


def test_ray_unreachable_address_fails_fast():
    import time

    from dualpar.ray_launch import reachable

    t0 = time.time()
    with pytest.raises(ConnectionError, match="nothing answers at 127.0.0.1:1"):
        reachable("127.0.0.1:1")
    assert time.time() - t0 < 30
    reachable("auto")  # left to Ray
