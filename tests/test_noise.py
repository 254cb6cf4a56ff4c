import torch

from dualpar.noise import NoisePool


def test_pool_reuses_overlap_frames_and_permutes_the_rest():
    pool = NoisePool(block=4, num_cat=2, channels=3, height=2, width=2, seed=7)
    start = pool.pool.clone()
    frames = [start[:, :, i] for i in range(6)]
    b0 = pool.next_block(4)
    p1 = pool.pool
    # new pool = [old last num_cat] + permutation of the old first `block` frames
    assert torch.equal(p1[:, :, :2], start[:, :, 4:])
    rest = sorted(p1[:, :, 2:].sum(dim=(0, 1, 3, 4)).tolist())
    assert rest == sorted(start[:, :, :4].sum(dim=(0, 1, 3, 4)).tolist())
    assert torch.equal(b0, p1[:, :, 2:])
    b1 = pool.next_block(4)
    # every block is made of the same six noise frames
    for blk in (b0, b1):
        for i in range(4):
            assert any(torch.equal(blk[:, :, i], f) for f in frames)


def test_same_seed_same_noise_and_first_block_longer():
    a = NoisePool(block=4, num_cat=1, channels=2, height=2, width=2, seed=3)
    b = NoisePool(block=4, num_cat=1, channels=2, height=2, width=2, seed=3)
    xa, xb = a.next_block(7), b.next_block(7)
    assert xa.shape[2] == 7 and torch.equal(xa, xb)
    assert torch.equal(a.next_block(4), b.next_block(4))
    c = NoisePool(block=4, num_cat=1, channels=2, height=2, width=2, seed=4)
    assert not torch.equal(c.next_block(7), xa)


def test_state_roundtrip():
    a = NoisePool(block=3, num_cat=2, channels=2, height=2, width=2, seed=1)
    a.next_block(3)
    s = a.state_dict()
    x = a.next_block(3)
    a.load_state_dict(*s)
    assert torch.equal(a.next_block(3), x)
