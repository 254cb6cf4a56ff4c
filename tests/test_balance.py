"""Balanced stages: the cost-based split against brute force, profiles measured and stored, the
output on another rank (output.decode_on) equal to rank 0's, and split=auto taking a stored profile."""

import itertools
import json
import random

import av
import numpy as np
import pytest
import torch

from dualpar.balance import Profile, ProfileStore, best_split
from dualpar.config import Config, ConfigError

from test_parallel import launch, read_blocks  # noqa: E402


def compositions(n, k):
    for cuts in itertools.combinations(range(1, n), k - 1):
        yield [b - a for a, b in zip((0,) + cuts, cuts + (n,))]


@pytest.mark.parametrize("seed", range(12))
def test_best_split_is_the_brute_force_minimax(seed):
    rng = random.Random(seed)
    layers, ring = rng.randint(3, 12), rng.randint(2, 5)
    ring = min(ring, layers)
    prof = Profile(layer_s=rng.uniform(0.1, 1.0), first_s=rng.uniform(0, 3), last_s=rng.uniform(0, 2),
                   decode_s=rng.uniform(0, 20))
    tasks, blocks = rng.randint(20, 200), rng.randint(2, 30)
    where = rng.choice([None, 0, ring - 1, ring])
    got = best_split(layers, ring, prof, tasks, blocks, where)
    assert len(got) == ring and sum(got) == layers and min(got) >= 1
    brute = min(max(prof.loads(c, tasks, blocks, where)) for c in compositions(layers, ring))
    assert max(prof.loads(got, tasks, blocks, where)) == pytest.approx(brute, rel=1e-12)


def test_best_split_is_even_when_nothing_else_costs():
    assert best_split(8, 2, Profile(1.0, 0.0, 0.0, 0.0), 10, 2, None) == [4, 4]
    assert best_split(30, 8, Profile(1.0, 0.0, 0.0, 0.0), 10, 2, None) in \
        [c for c in compositions(30, 8) if max(c) == 4 and sorted(c).count(3) == 2]
    # decoding on rank 0 moves layers to the others; on the last rank, the other way
    heavy = Profile(1.0, 0.0, 0.0, 10.0)  # 10 per layer, 20 to decode: 3 layers + decoding = 5 layers
    assert best_split(8, 2, heavy, 10, 2, 0) == [3, 5]
    assert best_split(8, 2, heavy, 10, 2, 1) == [5, 3]
    assert best_split(8, 2, heavy, 10, 2, 2) == [4, 4]  # an extra rank: the ring stays even


def test_profile_from_run_recovers_the_costs_that_made_the_figures():
    true = Profile(layer_s=0.02, first_s=0.05, last_s=0.01, decode_s=0.4)
    split, tasks, blocks = [2, 3, 3], 120, 9
    for where in (0, 2):
        layers = [n * true.layer_s * tasks for n in split]
        layers[where] += true.decode_s * blocks  # the VAE sharing the rank's device slows its layers
        busy = list(layers)
        busy[0] += true.first_s * tasks
        busy[-1] += true.last_s * tasks
        ranks = [{"busy_s": b, "layers_s": t} for b, t in zip(busy, layers)]
        got = Profile.from_run(ranks, split, tasks, blocks, where)
        for k in ("layer_s", "first_s", "last_s", "decode_s"):
            assert getattr(got, k) == pytest.approx(getattr(true, k), rel=1e-9), (where, k)
        assert max(got.loads(split, tasks, blocks, where)) == pytest.approx(max(busy), rel=1e-9)
    # no decoding, or on an extra rank: the ring's layers are all alike
    ranks = [{"busy_s": n * 2.4, "layers_s": n * 2.4} for n in split]
    assert Profile.from_run(ranks, split, tasks, blocks, None).decode_s == 0.0
    assert Profile.from_run(ranks, split, tasks, blocks, 3).layer_s == pytest.approx(0.02)


def test_profile_store_round_trip_and_a_damaged_file(tmp_path):
    store = ProfileStore(tmp_path / "sub" / "profiles.json")
    assert store.get("a") is None
    p = Profile(1.0, 2.0, 3.0, 4.0)
    store.put("a", p)
    store.put("b", Profile(5.0, 6.0, 7.0, 8.0))
    assert ProfileStore(store.path).get("a") == p
    store.path.write_text("{ not json")
    assert store.get("a") is None  # a damaged file counts as empty ...
    store.put("a", p)  # ... and is replaced by the next measurement
    assert json.loads(store.path.read_text())["a"]["decode_s"] == 4.0


def test_decode_on_is_validated_before_anything_starts():
    cfg = Config()
    cfg.output.decode_on = "extra"
    with pytest.raises(ConfigError, match="at least 2 ranks"):
        cfg.validate(world_size=1)
    cfg.validate(world_size=2, num_layers=8)
    with pytest.raises(ConfigError, match="8 DiT layers"):
        cfg.validate(world_size=10, num_layers=8)
    cfg.validate(world_size=9, num_layers=8)  # 8 on the ring, one decoding
    cfg.parallel.split = "2,2,4"
    cfg.validate(world_size=4, num_layers=8)
    with pytest.raises(ConfigError, match="3 layer counts for 4 denoising"):
        cfg.validate(world_size=5, num_layers=8)
    cfg.parallel.split = "even"
    cfg.output.decode = False
    with pytest.raises(ConfigError, match="decoding is off"):
        cfg.validate(world_size=2)


def frames(path):
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


@pytest.fixture(scope="module")
def one_rank(root, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    launch(root, 1, out, decode=True)
    return read_blocks(out)[1], frames(out / "video.mp4")


@pytest.mark.parametrize("n,where", [(2, "last"), (3, "extra"), (2, "extra")])
def test_output_on_another_rank_equals_one_rank(root, tmp_path, one_rank, n, where):
    out = tmp_path / "run"
    res = launch(root, n, out, ["--set", f"output.decode_on={where}"], decode=True)
    if where == "extra":
        assert f"[rank {n - 1}] no layers (output.decode_on=extra)" in res.stderr
    man, blocks = read_blocks(out)
    ref_blocks, ref_frames = one_rank
    assert len(blocks) == len(ref_blocks) and all(torch.equal(a, b) for a, b in zip(blocks, ref_blocks))
    assert man["frames_written"] == 89 and np.array_equal(frames(out / "video.mp4"), ref_frames)
    stats = json.loads((out / "stats.json").read_text())
    owner = stats["ranks"][n - 1]
    assert owner["output_s"] > 0 and stats["ranks"][0]["output_s"] == 0.0  # the decoding happened there
    assert stats["decode_on"] == where


def test_split_auto_starts_from_the_stored_profile(root, tmp_path, one_rank):
    prof = tmp_path / "profiles.json"
    # a one-block output queue: rank 0 waits for its VAE, which auto then weighs
    auto = ["--set", "parallel.split=auto", "--set", f"parallel.profile={prof}", "--set", "output.queue_blocks=1"]
    first = launch(root, 2, tmp_path / "a", auto, decode=True)
    assert "no cost profile measured on this setup yet; the even split 4,4" in first.stderr, first.stderr
    assert "split auto: measured busy" in first.stderr
    stored = json.loads(prof.read_text())
    (entry,) = stored.values()
    assert entry["layer_s"] > 0 and entry["first_s"] > 0 and min(entry.values()) >= 0
    second = launch(root, 2, tmp_path / "b", auto, decode=True)
    line = next(ln for ln in second.stderr.splitlines() if "from the profile of this setup" in ln)
    counts = [int(c) for c in line.split("split auto: ")[1].split(" ")[0].split(",")]
    stats = json.loads((tmp_path / "b" / "stats.json").read_text())
    assert stats["layers"] == counts and sum(counts) == 8
    # rank 0 waits for the VAE behind a one-block queue: the profile moves layers off rank 0
    assert counts[0] < 4, line
    for d in ("a", "b"):
        _, blocks = read_blocks(tmp_path / d)
        assert all(torch.equal(a, b) for a, b in zip(blocks, one_rank[0]))
