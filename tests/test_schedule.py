"""The schedule is pure logic: checked here without torch.distributed."""

import pytest

from dualpar.schedule import layout, make_tasks, max_in_flight, split_blocks, split_layers


def test_worked_example_of_design():
    # 3 blocks, 3 steps: DESIGN.md section 1
    got = {}
    for t in make_tasks(3, 3):
        got.setdefault(t.iteration, []).append(f"b{t.block}:{t.step}")
    assert got == {
        0: ["b0:0"],
        1: ["b1:0", "b0:1"],
        2: ["b2:0", "b1:1", "b0:2"],
        3: ["b2:1", "b1:2"],
        4: ["b2:2"],
    }
    clean = [(t.iteration, t.block) for t in make_tasks(3, 3) if t.last_step]
    assert clean == [(2, 0), (3, 1), (4, 2)]


@pytest.mark.parametrize("nb,steps", [(1, 1), (1, 5), (5, 1), (7, 3), (3, 7), (32, 10)])
def test_every_block_gets_every_step_once_in_order(nb, steps):
    tasks = make_tasks(nb, steps)
    assert len(tasks) == nb * steps
    assert [t.index for t in tasks] == list(range(len(tasks)))
    seen = {}
    for t in tasks:
        assert t.step == seen.get(t.block, -1) + 1
        seen[t.block] = t.step
    assert all(v == steps - 1 for v in seen.values())
    # newest first within an iteration, and the queue never exceeds `steps`
    by_it = {}
    for t in tasks:
        by_it.setdefault(t.iteration, []).append(t.block)
    for blocks in by_it.values():
        assert blocks == sorted(blocks, reverse=True)
        assert len(blocks) <= max_in_flight(steps, nb)
    assert len(by_it) == nb + steps - 1


def test_dependencies_point_to_previous_iteration_results():
    tasks = make_tasks(6, 4)
    where = {(t.iteration, t.block): t.index for t in tasks}
    for t in tasks:
        want = [where[k] for k in ((t.iteration - 1, t.block), (t.iteration - 1, t.block - 1)) if k in where]
        assert t.needs == max(want, default=-1)
        assert t.needs < t.index
        # neighbours: the newer one ran earlier in this iteration
        if t.newer is not None:
            assert where[(t.iteration, t.newer)] < t.index


def test_split_blocks_gives_leftover_to_first_block():
    blocks = split_blocks(257, 8)
    assert len(blocks) == 32 and blocks[0].frames == 9
    assert all(b.frames == 8 for b in blocks[1:])
    assert sum(b.frames for b in blocks) == 257
    assert [b.start for b in blocks[:3]] == [0, 9, 17]
    assert split_blocks(8, 8)[0].frames == 8
    with pytest.raises(ValueError):
        split_blocks(7, 8)


def test_layout_context_and_cache_flags():
    blocks = split_blocks(23, 4)  # 7,4,4,4,4
    tasks = make_tasks(len(blocks), 5)
    for t in tasks:
        lay = layout(t, blocks, 2, 5)
        assert lay.own == blocks[t.block].frames
        assert lay.context == (2 if t.block > 0 else 0)
        assert lay.extra == (2 if t.newer is not None else 0)
        # K/V are kept exactly when the older neighbour runs later in this iteration
        older_runs = any(u.iteration == t.iteration and u.block == t.block - 1 for u in tasks)
        assert (lay.keep == 2) == older_runs


@pytest.mark.parametrize("n,w", [(4, 1), (4, 2), (4, 3), (4, 4), (30, 8), (40, 8), (30, 7)])
def test_split_layers_contiguous_and_balanced(n, w):
    r = split_layers(n, w)
    assert r[0][0] == 0 and r[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(r, r[1:]))
    sizes = [b - a for a, b in r]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError):
        split_layers(n, n + 1)


def test_split_layers_by_given_counts():
    assert split_layers(8, 3, [1, 3, 4]) == [(0, 1), (1, 4), (4, 8)]
    for bad in ([1, 3], [1, 3, 3], [0, 4, 4]):
        with pytest.raises(ValueError):
            split_layers(8, 3, bad)


def test_rank0_state_does_not_grow_with_video_length():
    # Invariant 3 at the engine level: held latents depend on `steps`, not on length.
    from dualpar.comm import Comm
    from dualpar.config import Config
    from dualpar.engine import Engine

    peaks = []
    for frames in (65, 257):
        cfg = Config()
        cfg.video.frames, cfg.video.height, cfg.video.width = frames, 16, 16
        cfg.parallel.block, cfg.parallel.num_cat, cfg.sampling.steps = 2, 1, 3
        cfg.model.text_len = 8
        eng = Engine(cfg, Comm())
        eng.set_prompt("a cat", "blurry")
        st = eng.generate()
        assert st.tasks == len(eng.plan.blocks) * 3
        peaks.append(st.peak_live_blocks)
    assert peaks[0] == peaks[1] <= 3 + 1
