"""The command line around the engine: --help and the README's table, --nproc, the progress bar and log lines."""

import os
import re
from types import SimpleNamespace

import pytest
import torch

from conftest import gen
from dualpar import cli
from test_parallel import ARGS, read_blocks


def test_help_shows_defaults_and_choices():
    text = " ".join(cli.build_parser().format_help().split())  # argparse wraps lines
    for flag, shown in [("--dtype", "{float32,bfloat16,float16}"), ("--scheduler", "{unipc,euler}"),
                        ("--mode", "{bidirectional,causal}"), ("--policy", "{full,window,topk,focused}")]:
        assert f"{flag} {shown}" in text, flag
    for fragment in ["[video.frames; default 1025]", "[sampling.scheduler; default unipc]",
                     "[parallel.num_cat; default 4]", "[causal.budget; default 0.25]", "--nproc N"]:
        assert fragment in text, fragment


def test_readme_option_table_matches_help(root):
    readme = open(os.path.join(root, "README.md"), encoding="utf-8").read()
    table = readme.split("| flag | config key | default | meaning |", 1)[1].split("\n\n", 1)[0]
    in_readme = {f for row in table.splitlines()[2:] for f in re.findall(r"--[a-z][a-z-]*", row.split("|")[1])}
    parser = cli.build_parser()
    in_help = {o for a in parser._actions for o in a.option_strings if o.startswith("--")} - {"--help"}
    assert in_readme == in_help, (sorted(in_readme - in_help), sorted(in_help - in_readme))


def run(out, extra=(), launcher="real", timeout=300):
    """``python launch/gen.py`` itself by default: ``--nproc`` starts the ranks from that process."""
    return gen(1, [*ARGS, "--no-decode", *extra, "--out", str(out)], launcher=launcher, expect=None, timeout=timeout)


def test_nproc_starts_the_ranks_itself(root, tmp_path):
    res = run(tmp_path / "two", ["--nproc", "2"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[rank 1] layers [4, 8)" in res.stderr  # two ranks ran, split the layers
    res = run(tmp_path / "one", launcher="fork")
    assert res.returncode == 0, res.stderr[-3000:]
    (_, two), (_, one) = read_blocks(tmp_path / "two"), read_blocks(tmp_path / "one")
    assert len(two) == len(one) == 5 and all(torch.equal(a, b) for a, b in zip(two, one))


def test_nproc_with_a_bad_value_is_one_line(root, tmp_path):
    res = run(tmp_path / "bad", ["--nproc", "2", "--num-cat", "9"], timeout=120)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "error: parallel.num_cat must be in [0, block=4], got 9"], res.stderr
    assert not (tmp_path / "bad").exists()
    # More ranks than layers: found in the parent before any rank starts.
    res = run(tmp_path / "bad", ["--nproc", "9"], timeout=120)
    assert res.returncode == 2 and res.stderr.strip().splitlines() == [
        "error: 9 ranks but the model has only 8 DiT layers; use at most 8 ranks"], res.stderr


def plan(mode="bidirectional"):
    cfg = SimpleNamespace(sampling=SimpleNamespace(mode=mode), video=SimpleNamespace(frames=89))
    return SimpleNamespace(cfg=cfg, tasks=[None] * 20, blocks=[None] * 5, num_iterations=9)


def test_resumed_bar_starts_where_the_run_picks_up(capsys):
    from dualpar.progress import Progress

    p = Progress(plan())
    p.resume_from(12, 3, 41)
    p.task_done(SimpleNamespace(iteration=6))
    bar = p.bar.format_dict
    # this run did one task of the 8 left: the rate counts that one, not the 12 done before
    assert (bar["n"], bar["initial"], bar["total"]) == (13, 12, 20)
    p.block_done(3, 12)
    assert "blocks 4/5 frames 53/89" in str(p.bar)
    p.close()
    causal = Progress(plan("causal"))
    causal.task_done(SimpleNamespace(iteration=0))
    assert causal.bar.format_dict["initial"] == 0 and "chunks 0/5" in str(causal.bar)
    causal.close()


def test_log_lines_are_not_glued_to_the_bar(capsys):
    from dualpar.progress import Progress
    from dualpar.ring import log

    p = Progress(plan())
    p.task_done(SimpleNamespace(iteration=0))
    log(0, "a message while the bar is shown")
    p.close()
    err = capsys.readouterr().err
    # tqdm redraws its bar after "\r"; the message must be a whole line of its own
    assert "[rank 0] a message while the bar is shown" in re.split(r"[\r\n]", err), err


def test_resumed_run_says_what_it_made(root, tmp_path):
    import signal

    from test_failures import manifest, run, start_run, wait_for

    out = tmp_path / "run"
    p = start_run(1, out)
    wait_for(lambda: (manifest(out) or {}).get("blocks_written", 0) >= 2, 300, "two blocks")
    p.send_signal(signal.SIGTERM)  # stops at the next iteration boundary, with a checkpoint
    p.communicate(timeout=120)
    before = manifest(out)["frames_written"]
    res = run(1, ["--resume", str(out)], timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert 0 < before < 161 and f"{before} frames already written" in res.stderr, res.stderr[-3000:]
    assert f"done: {161 - before} frames of 161 (the rest before the resume) in " in res.stderr, res.stderr[-3000:]


def test_ray_driver_bar_counts_frames_over_the_batch(tmp_path, capsys):
    import json

    from dualpar.progress import BatchProgress

    outs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    outs[2].mkdir()  # an earlier run of the batch finished this one: done from the start
    (outs[2] / "manifest.json").write_text(json.dumps({"frames_written": 9}))
    bar = BatchProgress([str(o) for o in outs], [89, 89, 9])
    bar.poll({"complete": 1}, {0, 1})  # nothing else written yet: no manifest
    assert bar.bar.n == bar.bar.initial == 9 and bar.bar.total == 187
    outs[0].mkdir()
    (outs[0] / "manifest.json").write_text(json.dumps({"frames_written": 89}))
    outs[1].mkdir()
    (outs[1] / "manifest.json").write_text(json.dumps({"frames_written": 21}))
    bar.poll({"complete": 2, "running": 1, "failed": 0}, {1})  # video 0 just finished: read once more
    assert bar.bar.n == 119 and "2 done, 1 running, 0 failed" in str(bar.bar)
    (outs[0] / "manifest.json").write_text(json.dumps({"frames_written": 50}))  # not running: not read again
    (outs[1] / "manifest.json").write_text(json.dumps({"frames_written": 30}))
    bar.poll({"complete": 2, "running": 1, "failed": 0}, {1})
    assert bar.bar.n == 89 + 30 + 9
    bar.close()


def test_a_rank_whose_peers_never_start_stops_in_join_timeout(tmp_path):
    """Rank 0 of 2 started by hand, rank 1 never: one clear line once parallel.join_timeout_s is up."""
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    t0 = time.time()
    res = gen(1, [*ARGS, "--no-decode", "--set", "parallel.join_timeout_s=3", "--out", str(tmp_path / "o")],
              launcher="real", expect=None, timeout=120, env=env)
    assert res.returncode != 0 and time.time() - t0 < 60
    assert "not all 2 ranks joined at 127.0.0.1:" in res.stderr and "--nproc 2" in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr


def test_a_model_folders_own_defaults_sit_under_what_the_user_gives(tmp_path):
    """dualpar_defaults.json of a model folder (the trained preset's: guidance 2, no negative prompt)
    replaces the built-in defaults, never a value from the command line or the config file."""
    import shutil

    from dualpar.cli import build_parser, config_from_args
    from dualpar.config import DEFAULT_NEGATIVE_PROMPT, PRESET_DIRS, ConfigError

    def cfg(*argv):
        return config_from_args(build_parser().parse_args(list(argv)))

    assert (cfg().sampling.guidance, cfg().sampling.negative_prompt) == (2.0, "")  # the trained preset
    assert cfg("--guidance", "5").sampling.guidance == 5.0
    conf = tmp_path / "c.yaml"
    conf.write_text("sampling:\n  negative_prompt: blurry\n")
    assert cfg("--config", str(conf)).sampling.negative_prompt == "blurry"
    random = cfg("--preset", "tiny-random").sampling
    assert (random.guidance, random.negative_prompt) == (5.0, DEFAULT_NEGATIVE_PROMPT)
    folder = tmp_path / "model"
    shutil.copytree(PRESET_DIRS["tiny"], folder)
    (folder / "dualpar_defaults.json").write_text('{"sampling": {"steps": 7}}')
    assert cfg("--model", str(folder)).sampling.steps == 7
    (folder / "dualpar_defaults.json").write_text('{"sampling": {"stepz": 7}}')
    with pytest.raises(ConfigError, match="unknown key 'sampling.stepz'"):
        cfg("--model", str(folder))
