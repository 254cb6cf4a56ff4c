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
    """The Ray driver's one bar for a whole batch: frames written over all its videos (read from each
    video's manifest; its rate is the cluster's frames per second), and how many videos are done,
    running and failed. The actors draw no bars: forwarded through Ray, redraws become noise."""

    def __init__(self, outs: list[str], frames: list[int]):
        self.outs = outs
        self.stream = sys.stderr
        self.frames = [0] * len(outs)
        self._read(range(len(outs)))
        self._running: set[int] = set()
        # what an earlier run wrote counts as done from the start: the rate is this run's
        # in a log file (no terminal) a redraw is a line: one per 10 s at most
        self.bar = tqdm(total=sum(frames), initial=sum(self.frames), desc=f"[driver] {len(outs)} video(s)",
                        unit="frame", file=self.stream, dynamic_ncols=True, smoothing=0.1,
                        mininterval=0.1 if self.stream.isatty() else 10.0)
        self.shown = None
        # Ray prints the actors' lines to the driver's stdout/stderr: whole lines, above the bar
        self.saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _AboveBar(sys.stdout, self.bar), _AboveBar(sys.stderr, self.bar)

    def _read(self, videos) -> None:
        from .output import rundir

        for i in videos:
            self.frames[i] = rundir.read_frames_made(self.outs[i])

    def poll(self, counts: dict[str, int], running: set[int]) -> None:
        """Redraw with the frames on disk now and ``counts`` (videos per status). Only the manifests of
        the ``running`` videos (and of those running at the last poll, which may have just finished) are
        read: a large batch on a shared filesystem is not re-read every half second."""
        self._read(sorted(running | self._running))
        self._running = set(running)
        self.bar.update(sum(self.frames) - self.bar.n)
        text = f"{counts.get('complete', 0)} done, {counts.get('running', 0)} running, {counts.get('failed', 0)} failed"
        if text != self.shown:  # a video started or ended: worth a redraw now
            self.shown = text
            self.bar.set_postfix_str(text, refresh=True)

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
