"""Tests for dualpar.output: streaming VAE decode, durable fragmented MP4, run directory."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.video_processor import VideoProcessor
from safetensors import safe_open
from safetensors.torch import load_file

from dualpar.output import (
    Mp4Writer,
    RunWriter,
    StreamingDecoder,
    atomic_write,
    pixel_frames,
    safe_join,
    to_uint8_frames,
)

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
TINY_VAE = dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])


def make_vae(**overrides):
    torch.manual_seed(0)
    return AutoencoderKLWan(**{**TINY_VAE, **overrides}).eval()


@pytest.fixture(scope="module")
def vae():
    return make_vae()


def latents(frames, seed=1, hw=(4, 4)):
    return torch.randn(1, 16, frames, *hw, generator=torch.Generator().manual_seed(seed))


def one_shot(vae, z):
    """What WanPipeline does: de-normalize, then one public decode of the whole video."""
    with torch.no_grad():
        return vae.decode(StreamingDecoder(vae).denormalize(z)).sample


def read_video(path):
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


# -- StreamingDecoder --------------------------------------------------------------------


@pytest.mark.parametrize("split", [[3, 2, 4], [1, 8], [1, 1, 3, 4]])
def test_streaming_decode_is_bit_identical_to_one_shot(vae, split):
    z = latents(9)
    ref = one_shot(vae, z)
    dec = StreamingDecoder(vae)
    blocks = [dec.decode_block(b) for b in z.split(split, dim=2)]

    assert [b.shape[2] for b in blocks] == [pixel_frames(s, f) for s, f in zip(np.cumsum([0] + split), split)]
    assert blocks[0].shape[2] == 1 + 4 * (split[0] - 1)
    assert all(b.shape[2] == 4 * f for b, f in zip(blocks[1:], split[1:]))
    out = torch.cat(blocks, dim=2)
    assert out.shape == ref.shape == (1, 3, 1 + 4 * 8, 32, 32)
    assert torch.equal(out, ref)


def test_public_decode_per_block_is_wrong(vae):
    # Why the cache must survive block boundaries: the public decode restarts the causal
    # cache, so every block is decoded as if it were the start of a new video.
    z = latents(9)
    ref = one_shot(vae, z)
    with torch.no_grad():
        naive = [vae.decode(StreamingDecoder(vae).denormalize(b)).sample for b in z.split([3, 2, 4], dim=2)]
    assert torch.equal(naive[0], ref[:, :, :9])  # the first block is fine
    assert sum(b.shape[2] for b in naive) == 9 + 5 + 13 != ref.shape[2]  # later ones lose 3 frames each
    assert not torch.equal(naive[1][:, :, 1:], ref[:, :, 9:13])  # and the content differs


def test_reset_starts_a_new_video(vae):
    dec = StreamingDecoder(vae)
    dec.decode_block(latents(2, seed=5))
    dec.reset()
    z = latents(3, seed=6)
    out = torch.cat([dec.decode_block(b) for b in z.split([1, 2], dim=2)], dim=2)
    assert torch.equal(out, one_shot(vae, z))


def test_streaming_decode_with_patchified_residual_vae():
    # Wan2.2-style VAE: residual up blocks use first_chunk, output is unpatchified.
    vae = make_vae(is_residual=True, patch_size=2, in_channels=12, out_channels=12, scale_factor_spatial=16)
    z = latents(6, seed=2)
    dec = StreamingDecoder(vae)
    out = torch.cat([dec.decode_block(b) for b in z.split([1, 2, 3], dim=2)], dim=2)
    assert out.shape == (1, 3, 21, 64, 64)
    assert torch.equal(out, one_shot(vae, z))


def test_to_uint8_frames_matches_diffusers_postprocess():
    video = torch.rand(1, 3, 5, 6, 8) * 2.2 - 1.1  # includes out-of-range values
    video[0, 0, 0, 0, :4] = torch.tensor([-1.0, 1.0, 0.0, 1 / 255])
    ours = to_uint8_frames(video)
    pil = VideoProcessor().postprocess_video(video, output_type="pil")[0]
    assert ours.shape == (5, 6, 8, 3) and ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, np.stack([np.asarray(im) for im in pil]))


# -- Mp4Writer ---------------------------------------------------------------------------


def smooth_frames(n, height=32, width=48, start=0):
    y, x = np.mgrid[0:height, 0:width]
    t = np.arange(start, start + n)[:, None, None]
    return np.stack(
        [(x * 4 + t * 3) % 256, (y * 6 + t * 2) % 256, np.broadcast_to((x + y) * 3 % 256, (n, height, width))], -1
    ).astype(np.uint8)


def test_mp4_writer_every_write_is_decodable_before_close(tmp_path):
    path = tmp_path / "v.mp4"
    chunks = [1, 8, 5, 8]
    written = []
    with Mp4Writer(path, 48, 32, fps=16, gop=8) as w:
        for n in chunks:
            frames = smooth_frames(n, start=len(written))
            assert w.write(frames) == n
            written.extend(frames)
            # another handle, while the writer is still open
            assert w.bytes_written == path.stat().st_size
            decoded = read_video(path)
            assert len(decoded) == len(written) == w.frames_written
    decoded = read_video(path)
    assert len(decoded) == sum(chunks)
    assert decoded[0].shape == (32, 48, 3)
    err = np.abs(np.stack(decoded).astype(int) - np.stack(written).astype(int)).mean()
    assert err < 4, err
    with av.open(str(path)) as c:
        times = [f.time for f in c.decode(video=0)]
        assert c.streams.video[0].average_rate == 16
    assert times == pytest.approx([i / 16 for i in range(sum(chunks))])


@pytest.mark.parametrize("size", [(33, 32), (32, 33)])
def test_mp4_writer_rejects_odd_sizes(tmp_path, size):
    with pytest.raises(ValueError, match="even"):
        Mp4Writer(tmp_path / "v.mp4", *size)


# -- RunWriter ---------------------------------------------------------------------------


SPLIT = [3, 2, 4]  # latent frames per block -> 9 + 8 + 16 = 33 frames


def write_run(out_dir, vae, blocks, **kwargs):
    rw = RunWriter(out_dir, vae=vae, config={"prompt": "test"}, seed=7, blocks_total=3, frames_total=33, **kwargs)
    counts = [rw.add_block(i, b) for i, b in enumerate(blocks)]
    return rw, counts


def test_run_writer_end_to_end(tmp_path, vae):
    z = latents(9)
    blocks = list(z.split(SPLIT, dim=2))
    rw, counts = write_run(tmp_path / "run", vae, blocks)
    manifest = rw.finish()
    assert counts == [9, 8, 16]

    out = tmp_path / "run"
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["status"] == "complete" and manifest["reason"] is None
    assert manifest["config"] == {"prompt": "test"} and manifest["seed"] == 7 and manifest["fps"] == 16
    assert (manifest["blocks_total"], manifest["blocks_written"]) == (3, 3)
    assert (manifest["frames_total"], manifest["frames_written"], manifest["latent_frames_written"]) == (33, 33, 9)
    assert manifest["video"] == "video.mp4" and manifest["finished_at"]
    keys = ("id", "latent_start", "latent_frames", "frame_start", "frames")
    rows = [tuple(b[k] for k in keys) for b in manifest["blocks"]]
    assert rows == [(0, 0, 3, 0, 9), (1, 3, 2, 9, 8), (2, 5, 4, 17, 16)]

    decoded = read_video(out / "video.mp4")
    assert len(decoded) == manifest["frames_total"]
    assert decoded[0].shape == (32, 32, 3)
    # x264 is deterministic: the video must be byte-identical to encoding the one-shot
    # decode in the same chunks (default GOP = frames of a full 3-latent-frame block).
    expected = to_uint8_frames(one_shot(vae, z))
    with Mp4Writer(tmp_path / "ref.mp4", 32, 32, fps=16, gop=12) as ref:
        for start, n in [(0, 9), (9, 8), (17, 16)]:
            ref.write(expected[start : start + n])
    assert (out / "video.mp4").read_bytes() == (tmp_path / "ref.mp4").read_bytes()
    assert manifest["video_bytes"] == (out / "video.mp4").stat().st_size

    for b, entry in zip(blocks, manifest["blocks"]):
        path = out / entry["latents"]
        assert torch.equal(load_file(path)["latents"], b)
        with safe_open(path, "pt") as f:
            assert f.metadata() == {"block_id": str(entry["id"]), "latent_start": str(entry["latent_start"])}
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


CRASH_SCRIPT = """
import os, sys, time, torch
torch.set_num_threads(1)
from diffusers import AutoencoderKLWan
from dualpar.output import RunWriter
torch.manual_seed(0)
vae = AutoencoderKLWan(**{vae}).eval()
z = torch.randn(1, 16, 9, 4, 4, generator=torch.Generator().manual_seed(1))
rw = RunWriter(sys.argv[1], vae=vae, config={{}}, seed=7, blocks_total=3, frames_total=33)
for i, block in enumerate(z.split({split}, dim=2)[:2]):
    rw.add_block(i, block)
if sys.argv[2] == "exit":
    os._exit(1)  # no finish(), no interpreter cleanup
print("written", flush=True)
time.sleep(60)  # parent SIGKILLs us
"""


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_run_writer_survives_a_crash(tmp_path, how):
    out = tmp_path / "run"
    script = CRASH_SCRIPT.format(vae=repr(TINY_VAE), split=SPLIT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(out), how],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    if how == "kill":
        line = proc.stdout.readline()
        assert line == "written\n", proc.stderr.read()
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=120)
    assert proc.returncode != 0

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "running"
    assert (manifest["blocks_written"], manifest["frames_written"], manifest["latent_frames_written"]) == (2, 17, 5)
    assert manifest["video_bytes"] == (out / "video.mp4").stat().st_size
    assert len(read_video(out / "video.mp4")) == 17
    assert sorted(p.name for p in (out / "latents").iterdir()) == ["block_00000.safetensors", "block_00001.safetensors"]


def test_background_mode_matches_sync_mode(tmp_path, vae):
    blocks = list(latents(9, seed=3).split(SPLIT, dim=2))
    sync, sync_counts = write_run(tmp_path / "sync", vae, blocks)
    bg, bg_counts = write_run(tmp_path / "bg", vae, blocks, background=True)
    m_sync, m_bg = sync.finish(), bg.finish()

    assert sync_counts == bg_counts
    timestamps = ("created_at", "updated_at", "finished_at")
    assert {k: v for k, v in m_sync.items() if k not in timestamps} == {
        k: v for k, v in m_bg.items() if k not in timestamps
    }
    assert (tmp_path / "sync" / "video.mp4").read_bytes() == (tmp_path / "bg" / "video.mp4").read_bytes()
    for entry in m_sync["blocks"]:  # (safetensors headers are not byte-stable: compare contents)
        sync_latents, bg_latents = (load_file(tmp_path / d / entry["latents"])["latents"] for d in ("sync", "bg"))
        assert torch.equal(sync_latents, bg_latents)


def test_background_error_is_reraised_in_caller(tmp_path, vae):
    rw = RunWriter(tmp_path / "run", vae=vae, config={}, seed=0, blocks_total=3, frames_total=33, background=True)
    rw.add_block(0, torch.zeros(1, 8, 1, 4, 4))  # wrong channel count: fails on the worker thread
    with pytest.raises(ValueError, match="expected latents"):
        for i in range(1, 3):
            rw.add_block(i, latents(1))
        rw.finish()
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "incomplete" and "writer failed" in manifest["reason"]
    assert manifest["blocks_written"] == 0
    with pytest.raises(RuntimeError, match="finished"):
        rw.add_block(1, latents(1))


def test_decode_false_writes_only_latents_and_manifest(tmp_path):
    rw = RunWriter(tmp_path / "run", config={}, seed=0, blocks_total=2, frames_total=33, decode=False)
    assert rw.add_block(0, latents(3)) == 0
    rw.add_block(1, latents(6))
    manifest = rw.finish()
    assert manifest["status"] == "complete" and manifest["video"] is None
    assert (manifest["blocks_written"], manifest["latent_frames_written"], manifest["frames_written"]) == (2, 9, 0)
    assert [b["frames"] for b in manifest["blocks"]] == [9, 24]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["latents", "manifest.json"]


def test_unfinished_blocks_make_run_incomplete(tmp_path):
    with RunWriter(tmp_path / "run", config={}, seed=0, blocks_total=3, frames_total=33, decode=False) as rw:
        rw.add_block(0, latents(3))
    assert rw.manifest["status"] == "incomplete" and rw.manifest["reason"] == "only 1 of 3 blocks written"
    with pytest.raises(RuntimeError):
        with RunWriter(tmp_path / "run2", config={}, seed=0, blocks_total=1, frames_total=9, decode=False) as rw2:
            raise RuntimeError("sampler exploded")
    assert rw2.manifest["status"] == "incomplete" and "sampler exploded" in rw2.manifest["reason"]
    assert RunWriter(tmp_path / "run3", config={}, seed=0, blocks_total=1, frames_total=9, decode=False).finish(
        complete=False, reason="stopped by user"
    )["reason"] == "stopped by user"


def test_blocks_must_arrive_in_order(tmp_path):
    rw = RunWriter(tmp_path / "run", config={}, seed=0, blocks_total=3, frames_total=33, decode=False)
    with pytest.raises(ValueError, match="expected block 0, got 1"):
        rw.add_block(1, latents(2))
    rw.add_block(0, latents(2))
    with pytest.raises(ValueError, match="expected block 1, got 0"):
        rw.add_block(0, latents(2))
    with pytest.raises(FileExistsError):
        RunWriter(tmp_path / "run", config={}, seed=0, blocks_total=3, frames_total=33, decode=False)


def test_paths_escaping_out_dir_are_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for bad in ["../evil.json", "/etc/passwd", "a/../../evil", "."]:
        with pytest.raises(ValueError, match="escapes"):
            safe_join(out, bad)
        with pytest.raises(ValueError, match="escapes"):
            atomic_write(out, bad, b"x")
    assert safe_join(out, "latents/x.safetensors") == out.resolve() / "latents" / "x.safetensors"

    # a symlinked subdirectory pointing outside is refused too
    outside = tmp_path / "outside"
    outside.mkdir()
    (out / "latents").symlink_to(outside)
    rw = RunWriter(out, config={}, seed=0, blocks_total=1, frames_total=9, decode=False)
    with pytest.raises(ValueError, match="escapes"):
        rw.add_block(0, latents(3))
    assert not list(outside.iterdir())
    assert rw.manifest["status"] == "incomplete"
