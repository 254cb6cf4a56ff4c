"""Streaming output of finished latent blocks.

The engine finishes a long video's latents block by block. Each finished block is
decoded with the Wan VAE (continuing its temporal cache, so the result is
bit-identical to decoding the whole video at once), appended to a fragmented MP4
and saved as latents, with a manifest that always describes what is on disk.
Memory therefore does not grow with video length, and a crash loses nothing that
was already written.

- :class:`StreamingDecoder` decodes normalized latent blocks frame by frame.
- :class:`Mp4Writer` appends frames to an H.264 fragmented MP4, one durable
  fragment per ``write``.
- :class:`RunWriter` owns one run's output directory (video, latents, manifest),
  optionally doing the decode/write work on a background thread.
"""

from __future__ import annotations

import datetime
import json
import os
import queue
import struct
import tempfile
import threading
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from av.video.frame import PictureType
from safetensors.torch import save as save_safetensors

__all__ = [
    "StreamingDecoder",
    "to_uint8_frames",
    "pixel_frames",
    "Mp4Writer",
    "RunWriter",
    "safe_join",
    "atomic_write",
]


# --------------------------------------------------------------------------------------
# VAE decoding
# --------------------------------------------------------------------------------------


def pixel_frames(latent_start: int, latent_frames: int, temporal: int = 4) -> int:
    """Number of pixel frames the latent frames ``[latent_start, latent_start + latent_frames)`` decode to.

    The Wan VAE is causal in time: the video's first latent frame decodes to one frame,
    every later one to ``temporal`` frames.
    """
    if latent_frames <= 0:
        return 0
    first = 1 if latent_start == 0 else 0
    return first + temporal * (latent_frames - first)


class StreamingDecoder:
    """Decode a Wan video block by block, bit-identical to one ``vae.decode`` of the whole video.

    ``AutoencoderKLWan._decode`` already runs its decoder one latent frame at a time and
    carries temporal context between frames in a feature cache. Calling the public
    ``decode`` per block would reset that cache at every block boundary (and treat each
    block's first frame as the video's first frame), so instead this class runs the same
    per-frame loop itself and keeps the cache alive across blocks.

    Bit-identity also needs ``post_quant_conv`` (a 1x1x1 conv, run here per block rather
    than over the whole video) to give per-frame results that do not depend on the number
    of frames. That holds for the CPU kernels at real latent sizes; with tiny 2x2 latents
    they pick a different kernel and differ in the last bit.

    Tiled decoding is not supported: tiles keep independent caches and are blended.
    """

    def __init__(self, vae) -> None:
        if getattr(vae, "use_tiling", False):
            raise ValueError("StreamingDecoder does not support VAE tiling; call vae.disable_tiling() first")
        self.vae = vae
        self._feat_map: list | None = None
        self.latent_frames_done = 0
        self.reset()

    def reset(self) -> None:
        """Start a new video: drop the temporal cache."""
        # clear_cache() rebinds vae._feat_map to a fresh list; we keep our own reference,
        # so other uses of the VAE (encode/decode) between blocks cannot clobber our cache.
        self.vae.clear_cache()
        self._feat_map = self.vae._feat_map
        self.latent_frames_done = 0

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Undo the latent normalization exactly as diffusers' ``WanPipeline`` does before decoding."""
        # Local import: keeps `import dualpar.output` light for latents-only runs.
        from diffusers.utils.torch_utils import get_module_execution_device

        vae = self.vae
        z_dim = vae.config.z_dim
        latents = latents.to(get_module_execution_device(vae), dtype=vae.dtype)
        latents_mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(latents.device, latents.dtype)
        latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(
            latents.device, latents.dtype
        )
        return latents / latents_std + latents_mean

    @torch.inference_mode()
    def decode_block(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode the next block of NORMALIZED latents ``[B, z, f, h, w]`` to pixels ``[B, 3, F, H, W]`` in [-1, 1].

        ``F`` is ``1 + 4 * (f - 1)`` for the video's first block and ``4 * f`` afterwards.
        """
        if latents.ndim != 5 or latents.shape[1] != self.vae.config.z_dim:
            raise ValueError(f"expected latents [B, {self.vae.config.z_dim}, f, h, w], got {tuple(latents.shape)}")
        vae = self.vae
        # Same offload hook `vae.decode` triggers (apply_forward_hook), since we bypass it.
        hook = getattr(vae, "_hf_hook", None)
        if hook is not None and hasattr(hook, "pre_forward"):
            hook.pre_forward(vae)

        x = vae.post_quant_conv(self.denormalize(latents))
        outs = []
        for i in range(x.shape[2]):
            conv_idx = [0]  # per-frame cursor into the cache, as in `_decode`
            outs.append(
                vae.decoder(
                    x[:, :, i : i + 1],
                    feat_cache=self._feat_map,
                    feat_idx=conv_idx,
                    first_chunk=self.latent_frames_done == 0,
                )
            )
            self.latent_frames_done += 1
        out = torch.cat(outs, 2)
        if vae.config.patch_size is not None:
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            out = unpatchify(out, patch_size=vae.config.patch_size)
        return torch.clamp(out, min=-1.0, max=1.0)


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """Map a decoded video ``[1, 3, F, H, W]`` (or ``[3, F, H, W]``) in [-1, 1] to uint8 ``[F, H, W, 3]``.

    Same arithmetic as diffusers' ``VideoProcessor.postprocess_video`` for "pil" output.
    """
    if video.ndim == 5:
        if video.shape[0] != 1:
            raise ValueError(f"expected a single video, got batch size {video.shape[0]}")
        video = video[0]
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected [3, F, H, W] frames, got {tuple(video.shape)}")
    frames = (video * 0.5 + 0.5).clamp(0, 1)  # denormalize in the VAE's dtype, like diffusers
    frames = frames.permute(1, 2, 3, 0).cpu().float().numpy()
    return (frames * 255).round().astype(np.uint8)


# --------------------------------------------------------------------------------------
# Fragmented MP4
# --------------------------------------------------------------------------------------


def _box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I4s", 8 + len(body), kind) + body


def _full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return _box(kind, struct.pack(">I", (version << 24) | flags), *payload)


def _box_types(data: bytes) -> list[bytes]:
    """Types of the top-level boxes in ``data``; raises if the last box is truncated."""
    types, pos = [], 0
    while pos < len(data):
        size, kind = struct.unpack_from(">I4s", data, pos)
        if size < 8 or pos + size > len(data):
            raise RuntimeError(f"truncated or unsupported mp4 box {kind!r} at offset {pos}")
        types.append(kind)
        pos += size
    return types


def _annexb_to_length_prefixed(data: bytes) -> bytes:
    """Convert an Annex-B H.264 access unit (start codes) to MP4 sample format (4-byte NAL lengths)."""
    out = bytearray()
    pos = data.find(b"\x00\x00\x01")
    while pos != -1:
        start = pos + 3
        nxt = data.find(b"\x00\x00\x01", start)
        nal = data[start : len(data) if nxt == -1 else nxt]
        nal = nal.rstrip(b"\x00")  # leading byte of a 4-byte start code / trailing zero words
        if nal:
            out += struct.pack(">I", len(nal)) + nal
        pos = nxt
    return bytes(out)


class Mp4Writer:
    """Append RGB frames to an H.264 fragmented MP4 that stays playable if the process dies.

    Every :meth:`write` call becomes one MP4 fragment (``moof`` + ``mdat``) starting with
    an IDR frame, written, flushed and fsynced before ``write`` returns.

    Why the fragments are framed here rather than by FFmpeg's mp4 muxer: the muxer keeps
    the current fragment in memory until the *next* keyframe packet arrives (or until
    ``av_write_frame(ctx, NULL)``, which PyAV 18 does not expose), so with
    ``frag_keyframe`` the last chunk written would only reach the disk once the next chunk
    starts. PyAV's muxer still writes the file header (``ftyp`` + empty ``moov`` with the
    ``avcC`` sample entry), and libx264 runs with ``tune=zerolatency`` (no B-frames, no
    lookahead, sliced threads) so each frame's packet comes out as soon as it is sent.
    """

    _TRACK_ID = 1  # the only track of the header written by the mp4 muxer

    def __init__(
        self,
        path: str | os.PathLike,
        width: int,
        height: int,
        *,
        fps: int | Fraction = 16,
        gop: int | None = None,
        crf: int = 18,
        preset: str = "medium",
    ) -> None:
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"H.264 yuv420p needs positive even width and height, got {width}x{height}")
        self.path = Path(path)
        self.width, self.height = width, height
        self.fps = Fraction(fps)
        self.frames_written = 0
        self.bytes_written = 0  # file size; a prefix of this length holds exactly frames_written frames
        self._closed = False
        self._sequence = 0  # moof sequence number of the last fragment

        # One tick of the encoder time base is one frame; the track timescale is chosen so
        # that a frame lasts a whole number of ticks.
        self._timescale = self.fps.numerator * 1000
        self._frame_ticks = self._timescale * self.fps.denominator // self.fps.numerator

        # The muxer only produces the init segment; its output never goes to disk directly.
        self._header_buf = _Sink()
        self._container = av.open(
            self._header_buf,
            "w",
            format="mp4",
            options={
                "movflags": "frag_keyframe+empty_moov+default_base_moof",
                "video_track_timescale": str(self._timescale),
            },
        )
        self._stream = self._container.add_stream("libx264", rate=self.fps)
        ctx = self._stream.codec_context
        ctx.width, ctx.height, ctx.pix_fmt = width, height, "yuv420p"
        ctx.time_base = 1 / self.fps
        if gop:
            ctx.gop_size = gop
        ctx.options = {
            "preset": preset,
            "crf": str(crf),
            "tune": "zerolatency",  # bframes=0, rc/sync lookahead 0: one packet out per frame in
            "forced-idr": "1",  # a forced keyframe (start of each write) is an IDR
        }
        self._container.start_encoding()
        init_segment = self._header_buf.take()
        if _box_types(init_segment) != [b"ftyp", b"moov"]:  # e.g. header still buffered in the muxer's IO
            raise RuntimeError("the mp4 muxer did not produce a complete ftyp+moov init segment")

        self._file = open(self.path, "wb")
        self._append(init_segment)

    def write(self, frames: np.ndarray) -> int:
        """Encode uint8 RGB frames ``[F, H, W, 3]`` as one durable fragment; return ``F``."""
        if self._closed:
            raise RuntimeError("Mp4Writer is closed")
        frames = np.asarray(frames)
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1:] != (self.height, self.width, 3):
            raise ValueError(
                f"expected uint8 frames [F, {self.height}, {self.width}, 3], got {frames.dtype} {frames.shape}"
            )
        if len(frames) == 0:
            return 0
        packets = []
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = self.frames_written + i
            frame.time_base = self._stream.codec_context.time_base
            if i == 0:
                frame.pict_type = PictureType.I  # every fragment starts decodable on its own
            packets += self._stream.encode(frame)
        if len(packets) != len(frames):
            raise RuntimeError(
                f"x264 returned {len(packets)} packets for {len(frames)} frames; "
                "the encoder is buffering, so the fragment would be incomplete"
            )
        self._append(self._fragment(packets))
        self.frames_written += len(frames)
        return len(frames)

    def _fragment(self, packets: list) -> bytes:
        """Build one ``moof`` + ``mdat`` for ``packets`` (decode order, encoder time base = 1 frame)."""
        self._sequence += 1
        samples = [_annexb_to_length_prefixed(bytes(p)) for p in packets]
        entries = b"".join(
            struct.pack(
                ">IIIi",
                self._frame_ticks,
                len(data),
                0x02000000 if p.is_keyframe else 0x01010000,  # sync sample / depends on others, non-sync
                (p.pts - p.dts) * self._frame_ticks,
            )
            for p, data in zip(packets, samples)
        )
        base_dts = packets[0].dts * self._frame_ticks

        def moof(data_offset: int) -> bytes:
            return _box(
                b"moof",
                _full_box(b"mfhd", 0, 0, struct.pack(">I", self._sequence)),
                _box(
                    b"traf",
                    _full_box(b"tfhd", 0, 0x020000, struct.pack(">I", self._TRACK_ID)),  # default-base-is-moof
                    _full_box(b"tfdt", 1, 0, struct.pack(">Q", base_dts)),
                    # data offset, per-sample duration, size, flags and (signed) composition offset
                    _full_box(b"trun", 1, 0x000F01, struct.pack(">Ii", len(samples), data_offset), entries),
                ),
            )

        header = moof(0)
        return moof(len(header) + 8) + _box(b"mdat", *samples)

    def _append(self, data: bytes) -> None:
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())
        self.bytes_written += len(data)

    def close(self) -> None:
        """Drain the encoder, write any remaining frames and close the file."""
        if self._closed:
            return
        self._closed = True
        try:
            packets = self._stream.encode(None)
            if packets:  # not expected with zerolatency, but never drop frames
                self._append(self._fragment(packets))
                self.frames_written += len(packets)
            self._container.close()
        finally:
            self._file.close()

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Sink:
    """Write-only file object for the mp4 muxer: keeps what was written since the last ``take``."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []

    def write(self, data) -> int:
        self._chunks.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data, self._chunks = b"".join(self._chunks), []
        return data

    def flush(self) -> None:
        pass


# --------------------------------------------------------------------------------------
# Run directory
# --------------------------------------------------------------------------------------


def safe_join(root: str | os.PathLike, relpath: str | os.PathLike) -> Path:
    """``root / relpath``, refusing anything (``..``, absolute paths, symlinks) that resolves outside ``root``."""
    root = Path(root).resolve()
    path = (root / relpath).resolve()
    if path == root or not path.is_relative_to(root):
        raise ValueError(f"path {str(relpath)!r} escapes the output directory {str(root)!r}")
    return path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(root: str | os.PathLike, relpath: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``root/relpath`` so readers see either the old or the new file, never a partial one."""
    path = safe_join(root, relpath)
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
        _fsync_dir(path.parent.parent)  # make the new directory's entry durable too
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.chmod(f.fileno(), 0o666 & ~_UMASK)  # mkstemp makes 0600; give it a normal file's mode
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)  # make the rename itself durable
    return path


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


class RunWriter:
    """Own the output directory of one run: ``video.mp4``, ``latents/block_XXXXX.safetensors``, ``manifest.json``.

    Blocks must arrive in order 0, 1, 2, ... For each block the latents file is written
    first, then the video fragment, then the manifest, each durably; so the manifest never
    claims more than is on disk. After a crash the MP4 may hold one block more than the
    manifest says; its first ``video_bytes`` bytes hold exactly ``frames_written`` frames.

    With ``background=True`` saving, decoding and writing run on one worker thread fed by
    a bounded queue of ``queue_blocks`` latent blocks (the producer blocks while it is full). A failure
    while writing a block, on either thread, finishes the run as "incomplete" and is
    raised by that ``add_block`` (synchronous) or by the next ``add_block``/``finish``
    (background).
    """

    MANIFEST = "manifest.json"
    VIDEO = "video.mp4"

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        vae=None,
        config: dict,
        seed: int,
        blocks_total: int,
        frames_total: int,
        fps: int = 16,
        gop: int | None = None,
        save_latents: bool = True,
        decode: bool = True,
        background: bool = False,
        queue_blocks: int = 2,
    ) -> None:
        if decode and vae is None:
            raise ValueError("decode=True needs a vae")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir = out_dir.resolve()
        if (self.out_dir / self.MANIFEST).exists():
            raise FileExistsError(f"{self.out_dir} already holds a run")
        self.decode = decode
        self.save_latents = save_latents
        self.fps = fps
        self.gop = gop
        self._decoder = StreamingDecoder(vae) if decode else None
        self._mp4: Mp4Writer | None = None
        self._temporal = (vae.config.scale_factor_temporal if vae is not None else None) or 4
        self._next_block = 0  # producer side
        self._latent_frames_accepted = 0  # producer side
        self._finished = False
        self._error: BaseException | None = None
        # Updated by whichever thread writes blocks; read it after finish() in background mode.
        self.manifest: dict[str, Any] = {
            "config": config,
            "seed": seed,
            "status": "running",
            "reason": None,
            "blocks_total": blocks_total,
            "blocks_written": 0,
            "frames_total": frames_total,
            "frames_written": 0,
            "latent_frames_written": 0,
            "fps": fps,
            "video": self.VIDEO if decode else None,
            "video_bytes": 0,
            "blocks": [],
            "created_at": _now(),
            "updated_at": _now(),
            "finished_at": None,
        }
        self._write_manifest()

        self._queue: queue.Queue | None = None
        self._worker: threading.Thread | None = None
        if background:
            self._queue = queue.Queue(maxsize=max(1, queue_blocks))
            self._worker = threading.Thread(target=self._work, name="RunWriter", daemon=True)
            self._worker.start()

    # -- producer API --------------------------------------------------------------------

    def add_block(self, block_id: int, latents: torch.Tensor) -> int:
        """Save, decode and append block ``block_id`` (normalized latents ``[1, z, f, h, w]``).

        Returns the number of frames the block adds to ``video.mp4`` (0 with ``decode=False``).
        In background mode the work is only queued when this returns.
        """
        if self._error is not None:
            self.finish()  # raises the worker's error
        if self._finished:
            raise RuntimeError("RunWriter is finished")
        if block_id != self._next_block:
            raise ValueError(f"blocks must arrive in order: expected block {self._next_block}, got {block_id}")
        if block_id >= self.manifest["blocks_total"]:
            raise ValueError(f"block {block_id} is beyond blocks_total={self.manifest['blocks_total']}")
        if latents.ndim != 5 or latents.shape[0] != 1 or latents.shape[2] == 0:
            raise ValueError(f"expected latents [1, z, f, h, w] with f > 0, got {tuple(latents.shape)}")
        f = latents.shape[2]
        frames = pixel_frames(self._latent_frames_accepted, f, self._temporal) if self.decode else 0
        self._next_block += 1
        self._latent_frames_accepted += f
        if self._queue is None:
            try:
                self._write_block(block_id, latents)
            except BaseException as e:
                self._error = e
                self.finish()  # records the failure, re-raises
        else:
            # Copy: the caller may reuse its buffer while the block waits in the queue.
            self._queue.put((block_id, latents.detach().clone()))
        return frames

    def finish(self, complete: bool = True, reason: str | None = None) -> dict:
        """Close the video, write the final manifest and return it (a no-op once finished).

        Status is "complete" only if ``complete`` and all ``blocks_total`` blocks were
        written; otherwise "incomplete" with ``reason``. Re-raises a writer failure.
        """
        if self._finished:
            return self.manifest
        self._finished = True
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join()
        error = self._error
        m = self.manifest
        try:
            if self._mp4 is not None:
                self._mp4.close()
        finally:
            all_written = m["blocks_written"] == m["blocks_total"]
            if error is not None:
                complete, reason = False, reason or f"writer failed: {error!r}"
            elif not all_written:
                reason = reason or f"only {m['blocks_written']} of {m['blocks_total']} blocks written"
            m["status"] = "complete" if complete and all_written else "incomplete"
            m["reason"] = None if m["status"] == "complete" else reason
            m["finished_at"] = m["updated_at"] = _now()
            self._write_manifest()
        if error is not None:
            raise error
        return m

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.finish()
        elif not self._finished:
            try:
                self.finish(complete=False, reason=f"{exc_type.__name__}: {exc}")
            except BaseException:
                pass  # the original exception is the one to propagate

    # -- the actual work (caller thread, or the worker in background mode) ----------------

    def _write_block(self, block_id: int, latents: torch.Tensor) -> None:
        m = self.manifest
        latent_start = m["latent_frames_written"]
        f = latents.shape[2]
        entry = {
            "id": block_id,
            "latent_start": latent_start,
            "latent_frames": f,
            "frame_start": pixel_frames(0, latent_start, self._temporal),
            "frames": pixel_frames(latent_start, f, self._temporal),
            "latents": None,
        }
        if self.save_latents:
            rel = f"latents/block_{block_id:05d}.safetensors"
            data = save_safetensors(
                {"latents": latents.detach().to("cpu").contiguous()},
                metadata={"block_id": str(block_id), "latent_start": str(latent_start)},
            )
            atomic_write(self.out_dir, rel, data)
            entry["latents"] = rel
        if self.decode:
            frames = to_uint8_frames(self._decoder.decode_block(latents))
            if len(frames) != entry["frames"]:
                raise RuntimeError(f"block {block_id} decoded to {len(frames)} frames, expected {entry['frames']}")
            if self._mp4 is None:
                height, width = frames.shape[1:3]
                gop = self.gop or self._temporal * f  # the frames of one full block
                self._mp4 = Mp4Writer(safe_join(self.out_dir, self.VIDEO), width, height, fps=self.fps, gop=gop)
            self._mp4.write(frames)
            m["frames_written"] += len(frames)
            m["video_bytes"] = self._mp4.bytes_written
        m["blocks"].append(entry)
        m["blocks_written"] += 1
        m["latent_frames_written"] += f
        m["updated_at"] = _now()
        self._write_manifest()

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue  # keep draining so a blocked producer can always proceed
            try:
                self._write_block(*item)
            except BaseException as e:  # handed to the producer thread
                self._error = e

    def _write_manifest(self) -> None:
        data = json.dumps(self.manifest, indent=2).encode() + b"\n"
        atomic_write(self.out_dir, self.MANIFEST, data)
