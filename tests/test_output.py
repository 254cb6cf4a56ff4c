"""Tests for dualpar.output (streaming VAE decode, durable fragmented MP4, run directory) and the checkpoint
file a run resumes from."""

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
from safetensors.torch import load, load_file, save

from dualpar import checkpoint
from dualpar.output.decode import StreamingDecoder, to_uint8_frames
from dualpar.output.mp4 import Mp4Writer
from dualpar.output.rundir import atomic_write, safe_join
from dualpar.output.writer import RunWriter
from dualpar.schedule import pixel_frames

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
from dualpar.output.writer import RunWriter
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


# -- resuming ----------------------------------------------------------------------------


SPLIT6 = [3, 2, 2, 1, 3, 2]  # latent frames per block -> 9 + 8 + 8 + 4 + 12 + 8 = 49 frames


def blocks6():
    return list(latents(sum(SPLIT6), seed=4).split(SPLIT6, dim=2))


def new_run6(out_dir, vae, **kwargs):
    return RunWriter(out_dir, vae=vae, config={"prompt": "test"}, seed=7, blocks_total=6, frames_total=49, **kwargs)


def roundtrip(meta, tensors):
    """Through the formats the engine stores a checkpoint in: JSON and safetensors (no pickle)."""
    return json.loads(json.dumps(meta)), load(save(tensors))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, vae):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    rw = new_run6(out, vae)
    for i, block in enumerate(blocks6()):
        rw.add_block(i, block)
    rw.finish()
    return out


def assert_same_run(resumed, reference):
    m, ref = (json.loads((d / "manifest.json").read_text()) for d in (resumed, reference))
    assert m["status"] == "complete" and m["resumed"] and all(r["at"] for r in m["resumed"])
    volatile = ("created_at", "updated_at", "finished_at", "resumed")
    assert {k: v for k, v in m.items() if k not in volatile} == {k: v for k, v in ref.items() if k not in volatile}
    frames, ref_frames = read_video(resumed / "video.mp4"), read_video(reference / "video.mp4")
    assert len(frames) == len(ref_frames) == 49
    np.testing.assert_array_equal(np.stack(frames), np.stack(ref_frames))
    # One x264 instance per fragment: the resumed file is not just equivalent but identical.
    assert (resumed / "video.mp4").read_bytes() == (reference / "video.mp4").read_bytes()
    assert sorted(p.name for p in (resumed / "latents").iterdir()) == [f"block_{i:05d}.safetensors" for i in range(6)]
    for entry in ref["blocks"]:
        got, want = (load_file(d / entry["latents"])["latents"] for d in (resumed, reference))
        assert torch.equal(got, want)


@pytest.mark.parametrize("checkpoint_after, stop", [(0, "abandon"), (1, "finish"), (3, "abandon")])
def test_resume_is_identical_to_an_uninterrupted_run(tmp_path, vae, uninterrupted, checkpoint_after, stop):
    blocks = blocks6()
    out = tmp_path / "run"
    rw = new_run6(out, vae)
    for i in range(checkpoint_after):
        rw.add_block(i, blocks[i])
    rw.sync()
    meta, tensors = rw.state_dict()
    # Progress after the checkpoint, lost in the "crash". Serializing the state only now also
    # checks that it does not change with the writer (the decoder replaces cache entries).
    rw.add_block(checkpoint_after, blocks[checkpoint_after])
    meta, tensors = roundtrip(meta, tensors)
    if stop == "finish":  # a graceful stop finishes the run as incomplete
        assert rw.finish(complete=False, reason="stopped")["status"] == "incomplete"
    del rw  # "abandon": no finish(), as if the process had died

    resumed = RunWriter.reopen(out, meta, tensors, vae=vae)
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["status"] == "running" and on_disk["blocks_written"] == checkpoint_after
    assert on_disk["resumed"][-1]["blocks_written"] == checkpoint_after
    assert not (out / "latents" / f"block_{checkpoint_after:05d}.safetensors").exists()
    for i in range(checkpoint_after, 6):
        resumed.add_block(i, blocks[i])
    resumed.finish()
    assert_same_run(out, uninterrupted)


KILLED_SCRIPT = """
import json, sys, time, torch
torch.set_num_threads(1)
from diffusers import AutoencoderKLWan
from safetensors.torch import save_file
from dualpar.output import mp4, writer
torch.manual_seed(0)
vae = AutoencoderKLWan(**{vae}).eval()
blocks = torch.randn(1, 16, {frames}, 4, 4, generator=torch.Generator().manual_seed(4)).split({split}, dim=2)
rw = writer.RunWriter(sys.argv[1], vae=vae, config={{"prompt": "test"}}, seed=7, blocks_total=6, frames_total=49,
                      background=True)
for i in range(3):
    rw.add_block(i, blocks[i])
meta, tensors = rw.state_dict()  # the checkpoint
with open(sys.argv[2] + ".json", "w") as f:
    json.dump(meta, f)
save_file(tensors, sys.argv[2] + ".safetensors")

append = mp4.Mp4Writer._append
def torn_append(self, data):  # block 4's fragment is half on disk when the parent kills us
    if self._sequence == 5:
        self._file.write(data[: len(data) // 2])
        self._file.flush()
        print("torn", flush=True)
        time.sleep(60)
    append(self, data)
mp4.Mp4Writer._append = torn_append
for i in range(3, 6):
    rw.add_block(i, blocks[i])
time.sleep(60)
"""


def test_resume_after_sigkill_mid_write(tmp_path, vae, uninterrupted):
    out, ckpt = tmp_path / "run", tmp_path / "ckpt"
    script = KILLED_SCRIPT.format(vae=repr(TINY_VAE), frames=sum(SPLIT6), split=SPLIT6)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", script, str(out), str(ckpt)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line == "torn\n", proc.stderr.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "running" and manifest["blocks_written"] == 4  # block 3: after the checkpoint
    assert (out / "video.mp4").stat().st_size > manifest["video_bytes"]  # + half of block 4's fragment
    assert (out / "latents" / "block_00004.safetensors").exists()  # latents go first

    meta = json.loads(Path(f"{ckpt}.json").read_text())
    resumed = RunWriter.reopen(out, meta, load_file(f"{ckpt}.safetensors"), vae=vae, background=True)
    for i, block in enumerate(blocks6()[3:], start=3):
        resumed.add_block(i, block)
    resumed.finish()
    assert_same_run(out, uninterrupted)


@pytest.fixture
def checkpointed(tmp_path, vae):
    """A run with 3 of 6 blocks written, its state taken, then one more block, then abandoned."""
    blocks = blocks6()
    out = tmp_path / "run"
    rw = new_run6(out, vae)
    for i in range(3):
        rw.add_block(i, blocks[i])
    state = roundtrip(*rw.state_dict())
    rw.add_block(3, blocks[3])
    return out, *state


def corrupt_file(out, meta):
    with open(out / "video.mp4", "r+b") as f:
        f.truncate(meta["video_bytes"] - 10)


def corrupt_state(out, meta):
    meta["video_bytes"] = meta["mp4"]["bytes_written"] = (out / "video.mp4").stat().st_size + 100


def extra_fragment(out, meta):
    meta["mp4"]["sequence"] -= 1


def other_encoder(out, meta):
    meta["mp4"]["preset"] = "ultrafast"  # no CABAC, other PPS: new fragments would not decode


@pytest.mark.parametrize("corrupt, error, match", [
    (corrupt_file, ValueError, "expects at least"),
    (corrupt_state, ValueError, "expects at least"),
    (extra_fragment, ValueError, "expected an init segment and 2 fragments"),
    (other_encoder, RuntimeError, "SPS/PPS"),
])
def test_resume_refuses_a_state_that_does_not_fit(checkpointed, vae, corrupt, error, match):
    out, meta, tensors = checkpointed
    corrupt(out, meta)
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    with pytest.raises(error, match=match):
        RunWriter.reopen(out, meta, tensors, vae=vae)
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before  # nothing touched


def test_resume_refuses_a_state_from_another_run(checkpointed, vae):
    out, meta, tensors = checkpointed
    meta["latent_frames_written"] += 1
    with pytest.raises(ValueError, match="does not match the manifest"):
        RunWriter.reopen(out, meta, tensors, vae=vae)
    with pytest.raises(ValueError, match="decode=True"):
        RunWriter.reopen(out, meta, tensors, decode=False)


def test_decoder_state_round_trip_keeps_rep_entries(vae):
    z = latents(5, seed=8)
    dec = StreamingDecoder(vae)
    first = dec.decode_block(z[:, :, :1])
    meta, tensors = roundtrip(*dec.state_dict())
    # After one latent frame the temporal upsamplers hold "Rep"; two counted convs never get a cache entry.
    assert set(meta["feat_map"]) == {"tensor", "Rep", None}
    assert meta["latent_frames_done"] == 1 and len(tensors) == meta["feat_map"].count("tensor")
    resumed = StreamingDecoder(vae)
    resumed.load_state_dict(meta, tensors)
    assert torch.equal(torch.cat([first, resumed.decode_block(z[:, :, 1:])], dim=2), one_shot(vae, z))


def test_sync_waits_for_the_worker_and_reraises_its_error(tmp_path, vae):
    rw = new_run6(tmp_path / "ok", vae, background=True)
    blocks = blocks6()
    for i in range(3):
        rw.add_block(i, blocks[i])
    rw.sync()
    assert json.loads((tmp_path / "ok" / "manifest.json").read_text())["blocks_written"] == 3
    rw.finish(complete=False)

    rw = RunWriter(tmp_path / "bad", vae=vae, config={}, seed=0, blocks_total=3, frames_total=33, background=True)
    rw.add_block(0, torch.zeros(1, 8, 1, 4, 4))  # wrong channel count: fails on the worker thread
    with pytest.raises(ValueError, match="expected latents"):
        rw.sync()
    manifest = json.loads((tmp_path / "bad" / "manifest.json").read_text())
    assert manifest["status"] == "incomplete" and "writer failed" in manifest["reason"]
    rw.sync()  # finished: nothing left to wait for or raise
    RunWriter(tmp_path / "plain", config={}, seed=0, blocks_total=1, frames_total=9, decode=False).sync()


def test_queued_checkpoint_describes_every_block_added_before_it(tmp_path, vae):
    """The background worker takes the writer's state for a checkpoint after the blocks queued
    before it and before those queued after it; the caller does not wait for either."""
    blocks = blocks6()
    rw = new_run6(tmp_path / "bg", vae, background=True)
    seen = []
    for i in range(3):
        rw.add_block(i, blocks[i])
        if i == 1:
            rw.when_written(lambda meta, tensors: seen.append((meta, {k: v.clone() for k, v in tensors.items()})))
    rw.finish(complete=False)
    ref = new_run6(tmp_path / "sync", vae)
    for i in range(2):
        ref.add_block(i, blocks[i])
    want_meta, want_tensors = ref.state_dict()
    ((meta, tensors),) = seen
    assert meta["blocks_written"] == 2 and meta == want_meta
    assert tensors.keys() == want_tensors.keys() and all(torch.equal(tensors[k], want_tensors[k]) for k in tensors)
    ref.finish(complete=False)


def test_resume_without_decoding(tmp_path):
    out = tmp_path / "run"
    rw = RunWriter(out, config={}, seed=0, blocks_total=3, frames_total=33, decode=False)
    rw.add_block(0, latents(3))
    meta, tensors = roundtrip(*rw.state_dict())
    assert tensors == {} and meta["decoder"] is None and meta["mp4"] is None
    rw.add_block(1, latents(2))
    resumed = RunWriter.reopen(out, meta, tensors, decode=False)
    with pytest.raises(ValueError, match="expected block 1, got 2"):
        resumed.add_block(2, latents(4))
    resumed.add_block(1, latents(2))
    resumed.add_block(2, latents(4))
    m = resumed.finish()
    assert m["status"] == "complete" and [b["latent_start"] for b in m["blocks"]] == [0, 3, 5]


# -- the checkpoint file ------------------------------------------------------------------


WRITER_META = ["blocks_written", "frames_written", "latent_frames_written", "video_bytes", "gop", "mp4", "decoder"]
"""The writer's meta in a FORMAT 1 checkpoint, key by key (files of earlier runs must still resume)."""


class Counter:
    """A minimal stateful part standing in for the engine: a step count and a tensor."""

    def __init__(self):
        self.step, self.x = 0, torch.zeros(2)

    def state_dict(self):
        return {"step": self.step}, {"x": self.x}

    def load_state_dict(self, meta, tensors):
        self.step, self.x = meta["step"], tensors["x"].clone()


@pytest.mark.parametrize("background", [False, True])
def test_checkpointer_writes_the_format_1_layout_and_resumes_exactly(tmp_path, vae, uninterrupted, background):
    blocks = blocks6()
    out = tmp_path / "run"
    rw = new_run6(out, vae, background=background)
    engine = Counter()
    ckpt = checkpoint.Checkpointer(out, {"engine": engine, "writer": rw},
                                   info={"config": {"prompt": "test"}, "run_id": "run 1"})
    for i in range(2):
        rw.add_block(i, blocks[i])
    engine.step, engine.x = 1, torch.ones(2)
    ckpt.save()
    engine.x.add_(5)  # the engine goes on while the writer still decodes: not in the checkpoint
    rw.add_block(2, blocks[2])  # added after the checkpoint: not in it either
    rw.finish(complete=False, reason="stopped")

    with safe_open(out / "checkpoint.safetensors", "pt") as f:
        md, keys = f.metadata(), set(f.keys())
    assert md.keys() == {"format", "state"} and md["format"] == "1"
    state = json.loads(md["state"])
    assert list(state) == ["engine", "writer", "config", "run_id"]  # parts in order, then the info
    assert state["engine"] == {"step": 1} and state["config"] == {"prompt": "test"} and state["run_id"] == "run 1"
    assert list(state["writer"]) == WRITER_META and state["writer"]["blocks_written"] == 2
    assert list(state["writer"]["decoder"]) == ["latent_frames_done", "feat_map"]
    # the engine's tensors at the top level, every other part's under its name
    assert "x" in keys and all(k == "x" or k.startswith("writer.decoder.feat_map.") for k in keys)

    parts = checkpoint.load_parts(out, ("engine", "writer"))
    restored = Counter()
    restored.load_state_dict(*parts["engine"])
    assert restored.step == 1 and torch.equal(restored.x, torch.ones(2))
    resumed = RunWriter.reopen(out, *parts["writer"], vae=vae, background=background)
    for i in range(2, 6):
        resumed.add_block(i, blocks[i])
    resumed.finish()
    assert_same_run(out, uninterrupted)
