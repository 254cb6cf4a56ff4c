"""A batch's prompts file, its videos' configs and directories, what a rerun finds there, batch.json
(issue 15; no Ray needed: the driver's end-to-end runs are in test_ray.py)."""

import json
import os

import pytest

from dualpar import batch, ray_launch
from dualpar.config import Config, ConfigError

BASE = ["--no-progress", "--no-decode", "--frames", "89", "--height", "32", "--width", "48", "--block", "4",
        "--steps", "4"]


def base_config(root):
    cfg = Config()
    cfg.set("video.frames", 89)
    cfg.output.out = str(root)
    return cfg


def test_plain_and_json_lines_give_each_video_its_config_and_directory(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join([
        "# a comment, then a blank line",
        "",
        "a red circle moving right on a dark blue background",
        json.dumps({"prompt": "a yellow square", "seed": 7, "frames": 45, "out": "square"}),
        json.dumps({"prompt": "a green triangle", "sampling.guidance": 3, "negative_prompt": "blur",
                    "out": str(tmp_path / "elsewhere" / "tri")}),
    ]) + "\n")
    root = tmp_path / "batch"
    videos = batch.read_prompts(str(path), base_config(root), 2, str(root))
    assert [v.line for v in videos] == [3, 4, 5] and [v.index for v in videos] == [0, 1, 2]
    a, b, c = (v.cfg for v in videos)
    assert a.sampling.prompt.startswith("a red circle") and a.video.frames == 89 and a.sampling.seed == Config().sampling.seed
    assert a.output.out == str(root / "prompt-000")
    assert (b.sampling.prompt, b.sampling.seed, b.video.frames, b.output.out) == ("a yellow square", 7, 45,
                                                                                 str(root / "square"))
    assert c.sampling.guidance == 3.0 and c.sampling.negative_prompt == "blur"
    assert c.output.out == str(tmp_path / "elsewhere" / "tri")
    # one engine serves videos that differ in prompt, seed, negative prompt and directory only
    assert batch.job_key(a) != batch.job_key(b) and batch.job_key(a) != batch.job_key(c)
    same = Config.from_dict(a.to_dict())
    same.sampling.prompt, same.sampling.seed, same.output.out = "x", 99, "/elsewhere"
    assert batch.job_key(same) == batch.job_key(a)


@pytest.mark.parametrize("line,message", [
    ('{"prompt": "a fox", "seed": 3', "not valid JSON"),
    ('{"prompt": "a fox", "colour": "red"}', "unknown key 'colour'"),
    ('{"prompt": "a fox", "frames": 90}', "--frames 90 is not of the form 4k+1"),
    ('{"prompt": "a fox", "seed": "three"}', "key 'seed': 'sampling.seed' must be int"),
    ('{"prompt": "a fox", "sampling.stepz": 3}', "key 'sampling.stepz': unknown key 'sampling.stepz'"),
    ('{"seed": 3}', "no \"prompt\" key"),
    ('{"prompt": "a fox", "out": "one"}', "is also line 1's; every video needs its own"),
    ('{"prompt": "a fox", "out": "."}', "out '.' is the batch's own directory"),
    ('{"prompt": "a fox", "output.progress": true}', "'output.progress' cannot be set per video"),
    ('{"prompt": "a fox | 9: a hen"}', "a prompt schedule ('text | FRAME: text') needs --mode causal"),
])
def test_a_bad_line_stops_the_batch_before_anything_starts(capsys, tmp_path, line, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "a cat", "out": "one"}) + "\n# fine so far\n" + line + "\n")
    out = tmp_path / "o"
    code = ray_launch.main(BASE + ["--world-size", "1", "--prompts", str(path), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: --prompts {path} line 3: ") and message in err, err
    assert not out.exists()  # nothing started, nothing written


def run_dir(out, cfg, status, **extra):
    os.makedirs(out, exist_ok=True)
    man = {"status": status, "config": cfg.to_dict(), "created_at": "2026-12-02T00:00:00", "frames_written": 9,
           **extra}
    (out / "manifest.json").write_text(json.dumps(man))


def test_a_rerun_skips_complete_videos_resumes_or_restarts_the_rest(tmp_path):
    root = tmp_path / "batch"
    path = tmp_path / "p.txt"
    path.write_text("one\ntwo\nthree\nfour\n")
    videos = batch.read_prompts(str(path), base_config(root), 1, str(root))
    run_dir(root / "prompt-000", videos[0].cfg, "complete")
    run_dir(root / "prompt-001", videos[1].cfg, "incomplete")  # stopped before its first checkpoint
    assert [batch.existing(v) for v in videos] == ["complete", "restart", "new", "new"]
    assert batch.existing(videos[0], overwrite=True) == "restart"
    # a directory holding a video of other settings (another prompt) is never taken over
    run_dir(root / "prompt-002", videos[0].cfg, "complete")
    with pytest.raises(ConfigError, match="line 3: .* holds a video of other settings .*sampling.prompt"):
        batch.existing(videos[2])
    (root / "prompt-003").mkdir(parents=True)
    (root / "prompt-003" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"line 4: .* holds files that are not a run's \(notes.txt\)"):
        batch.existing(videos[3])
    assert (root / "prompt-003" / "notes.txt").read_text() == "mine"


def test_the_driver_refuses_a_batch_root_that_holds_a_single_run(capsys, tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("one\n")
    run_dir(tmp_path / "o", Config(), "complete")
    code = ray_launch.main(BASE + ["--world-size", "1", "--prompts", str(path), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "holds a single video's run; a batch needs a directory of its own" in err, err
    for bad, message in ((["--replicas", "0"], "--replicas must be"), (["--replicas", "many"], "--replicas must be"),
                         (["--attempts", "0"], "--attempts must be in [1, 100]")):
        code = ray_launch.main(BASE + ["--world-size", "1", "--prompts", str(path), "--out", str(tmp_path / "n"), *bad])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_batch_json_keeps_an_earlier_runs_figures_for_its_complete_videos(tmp_path):
    root = tmp_path / "batch"
    path = tmp_path / "p.txt"
    path.write_text("one\ntwo\n")
    videos = batch.read_prompts(str(path), base_config(root), 1, str(root))
    rec = batch.Record(str(root), videos)
    rec.update(0, status="complete", pipeline=1, attempts=2, wall_s=12.5, frames_written=89)
    rec.update(1, status="failed", pipeline=0, attempts=3, reason="rank 0's actor died")
    saved = json.loads((root / "batch.json").read_text())
    assert saved["counts"] == {"complete": 1, "running": 0, "failed": 1, "pending": 0}
    assert [e["status"] for e in saved["videos"]] == ["complete", "failed"]
    table = rec.table().splitlines()
    assert len(table) == 3 and "failed (rank 0's actor died)" in table[2] and "89/89" in table[1]
    again = batch.Record(str(root), videos)  # the next run of the same batch
    assert [e["status"] for e in again.entries] == ["pending", "pending"]  # what to do is the new run's decision
    again.skipped(0, 89)  # its manifest says complete
    again.skipped(1, 89)  # ... and so does this one's now, made by someone else: no figures of ours
    assert (again.entries[0]["pipeline"], again.entries[0]["attempts"], again.entries[0]["wall_s"]) == (1, 2, 12.5)
    assert (again.entries[1]["pipeline"], again.entries[1]["attempts"], again.entries[1]["status"]) == (None, 0,
                                                                                                      "complete")


def test_the_kuberay_example_runs_a_command_line_the_driver_takes(root):
    """configs/kuberay-rayjob.yaml's entrypoint parses as ray_job.py options, with its config file."""
    import shlex

    import yaml

    docs = list(yaml.safe_load_all(open(os.path.join(root, "configs", "kuberay-rayjob.yaml"))))
    job = next(d for d in docs if d["kind"] == "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "/app/launch/ray_job.py"]
    args = ray_launch.parse(argv[2:])
    assert (args.world_size, args.replicas, args.attempts) == (8, "auto", 3) and args.prompts.endswith(".jsonl")
    assert os.path.isfile(os.path.join(root, args.config.removeprefix("/app/")))
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert workers["resources"]["limits"]["nvidia.com/gpu"] == str(args.world_size)  # one pipeline per pod


def test_prompt_cache_keeps_the_recent_texts_only():
    """Rank 0's prompt cache stays bounded over a long batch: the least recently used text goes first,
    never one just asked for, and what it hands out equals a fresh encoding."""
    import torch

    from dualpar.config import Config
    from dualpar.models import loader

    cfg = Config()
    cache = loader.PromptCache(cfg, "cpu")
    cache.KEEP = 2
    a, b, c = "a red circle", "a blue square", "a green triangle"
    first = cache.states([a])
    cache.states([b])
    cache.states([a])  # a is now the most recent: b goes when c comes
    cache.states([c])
    assert cache.loads == 3 and list(cache._states) == [a, c]
    cache.states([a, b, c])  # more than KEEP at once: all three kept for this call
    assert cache.loads == 4 and set(cache._states) == {a, b, c}
    tok, enc = loader.load_text_encoder(cfg)
    fresh = loader.encode_prompts(tok, enc, [a], cfg.model.tokens)
    assert torch.equal(first, fresh) and torch.equal(cache.states([a]), fresh)
