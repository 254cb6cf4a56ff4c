"""The run writer: :class:`RunWriter` owns one run's output directory (video, latents, manifest),
decoding and appending each finished block, optionally on a background thread."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_safetensors

from ..schedule import pixel_frames
from . import rundir
from .decode import StreamingDecoder, to_uint8_frames
from .mp4 import Mp4Writer
from .rundir import atomic_write, safe_join


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

    Resuming: store :meth:`state_dict` (it syncs; or :meth:`when_written`, which does not
    wait) with each engine checkpoint; after a restart :meth:`reopen` reopens the directory
    at that point and the engine adds the following blocks again.
    """

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
        if (self.out_dir / rundir.MANIFEST).exists():
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
            "video": rundir.VIDEO if decode else None,
            "video_bytes": 0,
            "blocks": [],
            "created_at": _now(),
            "updated_at": _now(),
            "finished_at": None,
            "resumed": [],  # one entry per RunWriter.reopen
        }
        self._write_manifest()
        self._start(background, queue_blocks)

    @classmethod
    def reopen(
        cls,
        out_dir: str | os.PathLike,
        meta: dict,
        tensors: dict[str, torch.Tensor],
        *,
        vae=None,
        background: bool = False,
        queue_blocks: int = 2,
        decode: bool = True,
        save_latents: bool = True,
    ) -> RunWriter:
        """Continue the run in ``out_dir`` from a :meth:`state_dict` ``(meta, tensors)`` taken earlier.

        Blocks written after that state are discarded (from the video, the manifest and
        ``latents/``): the engine, resuming from the same checkpoint, adds them again,
        starting with block ``meta["blocks_written"]``, and the output ends up as an
        uninterrupted run's. Everything is checked before the directory is touched.
        """
        out_dir = Path(out_dir).resolve()
        manifest_path = out_dir / rundir.MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{out_dir} holds no run to resume (no {rundir.MANIFEST})")
        m = json.loads(manifest_path.read_text())
        n = meta["blocks_written"]
        kept = m["blocks"][:n]
        if decode != (m["video"] is not None):
            raise ValueError(f"the run in {out_dir} was written with decode={m['video'] is not None}")
        if n > len(m["blocks"]) or sum(b["latent_frames"] for b in kept) != meta["latent_frames_written"]:
            raise ValueError(f"the writer state ({n} blocks, {meta['latent_frames_written']} latent frames) does "
                             f"not match the manifest of {out_dir} ({m['blocks_written']} blocks); "
                             "is it from another run?")
        mp4_meta = meta["mp4"] if decode else None
        if decode and (mp4_meta is None) != (n == 0):
            raise ValueError("the writer state has no video position although blocks were written")
        if mp4_meta is not None and mp4_meta["bytes_written"] != meta["video_bytes"]:
            raise ValueError("inconsistent writer state: video_bytes differs from the mp4 writer's bytes_written")

        self = cls.__new__(cls)
        self._setup(out_dir, vae, decode=decode, save_latents=save_latents, fps=m["fps"], gop=meta["gop"])
        self._next_block = n
        self._latent_frames_accepted = meta["latent_frames_written"]
        if decode:
            prefix = "decoder."
            self._decoder.load_state_dict(
                meta["decoder"], {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            )
            if self._decoder.latent_frames_done != meta["latent_frames_written"]:
                raise ValueError("inconsistent writer state: decoder position differs from latent_frames_written")
        video = safe_join(out_dir, rundir.VIDEO)
        if mp4_meta is not None:
            # Checks the file, then cuts it back to the state. (A crash right after this,
            # before the manifest below is written, leaves a manifest claiming more video
            # than there is; resuming again from the same state repairs it.)
            self._mp4 = Mp4Writer.reopen(video, mp4_meta)

        m.update(
            status="running",
            reason=None,
            finished_at=None,
            blocks=kept,
            blocks_written=n,
            frames_written=meta["frames_written"],
            latent_frames_written=meta["latent_frames_written"],
            video_bytes=meta["video_bytes"],
            updated_at=_now(),
        )
        m.setdefault("resumed", []).append({"at": _now(), "blocks_written": n})
        self.manifest = m
        self._write_manifest()

        # Only now (the manifest no longer lists them) remove what the dropped blocks left.
        if decode and mp4_meta is None:
            video.unlink(missing_ok=True)  # a fresh video starts with the first block
        latents_dir = out_dir / rundir.LATENTS
        for path in latents_dir.glob("block_*.safetensors"):
            if int(path.name[len("block_") : -len(".safetensors")]) >= n:
                path.unlink()
        for path in [*latents_dir.glob(".block_*.tmp"), *out_dir.glob(f".{rundir.MANIFEST}.*.tmp")]:
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
        self.output_s = 0.0
        """Seconds spent saving, decoding and writing blocks (host time: decoding ends in a copy to the host)."""

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

    def state_dict(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """What :meth:`reopen` needs to continue this run exactly: JSON-able metadata and named tensors.

        Calls :meth:`sync` first. The tensors are the VAE decoder's temporal cache (none with
        ``decode=False``); :class:`dualpar.checkpoint.Checkpointer` stores them with the engine's.
        """
        self.sync()
        if self._finished:
            raise RuntimeError("RunWriter is finished")
        return self._state()

    def when_written(self, save) -> None:
        """Call ``save(meta, tensors)`` with :meth:`state_dict`'s result as soon as every block
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
            self._queue.put(("when_written", save))

    def _state(self) -> tuple[dict, dict[str, torch.Tensor]]:
        m = self.manifest
        meta = {key: m[key] for key in ("blocks_written", "frames_written", "latent_frames_written", "video_bytes")}
        # the MP4 writer's state is metadata only (its tensors are none)
        meta.update(gop=self.gop, mp4=self._mp4.state_dict()[0] if self._mp4 is not None else None, decoder=None)
        tensors = {}
        if self._decoder is not None:
            meta["decoder"], cache = self._decoder.state_dict()
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
        t0 = time.perf_counter()
        try:
            self._write_block_files(block_id, latents)
        finally:
            self.output_s += time.perf_counter() - t0

    def _write_block_files(self, block_id: int, latents: torch.Tensor) -> None:
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
                self._mp4 = Mp4Writer(safe_join(self.out_dir, rundir.VIDEO), width, height, fps=self.fps, gop=gop)
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
                elif item[0] == "when_written":
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
        atomic_write(self.out_dir, rundir.MANIFEST, data)
