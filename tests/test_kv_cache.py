"""kv_cache: the frame store, the attention over selections, and the selection policies."""

import math

import pytest
import torch

from dualpar.config import resolve_budget
from kv_cache import FocusedForcing, Full, HeadMask, KVStore, Selection, TopK, WindowSink, attend, history_mass, make_policy

B, T, H, D = 2, 4, 3, 8


def frame_kv(i):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(B, T, H, D, generator=g), torch.randn(B, T, H, D, generator=g)


def test_store_is_a_ring_with_pinned_sinks():
    s = KVStore(4, batch=B, tokens=T, heads=H, head_dim=D, sink=1)
    size = s.nbytes()
    evicted = []
    for f in range(10):
        k, v = frame_kv(f)
        evicted.append(s.commit(f, k, v))
    assert evicted == [None] * 4 + [1, 2, 3, 4, 5, 6]
    assert s.frames() == [0, 7, 8, 9] and s.sinks == [0]
    # frames never move: each one sits in the slot it was written to
    assert sorted(s.frame_in_slot) == [0, 7, 8, 9]
    frames, k, v = s.ordered()
    for i, f in enumerate(frames):
        assert torch.equal(k[:, i], frame_kv(f)[0]) and torch.equal(v[:, i], frame_kv(f)[1])
    assert s.nbytes() == size == 2 * B * 4 * T * H * D * 4
    with pytest.raises(ValueError):
        s.commit(9, *frame_kv(9))
    with pytest.raises(ValueError, match="sink"):
        s.commit(10, *frame_kv(10), victim=lambda st: 0)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_attend_selection_paths_agree_with_plain_attention():
    n, fq = 5, 3
    kh, vh = rand(B, n, T, H, D, seed=1), rand(B, n, T, H, D, seed=2)
    q, kn, vn = rand(B, fq * T, H, D, seed=3), rand(B, fq * T, H, D, seed=4), rand(B, fq * T, H, D, seed=5)

    def plain(keys, values):  # softmax(q k^T / sqrt(d)) v, written out
        logits = torch.einsum("bqhd,bkhd->bhqk", q, keys) / math.sqrt(D)
        return torch.einsum("bhqk,bkhd->bqhd", logits.softmax(-1), values)

    full = plain(torch.cat([kh.flatten(1, 2), kn], 1), torch.cat([vh.flatten(1, 2), vn], 1))
    assert torch.allclose(attend(q, kn, vn, kh, vh, None), full, atol=1e-5)
    every = torch.arange(n).expand(fq, H, n)
    assert torch.allclose(attend(q, kn, vn, kh, vh, Selection(every)), full, atol=1e-5)
    # per query frame and head: frames {1, 3}; padded rows masked out
    idx = torch.tensor([1, 3, 0]).expand(fq, H, 3)
    valid = torch.tensor([True, True, False]).expand(fq, H, 3)
    sub = plain(torch.cat([kh[:, [1, 3]].flatten(1, 2), kn], 1), torch.cat([vh[:, [1, 3]].flatten(1, 2), vn], 1))
    assert torch.allclose(attend(q, kn, vn, kh, vh, Selection(idx, valid)), sub, atol=1e-5)
    # different frames for different query frames
    idx2 = torch.stack([torch.tensor([0, 2]).expand(H, 2), torch.tensor([1, 4]).expand(H, 2),
                        torch.tensor([3, 4]).expand(H, 2)])
    out = attend(q, kn, vn, kh, vh, Selection(idx2))
    for f, frames in enumerate(([0, 2], [1, 4], [3, 4])):
        ref = plain(torch.cat([kh[:, frames].flatten(1, 2), kn], 1), torch.cat([vh[:, frames].flatten(1, 2), vn], 1))
        rows = slice(f * T, (f + 1) * T)
        assert torch.allclose(out[:, rows], ref[:, rows], atol=1e-5)


def test_history_mass_is_the_softmax_share_of_each_frame():
    n, fq, s = 4, 2, 3
    kh, kn = rand(B, n, T, H, D, seed=6), rand(B, 5, H, D, seed=7)
    qs = rand(B, fq, s, H, D, seed=8)
    mass = history_mass(qs, kh, kn)
    keys = torch.cat([kh.flatten(1, 2), kn], 1)
    p = (torch.einsum("bfshd,bkhd->bfhsk", qs, keys) / math.sqrt(D)).softmax(-1)
    ref = p[..., : n * T].unflatten(-1, (n, T)).sum(-1).mean(dim=(0, 3))
    assert mass.shape == (fq, H, n)
    assert torch.allclose(mass, ref, atol=1e-6)


def aligned_history(strength, values=None):
    """Committed frames whose keys align with every query by ``strength[i]``; one query frame."""
    n = len(strength)
    q = torch.zeros(1, T, 1, D)
    q[..., 0] = 1.0
    kh = torch.zeros(1, n, T, 1, D)
    for i, st in enumerate(strength):
        kh[:, i, :, :, 0] = st
    vh = values if values is not None else rand(1, n, T, 1, D, seed=9)
    kn = torch.zeros(1, T, 1, D)
    return q, kh, vh, kn


def store_with(n):
    s = KVStore(n, batch=1, tokens=T, heads=1, head_dim=D)
    for f in range(n):
        s.commit(f, torch.zeros(1, T, 1, D), torch.zeros(1, T, 1, D))
    return s


def test_topk_picks_the_most_attended_frames_in_order():
    q, kh, vh, kn = aligned_history([1.0, 9.0, 3.0, 8.0, 0.0])
    sel = TopK(2, sample=T).select(store_with(5), q, 1, kh, vh, kn)
    assert sel.idx.tolist() == [[[1, 3]]] and sel.valid is None


def test_focused_forcing_trades_a_redundant_frame_for_a_distinct_one():
    # frames 1 and 3 are the most attended but carry identical content; frame 2 is
    # attended a little less and carries different content.
    base = rand(1, 1, T, 1, D, seed=10)
    other = rand(1, 1, T, 1, D, seed=11)
    vh = torch.cat([rand(1, 1, T, 1, D, seed=12), base, other, base, rand(1, 1, T, 1, D, seed=13)], 1)
    q, kh, _, kn = aligned_history([0.0, 9.0, 8.8, 8.9, 0.0], vh)
    st = store_with(5)
    assert TopK(2, sample=T).select(st, q, 1, kh, vh, kn).idx.tolist() == [[[1, 3]]]
    assert FocusedForcing(2, sample=T, diversity=0.3).select(st, q, 1, kh, vh, kn).idx.tolist() == [[[1, 2]]]
    # without the diversity term it is attention top-k
    assert FocusedForcing(2, sample=T, diversity=0.0).select(st, q, 1, kh, vh, kn).idx.tolist() == [[[1, 3]]]


def test_focused_forcing_head_budgets():
    ff = FocusedForcing(4)
    b = ff.head_budgets(torch.tensor([0.1, 0.5, 0.2, 0.2]), n=20)
    # floor 1 each, the other 12 frames in proportion (1.2, 6, 2.4, 2.4), largest remainders first
    assert b.sum() == 16 and b[0] == 2 and b[1] == 7 and sorted(b[2:].tolist()) == [3, 4]
    # capped by the frames there are; the floor is ceil(budget / 4)
    b = ff.head_budgets(torch.tensor([0.0, 1.0, 0.0]), n=6)
    assert b.tolist() == [3, 6, 3]
    # unequal head budgets come out padded and masked
    q, kh, vh, kn = rand(1, 2 * T, 3, D, seed=14), rand(1, 8, T, 3, D, seed=15), rand(1, 8, T, 3, D, seed=16), \
        rand(1, 2 * T, 3, D, seed=17)
    s = KVStore(8, batch=1, tokens=T, heads=3, head_dim=D)
    for f in range(8):
        s.commit(f, kh[:, f], vh[:, f])
    sel = FocusedForcing(3, sample=T).select(s, q, 2, kh, vh, kn)
    counts = sel.valid.sum(-1) if sel.valid is not None else torch.full((2, 3), sel.budget)
    assert counts.sum(-1).tolist() == [9, 9]
    for f in range(2):
        for h in range(3):
            picked = sel.idx[f, h][: counts[f, h]].tolist()
            assert picked == sorted(set(picked))


def test_calibrated_head_weights_set_the_budgets_whatever_the_attention():
    q, kh, vh, kn = rand(1, 2 * T, 3, D, seed=24), rand(1, 8, T, 3, D, seed=25), rand(1, 8, T, 3, D, seed=26), \
        rand(1, 2 * T, 3, D, seed=27)
    s = KVStore(8, batch=1, tokens=T, heads=3, head_dim=D)
    for f in range(8):
        s.commit(f, kh[:, f], vh[:, f])
    for weights in ([0.0, 1.0, 0.0], [1.0, 0.0, 0.0]):  # the weights' budgets: floor 1, the rest to one head
        sel = FocusedForcing(3, sample=T, head_weights=torch.tensor(weights)).select(s, q, 2, kh, vh, kn)
        counts = sel.valid.sum(-1)
        expect = FocusedForcing(3).head_budgets(torch.tensor(weights), 8)
        assert counts.tolist() == [expect.tolist()] * 2 and expect.max() == 7
    with pytest.raises(ValueError, match="one non-negative weight per head"):
        FocusedForcing(3, head_weights=torch.tensor([1.0, -1.0, 0.0]))
    with pytest.raises(ValueError, match="2 head weights for a layer of 3 heads"):
        FocusedForcing(3, sample=T, head_weights=torch.tensor([1.0, 1.0])).select(s, q, 2, kh, vh, kn)


def test_head_mask_hides_one_heads_history_only():
    n, fq = 4, 2
    kh, vh = rand(B, n, T, H, D, seed=31), rand(B, n, T, H, D, seed=32)
    q, kn, vn = rand(B, fq * T, H, D, seed=33), rand(B, fq * T, H, D, seed=34), rand(B, fq * T, H, D, seed=35)
    s = KVStore(n, batch=B, tokens=T, heads=H, head_dim=D)
    out = attend(q, kn, vn, kh, vh, HeadMask(1).select(s, q, fq, kh, vh, kn))
    full = attend(q, kn, vn, kh, vh, None)
    alone = attend(q, kn, vn, None, None, None)  # the current chunk only
    assert torch.allclose(out[:, :, 1], alone[:, :, 1], atol=1e-5)
    others = [h for h in range(H) if h != 1]
    assert torch.allclose(out[:, :, others], full[:, :, others], atol=1e-5)
    assert not torch.allclose(full[:, :, 1], alone[:, :, 1], atol=1e-3)


def test_budgets_and_capacities():
    assert resolve_budget(0.25, 129) == 33 and resolve_budget(5, 129) == 5
    with pytest.raises(ValueError):
        resolve_budget(2.5, 10)
    for bad in (float("nan"), float("inf"), float("-inf")):  # not an OverflowError from int(inf)
        with pytest.raises(ValueError, match="finite"):
            resolve_budget(bad, 10)
    assert isinstance(make_policy("full", budget=0.25, total_frames=50), Full)
    w = make_policy("window", budget=10, total_frames=50, sink=3)
    assert isinstance(w, WindowSink) and w.capacity(50) == 10
    ff = make_policy("focused", budget=10, total_frames=50)
    assert ff.capacity(50) == 15 and ff.capacity(12) == 12
    # a budget covering the video keeps everything and selects everything: the full path
    everything = make_policy("focused", budget=50, total_frames=50)
    assert everything.capacity(50) == 50
    q, kh, vh, kn = rand(1, T, H, D), rand(1, 50, T, H, D), rand(1, 50, T, H, D), rand(1, T, H, D)
    assert everything.select(store_with(1), q, 1, kh, vh, kn) is None
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("lru", budget=3, total_frames=10)
