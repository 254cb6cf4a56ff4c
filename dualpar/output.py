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

import contextlib
import datetime
import io
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
from av.codec.context import Flags
from safetensors.torch import save as save_safetensors

from . import rundir
from .schedule import pixel_frames

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

    def state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """Position and temporal cache, as JSON-able metadata and named CPU tensors, for :meth:`load_state`.

        The cache (``_feat_map``) holds one entry per causal conv of the decoder: ``None``
        (not run yet), ``"Rep"`` (an upsampling conv after only the first latent frame) or
        the tensor of its last input frames. The tensors are not copied when already on
        the CPU, which is safe because the decoder replaces cache entries, never updates them.
        """
        layout, tensors = [], {}
        for i, entry in enumerate(self._feat_map):
            if isinstance(entry, torch.Tensor):
                tensors[f"feat_map.{i}"] = entry.detach().cpu().contiguous()
                layout.append("tensor")
            elif entry is None or entry == "Rep":
                layout.append(entry)
            else:
                raise TypeError(f"cannot save VAE cache entry {i} of type {type(entry).__name__}")
        # first_chunk (the decoder's causal start) is latent_frames_done == 0
        return {"latent_frames_done": self.latent_frames_done, "feat_map": layout}, tensors

    def load_state(self, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
        """Continue decoding where the decoder that returned ``state()`` stopped."""
        from diffusers.utils.torch_utils import get_module_execution_device

        self.reset()
        if len(meta["feat_map"]) != len(self._feat_map):
            raise ValueError(f"the saved VAE cache has {len(meta['feat_map'])} entries, this VAE's decoder "
                             f"{len(self._feat_map)}: it was saved with another VAE")
        device = get_module_execution_device(self.vae)
        for i, kind in enumerate(meta["feat_map"]):
            if kind == "tensor":
                if f"feat_map.{i}" not in tensors:
                    raise ValueError(f"the saved VAE cache lacks tensor 'feat_map.{i}'")
                self._feat_map[i] = tensors[f"feat_map.{i}"].to(device)
            elif kind is None or kind == "Rep":
                self._feat_map[i] = kind
            else:
                raise ValueError(f"unknown VAE cache entry {kind!r}")
        self.latent_frames_done = meta["latent_frames_done"]

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


def _boxes(f, end: int) -> list[tuple[bytes, int]]:
    """``(type, offset)`` of the top-level boxes in the first ``end`` bytes of file ``f``.

    Raises unless the boxes end exactly at ``end`` (e.g. a fragment cut off by a crash).
    """
    boxes, pos = [], 0
    while pos < end:
        f.seek(pos)
        header = f.read(8)
        size, kind = struct.unpack(">I4s", header) if len(header) == 8 else (0, header)
        if size < 8 or pos + size > end:
            raise RuntimeError(f"truncated or unsupported mp4 box {kind!r} at offset {pos}")
        boxes.append((kind, pos))
        pos += size
    return boxes


def _annexb_nals(data: bytes) -> list[bytes]:
    """The NAL units of Annex-B H.264 data (NALs separated by start codes)."""
    nals = []
    pos = data.find(b"\x00\x00\x01")
    while pos != -1:
        start = pos + 3
        nxt = data.find(b"\x00\x00\x01", start)
        nal = data[start : len(data) if nxt == -1 else nxt]
        nal = nal.rstrip(b"\x00")  # leading byte of a 4-byte start code / trailing zero words
        if nal:
            nals.append(nal)
        pos = nxt
    return nals


def _annexb_to_length_prefixed(data: bytes) -> bytes:
    """Convert an Annex-B H.264 access unit (start codes) to MP4 sample format (4-byte NAL lengths)."""
    return b"".join(struct.pack(">I", len(nal)) + nal for nal in _annexb_nals(data))


def _avcc_parameter_sets(init_segment: bytes) -> list[bytes]:
    """The SPS and PPS NAL units stored in the ``avcC`` box of an init segment."""
    pos = init_segment.find(b"avcC") - 4
    if pos < 0:
        raise RuntimeError("no avcC box in the mp4 init segment")
    (size,) = struct.unpack_from(">I", init_segment, pos)
    avcc = init_segment[pos + 8 : pos + size]
    nals, p = [], 5  # after version, profile, compatibility, level, NAL length size
    for count_mask in (0x1F, 0xFF):  # SPS count (3 reserved bits above it), then PPS count
        count = avcc[p] & count_mask
        p += 1
        for _ in range(count):
            (n,) = struct.unpack_from(">H", avcc, p)
            nals.append(avcc[p + 2 : p + 2 + n])
            p += 2 + n
    return nals


class Mp4Writer:
    """Append RGB frames to an H.264 fragmented MP4 that stays playable if the process dies.

    Every :meth:`write` call becomes one MP4 fragment (``moof`` + ``mdat``) starting with
    an IDR frame, written, flushed and fsynced before ``write`` returns. :meth:`state`
    and :meth:`reopen` let a later process continue the file exactly where it stopped.

    Why the fragments are framed here rather than by FFmpeg's mp4 muxer: the muxer keeps
    the current fragment in memory until the *next* keyframe packet arrives (or until
    ``av_write_frame(ctx, NULL)``, which PyAV 18 does not expose), so with
    ``frag_keyframe`` the last chunk written would only reach the disk once the next chunk
    starts. PyAV's muxer still writes the file header (``ftyp`` + empty ``moov`` with the
    ``avcC`` sample entry), and libx264 runs with ``tune=zerolatency`` (no B-frames, no
    lookahead, sliced threads) so each frame's packet comes out as soon as it is sent.

    Why every fragment gets its own, freshly opened encoder: x264's rate control carries
    history across IDR frames, so an encoder opened after a restart would not reproduce
    what the original encoder would have written (different quantizers, different
    pixels). With one encoder per fragment a fragment's bytes depend only on its frames
    and position, which makes a resumed file byte-identical to an uninterrupted one.
    Opening costs about a millisecond; each fragment repeats x264's version SEI (~700 B).
    All encoders must produce the SPS/PPS of the ``avcC`` in the file header; this is
    checked for every one.
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
        self._setup(path, width, height, fps, gop, crf, preset)
        # The muxer only produces the init segment; its output never goes to disk directly.
        header_buf = _Sink()
        container = av.open(
            header_buf,
            "w",
            format="mp4",
            options={
                "movflags": "frag_keyframe+empty_moov+default_base_moof",
                "video_track_timescale": str(self._timescale),
            },
        )
        self._configure(container.add_stream("libx264", rate=self.fps).codec_context)
        container.start_encoding()
        init_segment = header_buf.take()
        container.close()  # writes a trailer into header_buf, which is dropped
        if [kind for kind, _ in _boxes(io.BytesIO(init_segment), len(init_segment))] != [b"ftyp", b"moov"]:
            # e.g. header still buffered in the muxer's IO
            raise RuntimeError("the mp4 muxer did not produce a complete ftyp+moov init segment")
        self._parameter_sets = _avcc_parameter_sets(init_segment)

        self._file = open(self.path, "wb")
        self._append(init_segment)

    @classmethod
    def reopen(cls, path: str | os.PathLike, state: dict) -> Mp4Writer:
        """Continue the file ``path`` from a :meth:`state` of the writer that wrote it.

        Anything written after that state (whole or partial fragments) is cut off; the
        next :meth:`write` continues the frame count, decode timestamps and fragment
        sequence numbers. The file is checked first (size, box structure, and that this
        x264 produces the SPS/PPS of its header); on failure it is left untouched.
        """
        self = cls.__new__(cls)
        self._setup(path, state["width"], state["height"], Fraction(*state["fps"]), state["gop"], state["crf"],
                    state["preset"])
        size, end = self.path.stat().st_size, state["bytes_written"]
        if end > size:
            raise ValueError(f"{self.path} has {size} bytes but the writer state expects at least {end}; "
                             "the state does not belong to this file, or the file was truncated")
        with open(self.path, "rb") as f:
            try:
                boxes = _boxes(f, end)
            except RuntimeError as e:
                raise ValueError(f"{self.path}: its first {end} bytes are not whole mp4 boxes ({e})") from None
            types = [kind for kind, _ in boxes]
            if types != [b"ftyp", b"moov"] + [b"moof", b"mdat"] * state["sequence"]:
                raise ValueError(f"{self.path}: expected an init segment and {state['sequence']} fragments in the "
                                 f"first {end} bytes, found boxes {b' '.join(types).decode(errors='replace')}")
            f.seek(0)
            init_segment = f.read(boxes[2][1] if len(boxes) > 2 else end)
        self._parameter_sets = _avcc_parameter_sets(init_segment)
        self._encoder()  # raises now, not at the next write, if this x264 would write other SPS/PPS

        self._file = open(self.path, "r+b")
        self._file.truncate(end)
        self._file.seek(end)
        os.fsync(self._file.fileno())
        self.frames_written, self.bytes_written, self._sequence = state["frames_written"], end, state["sequence"]
        return self

    def state(self) -> dict:
        """JSON-able settings and position of this writer, for :meth:`reopen`."""
        return {
            "width": self.width,
            "height": self.height,
            "fps": [self.fps.numerator, self.fps.denominator],
            "gop": self.gop,
            "crf": self.crf,
            "preset": self.preset,
            "frames_written": self.frames_written,
            "sequence": self._sequence,
            "bytes_written": self.bytes_written,
        }

    def _setup(self, path, width, height, fps, gop, crf, preset) -> None:
        if width <= 0 or height <= 0 or width % 2 or height % 2:
            raise ValueError(f"H.264 yuv420p needs positive even width and height, got {width}x{height}")
        self.path = Path(path)
        self.width, self.height = width, height
        self.fps = Fraction(fps)
        self.gop, self.crf, self.preset = gop, crf, preset
        self.frames_written = 0
        self.bytes_written = 0  # file size; a prefix of this length holds exactly frames_written frames
        self._closed = False
        self._sequence = 0  # moof sequence number of the last fragment
        # One tick of the encoder time base is one frame; the track timescale is chosen so
        # that a frame lasts a whole number of ticks.
        self._timescale = self.fps.numerator * 1000
        self._frame_ticks = self._timescale * self.fps.denominator // self.fps.numerator

    def _configure(self, ctx) -> None:
        """Apply this writer's encoder settings to a libx264 codec context (header's or fragment's)."""
        ctx.width, ctx.height, ctx.pix_fmt = self.width, self.height, "yuv420p"
        ctx.time_base = 1 / self.fps
        ctx.framerate = self.fps
        ctx.flags |= Flags.global_header  # SPS/PPS only in the avcC, as the mp4 muxer requests
        if self.gop:
            ctx.gop_size = self.gop
        ctx.options = {
            "preset": self.preset,
            "crf": str(self.crf),
            "tune": "zerolatency",  # bframes=0, rc/sync lookahead 0: one packet out per frame in
        }

    def _encoder(self):
        """A freshly opened encoder for one fragment, checked against the file header's SPS/PPS."""
        ctx = av.CodecContext.create("libx264", "w")
        self._configure(ctx)
        ctx.open()
        if _annexb_nals(ctx.extradata or b"") != self._parameter_sets:
            raise RuntimeError(
                f"libx264 produces other stream parameters (SPS/PPS) than the header of {self.path} holds "
                "(different frame size, encoder settings or x264 build?); cannot append to this file"
            )
        return ctx

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
        encoder = self._encoder()
        packets = []
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            frame.pts = self.frames_written + i  # absolute, so decode timestamps continue the file's
            frame.time_base = encoder.time_base
            packets += encoder.encode(frame)
        packets += encoder.encode(None)  # this fragment's encoder ends here
        if len(packets) != len(frames) or not packets[0].is_keyframe:
            raise RuntimeError(f"x264 returned {len(packets)} packets for {len(frames)} frames "
                               "or did not start with a keyframe; the fragment would not decode on its own")
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
        """Close the file (every written fragment is already complete on disk)."""
        if not self._closed:
            self._closed = True
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
    raised by that ``add_block`` (synchronous) or by the next ``add_block``/``sync``/``finish``
    (background).

    Resuming: before each engine checkpoint call :meth:`writer_state` (it syncs) and store
    its result with the checkpoint; after a restart :meth:`resume` reopens the directory
    at that point and the engine adds the following blocks again.
    """

    MANIFEST = rundir.MANIFEST
    VIDEO = rundir.VIDEO

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
        self._setup(Path(out_dir), vae, decode=decode, save_latents=save_latents, fps=fps, gop=gop)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if (self.out_dir / self.MANIFEST).exists():
            raise FileExistsError(f"{self.out_dir} already holds a run")
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
            "resumed": [],  # one entry per RunWriter.resume
        }
        self._write_manifest()
        self._start(background, queue_blocks)

    @classmethod
    def resume(
        cls,
        out_dir: str | os.PathLike,
        *,
        vae=None,
        state: dict,
        tensors: dict[str, torch.Tensor],
        background: bool = False,
        queue_blocks: int = 2,
        decode: bool = True,
        save_latents: bool = True,
    ) -> RunWriter:
        """Continue the run in ``out_dir`` from a :meth:`writer_state` ``(state, tensors)`` taken earlier.

        Blocks written after that state are discarded (from the video, the manifest and
        ``latents/``): the engine, resuming from the same checkpoint, adds them again,
        starting with block ``state["blocks_written"]``, and the output ends up as an
        uninterrupted run's. Everything is checked before the directory is touched.
        """
        out_dir = Path(out_dir).resolve()
        manifest_path = out_dir / cls.MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{out_dir} holds no run to resume (no {cls.MANIFEST})")
        m = json.loads(manifest_path.read_text())
        n = state["blocks_written"]
        kept = m["blocks"][:n]
        if decode != (m["video"] is not None):
            raise ValueError(f"the run in {out_dir} was written with decode={m['video'] is not None}")
        if n > len(m["blocks"]) or sum(b["latent_frames"] for b in kept) != state["latent_frames_written"]:
            raise ValueError(f"the writer state ({n} blocks, {state['latent_frames_written']} latent frames) does "
                             f"not match the manifest of {out_dir} ({m['blocks_written']} blocks); "
                             "is it from another run?")
        mp4_state = state["mp4"] if decode else None
        if decode and (mp4_state is None) != (n == 0):
            raise ValueError("the writer state has no video position although blocks were written")
        if mp4_state is not None and mp4_state["bytes_written"] != state["video_bytes"]:
            raise ValueError("inconsistent writer state: video_bytes differs from the mp4 writer's bytes_written")

        self = cls.__new__(cls)
        self._setup(out_dir, vae, decode=decode, save_latents=save_latents, fps=m["fps"], gop=state["gop"])
        self._next_block = n
        self._latent_frames_accepted = state["latent_frames_written"]
        if decode:
            prefix = "decoder."
            self._decoder.load_state(
                state["decoder"], {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            )
            if self._decoder.latent_frames_done != state["latent_frames_written"]:
                raise ValueError("inconsistent writer state: decoder position differs from latent_frames_written")
        video = safe_join(out_dir, cls.VIDEO)
        if mp4_state is not None:
            # Checks the file, then cuts it back to the state. (A crash right after this,
            # before the manifest below is written, leaves a manifest claiming more video
            # than there is; resuming again from the same state repairs it.)
            self._mp4 = Mp4Writer.reopen(video, mp4_state)

        m.update(
            status="running",
            reason=None,
            finished_at=None,
            blocks=kept,
            blocks_written=n,
            frames_written=state["frames_written"],
            latent_frames_written=state["latent_frames_written"],
            video_bytes=state["video_bytes"],
            updated_at=_now(),
        )
        m.setdefault("resumed", []).append({"at": _now(), "blocks_written": n})
        self.manifest = m
        self._write_manifest()

        # Only now (the manifest no longer lists them) remove what the dropped blocks left.
        if decode and mp4_state is None:
            video.unlink(missing_ok=True)  # a fresh video starts with the first block
        latents_dir = out_dir / rundir.LATENTS
        for path in latents_dir.glob("block_*.safetensors"):
            if int(path.name[len("block_") : -len(".safetensors")]) >= n:
                path.unlink()
        for path in [*latents_dir.glob(".block_*.tmp"), *out_dir.glob(f".{cls.MANIFEST}.*.tmp")]:
            path.unlink()  # left by atomic_write when the process died mid-write
        self._start(background, queue_blocks)
        return self

    def _setup(self, out_dir: Path, vae, *, decode: bool, save_latents: bool, fps: int, gop: int | None) -> None:
        """State shared by a new and a resumed writer (no files touched)."""
        if decode and vae is None:
            raise ValueError("decode=True needs a vae")
        self.out_dir = out_dir.resolve()
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
        self._queue: queue.Queue | None = None
        self._worker: threading.Thread | None = None

    def _start(self, background: bool, queue_blocks: int) -> None:
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
            copy = latents.detach().clone()
            ready = None
            if copy.is_cuda:  # the worker's stream waits for this one to finish the copy
                ready = torch.cuda.Event()
                ready.record()
            self._queue.put((block_id, copy, ready))
        return frames

    def sync(self) -> None:
        """Wait until every block passed to ``add_block`` is on disk; re-raise a writer failure.

        Only background mode has anything to wait for. Call it before checkpointing, so
        that the checkpoint and the output directory describe the same blocks.
        """
        if self._queue is not None and not self._finished:
            self._queue.join()
        if self._error is not None and not self._finished:
            self.finish()  # records the failure, re-raises

    def writer_state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """What :meth:`resume` needs to continue this run exactly: JSON-able metadata and named tensors.

        Calls :meth:`sync` first. Save the tensors with safetensors next to the engine's
        checkpoint; they are the VAE decoder's temporal cache (empty with ``decode=False``).
        """
        self.sync()
        if self._finished:
            raise RuntimeError("RunWriter is finished")
        return self._state()

    def checkpoint(self, save) -> None:
        """Call ``save(meta, tensors)`` with :meth:`writer_state`'s result as soon as every block
        added so far is on disk, without waiting for that here: in background mode the worker
        calls it in order, so denoising goes on while the queued blocks are decoded. A failing
        ``save`` fails the writer like a failing block."""
        if self._error is not None:
            self.finish()  # raises the worker's error
        if self._finished:
            raise RuntimeError("RunWriter is finished")
        if self._queue is None:
            save(*self._state())
        else:
            self._queue.put(("checkpoint", save))

    def _state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        m = self.manifest
        meta = {key: m[key] for key in ("blocks_written", "frames_written", "latent_frames_written", "video_bytes")}
        meta.update(gop=self.gop, mp4=self._mp4.state() if self._mp4 is not None else None, decoder=None)
        tensors = {}
        if self._decoder is not None:
            meta["decoder"], cache = self._decoder.state()
            tensors = {f"decoder.{name}": t for name, t in cache.items()}
        return meta, tensors

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

    trace = None
    """Optional :class:`dualpar.trace.Trace` receiving decode and write spans."""

    _stream = None
    """The CUDA stream the VAE decodes on (off the denoising stream), made on first use."""

    def _span(self, name: str, cat: str, host: bool = False):
        return self.trace.span(name, cat, host=host) if self.trace is not None else contextlib.nullcontext()

    def _write_block(self, block_id: int, latents: torch.Tensor, ready=None) -> None:
        if latents.is_cuda:
            # Decode on a stream of its own, after the producer's stream made the latents.
            if self._stream is None:
                self._stream = torch.cuda.Stream(latents.device)
            with torch.cuda.stream(self._stream):
                if ready is not None:
                    self._stream.wait_event(ready)
                latents.record_stream(self._stream)
                return self._write_block_now(block_id, latents)
        return self._write_block_now(block_id, latents)

    def _write_block_now(self, block_id: int, latents: torch.Tensor) -> None:
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
            rel = rundir.block_file(block_id)
            data = save_safetensors(
                {"latents": latents.detach().to("cpu").contiguous()},
                metadata={"block_id": str(block_id), "latent_start": str(latent_start)},
            )
            atomic_write(self.out_dir, rel, data)
            entry["latents"] = rel
        if self.decode:
            with self._span(f"decode b{block_id}", "decode"):
                frames = to_uint8_frames(self._decoder.decode_block(latents))
            if len(frames) != entry["frames"]:
                raise RuntimeError(f"block {block_id} decoded to {len(frames)} frames, expected {entry['frames']}")
            if self._mp4 is None:
                height, width = frames.shape[1:3]
                gop = self.gop or self._temporal * f  # the frames of one full block
                self._mp4 = Mp4Writer(safe_join(self.out_dir, self.VIDEO), width, height, fps=self.fps, gop=gop)
            with self._span(f"write b{block_id}", "write", host=True):
                self._mp4.write(frames)
            m["frames_written"] += len(frames)
            m["video_bytes"] = self._mp4.bytes_written
        m["blocks"].append(entry)
        m["blocks_written"] += 1
        m["latent_frames_written"] += f
        m["updated_at"] = _now()
        self._write_manifest()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is not None:
                    pass  # keep draining so a blocked producer can always proceed
                elif item[0] == "checkpoint":
                    with self._span("checkpoint", "write", host=True):
                        item[1](*self._state())
                else:
                    self._write_block(*item)
            except BaseException as e:  # handed to the producer thread
                self._error = e
            finally:
                self._queue.task_done()  # for sync()

    def _write_manifest(self) -> None:
        data = json.dumps(self.manifest, indent=2).encode() + b"\n"
        atomic_write(self.out_dir, self.MANIFEST, data)
