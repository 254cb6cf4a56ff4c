"""Fragmented MP4 muxing: :class:`Mp4Writer` appends frames to an H.264 fragmented MP4, one
durable fragment per ``write``, so the file stays playable if the process dies."""

from __future__ import annotations

import io
import os
import struct
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.codec.context import Flags


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
    an IDR frame, written, flushed and fsynced before ``write`` returns. :meth:`state_dict`
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
    def reopen(cls, path: str | os.PathLike, meta: dict) -> Mp4Writer:
        """Continue the file ``path`` from the :meth:`state_dict` meta of the writer that wrote it.

        Anything written after that state (whole or partial fragments) is cut off; the
        next :meth:`write` continues the frame count, decode timestamps and fragment
        sequence numbers. The file is checked first (size, box structure, and that this
        x264 produces the SPS/PPS of its header); on failure it is left untouched.
        """
        self = cls.__new__(cls)
        self._setup(path, meta["width"], meta["height"], Fraction(*meta["fps"]), meta["gop"], meta["crf"],
                    meta["preset"])
        size, end = self.path.stat().st_size, meta["bytes_written"]
        if end > size:
            raise ValueError(f"{self.path} has {size} bytes but the writer state expects at least {end}; "
                             "the state does not belong to this file, or the file was truncated")
        with open(self.path, "rb") as f:
            try:
                boxes = _boxes(f, end)
            except RuntimeError as e:
                raise ValueError(f"{self.path}: its first {end} bytes are not whole mp4 boxes ({e})") from None
            types = [kind for kind, _ in boxes]
            if types != [b"ftyp", b"moov"] + [b"moof", b"mdat"] * meta["sequence"]:
                raise ValueError(f"{self.path}: expected an init segment and {meta['sequence']} fragments in the "
                                 f"first {end} bytes, found boxes {b' '.join(types).decode(errors='replace')}")
            f.seek(0)
            init_segment = f.read(boxes[2][1] if len(boxes) > 2 else end)
        self._parameter_sets = _avcc_parameter_sets(init_segment)
        self._encoder()  # raises now, not at the next write, if this x264 would write other SPS/PPS

        self._file = open(self.path, "r+b")
        self._file.truncate(end)
        self._file.seek(end)
        os.fsync(self._file.fileno())
        self.frames_written, self.bytes_written, self._sequence = meta["frames_written"], end, meta["sequence"]
        return self

    def state_dict(self) -> tuple[dict, dict]:
        """JSON-able settings and position of this writer, for :meth:`reopen` (no tensors)."""
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
        }, {}

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
