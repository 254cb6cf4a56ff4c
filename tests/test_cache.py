"""Timestep feature caching (the ``cache`` section): the forecasters against closed forms, the step
plan, N ranks == the serial reference with forecasting on (both levels), forecast tasks leaving the
ring, caches bounded by the queue, an exact resume, and clear refusals."""

import json

import pytest
import torch

from conftest import gen
from dualpar.comm import Comm
from dualpar.config import Config, ConfigError, apply_model_defaults
from dualpar.engine import DenoiseState, Engine
from dualpar.forecast import Forecaster
from dualpar.models import loader
from dualpar.reference import serial_reference
from dualpar.schedule import full_steps
from test_parallel import read_blocks

# 23 latent frames in blocks of 4 (7, 4, 4, 4, 4); 8 steps: warm-up 1, then every 2nd (or 3rd) computed
SIZE = {"video.frames": 89, "video.height": 32, "video.width": 48, "parallel.block": 4, "parallel.num_cat": 2,
        "sampling.steps": 8, "model.text_len": 32, "sampling.seed": 11, "cache.warmup": 1}


def config(preset="tiny", **cache) -> Config:
    cfg = Config()
    cfg.model.preset = preset
    apply_model_defaults(cfg)  # the trained preset: guidance 2; the random one: Wan's 5 (both: two CFG rows)
    for k, v in {**SIZE, **{f"cache.{k}": v for k, v in cache.items()}}.items():
        cfg.set(k, v)
    cfg.validate()
    return cfg


def args(cfg: Config) -> list[str]:
    keys = list(SIZE) + [f"cache.{k}" for k in ("policy", "level", "order", "interval", "neighbour")]
    out = ["--preset", cfg.model.preset, "--no-progress", "--no-decode"]
    for k in keys:
        section, name = k.split(".")
        out += ["--set", f"{k}={getattr(getattr(cfg, section), name)}"]
    return out


def reference(cfg: Config) -> list[torch.Tensor]:
    model = loader.load_slice(cfg, 0, loader.num_layers(cfg), torch.device("cpu"))
    tok, te = loader.load_text_encoder(cfg)
    prompts = [cfg.sampling.prompt, cfg.sampling.negative_prompt][: 2 if cfg.sampling.guidance > 1 else 1]
    return serial_reference(cfg, model, model.text_context(loader.encode_prompts(tok, te, prompts, 32)))


def one_rank(cfg: Config, **kw):
    eng = Engine(cfg, Comm())
    eng.set_prompt(cfg.sampling.prompt, cfg.sampling.negative_prompt)
    return eng, eng.generate(keep_latents=True, **kw)


def max_diff(a, b) -> float:
    assert len(a) == len(b)
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# -- the arithmetic ------------------------------------------------------------------------------


def test_the_step_plan():
    assert full_steps(10, 2, 3, 1) == [True, True, True, False, False, True, False, False, True, True]
    assert full_steps(8, 1, 2, 1) == [True, True, False, True, False, True, False, True]
    assert all(full_steps(6, 1, 1, 1))  # interval 1: nothing forecast
    cfg = Config()
    assert all(cfg.cache.full_steps(10))  # policy none computes every step whatever the plan
    cfg.cache.policy = "reuse"
    assert cfg.cache.full_steps(10) == [True, True, True, False, True, False, True, False, True, True]


def test_forecasters_against_closed_forms():
    x = torch.linspace(-1, 1, 5)

    def at(f, step, sigma):
        return f.predict(0, step, sigma)

    reuse = Forecaster("reuse")
    reuse.record(0, 0, 1.0, x)
    reuse.record(0, 2, 0.8, 2 * x)
    assert torch.equal(at(reuse, 3, 0.7), 2 * x)

    # TaylorSeer, order 1: exact on features linear in the step index
    t1 = Forecaster("taylor", 1)
    for s in (0, 2, 4):
        t1.record(0, s, 0.0, 3 * s + x)
    assert torch.allclose(at(t1, 5, 0.0), 15 + x)
    # order 2 follows its recursion: from f(s) = s^2 at 0, 1, 2 it estimates f' = 3, f'' = 2 at s = 2,
    # so f(3) ~ 4 + 3 + 2/2 = 8 (the true 9 is not what a backward-difference Taylor series gives)
    t2 = Forecaster("taylor", 2)
    for s in (0, 1, 2):
        t2.record(0, s, 0.0, torch.full((3,), float(s * s)))
    assert torch.allclose(at(t2, 3, 0.0), torch.full((3,), 8.0))
    # with one computed step it can only repeat it
    t3 = Forecaster("taylor", 2)
    t3.record(0, 0, 0.0, x)
    assert torch.allclose(at(t3, 1, 0.0), x)

    # Newton: the polynomial through the last order+1 points in the noise level, at uneven spacing
    def g(s):
        return 3 - 2 * s + 5 * s * s + x

    n2 = Forecaster("newton", 2)
    for step, s in ((0, 1.0), (1, 0.93), (3, 0.71), (5, 0.42)):
        n2.record(0, step, s, g(s))
    assert torch.allclose(at(n2, 6, 0.25), g(0.25), atol=1e-5)
    n1 = Forecaster("newton", 1)
    n1.record(0, 0, 1.0, g(1.0))
    n1.record(0, 1, 0.8, g(0.8))
    lin = g(0.8) + (g(0.8) - g(1.0)) / (0.8 - 1.0) * (0.6 - 0.8)
    assert torch.allclose(at(n1, 2, 0.6), lin, atol=1e-5)


def test_a_forecaster_holds_only_what_it_needs_and_forgets_a_block():
    f = Forecaster("newton", 2)
    buf = torch.ones(4)
    for s in range(6):
        buf.fill_(float(s))  # one reused buffer, as the ring's receive buffers are
        f.record(7, s, 1 - s / 10, buf)
    assert f.nbytes() == 3 * 4 * 4  # the last 3 values, float32, copied
    assert f.predict(7, 6, 0.4).tolist() == pytest.approx([6.0] * 4)
    state = f.state()
    g = Forecaster("newton", 2)
    g.load(state)
    assert torch.equal(g.predict(7, 6, 0.4), f.predict(7, 6, 0.4))
    f.drop(7)
    assert len(f) == 0 and f.nbytes() == 0
    with pytest.raises(RuntimeError, match="no computed step of block 7"):
        f.predict(7, 6, 0.4)


def test_bad_cache_settings_are_refused():
    for key, value, msg in [("cache.order", 3, "cache.order must be 1 or 2"),
                            ("cache.interval", 0, "cache.interval must be in"),
                            ("cache.warmup", 0, "cache.warmup must be >= 1"),
                            ("cache.last", 0, "cache.last must be in")]:
        cfg = Config()
        cfg.cache.policy = "taylor"
        cfg.set(key, value)
        with pytest.raises(ConfigError, match=msg):
            cfg.validate()
    cfg = Config()
    with pytest.raises(ConfigError, match="cache.policy must be one of"):
        cfg.cache.policy = "foca"
        cfg.validate()
    cfg = Config()
    cfg.cache.policy, cfg.sampling.mode = "reuse", "causal"
    with pytest.raises(ConfigError, match="cache.policy applies to the bidirectional mode"):
        cfg.validate()


# -- the engine ----------------------------------------------------------------------------------


def test_interval_one_is_bit_identical_to_no_caching():
    _, plain = one_rank(config())
    _, every = one_rank(config(policy="taylor", interval=1))
    assert every.forecasts == 0 and all(torch.equal(a, b) for a, b in zip(plain.blocks, every.blocks))


def test_one_rank_forecasts_what_the_plan_says_and_equals_its_reference():
    cfg = config(policy="taylor", level="model", interval=2)
    _, st = one_rank(cfg)
    forecast_steps = cfg.cache.full_steps(8).count(False)
    assert st.forecasts == 5 * forecast_steps and st.tasks == 5 * (8 - forecast_steps)
    assert max_diff(st.blocks, reference(cfg)) == 0.0
    _, plain = one_rank(config())
    assert max_diff(st.blocks, plain.blocks) > 1e-3  # forecasting changed something: the check is not vacuous


CASES = [  # (preset, ranks, cache settings)
    ("tiny", 2, dict(policy="reuse", level="model")),
    ("tiny", 2, dict(policy="taylor", level="model", order=2)),
    ("tiny", 3, dict(policy="newton", level="model", order=2, interval=3, neighbour="drop")),
    ("tiny", 2, dict(policy="taylor", level="stage")),
    ("tiny-random", 3, dict(policy="newton", level="stage", interval=3)),  # two CFG rows
]


@pytest.mark.parametrize("preset,n,cache", CASES, ids=[f"{c['policy']}-{c['level']}-{n}ranks" for _, n, c in CASES])
def test_n_ranks_with_forecasting_equal_the_serial_reference(tmp_path, preset, n, cache):
    cfg = config(preset, **cache)
    gen(n, [*args(cfg), "--out", str(tmp_path / "run")])
    _, got = read_blocks(tmp_path / "run")
    diff = max_diff(got, reference(cfg))
    # float32 rounding of the split layer stack, which the stage forecasts' extrapolation amplifies
    # (1.1e-5 at most measured on the trained weights; exact arithmetic would give 0)
    assert diff <= 2e-5, f"{n} ranks with {cache} differ from the serial reference by {diff}"
    ranks = json.loads((tmp_path / "run" / "stats.json").read_text())["ranks"]
    forecast = 5 * cfg.cache.full_steps(8).count(False)
    if cache["level"] == "model":  # forecast tasks never reach the other ranks
        assert ranks[0]["forecasts"] == forecast and all(r["tasks"] == 40 - forecast for r in ranks)
    else:  # every task flows; each stage skips its layers on the forecast ones
        assert ranks[0]["forecasts"] == 0 and all(r["tasks"] == 40 for r in ranks)
    assert all(r["feature_cache_peak_mb"] > 0 for r in ranks)


def test_the_caches_do_not_grow_with_the_video():
    peaks = {}
    for level in ("model", "stage"):
        for frames in (65, 257):
            cfg = config(policy="newton", level=level, order=2)
            cfg.video.frames, cfg.video.height, cfg.video.width = frames, 16, 16
            cfg.parallel.block, cfg.parallel.num_cat = 2, 1
            _, st = one_rank(cfg)
            peaks[level, frames] = st.peak_cache_bytes
    assert peaks["model", 65] == peaks["model", 257] > 0
    assert peaks["stage", 65] == peaks["stage", 257] > peaks["model", 65]  # hidden states outweigh predictions


def test_a_model_level_run_stopped_and_resumed_equals_one_uninterrupted():
    cfg = config(policy="newton", level="model", order=2, neighbour="drop")
    assert cfg.resumable()
    _, whole = one_rank(cfg)
    saved = {}
    calls = iter(range(10**6))
    eng, first = one_rank(cfg, checkpoint=lambda s: saved.update(zip(("meta", "tensors"), s.state_dict())),
                          should_stop=lambda: next(calls) >= 5)  # stops at the 6th iteration boundary
    assert first.stopped and saved["meta"]["forecast"] and len(first.blocks) < 5
    eng2 = Engine(cfg, Comm())
    eng2.set_prompt(cfg.sampling.prompt, cfg.sampling.negative_prompt)
    state = DenoiseState(cfg, eng2.plan, eng2.stage.model.out_channels)
    state.load_state_dict(saved["meta"], saved["tensors"])
    rest = eng2.generate(keep_latents=True, state=state)
    assert max_diff(first.blocks + rest.blocks, whole.blocks) == 0.0


def test_a_run_with_state_on_every_rank_is_not_resumable_and_says_so(tmp_path):
    # a stage's forecast history, or the neighbours' K/V kept for reuse, live on every rank
    cfg = config(policy="taylor", level="stage")
    assert not cfg.resumable() and not config(policy="taylor", level="model").resumable()
    run = tmp_path / "run"
    run.mkdir()
    (run / "manifest.json").write_text(json.dumps({"config": cfg.to_dict(), "status": "incomplete"}))
    res = gen(1, ["--resume", str(run)], expect=2)
    assert "runs with feature caching at cache.level=stage or with cache.neighbour=reuse take no checkpoints" in res.stderr
    assert res.stderr.count("error:") == 1 and (run / "manifest.json").is_file()
