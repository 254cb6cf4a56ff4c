"""Rank 0's progress bar: iterations, blocks (causal mode: chunks) finished, frames written, ETA."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    """The bar is drawn at the first call: a resumed run starts it where it picks up (tqdm's
    ``initial``), so its rate and ETA count only this run's work."""

    def __init__(self, plan):
        self.plan = plan
        self.unit = "chunks" if plan.cfg.sampling.mode == "causal" else "blocks"
        self.blocks_done = 0
        self.frames_done = 0
        self.iteration = -1
        self.bar = None

    def _start(self, tasks_done: int = 0) -> None:
        self.bar = tqdm(
            total=len(self.plan.tasks),
            initial=tasks_done,
            desc="[rank 0] denoising",
            unit="task",
            file=sys.stderr,
            dynamic_ncols=True,
            smoothing=0.1,
        )

    def resume_from(self, tasks_done: int, blocks_done: int, frames_done: int) -> None:
        """Start the bar where a resumed run picks up."""
        self.blocks_done, self.frames_done = blocks_done, frames_done
        self._start(tasks_done)

    def task_done(self, task) -> None:
        if self.bar is None:
            self._start()
        self.iteration = task.iteration
        self.bar.update(1)
        self._postfix()

    def block_done(self, block: int, frames: int) -> None:
        if self.bar is None:
            self._start()
        self.blocks_done += 1
        self.frames_done += frames
        self._postfix()

    def _postfix(self) -> None:
        n_it = self.plan.num_iterations
        self.bar.set_postfix_str(
            f"iter {self.iteration + 1}/{n_it} {self.unit} {self.blocks_done}/{len(self.plan.blocks)} "
            f"frames {self.frames_done}/{self.plan.cfg.video.frames}",
            refresh=False,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class BatchProgress:
    """The Ray driver's one line for a whole job: frames written over all its videos, read from each
    video's manifest (the actors draw no bars: forwarded through Ray, redraws become noise)."""

    def __init__(self, outs: list[str], frames_per_video: int):
        self.outs, self.per_video = outs, frames_per_video
        self.frames = [0] * len(outs)
        self.stream = sys.stderr
        self.bar = tqdm(total=len(outs) * frames_per_video, desc=f"[driver] {len(outs)} video(s)", unit="frame",
                        file=self.stream, dynamic_ncols=True, smoothing=0.1)
        # Ray prints the actors' lines to the driver's stdout/stderr: whole lines, above the bar
        self.saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _AboveBar(sys.stdout, self.bar), _AboveBar(sys.stderr, self.bar)

    def poll(self) -> None:
        import json
        import os

        from .output import rundir

        for i, out in enumerate(self.outs):
            try:
                with open(os.path.join(out, rundir.MANIFEST)) as f:
                    self.frames[i] = int(json.load(f).get("frames_written", 0))
            except (OSError, ValueError):
                pass  # not started yet, or being replaced this instant
        busy = next((i for i, f in enumerate(self.frames) if f < self.per_video), len(self.outs) - 1)
        self.bar.update(sum(self.frames) - self.bar.n)
        self.bar.set_postfix_str(f"video {busy + 1}/{len(self.outs)}", refresh=True)

    def close(self) -> None:
        for wrapped in (sys.stdout, sys.stderr):
            if isinstance(wrapped, _AboveBar):
                wrapped.flush_line()
        sys.stdout, sys.stderr = self.saved
        self.bar.close()


class _AboveBar:
    """A text stream that writes whole lines above a tqdm bar (cleared, then redrawn), never glued to it."""

    def __init__(self, stream, bar):
        self.stream, self.bar, self.pending = stream, bar, ""

    def write(self, text: str) -> int:
        self.pending += text
        if "\n" in self.pending:
            lines, self.pending = self.pending.rsplit("\n", 1)
            with self.bar.external_write_mode(file=self.bar.fp):
                self.stream.write(lines + "\n")
                self.stream.flush()
        return len(text)

    def flush_line(self) -> None:
        if self.pending:
            self.write("\n")

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ... of the real stream
        return getattr(self.stream, name)
