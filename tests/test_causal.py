"""Causal mode through ``launch/gen.py``: KV-cached generation equals a cache-free recompute,
Focused Forcing with a full budget equals the full cache, N ranks equal 1 rank."""

import json

import av
import pytest
import torch
from safetensors.torch import load_file

from conftest import gen
from dualpar.config import Config, apply_model_defaults
from dualpar.models import loader
from dualpar.reference import causal_reference
from test_parallel import launch as run_gen

# 13 latent frames in chunks of 3: chunks of 4, 3, 3, 3 latent frames.
BASE = ["--mode", "causal", "--frames", "49", "--height", "32", "--width", "48", "--set", "model.text_len=32",
        "--seed", "5", "--no-progress"]


def launch(root, n, out, extra=(), decode=False, expect=0):
    return run_gen(root, n, out, extra, decode, base=BASE, expect=expect)


def chunks(out):
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "complete", man
    return [load_file(out / b["latents"])["latents"] for b in man["blocks"]]


def stats(out):
    return json.loads((out / "stats.json").read_text())


@pytest.mark.parametrize("schedule,guidance,sampler", [("sequential", 5.0, "reinject"), ("sequential", 1.0, "euler"),
                                                       ("staggered", 5.0, "reinject")])
def test_full_cache_equals_block_causal_recompute(root, tmp_path, schedule, guidance, sampler):
    """The full policy == diffusers' model re-run every iteration over the whole video so far
    (clean chunks and the chunks in flight) with a block-causal mask and per-token timesteps
    (no cache anywhere)."""
    # on the random preset: the cache-free recompute sums in another order, and the trained weights'
    # larger activations take that rounding past 1e-5 (1.5e-5 measured)
    extra = ["--set", f"causal.schedule={schedule}", "--policy", "full", "--guidance", str(guidance),
             "--set", f"causal.sampler={sampler}", "--preset", "tiny-random"]
    launch(root, 1, tmp_path / "run", extra)
    got = chunks(tmp_path / "run")
    cfg = Config()
    cfg.model.preset = "tiny-random"
    for key, val in {"video.frames": 49, "video.height": 32, "video.width": 48, "model.text_len": 32,
                     "sampling.seed": 5, "sampling.mode": "causal", "sampling.guidance": guidance,
                     "causal.sampler": sampler, "causal.schedule": schedule}.items():
        cfg.set(key, val)
    tok, enc = loader.load_text_encoder(cfg)
    prompts = [cfg.sampling.prompt, cfg.sampling.negative_prompt] if guidance > 1 else [cfg.sampling.prompt]
    states = loader.encode_prompts(tok, enc, prompts, 32)
    ref = causal_reference(cfg, loader.load_transformer(cfg), states)
    assert [r.shape[2] for r in ref] == [x.shape[2] for x in got] == [4, 3, 3, 3]
    for r, x in zip(ref, got):
        assert (r - x).abs().max().item() <= 1e-5
    # the history matters: a chunk differs from what it would be alone
    assert (ref[1] - causal_reference_alone(cfg, states, 1)).abs().max().item() > 1e-3


def causal_reference_alone(cfg, states, chunk):
    """Chunk ``chunk`` generated with the history cut off: the reference run on a 1-chunk video."""
    from dualpar.causal import chunk_noise, sigmas

    h, w = cfg.video.height // 8, cfg.video.width // 8
    model = loader.load_transformer(cfg)
    x = chunk_noise(cfg.sampling.seed, chunk, 0, (1, 16, 3, h, w))
    sig = sigmas(cfg)
    for s, sigma in enumerate(sig):
        out = model(x.expand(states.shape[0], -1, -1, -1, -1), torch.full((states.shape[0],), sigma * 1000.0),
                    states, return_dict=False)[0].float()
        v = out[1:] + cfg.sampling.guidance * (out[:1] - out[1:]) if states.shape[0] == 2 else out
        x0 = x - sigma * v
        if s + 1 < len(sig):
            x = x + (sig[s + 1] - sigma) * v if cfg.causal.sampler == "euler" else \
                (1 - sig[s + 1]) * x0 + sig[s + 1] * chunk_noise(cfg.sampling.seed, chunk, s + 1, x.shape)
    return x0


def test_focused_forcing_with_a_full_budget_is_the_full_cache(root, tmp_path):
    full = ["--policy", "full"]
    launch(root, 1, tmp_path / "full", full)
    launch(root, 1, tmp_path / "ff", ["--policy", "focused", "--budget", "13"])
    launch(root, 1, tmp_path / "ff4", ["--policy", "focused", "--budget", "4", "--set", "causal.sink=1"])
    a, b, c = chunks(tmp_path / "full"), chunks(tmp_path / "ff"), chunks(tmp_path / "ff4")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # a real budget selects: the last chunks differ from the full cache, and the cache is smaller
    assert (a[-1] - c[-1]).abs().max().item() > 1e-4
    assert stats(tmp_path / "ff4")["ranks"][0]["kv_cache_mb"] < stats(tmp_path / "full")["ranks"][0]["kv_cache_mb"]


@pytest.mark.parametrize("schedule,policy,ranks", [("staggered", "focused", (2, 3)), ("sequential", "window", (2,)),
                                                    ("staggered", "topk", (2,))])
def test_n_ranks_equal_one_rank(root, tmp_path, schedule, policy, ranks):
    extra = ["--set", f"causal.schedule={schedule}", "--policy", policy, "--budget", "4", "--set", "causal.sink=1"]
    launch(root, 1, tmp_path / "n1", extra)
    one = chunks(tmp_path / "n1")
    for n in ranks:
        launch(root, n, tmp_path / f"n{n}", extra)
        many = chunks(tmp_path / f"n{n}")
        assert len(many) == len(one) == 4
        for x, y in zip(one, many):
            assert (x - y).abs().max().item() <= 1e-5
        # each rank holds the caches of its own layers only
        per_rank = [r["kv_cache_mb"] for r in stats(tmp_path / f"n{n}")["ranks"]]
        assert sum(per_rank) == pytest.approx(stats(tmp_path / "n1")["ranks"][0]["kv_cache_mb"])
        assert all(0 < mb < sum(per_rank) for mb in per_rank)


def test_staggered_sees_unfinished_predecessors(root, tmp_path):
    """The two schedules are different computations (the staggered one attends to in-flight K/V)."""
    launch(root, 1, tmp_path / "seq", ["--set", "causal.schedule=sequential"])
    launch(root, 1, tmp_path / "stag", ["--set", "causal.schedule=staggered"])
    a, b = chunks(tmp_path / "seq"), chunks(tmp_path / "stag")
    assert (a[0] - b[0]).abs().max().item() <= 1e-5  # the first chunk has no predecessor
    assert (a[1] - b[1]).abs().max().item() > 1e-4


def test_window_cache_memory_does_not_grow_with_length(root, tmp_path):
    mbs = {}
    for frames in ("49", "97"):
        for policy in ("window", "full"):
            launch(root, 1, tmp_path / f"{policy}{frames}",
                   ["--frames", frames, "--policy", policy, "--budget", "4", "--set", "causal.sink=1"])
            mbs[policy, frames] = stats(tmp_path / f"{policy}{frames}")["ranks"][0]["kv_cache_mb"]
    assert mbs["window", "49"] == mbs["window", "97"] > 0
    assert mbs["full", "97"] > 1.8 * mbs["full", "49"]


def test_prompt_schedule_switches_at_the_chunk_that_starts_there(root, tmp_path):
    # chunk starts in output frames: 0, 13, 25, 37; the switch at frame 25 starts with chunk 2
    launch(root, 1, tmp_path / "one", ["--prompt", "a quiet lake at dawn"])
    launch(root, 1, tmp_path / "two", ["--prompt", "a quiet lake at dawn | 25: a storm over the sea"])
    a, b = chunks(tmp_path / "one"), chunks(tmp_path / "two")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert (a[2] - b[2]).abs().max().item() > 1e-4


def test_causal_video_is_streamed(root, tmp_path):
    launch(root, 2, tmp_path / "v", ["--policy", "window", "--budget", "4"], decode=True)
    man = json.loads((tmp_path / "v" / "manifest.json").read_text())
    assert man["status"] == "complete" and man["frames_written"] == 49 and man["blocks_written"] == 4
    with av.open(str(tmp_path / "v" / "video.mp4")) as c:
        assert sum(1 for _ in c.decode(video=0)) == 49


@pytest.mark.parametrize("args,message", [
    (["--policy", "lru"], "causal.policy must be one of"),
    (["--budget", "2.5"], "causal.budget"),
    (["--set", "causal.timesteps=250,500"], "decreasing"),
    (["--chunk", "0"], "causal.chunk"),
    (["--policy", "window", "--budget", "3"], "must exceed causal.sink"),
])
def test_bad_causal_options_fail_before_loading(root, tmp_path, args, message):
    res = launch(root, 1, tmp_path / "bad", args, expect=2)
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_prompt_schedule_needs_causal_mode(root, tmp_path):
    res = gen(1, ["--prompt", "a | 13: b", "--frames", "49", "--out", str(tmp_path / "x")], expect=None)
    assert res.returncode == 2 and "needs --mode causal" in res.stderr


def test_causal_runs_are_not_resumable(root, tmp_path):
    launch(root, 1, tmp_path / "r")
    man = tmp_path / "r" / "manifest.json"
    data = json.loads(man.read_text())
    data["status"] = "incomplete"
    man.write_text(json.dumps(data))
    res = gen(1, ["--resume", str(tmp_path / "r")], expect=None)
    assert res.returncode == 2 and "cannot be resumed" in res.stderr


def causal_cfg(**overrides):
    cfg = apply_model_defaults(Config())
    for key, val in {"video.frames": 49, "video.height": 32, "video.width": 48, "model.text_len": 32,
                     "sampling.mode": "causal", "sampling.guidance": 1.0, "output.progress": False,
                     **overrides}.items():
        cfg.set(key, val)
    cfg.validate()
    return cfg


def run_in_process(cfg, table=None):
    from dualpar.causal import CausalEngine
    from dualpar.comm import Comm

    engine = CausalEngine(cfg, Comm.from_env(device="cpu"))
    if table is not None:
        engine.stage.model.table = table
    engine.set_prompt(cfg.sampling.prompt, cfg.sampling.negative_prompt)
    return engine.generate(keep_latents=True).blocks


def test_rebased_rope_positions_keep_relative_distances():
    """RoPE attention depends on position differences only: re-basing every attended frame by
    the same shift (a 9-position table here, instead of 1024) changes nothing while a window
    without sinks keeps everything attended inside the table (sequential schedule: no
    in-flight predecessors reach further back)."""
    from dualpar.models.causal_wan import CausalWan

    cw = CausalWan.__new__(CausalWan)
    cw.rope, cw.table = "rebase", 1024
    assert cw.positions([0, 1, 2, 1100, 1101, 1102], 1103) == [0, 0, 0, 1021, 1022, 1023]
    assert cw.positions([5, 6], 100) == [5, 6]
    window = {"causal.policy": "window", "causal.budget": 5.0, "causal.sink": 0, "causal.schedule": "sequential"}
    absolute = run_in_process(causal_cfg(**window))
    rebased = run_in_process(causal_cfg(**window, **{"causal.rope": "rebase"}), table=9)
    assert len(absolute) == 4
    for a, b in zip(absolute, rebased):
        assert (a - b).abs().max().item() <= 1e-4
    # with a pinned sink frame the distances do change once the video passes the table
    sink = dict(window, **{"causal.sink": 1})
    a = run_in_process(causal_cfg(**sink))
    b = run_in_process(causal_cfg(**sink, **{"causal.rope": "rebase"}), table=9)
    assert (a[-1] - b[-1]).abs().max().item() > 1e-3


@pytest.fixture(scope="module")
def calibrated_dir(root, tmp_path_factory):
    """A model folder (the tiny-random weights) with a head-importance table that favours head 0 in
    every layer: far from what the attention shares would give."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("calibrated") / "model"
    res = subprocess.run([sys.executable, f"{root}/scripts/make_tiny_checkpoint.py", str(out)], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    (out / "head_importance.json").write_text(json.dumps({"importance": [[1.0, 0.0, 0.0, 0.0]] * 8}))
    return out


def test_calibrated_head_budgets_on_ranks_equal_one_rank_and_change_the_result(root, tmp_path, calibrated_dir):
    focused = ["--model", str(calibrated_dir), "--policy", "focused", "--budget", "3"]
    calibrated = focused + ["--set", "causal.head_budget=calibrated"]
    launch(root, 1, tmp_path / "one", calibrated)
    launch(root, 2, tmp_path / "two", calibrated)
    launch(root, 1, tmp_path / "attention", focused)
    one, two, attention = chunks(tmp_path / "one"), chunks(tmp_path / "two"), chunks(tmp_path / "attention")
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    assert max((a - b).abs().max().item() for a, b in zip(one, attention)) > 1e-4  # the table is what decides


def test_calibration_writes_a_table_the_engine_reads_and_a_missing_one_is_refused(root, tmp_path, calibrated_dir):
    import shutil
    import subprocess
    import sys

    model = tmp_path / "model"
    shutil.copytree(calibrated_dir, model)
    (model / "head_importance.json").unlink()
    res = launch(root, 1, tmp_path / "run", ["--model", str(model), "--policy", "focused", "--budget", "3",
                                             "--set", "causal.head_budget=calibrated"], expect=2)
    assert res.stderr.count("error: ") == 1 and "no " in res.stderr and "calibrate_heads.py" in res.stderr
    assert not (tmp_path / "run").exists()
    res = subprocess.run([sys.executable, f"{root}/scripts/calibrate_heads.py", "--model", str(model), "--frames", "21",
                          "--height", "32", "--width", "32", "--threads", "1", "--no-progress"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    table = json.loads((model / "head_importance.json").read_text())["importance"]
    assert len(table) == 8 and all(len(r) == 4 and all(v >= 0 for v in r) for r in table)
    assert max(max(r) for r in table) > 0  # hiding some head's history moves the video
    cfg = apply_model_defaults(Config())
    for key, val in {"model.path": str(model), "sampling.mode": "causal", "causal.policy": "focused",
                     "causal.head_budget": "calibrated"}.items():
        cfg.set(key, val)
    assert loader.head_importance(cfg) == table
